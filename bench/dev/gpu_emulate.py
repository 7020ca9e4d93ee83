"""Run pyfff.gpu's Python side and tests/test_gpu.py without a GPU: a NumPy stand-in for CuPy.

A development aid, not a test of the kernels: it replaces ``cupy`` with a tiny
module whose arrays are NumPy arrays and whose kernels
(``fff_route``, ``fff_route_staged``, ``fff_bucket_scatter``, ``fff_output``,
``fff_output_staged``) are NumPy
re-implementations that unpack the prepared (ctypes) arguments of each launch
in the order of the ``kernels/fff.cu`` signatures. That checks the orchestration in
``pyfff/gpu/_fff.py`` (schedules, key levels, argument lists, dtype and shape
handling) and the test bodies before device time is spent on them.

Run: python bench/dev/gpu_emulate.py [pytest args, default: tests/test_gpu.py -q -x]
"""
from __future__ import annotations

import ctypes
import functools
import sys
import types
import weakref

import numpy as np


_LIVE = []  # weak references to the emulated arrays (pointers are resolved against their memory)


class ndarray(np.ndarray):  # noqa: N801  (mirrors cupy.ndarray)
    def __array_finalize__(self, obj):
        if self.size and self.flags.c_contiguous:
            if len(_LIVE) > 4096:
                _LIVE[:] = [r for r in _LIVE if r() is not None]
            _LIVE.append(weakref.ref(self))

    def fill(self, value):
        np.ndarray.fill(self, value)

    @property
    def device(self):
        return types.SimpleNamespace(id=0)

    @property
    def data(self):
        arr = self

        def memset_async(value, n_bytes):
            assert value == 0 and n_bytes == arr.nbytes
            np.ndarray.fill(arr, 0)

        return types.SimpleNamespace(ptr=self.__array_interface__["data"][0], memset_async=memset_async)


def _wrap(a):
    return np.asarray(a).view(ndarray)


def _arr(a):
    return None if a is None else np.asarray(a)


def _route(grid, block, args, vec=None, out=None):
    """fff_route (``vec``, ``out``: its VEC and OUT template arguments) or, with ``out`` None, fff_route_staged."""
    (x, n, d_in, w_in, b_in, has_bias, n_trees, depth, tree, lo, hi, order, use_order, nodes, logits,
     key_level, keys, counts, keep_x, slots, slot_cap, in_counts, in_cap, perm_out, starts_out) = args[:25]
    assert keep_x in (0, 1) and (keep_x == 0 or hi < depth + 1)  # only stages before the last keep x in L2
    assert use_order in (0, 1, 2) and slot_cap >= 0 and (slot_cap == 0 or key_level >= 0)
    if out is None:  # fff_route_staged: no slots to read; the order sorted by the start node's key
        assert len(args) == 27 and use_order != 2 and 1 <= args[26] <= hi - lo
        if lo > 0:
            _check_sorted(args[25], order, int(n), lo,
                          lambda tok: _start_key(nodes, logits, tok, n_trees, tree, depth, lo))
    else:
        assert len(args) == 29
    x, w_in, b_in, order, nodes, logits, keys, counts = map(_arr, (x, w_in, b_in, order, nodes, logits, keys, counts))
    if use_order == 2:  # tokens in bucket slots of the previous stage: the sorted order and its bucket starts
        in_counts, slots_in = _arr(in_counts), order
        nb = 2**lo
        offs = np.concatenate([[0], np.cumsum(in_counts[:nb])])
        assert offs[-1] == n
        perm = np.concatenate([slots_in[b * in_cap: b * in_cap + in_counts[b]] for b in range(nb)])
        _arr(perm_out)[: int(n)] = perm
        _arr(starts_out)[: nb + 1] = offs
        order = perm
        _check_sorted(offs, perm, int(n), lo, lambda tok: _start_key(nodes, logits, tok, n_trees, tree, depth, lo))
    n_nodes = 2 ** (depth + 1) - 1
    n, size = int(n), int(n) * n_trees * (depth + 1)
    x = x[: n * d_in].reshape(n, d_in)
    w_in = w_in[: n_trees * n_nodes * d_in].reshape(-1, d_in)
    nodes3 = nodes[:size].reshape(n, n_trees, depth + 1)
    logits3 = logits[:size].reshape(n, n_trees, depth + 1)
    for p in range(n):
        tok = int(order[p]) if use_order else p
        if lo > 0:
            node = 2 * int(nodes3[tok, tree, lo - 1]) + 1 + int(logits3[tok, tree, lo - 1] > 0)
        else:
            node = 0
        key_node = 0
        for level in range(lo, hi):
            row = tree * n_nodes + node
            z = np.dot(w_in[row], x[tok])
            if has_bias:
                z = z + b_in[row]
            nodes3[tok, tree, level] = node
            logits3[tok, tree, level] = z
            if level == key_level:
                key_node = node
            node = 2 * node + 1 + int(z > 0)
        if key_level == hi:
            key_node = node
        if key_level >= 0:
            key = key_node - (2**key_level - 1)
            assert 0 <= key < 2**key_level
            if slot_cap:
                _arr(slots)[key * slot_cap + counts[key]] = tok
            else:
                keys[tok] = key
            counts[key] += 1
    if out:  # the last stage of a one-tree layer forms y (what the host promises the kernel)
        w_out, d_out, act, y = args[25:]
        assert n_trees == 1 and hi == depth + 1 == len(nodes3[0, 0]) and depth + 1 <= 16 and key_level < 0
        assert d_out % vec == 0 and d_out <= 192 * vec and (out == 2) == (d_out == 192 * vec)
        _output(grid, block, (nodes, logits, n, d_out, w_out, 1, depth, act, order, use_order, y))


def _start_key(nodes, logits, tok, n_trees, tree, depth, lo):
    base = (tok * n_trees + tree) * (depth + 1)
    node = 2 * int(nodes[base + lo - 1]) + 1 + int(logits[base + lo - 1] > 0)
    return node - (2**lo - 1)


def _check_sorted(starts, order, n, level, key_of):
    """What the staged kernels rely on: bucket b of the sort by the node of ``level`` is
    order[starts[b]:starts[b + 1]] and holds the tokens whose key is b."""
    starts = np.asarray(starts)[: 2**level + 1]
    assert starts[0] == 0 and starts[-1] == n and (np.diff(starts) >= 0).all()
    for b in range(2**level):
        for p in range(starts[b], starts[b + 1]):
            assert key_of(int(order[p])) == b


def _scatter(grid, block, args):
    keys, n, counts, n_buckets, cursors, perm, starts = args
    keys, counts, perm, starts = map(_arr, (keys, counts, perm, starts))
    assert counts[:n_buckets].sum() == n
    perm[:] = np.argsort(keys[: int(n)], kind="stable")  # any order inside a bucket is valid
    assert (np.diff(keys[perm]) >= 0).all()
    starts[: n_buckets + 1] = np.concatenate([[0], np.cumsum(counts[:n_buckets])])


def _output(grid, block, args):
    nodes, logits, n, d_out, w_out, n_trees, depth, act, order, use_order, y = args
    from pyfff.reference import apply_activation

    nodes, logits, w_out, y = map(_arr, (nodes, logits, w_out, y))
    n_nodes = 2 ** (depth + 1) - 1
    names = {0: "gelu", 1: "gelu_tanh", 2: "relu"}
    n, size = int(n), int(n) * n_trees * (depth + 1)
    nodes3 = nodes[:size].reshape(n, n_trees, depth + 1)
    a = apply_activation(logits[:size].reshape(n, n_trees, depth + 1), names[int(act)])
    w_out = w_out[: n_trees * n_nodes * d_out].reshape(-1, d_out)
    y = y[: n * d_out].reshape(n, d_out)
    positions = np.asarray(order)[: int(n)] if use_order else np.arange(int(n))
    for tok in positions:
        acc = np.zeros(d_out, dtype=y.dtype)
        for t in range(n_trees):
            for level in range(depth + 1):
                acc += a[tok, t, level] * w_out[t * n_nodes + nodes3[tok, t, level]]
        y[tok] = acc


def _output_staged(grid, block, args):
    nodes, logits, n, d_out, w_out, depth, act, order, use_order, starts, key_level, shift, slice_vecs, y = args[:14]
    key_counts = args[14]
    assert 1 <= slice_vecs and depth + 1 <= 32 and shift >= 0 and key_level + shift <= depth
    if key_counts is not None:  # the kernel's bucket starts from the sort's histogram equal the sort's own
        assert use_order and shift == 0
        own = np.concatenate([[0], np.cumsum(np.asarray(key_counts)[: 2**key_level])])
        assert (own == np.asarray(starts)[: 2**key_level + 1]).all()
    if use_order:
        level = key_level + shift
        _check_sorted(starts, order, int(n), level, lambda tok: int(nodes[tok * (depth + 1) + level]) - (2**level - 1))
    else:
        assert key_level == 0
    _output(grid, block, (nodes, logits, n, d_out, w_out, 1, depth, act, order, use_order, y))


class _Kernel:
    def __init__(self, name):
        self.name = name
        self.kernel = types.SimpleNamespace(ptr=id(self))
        base = name.split("<")[0]
        self._fn = {"fff_route": _route, "fff_route_staged": _route, "fff_bucket_scatter": _scatter,
                    "fff_output": _output, "fff_output_staged": _output_staged}[base]
        if base == "fff_route":  # its VEC and OUT template arguments
            targs = name.rstrip(">").split("<")[1].split(",")
            self._fn = functools.partial(_route, vec=int(targs[1]), out=int(targs[3]))


def _decode(carg):
    """A ctypes kernel argument as the emulated kernels take it: pointers become the arrays there."""
    if isinstance(carg, ctypes.c_void_p):
        if carg.value is None:  # a null pointer
            return None
        for ref in reversed(_LIVE):
            arr = ref()
            if arr is None:
                continue
            start = arr.__array_interface__["data"][0]
            if start <= carg.value < start + arr.nbytes and (carg.value - start) % arr.itemsize == 0:
                return arr.reshape(-1)[(carg.value - start) // arr.itemsize:]  # flat, from the pointer on
        raise AssertionError(f"kernel argument {carg.value:#x} points at no live array")
    assert isinstance(carg, (ctypes.c_int32, ctypes.c_int64)), type(carg)
    return carg.value


def emulated_launch(launch, stream_ptr):
    assert launch.grid >= 1 and launch.grid_y >= 1 and launch.block in (256, 384, 512, 768, 1024)
    # shared memory: the staged kernels' rows, or fff_route's bucket starts when it reads slots (use_order 2)
    reads_slots = launch.name.startswith("fff_route<") and launch.cargs[12].value == 2
    assert launch.smem <= 232448 and ("_staged" in launch.name or reads_slots) == (launch.smem > 0)
    launch.kernel._fn((launch.grid,), (launch.block,), [_decode(a) for a in launch.cargs])


class _Module:
    def __init__(self, code=None, options=(), name_expressions=None):
        assert code and "#line 1" in code
        self.names = tuple(name_expressions or ())

    def get_function(self, name):
        assert name in self.names or "<" not in name, name
        return _Kernel(name)


def fake_cupy():
    cp = types.ModuleType("cupy")
    cp.__version__ = "emulated"
    cp.ndarray = ndarray
    cp.float32, cp.float64, cp.int32, cp.int64 = np.float32, np.float64, np.int32, np.int64
    cp.asarray = lambda a, dtype=None: _wrap(np.asarray(a, dtype=dtype))
    cp.ascontiguousarray = lambda a: _wrap(np.ascontiguousarray(a))
    cp.asnumpy = lambda a: np.array(a)
    cp.empty = lambda shape, dtype=np.float64: _wrap(np.full(shape, -7, dtype=dtype))  # never 0-initialised
    cp.zeros = lambda shape, dtype=np.float64: _wrap(np.zeros(shape, dtype=dtype))
    cp.isfinite = lambda a: _wrap(np.isfinite(a))
    cp.memoize = lambda for_each_device=False: (lambda f: f)
    cp.RawModule = _Module

    class Device:
        id = 0

        def __init__(self, i=0):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def synchronize(self):
            pass

    attrs = {16: 132, 39: 2048, 75: 7, 81: 233472, 82: 65536, 97: 232448}  # an H100's (compute capability 7: no PDL)
    runtime = types.SimpleNamespace(getDeviceCount=lambda: 1, deviceGetAttribute=lambda a, d: attrs[a])
    driver = types.SimpleNamespace(funcSetAttribute=lambda f, attr, value: None,
                                   funcGetAttribute=lambda attr, f: 80)
    cp.cuda = types.SimpleNamespace(Device=Device, runtime=runtime, driver=driver,
                                    get_current_stream=lambda: types.SimpleNamespace(ptr=0))
    return cp


def main(argv=None):
    import pytest

    sys.modules["cupy"] = fake_cupy()
    import pyfff.gpu._fff

    pyfff.gpu._fff._launch = emulated_launch
    return pytest.main(argv or ["tests/test_gpu.py", "-q", "-x", "-p", "no:cacheprovider"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Run pyfff.gpu's Python side and tests/test_gpu.py without a GPU: a NumPy stand-in for CuPy.

A development aid, not a test of the kernels: it replaces ``cupy`` with a tiny
module whose arrays are NumPy arrays and whose three kernels
(``fff_route``, ``fff_bucket_scatter``, ``fff_output``) are NumPy
re-implementations that unpack their arguments in the order of the
``kernels/fff.cu`` signatures. That checks the orchestration in
``pyfff/gpu/_fff.py`` (schedules, key levels, argument lists, dtype and shape
handling) and the test bodies before device time is spent on them.

Run: python bench/dev/gpu_emulate.py [pytest args, default: tests/test_gpu.py -q -x]
"""
from __future__ import annotations

import contextlib
import sys
import types

import numpy as np


class ndarray(np.ndarray):  # noqa: N801  (mirrors cupy.ndarray)
    @property
    def device(self):
        return types.SimpleNamespace(id=0)

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.__array_interface__["data"][0])


def _wrap(a):
    return np.asarray(a).view(ndarray)


def _arr(a):
    return None if a is None else np.asarray(a)


def _route(grid, block, args):
    (x, n, d_in, w_in, b_in, has_bias, n_trees, depth, tree, lo, hi, order, use_order, nodes, logits,
     key_level, keys, counts) = args
    x, w_in, b_in, order, nodes, logits, keys, counts = map(_arr, (x, w_in, b_in, order, nodes, logits, keys, counts))
    n_nodes = 2 ** (depth + 1) - 1
    nodes3 = nodes.reshape(int(n), n_trees, depth + 1)
    logits3 = logits.reshape(int(n), n_trees, depth + 1)
    for p in range(int(n)):
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
            keys[tok] = key
            counts[key] += 1


def _scatter(grid, block, args):
    keys, n, counts, n_buckets, cursors, perm = args
    keys, counts, perm = map(_arr, (keys, counts, perm))
    assert counts[:n_buckets].sum() == n
    perm[:] = np.argsort(keys[: int(n)], kind="stable")  # any order inside a bucket is valid
    assert (np.diff(keys[perm]) >= 0).all()


def _output(grid, block, args):
    nodes, logits, n, d_out, w_out, n_trees, depth, act, order, use_order, y = args
    from pyfff.reference import apply_activation

    nodes, logits, w_out, y = map(_arr, (nodes, logits, w_out, y))
    n_nodes = 2 ** (depth + 1) - 1
    names = {0: "gelu", 1: "gelu_tanh", 2: "relu"}
    nodes3 = nodes.reshape(int(n), n_trees, depth + 1)
    a = apply_activation(logits.reshape(int(n), n_trees, depth + 1), names[int(act)])
    positions = np.asarray(order)[: int(n)] if use_order else np.arange(int(n))
    for tok in positions:
        acc = np.zeros(d_out, dtype=y.dtype)
        for t in range(n_trees):
            for level in range(depth + 1):
                acc += a[tok, t, level] * w_out[t * n_nodes + nodes3[tok, t, level]]
        y[tok] = acc


class _Kernel:
    def __init__(self, name):
        self.name = name
        self.attributes = {"num_regs": 80}
        base = name.split("<")[0]
        self._fn = {"fff_route": _route, "fff_bucket_scatter": _scatter, "fff_output": _output}[base]

    def __call__(self, grid, block, args):
        assert len(grid) == 1 and grid[0] >= 1 and block == (256,)
        for a in args:
            assert isinstance(a, (np.ndarray, np.integer)), f"kernel argument of type {type(a).__name__}"
        self._fn(grid, block, args)


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

    @contextlib.contextmanager
    def _device_ctx():
        yield

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

    attrs = {16: 132, 39: 2048, 82: 65536}
    runtime = types.SimpleNamespace(getDeviceCount=lambda: 1, deviceGetAttribute=lambda a, d: attrs[a])
    cp.cuda = types.SimpleNamespace(Device=Device, runtime=runtime)
    return cp


def main(argv=None):
    import pytest

    sys.modules["cupy"] = fake_cupy()
    return pytest.main(argv or ["tests/test_gpu.py", "-q", "-x", "-p", "no:cacheprovider"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

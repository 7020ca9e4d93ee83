"""The GPU FFF layer: weights on a CUDA device, forward pass by pyfff's CuPy RawKernels.

Contract: same constructor, validation, routing rule, routes and dtypes
(float32, float64) as :class:`pyfff.FFF`, whose constructor does the
validation; the result is a CuPy array for a CuPy input and a NumPy array
for anything else (copied to the device and back).

How a forward pass runs (kernels in ``kernels/fff.cu``): for each tree,
``fff_route`` walks every token's path (one warp per token, the token's row
of x in registers, 16-byte row loads, a shuffle reduction per level) and
stores the visited nodes and logits; then ``fff_output`` forms
``y = sum act(logit) * w_out[row]`` for all trees at once, one warp per token,
writing each row of y once. Launches are prepared once per (batch size,
schedule, stream) in a :class:`_Plan` with cached workspaces and enqueued
through ``cuLaunchKernel``.

Optional schedules (``_run(splits=..., sort_output=...)``, tested, not the
default because they measured slower on the H100, see docs/gpu.md) re-sort the
tokens between route stages by the node of a middle level and/or by their leaf
(``fff_bucket_scatter``, a counting sort), so that neighbouring warps share
weight rows.
"""
from __future__ import annotations

import ctypes
from collections import OrderedDict

import numpy as np

from ..fff import FFF as _CpuFFF

__all__ = ["FFF"]

_ACT_CODES = {"gelu": 0, "gelu_tanh": 1, "relu": 2}  # PYFFF_ACT_* in kernels/fff.cu
_KERNEL_FILE = "fff.cu"
_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
_SCATTER_THREADS = 256  # PYFFF_SCATTER_THREADS
_SCATTER_TOKENS = 256 * 2  # PYFFF_SCATTER_THREADS * PYFFF_SCATTER_ITEMS
_MAX_KEY_LEVEL = 12  # PYFFF_MAX_BUCKETS = 2**12
_INT32_MAX = 2**31 - 1

# Schedule default (docs/gpu.md has the measurements behind it): no re-sorting. On the H100, at width 768 and
# depth 11, the sorted schedules (re-sort at level 6 and/or by leaf) raised L1 hit rates but were 3-15 % slower
# than batch order at batch 16384 and slower still at 2048 and 1: the extra route stage, sort and re-read of x
# cost more than the better L1 hit rates saved. They stay selectable through _run(splits=..., sort_output=...)
# and are tested.
_DEFAULT_SPLITS = ()
_DEFAULT_SORT_OUTPUT = False
# Kernel variants: threads per block of fff_route and fff_output (256: three blocks per SM, or 768: one).
_VARIANT = {"route_block": 256, "out_block": 256}
_BLOCKS = (256, 768)
_MAX_PLANS = 8  # launch plans (workspaces) kept per layer, most recent first

_ATTR_SM_COUNT = 16  # cudaDevAttrMultiProcessorCount
_FUNC_ATTR_NUM_REGS = 4  # CU_FUNC_ATTRIBUTE_NUM_REGS
_FUNC_ATTR_CARVEOUT = 9  # CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT


def _cupy():
    from . import HAS_CUPY, UNAVAILABLE_REASON

    if not HAS_CUPY:
        raise RuntimeError(f"pyfff.gpu needs CuPy and a CUDA device: {UNAVAILABLE_REASON}")
    import cupy

    return cupy


def _host(a):
    """A CuPy array copied to the host; anything else unchanged (pyfff.FFF validates it)."""
    cp = _cupy()
    return cp.asnumpy(a) if isinstance(a, cp.ndarray) else a


def _kernel(name):
    """A compiled kernel of kernels/fff.cu on the current device (memoized by the loader)."""
    from . import _loader  # imports CuPy

    kernel = _loader.get_kernel(_KERNEL_FILE, name)
    if name.startswith(("fff_route", "fff_output")):
        # no shared memory: ask for the largest L1 (carveout 0 %), where weight rows are cached
        _cupy().cuda.driver.funcSetAttribute(kernel.kernel.ptr, _FUNC_ATTR_CARVEOUT, 0)
    return kernel


class _Launch:
    """One prepared kernel launch: argument values packed once, as cuLaunchKernel takes them.

    Arguments are ctypes objects; the x and y pointers are ctypes objects shared with the plan, which
    sets them before each call. Launching through the driver directly costs a few microseconds of host
    time instead of CuPy's per-argument conversion.
    """

    __slots__ = ("kernel", "fptr", "grid", "block", "cargs", "params")

    def __init__(self, kernel, grid, block, cargs):
        self.kernel = kernel
        self.fptr = kernel.kernel.ptr
        self.grid = int(grid)
        self.block = int(block)
        self.cargs = cargs
        self.params = (ctypes.c_void_p * len(cargs))(*[ctypes.addressof(a) for a in cargs])


def _launch(launch, stream_ptr):
    """Enqueue ``launch`` on the stream; CUDA errors raise ``CUDADriverError``."""
    _cupy().cuda.driver.launchKernel(launch.fptr, launch.grid, 1, 1, launch.block, 1, 1, 0, stream_ptr,
                                     ctypes.addressof(launch.params), 0)


def _ptr(arr):
    return ctypes.c_void_p(arr.data.ptr)


def _grid(kernel, block, n_items, device_id):
    """Blocks for ``n_items`` warps' worth of work: at most what fits on the device at once (one contiguous
    chunk of positions per block), at least one."""
    cp = _cupy()
    regs = cp.cuda.driver.funcGetAttribute(_FUNC_ATTR_NUM_REGS, kernel.kernel.ptr)
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    per_sm = max(1, min(2048 // block, 65536 // (regs_per_warp * (block // 32))))
    n_sm = cp.cuda.runtime.deviceGetAttribute(_ATTR_SM_COUNT, device_id)
    return max(1, min(-(-n_items // (block // 32)), per_sm * n_sm))


class _Plan:
    """Workspaces and prepared launches for one batch size, schedule and stream of one layer.

    The workspaces (nodes, logits, bucket keys, permutations, histograms) are reused by later calls
    with the same key; ``run`` writes x's and y's addresses into the prepared arguments, zeroes the
    histograms and enqueues the launches. Not safe for concurrent calls from several host threads.
    """

    def __init__(self, layer, n, vec_in, want_output, splits, sort_output, variant):
        cp = _cupy()
        levels = layer.depth + 1
        self.nodes = cp.empty((n, layer.n_trees, levels), dtype=cp.int32)
        self.logits = cp.empty((n, layer.n_trees, levels), dtype=layer.dtype)
        n_sorts = len(splits) * layer.n_trees + (1 if sort_output else 0)
        self.work = cp.zeros((n_sorts, 2, 1 << _MAX_KEY_LEVEL), dtype=cp.int32) if n_sorts else None
        keys = cp.empty(n, dtype=cp.int32) if n_sorts else layer._dummy
        self.x_arg = ctypes.c_void_p(0)
        self.y_arg = ctypes.c_void_p(0)
        self._keep = [keys]  # buffers referenced only by launch arguments
        r_block = variant["route_block"]
        route = _kernel(f"fff_route<{layer._ctype}, {vec_in}>")
        route_grid = _grid(route, r_block, n, layer.device_id)
        scatter = _kernel("fff_bucket_scatter")
        dummy = layer._dummy
        has_bias = layer.b_in is not None
        b_in = layer.b_in if has_bias else layer.w_in  # never read without a bias
        i32, i64 = ctypes.c_int32, ctypes.c_int64
        self.launches = []
        out_order = None
        i_sort = 0
        bounds = (0, *splits, levels)
        for tree in range(layer.n_trees):
            order = None
            for stage in range(len(bounds) - 1):
                lo, hi = bounds[stage], bounds[stage + 1]
                last = stage == len(bounds) - 2
                if not last:
                    key_level = hi  # the node each token visits next
                elif sort_output and tree == 0:
                    key_level = min(layer.depth, _MAX_KEY_LEVEL)  # the leaf, or its ancestor at level 12
                else:
                    key_level = -1
                counts = self.work[i_sort, 0] if key_level >= 0 else dummy
                self.launches.append(_Launch(route, route_grid, r_block, [
                    self.x_arg, i64(n), i32(layer.d_in), _ptr(layer.w_in), _ptr(b_in), i32(has_bias),
                    i32(layer.n_trees), i32(layer.depth), i32(tree), i32(lo), i32(hi),
                    _ptr(dummy if order is None else order), i32(order is not None),
                    _ptr(self.nodes), _ptr(self.logits), i32(key_level), _ptr(keys), _ptr(counts)]))
                if key_level >= 0:
                    perm = cp.empty(n, dtype=cp.int32)
                    self._keep.append(perm)
                    self.launches.append(_Launch(scatter, -(-n // _SCATTER_TOKENS), _SCATTER_THREADS, [
                        _ptr(keys), i64(n), _ptr(counts), i32(1 << key_level), _ptr(self.work[i_sort, 1]),
                        _ptr(perm)]))
                    i_sort += 1
                    if last:
                        out_order = perm
                    else:
                        order = perm
        if want_output:
            vec_out = 16 // layer.dtype.itemsize if layer.d_out % (16 // layer.dtype.itemsize) == 0 else 1
            g_block = variant["out_block"]
            output = _kernel(f"fff_output<{layer._ctype}, {vec_out}>")
            out_grid = _grid(output, g_block, n, layer.device_id)
            self.launches.append(_Launch(output, out_grid, g_block, [
                _ptr(self.nodes), _ptr(self.logits), i64(n), i32(layer.d_out), _ptr(layer.w_out),
                i32(layer.n_trees), i32(layer.depth), i32(layer._act),
                _ptr(dummy if out_order is None else out_order), i32(out_order is not None), self.y_arg]))

    def run(self, x2, y, stream_ptr):
        self.x_arg.value = x2.data.ptr
        if y is not None:
            self.y_arg.value = y.data.ptr
        if self.work is not None:
            self.work.data.memset_async(0, self.work.nbytes)
        for launch in self.launches:
            _launch(launch, stream_ptr)


def _check_variant(variant):
    """``_VARIANT`` updated with ``variant``; ValueError for unknown keys or block sizes."""
    merged = dict(_VARIANT)
    merged.update(variant or {})
    if set(merged) != set(_VARIANT):
        raise ValueError(f"unknown variant keys {sorted(set(merged) - set(_VARIANT))}")
    if any(merged[k] not in _BLOCKS for k in merged):
        raise ValueError(f"no compiled kernels for variant {merged}: blocks of {_BLOCKS} threads")
    return merged


class FFF:
    """A fast feedforward layer whose weights live on a CUDA device.

    Parameters
    ----------
    w_in : array_like or cupy.ndarray of shape (n_trees * n_nodes, d_in)
    b_in : array_like or cupy.ndarray of shape (n_trees * n_nodes,) or None
    w_out : array_like or cupy.ndarray of shape (n_trees * n_nodes, d_out)
        Node-major output weights, as for :class:`pyfff.FFF`.
    n_trees : int, default=1
    activation : {"gelu", "gelu_tanh", "relu"}, default="gelu"

    The arguments are validated by :class:`pyfff.FFF` (same errors, same
    dtype rules: float32 or float64, float16 widened to float32), then copied
    to the current CUDA device. Attributes mirror the CPU layer; ``w_in``,
    ``b_in`` and ``w_out`` are CuPy arrays.
    """

    def __init__(self, w_in, b_in, w_out, *, n_trees=1, activation="gelu"):
        cpu = _CpuFFF(_host(w_in), None if b_in is None else _host(b_in), _host(w_out),
                      n_trees=n_trees, activation=activation)
        self._init_from(cpu)

    @classmethod
    def from_cpu(cls, layer):
        """The GPU twin of a :class:`pyfff.FFF` (weights copied to the current device)."""
        if not isinstance(layer, _CpuFFF):
            raise TypeError(f"expected a pyfff.FFF, got {type(layer).__name__}")
        self = cls.__new__(cls)
        self._init_from(layer)
        return self

    def _init_from(self, cpu):
        cp = _cupy()
        self.depth = cpu.depth
        self.n_trees = cpu.n_trees
        self.n_nodes = cpu.n_nodes
        self.d_in = cpu.d_in
        self.d_out = cpu.d_out
        self.dtype = cpu.dtype
        self.activation = cpu.activation
        self.device_id = cp.cuda.Device().id
        self.w_in = cp.asarray(cpu.w_in)
        self.b_in = None if cpu.b_in is None else cp.asarray(cpu.b_in)
        self.w_out = cp.asarray(cpu.w_out)
        self._act = _ACT_CODES[cpu.activation]
        self._ctype = _CTYPES[self.dtype]
        self._dummy = cp.zeros(1, dtype=cp.int32)
        self._plans = OrderedDict()

    def to_cpu(self):
        """A :class:`pyfff.FFF` with these weights copied to the host."""
        cp = _cupy()
        return _CpuFFF(cp.asnumpy(self.w_in), None if self.b_in is None else cp.asnumpy(self.b_in),
                       cp.asnumpy(self.w_out), n_trees=self.n_trees, activation=self.activation)

    @property
    def n_neurons(self):
        """All neurons of the layer, ``n_trees * n_nodes``."""
        return self.n_trees * self.n_nodes

    def __repr__(self):
        return (f"pyfff.gpu.FFF(d_in={self.d_in}, d_out={self.d_out}, depth={self.depth}, "
                f"n_trees={self.n_trees}, dtype={self.dtype.name}, activation={self.activation!r}, "
                f"device={self.device_id})")

    # ------------------------------------------------------------------ calls
    def __call__(self, x):
        """Apply the layer.

        Parameters
        ----------
        x : cupy.ndarray or array_like of shape (..., d_in)
            Float input; other float dtypes are cast to the layer's dtype.

        Returns
        -------
        y : cupy.ndarray (for a CuPy input) or numpy.ndarray of shape (..., d_out), dtype of the layer
        """
        cp = _cupy()
        x2, lead, on_host = self._prepare(x)
        with cp.cuda.Device(self.device_id):
            y, _ = self._run(x2, want_output=True)
        y = y.reshape(lead + (self.d_out,))
        return cp.asnumpy(y) if on_host else y

    def routes(self, x):
        """Visited node indices (within each tree), level by level.

        Returns
        -------
        routes : cupy.ndarray or numpy.ndarray of shape (..., n_trees, depth + 1), dtype=int64
        """
        cp = _cupy()
        x2, lead, on_host = self._prepare(x)
        with cp.cuda.Device(self.device_id):
            _, (nodes, _) = self._run(x2, want_output=False)
            r = nodes.astype(cp.int64).reshape(lead + (self.n_trees, self.depth + 1))
        return cp.asnumpy(r) if on_host else r

    def _prepare(self, x):
        """x as a C-contiguous (n_samples, d_in) CuPy array of the layer dtype, its leading shape, and whether
        it came from the host."""
        cp = _cupy()
        if isinstance(x, cp.ndarray):
            on_host = False
            if x.device.id != self.device_id:
                raise ValueError(f"x is on device {x.device.id} but the layer's weights are on device "
                                 f"{self.device_id}")
        else:
            on_host = True
            x = np.asarray(x)
        if x.dtype.kind != "f":
            raise TypeError(f"x must be a float array, got dtype {x.dtype}")
        shape = x.shape
        if not shape or shape[-1] != self.d_in:
            raise ValueError(f"x must have shape (..., {self.d_in}), got {shape}")
        n = int(np.prod(shape[:-1], dtype=np.int64))
        if n > _INT32_MAX:
            raise ValueError(f"at most {_INT32_MAX} rows per call, got {n}")
        with cp.cuda.Device(self.device_id):
            if x.dtype != self.dtype:
                x = x.astype(self.dtype)
            x2 = cp.ascontiguousarray(cp.asarray(x.reshape(n, self.d_in)))
        return x2, shape[:-1], on_host

    # --------------------------------------------------------------- pipeline
    def _schedule(self, n):
        """(splits, sort_output) used for a batch of n tokens by default (the same for every n, for now)."""
        return _DEFAULT_SPLITS, _DEFAULT_SORT_OUTPUT

    def _check_schedule(self, splits, sort_output):
        splits = tuple(int(s) for s in splits)
        top = min(self.depth, _MAX_KEY_LEVEL)
        if any(not 1 <= s <= top for s in splits) or list(splits) != sorted(set(splits)):
            raise ValueError(f"splits must be increasing levels in 1..{top}, got {splits}")
        return splits, bool(sort_output)

    def _run(self, x2, *, want_output, splits=None, sort_output=None, variant=None):
        """Run the pipeline on a (n, d_in) CuPy array; returns (y or None, (nodes, logits)).

        ``splits`` (levels at which the tokens are re-sorted by their node there), ``sort_output`` (whether
        ``y`` is formed in leaf order) and ``variant`` (kernel variants, keys of ``_VARIANT``) default to
        :meth:`_schedule` and ``_VARIANT``; every choice gives the same results. ``nodes`` and ``logits``
        are workspaces of the launch plan, overwritten by the next call with the same plan.
        """
        cp = _cupy()
        n = x2.shape[0]
        default_splits, default_sort = self._schedule(n)
        splits, sort_output = self._check_schedule(default_splits if splits is None else splits,
                                                   default_sort if sort_output is None else sort_output)
        sort_output = sort_output and want_output
        variant = _check_variant(variant)
        y = cp.empty((n, self.d_out), dtype=self.dtype) if want_output else None
        if n == 0:
            levels = self.depth + 1
            return y, (cp.empty((0, self.n_trees, levels), cp.int32), cp.empty((0, self.n_trees, levels), self.dtype))
        vec = 16 // self.dtype.itemsize
        vec_in = vec if self.d_in % vec == 0 and x2.data.ptr % 16 == 0 else 1
        stream_ptr = cp.cuda.get_current_stream().ptr
        key = (n, vec_in, want_output, splits, sort_output, tuple(sorted(variant.items())), stream_ptr)
        plan = self._plans.get(key)
        if plan is None:
            plan = _Plan(self, n, vec_in, want_output, splits, sort_output, variant)
            self._plans[key] = plan
            while len(self._plans) > _MAX_PLANS:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        plan.run(x2, y, stream_ptr)
        return y, (plan.nodes, plan.logits)

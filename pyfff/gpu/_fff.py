"""The GPU FFF layer: weights on a CUDA device, forward pass by pyfff's CuPy RawKernels.

Contract: same constructor, validation, routing rule, routes and dtypes
(float32, float64) as :class:`pyfff.FFF`, whose constructor does the
validation; the result is a CuPy array for a CuPy input and a NumPy array
for anything else (copied to the device and back).

How a forward pass runs (kernels in ``kernels/fff.cu``), per tree:

1. ``fff_route`` walks levels ``[0, s)`` for every token in batch order (one
   warp per token), storing each visited node and logit, and the node of
   level ``s`` as the token's bucket key;
2. ``fff_bucket_scatter`` groups the tokens by that key (counting sort);
3. ``fff_route`` walks levels ``[s, depth]`` in that grouped order, so the
   warps of one block share the rows of one subtree, and keys each token by
   its leaf (tree 0 only);
4. after all trees, ``fff_output`` forms ``y`` in leaf order, one warp per
   token, each row of ``w_out`` read by neighbouring warps in turn.

Small batches skip the sorts (``_SORT_MIN_BATCH``): there is too little
sharing to pay for them.
"""
from __future__ import annotations

import numpy as np

from ..fff import FFF as _CpuFFF

__all__ = ["FFF"]

_ACT_CODES = {"gelu": 0, "gelu_tanh": 1, "relu": 2}  # PYFFF_ACT_* in kernels/fff.cu
_KERNEL_FILE = "fff.cu"
_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
_THREADS = 256  # 8 warps per block for fff_route / fff_output (their __launch_bounds__)
_SCATTER_THREADS = 256  # PYFFF_SCATTER_THREADS
_SCATTER_TOKENS = 256 * 8  # PYFFF_SCATTER_THREADS * PYFFF_SCATTER_ITEMS
_MAX_KEY_LEVEL = 12  # PYFFF_MAX_BUCKETS = 2**12
_INT32_MAX = 2**31 - 1

# Schedule defaults (see bench/bench_gpu.py and docs/gpu.md for the measurements behind them).
_SORT_MIN_BATCH = 1024  # below this many tokens: no sorting at all
_SPLIT_MIN_DEPTH = 4  # trees at least this deep are re-sorted once, at the middle level


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


def _device_attribute(attr, device_id):
    return _cupy().cuda.runtime.deviceGetAttribute(attr, device_id)


# cudaDeviceAttr values (stable across CUDA versions)
_ATTR_SM_COUNT = 16
_ATTR_MAX_THREADS_PER_SM = 39
_ATTR_MAX_REGS_PER_SM = 82

_resident_cache = {}


def _resident_blocks(kernel, device_id):
    """How many 256-thread blocks of ``kernel`` fit on the whole device at once (registers and threads)."""
    key = (kernel.name if hasattr(kernel, "name") else id(kernel), device_id)
    if key not in _resident_cache:
        regs = max(1, int(kernel.attributes["num_regs"]))
        regs_per_warp = -(-regs * 32 // 256) * 256  # allocated per warp in units of 256
        by_regs = _device_attribute(_ATTR_MAX_REGS_PER_SM, device_id) // (regs_per_warp * (_THREADS // 32))
        by_threads = _device_attribute(_ATTR_MAX_THREADS_PER_SM, device_id) // _THREADS
        per_sm = max(1, min(by_regs, by_threads))
        _resident_cache[key] = per_sm * _device_attribute(_ATTR_SM_COUNT, device_id)
    return _resident_cache[key]


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
        """(splits, sort_output) used for a batch of n tokens by default."""
        if n < _SORT_MIN_BATCH:
            return (), False
        splits = (min((self.depth + 1) // 2, _MAX_KEY_LEVEL),) if self.depth >= _SPLIT_MIN_DEPTH else ()
        return splits, True

    def _check_schedule(self, splits, sort_output):
        splits = tuple(int(s) for s in splits)
        top = min(self.depth, _MAX_KEY_LEVEL)
        if any(not 1 <= s <= top for s in splits) or list(splits) != sorted(set(splits)):
            raise ValueError(f"splits must be increasing levels in 1..{top}, got {splits}")
        return splits, bool(sort_output)

    def _run(self, x2, *, want_output, splits=None, sort_output=None):
        """Run the pipeline on a (n, d_in) CuPy array; returns (y or None, (nodes, logits)).

        ``splits`` (levels at which the tokens are re-sorted by their node there) and ``sort_output`` (whether
        ``y`` is formed in leaf order) default to :meth:`_schedule`; every choice gives the same results.
        """
        cp = _cupy()
        from . import _loader  # imports CuPy

        n = x2.shape[0]
        levels = self.depth + 1
        default_splits, default_sort = self._schedule(n)
        splits, sort_output = self._check_schedule(default_splits if splits is None else splits,
                                                   default_sort if sort_output is None else sort_output)
        sort_output = sort_output and want_output
        nodes = cp.empty((n, self.n_trees, levels), dtype=cp.int32)
        logits = cp.empty((n, self.n_trees, levels), dtype=self.dtype)
        y = cp.empty((n, self.d_out), dtype=self.dtype) if want_output else None
        if n == 0:
            return y, (nodes, logits)

        itemsize = self.dtype.itemsize
        vec = 16 // itemsize
        vec_in = vec if self.d_in % vec == 0 and x2.data.ptr % 16 == 0 else 1
        vec_out = vec if self.d_out % vec == 0 else 1
        route = _loader.get_kernel(_KERNEL_FILE, f"fff_route<{self._ctype}, {vec_in}>")
        scatter = _loader.get_kernel(_KERNEL_FILE, "fff_bucket_scatter")
        dummy = self._dummy
        has_bias = self.b_in is not None
        b_in = self.b_in if has_bias else self.w_in  # never read without a bias

        n_sorts = len(splits) * self.n_trees + (1 if sort_output else 0)
        if n_sorts:
            work = cp.zeros((n_sorts, 2, 1 << _MAX_KEY_LEVEL), dtype=cp.int32)  # counts, cursors per sort
            keys = cp.empty(n, dtype=cp.int32)
        n64 = np.int64(n)
        route_grid = (max(1, min(-(-n // (_THREADS // 32)), _resident_blocks(route, self.device_id))),)
        scatter_grid = (-(-n // _SCATTER_TOKENS),)
        out_order = None
        i_sort = 0
        bounds = (0, *splits, levels)
        for tree in range(self.n_trees):
            order = None
            for stage in range(len(bounds) - 1):
                lo, hi = bounds[stage], bounds[stage + 1]
                last = stage == len(bounds) - 2
                if not last:
                    key_level = hi  # the node each token visits next
                elif sort_output and tree == 0:
                    key_level = min(self.depth, _MAX_KEY_LEVEL)  # the leaf, or its ancestor at level 12
                else:
                    key_level = -1
                counts = work[i_sort, 0] if key_level >= 0 else dummy
                route(route_grid, (_THREADS,), (
                    x2, n64, np.int32(self.d_in), self.w_in, b_in, np.int32(has_bias),
                    np.int32(self.n_trees), np.int32(self.depth), np.int32(tree), np.int32(lo), np.int32(hi),
                    dummy if order is None else order, np.int32(order is not None),
                    nodes, logits, np.int32(key_level), keys if key_level >= 0 else dummy, counts))
                if key_level >= 0:
                    perm = cp.empty(n, dtype=cp.int32)
                    scatter(scatter_grid, (_SCATTER_THREADS,), (
                        keys, n64, counts, np.int32(1 << key_level), work[i_sort, 1], perm))
                    i_sort += 1
                    if last:
                        out_order = perm
                    else:
                        order = perm

        if want_output:
            output = _loader.get_kernel(_KERNEL_FILE, f"fff_output<{self._ctype}, {vec_out}>")
            out_grid = (max(1, min(-(-n // (_THREADS // 32)), _resident_blocks(output, self.device_id))),)
            output(out_grid, (_THREADS,), (
                nodes, logits, n64, np.int32(self.d_out), self.w_out, np.int32(self.n_trees),
                np.int32(self.depth), np.int32(self._act),
                dummy if out_order is None else out_order, np.int32(out_order is not None), y))
        return y, (nodes, logits)

"""The public FFF layer: validation, dtypes, threads; the kernels do the rest.

A fast feedforward layer (Belcak & Wattenhofer, arXiv 2311.10770) is a
balanced binary tree of neurons per tree; every token visits one
root-to-leaf path. ``FFF`` checks its inputs, then calls the compiled
kernels of ``pyfff._fff_cpu`` (C code in ``src/fff_kernels.h``). The
ground truth it is tested against is ``pyfff.reference.fff_forward``.
"""
from __future__ import annotations

import operator

import numpy as np

from . import _fff_cpu
from ._openmp_helpers import _openmp_effective_n_threads
from .reference import ACTIVATIONS, depth_from_rows

__all__ = ["FFF", "MAX_DEPTH", "MAX_ROWS"]

# Node indices are int32 inside the kernels; depth 24 is already 33 M neurons per tree.
MAX_DEPTH = 24
MAX_ROWS = 2**31 - 1  # n_trees * n_nodes: row indices are int32 inside the kernels
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _as_float_array(a, name, dtype=None):
    """``a`` as a float ndarray; TypeError for ints, bools, complex, objects."""
    arr = np.asarray(a)
    if arr.dtype.kind != "f":
        raise TypeError(f"{name} must be a float32 or float64 array, got dtype {arr.dtype}")
    if dtype is None:
        # Byte order is not precision: a big-endian '>f8' array is a float64 layer.
        native = arr.dtype.newbyteorder("=")
        dtype = native if native in _FLOATS else np.dtype(np.float32)
    # asarray + require, not ascontiguousarray (which turns a 0-d array into shape (1,)):
    # native byte order, C-contiguous and aligned, copied only when it is not already.
    return np.require(np.asarray(arr, dtype=dtype), requirements="CA")


def _check_n_trees(n_trees):
    """n_trees as a positive int; TypeError for non-integers (bool included)."""
    if isinstance(n_trees, (bool, np.bool_)):
        raise TypeError("n_trees must be an int, got bool")
    try:
        n_trees = operator.index(n_trees)
    except TypeError:
        raise TypeError(f"n_trees must be an int, got {type(n_trees).__name__}") from None
    if n_trees < 1:
        raise ValueError(f"n_trees must be >= 1, got {n_trees}")
    return n_trees


class FFF:
    """A fast feedforward layer running on pyfff's CPU kernels.

    Parameters
    ----------
    w_in : array_like of shape (n_trees * n_nodes, d_in)
        Input weights, one row per neuron; row ``t * n_nodes + node``.
    b_in : array_like of shape (n_trees * n_nodes,) or None
        Input biases (None: no bias).
    w_out : array_like of shape (n_trees * n_nodes, d_out)
        Output weights, node-major (``linear_out.weight.T`` in PyTorch layout;
        see :meth:`from_torch_layout`).
    n_trees : int, default=1
        Number of trees; ``n_nodes = 2**(depth + 1) - 1`` is derived from the
        row count.
    activation : {"gelu", "gelu_tanh", "relu"}, default="gelu"
        ``gelu`` is the exact, erf-based GELU of UltraFastBERT.

    The layer's dtype is that of ``w_in`` (float32 or float64; float16 is
    widened to float32); ``b_in`` and ``w_out`` are cast to it. Arrays that are
    already C-contiguous in that dtype are used without a copy (never
    modified), so memory-mapped weights stay memory-mapped.

    Each token visits ``depth + 1`` nodes per tree: at node ``n`` it computes
    ``z = w_in[n] . x + b_in[n]``, adds ``act(z) * w_out[n]`` to its output, and
    moves to ``2n + 2`` if ``z > 0`` else ``2n + 1`` (a logit of exactly 0
    goes left). Outputs of all trees are summed; there is no output bias.
    """

    def __init__(self, w_in, b_in, w_out, *, n_trees=1, activation="gelu"):
        # Checked before any conversion copies: row indices are int32 in the kernels.
        if np.ndim(w_in) >= 1 and np.shape(w_in)[0] > MAX_ROWS:
            raise ValueError(f"w_in has {np.shape(w_in)[0]} neuron rows; at most {MAX_ROWS} are supported")
        w_in = _as_float_array(w_in, "w_in")
        dtype = w_in.dtype
        w_out = _as_float_array(w_out, "w_out", dtype)
        if b_in is not None:
            b_in = _as_float_array(b_in, "b_in", dtype)
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
        n_trees = _check_n_trees(n_trees)
        if w_in.ndim != 2:
            raise ValueError(f"w_in must be 2-D (n_trees * n_nodes, d_in), got shape {w_in.shape}")
        if w_out.ndim != 2:
            raise ValueError(f"w_out must be 2-D (n_trees * n_nodes, d_out), got shape {w_out.shape}")
        if w_in.shape[0] != w_out.shape[0]:
            raise ValueError(
                f"w_in has {w_in.shape[0]} neuron rows but w_out has {w_out.shape[0]}; "
                "w_out must be node-major (n_trees * n_nodes, d_out): use FFF.from_torch_layout "
                "for PyTorch's (d_out, n_trees * n_nodes) layout"
            )
        if b_in is not None and b_in.shape != (w_in.shape[0],):
            raise ValueError(f"b_in must have shape ({w_in.shape[0]},) to match w_in, got {b_in.shape}")
        if w_in.shape[1] < 1 or w_out.shape[1] < 1:
            raise ValueError(f"widths must be >= 1, got d_in={w_in.shape[1]}, d_out={w_out.shape[1]}")
        depth = depth_from_rows(w_in.shape[0], n_trees)
        if depth > MAX_DEPTH:
            raise ValueError(f"depth {depth} is larger than the supported maximum {MAX_DEPTH}")
        for name, arr in (("w_in", w_in), ("b_in", b_in), ("w_out", w_out)):
            if arr is not None and not np.isfinite(arr).all():
                raise ValueError(f"{name} contains non-finite values (NaN or inf)")

        self.n_trees = n_trees
        self.depth = depth
        self.n_nodes = 2 ** (depth + 1) - 1
        self.d_in = int(w_in.shape[1])
        self.d_out = int(w_out.shape[1])
        self.dtype = dtype
        self.activation = activation
        self._act_code = _fff_cpu.ACTIVATION_CODES[activation]
        self._bound = _fff_cpu.BoundLayer(w_in, b_in, w_out, depth, n_trees, self._act_code,
                                          _openmp_effective_n_threads)

    # ----------------------------------------------------------------- makers
    @classmethod
    def from_torch_layout(cls, linear_in_weight, linear_in_bias, linear_out_weight, *, n_trees=1,
                          activation="gelu"):
        """Build from UltraFastBERT's ``ffn.linear_in`` / ``ffn.linear_out`` tensors.

        Parameters
        ----------
        linear_in_weight : array_like of shape (n_trees * n_nodes, d_in)
        linear_in_bias : array_like of shape (n_trees * n_nodes,) or None
        linear_out_weight : array_like of shape (d_out, n_trees * n_nodes)
            Transposed to node-major rows (one copy).
        """
        w_out = np.asarray(linear_out_weight)
        if w_out.ndim != 2:
            raise ValueError(f"linear_out_weight must be 2-D (d_out, n_trees * n_nodes), got shape {w_out.shape}")
        return cls(linear_in_weight, linear_in_bias, w_out.T, n_trees=n_trees, activation=activation)

    @classmethod
    def random(cls, d_in, d_out, depth, *, n_trees=1, seed=0, dtype=np.float32, activation="gelu"):
        """A layer with reproducible random weights (same seed, same weights).

        Input rows are N(0, 1/d_in) so logits are O(1); output rows are
        N(0, 1/(n_trees * (depth + 1))) so outputs are O(1) too.
        """
        n_trees = _check_n_trees(n_trees)
        depth = operator.index(depth)
        if depth < 0 or depth > MAX_DEPTH:
            raise ValueError(f"depth must be in 0..{MAX_DEPTH}, got {depth}")
        dtype = np.dtype(dtype)
        if dtype not in _FLOATS:
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        n_rows = n_trees * (2 ** (depth + 1) - 1)
        rng = np.random.default_rng(seed)
        w_in = rng.standard_normal((n_rows, d_in), dtype=np.float32) / np.sqrt(d_in)
        b_in = rng.standard_normal(n_rows, dtype=np.float32) * 0.1
        w_out = rng.standard_normal((n_rows, d_out), dtype=np.float32) / np.sqrt(n_trees * (depth + 1))
        return cls(w_in.astype(dtype), b_in.astype(dtype), w_out.astype(dtype), n_trees=n_trees,
                   activation=activation)

    # ------------------------------------------------------------------ calls
    def _prepare(self, x):
        """x as a C-contiguous (n_samples, d_in) array of the layer dtype, and its leading shape."""
        if type(x) is not np.ndarray:
            x = np.asarray(x)
        if x.dtype != self.dtype:
            if x.dtype.kind != "f":
                raise TypeError(f"x must be a float array, got dtype {x.dtype}")
            x = x.astype(self.dtype)
        shape = x.shape
        if not shape or shape[-1] != self.d_in:
            raise ValueError(f"x must have shape (..., {self.d_in}), got {shape}")
        if len(shape) != 2:
            x = x.reshape(-1, self.d_in)
        # x now has the layer's (native) dtype; copy only if not C-contiguous and aligned.
        return np.require(x, requirements="CA"), shape[:-1]

    def __call__(self, x, n_threads=None, *, out=None):
        """Apply the layer.

        Parameters
        ----------
        x : array_like of shape (..., d_in)
            Float input; other float dtypes are cast to the layer's dtype.
        n_threads : int or None, default=None
            None: all usable cores (honours OMP_NUM_THREADS and
            threadpoolctl limits), except for small batches (below
            ``serial_below`` tokens: 256 at width 768, depth 11), which run on
            the calling thread, where threads would gain little and would fight
            the BLAS threads of the NumPy code around the call; -1: all CPUs;
            k > 0: k threads; 0 is an error. The result is bitwise identical
            for every value.
        out : ndarray of shape (..., d_out), optional
            Where to write the result (C-contiguous, the layer's dtype, not
            overlapping ``x``). Saves allocating, and the kernel zeroing of
            fresh pages, on every call: about 0.3 us per token of a large batch.

        Returns
        -------
        y : ndarray of shape (..., d_out), dtype of the layer (``out`` if given)
        """
        y = self._bound.forward(x, n_threads, out)  # fast path: (n, d_in) C-contiguous, layer dtype
        if y is not NotImplemented:
            return y
        x2, lead = self._prepare(x)
        if out is None:
            return self._bound.forward(x2, n_threads).reshape(lead + (self.d_out,))
        _check_out(out, lead + (self.d_out,), self.dtype, x2)
        self._bound.fill(x2, out.reshape(-1, self.d_out), None, self._bound.threads_for(n_threads, x2.shape[0]))
        return out

    def routes(self, x, n_threads=None):
        """Visited node indices (within each tree), level by level.

        Returns
        -------
        routes : ndarray of shape (..., n_trees, depth + 1), dtype=int64
        """
        x2, lead = self._prepare(x)
        n_threads = self._bound.threads_for(n_threads, x2.shape[0])
        r = np.empty((x2.shape[0], self.n_trees, self.depth + 1), dtype=np.int64)
        self._bound.fill(x2, None, r, n_threads)
        return r.reshape(lead + (self.n_trees, self.depth + 1))

    def quantize(self, mode="int8"):
        """A copy of this layer on quantized rows, with exactly this layer's routes.

        Parameters
        ----------
        mode : {"int8"}
            ``"int8"``: :class:`pyfff.fff_int8.Int8FFF`, int8 input and output rows (one scale per row); every
            routing decision equals this layer's (a bound on the quantized logit's error decides when a 16-bit
            logit, or this layer's own float32 logit, is needed). Needs a float32 layer.

        The new layer has the same call interface (``layer(x)``, ``routes``, ``n_threads``, ``out=``); its outputs
        are within :func:`pyfff.fff_int8.int8_tolerance` of this layer's. See docs/quantized-fff.md.
        """
        if mode == "int8":
            from .fff_int8 import Int8FFF

            return Int8FFF(self)
        raise ValueError(f"unknown quantization mode {mode!r}; expected 'int8'")

    def to_gpu(self):
        """This layer on the current CUDA device (:class:`pyfff.gpu.FFF`; needs CuPy).

        The weights are copied once; the GPU layer has the same semantics and
        routes. Importing :mod:`pyfff` alone never imports CuPy.
        """
        from . import gpu

        return gpu.FFF.from_cpu(self)

    # ------------------------------------------------------------------ misc
    def __reduce__(self):
        # Pickle/copy by weights: the compiled BoundLayer holds raw pointers.
        return (_rebuild, (self.w_in, self.b_in, self.w_out, self.n_trees, self.activation))

    def __repr__(self):
        return (f"FFF(d_in={self.d_in}, d_out={self.d_out}, depth={self.depth}, n_trees={self.n_trees}, "
                f"dtype={self.dtype.name}, activation={self.activation!r})")

    # The weights are read-only attributes: the compiled layer holds pointers to them.
    @property
    def w_in(self):
        """ndarray of shape (n_trees * n_nodes, d_in): input weights (do not modify in place)."""
        return self._bound.w_in

    @property
    def b_in(self):
        """ndarray of shape (n_trees * n_nodes,) or None: input biases."""
        return self._bound.b_in

    @property
    def w_out(self):
        """ndarray of shape (n_trees * n_nodes, d_out): node-major output weights."""
        return self._bound.w_out

    @property
    def n_neurons(self):
        """All neurons of the layer, ``n_trees * n_nodes``."""
        return self.n_trees * self.n_nodes

    @property
    def serial_below(self):
        """With ``n_threads=None``, batches of fewer tokens than this run on the calling thread (about 4.7 M
        multiply-adds of work: 256 tokens at width 768, depth 11)."""
        return self._bound.serial_below


def _check_out(out, shape, dtype, x2):
    """TypeError/ValueError unless ``out`` can take a layer's result of ``shape`` and ``dtype`` for input ``x2``."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy array, got {type(out).__name__}")
    if out.shape != shape:
        raise ValueError(f"out must have shape {shape}, got {out.shape}")
    if out.dtype != dtype:
        raise TypeError(f"out must have the layer's dtype {dtype}, got {out.dtype}")
    if not (out.flags.c_contiguous and out.flags.aligned and out.flags.writeable):
        raise ValueError("out must be C-contiguous, aligned and writeable")
    if np.may_share_memory(out, x2):
        raise ValueError("out must not overlap x")


def _rebuild(w_in, b_in, w_out, n_trees, activation):
    """Unpickle an FFF (module level so pickle can find it)."""
    return FFF(w_in, b_in, w_out, n_trees=n_trees, activation=activation)

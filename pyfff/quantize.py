"""int8 dense layers: weight quantization and packing, the fast layer, and its NumPy reference.

What is computed (dynamic quantization, as ONNX Runtime's ``quantize_dynamic``, but finer-grained)::

    y = act( sx * sw * ((qx - zx) @ qw) + bias )

- ``qw`` (K, N) int8: weights quantized once, symmetric, one scale per output channel:
  ``sw[n] = max_k |w[k, n]| / 127``, ``qw = rint(w / sw)``;
- ``qx`` (M, K) uint8: activations quantized per row (token) at run time, asymmetric, with 0.0 exact:
  ``lo = min(x, 0)``, ``hi = max(x, 0)``, ``inv = 255 / (hi - lo)``, ``zx = rint(-lo * inv)``,
  ``qx = clip(rint(x * inv) + zx, 0, 255)``, ``sx = (hi - lo) / 255``;
- the product is accumulated exactly in int32, then dequantized, the bias added and (optionally) the exact GELU
  applied in one pass. ``accumulate=True`` adds the result into ``out`` (a residual connection).

:func:`qlinear_reference` is the readable NumPy ground truth; :class:`QuantizedLinear` runs the C kernels of
``src/qgemm.h`` (AVX512-VNNI, AVX-VNNI, AVX2, AMX-INT8, NEON dot product or portable C, chosen at run time).
"""
from __future__ import annotations

import numpy as np

from . import _qgemm
from ._openmp_helpers import _openmp_effective_n_threads

__all__ = ["QuantizedLinear", "quantize_weight", "pack_weight", "packed_shape", "quantize_and_pack",
           "quantize_activations", "qlinear_reference", "int8_paths"]

QUANTIZE_MODES = (None, "int8")
# int32 accumulators hold K products of at most 255 * 127 (plus the zero-point correction) exactly up to here
MAX_K = 65536


def check_quantize(quantize):
    """Validate a ``quantize=`` argument (None or "int8")."""
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize={quantize!r} is not supported (accepted: None, 'int8')")
    return quantize


def int8_paths():
    """The int8 code paths this CPU runs, the default (best) first."""
    return _qgemm.paths()


def quantize_weight(w):
    """Symmetric per-output-channel int8 quantization of a (K, N) weight (``y = x @ w``).

    Parameters
    ----------
    w : array_like of shape (K, N), float

    Returns
    -------
    q : ndarray of shape (K, N), dtype=int8
        ``rint(w / scale)``, in [-127, 127].
    scale : ndarray of shape (N,), dtype=float32
        ``max_k |w[k, n]| / 127`` (0 for an all-zero column, whose q is 0).
    """
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2 or 0 in w.shape:
        raise ValueError(f"weight must be a non-empty 2-D array, got shape {w.shape}")
    if w.shape[0] > MAX_K:
        raise ValueError(f"weight has {w.shape[0]} input features; the int8 kernels take at most {MAX_K} "
                         "(their int32 sums of 255 x 127 products would overflow beyond)")
    if not np.isfinite(w).all():
        raise ValueError("weight has non-finite values")
    return _symmetric_int8(w, axis=0)


def _symmetric_int8(w, axis):
    """The project's int8 rule: ``q = rint(w / scale)`` in [-127, 127], ``scale = max |w| / 127`` along ``axis``.

    ``w`` float32; returns (q int8 of w's shape, scale float32 with ``axis`` removed; 0 for an all-zero slice,
    whose q is 0). Used by the dense int8 layers (per output channel) and the int8 FFF layer (per neuron row).
    """
    scale = (np.abs(w).max(axis=axis) / np.float32(127)).astype(np.float32)
    safe = np.expand_dims(np.where(scale > 0, scale, np.float32(1)), axis)         # no division by 0
    q = np.clip(np.rint(w / safe), -127, 127).astype(np.int8)
    return q, scale


def packed_shape(k, n):
    """Shape of the packed form of a (k, n) weight: (Np / 64, Kp / 4, 64, 4)."""
    kp, np_ = -(-k // _qgemm.K_BLOCK) * _qgemm.K_BLOCK, -(-n // _qgemm.PANEL) * _qgemm.PANEL
    return (np_ // _qgemm.PANEL, kp // 4, _qgemm.PANEL, 4)


def pack_weight(q):
    """The kernels' packed layout of a (K, N) int8 weight (see ``src/qgemm.h``).

    K is zero-padded to a multiple of 64 (Kp) and N to a multiple of 64 (Np); then
    ``packed[p, g, j, r] = q[4 g + r, 64 p + j]``: panels of 64 output channels, inside
    each the 64 channels' 4 consecutive k values side by side.

    Returns
    -------
    packed : ndarray of shape (Np / 64, Kp / 4, 64, 4), dtype=int8
    colsum : ndarray of shape (Np,), dtype=int32
        ``sum_k q[k, n]`` (0 in the padding).
    """
    K, N = q.shape
    n_panels, n_groups, panel, _ = packed_shape(K, N)
    full = np.zeros((n_groups * 4, n_panels * panel), dtype=np.int8)               # (Kp, Np)
    full[:K, :N] = q
    packed = full.reshape(n_groups, 4, n_panels, panel).transpose(2, 0, 3, 1)      # (Np/64, Kp/4, 64, 4)
    colsum = full.sum(axis=0, dtype=np.int32)                                       # (Np,)
    return np.ascontiguousarray(packed), colsum


def quantize_and_pack(w):
    """:func:`quantize_weight` then :func:`pack_weight`: (packed, scale padded with zeros to Np, colsum)."""
    q, scale = quantize_weight(w)
    packed, colsum = pack_weight(q)
    padded = np.zeros(colsum.shape, dtype=np.float32)                               # (Np,)
    padded[:scale.size] = scale
    return packed, padded, colsum


def quantize_activations(x):
    """Per-row asymmetric uint8 quantization, as the kernels do it (the same float32 operations).

    Parameters
    ----------
    x : ndarray of shape (M, K), dtype=float32

    Returns
    -------
    q : ndarray of shape (M, K), dtype=uint8
    scale : ndarray of shape (M,), dtype=float32
    zero_point : ndarray of shape (M,), dtype=int32
    """
    x = np.asarray(x, dtype=np.float32)
    lo = np.minimum(x.min(axis=1, initial=0), 0).astype(np.float32)                # (M,)
    hi = np.maximum(x.max(axis=1, initial=0), 0).astype(np.float32)                # (M,)
    rng = hi - lo                                                                   # (M,) float32
    inv = np.where(rng > 0, np.float32(255) / np.where(rng > 0, rng, 1), 0).astype(np.float32)
    zp = np.rint(-lo * inv)                                                         # (M,) float32
    q = np.clip(np.rint(x * inv[:, None]) + zp[:, None], 0, 255).astype(np.uint8)  # (M, K)
    return q, (rng / np.float32(255)).astype(np.float32), zp.astype(np.int32)


def qlinear_reference(x, q, scale, bias=None, *, gelu=False):
    """Readable NumPy reference of the int8 layer (float64 epilogue, exact integer product).

    Parameters
    ----------
    x : ndarray of shape (M, K), dtype=float32
    q : ndarray of shape (K, N), dtype=int8
    scale : ndarray of shape (N,), dtype=float32
    bias : ndarray of shape (N,), optional
    gelu : bool
        Apply the exact (erf) GELU after the bias.

    Returns
    -------
    y : ndarray of shape (M, N), dtype=float64
    """
    from math import erf, sqrt

    qx, sx, zx = quantize_activations(x)                                            # (M, K), (M,), (M,)
    acc = (qx.astype(np.int64) - zx[:, None]) @ q.astype(np.int64)                  # (M, N) exact
    y = acc * (sx.astype(np.float64)[:, None] * scale.astype(np.float64)[None, :])  # (M, N)
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64)
    if gelu:
        y = 0.5 * y * (1.0 + np.vectorize(erf, otypes=[np.float64])(y / sqrt(2.0)))
    return y


def _rows_contiguous(a):
    """Rows of a 2-D float32 array the kernels can read in place (strides of length-1 axes do not matter)."""
    rows, width = a.shape
    return ((width <= 1 or rows == 0 or a.strides[1] == 4)
            and (rows <= 1 or (a.strides[0] % 4 == 0 and a.strides[0] >= 4 * width)))


class QuantizedLinear:
    """An int8 dense layer ``y = x @ w + bias`` (``w`` of shape (K, N)) on pyfff's int8 kernels.

    Create it from float weights with :meth:`from_float`, or from stored packed weights (a pyfff int8 export) with
    the constructor. Calls take float32 ``x`` of shape (M, K) and return (or fill) float32 (M, N).

    Parameters
    ----------
    packed : ndarray of shape (Np / 64, Kp / 4, 64, 4), dtype=int8
        :func:`pack_weight` of the quantized weight.
    scale : ndarray of shape (Np,), dtype=float32
        Per-output-channel scales (padded with zeros to Np).
    colsum : ndarray of shape (Np,), dtype=int32
    bias : ndarray of shape (N,), dtype=float32, or None
    k, n : int
        Input and output widths.
    path : str, optional
        int8 code path (one of :func:`int8_paths`); default: the best this CPU runs.
    """

    def __init__(self, packed, scale, colsum, bias, k, n, *, path=None):
        if bias is not None:
            bias = np.ascontiguousarray(bias, dtype=np.float32)
            if bias.shape != (n,):
                raise ValueError(f"bias must have shape ({n},), got {bias.shape}")
        self._q = _qgemm.QLinear(packed, scale, colsum, bias, int(k), int(n), path)
        self.k, self.n = int(k), int(n)

    @classmethod
    def from_float(cls, weight, bias=None, *, path=None):
        """Quantize a float (K, N) weight (and keep a float32 bias)."""
        packed, scale, colsum = quantize_and_pack(weight)
        K, N = np.shape(weight)
        return cls(packed, scale, colsum, bias, K, N, path=path)

    @property
    def path(self):
        """The int8 code path this layer runs."""
        return self._q.path

    @property
    def bias(self):
        return self._q.bias

    def weight_int8(self):
        """The quantized weight, unpacked: (q int8 (K, N), scale float32 (N,))."""
        p = self._q.packed                                                          # (Np/64, Kp/4, 64, 4)
        full = p.transpose(1, 3, 0, 2).reshape(p.shape[1] * 4, p.shape[0] * 64)     # (Kp, Np)
        return np.ascontiguousarray(full[:self.k, :self.n]), self._q.scale[:self.n].copy()

    def __repr__(self):
        return f"QuantizedLinear(k={self.k}, n={self.n}, bias={self.bias is not None}, path={self.path!r})"

    def __call__(self, x, out=None, *, gelu=False, accumulate=False, n_threads=1):
        """``act(x @ w + bias)`` on the int8 kernels.

        Parameters
        ----------
        x : array_like of shape (M, K) or (K,), float
        out : ndarray of shape (M, N), dtype=float32, optional
            Written (or, with ``accumulate``, added to). Must not overlap ``x``.
        gelu : bool, default=False
            Apply the exact GELU after the bias.
        accumulate : bool, default=False
            ``out += result`` instead of ``out = result`` (needs ``out``).
        n_threads : int or None, default=1
            OpenMP threads, each computing its share of the output channels (scikit-learn's convention: None =
            all usable cores, -1 = all CPUs). The result is the same for every value.

        Returns
        -------
        y : ndarray of shape (M, N) (or (N,) for 1-D x), dtype=float32
        """
        x = np.asarray(x)
        if x.dtype.kind != "f":
            raise TypeError(f"x must be a float array, got dtype {x.dtype}")
        one = x.ndim == 1
        x2 = x[None] if one else x
        if x2.ndim != 2 or x2.shape[1] != self.k:
            raise ValueError(f"x must have shape (M, {self.k}), got {x.shape}")
        if x2.dtype != np.float32 or not _rows_contiguous(x2):
            x2 = np.ascontiguousarray(x2, dtype=np.float32)
        if out is None:
            if accumulate:
                raise ValueError("accumulate=True needs out=")
            out2 = np.empty((x2.shape[0], self.n), dtype=np.float32)
        else:
            if not isinstance(out, np.ndarray) or out.dtype != np.float32:
                raise TypeError("out must be a float32 ndarray")
            out2 = out[None] if (one and out.ndim == 1) else out
            if out2.shape != (x2.shape[0], self.n):
                raise ValueError(f"out must have shape ({x2.shape[0]}, {self.n}), got {out.shape}")
            if not _rows_contiguous(out2) or not out2.flags.writeable:
                raise ValueError("out must be writeable with contiguous rows")
            if np.may_share_memory(out2, x2):
                raise ValueError("out must not overlap x")
        flags = (_qgemm.GELU if gelu else 0) | (_qgemm.ACCUMULATE if accumulate else 0)
        if n_threads != 1:
            n_threads = _openmp_effective_n_threads(n_threads)
        self._q.forward(x2, out2, flags, n_threads)
        if out is not None:
            return out
        return out2[0] if one else out2

"""The int8 FFF layer: a quarter of the float32 layer's weight bytes, and exactly its routes.

``FFF.quantize("int8")`` returns an :class:`Int8FFF`. Each neuron's input row is kept as int8 (one scale per row)
plus an int8 residual, each output row as int8 (one scale per row); the float32 input rows stay referenced (not
copied: memory-mapped weights stay on disk) for the few logits that need them. At run time every token is
quantized to 16 bits, and every node's routing decision is made the way the float32 layer makes it:

1. a logit from the int8 row, ``z1 = x2 . w1 + b`` (two integer dot products, one pass over the row), decides when
   ``|z1|`` exceeds a rigorous bound on its distance to the float32 layer's logit
   (``|x| |w - w1| + |x - x2| |w1|``, plus the float32 rounding);
2. otherwise a logit from the int8 row and its int8 residual (a 16-bit row, two more integer dot products), with
   its own, far smaller bound;
3. otherwise the float32 layer's logit itself, computed by the float32 kernel's dot product.

So ``routes()`` equals the float32 layer's bit for bit; outputs differ from it by the rounding of the output rows
and the logit differences (:func:`int8_tolerance`). The proof of the bound is in ``src/fff_quant.h``;
:func:`int8_reference` is the readable NumPy version of the whole function, used by the tests.
"""
from __future__ import annotations

import numpy as np

from . import _fff_int8
from .quantize import MAX_K, _symmetric_int8
from .reference import apply_activation

__all__ = ["Int8FFF", "int8_reference", "int8_tolerance", "prepare_int8"]

_XMAX = _fff_int8.XMAX          # largest 16-bit token code
_KB = _fff_int8.KB              # rows are padded to a multiple of this many bytes
_UP = 1.0 + 2.0**-40            # rounds a norm computed in double up past its rounding errors
_MAX_GELU_SLOPE = 1.13          # max |gelu'(z)| = 1.1289...
_REC = ("e1", "n1", "e2", "n2", "c", "s", "b", "sum_q", "sum_q2")   # columns of the per-row record (fff_quant.h)
assert len(_REC) == _fff_int8.N_FIELDS


def _padded(n):
    return -(-n // _KB) * _KB


def _norms(a):
    """Row 2-norms of a float64 array, rounded up."""
    return np.sqrt(np.einsum("ij,ij->i", a, a)) * _UP


def _pad_cols(a, width):
    out = np.zeros((a.shape[0], width), dtype=np.int8)
    out[:, :a.shape[1]] = a
    return out


def _quantize_rows(w):
    """int8 rows of a float32 (rows, width) array by the project's rule (pyfff.quantize._symmetric_int8), as float64
    integers, and their float32 scales as float64 (0 for an all-zero row)."""
    q, scale = _symmetric_int8(np.asarray(w, dtype=np.float32), axis=1)
    return q.astype(np.float64), scale.astype(np.float64)


def _pack_out_rows(q_out):
    """Output rows padded to blocks of 64 columns, byte 4 i + k of a block holding column 16 k + i (the order
    fff_quant.h widens them in: two shifts of an int32 lane)."""
    padded = _pad_cols(q_out.astype(np.int8), _padded(q_out.shape[1]))
    rows, dp = padded.shape
    return np.ascontiguousarray(padded.reshape(rows, dp // 64, 4, 16).transpose(0, 1, 3, 2)).reshape(rows, dp)


def prepare_int8(w_in, b_in, w_out):
    """The arrays of the int8 kernel for float32 ``w_in`` (rows, d_in), ``b_in`` (rows,) or None, ``w_out``.

    Returns a dict: ``q``, ``q2`` (rows, d_in padded to 64) int8 input rows and residuals; ``rec`` (rows, 9) float64
    per-row record (bound terms E1, N1, E2, N2, C; scale; bias; sum q; sum q2); ``q_out`` (rows, d_out padded)
    int8 (packed, see ``_pack_out_rows``) and ``s_out`` (rows,) float32 output rows; ``w_in`` and ``b_in`` as given (float32).
    """
    w = np.asarray(w_in, dtype=np.float64)
    d_in = w.shape[1]
    b = np.zeros(w.shape[0]) if b_in is None else np.asarray(b_in, dtype=np.float64)
    if d_in > MAX_K:
        raise ValueError(f"the int8 FFF layer takes at most {MAX_K} input features, got {d_in} (its int32 sums of "
                         "255 x 127 products would overflow beyond)")
    q, s = _quantize_rows(w_in)
    w1 = s[:, None] * q                                   # exact: 24-bit scale times 8-bit integer
    step = np.where(s > 0, s, 1)[:, None] / 256           # the residual's scale (an all-zero row has none)
    q2 = np.clip(np.rint((w - w1) / step), -127, 127)
    w2 = w1 + (s[:, None] / 256) * q2                     # exact: a multiple of s / 256 by a 16-bit integer
    u = 2.0**-24
    g = (d_in + 1) * u / (1 - (d_in + 1) * u)              # float32 dot product + bias add, any order
    wn = _norms(w)
    rec = np.empty((w.shape[0], len(_REC)))
    rec[:, 0] = (_norms(w - w1) + g * wn) * _UP
    rec[:, 1] = _norms(w1)
    rec[:, 2] = (_norms(w - w2) + g * wn) * _UP
    rec[:, 3] = _norms(w2)
    rec[:, 4] = (g * np.abs(b) + (d_in + 1) * 2.0**-149) * _UP
    rec[:, 5] = s
    rec[:, 6] = b
    rec[:, 7] = q.sum(axis=1)
    rec[:, 8] = q2.sum(axis=1)
    q_out, s_out = _quantize_rows(w_out)
    return {
        "q": _pad_cols(q.astype(np.int8), _padded(d_in)),
        "q2": _pad_cols(q2.astype(np.int8), _padded(d_in)),
        "rec": rec,
        "q_out": _pack_out_rows(q_out),
        "s_out": s_out.astype(np.float32),
        "w_in": w_in,
        "b_in": b_in,
    }


def _quantize_tokens(x):
    """16-bit token codes as fff_quant.h makes them, in float32: (h, l, sx, zp, |x| bound, |x - x2| bound, ok).

    ``ok`` is False for tokens the kernel does not quantize (NaN, infinity, or a range below 2^-100): those take
    the float32 logit at every node."""
    x32 = np.asarray(x, dtype=np.float32)
    d = x32.shape[1]
    lo = np.minimum(x32.min(axis=1, initial=0), 0).astype(np.float64)
    hi = np.maximum(x32.max(axis=1, initial=0), 0).astype(np.float64)
    rng = hi - lo
    ok = np.isfinite(x32).all(axis=1) & ~((rng > 0) & (rng < 2.0**-100))
    with np.errstate(all="ignore"):
        sx = np.where(rng > 0, (rng / _XMAX).astype(np.float32), np.float32(1)).astype(np.float32)
        sx[~ok] = 1
        inv = (np.float32(1) / sx).astype(np.float32)
        zp = np.rint(-lo.astype(np.float32) * inv).astype(np.float32)
        t = x32 * inv[:, None]
        c = np.clip(np.rint(t) + zp[:, None], 0, _XMAX).astype(np.float32)
        r = (t - (c - zp[:, None])).astype(np.float64)
    h = np.floor((c.astype(np.float64) + 128) / 256)
    l = c - 256 * h + 128
    u = 2.0**-24
    g = (d + 16) * u / (1 - (d + 16) * u)
    sum_t = np.einsum("ij,ij->i", t.astype(np.float64), t.astype(np.float64))
    nx = sx * np.sqrt(sum_t / (1 - g)) * (1 + 2.01 * u) / (1 - 2.01 * u) * _UP
    ex = (sx * np.sqrt(np.einsum("ij,ij->i", r, r) / (1 - g)) + 2.01 * u * nx) * _UP
    return h, l, sx.astype(np.float64), zp.astype(np.float64), nx, ex, ok


def _decides(z, bound, b):
    return np.abs(z) > (bound + 2.0**-50 * (np.abs(z) + 2 * np.abs(b))) * _UP


def int8_reference(layer, x):
    """The int8 layer's function in plain NumPy, for finite ``x`` of shape (n, d_in).

    Returns ``(y, routes, level, bound)``: outputs (n, d_out) float64, routes (n, n_trees, depth + 1), the level
    that decided each node (1, 2, or 3 for the float32 logit) and the bound on that node's logit error (0 at
    level 3). The float32 logit at level 3 is computed here in float64 and rounded: it can differ from the float32
    kernel's in the last bits, and so route differently where that logit is within rounding of zero.
    """
    a = layer._arrays
    x = np.asarray(x, dtype=np.float32)
    n = x.shape[0]
    h, l, sx, zp, nx, ex, ok = _quantize_tokens(x)
    n_lev = layer.depth + 1
    q, q2, rec = a["q"][:, :layer.d_in].astype(np.int64), a["q2"][:, :layer.d_in].astype(np.int64), a["rec"]
    w_in = np.asarray(a["w_in"], dtype=np.float64)
    routes = np.zeros((n, layer.n_trees, n_lev), dtype=np.int64)
    level = np.zeros_like(routes)
    bound = np.zeros((n, layer.n_trees, n_lev))
    logit = np.zeros((n, layer.n_trees, n_lev), dtype=np.float32)
    rows = np.zeros((n, layer.n_trees, n_lev), dtype=np.int64)
    off = 128 + zp
    for t in range(layer.n_trees):
        node = np.zeros(n, dtype=np.int64)
        for lev in range(n_lev):
            r = t * layer.n_nodes + node
            e1, n1, e2, n2, c, s, b, sq, sq2 = rec[r].T
            hq, lq, hq2, lq2 = (np.einsum("ij,ij->i", u, v) for u, v in ((h, q[r]), (l, q[r]), (h, q2[r]), (l, q2[r])))
            a1 = 256 * hq + lq - off * sq                   # x2 . w1 / (sx s)
            z1 = sx * s * a1 + b
            B1 = nx * e1 + ex * n1 + c
            a2 = 256 * a1 + 256 * hq2 + lq2 - off * sq2      # x2 . w2 / (sx s / 256)
            z2 = sx * s / 256 * a2 + b
            B2 = nx * e2 + ex * n2 + c
            zf = (np.einsum("ij,ij->i", w_in[r], x.astype(np.float64)) + b).astype(np.float32)
            d1 = ok & _decides(z1, B1, b)
            d2 = ok & ~d1 & _decides(z2, B2, b)
            z = np.where(d1, z1, np.where(d2, z2, zf)).astype(np.float32)
            level[:, t, lev] = np.where(d1, 1, np.where(d2, 2, 3))
            bound[:, t, lev] = np.where(d1, B1, np.where(d2, B2, 0.0))
            routes[:, t, lev] = node
            logit[:, t, lev] = z
            rows[:, t, lev] = r
            node = 2 * node + 1 + (z > 0)
    act = apply_activation(logit.astype(np.float64), layer.activation) * a["s_out"][rows]
    q_out, _ = _quantize_rows(layer.float_layer.w_out)
    y = np.einsum("ntk,ntkd->nd", act, q_out[rows])
    return y, routes, level, bound


def int8_tolerance(layer, x):
    """Per-token bound (n,) on ``max |int8 layer(x) - float32 layer(x)|`` over the outputs, from the quantization.

    Per visited node k with activation a_k, output row w_k (scale s_k) and logit bound B_k (the deciding level's):
    ``sum_k |a_k| s_k / 2 + 1.13 (B_k + |z_k| 2^-24) max|w_k|``, plus 1e-5 of ``sum_k |a_k| max|w_k|`` for the
    float32 sums of both layers. (1.13 bounds |gelu'| and relu's slope; the output rows round by s_k / 2.)
    """
    x = np.asarray(x, dtype=np.float32)
    _, routes, _, bound = int8_reference(layer, x)
    rows = routes + (np.arange(layer.n_trees) * layer.n_nodes)[None, :, None]
    w_out = np.asarray(layer.float_layer.w_out, dtype=np.float64)
    wmax = np.abs(w_out).max(axis=1)[rows]
    b = layer.float_layer.b_in
    z = np.einsum("ntkd,nd->ntk", np.asarray(layer.float_layer.w_in, dtype=np.float64)[rows], x.astype(np.float64))
    if b is not None:
        z = z + np.asarray(b, dtype=np.float64)[rows]
    a = np.abs(apply_activation(z, layer.activation)) + _MAX_GELU_SLOPE * bound
    s_out = layer._arrays["s_out"].astype(np.float64)[rows]
    tol = a * s_out / 2 + _MAX_GELU_SLOPE * (bound + np.abs(z) * 2.0**-23) * wmax + 1e-5 * a * wmax
    return tol.sum(axis=(1, 2))


class Int8FFF:
    """An FFF layer on int8 rows whose routes are the float32 layer's, bit for bit. Made by ``FFF.quantize("int8")``.

    Same interface as :class:`pyfff.FFF`: ``layer(x, n_threads=None, *, out=None)``, ``layer.routes(x)``, float32
    results that do not depend on ``n_threads``. ``last_stats`` holds the counters of the most recent call: nodes
    visited, nodes the 8-bit logit could not decide (``level2``), and nodes that took the float32 logit
    (``float32``).
    """

    quantize = "int8"

    def __init__(self, layer, *, path=None):
        from .fff import FFF

        if not isinstance(layer, FFF):
            raise TypeError(f"Int8FFF quantizes a pyfff.FFF layer, got {type(layer).__name__}")
        if layer.dtype != np.float32:
            raise TypeError(f"int8 quantization needs a float32 layer, got a {layer.dtype} one (build the layer "
                            "from float32 weights)")
        self.float_layer = layer
        self._arrays = prepare_int8(layer.w_in, layer.b_in, layer.w_out)
        self._kernel = _fff_int8.Int8Kernel(self._arrays, layer.d_in, layer.d_out, layer.depth, layer.n_trees,
                                            layer._act_code, layer._bound.threads_for, path)
        self.last_stats = None

    # The float32 layer's shape and settings.
    n_trees = property(lambda self: self.float_layer.n_trees)
    depth = property(lambda self: self.float_layer.depth)
    n_nodes = property(lambda self: self.float_layer.n_nodes)
    n_neurons = property(lambda self: self.float_layer.n_neurons)
    d_in = property(lambda self: self.float_layer.d_in)
    d_out = property(lambda self: self.float_layer.d_out)
    dtype = property(lambda self: self.float_layer.dtype)
    activation = property(lambda self: self.float_layer.activation)
    serial_below = property(lambda self: self.float_layer.serial_below)

    @property
    def path(self):
        """The int8 code path of the integer dot products (``pyfff.config`` lists them)."""
        return self._kernel.path

    @property
    def nbytes(self):
        """Bytes of the int8 arrays (the float32 input rows it keeps referenced are not counted)."""
        return sum(self._arrays[k].nbytes for k in ("q", "q2", "rec", "q_out", "s_out"))

    def _fill(self, x2, y, r, n_threads):
        self._note(self._kernel.fill(x2, y, r, self.float_layer._bound.threads_for(n_threads, x2.shape[0])))

    def _note(self, stats):
        self.last_stats = {"nodes": stats[0], "level2": stats[1], "float32": stats[2]}

    def __call__(self, x, n_threads=None, *, out=None):
        """Apply the layer; see :meth:`pyfff.FFF.__call__` (same arguments, shapes and errors)."""
        fast = self._kernel.forward(x, n_threads, out)  # (n, d_in) C-contiguous float32 (and a matching out)
        if fast is not NotImplemented:
            self._note(fast[1])
            return fast[0]
        from .fff import _check_out

        x2, lead = self.float_layer._prepare(x)
        if out is None:
            y = np.empty((x2.shape[0], self.d_out), dtype=np.float32)
        else:
            _check_out(out, lead + (self.d_out,), self.dtype, x2)
            y = out.reshape(-1, self.d_out)
        self._fill(x2, y, None, n_threads)
        return y.reshape(lead + (self.d_out,)) if out is None else out

    def routes(self, x, n_threads=None):
        """Visited node indices, as :meth:`pyfff.FFF.routes`: equal to the float32 layer's."""
        x2, lead = self.float_layer._prepare(x)
        r = np.empty((x2.shape[0], self.n_trees, self.depth + 1), dtype=np.int64)
        self._fill(x2, None, r, n_threads)
        return r.reshape(lead + (self.n_trees, self.depth + 1))

    def __reduce__(self):
        return (_rebuild, (self.float_layer, self.path))

    def __repr__(self):
        return (f"Int8FFF(d_in={self.d_in}, d_out={self.d_out}, depth={self.depth}, n_trees={self.n_trees}, "
                f"activation={self.activation!r}, path={self.path!r})")


def _rebuild(layer, path):
    return Int8FFF(layer, path=path)

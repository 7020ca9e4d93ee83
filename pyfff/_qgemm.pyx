"""Compiled int8 dense layers (private). Validation and packing live in pyfff/quantize.py.

The C kernels are in src/qgemm.h: activations quantized per row at run time,
int8 weights packed once, int32 accumulation, a fused float epilogue (bias,
GELU, store or add). This module binds one packed weight once (``QLinear``) and
runs it on row blocks with the GIL released: the encoder's worker threads call
it on their own rows with one thread each, and ``forward(..., n_threads=k)``
splits the output panels over k OpenMP threads (the encoder's few-token mode).

Code paths (``paths()``): the best one this CPU supports is the default;
``PYFFF_INT8_PATH=<name>`` (read at import) or ``QLinear(..., path=name)``
picks another, for testing and comparison. Every path computes the same int32
accumulators; results differ between paths only by float rounding in the
epilogue, and never between thread counts or row splits.
"""
import os

from cython.parallel cimport parallel, prange
from libc.stdint cimport int8_t, int32_t, uint8_t
from libc.stdlib cimport free, malloc

cimport numpy as cnp

from ._openmp_helpers import _thread_guard

cnp.import_array()

cdef extern from "qgemm.h" nogil:
    int QG_N_PATHS, QG_NR, QG_KB, QG_GELU, QG_ACCUMULATE
    const char *qg_path_names[]
    int qg_path_supported(int path)
    int qg_best_path()
    Py_ssize_t qg_padded_k(Py_ssize_t k)
    Py_ssize_t qg_padded_n(Py_ssize_t n)
    size_t qg_scratch_bytes(Py_ssize_t kp)
    void qg_quantize_rows(const float *x, Py_ssize_t ldx, Py_ssize_t m, Py_ssize_t k, Py_ssize_t kp, uint8_t *q,
                          float *scale, int32_t *zp)
    void qg_linear_panels_f32(int path, const float *x, Py_ssize_t ldx, Py_ssize_t m, Py_ssize_t k,
                              const int8_t *w, const float *sw, const int32_t *colsum, const float *bias, Py_ssize_t n,
                              Py_ssize_t p0, Py_ssize_t p1, int flags, float *y, Py_ssize_t ldy, void *scratch)

PANEL = QG_NR      # output channels per packed panel
K_BLOCK = QG_KB    # K is padded to a multiple of this
GELU = QG_GELU
ACCUMULATE = QG_ACCUMULATE
PATH_NAMES = tuple(qg_path_names[i].decode() for i in range(QG_N_PATHS))


def paths():
    """Names of the int8 code paths this CPU runs, best first as the default picks them."""
    cdef int best = qg_best_path()
    ok = [PATH_NAMES[i] for i in range(QG_N_PATHS) if qg_path_supported(i)]
    return [PATH_NAMES[best]] + [p for p in reversed(ok) if p != PATH_NAMES[best]]


def _path_index(name):
    if name not in PATH_NAMES:
        raise ValueError(f"unknown int8 code path {name!r} (known: {', '.join(PATH_NAMES)})")
    cdef int i = PATH_NAMES.index(name)
    if not qg_path_supported(i):
        raise ValueError(f"int8 code path {name!r} is not supported by this CPU (supported: {', '.join(paths())})")
    return i


def _default_path():
    name = os.environ.get("PYFFF_INT8_PATH", "")
    return _path_index(name) if name else qg_best_path()


cdef int _DEFAULT = _default_path()


def default_path():
    """The int8 code path used when none is asked for (``PYFFF_INT8_PATH`` or the best supported)."""
    return PATH_NAMES[_DEFAULT]


cdef inline bint _is_f32_rows(cnp.ndarray a, Py_ssize_t width):
    """A 2-D float32 array (n, width) whose rows are contiguous (any row stride), aligned, native order.

    Strides of an axis of length <= 1 are never used (NumPy may report 0 there)."""
    if (cnp.PyArray_TYPE(a) != cnp.NPY_FLOAT32 or cnp.PyArray_NDIM(a) != 2 or cnp.PyArray_DIM(a, 1) != width
            or not cnp.PyArray_ISNOTSWAPPED(a) or not cnp.PyArray_ISALIGNED(a)):
        return False
    cdef Py_ssize_t rows = cnp.PyArray_DIM(a, 0)
    if rows >= 1 and width > 1 and cnp.PyArray_STRIDE(a, 1) != 4:
        return False
    return rows <= 1 or (cnp.PyArray_STRIDE(a, 0) % 4 == 0 and cnp.PyArray_STRIDE(a, 0) >= 4 * width)


def quantize_rows(cnp.ndarray x):
    """The kernel's activation quantization of a (m, k) float32 C-contiguous array: (q uint8 (m, k), scale, zp)."""
    if cnp.PyArray_TYPE(x) != cnp.NPY_FLOAT32 or cnp.PyArray_NDIM(x) != 2 or not cnp.PyArray_IS_C_CONTIGUOUS(x):
        raise ValueError("x must be a C-contiguous 2-D float32 array")
    cdef Py_ssize_t m = cnp.PyArray_DIM(x, 0), k = cnp.PyArray_DIM(x, 1)
    cdef cnp.npy_intp dims[2]
    dims[0] = m
    dims[1] = k
    cdef cnp.ndarray q = cnp.PyArray_EMPTY(2, dims, cnp.NPY_UINT8, 0)
    cdef cnp.ndarray scale = cnp.PyArray_EMPTY(1, dims, cnp.NPY_FLOAT32, 0)
    cdef cnp.ndarray zp = cnp.PyArray_EMPTY(1, dims, cnp.NPY_INT32, 0)
    with nogil:
        qg_quantize_rows(<const float *>cnp.PyArray_DATA(x), k, m, k, k, <uint8_t *>cnp.PyArray_DATA(q),
                         <float *>cnp.PyArray_DATA(scale), <int32_t *>cnp.PyArray_DATA(zp))
    return q, scale, zp


cdef class QLinear:
    """One packed int8 weight, bound once: ``forward(x, out, flags)`` computes the layer on a row block.

    Parameters (prepared and checked by pyfff.quantize.QuantizedLinear)
    ----------
    packed : ndarray of shape (Np / 64, Kp / 4, 64, 4), dtype=int8, C-contiguous
    scale : ndarray of shape (Np,), dtype=float32 (per output channel)
    colsum : ndarray of shape (Np,), dtype=int32 (sum over k of the int8 weights)
    bias : ndarray of shape (n,), dtype=float32, or None
    k, n : int
        Input and output widths.
    path : str or None
        Code path name (None: the default path).
    """
    cdef readonly object packed, scale, colsum, bias
    cdef readonly Py_ssize_t k, n, kp
    cdef readonly int path_index
    cdef const int8_t *w_ptr
    cdef const float *s_ptr
    cdef const int32_t *c_ptr
    cdef const float *b_ptr

    def __cinit__(self, cnp.ndarray packed, cnp.ndarray scale, cnp.ndarray colsum, object bias, Py_ssize_t k,
                  Py_ssize_t n, object path=None):
        if k < 1 or n < 1:
            raise ValueError("internal error: k and n must be >= 1")
        self.kp = qg_padded_k(k)
        cdef Py_ssize_t npad = qg_padded_n(n)
        if (cnp.PyArray_TYPE(packed) != cnp.NPY_INT8 or not cnp.PyArray_IS_C_CONTIGUOUS(packed)
                or cnp.PyArray_SIZE(packed) != npad * self.kp):
            raise ValueError(f"internal error: packed must be a C-contiguous int8 array of {npad * self.kp} values")
        for arr, typenum, what in ((scale, cnp.NPY_FLOAT32, "scale"), (colsum, cnp.NPY_INT32, "colsum")):
            if (cnp.PyArray_TYPE(arr) != typenum or not cnp.PyArray_IS_C_CONTIGUOUS(arr)
                    or cnp.PyArray_SIZE(arr) != npad or not cnp.PyArray_ISNOTSWAPPED(arr)):
                raise ValueError(f"internal error: {what} must be a C-contiguous array of {npad} values")
        self.b_ptr = NULL
        if bias is not None:
            if (type(bias) is not cnp.ndarray or cnp.PyArray_TYPE(bias) != cnp.NPY_FLOAT32
                    or not cnp.PyArray_IS_C_CONTIGUOUS(bias) or cnp.PyArray_SIZE(bias) != n):
                raise ValueError(f"internal error: bias must be a C-contiguous float32 array of {n} values")
            self.b_ptr = <const float *>cnp.PyArray_DATA(bias)
        self.path_index = _DEFAULT if path is None else _path_index(path)
        self.w_ptr = <const int8_t *>cnp.PyArray_DATA(packed)
        self.s_ptr = <const float *>cnp.PyArray_DATA(scale)
        self.c_ptr = <const int32_t *>cnp.PyArray_DATA(colsum)
        self.packed, self.scale, self.colsum, self.bias = packed, scale, colsum, bias
        self.k, self.n = k, n

    @property
    def path(self):
        return PATH_NAMES[self.path_index]

    def forward(self, cnp.ndarray x,     # IN  (m, k) float32, rows contiguous
                cnp.ndarray out,         # OUT (m, n) float32, rows contiguous; read too with ACCUMULATE
                int flags=0,             # GELU | ACCUMULATE
                int n_threads=1):        # OpenMP threads, each on its own share of the output panels
        """out (=|+=) act(dequant(quant(x) @ W) + bias); x and out must not overlap.

        With ``n_threads > 1`` the output channels (whole panels of 64) are split between OpenMP threads, each of
        which quantizes the rows itself (cheap next to the product): for few rows this halves the weight bytes
        each core reads, where splitting the rows would have every core read all of them. Results are the same
        bits for every ``n_threads``."""
        if not _is_f32_rows(x, self.k):
            raise ValueError(f"internal error: x must be a float32 (m, {self.k}) array with contiguous rows")
        if not _is_f32_rows(out, self.n) or not cnp.PyArray_ISWRITEABLE(out):
            raise ValueError(f"internal error: out must be a writeable float32 (m, {self.n}) array with "
                             "contiguous rows")
        cdef Py_ssize_t m = cnp.PyArray_DIM(x, 0)
        if cnp.PyArray_DIM(out, 0) != m:
            raise ValueError("internal error: x and out have different numbers of rows")
        if n_threads < 1:
            raise ValueError("internal error: n_threads must be >= 1")
        if m == 0:
            return out
        cdef Py_ssize_t n_panels = qg_padded_n(self.n) // QG_NR
        cdef Py_ssize_t ldx = cnp.PyArray_STRIDE(x, 0) // 4 if m > 1 else self.k
        cdef Py_ssize_t ldy = cnp.PyArray_STRIDE(out, 0) // 4 if m > 1 else self.n
        cdef const float *xp = <const float *>cnp.PyArray_DATA(x)
        cdef float *yp = <float *>cnp.PyArray_DATA(out)
        cdef size_t n_bytes = qg_scratch_bytes(self.kp)
        cdef int failed = 0
        cdef int *fail = &failed
        cdef void *scratch
        cdef Py_ssize_t t
        cdef int nt = <int>min(<Py_ssize_t>_thread_guard(n_threads), n_panels)
        if nt <= 1:
            scratch = malloc(n_bytes)
            if scratch == NULL:
                raise MemoryError("could not allocate the int8 kernel's scratch memory")
            with nogil:
                qg_linear_panels_f32(self.path_index, xp, ldx, m, self.k, self.w_ptr, self.s_ptr, self.c_ptr,
                                     self.b_ptr, self.n, 0, n_panels, flags, yp, ldy, scratch)
            free(scratch)
            return out
        with nogil, parallel(num_threads=nt):
            scratch = malloc(n_bytes)          # per thread, freed in the same block
            for t in prange(nt, schedule="static"):
                if scratch == NULL:
                    fail[0] = 1
                else:
                    qg_linear_panels_f32(self.path_index, xp, ldx, m, self.k, self.w_ptr, self.s_ptr, self.c_ptr,
                                         self.b_ptr, self.n, t * n_panels // nt, (t + 1) * n_panels // nt, flags,
                                         yp, ldy, scratch)
            free(scratch)
        if failed:
            raise MemoryError("could not allocate the int8 kernel's scratch memory")
        return out

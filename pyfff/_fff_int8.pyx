"""Compiled int8 FFF layer (private). Row preparation, validation and the NumPy reference live in pyfff/fff_int8.py.

The C kernel is src/fff_quant.h: tokens quantized to 16 bits per call, an 8-bit first try at every node's logit,
a 16-bit second try where the first cannot decide, and the float32 layer's own logit where neither can; outputs
from int8 rows. ``Int8Kernel`` binds the prepared arrays once and runs batches in tiles with the GIL released,
tiles split over OpenMP threads (each token's result does not depend on its tile or thread).
"""
import threading

from cython.parallel cimport parallel, prange, threadid
from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t
from libc.stdlib cimport calloc, free, malloc

cimport numpy as cnp

from ._openmp_helpers import _thread_guard
from ._qgemm import PATH_NAMES, _path_index, default_path

cnp.import_array()

cdef extern from "fff_quant.h" nogil:
    int FQ_KB, FQ_NF, FQ_XMAX
    ctypedef int32_t (*fq_dot_fn)(const uint8_t *a, const int8_t *b, Py_ssize_t kp)
    ctypedef struct fq_stats:
        int64_t level2
        int64_t exact
    ctypedef struct fq_layer:
        const int8_t *q
        const int8_t *q2
        const double *rec
        const float *w_in
        const float *b_in
        const int8_t *q_out
        const float *s_out
        Py_ssize_t d_in, kp, d_out, dp
        int depth, n_trees, act
    fq_dot_fn fq_dot_for(int path)
    size_t fq_scratch_bytes(Py_ssize_t n, const fq_layer *L)
    void fq_forward_tile(fq_dot_fn dot, const fq_layer *L, const float *x, Py_ssize_t ldx, Py_ssize_t n, float *y,
                         Py_ssize_t ldy, int64_t *routes, void *scratch, fq_stats *st)

KB = FQ_KB
N_FIELDS = FQ_NF
XMAX = FQ_XMAX
DEFAULT_TILE = 4096


cdef inline const void *_ptr(cnp.ndarray a, int typenum, Py_ssize_t n_elems, str name) except NULL:
    if (cnp.PyArray_TYPE(a) != typenum or not cnp.PyArray_IS_C_CONTIGUOUS(a) or not cnp.PyArray_ISALIGNED(a)
            or cnp.PyArray_SIZE(a) != n_elems):
        raise ValueError(f"internal error: {name} must be a C-contiguous array of {n_elems} elements of the "
                         "prepared dtype")
    return cnp.PyArray_DATA(a)


cdef class Int8Kernel:
    """The prepared arrays of an int8 layer, bound once (they are kept alive here)."""
    cdef readonly object arrays
    cdef fq_layer L
    cdef readonly int path_index
    cdef void *_scratch             # reused by calls (fresh pages cost a fifth of a serial call, more on threads)
    cdef size_t _scratch_bytes
    cdef object _scratch_lock
    cdef object _threads_for         # the float32 layer's BoundLayer.threads_for: the same thread policy

    def __dealloc__(self):
        free(self._scratch)

    def __cinit__(self, dict arrays, Py_ssize_t d_in, Py_ssize_t d_out, int depth, int n_trees, int act,
                  threads_for, path=None):
        cdef Py_ssize_t n_rows = n_trees * ((<Py_ssize_t>2 << depth) - 1)
        cdef Py_ssize_t kp = (d_in + FQ_KB - 1) // FQ_KB * FQ_KB
        cdef Py_ssize_t dp = (d_out + FQ_KB - 1) // FQ_KB * FQ_KB
        self.arrays = arrays
        self.L.q = <const int8_t *>_ptr(arrays["q"], cnp.NPY_INT8, n_rows * kp, "q")
        self.L.q2 = <const int8_t *>_ptr(arrays["q2"], cnp.NPY_INT8, n_rows * kp, "q2")
        self.L.rec = <const double *>_ptr(arrays["rec"], cnp.NPY_FLOAT64, n_rows * FQ_NF, "rec")
        self.L.w_in = <const float *>_ptr(arrays["w_in"], cnp.NPY_FLOAT32, n_rows * d_in, "w_in")
        self.L.b_in = NULL
        if arrays["b_in"] is not None:
            self.L.b_in = <const float *>_ptr(arrays["b_in"], cnp.NPY_FLOAT32, n_rows, "b_in")
        self.L.q_out = <const int8_t *>_ptr(arrays["q_out"], cnp.NPY_INT8, n_rows * dp, "q_out")
        self.L.s_out = <const float *>_ptr(arrays["s_out"], cnp.NPY_FLOAT32, n_rows, "s_out")
        self.L.d_in, self.L.kp, self.L.d_out, self.L.dp = d_in, kp, d_out, dp
        self.L.depth, self.L.n_trees, self.L.act = depth, n_trees, act
        self.path_index = _path_index(default_path() if path is None else path)
        self._threads_for = threads_for
        self._scratch_lock = threading.Lock()

    def forward(self, object x, object n_threads, object out=None):
        """(y, stats) for a C-contiguous float32 (n, d_in) x (and out, if given, a C-contiguous, aligned, writeable
        float32 (n, d_out) array not overlapping x); NotImplemented for anything else (Int8FFF then prepares and
        validates)."""
        cdef cnp.ndarray xa
        cdef cnp.ndarray y
        cdef cnp.npy_intp dims[2]
        cdef char *x_lo
        cdef char *y_lo
        if type(x) is not cnp.ndarray:
            return NotImplemented
        xa = <cnp.ndarray>x
        if (cnp.PyArray_TYPE(xa) != cnp.NPY_FLOAT32 or cnp.PyArray_NDIM(xa) != 2
                or cnp.PyArray_DIM(xa, 1) != self.L.d_in or not cnp.PyArray_IS_C_CONTIGUOUS(xa)
                or not cnp.PyArray_ISNOTSWAPPED(xa) or not cnp.PyArray_ISALIGNED(xa)):
            return NotImplemented
        dims[0] = cnp.PyArray_DIM(xa, 0)
        dims[1] = self.L.d_out
        if out is None:
            y = cnp.PyArray_EMPTY(2, dims, cnp.NPY_FLOAT32, 0)
        else:
            if type(out) is not cnp.ndarray:
                return NotImplemented
            y = <cnp.ndarray>out
            if (cnp.PyArray_TYPE(y) != cnp.NPY_FLOAT32 or cnp.PyArray_NDIM(y) != 2 or cnp.PyArray_DIM(y, 0) != dims[0]
                    or cnp.PyArray_DIM(y, 1) != dims[1] or not cnp.PyArray_IS_C_CONTIGUOUS(y)
                    or not cnp.PyArray_ISNOTSWAPPED(y) or not cnp.PyArray_ISALIGNED(y)
                    or not cnp.PyArray_ISWRITEABLE(y)):
                return NotImplemented
            x_lo = <char *>cnp.PyArray_DATA(xa)
            y_lo = <char *>cnp.PyArray_DATA(y)
            if dims[0] > 0 and (x_lo < y_lo + cnp.PyArray_NBYTES(y)) and (y_lo < x_lo + cnp.PyArray_NBYTES(xa)):
                return NotImplemented  # overlapping x: refused with a message by Int8FFF
        return y, self.fill(xa, y, None, self._threads_for(n_threads, dims[0]))

    @property
    def path(self):
        """The int8 code path of the integer dot products."""
        return PATH_NAMES[self.path_index]

    cdef inline void _tile(self, fq_dot_fn dot, const float *xp, float *yp, int64_t *rp, Py_ssize_t start,
                           Py_ssize_t stop, void *scratch, fq_stats *st) noexcept nogil:
        """Tokens [start, stop) of the call as one tile."""
        cdef Py_ssize_t n_path = self.L.n_trees * (self.L.depth + 1)
        fq_forward_tile(dot, &self.L, xp + start * self.L.d_in, self.L.d_in, stop - start,
                        yp + start * self.L.d_out if yp != NULL else NULL, self.L.d_out,
                        rp + start * n_path if rp != NULL else NULL, scratch, st)

    cdef void *_take_scratch(self, size_t n_bytes) except NULL:
        """The cached scratch (grown to n_bytes) if no other call holds it, else fresh memory."""
        cdef void *p
        if self._scratch_lock.acquire(False):
            if self._scratch_bytes < n_bytes:
                free(self._scratch)
                self._scratch = malloc(n_bytes)
                self._scratch_bytes = n_bytes if self._scratch != NULL else 0
            if self._scratch != NULL:
                return self._scratch
            self._scratch_lock.release()
        p = malloc(n_bytes)
        if p == NULL:
            raise MemoryError("could not allocate the int8 FFF kernel's scratch memory")
        return p

    cdef void _give_scratch(self, void *p):
        if p == self._scratch:
            self._scratch_lock.release()
        else:
            free(p)

    def fill(self, cnp.ndarray x,   # IN  (n, d_in) float32, C-contiguous
             object y,              # OUT (n, d_out) float32, C-contiguous, or None
             object routes,         # OUT (n, n_trees, depth + 1) int64, or None
             int n_threads, Py_ssize_t tile=DEFAULT_TILE):
        """Fill ``y`` and/or ``routes``; returns (nodes visited, nodes decided at level 2, float32 fallbacks).

        Tiles of at most ``tile`` tokens (fewer when that leaves a thread idle) go to ``n_threads`` OpenMP threads
        with a static schedule."""
        if n_threads < 1 or tile < 1:
            raise ValueError("internal error: n_threads and tile must be >= 1")
        cdef Py_ssize_t n = cnp.PyArray_DIM(x, 0)
        cdef Py_ssize_t n_path = self.L.n_trees * (self.L.depth + 1)
        cdef const float *xp = <const float *>_ptr(x, cnp.NPY_FLOAT32, n * self.L.d_in, "x")
        cdef float *yp = NULL
        cdef int64_t *rp = NULL
        if y is not None:
            yp = <float *>_ptr(y, cnp.NPY_FLOAT32, n * self.L.d_out, "y")
        if routes is not None:
            rp = <int64_t *>_ptr(routes, cnp.NPY_INT64, n * n_path, "routes")
        if n == 0:
            return (0, 0, 0)
        cdef fq_dot_fn dot = fq_dot_for(self.path_index)
        cdef int nt = <int>min(<Py_ssize_t>_thread_guard(n_threads), n)
        cdef Py_ssize_t t_size = min(tile, (n + nt - 1) // nt)
        cdef Py_ssize_t n_tiles = (n + t_size - 1) // t_size
        cdef size_t n_bytes = fq_scratch_bytes(t_size, &self.L)
        cdef fq_stats total
        cdef fq_stats *per_tile
        cdef char *base
        cdef void *scratch
        cdef Py_ssize_t i
        cdef int64_t lv2 = 0, exact = 0
        total.level2 = 0
        total.exact = 0
        if nt > n_tiles:
            nt = <int>n_tiles
        if nt <= 1:
            scratch = self._take_scratch(n_bytes)
            with nogil:
                for i in range(n_tiles):
                    self._tile(dot, xp, yp, rp, i * t_size, min((i + 1) * t_size, n), scratch, &total)
            self._give_scratch(scratch)
            return (n * n_path, total.level2, total.exact)
        per_tile = <fq_stats *>calloc(n_tiles, sizeof(fq_stats))
        if per_tile == NULL:
            raise MemoryError("could not allocate the int8 FFF kernel's counters")
        n_bytes = (n_bytes + 63) // 64 * 64
        try:
            base = <char *>self._take_scratch(nt * n_bytes)   # one region, a slice per thread
        except MemoryError:
            free(per_tile)
            raise
        with nogil, parallel(num_threads=nt):
            for i in prange(n_tiles, schedule="static"):
                self._tile(dot, xp, yp, rp, i * t_size, min((i + 1) * t_size, n), base + threadid() * n_bytes,
                           &per_tile[i])
        self._give_scratch(base)
        for i in range(n_tiles):
            lv2 += per_tile[i].level2
            exact += per_tile[i].exact
        free(per_tile)
        return (n * n_path, lv2, exact)

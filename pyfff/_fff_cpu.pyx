"""Compiled FFF kernels (private). Validation lives in pyfff/fff.py.

The entry point takes C-contiguous NumPy arrays, preallocated outputs and an
explicit thread count; pyfff.FFF checks dtypes, shapes and depth before it
calls it (the entry point re-checks only what would otherwise crash). The GIL is released for the whole
kernel. The C kernels are in src/fff_kernels.h (one tile of tokens per call);
this module splits the batch into tiles and hands them to OpenMP threads.

Guarantee: every output row is written by exactly one thread and its value
does not depend on which tokens share its tile, so results are bitwise
identical for every ``n_threads``.
"""
from cython.parallel cimport parallel, prange
from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc

cimport numpy as cnp

from ._openmp_helpers import MAX_N_THREADS, _thread_guard

cnp.import_array()

cdef int _MAX_N_THREADS = MAX_N_THREADS

cdef extern from "fff_cpu.h" nogil:
    const char *fff_simd_variant()
    size_t fff_scratch_bytes_f32(Py_ssize_t n_tile, int depth, int n_trees)
    size_t fff_scratch_bytes_f64(Py_ssize_t n_tile, int depth, int n_trees)
    void fff_forward_tile_f32(const float *x, Py_ssize_t ldx, const float *w_in, Py_ssize_t ldw_in,
                              const float *b_in, const float *w_out, Py_ssize_t ldw_out, Py_ssize_t n_tile,
                              Py_ssize_t d_in, Py_ssize_t d_out, int depth, int n_trees, int act, float *y,
                              Py_ssize_t ldy, int64_t *routes, void *scratch, int n_threads)
    void fff_forward_tile_f64(const double *x, Py_ssize_t ldx, const double *w_in, Py_ssize_t ldw_in,
                              const double *b_in, const double *w_out, Py_ssize_t ldw_out, Py_ssize_t n_tile,
                              Py_ssize_t d_in, Py_ssize_t d_out, int depth, int n_trees, int act, double *y,
                              Py_ssize_t ldy, int64_t *routes, void *scratch, int n_threads)

ctypedef fused floating:
    float
    double

# Activation codes of src/fff_kernels.h.
ACTIVATION_CODES = {"gelu": 0, "gelu_tanh": 1, "relu": 2}

# Tokens per tile: the more tokens a tile holds, the more of them share each
# deep subtree's weight rows (16384 tokens: 8 per leaf row).  Measured against
# 2048-token tiles at batch 16384, one thread: 10-16 % faster on both machines
# of docs/performance.md.  Scratch: 16384 * (depth + 1) * 8 bytes + 3 ints per token.
cdef Py_ssize_t _DEFAULT_TILE = 16384
# Threads share one tile only when each gets at least this many of its tokens,
# and only up to this many threads (16 threads did better on small tiles of
# their own: 0.18-0.19 against 0.19-0.22 us/token at batch 16384).
cdef Py_ssize_t _MIN_TOKENS_PER_INNER_THREAD = 512
cdef int _MAX_INNER_THREADS = 4
DEFAULT_TILE = _DEFAULT_TILE
# With n_threads=None, a call with less work than this (multiply-adds: 256 tokens at width 768, depth 11) runs on the
# calling thread alone. Threads would save at most half a millisecond there, and a parallel region right after the
# user's own multi-threaded NumPy matmul waits for cores that OpenBLAS's idle workers keep spinning on (batch 64:
# 0.04 ms alone, 3.7 ms right after `x @ W` on 2 cores), while libgomp's idle workers slow that matmul down in turn
# (0.5 -> 4.3 ms). See docs/performance.md, "FFF calls between NumPy matmuls".
SERIAL_WORK = 256 * 12 * 1536


def simd_variant():
    """Name of the SIMD code path the kernels run on this CPU."""
    return fff_simd_variant().decode()


cdef int _run(const floating *x, const floating *w_in, const floating *b_in, const floating *w_out,
              Py_ssize_t n, Py_ssize_t d_in, Py_ssize_t d_out, int depth, int n_trees, int act,
              floating *y, int64_t *routes, int n_threads, Py_ssize_t tile) noexcept nogil:
    """Cut the batch into tiles and run them; returns 0, or -1 if scratch could not be allocated.

    Two ways to use the threads, chosen by batch size:

    * at least one full tile per thread (n >= n_threads * tile): tiles go to
      the threads (prange, static schedule; every token costs the same);
    * a smaller batch, on at most _MAX_INNER_THREADS threads that each still
      get _MIN_TOKENS_PER_INNER_THREAD tokens of a tile: the tiles run one after
      another and all threads work inside each tile (OpenMP in
      src/fff_kernels.h, each thread on its own subtrees), so the tile stays
      as large as the batch allows and its tokens keep sharing weight rows
      (2048 tokens on 2 threads: 2.0-2.4x one thread instead of 1.8-2.0x);
    * otherwise one smaller tile per thread: with 16 threads the sorts of a
      shared tile, done by one thread, and the barriers cost more than the
      sharing saves (16384 tokens: 4.5x instead of 12.8x one thread).

    The per-thread scratch is allocated inside the parallel block and freed
    there. Failure is reported through a pointer: a plain variable assigned
    inside a parallel block is thread-private. Every thread enters the prange
    (an OpenMP worksharing loop must be met by all threads or none); a thread
    without scratch only marks its tiles as failed.
    """
    cdef Py_ssize_t n_tiles, t_size, i, start, stop
    cdef Py_ssize_t n_path = n_trees * (depth + 1)
    cdef size_t n_bytes
    cdef void *scratch = NULL
    cdef int failed_flag = 0
    cdef int *failed = &failed_flag
    cdef int inner = 1          # threads inside each tile
    t_size = min(tile, n)
    if n < <Py_ssize_t>n_threads * tile:
        if n_threads <= _MAX_INNER_THREADS and t_size >= _MIN_TOKENS_PER_INNER_THREAD * n_threads:
            inner = n_threads   # one tile at a time, all threads inside it
            n_threads = 1
        else:                   # smaller tiles, one per thread
            t_size = (n + n_threads - 1) // n_threads
    n_tiles = (n + t_size - 1) // t_size
    if n_threads > n_tiles:
        n_threads = <int>n_tiles
    if floating is float:
        n_bytes = fff_scratch_bytes_f32(t_size, depth, n_trees)
    else:
        n_bytes = fff_scratch_bytes_f64(t_size, depth, n_trees)

    if n_threads == 1:
        scratch = malloc(n_bytes)
        if scratch == NULL:
            return -1
        for i in range(n_tiles):
            start = i * t_size
            stop = min(start + t_size, n)
            _tile(x, w_in, b_in, w_out, start, stop, d_in, d_out, depth, n_trees, act, y, routes, n_path, scratch,
                  inner)
        free(scratch)
        return 0
    with parallel(num_threads=n_threads):
        scratch = malloc(n_bytes)   # thread-local: assigned inside the parallel block
        for i in prange(n_tiles, schedule="static"):
            if scratch == NULL:
                failed[0] = 1
            else:
                start = i * t_size
                stop = min(start + t_size, n)
                _tile(x, w_in, b_in, w_out, start, stop, d_in, d_out, depth, n_trees, act, y, routes, n_path,
                      scratch, 1)
        free(scratch)
    return -failed_flag


cdef inline void _tile(const floating *x, const floating *w_in, const floating *b_in, const floating *w_out,
                       Py_ssize_t start, Py_ssize_t stop, Py_ssize_t d_in, Py_ssize_t d_out, int depth,
                       int n_trees, int act, floating *y, int64_t *routes, Py_ssize_t n_path,
                       void *scratch, int inner) noexcept nogil:
    cdef floating *y_tile = NULL
    cdef int64_t *r_tile = NULL
    if y != NULL:
        y_tile = y + start * d_out
    if routes != NULL:
        r_tile = routes + start * n_path
    if floating is float:
        fff_forward_tile_f32(x + start * d_in, d_in, w_in, d_in, b_in, w_out, d_out, stop - start, d_in, d_out,
                             depth, n_trees, act, y_tile, d_out, r_tile, scratch, inner)
    else:
        fff_forward_tile_f64(x + start * d_in, d_in, w_in, d_in, b_in, w_out, d_out, stop - start, d_in, d_out,
                             depth, n_trees, act, y_tile, d_out, r_tile, scratch, inner)


cdef inline void *_data(cnp.ndarray a, int typenum, Py_ssize_t n_elems, str name) except NULL:
    """Data pointer of a C-contiguous array of this type and size (cheap checks, no copies)."""
    if (cnp.PyArray_TYPE(a) != typenum or not cnp.PyArray_IS_C_CONTIGUOUS(a) or cnp.PyArray_SIZE(a) != n_elems
            or not cnp.PyArray_ISNOTSWAPPED(a) or not cnp.PyArray_ISALIGNED(a)):
        raise ValueError(f"internal error: {name} must be a C-contiguous array of {n_elems} elements of the "
                         "layer dtype (pyfff.FFF prepares it)")
    return cnp.PyArray_DATA(a)


cdef class BoundLayer:
    """The weights of one FFF layer, checked once, with a lean call path.

    pyfff.FFF validates and owns the arrays; this object keeps references and
    raw pointers so that a call costs a few C-level checks instead of the
    Python-level validation (about 1 us, as much as a batch-1 kernel run).
    It takes NumPy arrays, not typed memoryviews: acquiring five buffers and a
    fused-type dispatch also cost about a microsecond.

    ``forward(x, n_threads)`` takes the fast path when ``x`` is already a
    C-contiguous, aligned, native-endian (n, d_in) array of the layer dtype,
    and otherwise returns NotImplemented so the caller can prepare ``x`` and
    call again. ``fill(x, y, routes, n_threads, tile)`` is the general entry.
    """
    cdef readonly object w_in, b_in, w_out
    cdef const void *wi_ptr
    cdef const void *bi_ptr
    cdef const void *wo_ptr
    cdef readonly int typenum, depth, n_trees, act
    cdef readonly Py_ssize_t d_in, d_out
    cdef readonly Py_ssize_t serial_below     # n_threads=None: batches below this run on one thread
    cdef object _n_threads_fn

    def __cinit__(self, cnp.ndarray w_in, object b_in, cnp.ndarray w_out, int depth, int n_trees, int act,
                  object n_threads_fn=None):
        self.typenum = cnp.PyArray_TYPE(w_in)
        if self.typenum != cnp.NPY_FLOAT32 and self.typenum != cnp.NPY_FLOAT64:
            raise TypeError("internal error: weights must be float32 or float64")
        if cnp.PyArray_NDIM(w_in) != 2 or cnp.PyArray_NDIM(w_out) != 2 or depth < 0 or depth > 30 or n_trees < 1:
            raise ValueError("internal error: bad weight shapes, depth or n_trees")
        if act < 0 or act > 2:
            raise ValueError("internal error: unknown activation code")
        self.d_in = cnp.PyArray_DIM(w_in, 1)
        self.d_out = cnp.PyArray_DIM(w_out, 1)
        cdef Py_ssize_t n_rows = n_trees * ((<Py_ssize_t>2 << depth) - 1)
        self.wi_ptr = _data(w_in, self.typenum, n_rows * self.d_in, "w_in")
        self.wo_ptr = _data(w_out, self.typenum, n_rows * self.d_out, "w_out")
        self.bi_ptr = NULL
        if b_in is not None:
            self.bi_ptr = _data(b_in, self.typenum, n_rows, "b_in")
        self.w_in, self.b_in, self.w_out = w_in, b_in, w_out
        self.depth, self.n_trees, self.act = depth, n_trees, act
        self._n_threads_fn = n_threads_fn
        self.serial_below = max(1, SERIAL_WORK // (n_trees * (depth + 1) * (self.d_in + self.d_out)))

    def threads_for(self, object n_threads, Py_ssize_t n):
        """The thread count a call on ``n`` tokens uses: ``n_threads`` as given (validated), or for None all usable
        cores unless the batch is below ``serial_below`` (then 1)."""
        if n_threads is None and n < self.serial_below:
            return 1
        return self._n_threads_fn(n_threads)

    cdef int _call(self, const void *x, Py_ssize_t n, void *y, int64_t *routes, int n_threads,
                   Py_ssize_t tile) except -1:
        """Run the kernel on n prepared rows (GIL released); MemoryError on scratch failure."""
        cdef int status
        if n_threads > 1:
            n_threads = _thread_guard(n_threads)      # 1 in a child forked after threads were used
        with nogil:
            if self.typenum == cnp.NPY_FLOAT32:
                status = _run(<const float *>x, <const float *>self.wi_ptr, <const float *>self.bi_ptr,
                              <const float *>self.wo_ptr, n, self.d_in, self.d_out, self.depth, self.n_trees,
                              self.act, <float *>y, routes, n_threads, tile)
            else:
                status = _run(<const double *>x, <const double *>self.wi_ptr, <const double *>self.bi_ptr,
                              <const double *>self.wo_ptr, n, self.d_in, self.d_out, self.depth, self.n_trees,
                              self.act, <double *>y, routes, n_threads, tile)
        if status != 0:
            raise MemoryError("could not allocate the FFF kernel's per-thread scratch memory")
        return 0

    def forward(self, object x, object n_threads, object out=None):
        """y = layer(x) for x of shape (n, d_in), or NotImplemented if x (or out) needs preparing.

        ``out``, if given, takes the fast path only when it is a C-contiguous,
        aligned, writeable (n, d_out) array of the layer dtype that does not
        overlap x; anything else returns NotImplemented (pyfff.FFF then
        validates it and says what is wrong).
        """
        cdef cnp.ndarray xa
        cdef cnp.ndarray y
        cdef cnp.npy_intp dims[2]
        cdef Py_ssize_t n
        cdef int nt = 1
        cdef char *x_lo
        cdef char *y_lo
        if type(x) is not cnp.ndarray:
            return NotImplemented
        xa = <cnp.ndarray>x
        if (cnp.PyArray_TYPE(xa) != self.typenum or cnp.PyArray_NDIM(xa) != 2
                or cnp.PyArray_DIM(xa, 1) != self.d_in or not cnp.PyArray_IS_C_CONTIGUOUS(xa)
                or not cnp.PyArray_ISNOTSWAPPED(xa) or not cnp.PyArray_ISALIGNED(xa)):
            return NotImplemented
        n = cnp.PyArray_DIM(xa, 0)
        if out is not None:
            if type(out) is not cnp.ndarray:
                return NotImplemented
            y = <cnp.ndarray>out
            if (cnp.PyArray_TYPE(y) != self.typenum or cnp.PyArray_NDIM(y) != 2 or cnp.PyArray_DIM(y, 0) != n
                    or cnp.PyArray_DIM(y, 1) != self.d_out or not cnp.PyArray_IS_C_CONTIGUOUS(y)
                    or not cnp.PyArray_ISNOTSWAPPED(y) or not cnp.PyArray_ISALIGNED(y)
                    or not cnp.PyArray_ISWRITEABLE(y)):
                return NotImplemented
            x_lo = <char *>cnp.PyArray_DATA(xa)
            y_lo = <char *>cnp.PyArray_DATA(y)
            if n > 0 and (x_lo < y_lo + cnp.PyArray_NBYTES(y)) and (y_lo < x_lo + cnp.PyArray_NBYTES(xa)):
                return NotImplemented  # overlapping x: refused with a message by pyfff.FFF
        # The thread count only matters past one tile per thread; an explicit
        # value is still validated every time (n_threads=0 is an error).
        if type(n_threads) is int and 0 < n_threads <= _MAX_N_THREADS:
            nt = n_threads
        elif n_threads is not None or n >= self.serial_below:
            nt = self._n_threads_fn(n_threads)
        if out is None:
            dims[0] = n
            dims[1] = self.d_out
            y = cnp.PyArray_EMPTY(2, dims, self.typenum, 0)
        if n > 0:
            self._call(cnp.PyArray_DATA(xa), n, cnp.PyArray_DATA(y), NULL, nt, _DEFAULT_TILE)
        return y

    def fill(self, cnp.ndarray x,   # IN  (n_samples, d_in), C-contiguous, layer dtype
             object y,              # OUT (n_samples, d_out) or None
             object routes,         # OUT (n_samples, n_trees, depth + 1) int64, or None
             int n_threads, Py_ssize_t tile=DEFAULT_TILE):
        """Fill ``y`` and/or ``routes`` for a prepared batch ``x``.

        The batch is cut into tiles of at most ``tile`` tokens (fewer when
        that leaves a thread idle); tiles go to ``n_threads`` OpenMP threads
        with a static schedule, since every token costs the same.
        """
        if n_threads < 1 or tile < 1:
            raise ValueError("internal error: n_threads and tile must be >= 1")
        if cnp.PyArray_NDIM(x) != 2 or cnp.PyArray_DIM(x, 1) != self.d_in:
            raise ValueError(f"internal error: x must have shape (n, {self.d_in})")
        cdef Py_ssize_t n = cnp.PyArray_DIM(x, 0)
        cdef const void *x_ptr = _data(x, self.typenum, n * self.d_in, "x")
        cdef void *y_ptr = NULL
        cdef int64_t *r_ptr = NULL
        if y is not None:
            y_ptr = _data(y, self.typenum, n * self.d_out, "y")
        if routes is not None:
            r_ptr = <int64_t *>_data(routes, cnp.NPY_INT64, n * self.n_trees * (self.depth + 1), "routes")
        if n > 0:
            self._call(x_ptr, n, y_ptr, r_ptr, n_threads, tile)


def fff_forward(cnp.ndarray x, cnp.ndarray w_in, object b_in, cnp.ndarray w_out, int depth, int n_trees,
                int act, object y, object routes, int n_threads, Py_ssize_t tile=DEFAULT_TILE):
    """One-shot ``BoundLayer(w_in, b_in, w_out, depth, n_trees, act).fill(x, y, routes, n_threads, tile)``."""
    BoundLayer(w_in, b_in, w_out, depth, n_trees, act).fill(x, y, routes, n_threads, tile)

"""Compiled FFF kernels (private). Validation lives in pyfff/fff.py.

The entry points take C-contiguous typed memoryviews, preallocated outputs
and an explicit thread count, and do no validation: pyfff.FFF checks dtypes,
shapes and depth before it calls them. The GIL is released for the whole
kernel. The C kernels are in src/fff_kernels.h (one tile of tokens per call);
this module splits the batch into tiles and hands them to OpenMP threads.

Guarantee: every output row is written by exactly one thread and its value
does not depend on which tokens share its tile, so results are bitwise
identical for every ``n_threads``.
"""
from cython.parallel cimport parallel, prange
from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc

cdef extern from "fff_cpu.h" nogil:
    const char *fff_simd_variant()
    size_t fff_scratch_bytes_f32(Py_ssize_t n_tile, int depth, int n_trees)
    size_t fff_scratch_bytes_f64(Py_ssize_t n_tile, int depth, int n_trees)
    void fff_forward_tile_f32(const float *x, Py_ssize_t ldx, const float *w_in, Py_ssize_t ldw_in,
                              const float *b_in, const float *w_out, Py_ssize_t ldw_out, Py_ssize_t n_tile,
                              Py_ssize_t d_in, Py_ssize_t d_out, int depth, int n_trees, int act, float *y,
                              Py_ssize_t ldy, int64_t *routes, void *scratch)
    void fff_forward_tile_f64(const double *x, Py_ssize_t ldx, const double *w_in, Py_ssize_t ldw_in,
                              const double *b_in, const double *w_out, Py_ssize_t ldw_out, Py_ssize_t n_tile,
                              Py_ssize_t d_in, Py_ssize_t d_out, int depth, int n_trees, int act, double *y,
                              Py_ssize_t ldy, int64_t *routes, void *scratch)

ctypedef fused floating:
    float
    double

# Activation codes of src/fff_kernels.h.
ACTIVATION_CODES = {"gelu": 0, "gelu_tanh": 1, "relu": 2}

# Tokens per tile: big enough that tokens share the deep subtrees' weight rows
# (docs/performance.md), small enough that a tile's inputs stay in L2/L3.
DEFAULT_TILE = 512


def simd_variant():
    """Name of the SIMD code path the kernels run on this CPU."""
    return fff_simd_variant().decode()


cdef inline size_t _scratch_bytes(floating *dummy, Py_ssize_t n_tile, int depth, int n_trees) noexcept nogil:
    if floating is float:
        return fff_scratch_bytes_f32(n_tile, depth, n_trees)
    else:
        return fff_scratch_bytes_f64(n_tile, depth, n_trees)


cdef inline void _tile(const floating[:, ::1] x, const floating[:, ::1] w_in, const floating *b_in,
                       const floating[:, ::1] w_out, Py_ssize_t start, Py_ssize_t stop, int depth,
                       int n_trees, int act, floating *y, Py_ssize_t ldy, int64_t *routes,
                       void *scratch) noexcept nogil:
    cdef floating *y_tile = NULL
    cdef int64_t *r_tile = NULL
    if y != NULL:
        y_tile = y + start * ldy
    if routes != NULL:
        r_tile = routes + start * n_trees * (depth + 1)
    if floating is float:
        fff_forward_tile_f32(&x[start, 0], x.shape[1], &w_in[0, 0], w_in.shape[1], b_in, &w_out[0, 0],
                             w_out.shape[1], stop - start, x.shape[1], w_out.shape[1], depth, n_trees, act,
                             y_tile, ldy, r_tile, scratch)
    else:
        fff_forward_tile_f64(&x[start, 0], x.shape[1], &w_in[0, 0], w_in.shape[1], b_in, &w_out[0, 0],
                             w_out.shape[1], stop - start, x.shape[1], w_out.shape[1], depth, n_trees, act,
                             y_tile, ldy, r_tile, scratch)


def fff_forward(const floating[:, ::1] x,       # IN  (n_samples, d_in)
                const floating[:, ::1] w_in,    # IN  (n_trees * n_nodes, d_in)
                const floating[::1] b_in,       # IN  (n_trees * n_nodes,) or None
                const floating[:, ::1] w_out,   # IN  (n_trees * n_nodes, d_out)
                int depth, int n_trees, int act,
                floating[:, ::1] y,             # OUT (n_samples, d_out) or None
                int64_t[:, :, ::1] routes,      # OUT (n_samples, n_trees, depth + 1) or None
                int n_threads, Py_ssize_t tile=DEFAULT_TILE):
    """FFF forward pass of a batch: fills ``y`` and/or ``routes``.

    The batch is cut into tiles of at most ``tile`` tokens (fewer when that
    leaves a thread idle); tiles go to ``n_threads`` OpenMP threads with a
    static schedule, since every token costs the same (depth x width).
    """
    cdef Py_ssize_t n = x.shape[0]
    cdef Py_ssize_t n_tiles, t_size, i, start, stop
    cdef const floating *b_ptr = NULL
    cdef floating *y_ptr = NULL
    cdef int64_t *r_ptr = NULL
    cdef Py_ssize_t ldy = 0
    cdef size_t n_bytes
    cdef void *scratch = NULL
    if n == 0:
        return
    if b_in is not None:
        b_ptr = &b_in[0]
    if y is not None:
        y_ptr = &y[0, 0]
        ldy = y.shape[1]
    if routes is not None:
        r_ptr = &routes[0, 0, 0]
    if tile < 1:
        tile = 1
    # Tiles: at least one per thread, at most `tile` tokens each.
    if n_threads < 1:
        n_threads = 1
    t_size = min(tile, (n + n_threads - 1) // n_threads)
    n_tiles = (n + t_size - 1) // t_size
    if n_threads > n_tiles:
        n_threads = <int>n_tiles
    n_bytes = _scratch_bytes(<floating *>NULL, t_size, depth, n_trees)

    # Failure is reported through a pointer: a plain variable assigned inside
    # a parallel block is thread-private. Every thread enters the prange (an
    # OpenMP worksharing loop must be met by all threads or none); a thread
    # without scratch just marks its tiles as failed.
    cdef int failed_flag = 0
    cdef int *failed = &failed_flag
    if n_threads == 1:
        with nogil:
            scratch = malloc(n_bytes)
            if scratch == NULL:
                failed[0] = 1
            else:
                for i in range(n_tiles):
                    start = i * t_size
                    stop = min(start + t_size, n)
                    _tile(x, w_in, b_ptr, w_out, start, stop, depth, n_trees, act, y_ptr, ldy, r_ptr, scratch)
                free(scratch)
    else:
        with nogil, parallel(num_threads=n_threads):
            scratch = malloc(n_bytes)   # thread-local: assigned inside the parallel block
            for i in prange(n_tiles, schedule="static"):
                if scratch == NULL:
                    failed[0] = 1
                else:
                    start = i * t_size
                    stop = min(start + t_size, n)
                    _tile(x, w_in, b_ptr, w_out, start, stop, depth, n_trees, act, y_ptr, ldy, r_ptr, scratch)
            free(scratch)
    if failed_flag:
        raise MemoryError(f"could not allocate {n_bytes} bytes of FFF scratch per thread")

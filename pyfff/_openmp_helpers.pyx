"""OpenMP helpers: is parallelism compiled in, and how many threads to use.

``n_threads`` follows scikit-learn's convention:

* ``None``: all usable cores, i.e. ``omp_get_max_threads()`` (which honours
  ``OMP_NUM_THREADS`` and ``threadpoolctl.threadpool_limits(..., "openmp")``),
  capped by the number of CPUs this process may run on;
* a positive int: that many threads;
* a negative int: counts back from all CPUs (-1 = all, -2 = all but one);
* 0: an error.

Without OpenMP the answer is always 1.
"""
import os

from cython.parallel cimport prange

from ._openmp_helpers cimport omp_get_max_threads, omp_get_num_threads, PYFFF_OPENMP_PARALLELISM_ENABLED


def _openmp_parallelism_enabled():
    """True when pyfff was built with OpenMP."""
    return bool(PYFFF_OPENMP_PARALLELISM_ENABLED)


def _cpu_count():
    """CPUs this process may run on (affinity-aware where the OS says)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# Read once at import: the affinity mask is a syscall (~0.5 us), far too slow
# for a per-call check on the batch-1 path.
cdef int _N_CPUS = _cpu_count()


cpdef int _openmp_effective_n_threads(n_threads=None) except -1:
    """Number of threads a parallel kernel should use; see the module doc."""
    cdef long n
    if n_threads is None:
        if not PYFFF_OPENMP_PARALLELISM_ENABLED:
            return 1
        return max(1, min(omp_get_max_threads(), _N_CPUS))
    if isinstance(n_threads, bool) or not hasattr(n_threads, "__index__"):
        raise TypeError(f"n_threads must be an int or None, got {type(n_threads).__name__}")
    n = n_threads.__index__()
    if n == 0:
        raise ValueError("n_threads=0 is invalid: use None for all cores, a positive count, or -1 for all CPUs")
    if not PYFFF_OPENMP_PARALLELISM_ENABLED:
        return 1
    if n < 0:
        return <int>max(1, _N_CPUS + 1 + n)
    return <int>min(n, 1 << 16)


def _observed_n_threads(int n_threads):
    """Threads OpenMP really starts in a prange of ``n_threads`` (for tests)."""
    cdef int i, seen = 0
    for i in prange(n_threads, num_threads=n_threads, schedule="static", nogil=True):
        seen = omp_get_num_threads()
    return seen

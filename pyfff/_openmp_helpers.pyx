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


def _openmp_effective_n_threads(n_threads=None):
    """Number of threads a parallel kernel should use; see the module doc."""
    if n_threads is not None and (isinstance(n_threads, bool) or not isinstance(n_threads, (int,)) and
                                  not hasattr(n_threads, "__index__")):
        raise TypeError(f"n_threads must be an int or None, got {type(n_threads).__name__}")
    if n_threads is not None:
        n_threads = int(n_threads)
    if n_threads == 0:
        raise ValueError("n_threads=0 is invalid: use None for all cores, a positive count, or -1 for all CPUs")
    if not PYFFF_OPENMP_PARALLELISM_ENABLED:
        return 1
    if n_threads is None:
        return max(1, min(omp_get_max_threads(), _cpu_count()))
    if n_threads < 0:
        return max(1, _cpu_count() + 1 + n_threads)
    return n_threads


def _observed_n_threads(int n_threads):
    """Threads OpenMP really starts in a prange of ``n_threads`` (for tests)."""
    cdef int i, seen = 0
    for i in prange(n_threads, num_threads=n_threads, schedule="static", nogil=True):
        seen = omp_get_num_threads()
    return seen

"""OpenMP helpers: is parallelism compiled in, and how many threads to use.

``n_threads`` follows scikit-learn's convention:

* ``None``: all usable cores, i.e. ``omp_get_max_threads()`` (which honours
  ``OMP_NUM_THREADS`` and ``threadpoolctl.threadpool_limits(..., "openmp")``),
  capped by the number of CPUs this process may run on;
* a positive int: that many threads;
* a negative int: counts back from all CPUs (-1 = all, -2 = all but one);
* 0: an error;
* at most ``MAX_N_THREADS`` (8 per CPU, at least 256) threads start: larger counts are capped there (asking libgomp
  for tens of thousands of threads ends the process where the OS refuses them).

Without OpenMP the answer is always 1.

Fork safety: libgomp's thread pool does not survive ``fork()``; a child that starts a parallel region after its
parent used one waits forever. ``_thread_guard`` (called by every kernel about to use more than one thread) notes
that threads were used; in a child forked after that, it returns 1, and pyfff runs single-threaded there (warning
once). ``multiprocessing``'s default start method on Linux is fork.
"""
import os
import warnings

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
MAX_N_THREADS = max(256, 8 * _N_CPUS)

_threads_used = False       # this process has run a parallel region with more than one thread
_forked_after_threads = False
_warned_after_fork = False


def _after_fork_in_child():
    global _forked_after_threads, _warned_after_fork
    _forked_after_threads = _forked_after_threads or _threads_used
    _warned_after_fork = False                 # each forked process warns once


os.register_at_fork(after_in_child=_after_fork_in_child)


def _thread_guard(int n_threads):
    """The thread count a kernel may start now: ``n_threads``, or 1 in a child forked after threads were used."""
    global _threads_used, _warned_after_fork
    if n_threads <= 1:
        return n_threads
    if _forked_after_threads:
        if not _warned_after_fork:
            _warned_after_fork = True
            warnings.warn("pyfff: this process was forked after OpenMP threads were used, and OpenMP (libgomp) "
                          "cannot start threads again after fork: pyfff runs single-threaded here (use the "
                          "'spawn' or 'forkserver' start method of multiprocessing for threads in children)",
                          RuntimeWarning, stacklevel=3)
        return 1
    _threads_used = True
    return n_threads


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
    return <int>min(n, MAX_N_THREADS)


def _observed_n_threads(int n_threads):
    """Threads OpenMP really starts in a prange of ``n_threads`` (for tests)."""
    cdef int i, seen = 0
    for i in prange(n_threads, num_threads=n_threads, schedule="static", nogil=True):
        seen = omp_get_num_threads()
    return seen

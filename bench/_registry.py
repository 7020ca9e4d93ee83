"""Implementation names -> callables, for the pytest-benchmark suite in bench/.

``REGISTRY[name](work, n_threads)`` returns a :class:`pyfff.benchmark.Prepared`
(the timed call ``run()``, its thread limits, FLOPs/bytes and the correctness
check) for a :class:`pyfff.benchmark.Workload`; it raises
``pyfff.benchmark.Unavailable`` when the implementation cannot run there.
``thread_counts(name)`` lists the thread counts an implementation is run at:
the FFF kernel and every dense baseline are measured on the same counts, so a
speed-up always compares equal numbers of threads.

The logic lives in ``pyfff.benchmark`` (shared with ``pyfff bench``); this
module only names the variants.
"""
from __future__ import annotations

from pyfff import benchmark as B

__all__ = ["REGISTRY", "thread_counts"]

_ALL = "all"  # every usable core: pyfff's n_threads=None, resolved when the case runs


def _impl(base, threads=None):
    """A registry entry running ``pyfff.benchmark.prepare(base, ...)`` on fixed or given threads."""

    def make(work, n_threads=None):
        if threads == _ALL:
            n_threads = B.all_threads()
        elif threads is not None:
            n_threads = threads
        return B.prepare(base, work, n_threads)

    make.fixed_threads = threads
    make.base = base
    return make


REGISTRY = {
    # the ground truth; single-threaded and only up to batch 2048 (it is slow)
    "numpy_ref": _impl("numpy_ref", 1),
    # the FFF kernel on one thread, on every usable core, or on a given count (thread sweep)
    "pyfff_1t": _impl("pyfff", 1),
    "pyfff_nt": _impl("pyfff", _ALL),
    "pyfff": _impl("pyfff"),
    # dense feedforward on NumPy's BLAS, x @ W1.T then @ W2: two sgemm calls timed ...
    "dense_4095": _impl(f"dense_{4095}"),  # ... with the neuron count of a depth-11 tree
    "dense_3072": _impl(f"dense_{B.BERT_BASE_NEURONS}"),  # ... BERT-base's feedforward
    "dense_tree": _impl("dense"),  # ... with the tree's neuron count, 2**(depth+1)-1 (depth sweep)
    # the same with the exact (erf) GELU between the products also timed (needs SciPy)
    "dense_4095_gelu": _impl("dense_4095_gelu"),
    "dense_3072_gelu": _impl(f"dense_{B.BERT_BASE_NEURONS}_gelu"),
}


def thread_counts(name):
    """Thread counts ``name`` is benchmarked at: its fixed count, else 1 and all usable cores."""
    fixed = REGISTRY[name].fixed_threads
    if fixed == _ALL:
        return [B.all_threads()]
    if fixed is not None:
        return [fixed]
    return sorted({1, B.all_threads()})

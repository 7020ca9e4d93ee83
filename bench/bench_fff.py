"""FFF kernel against dense feedforward layers, with pytest-benchmark.

Run from the repository root: ``pytest bench/bench_fff.py --benchmark-only``
(add ``--benchmark-json out.json`` to keep the numbers and machine info).
Each case records in ``extra_info``: kernel, n_threads, dtype, whether the
output matched the reference (``correct``), time per token, GFLOP/s and GB/s
worked out by hand, and the speed-up over the dense feedforward of the same
neuron count on the same threads, measured in the same run. Groups are shapes.

Cases:

* ``test_fff_vs_dense``: width 768, depth 11 (4095 neurons), batch 1 to 16384;
  the FFF kernel on 1 and all threads, the reference, and the dense
  baselines with 4095 and 3072 (BERT-base) neurons, with and without GELU.
* ``test_depth_sweep``: depth 1 to 14 at batch 2048; FFF time should grow with
  depth, the dense baseline's with 2**depth.
* ``test_thread_sweep``: the FFF kernel on every thread count between 1 and all
  (1 and all are in ``test_fff_vs_dense``).
"""
from __future__ import annotations

import pytest
from _registry import thread_counts

from pyfff.benchmark import Shape, all_threads

BATCHES = [1, 16, 128, 2048, 16384]
DEPTHS = list(range(1, 15))
SWEEP_BATCH = 2048
MAIN_DEPTH = 11

# dense first, so the baseline of each shape is timed by its own case before the FFF cases need it
MAIN_IMPLS = ["dense_4095", "dense_4095_gelu", "dense_3072", "dense_3072_gelu", "numpy_ref", "pyfff_1t", "pyfff_nt"]
SWEEP_IMPLS = ["dense_tree", "pyfff_1t", "pyfff_nt"]


def _with_threads(impls):
    return [pytest.param(name, n, id=f"{name}-{n}t") for name in impls for n in thread_counts(name)]


@pytest.mark.parametrize("impl,n_threads", _with_threads(MAIN_IMPLS))
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
def test_fff_vs_dense(bench_case, impl, n_threads, batch):
    bench_case(impl, Shape(batch=batch, depth=MAIN_DEPTH), n_threads)


@pytest.mark.parametrize("impl,n_threads", _with_threads(SWEEP_IMPLS))
@pytest.mark.parametrize("depth", [d for d in DEPTHS if d != MAIN_DEPTH], ids=lambda d: f"d{d}")
def test_depth_sweep(bench_case, impl, n_threads, depth):
    # depth 11 at batch 2048 is measured by test_fff_vs_dense (same shape, same group)
    bench_case(impl, Shape(batch=SWEEP_BATCH, depth=depth), n_threads)


@pytest.mark.parametrize("n_threads", [n for n in range(2, all_threads())], ids=lambda n: f"{n}t")
@pytest.mark.parametrize("batch", [2048, 16384], ids=lambda b: f"b{b}")
def test_thread_sweep(bench_case, n_threads, batch):
    bench_case("pyfff", Shape(batch=batch, depth=MAIN_DEPTH), n_threads)

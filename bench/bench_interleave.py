"""pytest-benchmark: an FFF call right after a NumPy matmul, against the same call alone (bench/interleave.py).

``pytest bench/bench_interleave.py --benchmark-only``: each round first runs ``x @ W`` (untimed, pytest-benchmark's
``setup``), then times ``layer(x)``; ``extra_info`` records the median time of the call alone, measured just before,
and the ratio. Width 768, depth 11, default thread counts.
"""
from __future__ import annotations

import numpy as np
import pytest
from interleave import _median_time

from pyfff import FFF


@pytest.mark.parametrize("batch", [1, 64, 2048], ids=lambda b: f"b{b:05d}")
def test_fff_after_matmul(benchmark, batch):
    rng = np.random.default_rng(0)
    layer = FFF.random(768, 768, depth=11, seed=0)
    w = rng.standard_normal((768, 768)).astype(np.float32)
    x = rng.standard_normal((batch, 768)).astype(np.float32)
    ref = layer(x, n_threads=1)
    benchmark.group = f"FFF after a matmul, batch {batch:05d}"
    def matmul():                                                 # pedantic's setup must return None
        np.matmul(x, w)

    y = benchmark.pedantic(lambda: layer(x), setup=matmul, rounds=1 if benchmark.disabled else 30)
    assert np.array_equal(y, ref)                                 # bitwise, whatever the threads did
    if not benchmark.disabled:
        alone = _median_time(lambda: layer(x), 30)
        benchmark.extra_info.update(batch=batch, alone_s=alone, ratio_to_alone=benchmark.stats.stats.median / alone,
                                    correct=True)

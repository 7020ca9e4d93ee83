"""int8 dense layers (every code path this CPU runs) against float32 BLAS sgemm, with pytest-benchmark.

Run from the repository root: ``pytest bench/bench_qgemm.py --benchmark-only``. One thread (BLAS limited to
one thread; the int8 kernels never start threads). Shapes are the dense projections of the encoders
(fused QKV 768 -> 2304, attention output 768 -> 768, BERT-base feed-forward 768 -> 3072 and 3072 -> 768) at
1, 32, 128 and 1024 tokens. Each case records in ``extra_info``: the path, GMAC/s, ``correct`` (the output
against the NumPy reference ``pyfff.quantize.qlinear_reference``, same tolerance as the tests), and for the
int8 cases the speed-up over the sgemm case of the same shape measured earlier in the same run.
"""
from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from pyfff.quantize import QuantizedLinear, int8_paths, qlinear_reference

SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]   # (K, N)
ROWS = [1, 32, 128, 1024]
_SGEMM = {}                                                    # (M, K, N) -> median seconds, this run


def _inputs(M, K, N):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((M, K)).astype(np.float32),
            (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32),
            rng.standard_normal(N).astype(np.float32))


def _group(M, K, N):
    return f"M{M:05d} {K}x{N}"       # zero-padded so that groups sort by size


@pytest.mark.parametrize("impl", ["sgemm"] + int8_paths())
@pytest.mark.parametrize("K,N", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("M", ROWS, ids=lambda m: f"M{m}")
def test_qgemm(benchmark, impl, M, K, N):
    x, w, b = _inputs(M, K, N)
    out = np.empty((M, N), np.float32)
    benchmark.group = _group(M, K, N)
    with threadpool_limits(1, "blas"):
        if impl == "sgemm":
            def run():
                np.matmul(x, w, out=out)
                np.add(out, b, out=out)
            correct = True
        else:
            layer = QuantizedLinear.from_float(w, b, path=impl)
            run = lambda: layer(x, out=out)                                    # noqa: E731
            run()
            q, scale = layer.weight_int8()
            ref = qlinear_reference(x[:8], q, scale, b)
            correct = bool(np.allclose(out[:8], ref, rtol=2e-6, atol=2e-6 * max(1.0, np.abs(ref).max())))
        benchmark.pedantic(run, rounds=5 + int(2e8 / (M * K * N)), warmup_rounds=1)
    assert correct
    if benchmark.disabled:                                      # CI smoke run: one call, correctness only
        return
    median = benchmark.stats.stats.median
    info = dict(path=impl, n_threads=1, correct=correct, gmac_per_s=M * K * N / median / 1e9)
    if impl == "sgemm":
        _SGEMM[(M, K, N)] = median
    elif (M, K, N) in _SGEMM:
        info["speedup_vs_sgemm"] = _SGEMM[(M, K, N)] / median
    benchmark.extra_info.update(info)

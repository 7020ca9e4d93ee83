"""Drive every pyfff.gpu kernel variant on awkward sizes, for compute-sanitizer.

Run: compute-sanitizer --tool memcheck --error-exitcode 3 python bench/dev/gpu_sanitize.py
(and --tool racecheck for the shared memory of fff_bucket_scatter and the staged kernels). Batches that are not
multiples of a block or of the scatter tile, widths that force the scalar-load path, depth 0,
depth 13 (4096 buckets), several trees, both dtypes, every schedule and both block sizes: any out-of-bounds
access or race shows up as a sanitizer error. Results are checked for finiteness only; the
reference comparison is tests/test_gpu.py's job.
"""
from __future__ import annotations

import cupy as cp
import numpy as np

import pyfff
import pyfff.gpu

CASES = [
    # (batch, d_in, d_out, depth, n_trees, dtype)
    (1, 3, 5, 0, 1, np.float32),
    (7, 17, 768, 3, 2, np.float32),
    (97, 768, 64, 6, 1, np.float32),
    (2049, 1100, 6, 5, 3, np.float64),
    (3001, 8, 16, 13, 1, np.float32),
    (1025, 64, 48, 7, 2, np.float64),
    (257, 20, 36, 12, 3, np.float32),  # 39 terms per token: fff_output's second batch of terms
    (4000, 768, 768, 11, 1, np.float32),  # the benchmark shape: staged subtrees of 63 rows, two column slices
]
# (splits, sort_output, smem): "mid" = one split at half the depth, "staged" = the staged schedule's splits,
# "8" = one split at level 8 (at width 768: a first stage that stages six levels and walks two through L1/L2)
SCHEDULES = [((), False, False), ((), True, False), ("mid", True, False), ("mid", False, False),
             ("staged", False, True), ("mid", False, True), ((), False, True), ("mid", True, True),
             ("staged", False, "all"), ("mid", True, "all"), ("8", False, True)]
VARIANTS = [{"route_block": 256, "out_block": 768, "out_tpw": 1, "out_sj": 6},  # threads per block, tokens per warp
            {"route_block": 512, "out_block": 256, "out_tpw": 4, "out_sj": 3, "fused": True},  # route forms y
            {"fused": False}]


def main():
    n_runs = 0
    for batch, d_in, d_out, depth, n_trees, dtype in CASES:
        cpu = pyfff.FFF.random(d_in, d_out, depth, n_trees=n_trees, dtype=dtype, seed=batch)
        gpu = pyfff.gpu.FFF.from_cpu(cpu)
        x = cp.asarray(np.random.default_rng(batch).standard_normal((batch, d_in)).astype(dtype))
        for (splits, sort_output, smem), variant in ((s, v) for s in SCHEDULES for v in VARIANTS):
            if splits == "mid":
                splits = (min(max(depth // 2, 1), 12),) if depth >= 1 else ()
            elif splits == "8":
                splits = (min(depth, 8),) if depth >= 1 else ()
            y, (nodes, _) = gpu._run(x, want_output=True, splits=splits, sort_output=sort_output, smem=smem,
                                     variant=variant)
            assert bool(cp.isfinite(y).all()), (batch, d_in, d_out, depth, splits)
            assert int(nodes.min()) >= 0 and int(nodes.max()) < gpu.n_nodes
            n_runs += 1
    cp.cuda.Device().synchronize()
    print(f"gpu_sanitize: {n_runs} pipeline runs finished")


if __name__ == "__main__":
    main()

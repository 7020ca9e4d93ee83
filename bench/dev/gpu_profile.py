"""One forward pass per schedule at the benchmark shape, for Nsight Compute's per-kernel counters.

Run: ncu --clock-control none -k regex:fff --metrics gpu__time_duration.sum,dram__bytes_read.sum,\
dram__bytes_write.sum,lts__t_sector_hit_rate.pct,l1tex__t_sector_hit_rate.pct python bench/dev/gpu_profile.py

Width 768, depth 11, float32, batch 16384 (override with the first argument). Each schedule runs
twice (the first run also compiles; filter with ncu's --launch-skip if needed); ncu's per-kernel rows show
where the time of a pass goes: the two fff_route_staged stages, the fff_bucket_scatter sort and
fff_output_staged (and the unstaged fff_route and fff_output), next to the warp-per-token baseline of
bench/dev/gpu_warp_baseline.cu. PYFFF_DEV_RUNS=1: one run per schedule.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import cupy as cp
import numpy as np

import pyfff
import pyfff.gpu

RUNS = int(os.environ.get("PYFFF_DEV_RUNS", "2"))  # runs per schedule (1: each kernel profiled once)
SCHEDULES = {  # keyword arguments of pyfff.gpu.FFF._run
    "staged": {"splits": "staged", "sort_output": False, "smem": True},
    "staged,fused": {"splits": "staged", "sort_output": False, "smem": True, "variant": {"fused": True}},
    "direct": {"splits": (), "sort_output": False, "smem": False},
}


def main(batch=16384):
    sys.path.insert(0, str(Path(__file__).parent))
    from gpu_baseline import warp_baseline

    layer = pyfff.gpu.FFF.from_cpu(pyfff.FFF.random(768, 768, 11, seed=0))
    x = cp.asarray(np.random.default_rng(0).standard_normal((batch, 768), dtype=np.float32))
    for name, kwargs in SCHEDULES.items():
        for _ in range(RUNS):
            layer._run(x, want_output=True, **kwargs)
        cp.cuda.Device().synchronize()
        print(f"ran {name}", flush=True)
    for _ in range(RUNS):
        warp_baseline(layer, x)
    cp.cuda.Device().synchronize()
    print("ran warp baseline", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 16384)

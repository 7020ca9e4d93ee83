"""Per-kernel GPU time of pyfff.gpu's pipeline at the benchmark shape, with CUDA events around each launch.

Run (repository root, GPU machine): PYTHONPATH=$PWD python bench/dev/gpu_stage_times.py [batch ...]

For each schedule, builds the launch plan with one call, then enqueues its launches one at a time with a
CUDA event between consecutive launches, `REPEATS` times, and prints the best time of each launch (kernel
name, grid, block, dynamic shared memory). Launches run back to back on one stream as in a real call, so
the figures add up to about the pipeline's time; without Nsight's overhead, but also without its counters.
"""
from __future__ import annotations

import sys

import cupy as cp
import numpy as np

import pyfff
import pyfff.gpu
from pyfff.gpu import _fff

REPEATS = 30
SCHEDULES = {  # keyword arguments of pyfff.gpu.FFF._run
    "staged": {"splits": "staged", "sort_output": False, "smem": True},
    "staged,1-token-warps": {"splits": "staged", "sort_output": False, "smem": True, "variant": {"out_tpw": 1}},
    "direct": {"splits": (), "sort_output": False, "smem": False},
}


def stage_times(layer, x, kwargs):
    y, _ = layer._run(x, want_output=True, **kwargs)
    plan = next(reversed(layer._plans.values()))  # the plan that call used (most recent)
    stream = cp.cuda.get_current_stream()
    events = [cp.cuda.Event() for _ in range(len(plan.launches) + 1)]
    best = [float("inf")] * len(plan.launches)
    for _ in range(REPEATS):
        plan.run(x, y, stream.ptr)  # sets the pointers; also a warm-up
        if plan.work is not None:
            plan.work.data.memset_async(0, plan.work.nbytes)
        events[0].record(stream)
        for i, launch in enumerate(plan.launches):
            _fff._launch(launch, stream.ptr)
            events[i + 1].record(stream)
        events[-1].synchronize()
        for i in range(len(plan.launches)):
            best[i] = min(best[i], cp.cuda.get_elapsed_time(events[i], events[i + 1]) * 1e3)
    return [(launch.kernel.name if hasattr(launch.kernel, "name") else "?", launch.grid, launch.grid_y,
             launch.block, launch.smem, t) for launch, t in zip(plan.launches, best)]


def use_full_warp_route():
    """PYFFF_DEV_ROUTE_LANES=32: compile the route kernels with one token per warp (an experiment; the results
    differ in the last bits from the default's half-warp sums)."""
    from pyfff.gpu import _loader

    _loader._OPTIONS = _loader._OPTIONS + ("-DPYFFF_ROUTE_LANES=32", "-DPYFFF_ROUTE_MAX_BLOCK=1024")
    _fff._STAGED_ROUTE_BLOCK = 1024
    _fff._ROUTE_TOKENS_PER_WARP = 1


def main(batches):
    layer = pyfff.gpu.FFF.from_cpu(pyfff.FFF.random(768, 768, 11, seed=0))
    for batch in batches:
        x = cp.asarray(np.random.default_rng(batch).standard_normal((batch, 768), dtype=np.float32))
        for name, kwargs in SCHEDULES.items():
            rows = stage_times(layer, x, kwargs)
            print(f"batch {batch} {name}: total {sum(r[-1] for r in rows):.1f} us")
            for kname, grid, grid_y, block, smem, t in rows:
                print(f"    {t:8.1f} us  {kname:40s} grid {grid}x{grid_y} block {block} smem {smem}")
            sys.stdout.flush()


if __name__ == "__main__":
    import os

    if os.environ.get("PYFFF_DEV_ROUTE_LANES") == "32":
        use_full_warp_route()
    main([int(a) for a in sys.argv[1:]] or [2048, 16384])

"""Per-kernel GPU time of pyfff.gpu's pipeline at the benchmark shape, with CUDA events around each launch.

Run (repository root, GPU machine): PYTHONPATH=$PWD python bench/dev/gpu_stage_times.py [batch ...]
Environment: PYFFF_DEV_KEEP_X=0 streams x in every route stage; PYFFF_DEV_ROUTE=lanes,block (below);
PYFFF_DEV_NVRTC: extra NVRTC options (A/B of compile-time switches, e.g. -DPYFFF_ROUTE_MAX_BLOCK=256).

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
SCHEDULES = {  # keyword arguments of pyfff.gpu.FFF._run ("fused": the last route stage forms y)
    "staged": {"splits": "staged", "sort_output": False, "smem": True},
    "staged,fused": {"splits": "staged", "sort_output": False, "smem": True, "variant": {"fused": True}},
    "split 8 (levels 0-5 staged, 6-7 through L1/L2)": {"splits": (8,), "sort_output": False, "smem": True},
    "split 8,fused": {"splits": (8,), "sort_output": False, "smem": True, "variant": {"fused": True}},
    "staged,leaf-output": {"splits": "staged", "sort_output": True, "smem": True},
    "staged,all-stages-staged": {"splits": "staged", "sort_output": False, "smem": "all"},
    "direct (fused)": {"splits": (), "sort_output": False, "smem": False},
    "direct,output-kernel": {"splits": (), "sort_output": False, "smem": False, "variant": {"fused": False}},
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
    return [(launch.name, launch.grid, launch.grid_y,
             launch.block, launch.smem, t) for launch, t in zip(plan.launches, best)]


def route_variant(lanes=16, block=512):
    """Compile the route kernels with `lanes` lanes per token and `block`-thread staged blocks (an experiment:
    PYFFF_DEV_ROUTE=lanes,block, e.g. 32,1024; 32 lanes change the last bits of the sums)."""
    from pyfff.gpu import _loader

    _loader._OPTIONS = _loader._OPTIONS + (f"-DPYFFF_ROUTE_LANES={lanes}", f"-DPYFFF_STAGED_ROUTE_BLOCK={block}")
    _fff._STAGED_ROUTE_BLOCK = block
    _fff._ROUTE_TOKENS_PER_WARP = 32 // lanes


def check(layer, cpu, x):
    """Route agreement and output error of the default staged schedule against the CPU layer."""
    y, (nodes, _) = layer._run(x, want_output=True, splits="staged", smem=True)
    xh = cp.asnumpy(x)
    same = float(np.mean((cp.asnumpy(nodes) == cpu.routes(xh)).all(axis=(1, 2))))
    y_cpu = cpu(xh)
    err = float(np.abs(cp.asnumpy(y) - y_cpu).max() / np.abs(y_cpu).max())
    print(f"check: routes equal to the CPU layer's for {same:.4%} of tokens, max rel error {err:.2e}")


def main(batches):
    cpu = pyfff.FFF.random(768, 768, 11, seed=0)
    layer = pyfff.gpu.FFF.from_cpu(cpu)
    for batch in batches:
        x = cp.asarray(np.random.default_rng(batch).standard_normal((batch, 768), dtype=np.float32))
        check(layer, cpu, x)
        for name, kwargs in SCHEDULES.items():
            rows = stage_times(layer, x, kwargs)
            print(f"batch {batch} {name}: total {sum(r[-1] for r in rows):.1f} us")
            for kname, grid, grid_y, block, smem, t in rows:
                print(f"    {t:8.1f} us  {kname:40s} grid {grid}x{grid_y} block {block} smem {smem}")
            sys.stdout.flush()


if __name__ == "__main__":
    import os

    if os.environ.get("PYFFF_DEV_KEEP_X") == "0":  # every route stage streams x (evict-first)
        _fff._KEEP_X_IN_L2 = False
    if os.environ.get("PYFFF_DEV_NVRTC"):  # extra NVRTC options (-DNAME=VALUE ...)
        from pyfff.gpu import _loader

        _loader._OPTIONS = _loader._OPTIONS + tuple(os.environ["PYFFF_DEV_NVRTC"].split())
    if os.environ.get("PYFFF_DEV_ROUTE"):
        route_variant(*(int(v) for v in os.environ["PYFFF_DEV_ROUTE"].split(",")))
    main([int(a) for a in sys.argv[1:]] or [2048, 16384])

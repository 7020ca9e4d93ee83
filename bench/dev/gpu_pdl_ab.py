"""A/B of programmatic dependent launches: the default pass of pyfff.gpu with and without them.

Per-kernel timings (gpu_stage_times.py) put an event between launches, which serialises them, so this times
whole passes back to back between two events, alternating the two settings. Run (GPU machine):
PYTHONPATH=$PWD python bench/dev/gpu_pdl_ab.py [batch ...]
"""
from __future__ import annotations

import sys

import cupy as cp
import numpy as np
from gpu_timing import best_us

import pyfff
import pyfff.gpu
from pyfff.gpu import _fff

CALLS = 20  # passes per timed sample


def main(batches):
    layer = pyfff.gpu.FFF.from_cpu(pyfff.FFF.random(768, 768, 11, seed=0))
    for batch in batches:
        x = cp.asarray(np.random.default_rng(batch).standard_normal((batch, 768), dtype=np.float32))
        for kwargs in ({}, {"splits": "staged", "smem": True}):
            best = {}
            for _ in range(3):
                for pdl in (True, False):
                    _fff._PDL = pdl
                    layer._plans.clear()
                    y_ref = layer._run(x, want_output=True, **kwargs)[0].copy()

                    def passes(kw=kwargs):
                        for _ in range(CALLS):
                            layer._run(x, want_output=True, **kw)

                    t = best_us(passes, repeats=10) / CALLS
                    assert bool((layer._run(x, want_output=True, **kwargs)[0] == y_ref).all())
                    best[pdl] = min(best.get(pdl, float("inf")), t)
            name = kwargs.get("splits", "default")
            print(f"batch {batch} {name}: with PDL {best[True]:.1f} us, without {best[False]:.1f} us", flush=True)
    _fff._PDL = True


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [4096, 12288, 16384])

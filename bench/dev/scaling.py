"""Thread scaling of pyfff.FFF against the dense BLAS feedforward (bench/dev; used on the 16-core device CPU).

Usage: python bench/dev/scaling.py [--batch 2048 16384] [--threads 1 2 4 8 16]
Prints, per batch and thread count, FFF and dense time per token, the FFF speed-up
over one FFF thread, and the FFF speed-up over dense on the same number of threads.
"""
import argparse
import time

import numpy as np
from threadpoolctl import threadpool_limits

from pyfff import FFF

p = argparse.ArgumentParser()
p.add_argument("--batch", type=int, nargs="+", default=[2048, 16384])
p.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8, 16])
p.add_argument("--width", type=int, default=768)
p.add_argument("--depth", type=int, default=11)
p.add_argument("--repeat", type=int, default=5)
a = p.parse_args()

layer = FFF.random(a.width, a.width, a.depth, seed=0)
w1, w2 = np.ascontiguousarray(layer.w_in), np.ascontiguousarray(layer.w_out)
for batch in a.batch:
    x = np.random.default_rng(1).standard_normal((batch, a.width), dtype=np.float32)
    ref = layer(x, n_threads=1)
    base = None
    for nt in a.threads:
        with threadpool_limits(nt, "blas"):
            y = layer(x, n_threads=nt)
            same = bool(np.array_equal(y, ref))
            # FFF first, then dense, with a pause between: OpenBLAS worker threads
            # busy-wait after a GEMM (and libgomp's after a parallel region), so
            # interleaving the two oversubscribes the cores once threads > cores / 2.
            t_f = t_d = float("inf")
            for r in range(a.repeat):
                t0 = time.perf_counter()
                layer(x, n_threads=nt)
                t_f = min(t_f, time.perf_counter() - t0)
            time.sleep(0.5)
            for r in range(2):
                t0 = time.perf_counter()
                np.matmul(x @ w1.T, w2)
                t_d = min(t_d, time.perf_counter() - t0)
            time.sleep(0.5)
        base = base or t_f
        print(f"batch {batch:6d} threads {nt:3d}: fff {t_f / batch * 1e6:7.3f} us/token  dense {t_d / batch * 1e6:8.2f}"
              f" us/token  scaling {base / t_f:5.2f}x  vs dense {t_d / t_f:6.1f}x  bitwise-equal-to-1-thread {same}",
              flush=True)

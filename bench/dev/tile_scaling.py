"""Time per token of pyfff's CPU kernel for tile sizes x thread counts, on distinct tokens (bench/dev).

Usage: PYTHONPATH=<build dir> python bench/dev/tile_scaling.py [--batch 2048 16384]
           [--threads 1 2 4 8 16] [--tiles 2048 16384 (default: the driver's)] [--repeat 7]

Each call gets a fresh batch from a pool of about 256 MB (x comes from DRAM, as
in `pyfff bench`), writes into a preallocated output, and goes through
BoundLayer.fill with an explicit tile size; every configuration is checked
bitwise against one thread. Prints median and best us/token and the speed-up
over the best one-thread time of the same build and batch.
"""
import argparse
import time

import numpy as np

import pyfff
from pyfff import FFF

p = argparse.ArgumentParser()
p.add_argument("--batch", type=int, nargs="+", default=[2048, 16384])
p.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8, 16])
p.add_argument("--tiles", type=int, nargs="+", default=[pyfff._fff_cpu.DEFAULT_TILE])
p.add_argument("--repeat", type=int, default=7)
p.add_argument("--pool-mb", type=int, default=256)
a = p.parse_args()

print("build:", pyfff.__file__)
layer = FFF.random(768, 768, 11, seed=0)
bound = layer._bound
for batch in a.batch:
    n_pool = max(2, a.pool_mb * 2**20 // (batch * 768 * 4))
    rng = np.random.default_rng(1)
    pool = [rng.standard_normal((batch, 768), dtype=np.float32) for _ in range(n_pool)]
    y = np.empty((batch, 768), np.float32)
    ref = layer(pool[0], n_threads=1)
    one = None
    for tile in a.tiles:
        for nt in a.threads:
            bound.fill(pool[0], y, None, nt, tile)
            same = bool(np.array_equal(y, ref))
            ts = []
            for r in range(a.repeat):
                x = pool[(r + 1) % n_pool]
                t0 = time.perf_counter()
                bound.fill(x, y, None, nt, tile)
                ts.append(time.perf_counter() - t0)
            med, best = np.median(ts) / batch * 1e6, min(ts) / batch * 1e6
            if nt == 1:
                one = best if one is None else min(one, best)
            print(f"batch {batch:6d} tile {tile:6d} threads {nt:3d}: median {med:.3f} best {best:.3f} us/token "
                  f"speed-up {one / best:.2f}x (vs best 1-thread so far) bitwise={same}", flush=True)

"""Compare the two ways of using threads on one batch (bench/dev; run on the 16-core device CPU).

across: the batch is cut into one tile per thread (tile = batch / threads);
inside: one tile as large as the batch (up to 2048 tokens), all threads inside it.
Usage: PYTHONPATH=. python3 bench/dev/tile_modes.py [--batch 2048] [--threads 2 4 8 16]
"""
import argparse
import time

import numpy as np

from pyfff import FFF

p = argparse.ArgumentParser()
p.add_argument("--batch", type=int, nargs="+", default=[2048])
p.add_argument("--threads", type=int, nargs="+", default=[2, 4, 8, 16])
p.add_argument("--repeat", type=int, default=11)
a = p.parse_args()
layer = FFF.random(768, 768, 11)
for batch in a.batch:
    pool = np.random.default_rng(1).standard_normal((4 * batch, 768), dtype=np.float32)
    y = np.empty((batch, 768), np.float32)

    def t(nt, tile):
        ts = []
        for r in range(a.repeat):
            x = pool[(r % 4) * batch:(r % 4 + 1) * batch]
            t0 = time.perf_counter()
            layer._bound.fill(x, y, None, nt, tile)
            ts.append(time.perf_counter() - t0)
        return np.median(ts) / batch * 1e6

    one = t(1, min(batch, 2048))
    for nt in a.threads:
        across = t(nt, -(-batch // nt))
        inside = t(nt, min(batch, 2048))
        print(f"batch {batch} threads {nt:2d}: 1 thread {one:.3f} us  across {across:.3f} us ({one / across:.2f}x)"
              f"  inside {inside:.3f} us ({one / inside:.2f}x)", flush=True)

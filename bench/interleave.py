"""FFF calls between NumPy matmuls: does each slow the other down?

The README's main use: ``y = layer(x)`` inside the user's own NumPy model, next to ``x @ W`` on a multi-threaded
BLAS. Both runtimes keep idle worker threads spinning for a while after a call (OpenBLAS's for up to ~0.1 s,
libgomp's for a few hundred microseconds), so alternating them can make each wait for cores the other's idle
threads hold. This times, with the default thread counts (``n_threads=None``, BLAS as configured):

* ``layer(x)`` alone (median of repeated calls) and right after ``x @ W`` (median over alternating calls);
* ``x @ W`` alone and right after ``layer(x)``;

at width 768, depth 11, batch 1, 64 and 2048 (``W`` is 768 x 768). Ratios above 1 are the slowdown::

    python bench/interleave.py [--batch 1,64,2048] [--repeat 30] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from pyfff import FFF


def _median_time(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure(batch, repeat=30, width=768, depth=11, seed=0):
    """dict of median seconds: fff_alone, fff_after_matmul, matmul_alone, matmul_after_fff."""
    rng = np.random.default_rng(seed)
    layer = FFF.random(width, width, depth=depth, seed=seed)
    w = rng.standard_normal((width, width)).astype(np.float32)
    x = rng.standard_normal((batch, width)).astype(np.float32)
    out = {"fff_alone": _median_time(lambda: layer(x), repeat), "matmul_alone": _median_time(lambda: x @ w, repeat)}
    after_matmul, after_fff = [], []
    for _ in range(repeat + 1):
        t0 = time.perf_counter()
        x @ w
        t1 = time.perf_counter()
        layer(x)
        t2 = time.perf_counter()
        after_fff.append(t1 - t0)         # this matmul follows the previous round's FFF call
        after_matmul.append(t2 - t1)
    out["matmul_after_fff"] = float(np.median(after_fff[1:]))
    out["fff_after_matmul"] = float(np.median(after_matmul[1:]))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", default="1,64,2048", help="comma-separated batch sizes (default 1,64,2048)")
    parser.add_argument("--repeat", type=int, default=30, help="calls per median (default 30)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    rows = []
    print("| batch | FFF alone ms | FFF after x @ W ms | ratio | x @ W alone ms | x @ W after FFF ms | ratio |")
    print("|---|---|---|---|---|---|---|")
    for batch in (int(b) for b in args.batch.split(",")):
        r = measure(batch, args.repeat)
        r["batch"] = batch
        rows.append(r)
        print(f"| {batch} | {r['fff_alone'] * 1e3:.3f} | {r['fff_after_matmul'] * 1e3:.3f} | "
              f"{r['fff_after_matmul'] / r['fff_alone']:.1f}x | {r['matmul_alone'] * 1e3:.3f} | "
              f"{r['matmul_after_fff'] * 1e3:.3f} | {r['matmul_after_fff'] / r['matmul_alone']:.1f}x |", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()

"""The int8 FFF layer against the float32 layer it was made from: time per token, fallback rates, bytes.

One process, same core(s), width 768, depth 11 (UltraFastBERT-1x11's FFF shape) unless told otherwise; medians of
repeated calls with preallocated outputs, each call on new tokens (a cycle of distinct inputs, at least 4096 tokens in
all, as bench/README.md explains: a batch-1 call on the same token again finds its rows in cache). Also checks, beside every timing, that the int8 layer's routes equal the
float32 layer's::

    python bench/fff_int8_speed.py [--batch 1,2048,16384] [--threads 1] [--width 768] [--depth 11]
"""
from __future__ import annotations

import argparse

import numpy as np
from interleave import _median_time  # bench/interleave.py (this script's folder)

from pyfff import FFF


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", default="1,2048,16384", help="comma-separated batch sizes")
    parser.add_argument("--threads", type=int, default=1, help="n_threads of both layers (default 1)")
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--depth", type=int, default=11)
    args = parser.parse_args(argv)
    layer = FFF.random(args.width, args.width, args.depth, seed=0)
    q = layer.quantize("int8")
    print(f"width {args.width}, depth {args.depth}, {args.threads} thread(s), int8 path {q.path}")
    print("| batch | float32 us/token | int8 us/token | float32 / int8 | level-2 share | float32-logit share | "
          "routes equal |")
    print("|---|---|---|---|---|---|---|")
    for batch in (int(b) for b in args.batch.split(",")):
        rng = np.random.default_rng(batch)
        xs = [rng.standard_normal((batch, args.width)).astype(np.float32) for _ in range(-(-4096 // batch))]
        y = np.empty((batch, args.width), np.float32)
        repeat = 4096 if batch == 1 else max(5, 40000 // batch)

        def cycle(fn, xs=xs):
            it = iter(range(1 << 62))
            return lambda: fn(xs[next(it) % len(xs)])

        t_f = _median_time(cycle(lambda x, y=y: layer(x, args.threads, out=y)), repeat) / batch * 1e6
        t_q = _median_time(cycle(lambda x, y=y: q(x, args.threads, out=y)), repeat) / batch * 1e6
        x = np.concatenate(xs)                 # shares and the route check over every token timed
        same = np.array_equal(q.routes(x), layer.routes(x))
        st = q.last_stats
        print(f"| {batch} | {t_f:.3f} | {t_q:.3f} | {t_f / t_q:.2f}x | {st['level2'] / st['nodes']:.3f} | "
              f"{st['float32'] / st['nodes']:.4f} | {same} |", flush=True)
    rows = layer.n_neurons
    print(f"weights: float32 {(layer.w_in.nbytes + layer.w_out.nbytes) / 2**20:.1f} MiB, int8 arrays "
          f"{q.nbytes / 2**20:.1f} MiB (+ the float32 input rows, referenced for the last-resort logits); "
          f"per visited node: float32 {(args.width * 8)} B, int8 {q._arrays['q'].shape[1] + q._arrays['q_out'].shape[1]} B "
          f"(+ {q._arrays['q2'].shape[1]} B at level 2) of {rows} rows")


if __name__ == "__main__":
    main()

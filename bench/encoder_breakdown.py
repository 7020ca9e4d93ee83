"""Where an encoder forward pass spends its time: per stage, summed over layers.

Wraps the dense projections, the FFF layers, attention and LayerNorm of a loaded model with timers and runs
``hidden_states`` on random ids (warm-up call first, then the mean of ``--repeat`` calls)::

    python bench/encoder_breakdown.py MODEL [--quantize int8] [--batch 8] [--seq 128] [--threads 1]

MODEL is a checkpoint folder or pyfff export. With more than one thread the stage times are summed over the
workers (CPU time per stage), so they can exceed the wall time. The timers add about a microsecond per call.
"""
from __future__ import annotations

import argparse
import collections
import time

import numpy as np

import pyfff
from pyfff import _encoder_ops


def _timed(name, fn, totals):
    def call(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - t0
    return call


def breakdown(model, batch, seq, repeat=5, seed=0):
    """(wall seconds per call, {stage: seconds per call}) for ``model.hidden_states`` on random ids."""
    totals = collections.Counter()
    for key, layer in list(model._lin.items()):
        model._lin[key] = _timed(key.split(".", 2)[2], layer, totals)            # "attn.qkv", "ffn.dense_in", ...
    model._ffns = [None if f is None else _timed("fff", f, totals) for f in model._ffns]
    saved = _encoder_ops.attention, _encoder_ops.layer_norm
    _encoder_ops.attention = _timed("attention", saved[0], totals)
    _encoder_ops.layer_norm = _timed("layer_norm", saved[1], totals)
    try:
        ids = np.random.default_rng(seed).integers(0, model.config.vocab_size, size=(batch, seq))
        model.hidden_states(ids)
        totals.clear()
        t0 = time.perf_counter()
        for _ in range(repeat):
            model.hidden_states(ids)
        wall = (time.perf_counter() - t0) / repeat
    finally:
        _encoder_ops.attention, _encoder_ops.layer_norm = saved
    return wall, {k: v / repeat for k, v in totals.most_common()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="checkpoint folder or pyfff export")
    parser.add_argument("--quantize", choices=["int8"], default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    model = pyfff.load(args.model, n_threads=args.threads, quantize=args.quantize)
    wall, stages = breakdown(model, args.batch, args.seq, args.repeat)
    print(f"{args.model} quantize={model.quantize} {args.batch}x{args.seq} threads={args.threads}: "
          f"{wall * 1e3:.1f} ms per call, {args.batch * args.seq / wall:.0f} tokens/s")
    print("| stage | ms per call | share |")
    print("|---|---|---|")
    for name, sec in stages.items():
        print(f"| {name} | {sec * 1e3:.2f} | {sec / wall:.0%} |")
    print(f"| everything else (embedding, residual adds, Python) | {(wall - sum(stages.values())) * 1e3:.2f} | "
          f"{1 - sum(stages.values()) / wall:.0%} |")


if __name__ == "__main__":
    main()

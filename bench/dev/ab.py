"""Interleaved A/B timing of bench/dev/cmm_bench builds (the dev VM drifts 10-20 % between runs).

Usage: [POOL=k] [SAME_X=1] [WIN0=1] [WOUT0=1] [CORE=1] python bench/dev/ab.py N "batch tile depth reps [act]" BIN...
Runs every binary N times in turn, pinned to one core, and prints min and median of the forward
and route-only times per token.
"""
import os
import statistics
import subprocess
import sys

n = int(sys.argv[1]); args = sys.argv[2].split(); bins = sys.argv[3:]
res = {b: ([], []) for b in bins}
for r in range(n):
    for b in bins:
        out = subprocess.run(["taskset", "-c", os.environ.get("CORE", "1"), b] + args, capture_output=True, text=True).stdout.split("\n")
        res[b][0].append(float(out[0].split()[-2])); res[b][1].append(float(out[1].split()[-2]))
for b in bins:
    f, r = res[b]
    print(f"{os.path.basename(b):14s} forward min {min(f):.3f} med {statistics.median(f):.3f} | route min {min(r):.3f} med {statistics.median(r):.3f}")

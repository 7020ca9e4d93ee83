"""Compile bench/dev/cmm_bench.c with several -D variants and time them interleaved.

Usage (from the repo root): python bench/dev/run_variants.py "NAME=-DFOO -DBAR" ... [--args "2048 512 11 5"]...
Each variant is timed in rounds, interleaved with the others, and the best
time per token of each is reported (this VM's timings drift between runs).
"""
import argparse
import subprocess

p = argparse.ArgumentParser()
p.add_argument("variants", nargs="+")
p.add_argument("--args", action="append", default=None)
p.add_argument("--rounds", type=int, default=3)
a = p.parse_args()
runs = a.args or ["1 1 11 20000", "2048 512 11 5", "16384 2048 11 3"]
bins = {}
for v in a.variants:
    name, _, flags = v.partition("=")
    exe = f"/tmp/cmm_{name}"
    subprocess.run(["gcc", "-O3", "-fopenmp", "-Isrc", *flags.split(), "bench/dev/cmm_bench.c", "-o", exe, "-lm"],
                   check=True)
    bins[name] = exe
best = {}
for _ in range(a.rounds):
    for name, exe in bins.items():
        for r in runs:
            out = subprocess.run([exe, *r.split()], capture_output=True, text=True, check=True).stdout.splitlines()
            for line in out[:2]:
                key = (name, r, line.split()[0])
                val = float(line.split()[-2])
                best[key] = min(best.get(key, 1e9), val)
for r in runs:
    print(f"args {r}:")
    for name in bins:
        print(f"  {name:>12}: forward {best[(name, r, 'forward')]:.3f}  route-only {best[(name, r, 'route-only')]:.3f} us/token")

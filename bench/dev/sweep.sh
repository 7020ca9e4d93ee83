#!/usr/bin/env bash
# Sweep kernel variants and parameters with bench/dev/cmm_bench.c on one pinned core.
# Usage (repo root): bash bench/dev/sweep.sh [core]   -- prints best-of times per token.
# Variants: src/ (current) with -D parameters, and bench/dev/variants/*/ (older kernels).
set -u
core=${1:-0}
out=${OUT:-/tmp}
build() { gcc -O3 -fopenmp "$@" bench/dev/cmm_bench.c -o "$exe" -lm -Wno-psabi 2>/dev/null; }
runv() { # name, args...
  local name=$1; shift
  for a in "1 1 11 20000" "2048 512 11 5" "2048 2048 11 5" "16384 2048 11 3" "16384 4096 11 3"; do
    best_f=1e9; best_r=1e9
    for rep in 1 2 3; do
      res=$(taskset -c $core "$exe" $a | head -2 | awk '{print $(NF-1)}' | tr '\n' ' ')
      f=${res%% *}; r=${res#* }; r=${r% }
      best_f=$(python3 -c "print(min($best_f,$f))"); best_r=$(python3 -c "print(min($best_r,$r))")
    done
    printf "%-28s %-18s forward %6.3f  route %6.3f us/token\n" "$name" "$a" "$best_f" "$best_r"
  done
}
exe=$out/cmm_v1; build -Ibench/dev/variants/v1_sorted_scalar; runv v1_sorted_scalar
for share in 1 2 4; do for g in 2 4 6; do
  exe=$out/cmm_s${share}_g$g; build -Isrc -DFFF_SHARE=$share -DFFF_LEVEL_GROUP=$g; runv "share$share group$g"
done; done

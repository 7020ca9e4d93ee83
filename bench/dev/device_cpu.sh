#!/usr/bin/env bash
# One device run: build pyfff in place, sweep kernel parameters on one pinned core,
# then measure thread scaling 1..16. Usage (repo root): bash bench/dev/device_cpu.sh
set -u
lscpu | grep -E "Model name|^CPU\(s\)|L1d|L2|L3"
python3 setup.py -q build_ext --inplace >/dev/null 2>&1 || { echo "build failed"; python3 setup.py build_ext --inplace 2>&1 | tail -20; }
python3 -c "import pyfff; pyfff.show_config()"
for v in "-DFFF_LEVEL_GROUP=4" "-DFFF_LEVEL_GROUP=6" "-DFFF_LEVEL_GROUP=12" "-DFFF_SHARE=2"; do
  gcc -O3 -fopenmp -Isrc $v -Wno-psabi bench/dev/cmm_bench.c -o /tmp/cmm -lm
  for a in "2048 1024 11 5" "2048 2048 11 5" "16384 2048 11 3" "16384 4096 11 3" "16384 8192 11 3"; do
    best=$(for r in 1 2 3; do taskset -c 3 /tmp/cmm $a | head -1 | awk '{print $(NF-1)}'; done | sort -g | head -1)
    echo "$v $a forward $best us/token"
  done
done
PYTHONUNBUFFERED=1 python3 bench/dev/scaling.py --batch 2048 16384 --threads 1 2 4 8 12 16

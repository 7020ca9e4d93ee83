#!/usr/bin/env bash
# Build and run tests/qgemm_check.c (every code path of src/qgemm.h this CPU supports against the generic path,
# and the generic path against a naive computation): natively, then for aarch64 under qemu-user where the cross
# tools are on PATH (Debian/Ubuntu: apt-get install gcc-aarch64-linux-gnu qemu-user), once with -cpu max
# (dot product: the neon-dotprod path must be supported and pass) and once with -cpu cortex-a53 (no dot product:
# the generic path alone).  Every run goes ahead; the exit status is 1 if any failed.
#
#     tests/run_qgemm_check.sh            (CC overrides the native compiler, default gcc)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
status=0

echo "== native ($(uname -m))"
"${CC:-gcc}" -O2 -Isrc tests/qgemm_check.c -o "$tmp/qgemm_check" -lm
"$tmp/qgemm_check" || status=1

if command -v aarch64-linux-gnu-gcc >/dev/null && command -v qemu-aarch64 >/dev/null; then
    aarch64-linux-gnu-gcc -O2 -Isrc tests/qgemm_check.c -o "$tmp/qgemm_check_arm" -lm -static
    for cpu in max cortex-a53; do
        echo "== aarch64 (qemu-aarch64 -cpu $cpu)"
        qemu-aarch64 -cpu "$cpu" "$tmp/qgemm_check_arm" | tee "$tmp/out" || status=1
        if [[ $cpu == max ]] && ! grep -Eq '^neon-dotprod +supported +[0-9]+ cases +PASS$' "$tmp/out"; then
            echo "FAIL: the neon-dotprod path was not run under -cpu max"
            status=1
        fi
    done
else
    echo "== aarch64: skipped (aarch64-linux-gnu-gcc or qemu-aarch64 not on PATH)"
fi
exit $status

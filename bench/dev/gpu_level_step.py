"""Microbenchmark of the route's per-level step on one SM type: what does a level cost, and why?

Run (repository root, GPU machine): python bench/dev/gpu_level_step.py

The staged route kernel spends its time in one step per token and level: a half-warp reads a 768-float row
from shared memory (12 `LDS.128` per lane), multiplies it with the token's x held in registers (48 `FFMA`),
reduces the 16 lanes' sums with a 4-step shuffle butterfly, broadcasts the result and picks the next row from
its sign. This script times that step alone (rows already in shared memory, x already in registers, no
global memory), in variants that remove one part at a time:

    full            the step as in fff_route_staged: the next row depends on this level's sum
    no-dependence   the same work, but the next row does not depend on the sum (independent steps)
    no-butterfly    the next row depends on a lane's own partial sum (no shuffles)
    fma-only        no shared-memory loads: the row is the x registers themselves
    lds-only        loads and a single add per vector, no FMA chain

for 4, 8, 16 and 24 warps per SM (one block of that many warps per SM, 132 blocks), and prints the cost of a
step per SM in nanoseconds and clock cycles (at the clock measured with clock64 next to the timer), the
shared-memory bytes per clock it implies, and the issue rate. Steps per warp: STEPS; the result of every step
is consumed (written at the end) so the compiler cannot drop it.
"""
from __future__ import annotations

import cupy as cp
import numpy as np

STEPS = 4096
ROWS = 32  # rows staged per block (96 KB), indexed by the walk
SOURCE = r"""
#define XV 12
extern "C" __global__ void __launch_bounds__(768) level_step(const float* __restrict__ rows_g,
    float* __restrict__ out, int steps, int mode, long long* __restrict__ clocks)
{
    extern __shared__ __align__(16) float4 sm[];  // (ROWS, 192) float4
    const int tid = threadIdx.x, lane = tid & 31, g = lane & 15;
    for (int i = tid; i < %(rows)d * 192; i += blockDim.x) sm[i] = reinterpret_cast<const float4*>(rows_g)[i];
    __syncthreads();
    float4 x[XV];
    #pragma unroll
    for (int j = 0; j < XV; ++j)
        x[j] = reinterpret_cast<const float4*>(rows_g)[(tid * 7 + 16 * j + g) %% (%(rows)d * 192)];
    int r = (tid >> 4) & (%(rows)d - 1);
    float keep = 0.0f;
    const long long t0 = clock64();
    for (int step = 0; step < steps; ++step) {
        float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
        const float4* row = sm + r * 192 + g;
        #pragma unroll
        for (int j = 0; j < XV; ++j) {
            float4 w;
            if (mode == 3) w = x[(j + 1) %% XV]; else w = row[16 * j];
            if (mode == 4) { a0 += w.x; a1 += w.y; a2 += w.z; a3 += w.w; }
            else {
                a0 = fmaf(w.x, x[j].x, a0); a1 = fmaf(w.y, x[j].y, a1);
                a2 = fmaf(w.z, x[j].z, a2); a3 = fmaf(w.w, x[j].w, a3);
            }
        }
        float s = (a0 + a1) + (a2 + a3);
        if (mode != 2) {
            #pragma unroll
            for (int o = 8; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
            s = __shfl_sync(0xffffffffu, s, lane & ~15);
        }
        keep += s;
        if (mode == 1) r = (r + 5) & (%(rows)d - 1);            // independent of s
        else r = (2 * r + 1 + (s > 0.0f ? 1 : 0)) & (%(rows)d - 1);  // the walk: depends on s
    }
    const long long t1 = clock64();
    out[blockIdx.x * blockDim.x + tid] = keep;
    if (tid == 0) clocks[blockIdx.x] = t1 - t0;
}
""" % {"rows": ROWS}

MODES = {"full": 0, "no-dependence": 1, "no-butterfly": 2, "fma-only": 3, "lds-only": 4}


def main():
    dev = cp.cuda.Device()
    n_sm = dev.attributes["MultiProcessorCount"]
    kernel = cp.RawKernel(SOURCE, "level_step", options=("-std=c++17",))
    smem = ROWS * 192 * 16
    kernel.max_dynamic_shared_size_bytes = smem
    rows = cp.asarray(np.random.default_rng(0).standard_normal(ROWS * 768).astype(np.float32))
    print(f"# {cp.cuda.runtime.getDeviceProperties(dev.id)['name'].decode()}, {n_sm} SMs, {STEPS} steps per warp, "
          f"rows of 768 floats in shared memory, half a warp per token")
    print("| variant | warps/SM | ns per step per SM | cycles per step per SM | B/clk from smem | "
          "token-steps in flight |")
    print("|---|---|---|---|---|---|")
    for name, mode in MODES.items():
        for warps in (4, 8, 16, 24):
            threads = 32 * warps
            out = cp.empty(n_sm * threads, cp.float32)
            clocks = cp.zeros(n_sm, cp.int64)
            args = (rows, out, np.int32(STEPS), np.int32(mode), clocks)
            kernel((n_sm,), (threads,), args, shared_mem=smem)  # warm-up
            start, stop = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            kernel((n_sm,), (threads,), args, shared_mem=smem)
            stop.record()
            stop.synchronize()
            ms = cp.cuda.get_elapsed_time(start, stop)
            cycles = float(clocks.get().mean())
            steps_per_sm = warps * 2 * STEPS  # two tokens (half-warps) per warp
            ns = ms * 1e6 / steps_per_sm
            cyc = cycles / steps_per_sm
            bytes_per_clk = 0 if mode == 3 else 3072 / cyc
            print(f"| {name} | {warps} | {ns:.2f} | {cyc:.1f} | {bytes_per_clk:.0f} | {warps * 2} |")


if __name__ == "__main__":
    main()

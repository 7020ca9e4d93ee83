"""Experiment: do the output kernel's shared-memory row reads and its global stores of y overlap?

The output kernel (46 -> 43 us at batch 16384) costs about its shared-memory reads plus its y stores, as if the
two did not overlap. Hypothesis: both go through the SM's load/store pipe, so stores backed up by HBM hold the
shared loads queued behind them. This times the same work four ways, one block of 16 warps per SM, 16384
tokens of 768 floats, each formed from 12 rows out of 32 staged in shared memory (float4 loads, FMAs):

  lds       the row reads and FMAs only (one float per token written, so that nothing is optimised away)
  stg       the stores of y only (the same rows of y, no row reads)
  both      row reads, FMAs and the stores of y from registers, as fff_output_staged does
  both_tma  the same, but each warp writes its token's row of y into a shared-memory buffer (double-buffered)
            and one lane hands it to the TMA engine (cp.async.bulk.global.shared::cta), off the load/store pipe

If `both` is close to lds + stg and `both_tma` close to max(lds, stg), the stores through TMA are the way to
overlap them. Run (GPU machine): python bench/dev/gpu_lsu_overlap.py
"""
from __future__ import annotations

import cupy as cp
import numpy as np
from gpu_timing import best_us

SRC = r"""
#define ROWS 32
#define WIDTH 768
#define VPL 6  // float4 vectors per lane: 6 * 32 * 4 = 768 floats

__device__ __forceinline__ unsigned smem_addr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

template <int MODE>  // 0 lds, 1 stg, 2 both, 3 both_tma
__global__ void __launch_bounds__(512, 1) lsu(const float* __restrict__ w, long long n, float* __restrict__ y) {
    extern __shared__ __align__(128) float sm[];
    float* sw = sm;                     // (ROWS, WIDTH)
    float* buf = sm + ROWS * WIDTH;     // (16 warps, 2, WIDTH) staging of y for TMA
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int i = threadIdx.x; i < ROWS * WIDTH / 4; i += blockDim.x)
        reinterpret_cast<float4*>(sw)[i] = reinterpret_cast<const float4*>(w)[i];
    __syncthreads();
    const long long per_block = (n + gridDim.x - 1) / gridDim.x;
    const long long t0 = blockIdx.x * per_block, t1 = min(t0 + per_block, n);
    float keep = 0.f;
    int parity = 0;
    for (long long tok = t0 + warp; tok < t1; tok += 16) {
        float4 acc[VPL];
        #pragma unroll
        for (int j = 0; j < VPL; ++j) acc[j] = make_float4(0.f, 0.f, 0.f, 0.f);
        if (MODE != 1) {
            unsigned h = (unsigned)tok * 2654435761u;
            #pragma unroll 1
            for (int l = 0; l < 12; ++l) {
                h = h * 1664525u + 1013904223u;
                const int row = (h >> 27) & (ROWS - 1);
                const float a = 1.0f + (float)l;
                const float4* src = reinterpret_cast<const float4*>(sw + row * WIDTH) + lane;
                #pragma unroll
                for (int j = 0; j < VPL; ++j) {
                    float4 v;
                    asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];" : "=f"(v.x), "=f"(v.y), "=f"(v.z),
                                 "=f"(v.w) : "r"(smem_addr(src + 32 * j)) : "memory");
                    acc[j].x = fmaf(a, v.x, acc[j].x); acc[j].y = fmaf(a, v.y, acc[j].y);
                    acc[j].z = fmaf(a, v.z, acc[j].z); acc[j].w = fmaf(a, v.w, acc[j].w);
                }
            }
        } else {
            #pragma unroll
            for (int j = 0; j < VPL; ++j) acc[j] = make_float4((float)tok, 1.f, 2.f, (float)j);
        }
        float4* yt = reinterpret_cast<float4*>(y + tok * WIDTH) + lane;
        if (MODE == 0) {
            #pragma unroll
            for (int j = 0; j < VPL; ++j) keep += acc[j].x + acc[j].y + acc[j].z + acc[j].w;
        } else if (MODE == 1 || MODE == 2) {
            #pragma unroll
            for (int j = 0; j < VPL; ++j) __stcs(yt + 32 * j, acc[j]);
        } else {
            float* b = buf + (warp * 2 + parity) * WIDTH;
            if (lane == 0) asm volatile("cp.async.bulk.wait_group.read 1;" ::: "memory");  // b is free again
            __syncwarp();
            #pragma unroll
            for (int j = 0; j < VPL; ++j) reinterpret_cast<float4*>(b)[lane + 32 * j] = acc[j];
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // visible to the TMA engine
            __syncwarp();
            if (lane == 0) {
                asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;"
                             :: "l"(y + tok * WIDTH), "r"(smem_addr(b)), "n"(WIDTH * 4) : "memory");
                asm volatile("cp.async.bulk.commit_group;" ::: "memory");
            }
            parity ^= 1;
        }
    }
    if (MODE == 3 && lane == 0) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
    if (MODE == 0 && keep == 12345.f) y[0] = keep;
}
"""

MODES = {"lds": 0, "stg": 1, "both": 2, "both_tma": 3}


def main(n=16384):
    names = [f"lsu<{m}>" for m in MODES.values()]
    mod = cp.RawModule(code=SRC, options=("-std=c++17",), name_expressions=names)
    w = cp.asarray(np.random.default_rng(0).standard_normal(32 * 768).astype(np.float32))
    smem = (32 * 768 + 16 * 2 * 768) * 4
    n_sm = cp.cuda.runtime.deviceGetAttribute(16, 0)
    ref = None
    for name, mode in MODES.items():
        k = mod.get_function(f"lsu<{mode}>")
        k.max_dynamic_shared_size_bytes = smem
        y = cp.zeros((n, 768), cp.float32)

        def run(k=k, y=y):
            k((n_sm,), (512,), (w, np.int64(n), y), shared_mem=smem)

        t = best_us(run)
        if mode in (2, 3):
            ref = y.copy() if ref is None else ref
            same = bool((y == ref).all())
        else:
            same = None
        print(f"{name:9s} {t:7.1f} us" + ("" if same is None else f"   y equal to 'both': {same}"), flush=True)


if __name__ == "__main__":
    main()

"""Experiment: the first route stage (levels 0-5, the root's 63-row subtree) on tensor cores, 3xTF32.

Every token's 63 logits of the subtree are one dense product X (n, d) @ W (d, 64) (63 rows and a zero row);
a warp computes 16 tokens x 64 nodes with mma.sync m16n8k8 TF32, each product split as
x_hi w_hi + x_hi w_lo + x_lo w_hi (about float32 accuracy; not the CUDA-core kernels' bits), then walks
each token's six levels through its 64 logits with shuffles. W is staged in shared memory once per block
(XOR-swizzled so that the B-fragment loads are conflict-free); each lane reads x as float4, which fixes
the order of k inside each 16-wide block for A and B alike.

Run (repository root, GPU machine): PYTHONPATH=$PWD python bench/dev/gpu_tc_route.py [batch]
Prints the time of this kernel and of pyfff's CUDA-core stage 1 (fff_route_staged, same run), the route
agreement and the logit differences against the CUDA-core kernel.
"""
from __future__ import annotations

import sys

import cupy as cp
import numpy as np
from gpu_timing import best_us

import pyfff
import pyfff.gpu

SRC = r"""
__device__ __forceinline__ unsigned tf32(float v) {
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v));
    return r;
}
__device__ __forceinline__ void mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};" : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

#ifndef PF
#define PF 2  // 16-wide k blocks of x loaded ahead
#endif

extern "C" __global__ void __launch_bounds__(256, 1) tc_route6(
    const float* __restrict__ x, const long long n, const int d, const float* __restrict__ w,
    const float* __restrict__ b, int* __restrict__ nodes, float* __restrict__ logits, const int levels_out)
{
    extern __shared__ __align__(16) float sw[];  // (64, d) swizzled, then 64 biases
    float* sb = sw + 64 * d;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int nch = d / 4;  // 16-byte chunks per row
    // stage W: row r chunk c at chunk c ^ ((r & 1) << 2); row 63 is zero
    for (int i = threadIdx.x; i < 64 * nch; i += blockDim.x) {
        const int r = i / nch, c = i - r * nch;
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (r < 63) v = __ldg(reinterpret_cast<const float4*>(w + (long long)r * d) + c);
        reinterpret_cast<float4*>(sw + r * d)[c ^ ((r & 1) << 2)] = v;
    }
    if (threadIdx.x < 64) sb[threadIdx.x] = threadIdx.x < 63 ? b[threadIdx.x] : 0.f;
    __syncthreads();
    const long long n_tiles = (n + 15) / 16;
    const int kb_n = d / 16;
    for (long long tile = (long long)blockIdx.x * 8 + warp; tile < n_tiles; tile += (long long)gridDim.x * 8) {
        const long long r0 = tile * 16 + g, r1 = r0 + 8;
        const float4* xa = reinterpret_cast<const float4*>(x + min(r0, n - 1) * d) + t;
        const float4* xb = reinterpret_cast<const float4*>(x + min(r1, n - 1) * d) + t;
        float acc[8][4];
        #pragma unroll
        for (int nt = 0; nt < 8; ++nt) { acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f; }
        float4 pa[PF], pb[PF];
        #pragma unroll
        for (int p = 0; p < PF; ++p) { pa[p] = __ldcs(xa + 4 * p); pb[p] = __ldcs(xb + 4 * p); }
        for (int kb = 0; kb < kb_n; kb += PF) {
            #pragma unroll
            for (int p = 0; p < PF; ++p) {
                const float4 va = pa[p], vb = pb[p];
                if (kb + p + PF < kb_n) {
                    pa[p] = __ldcs(xa + 4 * (kb + p + PF));
                    pb[p] = __ldcs(xb + 4 * (kb + p + PF));
                }
                const float av[4] = {va.x, va.y, va.z, va.w}, bv[4] = {vb.x, vb.y, vb.z, vb.w};
                const int chunk = (kb + p) * 4 + t;
                #pragma unroll
                for (int s = 0; s < 2; ++s) {
                    unsigned ah[4], al[4];
                    const float a4[4] = {av[2 * s], bv[2 * s], av[2 * s + 1], bv[2 * s + 1]};
                    #pragma unroll
                    for (int q = 0; q < 4; ++q) { ah[q] = tf32(a4[q]); al[q] = tf32(a4[q] - __uint_as_float(ah[q])); }
                    unsigned bh[8][2], bl[8][2];
                    #pragma unroll
                    for (int nt = 0; nt < 8; ++nt) {
                        const int r = nt * 8 + g;
                        const float4 wv = reinterpret_cast<const float4*>(sw + r * d)[chunk ^ ((r & 1) << 2)];
                        const float w0 = s ? wv.z : wv.x, w1 = s ? wv.w : wv.y;
                        bh[nt][0] = tf32(w0); bh[nt][1] = tf32(w1);
                        bl[nt][0] = tf32(w0 - __uint_as_float(bh[nt][0]));
                        bl[nt][1] = tf32(w1 - __uint_as_float(bh[nt][1]));
                    }
                    // the small terms first, each pass over 8 independent accumulators
                    #pragma unroll
                    for (int nt = 0; nt < 8; ++nt) mma(acc[nt], al, bh[nt][0], bh[nt][1]);
                    #pragma unroll
                    for (int nt = 0; nt < 8; ++nt) mma(acc[nt], ah, bl[nt][0], bl[nt][1]);
                    #pragma unroll
                    for (int nt = 0; nt < 8; ++nt) mma(acc[nt], ah, bh[nt][0], bh[nt][1]);
                }
            }
        }
        // walk: rows g (acc[.][0..1]) and g + 8 (acc[.][2..3]); node j's logit is in lane 4g + ((j & 7) >> 1)
        #pragma unroll
        for (int h = 0; h < 2; ++h) {
            const long long row = h ? r1 : r0;
            int j = 0;
            for (int level = 0; level < 6; ++level) {
                float v0 = 0.f, v1 = 0.f;
                #pragma unroll
                for (int nt = 0; nt < 8; ++nt) {
                    if (nt == (j >> 3)) { v0 = acc[nt][2 * h]; v1 = acc[nt][2 * h + 1]; }
                }
                const float mine = (j & 1) ? v1 : v0;
                const float z = __shfl_sync(0xffffffffu, mine, (lane & ~3) | ((j & 7) >> 1)) + sb[j];
                if (t == 0 && row < n) {
                    nodes[row * levels_out + level] = j;
                    logits[row * levels_out + level] = z;
                }
                j = 2 * j + 1 + (z > 0.f ? 1 : 0);
            }
        }
    }
}
"""


def main(n):
    cpu = pyfff.FFF.random(768, 768, 11, seed=0)
    gpu = pyfff.gpu.FFF.from_cpu(cpu)
    x = cp.asarray(np.random.default_rng(n).standard_normal((n, 768), dtype=np.float32))
    import os

    mod = cp.RawModule(code=SRC, options=("-std=c++17", f"-DPF={int(os.environ.get('PF', 2))}"))
    k = mod.get_function("tc_route6")
    smem = 64 * 768 * 4 + 64 * 4
    cp.cuda.driver.funcSetAttribute(k.kernel.ptr, 8, smem)
    levels = 12
    nodes = cp.full((n, levels), -1, cp.int32)
    logits = cp.zeros((n, levels), cp.float32)
    args = (x, np.int64(n), np.int32(768), gpu.w_in, gpu.b_in, nodes, logits, np.int32(levels))
    n_sm = cp.cuda.Device().attributes["MultiProcessorCount"]
    grid = min(n_sm, -(-n // 128))
    k((grid,), (256,), args, shared_mem=smem)
    cp.cuda.Device().synchronize()
    # the CUDA-core kernels' stage 1 (same order of sums as the CPU layer's tests accept)
    _, (ref_nodes, ref_logits) = gpu._run(x, want_output=False, splits="staged", smem=True)
    rn, rl = cp.asnumpy(ref_nodes)[:, 0, :6], cp.asnumpy(ref_logits)[:, 0, :6]
    tn, tl = cp.asnumpy(nodes)[:, :6], cp.asnumpy(logits)[:, :6]
    same = (rn == tn).all(axis=1)
    print(f"routes (levels 0-5) equal for {same.mean():.4%} of {n} tokens")
    d = np.abs(tl[same] - rl[same])
    mag = np.abs(cp.asnumpy(x)).dot(np.abs(cpu.w_in[:63]).T).max()
    print(f"logit difference: max {d.max():.3g}, median {np.median(d):.3g}; max |x||w| {mag:.3g}")
    best = best_us(lambda: k((grid,), (256,), args, shared_mem=smem))
    print(f"tc_route6 (3xTF32): {best:.1f} us, grid {grid}x256, {n * 768 * 4 / best / 1e3:.0f} GB/s of x")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 16384)

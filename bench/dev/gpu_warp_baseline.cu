// Baseline for pyfff's GPU FFF kernels: the plain one-warp-per-token kernel.
//
// Variants in this file:
//   fff_warp_baseline_f32   one warp per token (grid-stride over warps), the whole walk fused:
//                           per level, the warp loads the node's w_in row with float4 loads, reduces
//                           the dot product with a shuffle butterfly, and adds act(z) * w_out[row] to
//                           the token's output held in registers; y is written once at the end.
//                           float32, d_in and d_out multiples of 4, d_in and d_out <= 1024, exact GELU.
//
// Every token re-reads its 2 * (depth + 1) rows from the memory hierarchy: no sharing between tokens
// beyond what L1/L2 happen to keep. This is the "plain warp-per-token" figure that issue 6 asks the
// library kernels (pyfff/gpu/kernels/fff.cu) to beat by 2x.
//
// Run: python bench/bench_gpu.py (it loads this file through bench/dev/gpu_baseline.py,
// checks its output against the NumPy reference, and times it next to the library kernels).

#define FULL_MASK 0xffffffffu
#define MAXV 8  // float4 vectors per lane: rows up to 1024 floats

extern "C" __global__ void __launch_bounds__(256) fff_warp_baseline_f32(
    const float* __restrict__ x,      // IN  (n, d_in)
    const long long n,
    const int d_in,
    const int d_out,
    const float* __restrict__ w_in,   // IN  (n_nodes, d_in)
    const float* __restrict__ b_in,   // IN  (n_nodes,)
    const float* __restrict__ w_out,  // IN  (n_nodes, d_out)
    const int depth,
    float* __restrict__ y)            // OUT (n, d_out)
{
    const int lane = threadIdx.x & 31;
    const long long warp_global = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const long long n_warps_total = ((long long)gridDim.x * blockDim.x) >> 5;
    const int nv_in = d_in / 4;
    const int nv_out = d_out / 4;

    for (long long tok = warp_global; tok < n; tok += n_warps_total) {
        const float4* xt = reinterpret_cast<const float4*>(x + tok * d_in);
        float4 xr[MAXV];
        float4 acc[MAXV];
        #pragma unroll
        for (int j = 0; j < MAXV; ++j) {
            const int v = lane + 32 * j;
            xr[j] = v < nv_in ? __ldg(xt + v) : make_float4(0.f, 0.f, 0.f, 0.f);
            acc[j] = make_float4(0.f, 0.f, 0.f, 0.f);
        }
        long long node = 0;
        for (int level = 0; level <= depth; ++level) {
            const float4* w = reinterpret_cast<const float4*>(w_in + node * d_in);
            float s = 0.f;
            #pragma unroll
            for (int j = 0; j < MAXV; ++j) {
                const int v = lane + 32 * j;
                if (v < nv_in) {
                    const float4 a = __ldg(w + v);
                    s += a.x * xr[j].x + a.y * xr[j].y + a.z * xr[j].z + a.w * xr[j].w;
                }
            }
            #pragma unroll
            for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(FULL_MASK, s, o);
            const float z = __shfl_sync(FULL_MASK, s, 0) + __ldg(b_in + node);
            const float g = 0.5f * z * (1.0f + erff(z * 0.70710678118654752f));
            const float4* wo = reinterpret_cast<const float4*>(w_out + node * d_out);
            #pragma unroll
            for (int j = 0; j < MAXV; ++j) {
                const int v = lane + 32 * j;
                if (v < nv_out) {
                    const float4 b = __ldg(wo + v);
                    acc[j].x += g * b.x; acc[j].y += g * b.y; acc[j].z += g * b.z; acc[j].w += g * b.w;
                }
            }
            node = 2 * node + 1 + (z > 0.f ? 1 : 0);
        }
        float4* yt = reinterpret_cast<float4*>(y + tok * d_out);
        #pragma unroll
        for (int j = 0; j < MAXV; ++j) {
            const int v = lane + 32 * j;
            if (v < nv_out) yt[v] = acc[j];
        }
    }
}

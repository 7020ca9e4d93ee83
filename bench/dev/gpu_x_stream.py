"""Experiment: how long the route kernels' way of reading x takes alone, without the walk.

Half a warp per token, each lane loading its 12 float4 vectors of the token's row (vectors g + 16 j, as
load_x does), positions split into one contiguous chunk per block, two tokens per warp; the group sums the
row (a 4-step butterfly, standing in for the walk's use of x) and one lane writes one float per token.
Batch 16384 x 768 float32 (50.3 MB), grids as the staged route (132 x 512) and the unstaged one (264 x 256),
loads evict-first (as the last stage) or with L2's normal policy (as earlier stages).

Run (repository root, GPU machine): python bench/dev/gpu_x_stream.py
"""
import cupy as cp
import numpy as np
from gpu_timing import best_us

SRC = r"""
template <bool STREAM>
__global__ void read_x(const float4* __restrict__ x, long long n, float* __restrict__ out) {
    const int lane = threadIdx.x & 31, g = lane & 15;
    const int slot = threadIdx.x >> 4, n_slots = blockDim.x >> 4;
    const long long chunk = (n + gridDim.x - 1) / gridDim.x;
    const long long begin = blockIdx.x * chunk, end = min(begin + chunk, n);
    for (long long p = begin + slot; p < end; p += n_slots) {
        float4 v[12];
        #pragma unroll
        for (int j = 0; j < 12; ++j) v[j] = STREAM ? __ldcs(x + p * 192 + g + 16 * j) : __ldg(x + p * 192 + g + 16 * j);
        float s = 0.f;
        #pragma unroll
        for (int j = 0; j < 12; ++j) s += v[j].x + v[j].y + v[j].z + v[j].w;
        #pragma unroll
        for (int o = 8; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (g == 0) out[p] = s;
    }
}
"""


def main(n=16384):
    mod = cp.RawModule(code=SRC, options=("-std=c++17",), name_expressions=("read_x<true>", "read_x<false>"))
    x = cp.asarray(np.random.default_rng(0).standard_normal((n, 768), dtype=np.float32))
    out = cp.empty(n, cp.float32)
    for name in ("read_x<true>", "read_x<false>"):
        k = mod.get_function(name)
        for grid, block in ((132, 512), (264, 256), (528, 256)):
            args = (x, np.int64(n), out)
            best = best_us(lambda: k((grid,), (block,), args))
            print(f"{name} grid {grid}x{block}: {best:.1f} us, {n * 768 * 4 / best / 1e3:.0f} GB/s")


if __name__ == "__main__":
    main()

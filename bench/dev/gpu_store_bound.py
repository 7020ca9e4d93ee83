"""Experiment: how long writing y (batch 16384 x 768 float32) takes when rows are written in batch order or in
a random order of tokens (as the output kernels do after a sort): one warp per row, float4 streaming stores.

Run (repository root, GPU machine): python bench/dev/gpu_store_bound.py
"""
import cupy as cp
import numpy as np
from gpu_timing import best_us

SRC = r"""
extern "C" __global__ void write_rows(const int* __restrict__ order, long long n, int nvec, float4* __restrict__ y) {
    const int lane = threadIdx.x & 31;
    for (long long p = (blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5; p < n;
         p += ((long long)gridDim.x * blockDim.x) >> 5) {
        const long long tok = order[p];
        for (int v = lane; v < nvec; v += 32) __stcs(y + tok * nvec + v, make_float4(p, v, 1.f, 2.f));
    }
}
"""


def main(n=16384, d=768):
    k = cp.RawModule(code=SRC).get_function("write_rows")
    y = cp.empty((n, d), cp.float32)
    orders = {"batch order": cp.arange(n, dtype=cp.int32),
              "random order": cp.asarray(np.random.default_rng(0).permutation(n).astype(np.int32))}
    for name, order in orders.items():
        for grid in (132 * 4, 132 * 16):
            args = (order, np.int64(n), np.int32(d // 4), y)
            best = best_us(lambda: k((grid,), (256,), args))
            print(f"{name}, grid {grid}: {best:.1f} us, {n * d * 4 / best / 1e3:.0f} GB/s")


if __name__ == "__main__":
    main()

// pyfff's CUDA kernels for fast feedforward (FFF) inference.
//
// Loaded by pyfff/gpu/_loader.py with cupy.RawModule (NVRTC, C++17); the
// templates are instantiated through name expressions, one per dtype and
// vector width:
//
//   fff_route<T, VEC>    one warp per token walks levels [lo, hi) of one tree,
//                        stores the visited node and its logit per level and,
//                        optionally, the token's bucket key.
//   fff_bucket_scatter   counting sort of the tokens by that key (extern "C").
//   fff_output<T, VEC>   one warp per token: y = sum over trees and levels of
//                        act(logit) * w_out[row], written once.
//
// T is float or double; VEC is the number of T per load (16 bytes: 4 floats or
// 2 doubles, or 1 when a width or a pointer does not allow 16-byte loads; the
// host picks). The default pipeline is fff_route (all levels, batch order) then
// fff_output. Optionally the host re-sorts tokens between route stages with
// fff_bucket_scatter (by the node of a middle level, then by leaf) so that the
// warps of a block read the same rows one after the other; on the H100 that
// raised L1 hit rates but did not pay for the extra passes (docs/gpu.md).
//
// Guarantees: every write is behind a bounds check on its index; indices into
// x, y and the weight matrices are 64-bit; the routing rule is the library's
// (go right iff logit > 0: a logit of 0 or NaN goes left); the dot product of
// a token is reduced by a warp-shuffle butterfly whose result is broadcast
// from lane 0, so all lanes take the same branch.

#define PYFFF_FULL_MASK 0xffffffffu

// Vectors of VEC elements held per lane in registers; wider rows loop over the rest.
#define PYFFF_MAXV 6
// Bucket keys are nodes of one level <= 12 (at most 4096 buckets).
#define PYFFF_MAX_BUCKETS 4096
#define PYFFF_SCATTER_THREADS 256
#define PYFFF_SCATTER_ITEMS 2
// Largest block of fff_route (one token per warp) and fff_output; the host launches 256 or 768 threads.
#define PYFFF_MAX_BLOCK 768

#define PYFFF_ACT_GELU 0
#define PYFFF_ACT_GELU_TANH 1
#define PYFFF_ACT_RELU 2

// ---------------------------------------------------------------- loads, stores

// VEC-wide loads, overloaded on the element count of the destination. STREAM: evict-first (rows of x
// are read once per token and should not push weight rows out of L1); else the read-only path (__ldg).
template <bool STREAM, typename V>
__device__ __forceinline__ V ld(const V* __restrict__ p) {
    if (STREAM) return __ldcs(p);
    return __ldg(p);
}

template <bool STREAM>
__device__ __forceinline__ void load_vec(const float* __restrict__ p, float (&v)[4]) {
    const float4 t = ld<STREAM>(reinterpret_cast<const float4*>(p));
    v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
}

template <bool STREAM>
__device__ __forceinline__ void load_vec(const double* __restrict__ p, double (&v)[2]) {
    const double2 t = ld<STREAM>(reinterpret_cast<const double2*>(p));
    v[0] = t.x; v[1] = t.y;
}

template <bool STREAM, typename T>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, T (&v)[1]) {
    v[0] = ld<STREAM>(p);
}

// Stores of y are streaming too (written once, never read back by these kernels).
template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const T (&v)[VEC]);

template <>
__device__ __forceinline__ void store_vec<float, 4>(float* __restrict__ p, const float (&v)[4]) {
    __stcs(reinterpret_cast<float4*>(p), make_float4(v[0], v[1], v[2], v[3]));
}

template <>
__device__ __forceinline__ void store_vec<float, 1>(float* __restrict__ p, const float (&v)[1]) {
    __stcs(p, v[0]);
}

template <>
__device__ __forceinline__ void store_vec<double, 2>(double* __restrict__ p, const double (&v)[2]) {
    __stcs(reinterpret_cast<double2*>(p), make_double2(v[0], v[1]));
}

template <>
__device__ __forceinline__ void store_vec<double, 1>(double* __restrict__ p, const double (&v)[1]) {
    __stcs(p, v[0]);
}

// ---------------------------------------------------------------- math

// Exact GELU as 0.5 z erfc(-z / sqrt 2): 1 + erf(x) loses the negative side to cancellation. float32 is
// evaluated in double and rounded once, as the CPU kernels do (src/fff_kernels.h).
__device__ __forceinline__ float activation(float z, int act) {
    if (act == PYFFF_ACT_GELU) return (float)(0.5 * (double)z * erfc((double)z * -0.70710678118654752));
    if (act == PYFFF_ACT_GELU_TANH)
        return 0.5f * z * (1.0f + tanhf(0.79788456080286536f * (z + 0.044715f * z * z * z)));
    return z < 0.0f ? 0.0f : z;  // relu; NaN stays NaN, as np.maximum(z, 0) does
}

__device__ __forceinline__ double activation(double z, int act) {
    if (act == PYFFF_ACT_GELU) return 0.5 * z * erfc(z * -0.70710678118654752);
    if (act == PYFFF_ACT_GELU_TANH)
        return 0.5 * z * (1.0 + tanh(0.79788456080286536 * (z + 0.044715 * z * z * z)));
    return z < 0.0 ? 0.0 : z;
}

// ---------------------------------------------------------------- work split

// This block's contiguous range [begin, end) of the positions 0 .. n-1 (one chunk per block, so that
// the warps of a block handle neighbouring positions of a grouped order).
struct PositionRange {
    long long begin, end;
};

__device__ __forceinline__ PositionRange block_positions(long long n) {
    const long long chunk = (n + gridDim.x - 1) / gridDim.x;
    const long long begin = (long long)blockIdx.x * chunk;
    return {begin, min(begin + chunk, n)};
}

// Token at position p: order[p] with a grouped order, else p; -1 if out of range (never, for a permutation).
__device__ __forceinline__ long long token_at(const int* __restrict__ order, int use_order, long long p, long long n) {
    const long long tok = use_order ? (long long)order[p] : p;
    return (tok >= 0 && tok < n) ? tok : -1;
}

// ---------------------------------------------------------------- routing

// Walk levels [lo, hi) of tree `tree` for every token.
//
// Positions p = 0 .. n-1 are split into one contiguous chunk per block, so
// that the warps of a block handle neighbouring positions: with `order` from
// fff_bucket_scatter those are tokens of the same subtree, whose rows the
// block then reads from L1. Token of position p: order[p] if use_order else p.
//
// lo > 0 continues a walk: the start node is the child chosen by the node and
// logit stored at level lo - 1. key_level in [lo, hi] (or -1: none) names the
// level whose node becomes the token's bucket key (key_level == hi: the next
// node to visit); keys[tok] = node - (2**key_level - 1) and counts[key] += 1.
template <typename T, int VEC>
__global__ void __launch_bounds__(PYFFF_MAX_BLOCK, 1) fff_route(
    const T* __restrict__ x,         // IN  (n, d_in)
    const long long n,
    const int d_in,                  // multiple of VEC
    const T* __restrict__ w_in,      // IN  (n_trees * n_nodes, d_in)
    const T* __restrict__ b_in,      // IN  (n_trees * n_nodes,), read only if has_bias
    const int has_bias,
    const int n_trees,
    const int depth,
    const int tree,
    const int lo,
    const int hi,
    const int* __restrict__ order,   // IN  (n,), read only if use_order
    const int use_order,
    int* __restrict__ nodes,         // IN/OUT (n, n_trees, depth + 1): level lo - 1 in, [lo, hi) out
    T* __restrict__ logits,          // IN/OUT (n, n_trees, depth + 1)
    const int key_level,
    int* __restrict__ keys,          // OUT (n,), written only if key_level >= 0
    int* __restrict__ counts)        // IN/OUT (2**key_level,) histogram of keys
{
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int n_warps = blockDim.x >> 5;
    const int nvec = d_in / VEC;
    const int levels = depth + 1;
    const long long n_nodes = (2LL << depth) - 1;
    const PositionRange range = block_positions(n);

    for (long long p = range.begin + warp; p < range.end; p += n_warps) {  // warp-uniform
        const long long tok = token_at(order, use_order, p, n);
        if (tok < 0) continue;  // never, for a valid permutation
        const T* __restrict__ xt = x + tok * d_in;

        // The token's row of x stays in registers for all levels (first PYFFF_MAXV vectors per lane).
        T xr[PYFFF_MAXV][VEC];
        #pragma unroll
        for (int j = 0; j < PYFFF_MAXV; ++j) {
            const int v = lane + 32 * j;
            if (v < nvec) {
                load_vec<true>(xt + (long long)v * VEC, xr[j]);
            } else {
                #pragma unroll
                for (int c = 0; c < VEC; ++c) xr[j][c] = T(0);
            }
        }

        const long long base = (tok * n_trees + tree) * levels;
        long long node = 0;
        if (lo > 0) node = 2LL * nodes[base + lo - 1] + 1 + (logits[base + lo - 1] > T(0) ? 1 : 0);
        long long key_node = 0;

        for (int level = lo; level < hi; ++level) {
            const long long row = (long long)tree * n_nodes + node;
            const T* __restrict__ w = w_in + row * d_in;
            T acc[VEC];
            #pragma unroll
            for (int c = 0; c < VEC; ++c) acc[c] = T(0);
            #pragma unroll
            for (int j = 0; j < PYFFF_MAXV; ++j) {
                const int v = lane + 32 * j;
                if (v < nvec) {
                    T wv[VEC];
                    load_vec<false>(w + (long long)v * VEC, wv);
                    #pragma unroll
                    for (int c = 0; c < VEC; ++c) acc[c] = fma(wv[c], xr[j][c], acc[c]);
                }
            }
            for (int v = lane + 32 * PYFFF_MAXV; v < nvec; v += 32) {  // rows wider than the register cache
                T wv[VEC], xv[VEC];
                load_vec<false>(w + (long long)v * VEC, wv);
                load_vec<false>(xt + (long long)v * VEC, xv);
                #pragma unroll
                for (int c = 0; c < VEC; ++c) acc[c] = fma(wv[c], xv[c], acc[c]);
            }
            T s = acc[0];
            #pragma unroll
            for (int c = 1; c < VEC; ++c) s += acc[c];
            #pragma unroll
            for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_xor_sync(PYFFF_FULL_MASK, s, offset);
            T z = __shfl_sync(PYFFF_FULL_MASK, s, 0);
            if (has_bias) z += __ldg(b_in + row);
            if (lane == 0) {
                nodes[base + level] = (int)node;
                logits[base + level] = z;
            }
            if (level == key_level) key_node = node;
            node = 2 * node + 1 + (z > T(0) ? 1 : 0);  // ties and NaN go left
        }
        if (key_level == hi) key_node = node;
        if (key_level >= 0 && lane == 0) {
            const long long key = key_node - ((1LL << key_level) - 1);
            if (key >= 0 && key < (1LL << key_level)) {
                keys[tok] = (int)key;
                atomicAdd(counts + key, 1);
            }
        }
    }
}

// ---------------------------------------------------------------- counting sort

// perm = the tokens 0 .. n-1 grouped by keys[token], bucket 0 first.
//
// Launched with PYFFF_SCATTER_THREADS threads and ceil(n / (threads * items))
// blocks, after `counts` holds the complete histogram of `keys` and with
// `cursors` zeroed. Every block scans `counts` itself (at most 4096 entries),
// ranks its own tokens with shared-memory atomics, then claims one range per
// bucket with a single global atomic. The order inside a bucket depends on
// timing; results do not, since every token's output is computed by itself.
extern "C" __global__ void __launch_bounds__(PYFFF_SCATTER_THREADS) fff_bucket_scatter(
    const int* __restrict__ keys,    // IN  (n,), each in [0, n_buckets)
    const long long n,
    const int* __restrict__ counts,  // IN  (n_buckets,)
    const int n_buckets,             // <= PYFFF_MAX_BUCKETS
    int* __restrict__ cursors,       // IN/OUT (n_buckets,), zero before the launch
    int* __restrict__ perm)          // OUT (n,)
{
    __shared__ int offset[PYFFF_MAX_BUCKETS];
    __shared__ int local[PYFFF_MAX_BUCKETS];
    __shared__ int warp_total[PYFFF_SCATTER_THREADS / 32];
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int nb = min(n_buckets, PYFFF_MAX_BUCKETS);

    // 1. offset[b] = counts[0] + ... + counts[b - 1]: each thread sums a run of buckets, then a block scan.
    const int per = (nb + PYFFF_SCATTER_THREADS - 1) / PYFFF_SCATTER_THREADS;
    const int b0 = min(tid * per, nb);
    const int b1 = min(b0 + per, nb);
    int sum = 0;
    for (int b = b0; b < b1; ++b) sum += counts[b];
    int incl = sum;
    #pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int t = __shfl_up_sync(PYFFF_FULL_MASK, incl, o);
        if (lane >= o) incl += t;
    }
    if (lane == 31) warp_total[warp] = incl;
    __syncthreads();
    int run = incl - sum;
    for (int w = 0; w < warp; ++w) run += warp_total[w];
    for (int b = b0; b < b1; ++b) {
        offset[b] = run;
        run += counts[b];
        local[b] = 0;
    }
    __syncthreads();

    // 2. rank of each of this block's tokens inside its bucket, among this block's tokens
    const long long first = (long long)blockIdx.x * (PYFFF_SCATTER_THREADS * PYFFF_SCATTER_ITEMS);
    int key[PYFFF_SCATTER_ITEMS];
    int rank[PYFFF_SCATTER_ITEMS];
    #pragma unroll
    for (int it = 0; it < PYFFF_SCATTER_ITEMS; ++it) {
        const long long i = first + (long long)it * PYFFF_SCATTER_THREADS + tid;
        key[it] = (i < n) ? keys[i] : -1;
        if (key[it] >= nb) key[it] = -1;  // cannot happen with keys from fff_route
    }
    #pragma unroll
    for (int it = 0; it < PYFFF_SCATTER_ITEMS; ++it) rank[it] = key[it] >= 0 ? atomicAdd(local + key[it], 1) : 0;
    __syncthreads();

    // 3. one global claim per non-empty bucket of this block
    for (int b = tid; b < nb; b += PYFFF_SCATTER_THREADS) {
        const int c = local[b];
        if (c > 0) offset[b] += atomicAdd(cursors + b, c);
    }
    __syncthreads();

    // 4. scatter
    #pragma unroll
    for (int it = 0; it < PYFFF_SCATTER_ITEMS; ++it) {
        if (key[it] < 0) continue;
        const long long i = first + (long long)it * PYFFF_SCATTER_THREADS + tid;
        const long long pos = (long long)offset[key[it]] + rank[it];
        if (pos >= 0 && pos < n) perm[pos] = (int)i;
    }
}

// ---------------------------------------------------------------- output

// y[tok] = sum over trees t and levels l of act(logits[tok, t, l]) * w_out[t * n_nodes + nodes[tok, t, l]],
// summed in that order (trees outer, levels inner, like the NumPy reference), written once.
//
// One warp per token. Each lane computes one term's row and activation (32
// terms per batch), broadcast with shuffles; the lanes stream each row with
// VEC-wide loads into accumulators for a column chunk of 32 * PYFFF_MAXV
// vectors (the whole row up to width 768 in float32) held in registers.
template <typename T, int VEC>
__global__ void __launch_bounds__(PYFFF_MAX_BLOCK, 1) fff_output(
    const int* __restrict__ nodes,   // IN  (n, n_trees, depth + 1)
    const T* __restrict__ logits,    // IN  (n, n_trees, depth + 1)
    const long long n,
    const int d_out,                 // multiple of VEC
    const T* __restrict__ w_out,     // IN  (n_trees * n_nodes, d_out)
    const int n_trees,
    const int depth,
    const int act,
    const int* __restrict__ order,   // IN  (n,), read only if use_order
    const int use_order,
    T* __restrict__ y)               // OUT (n, d_out)
{
    constexpr int J = PYFFF_MAXV;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int n_warps = blockDim.x >> 5;
    const int nvec = d_out / VEC;
    const int levels = depth + 1;
    const int n_terms = n_trees * levels;
    const long long n_nodes = (2LL << depth) - 1;
    const PositionRange range = block_positions(n);

    for (long long p = range.begin + warp; p < range.end; p += n_warps) {  // warp-uniform
        const long long tok = token_at(order, use_order, p, n);
        if (tok < 0) continue;
        const int* __restrict__ tn = nodes + tok * n_terms;
        const T* __restrict__ tz = logits + tok * n_terms;
        T* __restrict__ yt = y + tok * d_out;

        for (int v0 = 0; v0 < nvec; v0 += 32 * J) {  // column chunks
            T acc[J][VEC];
            #pragma unroll
            for (int j = 0; j < J; ++j) {
                #pragma unroll
                for (int c = 0; c < VEC; ++c) acc[j][c] = T(0);
            }
            for (int i0 = 0; i0 < n_terms; i0 += 32) {
                const int i = i0 + lane;
                int node_l = 0;
                T a_l = T(0);
                if (i < n_terms) {
                    node_l = __ldg(tn + i);
                    a_l = activation(__ldg(tz + i), act);
                }
                const int cnt = min(32, n_terms - i0);
                for (int k = 0; k < cnt; ++k) {
                    const long long tree_rows = (long long)((i0 + k) / levels) * n_nodes;
                    const int nd = __shfl_sync(PYFFF_FULL_MASK, node_l, k);
                    const T ak = __shfl_sync(PYFFF_FULL_MASK, a_l, k);
                    const T* __restrict__ wr = w_out + (tree_rows + nd) * d_out;
                    #pragma unroll
                    for (int j = 0; j < J; ++j) {
                        const int v = v0 + lane + 32 * j;
                        if (v < nvec) {
                            T w[VEC];
                            load_vec<false>(wr + (long long)v * VEC, w);
                            #pragma unroll
                            for (int c = 0; c < VEC; ++c) acc[j][c] = fma(ak, w[c], acc[j][c]);
                        }
                    }
                }
            }
            #pragma unroll
            for (int j = 0; j < J; ++j) {
                const int v = v0 + lane + 32 * j;
                if (v < nvec) store_vec<T, VEC>(yt + (long long)v * VEC, acc[j]);
            }
        }
    }
}

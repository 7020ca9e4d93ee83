// pyfff's CUDA kernels for fast feedforward (FFF) inference.
//
// Loaded by pyfff/gpu/_loader.py with cupy.RawModule (NVRTC, C++17); the
// templates are instantiated through name expressions, one per dtype and
// vector width (and the variants named below):
//
//   fff_route<T, VEC, EXACT, OUT>    half a warp per token walks levels [lo, hi)
//                                    of one tree, rows through L1/L2; stores the
//                                    visited node and its logit per level and,
//                                    optionally, the token's bucket key (or the
//                                    token itself in its bucket's slots); reads
//                                    its positions from an order or from the
//                                    previous stage's slots. OUT: in the last
//                                    stage of a one-tree layer, also forms y.
//   fff_route_staged<T, VEC, EXACT>  the same walk with each block's subtree of
//                                    levels [lo, hi) staged in shared memory.
//   fff_bucket_scatter               counting sort of the tokens by that key, and
//                                    where each bucket starts (extern "C").
//   fff_output<T, VEC>               one warp per token: y = sum over trees and
//                                    levels of act(logit) * w_out[row].
//   fff_output_staged<T, VEC, SJ, TPW>  one tree; the rows of w_out that a
//                                    segment of sorted tokens uses staged in
//                                    shared memory, per column slice.
//
// T is float or double; VEC is the number of T per load (16 bytes: 4 floats or
// 2 doubles, or 1 when a width or a pointer does not allow 16-byte loads; the
// host picks). EXACT: a row is exactly the 192 vectors the lanes of a token keep
// in registers (768 floats), so no bounds checks. Pipelines (pyfff/gpu/_fff.py):
// batch order = fff_route then fff_output; staged = fff_route_staged for the
// first stage (filling the next stage's bucket slots), fff_route for later
// stages in bucket order, then fff_output_staged (fff_bucket_scatter sorts
// between stages where slots do not apply); for one tree, the last fff_route
// forms y itself where its rows fit the registers (OUT). All give bitwise the same nodes,
// logits and y: every route kernel sums a dot product in the same order, every
// output kernel a token's terms in level order.
//
// Guarantees: every write is behind a bounds check on its index; indices into
// x, y and the weight matrices are 64-bit; the routing rule is the library's
// (go right iff logit > 0: a logit of 0 or NaN goes left); the dot product of
// a token is reduced by a shuffle butterfly whose result is broadcast from the
// group's first lane, so all its lanes take the same branch; a staged kernel
// reads a row from global memory whenever it is not in its staged rows (never,
// with a consistent sort), so a wrong order costs speed, not correctness.

#define PYFFF_FULL_MASK 0xffffffffu

// Vectors of VEC elements held per lane in registers; wider rows loop over the rest.
#define PYFFF_MAXV 6
// Bucket keys are nodes of one level <= 12 (at most 4096 buckets).
#define PYFFF_MAX_BUCKETS 4096
#define PYFFF_SCATTER_THREADS 256
#define PYFFF_SCATTER_ITEMS 2
// Largest block of fff_output (one token per warp); the host launches 256 or 768 threads.
#define PYFFF_MAX_BLOCK 768
// Largest block of fff_route (two tokens per warp, up to 128 registers per thread).
#ifndef PYFFF_ROUTE_MAX_BLOCK
#define PYFFF_ROUTE_MAX_BLOCK 512
#endif
// Block of fff_route_staged: 16 warps, up to 128 registers per thread.
#ifndef PYFFF_STAGED_ROUTE_BLOCK
#define PYFFF_STAGED_ROUTE_BLOCK 512
#endif
// Block of fff_output_staged: 1024 threads (64 registers) when a lane keeps at most 6 vectors per token x
// tokens, else 512 (128 registers).
#define PYFFF_STAGED_OUT_BLOCK(SJ, TPW) ((SJ) * (TPW) <= 6 ? 1024 : 512)

#define PYFFF_ACT_GELU 0
#define PYFFF_ACT_GELU_TANH 1
#define PYFFF_ACT_RELU 2

// ---------------------------------------------------------------- loads, stores

// VEC-wide loads, overloaded on the element count of the destination. KIND: kStream, evict-first (rows of x
// are read once per token and should not push weight rows out of L1); kReadOnly, the read-only path (__ldg);
// kShared, a plain load (rows staged in shared memory).
enum LoadKind { kReadOnly = 0, kStream = 1, kShared = 2 };

template <int KIND, typename V>
__device__ __forceinline__ V ld(const V* __restrict__ p) {
    if (KIND == kStream) return __ldcs(p);
    return __ldg(p);
}

// Shared-memory loads are written as ld.shared, so that they stay LDS instructions (short scoreboard) even
// where the compiler would otherwise merge them with a global load of the same shape into a generic load
// (long scoreboard). Volatile with a memory clobber: never moved across the block's barriers.
__device__ __forceinline__ unsigned smem_addr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void ld_shared(const float* p, float (&v)[4]) {
    asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];" : "=f"(v[0]), "=f"(v[1]), "=f"(v[2]), "=f"(v[3])
                 : "r"(smem_addr(p)) : "memory");
}
__device__ __forceinline__ void ld_shared(const double* p, double (&v)[2]) {
    asm volatile("ld.shared.v2.f64 {%0, %1}, [%2];" : "=d"(v[0]), "=d"(v[1]) : "r"(smem_addr(p)) : "memory");
}
__device__ __forceinline__ void ld_shared(const float* p, float (&v)[1]) {
    asm volatile("ld.shared.f32 %0, [%1];" : "=f"(v[0]) : "r"(smem_addr(p)) : "memory");
}
__device__ __forceinline__ void ld_shared(const double* p, double (&v)[1]) {
    asm volatile("ld.shared.f64 %0, [%1];" : "=d"(v[0]) : "r"(smem_addr(p)) : "memory");
}

template <int KIND>
__device__ __forceinline__ void load_vec(const float* __restrict__ p, float (&v)[4]) {
    if (KIND == kShared) { ld_shared(p, v); return; }
    const float4 t = ld<KIND>(reinterpret_cast<const float4*>(p));
    v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
}

template <int KIND>
__device__ __forceinline__ void load_vec(const double* __restrict__ p, double (&v)[2]) {
    if (KIND == kShared) { ld_shared(p, v); return; }
    const double2 t = ld<KIND>(reinterpret_cast<const double2*>(p));
    v[0] = t.x; v[1] = t.y;
}

template <int KIND, typename T>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, T (&v)[1]) {
    if (KIND == kShared) { ld_shared(p, v); return; }
    v[0] = ld<KIND>(p);
}

// Staging weight rows into shared memory: copy_vec starts an asynchronous copy of one VEC-wide vector from
// global to shared memory (cp.async, sm_80 and later: the copies of a thread overlap instead of each waiting
// for its load; a plain load and store before sm_80), copies_done waits for this thread's copies. The block
// then synchronises before any thread reads the rows.
template <typename T, int VEC> struct Vec;
template <> struct Vec<float, 4> { using type = float4; };
template <> struct Vec<float, 1> { using type = float; };
template <> struct Vec<double, 2> { using type = double2; };
template <> struct Vec<double, 1> { using type = double; };

template <typename T, int VEC>
__device__ __forceinline__ void copy_vec(T* __restrict__ dst, const T* __restrict__ src) {
    using V = typename Vec<T, VEC>::type;
#if __CUDA_ARCH__ >= 800
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    if (sizeof(V) == 16) asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" :: "r"(d), "l"(src) : "memory");
    else asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" :: "r"(d), "l"(src), "n"(sizeof(V)) : "memory");
#else
    *reinterpret_cast<V*>(dst) = __ldg(reinterpret_cast<const V*>(src));
#endif
}

__device__ __forceinline__ void copies_done() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
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

// ---------------------------------------------------------------- launches

// Programmatic dependent launch (sm_90 and later): the host may launch a kernel while the one before it in the
// stream is still running (its blocks then start on SMs as they free up, instead of after a full drain and a
// launch); the kernel waits here, before it reads or writes anything, for that grid to complete and its writes
// to be visible, then lets the kernel after it be launched early the same way. Every kernel calls it first
// thing. Without such a launch (or before sm_90) both instructions return at once.
__device__ __forceinline__ void grid_dependency() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
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

// Inclusive prefix sum of v over the lanes of a warp (called by all 32 lanes).
__device__ __forceinline__ int warp_inclusive_sum(int v, int lane) {
    #pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int t = __shfl_up_sync(PYFFF_FULL_MASK, v, o);
        if (lane >= o) v += t;
    }
    return v;
}

// starts[b] = counts[0] + ... + counts[b - 1] for b = 0 .. nb (shared memory; the first warp scans, each lane a
// run of buckets), then a block barrier. Called by every thread of the block.
__device__ __forceinline__ void bucket_starts(const int* __restrict__ counts, int nb, int* starts) {
    if (threadIdx.x < 32) {
        const int lane = threadIdx.x;
        const int per = (nb + 31) / 32;
        const int b0 = min(lane * per, nb);
        const int b1 = min(b0 + per, nb);
        int sum = 0;
        for (int b = b0; b < b1; ++b) sum += counts[b];
        const int incl = warp_inclusive_sum(sum, lane);
        int run = incl - sum;
        for (int b = b0; b < b1; ++b) {
            starts[b] = run;
            run += counts[b];
        }
        if (lane == 31) starts[nb] = incl;
    }
    __syncthreads();
}

// The bucket holding position p of a sorted order: the last b with starts[b] <= p (starts from bucket_starts).
__device__ __forceinline__ int bucket_of(const int* starts, int nb, long long p) {
    int b = 0, e = nb;  // starts[b] <= p < starts[e]
    while (e - b > 1) {
        const int mid = (b + e) >> 1;
        if (starts[mid] <= p) b = mid;
        else e = mid;
    }
    return b;
}

// Token at position p of tokens kept in bucket slots (slots[b * cap + r]: rank r of bucket b): -1 if out of
// range (never, for consistent counts and slots).
__device__ __forceinline__ long long slot_token(const int* __restrict__ slots, const int* starts, int nb, int cap,
                                                long long p, long long n) {
    const int b = bucket_of(starts, nb, p);
    const long long r = p - starts[b];
    const long long tok = r >= 0 && r < cap ? (long long)slots[(long long)b * cap + r] : -1;
    return (tok >= 0 && tok < n) ? tok : -1;
}

// ---------------------------------------------------------------- routing

// A token's walk is done by a group of PYFFF_ROUTE_LANES lanes (two tokens per warp): each lane keeps
// PYFFF_ROUTE_XV vectors of the token's x in registers (a row of 768 floats in all) and, per level, multiplies
// them with the same vectors of the node's row; the group reduces its partial sums with a shuffle butterfly.
// Half a warp per token halves the per-token instructions of the reduction and the bookkeeping of a level,
// which bound the walk (docs/gpu.md). The summation order is the same in every route kernel.
#ifndef PYFFF_ROUTE_LANES
#define PYFFF_ROUTE_LANES 16
#endif
#define PYFFF_ROUTE_XV (PYFFF_MAXV * 32 / PYFFF_ROUTE_LANES)

// The token's row of x in registers: vectors g + PYFFF_ROUTE_LANES * j of lane g of the group (zero past the
// row's end). EXACT: the row is exactly PYFFF_ROUTE_LANES * PYFFF_ROUTE_XV vectors (no bounds checks).
// keep: x is read again by a later stage, so its lines stay in L2 with the normal policy (else evict-first).
template <bool EXACT, typename T, int VEC>
__device__ __forceinline__ void load_x(const T* __restrict__ xt, int nvec, int g, bool keep,
                                       T (&xr)[PYFFF_ROUTE_XV][VEC]) {
    const T* __restrict__ xg = xt + g * VEC;  // the lane's first vector; the others at constant offsets
    #pragma unroll
    for (int j = 0; j < PYFFF_ROUTE_XV; ++j) {
        const int v = g + PYFFF_ROUTE_LANES * j;
        if (EXACT || v < nvec) {
            if (keep) load_vec<kReadOnly>(xg + PYFFF_ROUTE_LANES * VEC * j, xr[j]);
            else load_vec<kStream>(xg + PYFFF_ROUTE_LANES * VEC * j, xr[j]);
        } else {
            #pragma unroll
            for (int c = 0; c < VEC; ++c) xr[j][c] = T(0);
        }
    }
}

// w . x for one row w (nvec vectors, read with loads of KIND: global or shared memory) and the token's x
// (xr in registers, the rest of a wider row read from xt), reduced over the lane group. Every lane of the
// group returns the sum of the group's first lane, so that all take the same branch. The summation order
// does not depend on KIND or EXACT. Called by all lanes of the warp together (full-mask shuffles; the
// butterfly's offsets stay inside a group).
template <int KIND, bool EXACT, typename T, int VEC>
__device__ __forceinline__ T group_dot(const T* __restrict__ w, const T (&xr)[PYFFF_ROUTE_XV][VEC],
                                       const T* __restrict__ xt, int nvec, int lane) {
    const int g = lane & (PYFFF_ROUTE_LANES - 1);
    const T* __restrict__ wg = w + g * VEC;  // the lane's first vector; the others at constant offsets
    T acc[VEC];
    #pragma unroll
    for (int c = 0; c < VEC; ++c) acc[c] = T(0);
    #pragma unroll
    for (int j = 0; j < PYFFF_ROUTE_XV; ++j) {
        const int v = g + PYFFF_ROUTE_LANES * j;
        if (EXACT || v < nvec) {
            T wv[VEC];
            load_vec<KIND>(wg + PYFFF_ROUTE_LANES * VEC * j, wv);
            #pragma unroll
            for (int c = 0; c < VEC; ++c) acc[c] = fma(wv[c], xr[j][c], acc[c]);
        }
    }
    if (!EXACT) {
        for (int v = g + PYFFF_ROUTE_LANES * PYFFF_ROUTE_XV; v < nvec; v += PYFFF_ROUTE_LANES) {  // wider rows
            T wv[VEC], xv[VEC];
            load_vec<KIND>(w + (long long)v * VEC, wv);
            load_vec<kReadOnly>(xt + (long long)v * VEC, xv);
            #pragma unroll
            for (int c = 0; c < VEC; ++c) acc[c] = fma(wv[c], xv[c], acc[c]);
        }
    }
    T s = acc[0];
    #pragma unroll
    for (int c = 1; c < VEC; ++c) s += acc[c];
    #pragma unroll
    for (int offset = PYFFF_ROUTE_LANES / 2; offset > 0; offset >>= 1) s += __shfl_xor_sync(PYFFF_FULL_MASK, s, offset);
    return __shfl_sync(PYFFF_FULL_MASK, s, lane & ~(PYFFF_ROUTE_LANES - 1));
}

// The node a token visits at level lo of a tree: the root, or the child chosen at level lo - 1.
template <typename T>
__device__ __forceinline__ long long start_node(const int* __restrict__ nodes, const T* __restrict__ logits,
                                                long long base, int lo) {
    if (lo == 0) return 0;
    return 2LL * nodes[base + lo - 1] + 1 + (logits[base + lo - 1] > T(0) ? 1 : 0);  // ties and NaN go left
}

// Subtrees staged in shared memory. The subtree of levels [lo, hi) below node `key` of level lo (key counted
// from the level's first node) has 2**(hi - lo) - 1 rows, kept in breadth-first order: local row
// (2**j - 1) + k is node (2**(lo + j) - 1) + key * 2**j + k of level lo + j. Local row of `node` of `level`,
// or -1 when the node is not in the subtree.
__device__ __forceinline__ int subtree_row(int node, int level, int lo, int key) {
    const int j = level - lo;
    const int k = node - ((1 << level) - 1) - (key << j);
    return (j >= 0 && k >= 0 && k < (1 << j)) ? ((1 << j) - 1) + k : -1;
}

// The ancestor at level l of `node` of level `level` (l <= level).
__device__ __forceinline__ int ancestor(int node, int level, int l) { return ((node + 1) >> (level - l)) - 1; }

// Node of local row r of that subtree.
__device__ __forceinline__ int subtree_node(int r, int lo, int key) {
    const int j = 31 - __clz(r + 1);  // level within the subtree
    return ((1 << (lo + j)) - 1) + (key << j) + (r - ((1 << j) - 1));
}

// A token's bucket slot whose rank is still on its way from the atomic (k < 0: none).
struct PendingSlot {
    int k, rank, tok;
};

__device__ __forceinline__ void store_slot(PendingSlot& pend, int* __restrict__ slots, int slot_cap) {
    if (pend.k >= 0 && pend.rank < slot_cap) slots[(long long)pend.k * slot_cap + pend.rank] = pend.tok;
    pend.k = -1;
}

// Walk token `tok` through levels [lo, hi) of tree `tree` (all lanes of the warp together, one token per
// lane group; only a group's first lane writes, and only if `store`). xr: the token's row of x (load_x).
// STAGED: the first `srows` rows (breadth-first) of the subtree below node `key` of level lo are in shared
// memory (sw, sb; key < 0: none); a level where some token of the warp is outside them (below the staged levels, say)
// reads all rows from global memory (the same values, the same sums). Bucket keys (key_level >= 0): counts[key] += 1,
// and the token goes to keys[tok] = key for fff_bucket_scatter, or, when slot_cap > 0, straight into its bucket's
// slots: slots[key][rank] = tok, its rank being the count before its increment (the order inside a bucket depends on
// timing). That store is left in `pend` for the caller (store_slot), which makes it after starting its next token's
// loads, so that the atomic's round trip overlaps them. Lane g of the group also keeps the node and logit of level g
// (t_node, t_z), for an output formed by the same kernel (output_token).
template <bool STAGED, bool EXACT, typename T, int VEC>
__device__ __forceinline__ void walk_token(
    long long tok, bool store, int lane, const T (&xr)[PYFFF_ROUTE_XV][VEC], const T* __restrict__ x, int d_in,
    const T* __restrict__ w_in,
    const T* __restrict__ b_in, int has_bias, int n_trees, int depth, int tree, int lo, int hi,
    int* __restrict__ nodes, T* __restrict__ logits, int key_level, int* __restrict__ keys,
    int* __restrict__ counts, int slot_cap, PendingSlot& pend, const T* sw, const T* sb, int key, int srows,
    int& t_node, T& t_z)
{
    const int nvec = d_in / VEC;
    const long long n_nodes = (2LL << depth) - 1;
    const bool leader = store && (lane & (PYFFF_ROUTE_LANES - 1)) == 0;
    const T* __restrict__ xt = x + tok * d_in;  // the rest of a row wider than xr

    const long long base = (tok * n_trees + tree) * (depth + 1);
    int* __restrict__ tok_nodes = nodes + base;
    T* __restrict__ tok_logits = logits + base;
    int node = (int)start_node(nodes, logits, base, lo);  // nodes < 2**31
    // local row of the node in the staged subtree (breadth-first, so children of r are 2r + 1 and 2r + 2), or -1
    int r = STAGED && key >= 0 && node == ((1 << lo) - 1) + key ? 0 : -1;
    const T* __restrict__ w_tree = w_in + (long long)tree * n_nodes * d_in;
    const T* __restrict__ b_tree = b_in + (long long)tree * n_nodes;
    int key_node = 0;
    int level = lo;
    // after a level's logit z: the stores, this lane's term, the key, and the child to visit (returns the branch)
    auto step = [&](T z) {
        if (leader) {
            tok_nodes[level] = node;
            tok_logits[level] = z;
        }
        if ((lane & (PYFFF_ROUTE_LANES - 1)) == level) {
            t_node = node;
            t_z = z;
        }
        if (level == key_level) key_node = node;
        const int right = z > T(0) ? 1 : 0;  // ties and NaN go left
        node = 2 * node + 1 + right;
        return right;
    };
    // The staged levels (2**k - 1 = srows rows) from shared memory when every token of the warp starts in the
    // staged subtree (warp-uniform; always, with a consistent sort), the levels below them through L1/L2: two
    // loops, so that neither carries the other's loads.
    if (STAGED && __all_sync(PYFFF_FULL_MASK, r >= 0)) {
        const int staged_hi = min(hi, lo + 31 - __clz(srows + 1));
        for (; level < staged_hi; ++level) {
            T z = group_dot<kShared, EXACT>(sw + (long long)r * d_in, xr, xt, nvec, lane);
            if (has_bias) {
                T b[1];
                ld_shared(sb + r, b);
                z += b[0];
            }
            r = 2 * r + 1 + step(z);
        }
    }
    for (; level < hi; ++level) {
        T z = group_dot<kReadOnly, EXACT>(w_tree + (long long)node * d_in, xr, xt, nvec, lane);
        if (has_bias) z += __ldg(b_tree + node);
        step(z);
    }
    if (key_level == hi) key_node = node;
    if (key_level >= 0 && leader) {  // bucket key: the node of key_level, counted from the level's first node
        const int k = key_node - ((1 << key_level) - 1);
        if (k >= 0 && k < (1 << key_level)) {
            const int rank = atomicAdd(counts + k, 1);  // the token's place in its bucket
            if (slot_cap > 0) pend = {k, rank, (int)tok};  // stored by the caller once the rank is back
            else keys[tok] = k;
        }
    }
}

// y[tok] = sum over levels l < levels of act(logit l) * w_out[node l] (one tree), formed by the token's lane
// group right after its walk: lane g holds the node and logit of level g (levels <= PYFFF_ROUTE_LANES), and
// the group keeps vectors g + PYFFF_ROUTE_LANES * j of the row of y in registers (x's registers, no longer
// needed), reading the rows through L1/L2 in level order: the same sums in the same order as fff_output, so
// bitwise the same y. EXACT_OUT: a row of y is exactly PYFFF_ROUTE_LANES * PYFFF_ROUTE_XV vectors (else the
// host guarantees at most that many). Only if `store` is the row written.
template <bool EXACT_OUT, typename T, int VEC>
__device__ __forceinline__ void output_token(long long tok, bool store, int lane, int t_node, T t_z, int levels,
                                             int act, const T* __restrict__ w_out, int d_out, T* __restrict__ y) {
    const int g = lane & (PYFFF_ROUTE_LANES - 1);
    const int first = lane & ~(PYFFF_ROUTE_LANES - 1);
    const int nvec = d_out / VEC;
    const T a_l = g < levels ? activation(t_z, act) : T(0);
    T acc[PYFFF_ROUTE_XV][VEC];
    #pragma unroll
    for (int j = 0; j < PYFFF_ROUTE_XV; ++j) {
        #pragma unroll
        for (int c = 0; c < VEC; ++c) acc[j][c] = T(0);
    }
    for (int l = 0; l < levels; ++l) {  // warp-uniform
        const int nd = __shfl_sync(PYFFF_FULL_MASK, t_node, first + l);
        const T a = __shfl_sync(PYFFF_FULL_MASK, a_l, first + l);
        const T* __restrict__ wr = w_out + (long long)nd * d_out + g * VEC;  // the lane's first vector of the row
        #pragma unroll
        for (int j = 0; j < PYFFF_ROUTE_XV; ++j) {
            const int v = g + PYFFF_ROUTE_LANES * j;
            if (EXACT_OUT || v < nvec) {
                T w[VEC];
                load_vec<kReadOnly>(wr + PYFFF_ROUTE_LANES * VEC * j, w);
                #pragma unroll
                for (int c = 0; c < VEC; ++c) acc[j][c] = fma(a, w[c], acc[j][c]);
            }
        }
    }
    if (!store) return;
    T* __restrict__ yt = y + tok * d_out + g * VEC;
    #pragma unroll
    for (int j = 0; j < PYFFF_ROUTE_XV; ++j) {
        const int v = g + PYFFF_ROUTE_LANES * j;
        if (EXACT_OUT || v < nvec) store_vec<T, VEC>(yt + PYFFF_ROUTE_LANES * VEC * j, acc[j]);
    }
}

// Walk levels [lo, hi) of tree `tree` for every token, rows read from global memory (L1/L2).
//
// Positions p = 0 .. n-1 are split into one contiguous chunk per block, two
// neighbouring positions per warp (one per half). Token of position p:
// order[p] if use_order else p.
//
// lo > 0 continues a walk: the start node is the child chosen by the node and
// logit stored at level lo - 1. key_level in [lo, hi] (or -1: none) names the
// level whose node becomes the token's bucket key (key_level == hi: the next
// node to visit); keys[tok] = node - (2**key_level - 1) and counts[key] += 1
// (or slots, see walk_token).
//
// use_order == 2: the previous stage left its tokens in bucket slots (order = slots, (2**lo, in_cap),
// in_counts = its histogram by the node of level lo): every block computes the bucket starts (dynamic shared
// memory: (2**lo + 1) ints), position p is rank p - start[b] of the bucket b holding it, and the kernel writes
// the sorted order (perm_out) and, block 0, the bucket starts (starts_out) for the kernels after it.
//
// OUT > 0 (the last stage of a one-tree layer, levels = depth + 1 <= PYFFF_ROUTE_LANES, a row of y at most
// PYFFF_ROUTE_LANES * PYFFF_ROUTE_XV vectors; 2: exactly that many): the kernel also forms y (output_token),
// so that no output kernel runs; the terms of levels < lo come from `nodes` and `logits`.
template <typename T, int VEC, bool EXACT, int OUT>
__global__ void __launch_bounds__(PYFFF_ROUTE_MAX_BLOCK, 1) fff_route(
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
    int* __restrict__ counts,        // IN/OUT (2**key_level,) histogram of keys
    const int keep_x,                // a later stage reads x again: keep it in L2 (see load_x)
    int* __restrict__ slots,         // OUT (2**key_level, slot_cap) tokens by bucket, if slot_cap > 0
    const int slot_cap,
    const int* __restrict__ in_counts,  // IN  (2**lo,) bucket sizes of `order`, if use_order == 2
    const int in_cap,
    int* __restrict__ perm_out,      // OUT (n,) tokens in bucket order, if use_order == 2
    int* __restrict__ starts_out,    // OUT (2**lo + 1,) bucket starts of perm_out, if use_order == 2
    const T* __restrict__ w_out,     // IN  (n_nodes, d_out), read only if OUT
    const int d_out,                 // multiple of VEC
    const int act,
    T* __restrict__ y)               // OUT (n, d_out), written only if OUT
{
    grid_dependency();  // programmatic dependent launch (see grid_dependency)
    extern __shared__ __align__(16) unsigned char pyfff_smem[];
    const int lane = threadIdx.x & 31;
    const int g = lane & (PYFFF_ROUTE_LANES - 1);
    const int slot = threadIdx.x / PYFFF_ROUTE_LANES;  // this lane group's token slot in the block
    const int n_slots = blockDim.x / PYFFF_ROUTE_LANES;
    const PositionRange range = block_positions(n);
    int* starts = reinterpret_cast<int*>(pyfff_smem);  // (2**lo + 1,) if use_order == 2
    PendingSlot pend = {-1, 0, 0};
    if (use_order == 2) {  // block-uniform
        bucket_starts(in_counts, 1 << lo, starts);
        if (blockIdx.x == 0)
            for (int b = threadIdx.x; b <= (1 << lo); b += blockDim.x) starts_out[b] = starts[b];
    }
    // warp-uniform loop: a group past the end repeats its neighbour's token without storing
    // (x is loaded when the walk starts: copying the next token's x into shared memory during the walk
    // measured slower, docs/gpu.md)
    for (long long p0 = range.begin + (slot & ~1); p0 < range.end; p0 += n_slots) {
        const long long p = p0 + (slot & 1) < range.end ? p0 + (slot & 1) : p0;
        const bool store = p == p0 + (slot & 1);
        const long long tok = use_order == 2 ? slot_token(order, starts, 1 << lo, in_cap, p, n)
                                             : token_at(order, use_order, p, n);
        if (__any_sync(PYFFF_FULL_MASK, tok < 0)) continue;  // never, for a valid permutation
        if (use_order == 2 && store && (lane & (PYFFF_ROUTE_LANES - 1)) == 0) perm_out[p] = (int)tok;
        T xr[PYFFF_ROUTE_XV][VEC];  // the token's row of x stays in registers for all levels
        load_x<EXACT>(x + tok * d_in, d_in / VEC, g, keep_x, xr);
        int t_node = 0;  // lane g: the node and logit of level g (OUT)
        T t_z = T(0);
        if (OUT && g < lo) {  // levels of earlier stages
            const long long base = (tok * n_trees + tree) * (depth + 1);
            t_node = nodes[base + g];
            t_z = logits[base + g];
        }
        store_slot(pend, slots, slot_cap);  // the previous token's
        walk_token<false, EXACT, T, VEC>(tok, store, lane, xr, x, d_in, w_in, b_in, has_bias, n_trees, depth,
                                         tree, lo, hi, nodes, logits, key_level, keys, counts, slot_cap, pend,
                                         (const T*)nullptr, (const T*)nullptr, -1, 0, t_node, t_z);
        if (OUT) output_token<OUT == 2, T, VEC>(tok, store, lane, t_node, t_z, depth + 1, act, w_out, d_out, y);
    }
    store_slot(pend, slots, slot_cap);
}

// The segment of positions [p, end) that a block handles with one staged subtree: tokens sorted by their
// node of level `level` (order from fff_bucket_scatter, whose bucket b holds positions
// [starts[b], starts[b + 1])) share it up to the end of the bucket. A sort by the node of a deeper level
// (level + shift: the leaf, say) is a finer one whose buckets b << shift .. ((b + 1) << shift) - 1 make up
// bucket b. Without a sort (use_order == 0) only level 0 is shared by all; deeper, a segment is one position.
// Always at least one position.
__device__ __forceinline__ long long segment_end(long long p, long long end, long long key, int level,
                                                 const int* __restrict__ starts, int use_order, int shift = 0) {
    long long e = p + 1;
    if (level == 0) e = end;
    else if (use_order && key >= 0 && key < (1LL << level)) e = min(end, (long long)starts[(key + 1) << shift]);
    return max(e, p + 1);
}

// fff_route with the rows of each segment's subtree (levels [lo, lo + staged_levels) of levels [lo, hi),
// weights and biases) staged in shared memory by the whole block, so that each row crosses L2 once per
// segment instead of once per token; deeper levels read their rows through L1/L2 as fff_route does.
// Same arguments as fff_route (up to starts_out) plus `starts` (bucket starts of the sort that produced
// `order`, by the node of level lo) and staged_levels, launched with (2**staged_levels - 1) * (d_in + 1) * sizeof(T)
// bytes of dynamic shared memory (rounded up to 16). Same sums in the same order as fff_route: bitwise the same nodes
// and logits. A token whose node is not in the staged subtree (never, with a consistent sort) reads that row from
// global memory.
template <typename T, int VEC, bool EXACT>
__global__ void __launch_bounds__(PYFFF_STAGED_ROUTE_BLOCK, 1) fff_route_staged(
    const T* __restrict__ x, const long long n, const int d_in, const T* __restrict__ w_in,
    const T* __restrict__ b_in, const int has_bias, const int n_trees, const int depth, const int tree,
    const int lo, const int hi, const int* __restrict__ order, const int use_order,
    int* __restrict__ nodes, T* __restrict__ logits, const int key_level, int* __restrict__ keys,
    int* __restrict__ counts, const int keep_x, int* __restrict__ slots, const int slot_cap,
    const int* __restrict__ in_counts, const int in_cap, int* __restrict__ perm_out, int* __restrict__ starts_out,
    const int* __restrict__ starts,  // IN  (2**lo + 1,) bucket starts of `order`, read only if use_order
    const int staged_levels)         // 1 .. hi - lo
{
    grid_dependency();  // programmatic dependent launch (see grid_dependency)
    extern __shared__ __align__(16) unsigned char pyfff_smem[];
    const int lane = threadIdx.x & 31;
    const int slot = threadIdx.x / PYFFF_ROUTE_LANES;
    const int n_slots = blockDim.x / PYFFF_ROUTE_LANES;
    const int nvec = d_in / VEC;
    const int levels = depth + 1;
    const long long n_nodes = (2LL << depth) - 1;
    const int rows = (1 << staged_levels) - 1;
    T* sw = reinterpret_cast<T*>(pyfff_smem);  // (rows, d_in)
    T* sb = sw + (long long)rows * d_in;        // (rows,)
    const PositionRange range = block_positions(n);
    PendingSlot pend = {-1, 0, 0};

    long long p = range.begin;
    while (p < range.end) {  // block-uniform: one staged subtree per segment
        const long long tok0 = token_at(order, use_order, p, n);
        const int k0 = tok0 < 0 ? -1
            : (int)start_node(nodes, logits, (tok0 * n_trees + tree) * levels, lo) - ((1 << lo) - 1);
        const int key = k0 >= 0 && k0 < (1 << lo) ? k0 : -1;  // -1: nothing staged
        const long long seg_end = segment_end(p, range.end, key, lo, starts, use_order);
        __syncthreads();  // the previous segment's rows are no longer read
        if (key >= 0) {
            for (int r = threadIdx.x >> 5; r < rows; r += blockDim.x >> 5) {  // a warp per row
                const T* __restrict__ src = w_in + ((long long)tree * n_nodes + subtree_node(r, lo, key)) * d_in;
                for (int c = lane; c < nvec; c += 32)
                    copy_vec<T, VEC>(sw + (long long)r * d_in + c * VEC, src + c * VEC);
            }
            if (has_bias) {
                for (int r = threadIdx.x; r < rows; r += blockDim.x)
                    sb[r] = __ldg(b_in + (long long)tree * n_nodes + subtree_node(r, lo, key));
            }
            copies_done();
        }
        __syncthreads();

        // warp-uniform loop: a group past the segment's end repeats its neighbour's token without storing
        // (x is loaded when the walk starts: loading a segment's first x during the fill measured slower)
        for (long long q0 = p + (slot & ~1); q0 < seg_end; q0 += n_slots) {
            const long long q = q0 + (slot & 1) < seg_end ? q0 + (slot & 1) : q0;
            const long long tok = token_at(order, use_order, q, n);
            const bool store = q == q0 + (slot & 1);
            if (__any_sync(PYFFF_FULL_MASK, tok < 0)) continue;  // never, for a valid permutation
            T xr[PYFFF_ROUTE_XV][VEC];  // the token's row of x stays in registers for all levels
            load_x<EXACT>(x + tok * d_in, nvec, lane & (PYFFF_ROUTE_LANES - 1), keep_x, xr);
            store_slot(pend, slots, slot_cap);  // the previous token's
            int t_node;  // unused: no output here
            T t_z;
            walk_token<true, EXACT, T, VEC>(tok, store, lane, xr, x, d_in, w_in, b_in, has_bias, n_trees, depth,
                                            tree, lo, hi, nodes, logits, key_level, keys, counts, slot_cap, pend,
                                            (const T*)sw, (const T*)sb, key, rows, t_node, t_z);
        }
        p = seg_end;
    }
    store_slot(pend, slots, slot_cap);
}

// ---------------------------------------------------------------- counting sort

// perm = the tokens 0 .. n-1 grouped by keys[token], bucket 0 first; starts = where each bucket begins.
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
    int* __restrict__ perm,          // OUT (n,)
    int* __restrict__ starts)        // OUT (n_buckets + 1,) bucket b is perm[starts[b] : starts[b + 1]]
{
    grid_dependency();  // programmatic dependent launch (see grid_dependency)
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
    const int incl = warp_inclusive_sum(sum, lane);
    if (lane == 31) warp_total[warp] = incl;
    __syncthreads();
    int run = incl - sum;
    for (int w = 0; w < warp; ++w) run += warp_total[w];
    for (int b = b0; b < b1; ++b) {
        offset[b] = run;
        if (blockIdx.x == 0) starts[b] = run;
        run += counts[b];
        local[b] = 0;
    }
    if (blockIdx.x == 0 && tid == PYFFF_SCATTER_THREADS - 1) starts[nb] = run;  // the last run ends at the total
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
    grid_dependency();  // programmatic dependent launch (see grid_dependency)
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
                            load_vec<kReadOnly>(wr + (long long)v * VEC, w);
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

// One warp's TPW tokens of fff_output_staged (below): y[tok, slice] = sum over levels l of
// act(logit[tok, l]) * w_out[node[tok, l], slice], in level order. FULL: the slice has 32 * SJ vectors (no
// bounds checks). A term's row comes from shared memory where it is staged (row l for an ancestor level
// l < s, s + the subtree row below), else from global memory; a row that a token shares with the token
// before it is loaded once.
// A warp's TPW tokens and, in lane l, their node and logit of level l. The loop of fff_output_staged loads
// the tokens two groups ahead and their nodes and logits one group ahead, so that neither load waits.
template <typename T, int TPW>
struct TokenTerms {
    int tok[TPW];  // < n <= 2**31 - 1; -1: none
    int nd[TPW];
    T z[TPW];
};

template <int TPW>
__device__ __forceinline__ void load_tokens(long long q, long long seg_end, const int* __restrict__ order,
                                            int use_order, long long n, int (&tok)[TPW]) {
    #pragma unroll
    for (int t = 0; t < TPW; ++t) tok[t] = q + t < seg_end ? (int)token_at(order, use_order, q + t, n) : -1;
}

template <typename T, int TPW>
__device__ __forceinline__ TokenTerms<T, TPW> load_terms(const int (&tok)[TPW], const int* __restrict__ nodes,
                                                         const T* __restrict__ logits, int levels, int lane) {
    TokenTerms<T, TPW> tt;
    #pragma unroll
    for (int t = 0; t < TPW; ++t) {
        tt.tok[t] = tok[t];
        tt.nd[t] = 0;
        tt.z[t] = T(0);
        if (tt.tok[t] >= 0 && lane < levels) {
            tt.nd[t] = __ldg(nodes + (long long)tt.tok[t] * levels + lane);
            tt.z[t] = __ldg(logits + (long long)tt.tok[t] * levels + lane);
        }
    }
    return tt;
}

// acc[t] += act(logit l) * row l of token t for l = 0 .. levels - 1 (in that order), the warp's TPW tokens at
// once: lane l holds row_l[t] (the term's row in `src`, from the lane's first vector on, `stride` elements
// apart: staged rows in shared memory if SMEM, else the nodes' rows of w_out) and a_l[t]; a row shared with
// the token before is loaded once.
template <bool SMEM, bool FULL, typename T, int VEC, int SJ, int TPW>
__device__ __forceinline__ void sum_terms(const int (&tok)[TPW], const int (&row_l)[TPW], const T (&a_l)[TPW],
                                          int levels, const T* __restrict__ src, int stride, int sv, int lane,
                                          T (&acc)[TPW][SJ][VEC]) {
    for (int l = 0; l < levels; ++l) {
        T w[SJ][VEC];
        int held = -1;  // row whose slice is in w
        #pragma unroll
        for (int t = 0; t < TPW; ++t) {
            const int row = __shfl_sync(PYFFF_FULL_MASK, row_l[t], l);
            const T ak = __shfl_sync(PYFFF_FULL_MASK, a_l[t], l);
            if (tok[t] < 0) continue;  // warp-uniform
            if (row != held) {         // warp-uniform: a row shared with the token before is loaded once
                const T* __restrict__ r = src + (long long)row * stride;
                #pragma unroll
                for (int j = 0; j < SJ; ++j)
                    if (FULL || lane + 32 * j < sv) load_vec<SMEM ? kShared : kReadOnly>(r + 32 * j * VEC, w[j]);
                held = row;
            }
            #pragma unroll
            for (int j = 0; j < SJ; ++j) {
                #pragma unroll
                for (int c = 0; c < VEC; ++c) acc[t][j][c] = fma(ak, w[j][c], acc[t][j][c]);
            }
        }
    }
}

template <bool FULL, typename T, int VEC, int SJ, int TPW>
__device__ __forceinline__ void output_tokens(
    const TokenTerms<T, TPW>& tt, int levels, int act,
    const T* __restrict__ w_out, int d_out, const T* sw, int stride, int s, int key, bool staged, int v0, int sv,
    int lane, T* __restrict__ y)
{
    const int (&tok)[TPW] = tt.tok;
    const int key_node = ((1 << s) - 1) + key;
    int node_l[TPW];  // lane l: the token's node, its staged row (or -1) and activation of term l
    int row_l[TPW];
    T a_l[TPW];
    bool all_staged = true;
    #pragma unroll
    for (int t = 0; t < TPW; ++t) {
        node_l[t] = 0;
        row_l[t] = 0;
        a_l[t] = T(0);
        if (tok[t] >= 0 && lane < levels) {
            const int nd = tt.nd[t];
            int r = -1;
            if (staged) {
                if (lane < s) r = nd == ancestor(key_node, s, lane) ? lane : -1;
                else {
                    const int k = subtree_row(nd, lane, s, key);
                    r = k >= 0 ? s + k : -1;
                }
            }
            node_l[t] = nd;
            row_l[t] = r;
            a_l[t] = activation(tt.z[t], act);
            all_staged = all_staged && r >= 0;
        }
    }
    T acc[TPW][SJ][VEC];
    #pragma unroll
    for (int t = 0; t < TPW; ++t) {
        #pragma unroll
        for (int j = 0; j < SJ; ++j) {
            #pragma unroll
            for (int c = 0; c < VEC; ++c) acc[t][j][c] = T(0);
        }
    }
    // Rows from shared memory when every term of the warp's tokens is staged (always, with a consistent sort),
    // else all from global memory (two instantiations of the loop, so that neither carries the other's loads).
    if (__all_sync(PYFFF_FULL_MASK, all_staged))
        sum_terms<true, FULL, T, VEC, SJ, TPW>(tok, row_l, a_l, levels, sw + lane * VEC, stride, sv, lane, acc);
    else
        sum_terms<false, FULL, T, VEC, SJ, TPW>(tok, node_l, a_l, levels, w_out + (long long)(v0 + lane) * VEC,
                                                d_out, sv, lane, acc);
    #pragma unroll
    for (int t = 0; t < TPW; ++t) {
        if (tok[t] < 0) continue;
        T* __restrict__ yt = y + (long long)tok[t] * d_out + (long long)(v0 + lane) * VEC;
        #pragma unroll
        for (int j = 0; j < SJ; ++j)
            if (FULL || lane + 32 * j < sv) store_vec<T, VEC>(yt + 32 * j * VEC, acc[t][j]);
    }
}

// fff_output for a one-tree layer with the weight rows staged in shared memory, per segment and column slice.
//
// Positions are sorted by the token's node of level key_level, or of a deeper level (the leaf: then
// neighbouring tokens share most rows) (`order` and `starts` from fff_bucket_scatter; key_level 0: any
// order, one segment per block). The tokens of a segment share their
// nodes of levels 0 .. key_level (the key node and its ancestors), and their deeper nodes lie in the key
// node's subtree. For its slice of the columns (blockIdx.y: vectors [v0, v0 + slice_vecs) of each row) the
// block stages the key_level ancestor rows, then the 2**(depth + 1 - key_level) - 1 rows of the subtree in
// the breadth-first order of fff_route_staged: (key_level + 2**(depth + 1 - key_level) - 1) * slice_vecs *
// VEC * sizeof(T) bytes of dynamic shared memory. A warp forms TPW neighbouring tokens' outputs at once and
// loads a row that a token shares with the one before it once; each lane keeps SJ vectors of each token's
// slice (slice_vecs <= 32 * SJ). Same sums in the same order as fff_output: bitwise the same y. A node
// outside the staged rows (never, with a consistent sort) is read from global memory.
template <typename T, int VEC, int SJ, int TPW>
__global__ void __launch_bounds__(PYFFF_STAGED_OUT_BLOCK(SJ, TPW), 1) fff_output_staged(
    const int* __restrict__ nodes,   // IN  (n, 1, depth + 1)
    const T* __restrict__ logits,    // IN  (n, 1, depth + 1)
    const long long n,
    const int d_out,                 // multiple of VEC
    const T* __restrict__ w_out,     // IN  (n_nodes, d_out)
    const int depth,                 // depth + 1 <= 32: one term per lane
    const int act,
    const int* __restrict__ order,   // IN  (n,), read only if use_order
    const int use_order,
    const int* __restrict__ starts,  // IN  (2**(key_level + starts_shift) + 1,) bucket starts of `order`
    const int key_level,
    const int starts_shift,          // `order` sorted by the node of level key_level + starts_shift (>= 0)
    const int slice_vecs,            // vectors per column slice, 1 .. 32 * SJ
    T* __restrict__ y,               // OUT (n, d_out)
    const int* __restrict__ key_counts)  // IN  (2**key_level,) bucket sizes of `order`, or nullptr (below)
{
    extern __shared__ __align__(16) unsigned char pyfff_smem[];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int n_warps = blockDim.x >> 5;
    const int nvec = d_out / VEC;
    const int levels = depth + 1;
    const int s = key_level;
    const int rows = s + (1 << (levels - s)) - 1;
    const int v0 = blockIdx.y * slice_vecs;
    const int sv = min(slice_vecs, nvec - v0);  // vectors in this block's slice
    const int stride = slice_vecs * VEC;         // elements per staged row
    T* sw = reinterpret_cast<T*>(pyfff_smem);   // (rows, stride)
    const PositionRange range = block_positions(n);
    // the rows of `key` for this block's slice (a warp per row)
    auto stage_rows = [&](int key) {
        const int key_node = ((1 << s) - 1) + key;
        for (int r = warp; r < rows; r += n_warps) {
            const long long node = r < s ? ancestor(key_node, s, r) : subtree_node(r - s, s, key);
            const T* __restrict__ src = w_out + node * d_out + (long long)v0 * VEC;
            for (int c = lane; c < sv; c += 32) copy_vec<T, VEC>(sw + r * stride + c * VEC, src + c * VEC);
        }
        copies_done();
    };
    // Before waiting for the kernel before this one (grid_dependency), with key_counts (the histogram of the
    // sort that `order` follows, written by a kernel that finished before that one started): the first
    // segment's bucket is the one holding position range.begin, so its rows are staged while the route's last
    // blocks finish. Needs (2**key_level + 1) ints of shared memory after the rows.
    int pre_key = -1;
    if (key_counts != nullptr && sv > 0 && range.begin < range.end) {  // block-uniform
        int* pstarts = reinterpret_cast<int*>(sw + (long long)rows * stride);
        bucket_starts(key_counts, 1 << s, pstarts);
        pre_key = bucket_of(pstarts, 1 << s, range.begin);
        stage_rows(pre_key);
    }
    grid_dependency();  // programmatic dependent launch (see grid_dependency)
    if (sv <= 0) return;

    long long p = range.begin;
    while (p < range.end) {  // block-uniform: one set of staged rows per segment
        const long long tok0 = token_at(order, use_order, p, n);
        const int k0 = tok0 < 0 ? -1 : nodes[tok0 * levels + s] - ((1 << s) - 1);  // nodes < 2**31
        const int key = k0 >= 0 && k0 < (1 << s) ? k0 : -1;  // -1: nothing staged
        const long long seg_end = segment_end(p, range.end, key, s, starts, use_order, starts_shift);
        __syncthreads();  // the previous segment's rows are no longer read
        if (key >= 0 && !(p == range.begin && key == pre_key)) stage_rows(key);  // else staged before the wait
        __syncthreads();

        // warp-uniform loop; the next group's tokens, nodes and logits are loaded before this group's sums
        const long long step = (long long)n_warps * TPW;
        const long long q0 = p + (long long)warp * TPW;
        int tok[TPW], tok_next[TPW];
        load_tokens<TPW>(q0, seg_end, order, use_order, n, tok);
        TokenTerms<T, TPW> cur = load_terms<T, TPW>(tok, nodes, logits, levels, lane);
        load_tokens<TPW>(q0 + step, seg_end, order, use_order, n, tok_next);
        for (long long q = q0; q < seg_end; q += step) {
            load_tokens<TPW>(q + 2 * step, seg_end, order, use_order, n, tok);  // two groups ahead
            const TokenTerms<T, TPW> next = load_terms<T, TPW>(tok_next, nodes, logits, levels, lane);
            if (sv == 32 * SJ) {
                output_tokens<true, T, VEC, SJ, TPW>(cur, levels, act, w_out, d_out, sw, stride, s, key, key >= 0,
                                                     v0, sv, lane, y);
            } else {
                output_tokens<false, T, VEC, SJ, TPW>(cur, levels, act, w_out, d_out, sw, stride, s, key, key >= 0,
                                                      v0, sv, lane, y);
            }
            cur = next;
            #pragma unroll
            for (int t = 0; t < TPW; ++t) tok_next[t] = tok[t];
        }
        p = seg_end;
    }
}

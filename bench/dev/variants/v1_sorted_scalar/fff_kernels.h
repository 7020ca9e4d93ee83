/*
 * fff_kernels.h -- the C kernels behind pyfff's CPU FFF layer.
 *
 * Conditional matrix multiplication (CMM) for a fast feedforward layer:
 * every token walks one root-to-leaf path of a balanced binary tree of
 * neurons, takes a dot product with each visited node's input row, and adds
 * act(logit) * the node's output row to its output.
 *
 * Readable reference: pyfff/reference.py.  Tests: tests/test_fff_kernel.py.
 *
 * Guarantees
 * ----------
 * - A token's result depends only on the token and the weights: never on the
 *   other tokens of its tile, the tile size, the thread count, or the order in
 *   which tokens are visited.  Every dot product and every output element is
 *   summed in one fixed order (see dot_*, accumulate_path_*), so results are
 *   bitwise identical for every n_threads.
 * - Routing: go right when the logit is > 0; a logit of exactly 0 (and NaN)
 *   goes left, as upstream's `logits > 0`.
 * - No allocation: the caller hands in scratch memory (fff_scratch_bytes_*).
 *
 * How the batch kernel saves memory traffic (docs/performance.md has numbers)
 * ---------------------------------------------------------------------------
 * A tile of tokens is routed in groups of FFF_LEVEL_GROUP levels.  Before each
 * group the tile's tokens are counting-sorted by the node they sit on, then
 * each token walks the group's levels depth-first.  Tokens that share a
 * subtree run back to back, so the subtree's weight rows are fetched from
 * L3/DRAM once per tile instead of once per token.  The output of a token is
 * then summed over its path with the output block held in registers.
 *
 * SIMD: the dot product and the output sum keep several independent
 * accumulators (FFF_ACC lanes) written as plain C loops, which GCC and Clang
 * vectorise on purpose (check with -fopt-info-vec-optimized); no -ffast-math
 * is needed because the summation order is explicit.  On x86-64 with
 * GCC/Clang the entry points are compiled once per ISA level (x86-64-v4 =
 * AVX-512, x86-64-v3 = AVX2+FMA, baseline) with target_clones and the best
 * one is picked at load time; fff_simd_variant() reports which.
 *
 * The second half of this header is a template, expanded once per dtype by
 * src/fff_cpu.h (FFF_T, FFF_SUF, FFF_ACC, FFF_ERF, FFF_TANH).
 */
#ifndef PYFFF_FFF_KERNELS_H
#define PYFFF_FFF_KERNELS_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64)) && defined(__linux__) && !defined(PYFFF_NO_DISPATCH)
#define FFF_DISPATCH __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define FFF_HAVE_DISPATCH 1
#else
#define FFF_DISPATCH
#define FFF_HAVE_DISPATCH 0
#endif

#if defined(__GNUC__)
#define FFF_INLINE static inline __attribute__((always_inline))
#define FFF_PREFETCH(p) __builtin_prefetch((p), 0, 3)
#define FFF_RESTRICT __restrict__
#else
#define FFF_INLINE static __inline
#define FFF_PREFETCH(p) ((void)0)
#define FFF_RESTRICT
#endif

/* Activation codes shared with pyfff/_fff_cpu.pyx. */
enum { FFF_ACT_GELU = 0, FFF_ACT_GELU_TANH = 1, FFF_ACT_RELU = 2 };

/* Levels routed per sort of the tile (see the header comment).  Four levels
 * of a subtree are 15 nodes: 90 KB of input+output rows at width 768. */
#define FFF_LEVEL_GROUP 4

/* Which SIMD variant the dispatcher picks on this CPU, as target_clones does. */
static const char *fff_simd_variant(void)
{
#if FFF_HAVE_DISPATCH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4"))
        return "x86-64-v4 (AVX-512)";
    if (__builtin_cpu_supports("x86-64-v3"))
        return "x86-64-v3 (AVX2+FMA)";
    return "x86-64 baseline (SSE2)";
#elif defined(__AVX512F__)
    return "compile-time AVX-512 (no runtime dispatch)";
#elif defined(__AVX2__)
    return "compile-time AVX2 (no runtime dispatch)";
#else
    return "portable C (no runtime dispatch)";
#endif
}

#endif /* PYFFF_FFF_KERNELS_H */


/* ------------------------------------------------------------------------ */
/* Template part: expanded once per dtype.                                  */
/* ------------------------------------------------------------------------ */
#if defined(FFF_T) && defined(FFF_SUF)

#define FFF_CAT2(a, b) a##_##b
#define FFF_CAT(a, b) FFF_CAT2(a, b)
#define FFF_NAME(name) FFF_CAT(name, FFF_SUF)

/* act(z) for one logit. Exact GELU uses erf, as torch.nn.GELU(). */
FFF_INLINE FFF_T FFF_NAME(fff_act)(FFF_T z, int act)
{
    if (act == FFF_ACT_GELU)
        return (FFF_T)0.5 * z * ((FFF_T)1 + FFF_ERF(z * (FFF_T)0.70710678118654752440));
    if (act == FFF_ACT_GELU_TANH) {
        FFF_T inner = (FFF_T)0.79788456080286535588 * (z + (FFF_T)0.044715 * z * z * z);
        return (FFF_T)0.5 * z * ((FFF_T)1 + FFF_TANH(inner));
    }
    return z > 0 ? z : (FFF_T)0; /* relu (callers keep NaN as NaN) */
}

/* Row dot product with FFF_ACC independent accumulators.
 * acc[j] sums the elements j, j + FFF_ACC, j + 2 FFF_ACC, ... in order; the
 * accumulators are then folded pairwise.  The inner j-loop is what the
 * compiler turns into FFF_ACC / (lanes per register) vector FMAs. */
FFF_INLINE FFF_T FFF_NAME(fff_dot)(const FFF_T *FFF_RESTRICT a, const FFF_T *FFF_RESTRICT b, ptrdiff_t n)
{
    FFF_T acc[FFF_ACC];
    for (int j = 0; j < FFF_ACC; j++)
        acc[j] = 0;
    ptrdiff_t i = 0;
    for (; i + FFF_ACC <= n; i += FFF_ACC)
        for (int j = 0; j < FFF_ACC; j++)
            acc[j] += a[i + j] * b[i + j];
    for (int j = 0; i + j < n; j++)
        acc[j] += a[i + j] * b[i + j];
    for (int w = FFF_ACC / 2; w > 0; w >>= 1)
        for (int j = 0; j < w; j++)
            acc[j] += acc[j + w];
    return acc[0];
}

/* Scratch a tile of n_tile tokens needs, in bytes. */
static size_t FFF_NAME(fff_scratch_bytes)(ptrdiff_t n_tile, int depth, int n_trees)
{
    size_t n_path = (size_t)n_tile * (size_t)n_trees * (size_t)(depth + 1);
    size_t n_buckets = (size_t)n_tile + 2;
    return n_path * (sizeof(int32_t) + sizeof(FFF_T)) /* path nodes + activations */
         + 3 * (size_t)n_tile * sizeof(int32_t)       /* current node, order, order' */
         + n_buckets * sizeof(int32_t) + 64;          /* bucket counts (+ alignment) */
}

/* y[0:d_out] = sum_k a[k] * w_out[rows[k]], summed in k order, with the
 * output block held in registers (one load per FMA, one store per element).
 * When `add` is set the sum is added to the existing y (further trees). */
FFF_INLINE void FFF_NAME(fff_path_sum)(FFF_T *FFF_RESTRICT y, const FFF_T *FFF_RESTRICT w_out, ptrdiff_t ldw,
                                       const int32_t *FFF_RESTRICT rows, const FFF_T *FFF_RESTRICT a, int n_path,
                                       ptrdiff_t d_out, int add)
{
    ptrdiff_t c = 0;
    for (; c + FFF_ACC <= d_out; c += FFF_ACC) {
        FFF_T acc[FFF_ACC];
        for (int j = 0; j < FFF_ACC; j++)
            acc[j] = 0;
        for (int k = 0; k < n_path; k++) {
            const FFF_T *w = w_out + (ptrdiff_t)rows[k] * ldw + c;
            FFF_T ak = a[k];
            for (int j = 0; j < FFF_ACC; j++)
                acc[j] += ak * w[j];
        }
        if (add)
            for (int j = 0; j < FFF_ACC; j++)
                y[c + j] += acc[j];
        else
            for (int j = 0; j < FFF_ACC; j++)
                y[c + j] = acc[j];
    }
    for (; c < d_out; c++) {
        FFF_T acc = 0;
        for (int k = 0; k < n_path; k++)
            acc += a[k] * w_out[(ptrdiff_t)rows[k] * ldw + c];
        y[c] = add ? y[c] + acc : acc;
    }
}

/*
 * fff_forward_tile: a tile of n_tile tokens, all trees (n_tile = 1 is the lean
 * batch-1 path: no sorting, no per-level bookkeeping beyond the path).
 *
 * x       : IN  (n_tile, d_in), row stride ldx
 * w_in    : IN  (n_trees * n_nodes, d_in), row stride ldw_in
 * b_in    : IN  (n_trees * n_nodes,) or NULL
 * w_out   : IN  (n_trees * n_nodes, d_out), row stride ldw_out (node-major)
 * y       : OUT (n_tile, d_out), row stride ldy, or NULL (routes only)
 * routes  : OUT (n_tile, n_trees, depth + 1), or NULL
 * scratch : fff_scratch_bytes(n_tile, depth, n_trees) bytes
 */
FFF_DISPATCH
static void FFF_NAME(fff_forward_tile)(const FFF_T *x, ptrdiff_t ldx, const FFF_T *w_in, ptrdiff_t ldw_in,
                                       const FFF_T *b_in, const FFF_T *w_out, ptrdiff_t ldw_out, ptrdiff_t n_tile,
                                       ptrdiff_t d_in, ptrdiff_t d_out, int depth, int n_trees, int act, FFF_T *y,
                                       ptrdiff_t ldy, int64_t *routes, void *scratch)
{
    const int n_lev = depth + 1;
    const int n_path = n_trees * n_lev;
    const ptrdiff_t n_nodes = ((ptrdiff_t)2 << depth) - 1;

    /* Carve the scratch: activations first (widest alignment). */
    FFF_T *acts = (FFF_T *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63); /* (n_tile, n_path) */
    int32_t *path = (int32_t *)(acts + (size_t)n_tile * n_path);          /* (n_tile, n_path) rows */
    int32_t *node = path + (size_t)n_tile * n_path;                       /* (n_tile,) */
    int32_t *order = node + n_tile;                                       /* (n_tile,) */
    int32_t *order2 = order + n_tile;                                     /* (n_tile,) */
    int32_t *count = order2 + n_tile;                                     /* (n_tile + 2,) */

    for (ptrdiff_t i = 0; i < n_tile; i++)
        order[i] = (int32_t)i;

    for (int t = 0; t < n_trees; t++) {
        const FFF_T *w_in_t = w_in + t * n_nodes * ldw_in;
        for (ptrdiff_t i = 0; i < n_tile; i++)
            node[i] = 0;

        for (int l0 = 0; l0 < n_lev; l0 += FFF_LEVEL_GROUP) {
            int l1 = l0 + FFF_LEVEL_GROUP < n_lev ? l0 + FFF_LEVEL_GROUP : n_lev;
            if (l0 > 0 && n_tile > 1) {
                /* Counting sort by the node at level l0.  Level l0 has 2**l0
                 * nodes; use at most ~n_tile buckets (nodes adjacent in heap
                 * order share a bucket), so the sort stays O(n_tile). */
                int shift = 0;
                while (((ptrdiff_t)1 << (l0 - shift)) > n_tile)
                    shift++;
                ptrdiff_t n_b = (ptrdiff_t)1 << (l0 - shift);
                ptrdiff_t first = ((ptrdiff_t)1 << l0) - 1;
                for (ptrdiff_t b = 0; b <= n_b; b++)
                    count[b] = 0;
                for (ptrdiff_t i = 0; i < n_tile; i++)
                    count[((node[i] - first) >> shift) + 1]++;
                for (ptrdiff_t b = 0; b < n_b; b++)
                    count[b + 1] += count[b];
                for (ptrdiff_t k = 0; k < n_tile; k++) {
                    int32_t i = order[k]; /* stable: keeps the previous order within a bucket */
                    order2[count[(node[i] - first) >> shift]++] = i;
                }
                int32_t *tmp = order;
                order = order2;
                order2 = tmp;
            }
            for (ptrdiff_t k = 0; k < n_tile; k++) {
                const ptrdiff_t i = order[k];
                const FFF_T *xi = x + i * ldx;
                ptrdiff_t nd = node[i];
                for (int level = l0; level < l1; level++) {
                    const FFF_T *wr = w_in_t + nd * ldw_in;
                    if (level + 1 < l1) {
                        FFF_PREFETCH(w_in_t + (2 * nd + 1) * ldw_in);
                        FFF_PREFETCH(w_in_t + (2 * nd + 2) * ldw_in);
                    }
                    FFF_T z = FFF_NAME(fff_dot)(wr, xi, d_in);
                    if (b_in)
                        z += b_in[t * n_nodes + nd];
                    size_t p = (size_t)i * n_path + (size_t)t * n_lev + level;
                    path[p] = (int32_t)(t * n_nodes + nd);
                    acts[p] = (z != z) ? z : FFF_NAME(fff_act)(z, act);
                    if (routes)
                        routes[p] = nd;
                    nd = 2 * nd + 1 + (z > 0);
                }
                node[i] = (int32_t)nd;
            }
        }
    }

    /* Output: tokens in the last sort order, so neighbours share deep rows. */
    if (y) {
        for (ptrdiff_t k = 0; k < n_tile; k++) {
            const ptrdiff_t i = order[k];
            FFF_NAME(fff_path_sum)(y + i * ldy, w_out, ldw_out, path + (size_t)i * n_path, acts + (size_t)i * n_path,
                                   n_path, d_out, 0);
        }
    }
}

#undef FFF_CAT2
#undef FFF_CAT
#undef FFF_NAME
#endif /* FFF_T && FFF_SUF */

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
 *   summed in one fixed order (fff_dot, fff_dot_shared and fff_dot4 share
 *   their accumulator structure; fff_path_sum, fff_path_sum_shared and
 *   fff_path_sum4 add a path's rows in path order), so results are bitwise
 *   identical for every n_threads and tile size, and a token alone equals the
 *   same token inside a batch.  Activations are computed element by element
 *   (float32 GELU: the vectorised fff_gelu_f32, in double precision).
 * - Routing: go right when the logit is > 0; a logit of exactly 0 (and NaN)
 *   goes left, as upstream's `logits > 0`.
 * - No allocation: the caller hands in scratch memory (fff_scratch_bytes_*).
 *
 * How the batch kernel saves memory traffic (docs/performance.md has numbers)
 * ---------------------------------------------------------------------------
 * A tile of tokens is routed in groups of FFF_LEVEL_GROUP levels.  Before each
 * group the tile's tokens are counting-sorted by the node they sit on, then
 * walk the group's levels FFF_SHARE at a time in lockstep; tokens of such a
 * chunk that sit on the same node take their dot products with one load of
 * the row (fff_dot4 when all four do).  Tokens that share a subtree run back
 * to back, so its rows are fetched from L2/L3 about once per tile instead of
 * once per token.  The outputs are then summed in leaf order, FFF_SHARE
 * tokens at a time, with the output block in registers and a row that all
 * four share loaded once (fff_path_sum4).  The driver (pyfff/_fff_cpu.pyx)
 * cuts batches into tiles of up to 16384 tokens.
 *
 * SIMD: explicit, with GCC/Clang vector extensions (64-byte vectors, four
 * independent accumulators per dot product), not left to the
 * auto-vectoriser: GCC 12 kept the plain-C output sum scalar.  No
 * -ffast-math is needed because the summation order is written out.  A
 * scalar twin (PYFFF_NO_VECTOR_EXT) serves other compilers.  On x86-64 Linux
 * with GCC/Clang the entry point is compiled once per ISA level (x86-64-v4 =
 * AVX-512, x86-64-v3 = AVX2+FMA, baseline SSE2) with target_clones and the
 * best one is picked at load time; fff_simd_variant() reports which.
 *
 * The second half of this header is a template, expanded once per dtype by
 * src/fff_cpu.h (FFF_T, FFF_SUF, FFF_TANH).
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

#ifdef _OPENMP
#include <omp.h>
/* A barrier among the threads sharing one tile; none when the tile runs on
 * one thread (possibly inside the driver's own parallel loop). */
#define FFF_TEAM_BARRIER(nthr)     \
    do {                           \
        if ((nthr) > 1) {          \
            _Pragma("omp barrier") \
        }                          \
    } while (0)
#else
#define FFF_TEAM_BARRIER(nthr) ((void)(nthr))
#endif

/* GCC and Clang vector extensions give explicit SIMD without intrinsics. */
#if (defined(__GNUC__) || defined(__clang__)) && !defined(PYFFF_NO_VECTOR_EXT)
#define FFF_VECTOR_EXT 1
#else
#define FFF_VECTOR_EXT 0
#endif

#if defined(__GNUC__)
#define FFF_INLINE static inline __attribute__((always_inline))
#define FFF_RESTRICT __restrict__
#else
#define FFF_INLINE static __inline
#define FFF_RESTRICT
#endif

/* fff_forward_tile takes a trailing n_threads argument (bench/dev builds older
 * kernel variants without it against the same harness). */
#define FFF_TILE_TAKES_N_THREADS 1

/* Activation codes shared with pyfff/_fff_cpu.pyx. */
enum { FFF_ACT_GELU = 0, FFF_ACT_GELU_TANH = 1, FFF_ACT_RELU = 2 };

/* Levels routed per sort of the tile (see the header comment).  Four levels
 * of a subtree are 15 nodes: 90 KB of input+output rows at width 768. */
#ifndef FFF_LEVEL_GROUP
#define FFF_LEVEL_GROUP 4
#endif

/* Tokens that walk a level group in lockstep and share row loads (see
 * fff_forward_tile): 4 tokens x 4 accumulators = 16 of the 32 AVX-512
 * vector registers. */
#ifndef FFF_SHARE
#define FFF_SHARE 4
#endif

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
#elif FFF_VECTOR_EXT
    return "compile-time baseline, vector extensions (no runtime dispatch)";
#else
    return "scalar C twin (no runtime dispatch)";
#endif
}

#if FFF_VECTOR_EXT
/* Exact (erf) GELU of float logits, 8 at a time in double precision:
 *   gelu(z) = z/2 (1 + erf(x)),  x = z/sqrt 2,
 *   1 + erf(x) = erfc(|x|) for x < 0 and 2 - erfc(|x|) otherwise,
 *   erfc(a) = t exp(P(2t - 1) - a^2),  t = 1 / (1 + a/2),
 * P a degree-14 Chebyshev fit (erfc's relative error below 4e-10 for every
 * a >= 0; bench/dev/fit_erfc.py refits it), exp(y) = 2**k exp(r) with
 * |r| <= ln2/2 and a degree-11 Taylor polynomial.  Rounded to float, the
 * result equals the correctly rounded GELU for 99.9 % of inputs and is
 * within 1 ulp for the rest (bench/dev/fit_erfc.py checks it); erff + 1 in
 * float loses the negative side to cancellation.  Each lane is computed
 * alone, so a logit's activation does not depend on its neighbours.
 * It replaces 12 scalar erff calls per token (0.13 us of 1.8 at width 768). */
typedef double fff_vd __attribute__((vector_size(64)));
typedef long long fff_vi __attribute__((vector_size(64)));
typedef float fff_vf8 __attribute__((vector_size(32)));

FFF_INLINE fff_vd fff_gelu_vd(fff_vd z)
{
    static const double P[15] = {
        -8.12125574607062460e-06, 2.07230709748162253e-05,  4.17958984320201748e-05, -1.54633790875675166e-04,
        -7.11973151364741564e-05, 6.57953847839880084e-04,  -1.56134271722979017e-04, -2.33927772412413420e-03,
        1.76133936413554550e-03,  8.82355817768700271e-03,  -9.87298045919107053e-03, -4.68954821610058359e-02,
        4.73433203673689976e-02,  6.72643220546009224e-01,  -6.71794084160357019e-01};
    const fff_vi sign = (fff_vi){0} + (long long)(1ULL << 63);
    const fff_vd x = z * 0.70710678118654752440;
    const fff_vi neg = x < 0; /* all ones in the lanes where x < 0 */
    const fff_vd a = (fff_vd)((fff_vi)x & ~sign);
    const fff_vd t = 1.0 / (1.0 + 0.5 * a);
    const fff_vd u = 2.0 * t - 1.0;
    fff_vd p = u * P[0] + P[1];
    for (int k = 2; k < 15; k++)
        p = p * u + P[k];
    fff_vd y = p - a * a;          /* log(erfc(a) / t) */
    const fff_vi tiny = y < -708.0; /* erfc(a) < 1e-300: 0 as a float (also a = inf) */
    y = (fff_vd)(((fff_vi)y & ~tiny) | ((fff_vi)((fff_vd){0} - 708.0) & tiny));
    /* exp(y): k = round(y / ln2) by adding and subtracting 1.5 * 2**52 */
    const fff_vd shifter = (fff_vd){0} + 6755399441055744.0;
    const fff_vd kd = (y * 1.44269504088896340736 + shifter) - shifter;
    const fff_vd r = (y - kd * 6.93147180369123816490e-01) - kd * 1.90821492927058770002e-10;
    fff_vd e = r * (1.0 / 39916800) + 1.0 / 3628800;
    e = e * r + 1.0 / 362880;
    e = e * r + 1.0 / 40320;
    e = e * r + 1.0 / 5040;
    e = e * r + 1.0 / 720;
    e = e * r + 1.0 / 120;
    e = e * r + 1.0 / 24;
    e = e * r + 1.0 / 6;
    e = e * r + 0.5;
    e = e * r + 1.0;
    e = e * r + 1.0;
    e *= (fff_vd)(((fff_vi)(kd + shifter) - (fff_vi)shifter + 1023) << 52); /* * 2**k */
    const fff_vd erfc_a = (fff_vd)((fff_vi)(t * e) & ~tiny);
    const fff_vd one_plus_erf = (fff_vd)(((fff_vi)erfc_a & neg) | ((fff_vi)(2.0 - erfc_a) & ~neg));
    return 0.5 * z * one_plus_erf;
}

/* z[0:n] = gelu(z[0:n]) in place, NaN kept as it is. */
FFF_INLINE void fff_gelu_f32(float *z, ptrdiff_t n)
{
    for (ptrdiff_t i = 0; i < n; i += 8) {
        float in[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        const int m = n - i < 8 ? (int)(n - i) : 8;
        memcpy(in, z + i, (size_t)m * sizeof(float));
        fff_vf8 v;
        memcpy(&v, in, sizeof v);
        const fff_vf8 g = __builtin_convertvector(fff_gelu_vd(__builtin_convertvector(v, fff_vd)), fff_vf8);
        for (int j = 0; j < m; j++)
            z[i + j] = in[j] != in[j] ? in[j] : g[j];
    }
}
#define FFF_HAVE_GELU_F32 1
#endif

#endif /* PYFFF_FFF_KERNELS_H */


/* ------------------------------------------------------------------------ */
/* Template part: expanded once per dtype.                                  */
/* ------------------------------------------------------------------------ */
#if defined(FFF_T) && defined(FFF_SUF)

#define FFF_CAT2(a, b) a##_##b
#define FFF_CAT(a, b) FFF_CAT2(a, b)
#define FFF_NAME(name) FFF_CAT(name, FFF_SUF)

/* act(z) for one logit. Exact GELU uses erf, as torch.nn.GELU(), written
 * with erfc in double precision: 1 + erf(x) = erfc(-x) keeps its accuracy
 * for z < 0, where 1 + erf(x) cancels.  (float32 builds with vector
 * extensions use the vectorised fff_gelu_f32 below instead.) */
FFF_INLINE FFF_T FFF_NAME(fff_act)(FFF_T z, int act)
{
    if (act == FFF_ACT_GELU)
        return (FFF_T)(0.5 * (double)z * erfc((double)z * -0.70710678118654752440));
    if (act == FFF_ACT_GELU_TANH) {
        FFF_T inner = (FFF_T)0.79788456080286535588 * (z + (FFF_T)0.044715 * z * z * z);
        return (FFF_T)0.5 * z * ((FFF_T)1 + FFF_TANH(inner));
    }
    return z > 0 ? z : (FFF_T)0; /* relu (callers keep NaN as NaN) */
}

#if FFF_VECTOR_EXT
/* FFF_V: 64 bytes of FFF_T (16 floats / 8 doubles), a GCC/Clang vector
 * extension type.  Lane-wise arithmetic on it compiles to one AVX-512
 * register op in the x86-64-v4 clone, two AVX2 ops in v3 and four SSE ops in
 * the baseline: the same sums in the same order on every ISA.  Plain C loops
 * with an accumulator array are not reliably vectorised (GCC 12 kept the
 * output sum scalar, 20x slower), hence the explicit vectors. */
typedef FFF_T FFF_NAME(fff_vec) __attribute__((vector_size(64)));
typedef FFF_T FFF_NAME(fff_vec_u) __attribute__((vector_size(64), aligned(sizeof(FFF_T)), may_alias));
#define FFF_V FFF_NAME(fff_vec)
#define FFF_VL ((ptrdiff_t)(64 / sizeof(FFF_T)))
#define FFF_LOAD(p) (*(const FFF_NAME(fff_vec_u) *)(p))
#define FFF_STORE(p, v) (*(FFF_NAME(fff_vec_u) *)(p) = (v))

/* Sum of the lanes of v, folded pairwise in a fixed order: the upper half is
 * added onto the lower half (64 -> 32 -> 16 bytes, memcpy of halves compiles
 * to lane extracts), then the last lanes the same way in scalar code. */
typedef FFF_T FFF_NAME(fff_half) __attribute__((vector_size(32)));
typedef FFF_T FFF_NAME(fff_quarter) __attribute__((vector_size(16)));
FFF_INLINE FFF_T FFF_NAME(fff_hsum)(const FFF_V *v)
{
    FFF_NAME(fff_half) h0, h1;
    FFF_NAME(fff_quarter) q0, q1;
    memcpy(&h0, v, 32);
    memcpy(&h1, (const char *)v + 32, 32);
    h0 += h1;
    memcpy(&q0, &h0, 16);
    memcpy(&q1, (const char *)&h0 + 16, 16);
    q0 += q1;
    FFF_T s[16 / sizeof(FFF_T)];
    memcpy(s, &q0, 16);
    for (int w = (int)(16 / sizeof(FFF_T)) / 2; w > 0; w >>= 1)
        for (int j = 0; j < w; j++)
            s[j] += s[j + w];
    return s[0];
}

/* Row dot product a . b with four vector accumulators (4 x FFF_VL lanes): four
 * independent FMA chains hide the FMA latency.  Lane j of accumulator q sums
 * the elements i with i % (4 FFF_VL) == q FFF_VL + j, in order; the tail that
 * does not fill a vector goes to lane (i % FFF_VL) of accumulator 0. */
FFF_INLINE FFF_T FFF_NAME(fff_dot)(const FFF_T *FFF_RESTRICT a, const FFF_T *FFF_RESTRICT b, ptrdiff_t n)
{
    FFF_V acc0 = {0}, acc1 = {0}, acc2 = {0}, acc3 = {0};
    ptrdiff_t i = 0;
    for (; i + 4 * FFF_VL <= n; i += 4 * FFF_VL) {
        acc0 += FFF_LOAD(a + i) * FFF_LOAD(b + i);
        acc1 += FFF_LOAD(a + i + FFF_VL) * FFF_LOAD(b + i + FFF_VL);
        acc2 += FFF_LOAD(a + i + 2 * FFF_VL) * FFF_LOAD(b + i + 2 * FFF_VL);
        acc3 += FFF_LOAD(a + i + 3 * FFF_VL) * FFF_LOAD(b + i + 3 * FFF_VL);
    }
    for (; i + FFF_VL <= n; i += FFF_VL)
        acc0 += FFF_LOAD(a + i) * FFF_LOAD(b + i);
    for (int j = 0; i + j < n; j++)
        acc0[j] += a[i + j] * b[i + j];
    acc0 = (acc0 + acc1) + (acc2 + acc3);
    return FFF_NAME(fff_hsum)(&acc0);
}

/* y[0:d_out] = sum_k a[k] * w_out[rows[k]], summed in k order, with a block
 * of 4 x FFF_VL outputs held in registers: one load and one FMA per weight,
 * one store per output. When `add` is set the sum is added to y. */
FFF_INLINE void FFF_NAME(fff_path_sum)(FFF_T *FFF_RESTRICT y, const FFF_T *FFF_RESTRICT w_out, ptrdiff_t ldw,
                                       const int32_t *FFF_RESTRICT rows, const FFF_T *FFF_RESTRICT a, int n_path,
                                       ptrdiff_t d_out, int add)
{
    ptrdiff_t c = 0;
    for (; c + 4 * FFF_VL <= d_out; c += 4 * FFF_VL) {
        FFF_V s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
        for (int k = 0; k < n_path; k++) {
            const FFF_T *w = w_out + (ptrdiff_t)rows[k] * ldw + c;
            const FFF_T ak = a[k];
            s0 += ak * FFF_LOAD(w);
            s1 += ak * FFF_LOAD(w + FFF_VL);
            s2 += ak * FFF_LOAD(w + 2 * FFF_VL);
            s3 += ak * FFF_LOAD(w + 3 * FFF_VL);
        }
        if (add) {
            s0 += FFF_LOAD(y + c);
            s1 += FFF_LOAD(y + c + FFF_VL);
            s2 += FFF_LOAD(y + c + 2 * FFF_VL);
            s3 += FFF_LOAD(y + c + 3 * FFF_VL);
        }
        FFF_STORE(y + c, s0);
        FFF_STORE(y + c + FFF_VL, s1);
        FFF_STORE(y + c + 2 * FFF_VL, s2);
        FFF_STORE(y + c + 3 * FFF_VL, s3);
    }
    for (; c + FFF_VL <= d_out; c += FFF_VL) {
        FFF_V s0 = {0};
        for (int k = 0; k < n_path; k++)
            s0 += a[k] * FFF_LOAD(w_out + (ptrdiff_t)rows[k] * ldw + c);
        if (add)
            s0 += FFF_LOAD(y + c);
        FFF_STORE(y + c, s0);
    }
    for (; c < d_out; c++) {
        FFF_T s = 0;
        for (int k = 0; k < n_path; k++)
            s += a[k] * w_out[(ptrdiff_t)rows[k] * ldw + c];
        y[c] = add ? y[c] + s : s;
    }
}

/* Dot products of one row w with m <= FFF_SHARE token rows xs[0..m-1]: w is
 * loaded once for all of them.  Each token's sum has exactly the structure
 * of fff_dot (same accumulators, same order, same tail, same fold), so a
 * token's logit does not depend on which tokens shared its row. */
FFF_INLINE void FFF_NAME(fff_dot_shared)(const FFF_T *FFF_RESTRICT w, const FFF_T *const *xs, int m, ptrdiff_t n,
                                         FFF_T *z)
{
    FFF_V acc[FFF_SHARE][4];
    for (int j = 0; j < FFF_SHARE; j++)
        for (int q = 0; q < 4; q++)
            acc[j][q] = (FFF_V){0};
    ptrdiff_t i = 0;
    for (; i + 4 * FFF_VL <= n; i += 4 * FFF_VL) {
        const FFF_V w0 = FFF_LOAD(w + i), w1 = FFF_LOAD(w + i + FFF_VL);
        const FFF_V w2 = FFF_LOAD(w + i + 2 * FFF_VL), w3 = FFF_LOAD(w + i + 3 * FFF_VL);
        for (int j = 0; j < FFF_SHARE; j++) {
            if (j < m) {
                const FFF_T *xj = xs[j] + i;
                acc[j][0] += w0 * FFF_LOAD(xj);
                acc[j][1] += w1 * FFF_LOAD(xj + FFF_VL);
                acc[j][2] += w2 * FFF_LOAD(xj + 2 * FFF_VL);
                acc[j][3] += w3 * FFF_LOAD(xj + 3 * FFF_VL);
            }
        }
    }
    for (; i + FFF_VL <= n; i += FFF_VL) {
        const FFF_V w0 = FFF_LOAD(w + i);
        for (int j = 0; j < m; j++)
            acc[j][0] += w0 * FFF_LOAD(xs[j] + i);
    }
    for (int j = 0; j < m; j++) {
        for (int e = 0; i + e < n; e++)
            acc[j][0][e] += w[i + e] * xs[j][i + e];
        FFF_V v = (acc[j][0] + acc[j][1]) + (acc[j][2] + acc[j][3]);
        z[j] = FFF_NAME(fff_hsum)(&v);
    }
}

/* Outputs of m <= FFF_SHARE tokens at once: ys[j] = sum_k as[j][k] *
 * w_out[rows[j][k]].  The tokens' rows are visited column block by column
 * block, so a row that several of them share (the upper levels of tokens
 * sorted by path) is fetched into L1 once and re-read from there.  Every
 * output element is summed over k in order, exactly as in fff_path_sum. */
FFF_INLINE void FFF_NAME(fff_path_sum_shared)(FFF_T *const *ys, const FFF_T *FFF_RESTRICT w_out, ptrdiff_t ldw,
                                              const int32_t *const *rows, const FFF_T *const *as, int m,
                                              int n_path, ptrdiff_t d_out)
{
    ptrdiff_t c = 0;
    for (; c + 2 * FFF_VL <= d_out; c += 2 * FFF_VL) {
        FFF_V s[FFF_SHARE][2];
        for (int j = 0; j < FFF_SHARE; j++)
            s[j][0] = s[j][1] = (FFF_V){0};
        for (int k = 0; k < n_path; k++) {
            for (int j = 0; j < FFF_SHARE; j++) {
                if (j < m) {
                    const FFF_T *w = w_out + (ptrdiff_t)rows[j][k] * ldw + c;
                    const FFF_T a = as[j][k];
                    s[j][0] += a * FFF_LOAD(w);
                    s[j][1] += a * FFF_LOAD(w + FFF_VL);
                }
            }
        }
        for (int j = 0; j < m; j++) {
            FFF_STORE(ys[j] + c, s[j][0]);
            FFF_STORE(ys[j] + c + FFF_VL, s[j][1]);
        }
    }
    if (c < d_out)
        for (int j = 0; j < m; j++)
            FFF_NAME(fff_path_sum)(ys[j] + c, w_out + c, ldw, rows[j], as[j], n_path, d_out - c, 0);
}

/* Full chunks of exactly four tokens (the common case, FFF_SHARE = 4) get
 * fully unrolled twins of the two functions above, with every accumulator a
 * named variable: no `j < m` tests in the inner loops, nothing for the
 * compiler to leave in memory.  Same sums in the same order, so bitwise the
 * same results as fff_dot / fff_path_sum. */

/* Dot products of the row w with four token rows. */
FFF_INLINE void FFF_NAME(fff_dot4)(const FFF_T *FFF_RESTRICT w, const FFF_T *const *xs, ptrdiff_t n, FFF_T *z)
{
    const FFF_T *x0 = xs[0], *x1 = xs[1], *x2 = xs[2], *x3 = xs[3];
    if (n % (4 * FFF_VL)) { /* a width with a tail: the general version */
        FFF_NAME(fff_dot_shared)(w, xs, 4, n, z);
        return;
    }
    FFF_V a00 = {0}, a01 = {0}, a02 = {0}, a03 = {0}, a10 = {0}, a11 = {0}, a12 = {0}, a13 = {0};
    FFF_V a20 = {0}, a21 = {0}, a22 = {0}, a23 = {0}, a30 = {0}, a31 = {0}, a32 = {0}, a33 = {0};
    for (ptrdiff_t i = 0; i < n; i += 4 * FFF_VL) {
        const FFF_V w0 = FFF_LOAD(w + i), w1 = FFF_LOAD(w + i + FFF_VL);
        const FFF_V w2 = FFF_LOAD(w + i + 2 * FFF_VL), w3 = FFF_LOAD(w + i + 3 * FFF_VL);
        a00 += w0 * FFF_LOAD(x0 + i), a01 += w1 * FFF_LOAD(x0 + i + FFF_VL);
        a02 += w2 * FFF_LOAD(x0 + i + 2 * FFF_VL), a03 += w3 * FFF_LOAD(x0 + i + 3 * FFF_VL);
        a10 += w0 * FFF_LOAD(x1 + i), a11 += w1 * FFF_LOAD(x1 + i + FFF_VL);
        a12 += w2 * FFF_LOAD(x1 + i + 2 * FFF_VL), a13 += w3 * FFF_LOAD(x1 + i + 3 * FFF_VL);
        a20 += w0 * FFF_LOAD(x2 + i), a21 += w1 * FFF_LOAD(x2 + i + FFF_VL);
        a22 += w2 * FFF_LOAD(x2 + i + 2 * FFF_VL), a23 += w3 * FFF_LOAD(x2 + i + 3 * FFF_VL);
        a30 += w0 * FFF_LOAD(x3 + i), a31 += w1 * FFF_LOAD(x3 + i + FFF_VL);
        a32 += w2 * FFF_LOAD(x3 + i + 2 * FFF_VL), a33 += w3 * FFF_LOAD(x3 + i + 3 * FFF_VL);
    }
    FFF_V v0 = (a00 + a01) + (a02 + a03), v1 = (a10 + a11) + (a12 + a13);
    FFF_V v2 = (a20 + a21) + (a22 + a23), v3 = (a30 + a31) + (a32 + a33);
    z[0] = FFF_NAME(fff_hsum)(&v0);
    z[1] = FFF_NAME(fff_hsum)(&v1);
    z[2] = FFF_NAME(fff_hsum)(&v2);
    z[3] = FFF_NAME(fff_hsum)(&v3);
}

/* Outputs of four tokens, 4 x 4 vector accumulators per block of 4 FFF_VL
 * columns.  A level whose row all four tokens share (the upper levels of
 * tokens in leaf order) is loaded once and used four times. */
FFF_INLINE void FFF_NAME(fff_path_sum4)(FFF_T *const *ys, const FFF_T *FFF_RESTRICT w_out, ptrdiff_t ldw,
                                        const int32_t *const *rows, const FFF_T *const *as, int n_path,
                                        ptrdiff_t d_out)
{
    const int32_t *r0 = rows[0], *r1 = rows[1], *r2 = rows[2], *r3 = rows[3];
    const FFF_T *a0 = as[0], *a1 = as[1], *a2 = as[2], *a3 = as[3];
    ptrdiff_t c = 0;
    for (; c + 4 * FFF_VL <= d_out; c += 4 * FFF_VL) {
        FFF_V s00 = {0}, s01 = {0}, s02 = {0}, s03 = {0}, s10 = {0}, s11 = {0}, s12 = {0}, s13 = {0};
        FFF_V s20 = {0}, s21 = {0}, s22 = {0}, s23 = {0}, s30 = {0}, s31 = {0}, s32 = {0}, s33 = {0};
        const FFF_T *wc = w_out + c;
        for (int k = 0; k < n_path; k++) {
            const FFF_T b0 = a0[k], b1 = a1[k], b2 = a2[k], b3 = a3[k];
            const FFF_T *p0 = wc + (ptrdiff_t)r0[k] * ldw;
            if (r1[k] == r0[k] && r2[k] == r0[k] && r3[k] == r0[k]) {
                const FFF_V w0 = FFF_LOAD(p0), w1 = FFF_LOAD(p0 + FFF_VL);
                const FFF_V w2 = FFF_LOAD(p0 + 2 * FFF_VL), w3 = FFF_LOAD(p0 + 3 * FFF_VL);
                s00 += b0 * w0, s01 += b0 * w1, s02 += b0 * w2, s03 += b0 * w3;
                s10 += b1 * w0, s11 += b1 * w1, s12 += b1 * w2, s13 += b1 * w3;
                s20 += b2 * w0, s21 += b2 * w1, s22 += b2 * w2, s23 += b2 * w3;
                s30 += b3 * w0, s31 += b3 * w1, s32 += b3 * w2, s33 += b3 * w3;
            } else {
                const FFF_T *p1 = wc + (ptrdiff_t)r1[k] * ldw, *p2 = wc + (ptrdiff_t)r2[k] * ldw;
                const FFF_T *p3 = wc + (ptrdiff_t)r3[k] * ldw;
                s00 += b0 * FFF_LOAD(p0), s01 += b0 * FFF_LOAD(p0 + FFF_VL);
                s02 += b0 * FFF_LOAD(p0 + 2 * FFF_VL), s03 += b0 * FFF_LOAD(p0 + 3 * FFF_VL);
                s10 += b1 * FFF_LOAD(p1), s11 += b1 * FFF_LOAD(p1 + FFF_VL);
                s12 += b1 * FFF_LOAD(p1 + 2 * FFF_VL), s13 += b1 * FFF_LOAD(p1 + 3 * FFF_VL);
                s20 += b2 * FFF_LOAD(p2), s21 += b2 * FFF_LOAD(p2 + FFF_VL);
                s22 += b2 * FFF_LOAD(p2 + 2 * FFF_VL), s23 += b2 * FFF_LOAD(p2 + 3 * FFF_VL);
                s30 += b3 * FFF_LOAD(p3), s31 += b3 * FFF_LOAD(p3 + FFF_VL);
                s32 += b3 * FFF_LOAD(p3 + 2 * FFF_VL), s33 += b3 * FFF_LOAD(p3 + 3 * FFF_VL);
            }
        }
        FFF_STORE(ys[0] + c, s00), FFF_STORE(ys[0] + c + FFF_VL, s01);
        FFF_STORE(ys[0] + c + 2 * FFF_VL, s02), FFF_STORE(ys[0] + c + 3 * FFF_VL, s03);
        FFF_STORE(ys[1] + c, s10), FFF_STORE(ys[1] + c + FFF_VL, s11);
        FFF_STORE(ys[1] + c + 2 * FFF_VL, s12), FFF_STORE(ys[1] + c + 3 * FFF_VL, s13);
        FFF_STORE(ys[2] + c, s20), FFF_STORE(ys[2] + c + FFF_VL, s21);
        FFF_STORE(ys[2] + c + 2 * FFF_VL, s22), FFF_STORE(ys[2] + c + 3 * FFF_VL, s23);
        FFF_STORE(ys[3] + c, s30), FFF_STORE(ys[3] + c + FFF_VL, s31);
        FFF_STORE(ys[3] + c + 2 * FFF_VL, s32), FFF_STORE(ys[3] + c + 3 * FFF_VL, s33);
    }
    if (c < d_out) { /* the last columns: the general version */
        FFF_T *yc[4] = {ys[0] + c, ys[1] + c, ys[2] + c, ys[3] + c};
        FFF_NAME(fff_path_sum_shared)(yc, w_out + c, ldw, rows, as, 4, n_path, d_out - c);
    }
}
#undef FFF_V
#undef FFF_VL
#undef FFF_LOAD
#undef FFF_STORE

#else /* portable scalar twin, for compilers without vector extensions */

/* Same sums as the vector version, element by element (four partial sums per
 * element class would match it exactly; here one sum: a scalar fallback). */
FFF_INLINE FFF_T FFF_NAME(fff_dot)(const FFF_T *a, const FFF_T *b, ptrdiff_t n)
{
    FFF_T acc[4] = {0, 0, 0, 0};
    ptrdiff_t i = 0;
    for (; i + 4 <= n; i += 4) {
        acc[0] += a[i] * b[i];
        acc[1] += a[i + 1] * b[i + 1];
        acc[2] += a[i + 2] * b[i + 2];
        acc[3] += a[i + 3] * b[i + 3];
    }
    for (; i < n; i++)
        acc[0] += a[i] * b[i];
    return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

FFF_INLINE void FFF_NAME(fff_path_sum)(FFF_T *y, const FFF_T *w_out, ptrdiff_t ldw, const int32_t *rows,
                                       const FFF_T *a, int n_path, ptrdiff_t d_out, int add)
{
    if (!add)
        for (ptrdiff_t c = 0; c < d_out; c++)
            y[c] = 0;
    for (int k = 0; k < n_path; k++) {
        const FFF_T *w = w_out + (ptrdiff_t)rows[k] * ldw;
        for (ptrdiff_t c = 0; c < d_out; c++)
            y[c] += a[k] * w[c];
    }
}

FFF_INLINE void FFF_NAME(fff_dot_shared)(const FFF_T *w, const FFF_T *const *xs, int m, ptrdiff_t n, FFF_T *z)
{
    for (int j = 0; j < m; j++)
        z[j] = FFF_NAME(fff_dot)(w, xs[j], n);
}

FFF_INLINE void FFF_NAME(fff_path_sum_shared)(FFF_T *const *ys, const FFF_T *w_out, ptrdiff_t ldw,
                                              const int32_t *const *rows, const FFF_T *const *as, int m,
                                              int n_path, ptrdiff_t d_out)
{
    for (int j = 0; j < m; j++)
        FFF_NAME(fff_path_sum)(ys[j], w_out, ldw, rows[j], as[j], n_path, d_out, 0);
}

FFF_INLINE void FFF_NAME(fff_dot4)(const FFF_T *w, const FFF_T *const *xs, ptrdiff_t n, FFF_T *z)
{
    FFF_NAME(fff_dot_shared)(w, xs, 4, n, z);
}

FFF_INLINE void FFF_NAME(fff_path_sum4)(FFF_T *const *ys, const FFF_T *w_out, ptrdiff_t ldw,
                                        const int32_t *const *rows, const FFF_T *const *as, int n_path,
                                        ptrdiff_t d_out)
{
    FFF_NAME(fff_path_sum_shared)(ys, w_out, ldw, rows, as, 4, n_path, d_out);
}
#endif /* FFF_VECTOR_EXT */

/* Scratch a tile of n_tile tokens needs, in bytes. */
static size_t FFF_NAME(fff_scratch_bytes)(ptrdiff_t n_tile, int depth, int n_trees)
{
    size_t n_path = (size_t)n_tile * (size_t)n_trees * (size_t)(depth + 1);
    size_t n_buckets = (size_t)n_tile + 2;
    return n_path * (sizeof(int32_t) + sizeof(FFF_T)) /* path nodes + activations */
         + 3 * (size_t)n_tile * sizeof(int32_t)       /* current node, order, order' */
         + n_buckets * sizeof(int32_t) + 64;          /* bucket counts (+ alignment) */
}

/* Counting sort of order[0:n] (a permutation of token ids) by key[id] in
 * [first, first + 2**bits), stable, into out; at most ~n buckets are used
 * (keys adjacent in heap order share a bucket), so the cost stays O(n). */
FFF_INLINE void FFF_NAME(fff_sort_by_node)(const int32_t *order, int32_t *out, const int32_t *key, ptrdiff_t n,
                                           ptrdiff_t first, int bits, int32_t *count)
{
    int shift = 0;
    while (((ptrdiff_t)1 << (bits - shift)) > n)
        shift++;
    const ptrdiff_t n_b = (ptrdiff_t)1 << (bits - shift);
    for (ptrdiff_t b = 0; b <= n_b; b++)
        count[b] = 0;
    for (ptrdiff_t k = 0; k < n; k++)
        count[((key[order[k]] - first) >> shift) + 1]++;
    for (ptrdiff_t b = 0; b < n_b; b++)
        count[b + 1] += count[b];
    for (ptrdiff_t k = 0; k < n; k++) {
        const int32_t i = order[k];
        out[count[(key[i] - first) >> shift]++] = i;
    }
}

/* One level of one chunk's walk: the chunk's kn <= FFF_SHARE tokens (ids)
 * that sit on the same node take their dot products with one load of its
 * row; each token's logit, node and next node are recorded. */
FFF_INLINE void FFF_NAME(fff_chunk_level)(const FFF_T *x, ptrdiff_t ldx, const FFF_T *w_in_t, ptrdiff_t ldw_in,
                                          const FFF_T *b_in_t, ptrdiff_t d_in, const int32_t *ids, int kn, int level,
                                          int t, int n_lev, int n_path, ptrdiff_t n_nodes, FFF_T *acts,
                                          int32_t *path, int64_t *routes, int32_t *node)
{
    int done[FFF_SHARE] = {0};
    for (int k = 0; k < kn; k++) {
        if (done[k])
            continue;
        /* The chunk's tokens on the same node as token k. */
        const ptrdiff_t nd = node[ids[k]];
        int grp[FFF_SHARE], m = 0;
        const FFF_T *xs[FFF_SHARE];
        FFF_T z[FFF_SHARE];
        for (int j = k; j < kn; j++) {
            if (!done[j] && node[ids[j]] == nd) {
                done[j] = 1;
                grp[m] = j;
                xs[m++] = x + (ptrdiff_t)ids[j] * ldx;
            }
        }
        if (m == 1)
            z[0] = FFF_NAME(fff_dot)(w_in_t + nd * ldw_in, xs[0], d_in);
#if FFF_SHARE == 4
        else if (m == 4)
            FFF_NAME(fff_dot4)(w_in_t + nd * ldw_in, xs, d_in, z);
#endif
        else
            FFF_NAME(fff_dot_shared)(w_in_t + nd * ldw_in, xs, m, d_in, z);
        for (int g = 0; g < m; g++) {
            const ptrdiff_t i = ids[grp[g]];
            FFF_T zg = z[g];
            if (b_in_t)
                zg += b_in_t[nd];
            const size_t p = (size_t)i * n_path + (size_t)t * n_lev + level;
            path[p] = (int32_t)(t * n_nodes + nd);
            acts[p] = zg; /* the logit; activated later, off the walk's critical path */
            if (routes)
                routes[p] = nd;
            node[i] = (int32_t)(2 * nd + 1 + (zg > 0));
        }
    }
}

/* The share of fff_forward_tile's work of thread `tid` out of `nthr`: a
 * static split of every loop, with the sorts on thread 0 and barriers
 * between the phases only when nthr > 1. The split is written out rather
 * than left to `omp for`/`omp single`: orphaned directives would bind to
 * the caller's team when this runs single-threaded inside the driver's
 * prange, and a parallel region of one thread costs ~2 us per call, as much
 * as a batch-1 token. */
FFF_INLINE void FFF_NAME(fff_tile_body)(const FFF_T *x, ptrdiff_t ldx, const FFF_T *w_in, ptrdiff_t ldw_in,
                                       const FFF_T *b_in, const FFF_T *w_out, ptrdiff_t ldw_out, ptrdiff_t n_tile,
                                       ptrdiff_t d_in, ptrdiff_t d_out, int depth, int n_trees, int act, FFF_T *y,
                                       ptrdiff_t ldy, int64_t *routes,
                                        FFF_T *acts, int32_t *path, int32_t *node, int32_t *order,
                                        int32_t *order2, int32_t *count, int tid, int nthr)
{
    const int n_lev = depth + 1;
    const int n_path = n_trees * n_lev;
    const ptrdiff_t n_nodes = ((ptrdiff_t)2 << depth) - 1;
    const ptrdiff_t n_chunks = (n_tile + FFF_SHARE - 1) / FFF_SHARE;
    /* This thread's static share of tokens [i0, i1) and of chunks [c0, c1). */
    const ptrdiff_t i0 = (ptrdiff_t)((int64_t)n_tile * tid / nthr), i1 = (ptrdiff_t)((int64_t)n_tile * (tid + 1) / nthr);
    const ptrdiff_t c0 = (ptrdiff_t)((int64_t)n_chunks * tid / nthr), c1 = (ptrdiff_t)((int64_t)n_chunks * (tid + 1) / nthr);

    for (ptrdiff_t i = i0; i < i1; i++)
        order[i] = (int32_t)i;

    for (int t = 0; t < n_trees; t++) {
        const FFF_T *w_in_t = w_in + t * n_nodes * ldw_in;
        FFF_TEAM_BARRIER(nthr); /* the previous tree's walks are done with node[] */
        for (ptrdiff_t i = i0; i < i1; i++)
            node[i] = 0;
        FFF_TEAM_BARRIER(nthr);

        for (int l0 = 0; l0 < n_lev; l0 += FFF_LEVEL_GROUP) {
            const int l1 = l0 + FFF_LEVEL_GROUP < n_lev ? l0 + FFF_LEVEL_GROUP : n_lev;
            if (l0 > 0 && n_tile > 1) {
                FFF_TEAM_BARRIER(nthr); /* every walk of the previous group is done */
                if (tid == 0) {
                    FFF_NAME(fff_sort_by_node)(order, order2, node, n_tile, ((ptrdiff_t)1 << l0) - 1, l0, count);
                    memcpy(order, order2, (size_t)n_tile * sizeof(int32_t));
                }
                FFF_TEAM_BARRIER(nthr);
            }
            for (ptrdiff_t c = c0; c < c1; c++) {
                const ptrdiff_t k0 = c * FFF_SHARE;
                const int kn = n_tile - k0 < FFF_SHARE ? (int)(n_tile - k0) : FFF_SHARE;
                for (int level = l0; level < l1; level++)
                    FFF_NAME(fff_chunk_level)(x, ldx, w_in_t, ldw_in, b_in ? b_in + t * n_nodes : NULL, d_in,
                                              order + k0, kn, level, t, n_lev, n_path, n_nodes, acts, path, routes,
                                              node);
            }
        }
    }

    if (y) {
        FFF_TEAM_BARRIER(nthr); /* all walks done: every logit and leaf is known */
#if defined(FFF_GELU_BLOCK)
        if (act == FFF_ACT_GELU)
            FFF_GELU_BLOCK(acts + i0 * n_path, (i1 - i0) * n_path);
        else
#endif
        for (ptrdiff_t p = i0 * n_path; p < i1 * n_path; p++) {
            const FFF_T z = acts[p];
            acts[p] = (z != z) ? z : FFF_NAME(fff_act)(z, act); /* NaN stays NaN (relu too) */
        }
        /* Output, FFF_SHARE tokens at a time, in order of their (last
         * tree's) leaf, i.e. sorted by their whole path: neighbours share
         * upper rows. node[] holds the children of the leaves:
         * 2**(depth+1) consecutive ids. */
        if (n_tile > 1 && tid == 0) {
            FFF_NAME(fff_sort_by_node)(order, order2, node, n_tile, ((ptrdiff_t)2 << depth) - 1, depth + 1, count);
            memcpy(order, order2, (size_t)n_tile * sizeof(int32_t));
        }
        FFF_TEAM_BARRIER(nthr); /* activations and the leaf order are ready */
        for (ptrdiff_t c = c0; c < c1; c++) {
            const ptrdiff_t k0 = c * FFF_SHARE;
            const int m = n_tile - k0 < FFF_SHARE ? (int)(n_tile - k0) : FFF_SHARE;
            FFF_T *ys[FFF_SHARE];
            const int32_t *rows[FFF_SHARE];
            const FFF_T *as[FFF_SHARE];
            for (int j = 0; j < m; j++) {
                const ptrdiff_t i = order[k0 + j];
                ys[j] = y + i * ldy;
                rows[j] = path + (size_t)i * n_path;
                as[j] = acts + (size_t)i * n_path;
            }
            if (m == 1)
                FFF_NAME(fff_path_sum)(ys[0], w_out, ldw_out, rows[0], as[0], n_path, d_out, 0);
#if FFF_SHARE == 4
            else if (m == 4)
                FFF_NAME(fff_path_sum4)(ys, w_out, ldw_out, rows, as, n_path, d_out);
#endif
            else
                FFF_NAME(fff_path_sum_shared)(ys, w_out, ldw_out, rows, as, m, n_path, d_out);
        }
    }
}

/*
 * fff_forward_tile: a tile of n_tile tokens, all trees (n_tile = 1 is the
 * lean batch-1 path: no sorting, one walk, one output sum).
 *
 * x       : IN  (n_tile, d_in), row stride ldx
 * w_in    : IN  (n_trees * n_nodes, d_in), row stride ldw_in
 * b_in    : IN  (n_trees * n_nodes,) or NULL
 * w_out   : IN  (n_trees * n_nodes, d_out), row stride ldw_out (node-major)
 * y       : OUT (n_tile, d_out), row stride ldy, or NULL (routes only)
 * routes  : OUT (n_tile, n_trees, depth + 1), or NULL
 * scratch : fff_scratch_bytes(n_tile, depth, n_trees) bytes
 * n_threads : OpenMP threads that share this one tile (1: serial)
 *
 * Routing: per level group, tokens sorted by their node go in chunks of
 * FFF_SHARE that walk the group's levels in lockstep; at each level, chunk
 * tokens sitting on the same node take their dot products together
 * (fff_dot_shared: the row is loaded once).  Output: tokens sorted by their
 * leaf (hence by their whole path) are summed FFF_SHARE at a time
 * (fff_path_sum_shared), so the rows they share are read from L1.
 */
FFF_DISPATCH
static void FFF_NAME(fff_forward_tile)(const FFF_T *x, ptrdiff_t ldx, const FFF_T *w_in, ptrdiff_t ldw_in,
                                       const FFF_T *b_in, const FFF_T *w_out, ptrdiff_t ldw_out, ptrdiff_t n_tile,
                                       ptrdiff_t d_in, ptrdiff_t d_out, int depth, int n_trees, int act, FFF_T *y,
                                       ptrdiff_t ldy, int64_t *routes, void *scratch, int n_threads)
{
    const int n_path = n_trees * (depth + 1);
    const ptrdiff_t n_chunks = (n_tile + FFF_SHARE - 1) / FFF_SHARE;

    /* Carve the scratch: activations first (widest alignment). */
    FFF_T *acts = (FFF_T *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63); /* (n_tile, n_path) */
    int32_t *path = (int32_t *)(acts + (size_t)n_tile * n_path);          /* (n_tile, n_path) rows */
    int32_t *node = path + (size_t)n_tile * n_path;                       /* (n_tile,) */
    int32_t *order = node + n_tile;                                       /* (n_tile,) */
    int32_t *order2 = order + n_tile;                                     /* (n_tile,) */
    int32_t *count = order2 + n_tile;                                     /* (n_tile + 2,) */

    /* n_threads > 1 splits the tile itself: after each sort, every thread
     * takes a contiguous range of the sorted chunks, i.e. its own subtrees,
     * so the tile's tokens keep sharing rows however many threads run. The
     * sorts run on one thread; every token is still handled exactly as on
     * one thread, so the results do not depend on n_threads. */
    if (n_threads > n_chunks)
        n_threads = (int)n_chunks;
    if (n_threads < 1)
        n_threads = 1;
#ifdef _OPENMP
    if (n_threads > 1) {
#pragma omp parallel num_threads(n_threads)
        FFF_NAME(fff_tile_body)(x, ldx, w_in, ldw_in, b_in, w_out, ldw_out, n_tile, d_in, d_out, depth, n_trees, act,
                                y, ldy, routes, acts, path, node, order, order2, count, omp_get_thread_num(),
                                omp_get_num_threads());
        return;
    }
#endif
    FFF_NAME(fff_tile_body)(x, ldx, w_in, ldw_in, b_in, w_out, ldw_out, n_tile, d_in, d_out, depth, n_trees, act, y,
                            ldy, routes, acts, path, node, order, order2, count, 0, 1);
}

#undef FFF_CAT2
#undef FFF_CAT
#undef FFF_NAME
#endif /* FFF_T && FFF_SUF */

/*
 * fff_quant.h -- the int8 FFF layer: conditional matrix multiplication on
 * int8 rows, with routing decisions exactly those of the float32 layer.
 *
 * Readable reference: pyfff/fff_int8.py (int8_reference, and the row
 * preparation).  Tests: tests/test_fff_int8.py.
 *
 * Formats (prepared once by pyfff/fff_int8.py)
 * --------------------------------------------
 * Input rows, per neuron r, padded with zeros to kp = d_in rounded up to 64:
 *   q[r]  = rint(w_in[r] / s[r]) in [-127, 127],  s[r] = max|w_in[r]| / 127,
 *   q2[r] = rint((w_in[r] - s q[r]) / (s / 256))   (the residual, also int8),
 * so w1 = s q is an 8-bit and w2 = s q + (s / 256) q2 a 16-bit approximation.
 * Output rows: q_out[r] = rint(w_out[r] / s_out[r]), padded to dp (64 columns).
 * Per row, one record of FQ_NF doubles (FQ_E1 .. FQ_SUMQ2 below).
 *
 * Tokens are quantized at run time to 16 bits, asymmetric, with 0 exact:
 *   c_i = clamp(rint(x_i * fl(1 / sx)) + zp, 0, FQ_XMAX),  x_i ~= sx (c_i - zp),
 * split into a high byte h_i = (c_i + 128) >> 8 (0..255) and a low part
 * l_i = c_i - 256 h_i + 128 (0..255); x2 = sx (c - zp) = sx (256 h + l - 128 - zp).
 *
 * Routing-exact decisions
 * -----------------------
 * Level 1: z1 = x2 . w1 + b = sx s (256 h.q + l.q - (128 + zp) sum q) + b (two
 * u8 x s8 dot products in one pass over the row, exact in int32).  Level 2
 * (only where level 1 cannot decide): z2 = x2 . w2 + b, from two more exact
 * dot products with the residual row (h.q2, l.q2; see fq_logit).  Last
 * resort: the float32 logit itself, computed by the float32 layer's own dot
 * product (fff_dot_f32, same code, same order, same ISA clone), so its
 * decision is the float32 layer's by construction.
 *
 * Proof that a level's decision equals the float32 layer's.  Let z = x . w + b
 * in exact arithmetic, zf the float32 layer's logit and zk = x2 . wk + b.
 *   |zk - z| = |x . (w - wk) + (x - x2) . wk| <= |x| |w - wk| + |x - x2| |wk|
 * by the triangle and Cauchy-Schwarz inequalities (|.| the 2-norm).  The
 * float32 dot product over d_in terms, in any summation order, with or
 * without FMA, plus the bias add (Higham, Accuracy and Stability of Numerical
 * Algorithms, 3.1), gives
 *   |zf - z| <= g (sum |x_i w_i| + |b|) + (d_in + 1) 2^-149
 *            <= g (|x| |w| + |b|) + (d_in + 1) 2^-149,   g = (d_in+1) u / (1 - (d_in+1) u), u = 2^-24,
 * the last term covering underflow.  So |zk - zf| <= |x| (|w - wk| + g |w|) +
 * |x - x2| |wk| + g |b| + (d_in + 1) 2^-149 = |x| E + |x - x2| N + C with the
 * per-row E, N, C prepared (rounded up) in FQ_E*, FQ_N*, FQ_C.  zk is
 * evaluated in double from exact integers: three roundings, at most
 * 2^-50 (|zk| + 2|b|) together.  If |zk| exceeds the sum of all of these
 * (times 1 + 2^-40 for the roundings of the bound itself), zf lies strictly on
 * zk's side of 0: the same decision (right iff > 0), and zf != 0.  A float32
 * logit of exactly 0 can therefore never be decided by a level: it always
 * reaches the float32 fallback.  Upper bounds on the token norms |x| and |x - x2|
 * come from fq_quantize_token, whose comment derives them.
 *
 * Activations use the logit that decided (z1, z2 or zf, rounded to float), so
 * outputs differ from the float32 layer by the output rows' rounding (at most
 * s_out / 2 per weight) and by the logit difference (at most the level's
 * bound, times max |gelu'| < 1.13); pyfff/fff_int8.py, int8_tolerance, gives
 * the bound the tests check.
 *
 * Tokens with a NaN or an infinity take the float32 logit at every node (as the
 * float32 layer: NaN goes left) and give non-finite outputs.
 *
 * The integer dot products run on the code path of qgemm.h (AVX512-VNNI,
 * AVX-VNNI, AVX2, portable C; PYFFF_INT8_PATH forces one): every path gives the
 * same integers, hence bitwise the same results.  The rest of the tile is
 * compiled per ISA level with target_clones, as the float32 kernel.
 */
#ifndef PYFFF_FFF_QUANT_H
#define PYFFF_FFF_QUANT_H

#include "fff_cpu.h"
#include "qgemm.h"

#define FQ_KB 64        /* rows (input and output) are padded to a multiple of this many bytes */
#define FQ_CHUNK 4       /* tokens that walk a level group in lockstep */
#define FQ_XMAX 65407   /* largest 16-bit token code: (FQ_XMAX + 128) >> 8 == 255 */

/* Columns of the per-row record (doubles). */
enum { FQ_E1, FQ_N1, FQ_E2, FQ_N2, FQ_C, FQ_S, FQ_B, FQ_SUMQ, FQ_SUMQ2, FQ_NF };

/* Per-token quantities (doubles) in the tile's scratch. */
enum { FQ_TSX, FQ_TZP, FQ_TNX, FQ_TEX, FQ_TFINITE, FQ_TN }; /* FQ_TFINITE: the token was quantized */

/* Fallback counters of one call. */
typedef struct {
    int64_t level2; /* nodes level 1 could not decide */
    int64_t exact;  /* nodes level 2 could not decide either: float32 logit */
} fq_stats;

/* ------------------------------------------------------------ dot products */

/* d[0] = h . w and d[1] = l . w for unsigned bytes h, l and signed bytes w (kp a multiple of 64), exact: one pass
 * over the weight row for both halves of the 16-bit token codes. */
typedef void (*fq_dot_fn)(const uint8_t *h, const uint8_t *l, const int8_t *w, ptrdiff_t kp, int32_t *d);

static void fq_dot_generic(const uint8_t *h, const uint8_t *l, const int8_t *w, ptrdiff_t kp, int32_t *d)
{
    int32_t sh = 0, sl = 0;
    for (ptrdiff_t j = 0; j < kp; j++) {
        sh += (int32_t)h[j] * (int32_t)w[j];
        sl += (int32_t)l[j] * (int32_t)w[j];
    }
    d[0] = sh;
    d[1] = sl;
}

#if QG_X86
#include <immintrin.h>

static QG_TAVX2 int32_t fq_hsum256(__m256i v)
{
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

static QG_TAVX2 void fq_dot_avx2(const uint8_t *h, const uint8_t *l, const int8_t *w, ptrdiff_t kp, int32_t *d)
{
    /* widened to 16 bits, pairs summed by vpmaddwd: exact (no vpmaddubsw saturation) */
    __m256i ah = _mm256_setzero_si256(), al = _mm256_setzero_si256();
    for (ptrdiff_t j = 0; j < kp; j += 16) {
        const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + j)));
        ah = _mm256_add_epi32(ah, _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(h + j))), wv));
        al = _mm256_add_epi32(al, _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(l + j))), wv));
    }
    d[0] = fq_hsum256(ah);
    d[1] = fq_hsum256(al);
}

static QG_TAVXVNNI void fq_dot_avxvnni(const uint8_t *h, const uint8_t *l, const int8_t *w, ptrdiff_t kp, int32_t *d)
{
    __m256i ah = _mm256_setzero_si256(), al = _mm256_setzero_si256();
    for (ptrdiff_t j = 0; j < kp; j += 32) {
        const __m256i wv = _mm256_loadu_si256((const __m256i *)(w + j));
        ah = _mm256_dpbusd_avx_epi32(ah, _mm256_loadu_si256((const __m256i *)(h + j)), wv);
        al = _mm256_dpbusd_avx_epi32(al, _mm256_loadu_si256((const __m256i *)(l + j)), wv);
    }
    d[0] = fq_hsum256(ah);
    d[1] = fq_hsum256(al);
}

static QG_T512 void fq_dot_avx512vnni(const uint8_t *h, const uint8_t *l, const int8_t *w, ptrdiff_t kp, int32_t *d)
{
    __m512i ah = _mm512_setzero_si512(), al = _mm512_setzero_si512();
    for (ptrdiff_t j = 0; j < kp; j += 64) {
        const __m512i wv = _mm512_loadu_si512(w + j);
        ah = _mm512_dpbusd_epi32(ah, _mm512_loadu_si512(h + j), wv);
        al = _mm512_dpbusd_epi32(al, _mm512_loadu_si512(l + j), wv);
    }
    d[0] = _mm512_reduce_add_epi32(ah);
    d[1] = _mm512_reduce_add_epi32(al);
}
#endif

/* The dot products of an int8 path (AMX's tiles do not pay for single rows: it uses AVX512-VNNI). */
static fq_dot_fn fq_dot_for(int path)
{
    switch (path) {
#if QG_X86
    case QG_AVX2: return fq_dot_avx2;
    case QG_AVXVNNI: return fq_dot_avxvnni;
    case QG_AVX512VNNI:
    case QG_AMX: return fq_dot_avx512vnni;
#endif
    default: return fq_dot_generic;
    }
}

/* ------------------------------------------------------------ token quantization */

/* Round a non-negative double up by a relative 2^-40 (covers the roundings of a norm's computation). */
static inline double fq_up(double v) { return v * (1.0 + 0x1p-40); }

/* Quantize one token (see the header comment); writes h, l (kp bytes each; past d_in they meet zero weights) and
 * tq[FQ_TN].
 * All in float32, 16 lanes at a time with explicit vectors:
 *   t = x * inv (inv = fl(1/sx)),  c = clamp(rint(t) + zp, 0, FQ_XMAX),  r = t - (c - zp) (exact),
 * so x / sx - (c - zp) = r + (x / sx - t) with |x / sx - t| <= 2.01 u |x| / sx (two roundings), and
 *   |x - x2| = sx |x / sx - (c - zp)| <= sx |r| + 2.01 u |x|,   |x| <= sx |t| (1 + 2.01 u) / (1 - 2.01 u).
 * The sums of squares are of code-sized numbers (no underflow worth a bound: |t|^2 >= (FQ_XMAX / 2)^2 for the
 * largest element) and carry a relative error of at most g = (d_in + 16) u / (1 - (d_in + 16) u) in any order,
 * so they are divided by 1 - g; every final step is rounded up in double. */
FFF_INLINE void fq_quantize_token(const float *x, ptrdiff_t d_in, ptrdiff_t kp, uint8_t *h, uint8_t *l, double *tq)
{
    typedef float vf16 __attribute__((vector_size(64)));
    typedef int32_t vi16 __attribute__((vector_size(64)));
    float lo, hi;
    const int finite = qg_row_range(x, d_in, &lo, &hi);
    tq[FQ_TFINITE] = finite; /* 0: no codes; the token takes the float32 logit at every node */
    if (!finite) {
        tq[FQ_TSX] = tq[FQ_TZP] = tq[FQ_TNX] = tq[FQ_TEX] = 0.0;
        return;
    }
    const double range = (double)hi - (double)lo;
    if (range > 0.0 && range < 0x1p-100) { /* 1 / sx could overflow: every logit of this token in float32 */
        tq[FQ_TFINITE] = 0.0;
        return;
    }
    const float sx = range > 0.0 ? (float)(range / FQ_XMAX) : 1.0f; /* the scale: a float, so sx * code is exact */
    const float inv = 1.0f / sx;
    const float shift = 12582912.0f; /* 1.5 * 2^23: adding and subtracting it rounds to an integer (|t| < 2^22) */
    const float zp = ((-lo * inv) + shift) - shift;
    typedef uint8_t vb16 __attribute__((vector_size(16)));
    const vf16 shiftv = (vf16){0} + shift, zpv = (vf16){0} + zp, invv = (vf16){0} + inv;
    const vf16 zero = {0}, top = (vf16){0} + (float)FQ_XMAX;
    vf16 st = {0}, sr = {0}; /* 16 lanes of sums, in registers */
    for (ptrdiff_t j = 0; j < d_in; j += 16) {
        vf16 xv;
        if (j + 16 <= d_in) {
            memcpy(&xv, x + j, sizeof xv);
        } else { /* a zero tail: codes of 0 (meeting zero weights), nothing added to the sums */
            float xin[16] = {0};
            memcpy(xin, x + j, (size_t)(d_in - j) * sizeof(float));
            memcpy(&xv, xin, sizeof xv);
        }
        const vf16 t = xv * invv;
        vf16 c = ((t + shiftv) - shiftv) + zpv;
        c = (vf16)((vi16)c & ~(c < zero)); /* clamp to [0, FQ_XMAX] */
        const vi16 over = c > top;
        c = (vf16)(((vi16)c & ~over) | ((vi16)top & over));
        const vi16 ci = __builtin_convertvector(c, vi16), hv = (ci + 128) >> 8, lv = ci - 256 * hv + 128;
        const vb16 hb = __builtin_convertvector(hv, vb16), lb = __builtin_convertvector(lv, vb16);
        memcpy(h + j, &hb, 16); /* h and l hold kp >= d_in rounded up to 16 bytes */
        memcpy(l + j, &lb, 16);
        const vf16 rv = t - (c - zpv);
        st += t * t;
        sr += rv * rv;
    }
    double sum_t = 0.0, sum_r = 0.0;
    for (int k = 0; k < 16; k++) {
        sum_t += st[k];
        sum_r += sr[k];
    }
    const double u = 0x1p-24, g = (double)(d_in + 16) * u / (1.0 - (double)(d_in + 16) * u);
    const double nx = fq_up((double)sx * sqrt(sum_t / (1.0 - g)) * (1.0 + 2.01 * u) / (1.0 - 2.01 * u));
    tq[FQ_TSX] = sx;
    tq[FQ_TZP] = zp;
    tq[FQ_TNX] = nx;
    tq[FQ_TEX] = fq_up((double)sx * sqrt(sum_r / (1.0 - g)) + 2.01 * u * nx);
}

/* ------------------------------------------------------------ one node */

/* Whether a level's logit z (from exact integers, see the header) decides: |z| beyond its error bound. */
FFF_INLINE int fq_decides(double z, double bound, double b)
{
    return fabs(z) > fq_up(bound + 0x1p-50 * (fabs(z) + 2.0 * fabs(b)));
}

/* The logit of token (x, h, l, tq) at row r, its decision made as the float32 layer makes it. */
FFF_INLINE float fq_logit(fq_dot_fn dot, const float *x, const uint8_t *h, const uint8_t *l, const double *tq,
                             const int8_t *q, const int8_t *q2, const double *rec, const float *w_row, float b_row,
                             ptrdiff_t d_in, ptrdiff_t kp, fq_stats *st)
{
    if (tq[FQ_TFINITE] != 0.0) {
        const double sx = tq[FQ_TSX], zp = tq[FQ_TZP], b = rec[FQ_B];
        const double sxs = sx * rec[FQ_S]; /* exact: two floats */
        const int64_t off = 128 + (int64_t)zp;
        int32_t d1[2], d2[2];
        /* x2 . w1 / (sx s) = sum (256 h + l - 128 - zp) q = 256 h.q + l.q - (128 + zp) sum q */
        dot(h, l, q, kp, d1);
        const int64_t a1 = 256 * (int64_t)d1[0] + d1[1] - off * (int64_t)rec[FQ_SUMQ];
        const double z1 = sxs * (double)a1 + b;
        if (fq_decides(z1, tq[FQ_TNX] * rec[FQ_E1] + tq[FQ_TEX] * rec[FQ_N1] + rec[FQ_C], b))
            return (float)z1;
        st->level2++;
        /* x2 . w2 / (sx s / 256) = sum (256 h + l - 128 - zp)(256 q + q2) = 256 a1 + 256 h.q2 + l.q2 - (128 + zp) sum q2,
         * exact in int64 */
        dot(h, l, q2, kp, d2);
        const int64_t a2 = 256 * a1 + 256 * (int64_t)d2[0] + d2[1] - off * (int64_t)rec[FQ_SUMQ2];
        const double z2 = sxs * 0x1p-8 * (double)a2 + b;
        if (fq_decides(z2, tq[FQ_TNX] * rec[FQ_E2] + tq[FQ_TEX] * rec[FQ_N2] + rec[FQ_C], b))
            return (float)z2;
    }
    st->exact++;
    return fff_dot_f32(w_row, x, d_in) + b_row; /* the float32 layer's logit, bit for bit */
}

/* ------------------------------------------------------------ output rows */

/* Output rows are packed in blocks of 64 columns, byte 4 i + k of a block holding column 16 k + i (prepare_int8):
 * read as 16 int32 lanes, lane i's byte k is column 16 k + i, so two shifts give 16 consecutive columns. */
typedef int32_t fq_vi __attribute__((vector_size(64)));
typedef float fq_vf __attribute__((vector_size(64)));
#define FQ_WIDEN(v, k) __builtin_convertvector(((v) << (24 - 8 * (k))) >> 24, fq_vf)

/* ys[j][0:d_out] = sum_k as[j][k] q_out[rows[j][k]] for m <= FQ_CHUNK tokens (activations already scaled by
 * s_out), each summed in k order.  Tokens in leaf order share their upper rows: a row all m tokens share is
 * loaded and widened once.  A token's sums do not depend on the other tokens of its chunk. */
FFF_INLINE void fq_path_sum(float *const *ys, const int8_t *q_out, ptrdiff_t dp, ptrdiff_t d_out,
                            const int32_t *const *rows, const float *const *as, int m, int n_path)
{
    for (ptrdiff_t c = 0; c < d_out; c += 64) {
        fq_vf s[FQ_CHUNK][4];
        for (int j = 0; j < FQ_CHUNK; j++)
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = (fq_vf){0};
        for (int k = 0; k < n_path; k++) {
            int shared = 1;
            for (int j = 1; j < m; j++)
                shared &= rows[j][k] == rows[0][k];
            if (shared) {
                fq_vi v;
                memcpy(&v, q_out + (ptrdiff_t)rows[0][k] * dp + c, sizeof v);
                const fq_vf w0 = FQ_WIDEN(v, 0), w1 = FQ_WIDEN(v, 1), w2 = FQ_WIDEN(v, 2), w3 = FQ_WIDEN(v, 3);
                for (int j = 0; j < FQ_CHUNK; j++) {
                    if (j < m) {
                        const float a = as[j][k];
                        s[j][0] += a * w0, s[j][1] += a * w1, s[j][2] += a * w2, s[j][3] += a * w3;
                    }
                }
            } else {
                for (int j = 0; j < FQ_CHUNK; j++) {
                    if (j < m) {
                        fq_vi v;
                        memcpy(&v, q_out + (ptrdiff_t)rows[j][k] * dp + c, sizeof v);
                        const float a = as[j][k];
                        s[j][0] += a * FQ_WIDEN(v, 0), s[j][1] += a * FQ_WIDEN(v, 1);
                        s[j][2] += a * FQ_WIDEN(v, 2), s[j][3] += a * FQ_WIDEN(v, 3);
                    }
                }
            }
        }
        const size_t n_c = (size_t)(d_out - c < 64 ? d_out - c : 64);
        for (int j = 0; j < m; j++) {
            if (n_c == 64) {
                memcpy(ys[j] + c, s[j], sizeof s[j]);
            } else {
                float buf[64];
                memcpy(buf, s[j], sizeof buf);
                memcpy(ys[j] + c, buf, n_c * sizeof(float));
            }
        }
    }
}

/* ------------------------------------------------------------ the tile */

/* The int8 layer as the kernel sees it (arrays prepared by pyfff/fff_int8.py). */
typedef struct {
    const int8_t *q, *q2;   /* (n_rows, kp) */
    const double *rec;      /* (n_rows, FQ_NF) */
    const float *w_in;      /* (n_rows, d_in): the float32 rows, for the last resort */
    const float *b_in;      /* (n_rows,) or NULL */
    const int8_t *q_out;    /* (n_rows, dp) */
    const float *s_out;     /* (n_rows,) */
    ptrdiff_t d_in, kp, d_out, dp;
    int depth, n_trees, act;
} fq_layer;

/* Scratch of a tile of n tokens, in bytes. */
static size_t fq_scratch_bytes(ptrdiff_t n, const fq_layer *L)
{
    const size_t n_path = (size_t)n * (size_t)(L->n_trees * (L->depth + 1));
    return 2 * (size_t)n * (size_t)L->kp                    /* h, l */
         + (size_t)n * FQ_TN * sizeof(double)               /* token quantities */
         + n_path * (sizeof(int32_t) + sizeof(float))       /* path rows, activations */
         + (3 * (size_t)n + (size_t)n + 2) * sizeof(int32_t) /* node, order, order2, counts */
         + 128;
}

/*
 * fq_forward_tile: n tokens, all trees (see fff_forward_tile of fff_kernels.h for the shape of the walk):
 * quantize the tokens, route them level group by level group in node order (tokens on the same node run back to
 * back, so its rows are read from L1), activate, and sum the outputs in leaf order.
 *
 * x : IN (n, d_in) row stride ldx;  y : OUT (n, d_out) row stride ldy, or NULL;  routes : OUT (n, n_trees,
 * depth + 1) or NULL;  st : fallback counters, added to.
 */
FFF_DISPATCH
static void fq_forward_tile(fq_dot_fn dot, const fq_layer *L, const float *x, ptrdiff_t ldx, ptrdiff_t n, float *y,
                            ptrdiff_t ldy, int64_t *routes, void *scratch, fq_stats *st)
{
    const int n_lev = L->depth + 1, n_path = L->n_trees * n_lev;
    const ptrdiff_t n_nodes = ((ptrdiff_t)2 << L->depth) - 1, kp = L->kp;
    double *tq = (double *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63); /* (n, FQ_TN) */
    float *acts = (float *)(tq + (size_t)n * FQ_TN);                      /* (n, n_path) */
    int32_t *path = (int32_t *)(acts + (size_t)n * n_path);               /* (n, n_path) */
    int32_t *node = path + (size_t)n * n_path, *order = node + n, *order2 = order + n, *count = order2 + n;
    uint8_t *h = (uint8_t *)(count + n + 2), *l = h + (size_t)n * kp;

    for (ptrdiff_t i = 0; i < n; i++) {
        fq_quantize_token(x + i * ldx, L->d_in, kp, h + i * kp, l + i * kp, tq + i * FQ_TN);
        order[i] = (int32_t)i;
    }
    for (int t = 0; t < L->n_trees; t++) {
        for (ptrdiff_t i = 0; i < n; i++)
            node[i] = 0;
        for (int l0 = 0; l0 < n_lev; l0 += FFF_LEVEL_GROUP) {
            const int l1 = l0 + FFF_LEVEL_GROUP < n_lev ? l0 + FFF_LEVEL_GROUP : n_lev;
            if (l0 > 0 && n > 1) {
                fff_sort_by_node_f32(order, order2, node, n, ((ptrdiff_t)1 << l0) - 1, l0, count);
                memcpy(order, order2, (size_t)n * sizeof(int32_t));
            }
            /* FQ_CHUNK tokens walk the group's levels in lockstep: independent chains for the memory system */
            for (ptrdiff_t k0 = 0; k0 < n; k0 += FQ_CHUNK) {
                const int kn = n - k0 < FQ_CHUNK ? (int)(n - k0) : FQ_CHUNK;
                for (int level = l0; level < l1; level++) {
                    for (int j = 0; j < kn; j++) {
                        const ptrdiff_t i = order[k0 + j], nd = node[i], r = t * n_nodes + nd;
                        const float b = L->b_in ? L->b_in[r] : 0.0f;
                        const float z = fq_logit(dot, x + i * ldx, h + i * kp, l + i * kp, tq + i * FQ_TN,
                                                 L->q + r * kp, L->q2 + r * kp, L->rec + r * FQ_NF,
                                                 L->w_in + r * L->d_in, b, L->d_in, kp, st);
                        const size_t p = (size_t)i * n_path + (size_t)t * n_lev + level;
                        path[p] = (int32_t)r;
                        acts[p] = z;
                        if (routes)
                            routes[p] = nd;
                        node[i] = (int32_t)(2 * nd + 1 + (z > 0));
                    }
                }
            }
        }
    }
    if (!y)
        return;
#if defined(FFF_HAVE_GELU_F32)
    if (L->act == FFF_ACT_GELU)
        fff_gelu_f32(acts, n * n_path);
    else
#endif
    for (ptrdiff_t p = 0; p < n * n_path; p++)
        acts[p] = acts[p] != acts[p] ? acts[p] : fff_act_f32(acts[p], L->act);
    for (ptrdiff_t p = 0; p < n * n_path; p++)
        acts[p] *= L->s_out[path[p]];
    if (n > 1) { /* outputs in leaf order: neighbours share their upper rows */
        fff_sort_by_node_f32(order, order2, node, n, ((ptrdiff_t)2 << L->depth) - 1, L->depth + 1, count);
        memcpy(order, order2, (size_t)n * sizeof(int32_t));
    }
    for (ptrdiff_t k0 = 0; k0 < n; k0 += FQ_CHUNK) {
        const int m = n - k0 < FQ_CHUNK ? (int)(n - k0) : FQ_CHUNK;
        float *ys[FQ_CHUNK];
        const int32_t *rows[FQ_CHUNK];
        const float *as[FQ_CHUNK];
        for (int j = 0; j < m; j++) {
            const ptrdiff_t i = order[k0 + j];
            ys[j] = y + i * ldy;
            rows[j] = path + (size_t)i * n_path;
            as[j] = acts + (size_t)i * n_path;
        }
        fq_path_sum(ys, L->q_out, L->dp, L->d_out, rows, as, m, n_path);
    }
}

#endif /* PYFFF_FFF_QUANT_H */

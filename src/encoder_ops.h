/*
 * encoder_ops.h -- float32 LayerNorm and attention for pyfff's encoder.
 *
 * NumPy references: layer_norm_ and _attention_reference in pyfff/encoder/_forward.py.
 * Tests: tests/test_encoder_ops.py.  Driver: pyfff/_encoder_ops.pyx.
 *
 * Both replace chains of NumPy passes (LayerNorm: five; attention: two small
 * GEMMs per (sequence, head) and a six-pass softmax) by one pass over data
 * that stays in L1/L2.  SIMD through GCC/Clang vector extensions (16 floats),
 * compiled per ISA level with target_clones like the FFF kernel; plain C
 * elsewhere.  A row's result depends only on that row (and, for attention,
 * its sequence and head), never on how rows or heads are split over threads.
 */
#ifndef PYFFF_ENCODER_OPS_H
#define PYFFF_ENCODER_OPS_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64)) && defined(__linux__) && !defined(PYFFF_NO_DISPATCH)
#define EO_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define EO_CLONES
#endif

#if defined(__GNUC__)
#define EO_INLINE static inline __attribute__((always_inline))
#else
#define EO_INLINE static inline
#endif

#if (defined(__GNUC__) || defined(__clang__)) && !defined(PYFFF_NO_VECTOR_EXT)
#define EO_VECTOR_EXT 1
typedef float eo_v16 __attribute__((vector_size(64)));
EO_INLINE eo_v16 eo_load(const float *p)
{
    eo_v16 v;
    memcpy(&v, p, sizeof v);
    return v;
}
EO_INLINE void eo_store(float *p, eo_v16 v) { memcpy(p, &v, sizeof v); }
#else
#define EO_VECTOR_EXT 0
#endif

/* Sum of n floats in 16 interleaved partial sums (vectorisable; a fixed order, so every build of one ISA level
 * gives the same result). */
EO_INLINE float eo_sum(const float *x, ptrdiff_t n)
{
    float part[16] = {0};
    ptrdiff_t j = 0;
    for (; j + 16 <= n; j += 16)
        for (int t = 0; t < 16; t++)
            part[t] += x[j + t];
    for (int t = 0; j + t < n; t++)
        part[t] += x[j + t];
    float s = 0.0f;
    for (int t = 0; t < 16; t++)
        s += part[t];
    return s;
}

/* ------------------------------------------------------------------ LayerNorm */

/* out[i] = (x[i] - mean) / sqrt(var + eps) * w + b over rows of width h (biased variance, as torch).
 * Two passes over the row (mean, then centred sum of squares) and one to write; out may be x. */
EO_CLONES
static void eo_layer_norm_f32(const float *x, ptrdiff_t ldx, ptrdiff_t m, ptrdiff_t h, const float *w, const float *b,
                              float eps, float *out, ptrdiff_t ldo)
{
    for (ptrdiff_t i = 0; i < m; i++) {
        const float *xi = x + i * ldx;
        float *oi = out + i * ldo;
        const float mean = eo_sum(xi, h) / (float)h;
        float part[16] = {0};
        ptrdiff_t j = 0;
        for (; j + 16 <= h; j += 16)
            for (int t = 0; t < 16; t++)
                part[t] += (xi[j + t] - mean) * (xi[j + t] - mean);
        for (int t = 0; j + t < h; t++)
            part[t] += (xi[j + t] - mean) * (xi[j + t] - mean);
        float ss = 0.0f;
        for (int t = 0; t < 16; t++)
            ss += part[t];
        const float rstd = 1.0f / sqrtf(ss / (float)h + eps);
        for (ptrdiff_t j = 0; j < h; j++)
            oi[j] = (xi[j] - mean) * rstd * w[j] + b[j];
    }
}

/* ------------------------------------------------------------------ attention */

/* exp(x) for float: Cody-Waite range reduction to |r| <= ln2/2, a degree-7 Taylor polynomial (relative error
 * < 1e-8 before rounding) and 2^n from the exponent bits; 0 below -87 (where the scores of masked keys land).
 * Branch-free so the loops around it vectorise. */
EO_INLINE float eo_exp(float x)
{
    const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float n = rintf(xc * 1.44269504088896341f);
    float r = xc - n * 0.693145751953125f;
    r = r - n * 1.428606765330187045e-06f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union { uint32_t u; float f; } two_n;
    two_n.u = (uint32_t)((int32_t)n + 127) << 23;
    const float y = p * two_n.f;
    return x < -87.0f ? 0.0f : y;
}

/* Query rows per block: their scores share each load of K, their outputs each load of V, and their 8
 * independent accumulators cover the latency of the FMA units (4 cycles, 2 units). */
#define EO_QROWS 8

/* Scratch floats eo_attention_f32 needs for sequences of s tokens and heads of hd values. */
static inline size_t eo_attention_scratch(ptrdiff_t s, ptrdiff_t hd)
{
    const ptrdiff_t sp = (s + 15) / 16 * 16, hdp = (hd + 15) / 16 * 16;
    return (size_t)(hd * (sp + 16) + sp * hdp + EO_QROWS * (sp + hdp));
}

/* Softmax attention of one (sequence, head): ctx[i] = sum_j softmax_j(q[i] . k[j] + mask[j]) v[j].
 * q, k, v: rows of hd floats at row stride ld (the fused QKV layout; Q already carries the 1/sqrt(hd) scale);
 * mask: s additive key scores or NULL; ctx rows at stride ldc.  scratch: eo_attention_scratch(s, hd) floats. */
EO_CLONES
static void eo_attention_f32(const float *q, const float *k, const float *v, ptrdiff_t ld, ptrdiff_t s, ptrdiff_t hd,
                             const float *mask, float *ctx, ptrdiff_t ldc, float *scratch)
{
    const ptrdiff_t sp = (s + 15) / 16 * 16, hdp = (hd + 15) / 16 * 16;
    const ptrdiff_t ldk = sp + 16;    /* row stride of kt: not a multiple of 512 bytes, so its rows do not all
                                         map to the same few L1 sets while it is written column by column */
    float *kt = scratch;              /* hd x ldk: K transposed, so a score row is a run of contiguous products */
    float *vs = kt + hd * ldk;        /* sp x hdp: V with rows padded to 16 values (only where hd % 16 != 0) */
    float *sc = vs + sp * hdp;        /* EO_QROWS x sp scores, then probabilities */
    float *acc = sc + EO_QROWS * sp;  /* EO_QROWS x hdp outputs */
    for (ptrdiff_t j0 = 0; j0 < sp; j0 += 16)  /* 16 x 16 blocks: contiguous 16-value writes */
        for (ptrdiff_t d = 0; d < hd; d++)
            for (ptrdiff_t j = j0; j < j0 + 16; j++)
                kt[d * ldk + j] = j < s ? k[j * ld + d] : 0.0f;
    const float *vrows = v;           /* V read in place (row stride ld) unless rows need padding */
    ptrdiff_t ldv = ld;
    if (hd != hdp) {
        for (ptrdiff_t j = 0; j < s; j++)
            for (ptrdiff_t d = 0; d < hdp; d++)
                vs[j * hdp + d] = d < hd ? v[j * ld + d] : 0.0f;
        vrows = vs;
        ldv = hdp;
    }
    for (ptrdiff_t i0 = 0; i0 < s; i0 += EO_QROWS) {
        const int nr = (int)(s - i0 < EO_QROWS ? s - i0 : EO_QROWS);
        /* scores: sc[r][j] = q[i0 + r] . k[j]; rows past the end repeat row i0 (computed, never used) */
        const float *qr[EO_QROWS];
        for (int r = 0; r < EO_QROWS; r++)
            qr[r] = q + (i0 + (r < nr ? r : 0)) * ld;
#if EO_VECTOR_EXT
        for (ptrdiff_t j0 = 0; j0 < sp; j0 += 16) {
            eo_v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0};
            for (ptrdiff_t d = 0; d < hd; d++) {
                const eo_v16 kv = eo_load(kt + d * ldk + j0);
                a0 += kv * qr[0][d];
                a1 += kv * qr[1][d];
                a2 += kv * qr[2][d];
                a3 += kv * qr[3][d];
                a4 += kv * qr[4][d];
                a5 += kv * qr[5][d];
                a6 += kv * qr[6][d];
                a7 += kv * qr[7][d];
            }
            eo_store(sc + j0, a0);
            eo_store(sc + sp + j0, a1);
            eo_store(sc + 2 * sp + j0, a2);
            eo_store(sc + 3 * sp + j0, a3);
            eo_store(sc + 4 * sp + j0, a4);
            eo_store(sc + 5 * sp + j0, a5);
            eo_store(sc + 6 * sp + j0, a6);
            eo_store(sc + 7 * sp + j0, a7);
        }
#else
        for (int r = 0; r < EO_QROWS; r++)
            for (ptrdiff_t j = 0; j < sp; j++) {
                float a = 0.0f;
                for (ptrdiff_t d = 0; d < hd; d++)
                    a += qr[r][d] * kt[d * ldk + j];
                sc[r * sp + j] = a;
            }
#endif
        /* softmax over the s keys (max subtracted, as torch does) */
        for (int r = 0; r < nr; r++) {
            float *sr = sc + r * sp;
            if (mask)
                for (ptrdiff_t j = 0; j < s; j++)
                    sr[j] += mask[j];
            float mx = sr[0];
            for (ptrdiff_t j = 1; j < s; j++)
                mx = sr[j] > mx ? sr[j] : mx;
            for (ptrdiff_t j = 0; j < s; j++)
                sr[j] = eo_exp(sr[j] - mx);
            const float inv = 1.0f / eo_sum(sr, s);
            for (ptrdiff_t j = 0; j < s; j++)
                sr[j] *= inv;
        }
        /* context: acc[r] = sum_j p[r][j] v[j] (rows past nr hold copies of row 0's probabilities: unused) */
        for (int r = nr; r < EO_QROWS; r++)
            memcpy(sc + r * sp, sc, (size_t)s * sizeof(float));
#if EO_VECTOR_EXT
        for (ptrdiff_t d0 = 0; d0 < hdp; d0 += 16) {
            eo_v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0};
            for (ptrdiff_t j = 0; j < s; j++) {
                const eo_v16 vv = eo_load(vrows + j * ldv + d0);
                a0 += vv * sc[j];
                a1 += vv * sc[sp + j];
                a2 += vv * sc[2 * sp + j];
                a3 += vv * sc[3 * sp + j];
                a4 += vv * sc[4 * sp + j];
                a5 += vv * sc[5 * sp + j];
                a6 += vv * sc[6 * sp + j];
                a7 += vv * sc[7 * sp + j];
            }
            eo_store(acc + d0, a0);
            eo_store(acc + hdp + d0, a1);
            eo_store(acc + 2 * hdp + d0, a2);
            eo_store(acc + 3 * hdp + d0, a3);
            eo_store(acc + 4 * hdp + d0, a4);
            eo_store(acc + 5 * hdp + d0, a5);
            eo_store(acc + 6 * hdp + d0, a6);
            eo_store(acc + 7 * hdp + d0, a7);
        }
#else
        for (int r = 0; r < EO_QROWS; r++)
            for (ptrdiff_t d = 0; d < hdp; d++) {
                float a = 0.0f;
                for (ptrdiff_t j = 0; j < s; j++)
                    a += sc[r * sp + j] * vrows[j * ldv + d];
                acc[r * hdp + d] = a;
            }
#endif
        for (int r = 0; r < nr; r++)
            memcpy(ctx + (i0 + r) * ldc, acc + r * hdp, (size_t)hd * sizeof(float));
    }
}

#endif /* PYFFF_ENCODER_OPS_H */

/*
 * qgemm_check.c -- standalone check of src/qgemm.h (no Python needed).
 *
 *     gcc -O2 -Isrc tests/qgemm_check.c -o /tmp/qgemm_check -lm && /tmp/qgemm_check
 *
 * For awkward shapes (M, K, N around the tile, panel and chunk sizes), epilogue flags, bias or none, and row
 * strides larger than K / N, it checks that
 *   - qg_quantize_rows gives the row's scale and bytes within half a step of x (it feeds both sides below);
 *   - the generic path agrees with a naive computation done here (int64 dot products of the quantized rows,
 *     then the epilogue formula, GELU with libm's erff) to 1e-6 relative to |product| + |bias| + |y before|
 *     (FMA contraction and erf's few ulp make bitwise equality the wrong test here);
 *   - every other path this CPU supports gives bitwise the same output buffer as the generic path;
 *   - no path writes the columns between N and ldy, nor past the last row.
 * Prints one line per path and exits with status 1 on any failure.  tests/run_qgemm_check.sh runs it natively
 * and, where the cross tools are installed, for aarch64 under qemu.
 */
#define _DEFAULT_SOURCE /* syscall() in qgemm.h when built with -std=c99 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qgemm.h"

#ifndef QG_CHECK_SEED /* -DQG_CHECK_SEED=... for other data */
#define QG_CHECK_SEED 0x9E3779B97F4A7C15ull
#endif
static uint64_t rng = QG_CHECK_SEED; /* xorshift64: the same numbers on every platform */
static uint32_t rnd(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 32);
}
static float frand(float lo, float hi) { return lo + (hi - lo) * (float)(rnd() >> 8) * (1.0f / 16777216.0f); }
static int irand(int lo, int hi) { return lo + (int)(rnd() % (uint32_t)(hi - lo + 1)); }

/* malloc'd block whose returned pointer is 64-byte aligned (C99 has no aligned_alloc); free *raw */
static void *alloc64(size_t bytes, void **raw)
{
    *raw = calloc(bytes + 64, 1);
    if (!*raw) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    return (void *)(((uintptr_t)*raw + 63) & ~(uintptr_t)63);
}

/* w: k x n row-major -> packed[p][k/4][n%64][k%4] (zero padded to kp x np) and colsum[n] (padded to np). */
static void pack_weights(const int8_t *w, int k, int n, int8_t *packed, int32_t *colsum)
{
    const ptrdiff_t kp = qg_padded_k(k), np = qg_padded_n(n);
    memset(packed, 0, (size_t)(kp * np));
    memset(colsum, 0, (size_t)np * sizeof *colsum);
    for (int kk = 0; kk < k; kk++)
        for (int j = 0; j < n; j++) {
            packed[(j / QG_NR) * kp * QG_NR + (kk / 4) * 4 * QG_NR + (j % QG_NR) * 4 + kk % 4] = w[kk * n + j];
            colsum[j] += w[kk * n + j];
        }
}

static int checked[QG_N_PATHS], failed[QG_N_PATHS], supported[QG_N_PATHS];

static void report(int path, int m, int k, int n, int flags, int bias, int ldx, int ldy, const char *what)
{
    if (failed[path]++ < 5)
        printf("  FAIL %s: M=%d K=%d N=%d flags=%d bias=%d ldx=%d ldy=%d: %s\n", qg_path_names[path], m, k, n, flags,
               bias, ldx, ldy, what);
}

static void run_case(int m, int k, int n, int flags, int use_bias, int ldx, int ldy)
{
    const ptrdiff_t kp = qg_padded_k(k), np = qg_padded_n(n);
    void *r[10];
    int8_t *w = alloc64((size_t)k * n, &r[0]);
    int8_t *packed = alloc64((size_t)(kp * np), &r[1]);
    int32_t *colsum = alloc64((size_t)np * sizeof(int32_t), &r[2]);
    float *sw = alloc64((size_t)np * sizeof(float), &r[3]); /* padded with zeros (calloc) */
    float *bias = alloc64((size_t)n * sizeof(float), &r[4]);
    float *x = alloc64((size_t)m * ldx * sizeof(float), &r[5]);
    const size_t ylen = (size_t)m * ldy + QG_NR; /* m rows of y, then slack that must stay untouched */
    float *y0 = alloc64(ylen * sizeof(float), &r[6]);
    float *ys = alloc64(QG_N_PATHS * ylen * sizeof(float), &r[7]);
    uint8_t *q = alloc64((size_t)m * (kp + sizeof(float) + sizeof(int32_t)), &r[8]); /* naive's q, sx, zx */
    void *scratch = alloc64(qg_scratch_bytes(kp), &r[9]);

    for (int i = 0; i < k * n; i++)
        w[i] = (int8_t)irand(-127, 127);
    pack_weights(w, k, n, packed, colsum);
    for (int j = 0; j < n; j++) {
        sw[j] = frand(1e-3f, 2e-2f);
        bias[j] = frand(-1.0f, 1.0f);
    }
    /* rows 1, 2, 3: all zeros, all positive, all negative; the others mixed signs with magnitudes from 1e-3 to
     * 1e2 (so M = 1 gets a mixed row).  The columns between k and ldx hold 1e30, which would show if read. */
    for (int i = 0; i < m; i++) {
        float mag = powf(10.0f, frand(-3.0f, 2.0f));
        for (int j = 0; j < ldx; j++)
            x[i * ldx + j] = j >= k ? 1e30f : i == 1 ? 0.0f : i == 2 ? frand(0.01f, 3.0f)
                                            : i == 3 ? frand(-3.0f, -0.01f) : mag * frand(-1.0f, 1.0f);
    }
    for (size_t i = 0; i < ylen; i++) /* accumulated into, or (columns >= n, slack) left alone */
        y0[i] = frand(-2.0f, 2.0f);

    /* every supported path; it must not touch columns n..ldy-1 nor the slack after the last row */
    for (int path = 0; path < QG_N_PATHS; path++) {
        if (!supported[path])
            continue;
        float *y = ys + path * ylen;
        memcpy(y, y0, ylen * sizeof(float));
        qg_linear_f32(path, x, ldx, m, k, packed, sw, colsum, use_bias ? bias : NULL, n, flags, y, ldy, scratch);
        checked[path]++;
        int past = memcmp(y + (size_t)m * ldy, y0 + (size_t)m * ldy, QG_NR * sizeof(float)) != 0;
        for (int i = 0; i < m && !past; i++)
            past = memcmp(y + i * ldy + n, y0 + i * ldy + n, (size_t)(ldy - n) * sizeof(float)) != 0;
        if (past)
            report(path, m, k, n, flags, use_bias, ldx, ldy, "wrote past column N");
        if (path != QG_GENERIC && memcmp(y, ys, ylen * sizeof(float)))
            report(path, m, k, n, flags, use_bias, ldx, ldy, "output differs bitwise from the generic path");
    }

    /* naive reference for the generic path */
    float *sx = (float *)(q + (size_t)m * kp);
    int32_t *zx = (int32_t *)(sx + m);
    qg_quantize_rows(x, ldx, m, k, kp, q, sx, zx);
    int bad = 0;
    /* the quantization itself: the scale from the row's range, |(q - zp) * scale - x| <= half a step, zero padding */
    for (int i = 0; i < m && !bad; i++) {
        float lo = 0.0f, hi = 0.0f;
        for (int j = 0; j < k; j++)
            lo = fminf(lo, x[i * ldx + j]), hi = fmaxf(hi, x[i * ldx + j]);
        bad = sx[i] != (hi - lo) / 255.0f || zx[i] < 0 || zx[i] > 255;
        for (int j = 0; j < kp && !bad; j++)
            bad = j < k ? !(fabsf(((int32_t)q[i * kp + j] - zx[i]) * sx[i] - x[i * ldx + j]) <= 0.501f * sx[i])
                        : q[i * kp + j] != 0;
        if (bad)
            report(QG_GENERIC, m, k, n, flags, use_bias, ldx, ldy, "qg_quantize_rows: wrong scale or bytes");
    }
    for (int i = 0; i < m && !bad; i++)
        for (int j = 0; j < n && !bad; j++) {
            int64_t acc = 0;
            for (int kk = 0; kk < k; kk++)
                acc += (int64_t)((int32_t)q[i * kp + kk] - zx[i]) * w[kk * n + j];
            float prod = (float)acc * (sx[i] * sw[j]);
            float b = use_bias ? bias[j] : 0.0f;
            float v = prod + b;
            if (flags & QG_GELU)
                v = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
            float y_in = y0[i * ldy + j], ref = (flags & QG_ACCUMULATE) ? y_in + v : v;
            float mag = fabsf(prod) + fabsf(b) + ((flags & QG_ACCUMULATE) ? fabsf(y_in) : 0.0f);
            float got = ys[i * ldy + j];
            if (!(fabsf(got - ref) <= 1e-6f * mag)) {
                char msg[160];
                snprintf(msg, sizeof msg, "y[%d,%d] = %.9g, naive %.9g (int64 acc %lld)", i, j, got, ref,
                         (long long)acc);
                report(QG_GENERIC, m, k, n, flags, use_bias, ldx, ldy, msg);
                bad = 1;
            }
        }
    for (int i = 0; i < 10; i++)
        free(r[i]);
}

int main(void)
{
    static const int Ms[] = {0, 1, 2, 5, 7, 16, 17, 97, 200}; /* QG_MC = 96: 97 and 200 take several chunks */
    static const int Ks[] = {1, 3, 37, 64, 100, 768};
    static const int Ns[] = {1, 5, 63, 64, 65, 130};
    static const int flag_sets[4] = {0, QG_GELU, QG_ACCUMULATE, QG_GELU | QG_ACCUMULATE};
    for (int path = 0; path < QG_N_PATHS; path++)
        supported[path] = qg_path_supported(path);

    /* every (M, K, N); the 8 (flags, bias) variants and the strides rotate so that each value of M, K and N
     * meets every variant */
    for (int mi = 0; mi < 9; mi++)
        for (int ki = 0; ki < 6; ki++)
            for (int ni = 0; ni < 6; ni++) {
                int variant = (mi + ki + ni) % 8;
                int ldx = Ks[ki] + ((mi + 2 * ki + ni) % 3 ? 5 : 0);
                int ldy = Ns[ni] + ((mi + ki + 2 * ni) % 2 ? 3 : 0);
                run_case(Ms[mi], Ks[ki], Ns[ni], flag_sets[variant % 4], variant / 4, ldx, ldy);
            }

    int any_failed = 0;
    printf("best path: %s\n", qg_path_names[qg_best_path()]);
    for (int path = 0; path < QG_N_PATHS; path++) {
        printf("%-12s  %-13s  %4d cases  %s\n", qg_path_names[path], supported[path] ? "supported" : "not supported",
               checked[path], !supported[path] ? "SKIP" : failed[path] ? "FAIL" : "PASS");
        any_failed |= failed[path] != 0;
    }
    return any_failed;
}

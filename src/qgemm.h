/*
 * qgemm.h -- int8 dense layers for pyfff's quantized encoder.
 *
 *     y[m, n] (=|+=) act( sx[m] * sw[n] * sum_k (qx[m, k] - zx[m]) * qw[k, n]  + bias[n] )
 *
 * - weights: int8, symmetric, one scale per output channel (sw[n]), quantized
 *   once (at load or export) and stored packed (layout below);
 * - activations: uint8, asymmetric, one scale and zero point per row (token),
 *   computed here at run time from the float32 input (dynamic quantization);
 * - int32 accumulation (exact: no path saturates), then one float epilogue:
 *   dequantize, bias, optional exact GELU, store or add into y.
 *
 * Readable reference: pyfff/quantize.py (qlinear_reference).  Tests:
 * tests/test_qgemm.py.  Driver: pyfff/_qgemm.pyx.
 *
 * Packed weight layout (ISA-independent, so an export runs on every CPU)
 * ---------------------------------------------------------------------
 * K is padded with zeros to Kp (a multiple of QG_KB = 64, the depth of an AMX
 * tile) and N to a multiple of QG_NR = 64 (a panel).  Panel p holds output
 * channels 64p..64p+63; inside it, for each group of 4 consecutive k, the 64
 * channels' 4 bytes follow each other:
 *
 *     packed[p][k/4][n % 64][k % 4]          (p, Kp/4, 64, 4) int8
 *
 * One group of 4 k is 256 bytes: four 512-bit vectors of 16 channels x 4 k,
 * which is exactly the operand vpdpbusd (AVX512-VNNI, AVX-VNNI) multiplies
 * with 4 bytes of one activation row broadcast, the row of an AMX B tile
 * (stride 256 bytes), and 16 NEON sdot operands.
 *
 * Exactness: the integer part is the same on every path, so every path gives
 * the same int32 accumulator; paths that multiply signed activations (AVX2,
 * NEON: u - 128) add 128 * colsum[n] back (colsum[n] = sum_k qw[k, n]).  The
 * float epilogue is one function for all paths (it may contract to FMA where
 * the ISA has it: results agree across paths to float rounding, and are
 * bitwise identical for every thread count and row split on one path, since a
 * row's result never depends on the other rows).
 */
#ifndef PYFFF_QGEMM_H
#define PYFFF_QGEMM_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define QG_NR 64 /* output channels per packed panel */
#define QG_KB 64 /* K is padded to a multiple of this */
#define QG_MC 96 /* rows quantized and multiplied per chunk (a multiple of every path's tile height) */
#define QG_MAX_TILE_ROWS 16

#if defined(__GNUC__)
#define QG_INLINE static inline __attribute__((always_inline))
#else
#define QG_INLINE static inline
#endif

#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64)) && !defined(PYFFF_NO_DISPATCH)
#define QG_X86 1
#include <immintrin.h>
#else
#define QG_X86 0
#endif

#if defined(__GNUC__) && defined(__aarch64__) && !defined(PYFFF_NO_DISPATCH)
#define QG_ARM 1
#include <arm_neon.h>
#else
#define QG_ARM 0
#endif

#if QG_X86 && defined(__linux__)
#define QG_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define QG_CLONES
#endif

/* Code paths, best first.  The names are what pyfff reports and accepts. */
enum { QG_GENERIC = 0, QG_AVX2 = 1, QG_AVXVNNI = 2, QG_AVX512VNNI = 3, QG_AMX = 4, QG_NEON_DOT = 5, QG_N_PATHS = 6 };
static const char *const qg_path_names[QG_N_PATHS] = {"generic", "avx2", "avx-vnni", "avx512-vnni", "amx-int8",
                                                      "neon-dotprod"};

/* Epilogue flags. */
enum { QG_GELU = 1, QG_ACCUMULATE = 2 };

static inline ptrdiff_t qg_padded_k(ptrdiff_t k) { return (k + QG_KB - 1) / QG_KB * QG_KB; }
static inline ptrdiff_t qg_padded_n(ptrdiff_t n) { return (n + QG_NR - 1) / QG_NR * QG_NR; }

/* ------------------------------------------------------------------ activations */

#if (defined(__GNUC__) || defined(__clang__)) && !defined(PYFFF_NO_VECTOR_EXT)
#define QG_VECTOR_EXT 1
typedef float qg_v16f __attribute__((vector_size(64)));
typedef int32_t qg_v16i __attribute__((vector_size(64)));
#else
#define QG_VECTOR_EXT 0
#endif

/* Quantize rows of x to uint8, one (scale, zero point) per row:
 *   lo = min(x, 0), hi = max(x, 0), scale = (hi - lo) / 255, inv = 255 / (hi - lo),
 *   zp = rint(-lo * inv), q = clamp(rint(x * inv) + zp, 0, 255)
 * so 0.0 is exact and x ~= (q - zp) * scale.  A row of zeros gets scale 0.
 * Columns k..kp-1 of q are zero-filled.  Written as plain loops: min/max are
 * exact in any order and every other step is elementwise, so every build
 * gives the same bytes.  Non-finite inputs give unspecified bytes. */
/* lo = min(x[0:k], 0) and hi = max(x[0:k], 0), exact in any order; returns whether every x is finite (NaN and
 * infinities are never selected as extremes by the comparisons, so they are checked apart). */
QG_INLINE int qg_row_range(const float *x, ptrdiff_t k, float *lo_out, float *hi_out)
{
    float lo = 0.0f, hi = 0.0f;
    int finite = 1;
    ptrdiff_t j0 = 0;
#if QG_VECTOR_EXT
    if (k >= 16) { /* 16 running extremes, selected with masks */
        qg_v16f vlo = {0}, vhi = {0};
        qg_v16i ok = (qg_v16i){0} - 1;
        for (; j0 + 16 <= k; j0 += 16) {
            qg_v16f v;
            memcpy(&v, x + j0, sizeof v);
            qg_v16i below = (qg_v16i)(v < vlo), above = (qg_v16i)(v > vhi);
            vlo = (qg_v16f)((below & (qg_v16i)v) | (~below & (qg_v16i)vlo));
            vhi = (qg_v16f)((above & (qg_v16i)v) | (~above & (qg_v16i)vhi));
            ok &= (qg_v16i)((v - v) == 0.0f); /* false for NaN and +-inf */
        }
        for (int t = 0; t < 16; t++) {
            lo = vlo[t] < lo ? vlo[t] : lo;
            hi = vhi[t] > hi ? vhi[t] : hi;
            finite &= ok[t] != 0;
        }
    }
#endif
    for (ptrdiff_t j = j0; j < k; j++) {
        lo = x[j] < lo ? x[j] : lo;
        hi = x[j] > hi ? x[j] : hi;
        finite &= x[j] - x[j] == 0.0f;
    }
    *lo_out = lo;
    *hi_out = hi;
    return finite;
}

QG_CLONES
static void qg_quantize_rows(const float *x, ptrdiff_t ldx, ptrdiff_t m, ptrdiff_t k, ptrdiff_t kp, uint8_t *q,
                             float *scale, int32_t *zp)
{
    for (ptrdiff_t i = 0; i < m; i++) {
        const float *xi = x + i * ldx;
        uint8_t *qi = q + i * kp;
        float lo, hi;
        qg_row_range(xi, k, &lo, &hi);
        float range = hi - lo;
        float inv = range > 0.0f ? 255.0f / range : 0.0f;
        float z = rintf(-lo * inv);
        scale[i] = range / 255.0f;
        zp[i] = (int32_t)z;
        for (ptrdiff_t j = 0; j < k; j++) {
            float v = rintf(xi[j] * inv) + z;
            v = v < 0.0f ? 0.0f : (v > 255.0f ? 255.0f : v);
            qi[j] = (uint8_t)(int32_t)v;
        }
        for (ptrdiff_t j = k; j < kp; j++)
            qi[j] = 0;
    }
}

/* ------------------------------------------------------------------ epilogue */

/* erf(x) for float, a rational approximation (Eigen's generic_fast_erf_float):
 * max error a few ulp; branch-free so that the loops around it vectorise. */
QG_INLINE float qg_erf(float x)
{
    x = x < -4.0f ? -4.0f : (x > 4.0f ? 4.0f : x);
    float x2 = x * x;
    float p = -2.72614225801306e-10f;
    p = p * x2 + 2.77068142495902e-08f;
    p = p * x2 + -2.10102402082508e-06f;
    p = p * x2 + -5.69250639462346e-05f;
    p = p * x2 + -7.34990630326855e-04f;
    p = p * x2 + -2.95459980854025e-03f;
    p = p * x2 + -1.60960333262415e-02f;
    p = p * x;
    float q = -1.45660718464996e-05f;
    q = q * x2 + -2.13374055278905e-04f;
    q = q * x2 + -1.68282697438203e-03f;
    q = q * x2 + -7.37332916720468e-03f;
    q = q * x2 + -1.42647390514189e-02f;
    return p / q;
}

/* One row of the epilogue, with the flags as constants (one vectorised loop per combination). */
QG_INLINE void qg_epilogue_row(const int gelu, const int accumulate, int nv, const int32_t *ci, int32_t z, float s,
                               const int32_t *colsum, const float *sw, const float *bias, float *yi)
{
    for (int j = 0; j < nv; j++) {
        float v = (float)(ci[j] + z * colsum[j]) * (s * sw[j]) + bias[j];
        if (gelu)
            v = 0.5f * v * (1.0f + qg_erf(v * 0.70710678118654752f));
        yi[j] = accumulate ? yi[j] + v : v;
    }
}

/* y[i, j] (=|+=) act(sx[i] sw[j] (c[i, j] + (offset - zp[i]) colsum[j]) + bias[j]) for a tile of
 * mr rows x nv (<= 64) columns; c is mr x 64 int32 (row stride QG_NR); bias: nv floats (zeros for none). */
QG_CLONES
static void qg_epilogue(int mr, int nv, const int32_t *c, int32_t offset, const int32_t *zp, const float *sx,
                        const int32_t *colsum, const float *sw, const float *bias, int flags, float *y,
                        ptrdiff_t ldy)
{
    for (int i = 0; i < mr; i++) {
        const int32_t *ci = c + i * QG_NR;
        const int32_t z = offset - zp[i];
        float *yi = y + i * ldy;
        switch (flags & (QG_GELU | QG_ACCUMULATE)) {
        case 0: qg_epilogue_row(0, 0, nv, ci, z, sx[i], colsum, sw, bias, yi); break;
        case QG_GELU: qg_epilogue_row(1, 0, nv, ci, z, sx[i], colsum, sw, bias, yi); break;
        case QG_ACCUMULATE: qg_epilogue_row(0, 1, nv, ci, z, sx[i], colsum, sw, bias, yi); break;
        default: qg_epilogue_row(1, 1, nv, ci, z, sx[i], colsum, sw, bias, yi); break;
        }
    }
}

/* ------------------------------------------------------------------ tiles
 * Each tile function computes c[i][j] = sum_k a[i, k] * b[k, j] (raw products, see `offset`) for mr rows of
 * quantized activations a (row stride lda, kp columns) and one packed panel b (64 channels), into c (mr x 64).
 * QG_TILE_ROWS[path] is the largest mr a call takes. */

/* Portable C: a[i, k] * b as uint8 x int8 (offset 0). */
static void qg_tile_generic(int mr, const uint8_t *a, ptrdiff_t lda, const int8_t *b, ptrdiff_t kp, int32_t *c)
{
    for (int i = 0; i < mr; i++) {
        int32_t acc[QG_NR] = {0};
        const uint8_t *ai = a + i * lda;
        for (ptrdiff_t g = 0; g < kp / 4; g++) {
            const int8_t *bg = b + g * 4 * QG_NR;
            const int32_t a0 = ai[4 * g], a1 = ai[4 * g + 1], a2 = ai[4 * g + 2], a3 = ai[4 * g + 3];
            for (int j = 0; j < QG_NR; j++)
                acc[j] += a0 * bg[4 * j] + a1 * bg[4 * j + 1] + a2 * bg[4 * j + 2] + a3 * bg[4 * j + 3];
        }
        memcpy(c + i * QG_NR, acc, sizeof acc);
    }
}

#if QG_X86
#define QG_T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define QG_TAVXVNNI __attribute__((target("avx2,fma,avxvnni")))
#define QG_TAVX2 __attribute__((target("avx2,fma")))
#define QG_TAMX __attribute__((target("avx512f,avx512bw,avx512vnni,amx-tile,amx-int8")))

QG_INLINE int32_t qg_load4(const uint8_t *p)
{
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* AVX512-VNNI: up to 6 rows x 64 channels in 24 zmm accumulators; per group of 4 k, four 64-byte loads of the
 * panel serve all rows (vpdpbusd: uint8 activations x int8 weights, offset 0).  The accumulators are named
 * variables, not an array: GCC 12 kept an array of vectors on the stack. */
#define QG_ROW512(i)                                                                                                   \
    if (mr > i) {                                                                                                      \
        __m512i av = _mm512_set1_epi32(qg_load4(a + i * lda + 4 * g));                                                \
        c##i##0 = _mm512_dpbusd_epi32(c##i##0, av, b0);                                                                \
        c##i##1 = _mm512_dpbusd_epi32(c##i##1, av, b1);                                                                \
        c##i##2 = _mm512_dpbusd_epi32(c##i##2, av, b2);                                                                \
        c##i##3 = _mm512_dpbusd_epi32(c##i##3, av, b3);                                                                \
    }
#define QG_STORE512(i)                                                                                                 \
    if (mr > i) {                                                                                                      \
        _mm512_storeu_si512(c + i * QG_NR, c##i##0);                                                                   \
        _mm512_storeu_si512(c + i * QG_NR + 16, c##i##1);                                                              \
        _mm512_storeu_si512(c + i * QG_NR + 32, c##i##2);                                                              \
        _mm512_storeu_si512(c + i * QG_NR + 48, c##i##3);                                                              \
    }

QG_INLINE QG_T512 void qg_tile512_rows(const int mr, const uint8_t *a, ptrdiff_t lda, const int8_t *b, ptrdiff_t kp,
                                      int32_t *c)
{
    __m512i c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23;
    __m512i c30, c31, c32, c33, c40, c41, c42, c43, c50, c51, c52, c53;
    c00 = c01 = c02 = c03 = c10 = c11 = c12 = c13 = c20 = c21 = c22 = c23 = _mm512_setzero_si512();
    c30 = c31 = c32 = c33 = c40 = c41 = c42 = c43 = c50 = c51 = c52 = c53 = _mm512_setzero_si512();
    for (ptrdiff_t g = 0; g < kp / 4; g++) {
        const int8_t *bg = b + g * 4 * QG_NR;
        __m512i b0 = _mm512_loadu_si512(bg), b1 = _mm512_loadu_si512(bg + 64);
        __m512i b2 = _mm512_loadu_si512(bg + 128), b3 = _mm512_loadu_si512(bg + 192);
        QG_ROW512(0) QG_ROW512(1) QG_ROW512(2) QG_ROW512(3) QG_ROW512(4) QG_ROW512(5)
    }
    QG_STORE512(0) QG_STORE512(1) QG_STORE512(2) QG_STORE512(3) QG_STORE512(4) QG_STORE512(5)
}
#undef QG_ROW512
#undef QG_STORE512

static QG_T512 void qg_tile_avx512vnni(int mr, const uint8_t *a, ptrdiff_t lda, const int8_t *b, ptrdiff_t kp,
                                       int32_t *c)
{
    switch (mr) { /* one fully unrolled body per height: the accumulators stay in registers */
    case 6: qg_tile512_rows(6, a, lda, b, kp, c); break;
    case 5: qg_tile512_rows(5, a, lda, b, kp, c); break;
    case 4: qg_tile512_rows(4, a, lda, b, kp, c); break;
    case 3: qg_tile512_rows(3, a, lda, b, kp, c); break;
    case 2: qg_tile512_rows(2, a, lda, b, kp, c); break;
    default: qg_tile512_rows(1, a, lda, b, kp, c); break;
    }
}

/* AVX-VNNI (256-bit vpdpbusd, 16 ymm registers): up to 3 rows x 32 channels at a time (12 accumulators), the
 * panel in two halves. */
QG_INLINE QG_TAVXVNNI void qg_tileavxvnni_rows(const int mr, const uint8_t *a, ptrdiff_t lda, const int8_t *b,
                                               ptrdiff_t kp, int32_t *c)
{
    for (int half = 0; half < 2; half++) {
        __m256i acc[3][4];
        for (int i = 0; i < mr; i++)
            for (int j = 0; j < 4; j++)
                acc[i][j] = _mm256_setzero_si256();
        for (ptrdiff_t g = 0; g < kp / 4; g++) {
            const int8_t *bg = b + g * 4 * QG_NR + half * 128;
            __m256i av[3];
            for (int i = 0; i < mr; i++)
                av[i] = _mm256_set1_epi32(qg_load4(a + i * lda + 4 * g));
            for (int j = 0; j < 4; j++) {
                __m256i bj = _mm256_loadu_si256((const __m256i *)(bg + 32 * j));
                for (int i = 0; i < mr; i++)
                    acc[i][j] = _mm256_dpbusd_avx_epi32(acc[i][j], av[i], bj);
            }
        }
        for (int i = 0; i < mr; i++)
            for (int j = 0; j < 4; j++)
                _mm256_storeu_si256((__m256i *)(c + i * QG_NR + half * 32 + 8 * j), acc[i][j]);
    }
}

static QG_TAVXVNNI void qg_tile_avxvnni(int mr, const uint8_t *a, ptrdiff_t lda, const int8_t *b, ptrdiff_t kp,
                                        int32_t *c)
{
    switch (mr) {
    case 3: qg_tileavxvnni_rows(3, a, lda, b, kp, c); break;
    case 2: qg_tileavxvnni_rows(2, a, lda, b, kp, c); break;
    default: qg_tileavxvnni_rows(1, a, lda, b, kp, c); break;
    }
}

/* AVX2 without VNNI: vpmaddubsw multiplies uint8 x int8 into saturating int16 pairs, which 255 * 127 * 2 would
 * overflow.  So the activation is taken as signed s = u - 128 and the product as |s| * (w with the sign of s)
 * (vpsignb): |s| <= 128 and |w| <= 127 give pairs <= 32512, exact.  vpmaddwd with ones adds the pairs into
 * int32.  Raw products are (u - 128) * w: offset 128.  Up to 2 rows x 32 channels at a time. */
QG_INLINE QG_TAVX2 void qg_tileavx2_rows(const int mr, const uint8_t *a, ptrdiff_t lda, const int8_t *b, ptrdiff_t kp,
                                         int32_t *c)
{
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    for (int half = 0; half < 2; half++) {
        __m256i acc[2][4];
        for (int i = 0; i < mr; i++)
            for (int j = 0; j < 4; j++)
                acc[i][j] = _mm256_setzero_si256();
        for (ptrdiff_t g = 0; g < kp / 4; g++) {
            const int8_t *bg = b + g * 4 * QG_NR + half * 128;
            __m256i s[2], sabs[2];
            for (int i = 0; i < mr; i++) {
                s[i] = _mm256_xor_si256(_mm256_set1_epi32(qg_load4(a + i * lda + 4 * g)), flip); /* u - 128 */
                sabs[i] = _mm256_abs_epi8(s[i]);
            }
            for (int j = 0; j < 4; j++) {
                __m256i bj = _mm256_loadu_si256((const __m256i *)(bg + 32 * j));
                for (int i = 0; i < mr; i++) {
                    __m256i p16 = _mm256_maddubs_epi16(sabs[i], _mm256_sign_epi8(bj, s[i]));
                    acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(p16, ones));
                }
            }
        }
        for (int i = 0; i < mr; i++)
            for (int j = 0; j < 4; j++)
                _mm256_storeu_si256((__m256i *)(c + i * QG_NR + half * 32 + 8 * j), acc[i][j]);
    }
}

static QG_TAVX2 void qg_tile_avx2(int mr, const uint8_t *a, ptrdiff_t lda, const int8_t *b, ptrdiff_t kp, int32_t *c)
{
    if (mr == 2)
        qg_tileavx2_rows(2, a, lda, b, kp, c);
    else
        qg_tileavx2_rows(1, a, lda, b, kp, c);
}

/* AMX-INT8: 16 rows x 64 channels as four 16 x 16 int32 tiles (tmm0-3); per 64 k, one A tile (16 rows x 64
 * bytes of the activations, tmm4) and four B tiles (16 groups of 4 k x 16 channels: 16 rows of 64 bytes at the
 * panel's stride of 256 bytes, tmm5-7 reused) feed four tdpbusd.  Offset 0.  The tile shapes are configured once
 * per layer call (qg_amx_begin, every tile 16 rows); a tile of fewer rows reads the rows after it from the
 * chunk buffer (zeroed by the driver) and its extra output rows are not used. */
struct qg_tilecfg {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

static QG_TAMX void qg_amx_begin(void)
{
    struct qg_tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) { /* C: 16 rows of 16 int32; A: 16 rows of 64 uint8; B: 16 rows of 16 x 4 int8 */
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
}

static QG_TAMX void qg_amx_end(void) { _tile_release(); }

static QG_TAMX void qg_tile_amx(int mr, const uint8_t *a, ptrdiff_t lda, const int8_t *b, ptrdiff_t kp, int32_t *c)
{
    (void)mr; /* always 16 rows: see above */
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (ptrdiff_t k0 = 0; k0 < kp; k0 += 64) {
        const int8_t *bk = b + (k0 / 4) * 4 * QG_NR;
        _tile_loadd(4, a + k0, lda);
        _tile_loadd(5, bk, 4 * QG_NR);
        _tile_loadd(6, bk + 64, 4 * QG_NR);
        _tile_dpbusd(0, 4, 5);
        _tile_loadd(7, bk + 128, 4 * QG_NR);
        _tile_dpbusd(1, 4, 6);
        _tile_loadd(5, bk + 192, 4 * QG_NR);
        _tile_dpbusd(2, 4, 7);
        _tile_dpbusd(3, 4, 5);
    }
    _tile_stored(0, c, 4 * QG_NR);
    _tile_stored(1, c + 16, 4 * QG_NR);
    _tile_stored(2, c + 32, 4 * QG_NR);
    _tile_stored(3, c + 48, 4 * QG_NR);
}
#endif /* QG_X86 */

#if QG_ARM
/* NEON sdot (ARMv8.2 dotprod): signed x signed, so the activation is taken as u - 128 (offset 128).  Up to
 * 4 rows x 64 channels as 4 x 16 int32x4 accumulators (the panel in two halves of 32 channels: 4 rows x 8). */
__attribute__((target("arch=armv8.2-a+dotprod"))) static void qg_tile_neon_dot(int mr, const uint8_t *a, ptrdiff_t lda,
                                                                                  const int8_t *b, ptrdiff_t kp,
                                                                                  int32_t *c)
{
    for (int half = 0; half < 2; half++) {
        int32x4_t acc[4][8];
        for (int i = 0; i < mr; i++)
            for (int j = 0; j < 8; j++)
                acc[i][j] = vdupq_n_s32(0);
        for (ptrdiff_t g = 0; g < kp / 4; g++) {
            const int8_t *bg = b + g * 4 * QG_NR + half * 128;
            int8x16_t bv[8];
            for (int j = 0; j < 8; j++)
                bv[j] = vld1q_s8(bg + 16 * j);
            for (int i = 0; i < mr; i++) {
                uint32_t u;
                memcpy(&u, a + i * lda + 4 * g, 4);
                int8x16_t s = vreinterpretq_s8_u8(veorq_u8(vreinterpretq_u8_u32(vdupq_n_u32(u)), vdupq_n_u8(0x80)));
                for (int j = 0; j < 8; j++)
                    acc[i][j] = vdotq_s32(acc[i][j], s, bv[j]);
            }
        }
        for (int i = 0; i < mr; i++)
            for (int j = 0; j < 8; j++)
                vst1q_s32(c + i * QG_NR + half * 32 + 4 * j, acc[i][j]);
    }
}
#endif /* QG_ARM */

typedef void (*qg_tile_fn)(int mr, const uint8_t *a, ptrdiff_t lda, const int8_t *b, ptrdiff_t kp, int32_t *c);

/* Largest tile height and the raw-product offset of each path. */
static const int QG_TILE_ROWS[QG_N_PATHS] = {4, 2, 3, 6, 16, 4};
static const int32_t QG_OFFSET[QG_N_PATHS] = {0, 128, 0, 0, 0, 128};

/* ------------------------------------------------------------------ CPU features */

#if QG_X86
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

static uint64_t qg_xgetbv0(void)
{
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

/* AMX needs the kernel's permission to use the tile data state (Linux 5.16+), asked once per process. */
static int qg_amx_permitted(void)
{
#if defined(__linux__) && defined(SYS_arch_prctl)
    static int state = -1;
    if (state < 0)
        state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
    return state;
#else
    return 0;
#endif
}
#endif

#if QG_ARM && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif

/* Whether this CPU (and OS) can run a path. */
static int qg_path_supported(int path)
{
    if (path == QG_GENERIC)
        return 1;
#if QG_X86
    uint32_t a, b, c, d;
    if (!__get_cpuid_count(1, 0, &a, &b, &c, &d) || !(c & (1u << 27))) /* OSXSAVE */
        return 0;
    uint64_t xcr0 = qg_xgetbv0();
    int ymm_os = (xcr0 & 0x6) == 0x6, zmm_os = (xcr0 & 0xe6) == 0xe6;
    uint32_t b7 = 0, c7 = 0, d7 = 0, a71 = 0;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
        b7 = b;
        c7 = c;
        d7 = d;
    }
    if (__get_cpuid_count(7, 1, &a, &b, &c, &d))
        a71 = a;
    int avx2 = ymm_os && (b7 & (1u << 5));
    int avx512 = zmm_os && (b7 & (1u << 16)) && (b7 & (1u << 30)) && (b7 & (1u << 31)); /* F, BW, VL */
    switch (path) {
    case QG_AVX2: return avx2;
    case QG_AVXVNNI: return avx2 && (a71 & (1u << 4));
    case QG_AVX512VNNI: return avx512 && (c7 & (1u << 11));
    case QG_AMX:
        return avx512 && (c7 & (1u << 11)) && (d7 & (1u << 24)) && (d7 & (1u << 25)) &&
               (xcr0 & 0x60000) == 0x60000 && qg_amx_permitted();
    default: return 0;
    }
#elif QG_ARM && defined(__linux__)
    return path == QG_NEON_DOT && (getauxval(AT_HWCAP) & HWCAP_ASIMDDP);
#else
    return 0;
#endif
}

/* The best path this CPU runs. */
static int qg_best_path(void)
{
    static const int order[] = {QG_AMX, QG_AVX512VNNI, QG_AVXVNNI, QG_NEON_DOT, QG_AVX2};
    for (size_t i = 0; i < sizeof order / sizeof order[0]; i++)
        if (qg_path_supported(order[i]))
            return order[i];
    return QG_GENERIC;
}

static qg_tile_fn qg_tile_for(int path)
{
    switch (path) {
#if QG_X86
    case QG_AVX2: return qg_tile_avx2;
    case QG_AVXVNNI: return qg_tile_avxvnni;
    case QG_AVX512VNNI: return qg_tile_avx512vnni;
    case QG_AMX: return qg_tile_amx;
#endif
#if QG_ARM
    case QG_NEON_DOT: return qg_tile_neon_dot;
#endif
    default: return qg_tile_generic;
    }
}

/* ------------------------------------------------------------------ the layer */

static const float qg_zeros[QG_NR] = {0}; /* the bias of a layer without one */

/* Bytes of scratch qg_linear_f32 needs for kp padded input columns. */
static inline size_t qg_scratch_bytes(ptrdiff_t kp)
{
    return (size_t)QG_MC * (size_t)kp + QG_MC * (sizeof(float) + sizeof(int32_t)) +
           QG_MAX_TILE_ROWS * QG_NR * sizeof(int32_t);
}

/* y (=|+=) act(dequant(quant(x) @ w) + bias) for m rows and the output channels of panels p0..p1-1 (channels
 * 64 p0 .. min(64 p1, n) - 1), on `path` (which the caller checked is supported).
 *
 * x: m x k float32 (row stride ldx); w: packed int8 (see the top of this file) for kp = qg_padded_k(k) and
 * n output channels, with scales sw[n] and column sums colsum[n] (both padded to qg_padded_n(n)); bias: n floats
 * or NULL; y: m x n float32 (row stride ldy); scratch: qg_scratch_bytes(kp) bytes.  Rows go in chunks of
 * QG_MC: quantized once into scratch, then multiplied panel by panel (the chunk's activations stay in L2, each
 * panel of weights in L1/L2 while every tile of the chunk uses it).  Threads may split the panels of one call
 * between them (each with its own scratch): every output element is computed the same way whatever the split. */
static void qg_linear_panels_f32(int path, const float *x, ptrdiff_t ldx, ptrdiff_t m, ptrdiff_t k, const int8_t *w,
                                 const float *sw, const int32_t *colsum, const float *bias, ptrdiff_t n, ptrdiff_t p0,
                                 ptrdiff_t p1, int flags, float *y, ptrdiff_t ldy, void *scratch)
{
    const ptrdiff_t kp = qg_padded_k(k);
    const int tile_rows = QG_TILE_ROWS[path];
    const int32_t offset = QG_OFFSET[path];
    const qg_tile_fn tile = qg_tile_for(path);
    int32_t *c = (int32_t *)scratch;                                    /* QG_MAX_TILE_ROWS x 64 int32 */
    float *sx = (float *)(c + QG_MAX_TILE_ROWS * QG_NR);                /* QG_MC */
    int32_t *zx = (int32_t *)(sx + QG_MC);                              /* QG_MC */
    uint8_t *q = (uint8_t *)(zx + QG_MC);                               /* QG_MC x kp */
#if QG_X86
    if (path == QG_AMX)
        qg_amx_begin();
#endif
    for (ptrdiff_t m0 = 0; m0 < m; m0 += QG_MC) {
        const ptrdiff_t mc = m - m0 < QG_MC ? m - m0 : QG_MC;
        qg_quantize_rows(x + m0 * ldx, ldx, mc, k, kp, q, sx, zx);
        if (tile_rows > 1 && mc % tile_rows) /* the rows a last, partial tile may read (AMX): defined, unused */
            memset(q + mc * kp, 0, (size_t)((tile_rows - mc % tile_rows) * kp));
        for (ptrdiff_t p = p0; p < p1; p++) {
            const int8_t *wp = w + p * kp * QG_NR;
            const ptrdiff_t n0 = p * QG_NR;
            const int nv = (int)(n - n0 < QG_NR ? n - n0 : QG_NR);
            for (ptrdiff_t i = 0; i < mc; i += tile_rows) {
                const int mr = (int)(mc - i < tile_rows ? mc - i : tile_rows);
                tile(mr, q + i * kp, kp, wp, kp, c);
                qg_epilogue(mr, nv, c, offset, zx + i, sx + i, colsum + n0, sw + n0, bias ? bias + n0 : qg_zeros,
                            flags, y + (m0 + i) * ldy + n0, ldy);
            }
        }
    }
#if QG_X86
    if (path == QG_AMX)
        qg_amx_end();
#endif
}

/* The whole layer: every output channel (qg_linear_panels_f32 over all panels). */
static void qg_linear_f32(int path, const float *x, ptrdiff_t ldx, ptrdiff_t m, ptrdiff_t k, const int8_t *w,
                          const float *sw, const int32_t *colsum, const float *bias, ptrdiff_t n, int flags, float *y,
                          ptrdiff_t ldy, void *scratch)
{
    qg_linear_panels_f32(path, x, ldx, m, k, w, sw, colsum, bias, n, 0, qg_padded_n(n) / QG_NR, flags, y, ldy,
                         scratch);
}

#endif /* PYFFF_QGEMM_H */

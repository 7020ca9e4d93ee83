/* cmm_bench.c -- time the C FFF tile kernel outside Python (bench/dev only).
 *
 * Build and run (from the repo root):
 *   gcc -O3 -fopenmp -Isrc bench/dev/cmm_bench.c -o /tmp/cmm_bench -lm && /tmp/cmm_bench [batch] [tile] [depth]
 * Prints the best-of-N time per token for the full forward pass and for routing only.
 * Environment: POOL=k (k batches of distinct tokens), SAME_X=1 (all tokens equal), WIN0=1 / WOUT0=1
 * (all nodes share weight row 0), NO_THP=1; bench/dev/ab.py runs builds interleaved.
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <sys/mman.h>
#include "fff_cpu.h"
#ifdef VARIANT_HEADER
#include VARIANT_HEADER
#endif
#ifndef TILE_FN
#define TILE_FN fff_forward_tile_f32
#define SCRATCH_FN fff_scratch_bytes_f32
#endif

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
static float frand(unsigned *s) { *s = *s * 1664525u + 1013904223u; return ((*s >> 8) / 16777216.0f) * 2.0f - 1.0f; }

static void *big_alloc(size_t n)
{
    size_t al = (size_t)2 << 20;
    void *p = aligned_alloc(al, (n + al - 1) / al * al);
#ifdef MADV_HUGEPAGE
    if (!getenv("NO_THP"))
        madvise(p, (n + al - 1) / al * al, MADV_HUGEPAGE);
#endif
    return p;
}

int main(int argc, char **argv)
{
    ptrdiff_t batch = argc > 1 ? atol(argv[1]) : 2048;
    ptrdiff_t tile = argc > 2 ? atol(argv[2]) : 512;
    int depth = argc > 3 ? atoi(argv[3]) : 11;
    int reps = argc > 4 ? atoi(argv[4]) : 5;
    int act = argc > 5 ? atoi(argv[5]) : 0; /* 0 gelu, 1 gelu_tanh, 2 relu */
    int n_inner = argc > 6 ? atoi(argv[6]) : 1; /* OpenMP threads inside each tile */
    ptrdiff_t d = 768, n_nodes = ((ptrdiff_t)2 << depth) - 1;
    unsigned s = 1;
    /* Large arrays get transparent huge pages, as NumPy asks for (madvise). */
    float *w_in = big_alloc(sizeof(float) * n_nodes * d), *w_out = big_alloc(sizeof(float) * n_nodes * d);
    /* POOL=k: k batches of distinct tokens, one per timed call (x comes from DRAM, as in `pyfff bench`) */
    ptrdiff_t pool = getenv("POOL") ? atol(getenv("POOL")) : 1;
    float *b = malloc(sizeof(float) * n_nodes), *x = big_alloc(sizeof(float) * pool * batch * d), *y = big_alloc(sizeof(float) * batch * d);
    for (ptrdiff_t i = 0; i < n_nodes * d; i++) { w_in[i] = frand(&s) * 0.06f; w_out[i] = frand(&s) * 0.06f; }
    for (ptrdiff_t i = 0; i < n_nodes; i++) b[i] = frand(&s) * 0.1f;
    for (ptrdiff_t i = 0; i < pool * batch * d; i++) x[i] = frand(&s);
    if (getenv("SAME_X")) /* every token equal: same path, all rows hot (compute-bound reference) */
        for (ptrdiff_t i = d; i < pool * batch * d; i++) x[i] = x[i % d];
    if (tile > batch) tile = batch;
    /* WIN0=1 / WOUT0=1: every node reads row 0 of w_in / w_out (row stride 0), to time the walk
     * without fetching input / output weight rows (WIN0 also changes the routes) */
    const ptrdiff_t ldw_in = getenv("WIN0") ? 0 : d, ldw_out = getenv("WOUT0") ? 0 : d;
    void *scratch = malloc(SCRATCH_FN(tile, depth, 1));
    for (int pass = 0; pass < 2; pass++) {
        double best = 1e30;
        for (int r = 0; r < reps; r++) {
            const float *xr = x + (r % pool) * batch * d;
            double t0 = now();
            for (ptrdiff_t st = 0; st < batch; st += tile) {
                ptrdiff_t n = batch - st < tile ? batch - st : tile;
#ifdef FFF_TILE_TAKES_N_THREADS
                TILE_FN(xr + st * d, d, w_in, ldw_in, b, w_out, ldw_out, n, d, d, depth, 1, act, pass ? NULL : y + st * d, d, NULL, scratch, n_inner);
#else /* an older variant from bench/dev/variants: one thread */
                (void)n_inner;
                TILE_FN(xr + st * d, d, w_in, ldw_in, b, w_out, ldw_out, n, d, d, depth, 1, act, pass ? NULL : y + st * d, d, NULL, scratch);
#endif
            }
            double dt = now() - t0;
            if (dt < best) best = dt;
        }
        printf("%s batch %td tile %td depth %d: %.3f us/token\n", pass ? "route-only" : "forward   ", batch, tile, depth, best / batch * 1e6);
    }
    double cs = 0; for (ptrdiff_t i = 0; i < batch * d; i++) cs += y[i];
    printf("checksum %.6f\n", cs);
    return 0;
}

/* fff_cpu.h -- expands the FFF kernel template of fff_kernels.h for float32
 * and float64.  The Cython module pyfff/_fff_cpu.pyx includes this file.
 *
 * FFF_ACC is the number of independent accumulators of the dot product and of
 * the output sum: 32 floats = 2 AVX-512 / 4 AVX2 / 8 SSE registers, enough to
 * keep the FMA pipes busy while staying clear of register spills on SSE2. */
#include "fff_kernels.h"

#define FFF_T float
#define FFF_SUF f32
#ifndef FFF_ACC_F32
#define FFF_ACC_F32 32
#endif
#define FFF_ACC FFF_ACC_F32
#define FFF_ERF erff
#define FFF_TANH tanhf
#include "fff_kernels.h"
#undef FFF_T
#undef FFF_SUF
#undef FFF_ACC
#undef FFF_ERF
#undef FFF_TANH

#define FFF_T double
#define FFF_SUF f64
#define FFF_ACC 16
#define FFF_ERF erf
#define FFF_TANH tanh
#include "fff_kernels.h"
#undef FFF_T
#undef FFF_SUF
#undef FFF_ACC
#undef FFF_ERF
#undef FFF_TANH

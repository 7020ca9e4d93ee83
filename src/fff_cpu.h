/* fff_cpu.h -- expands the FFF kernel template of fff_kernels.h for float32
 * and float64.  The Cython module pyfff/_fff_cpu.pyx includes this file. */
#include "fff_kernels.h"

#define FFF_T float
#define FFF_SUF f32
#define FFF_TANH tanhf
#ifdef FFF_HAVE_GELU_F32
#define FFF_GELU_BLOCK fff_gelu_f32 /* vectorised GELU; float64 calls libm's erfc */
#endif
#include "fff_kernels.h"
#undef FFF_GELU_BLOCK
#undef FFF_T
#undef FFF_SUF
#undef FFF_TANH

#define FFF_T double
#define FFF_SUF f64
#define FFF_TANH tanh
#include "fff_kernels.h"
#undef FFF_T
#undef FFF_SUF
#undef FFF_TANH

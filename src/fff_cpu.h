/* fff_cpu.h -- expands the FFF kernel template of fff_kernels.h for float32
 * and float64.  The Cython module pyfff/_fff_cpu.pyx includes this file. */
#include "fff_kernels.h"

#define FFF_T float
#define FFF_SUF f32
#define FFF_ERF erff
#define FFF_TANH tanhf
#include "fff_kernels.h"
#undef FFF_T
#undef FFF_SUF
#undef FFF_ERF
#undef FFF_TANH

#define FFF_T double
#define FFF_SUF f64
#define FFF_ERF erf
#define FFF_TANH tanh
#include "fff_kernels.h"
#undef FFF_T
#undef FFF_SUF
#undef FFF_ERF
#undef FFF_TANH

// Instantiates the staged kernels of pyfff/gpu/kernels/fff.cu for an offline look at their SASS and registers:
//
//   cd bench/dev && nvcc -arch=sm_90 -std=c++17 -cubin --ptxas-options=-v -o /tmp/k.cubin gpu_sass.cu
//   cuobjdump -sass /tmp/k.cubin > /tmp/k.sass
//
// (ptxas -v prints registers and spills per kernel; the library itself is compiled by NVRTC at run time.)
// For per-instruction execution counts and stall samples of the real run, see docs/gpu.md ("Third session"):
// ncu --section SourceCounters -o prof ...; ncu -i prof.ncu-rep --page source --csv --print-source sass.
#include "../../pyfff/gpu/kernels/fff.cu"

void* pyfff_gpu_sass_kernels[] = {
    (void*)&fff_route_staged<float, 4, true>,
    (void*)&fff_route<float, 4, true>,
    (void*)&fff_output_staged<float, 4, 6, 2>,
};

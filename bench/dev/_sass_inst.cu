#include "../../pyfff/gpu/kernels/fff.cu"
void* pyfff_all[] = {(void*)&fff_route_staged<float, 4>, (void*)&fff_output_staged<float, 4, 6, 2>};

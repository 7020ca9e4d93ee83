# The one OpenMP shim of pyfff (scikit-learn's pattern): every omp_* call is
# cimported from here, so the package builds and runs without OpenMP.
cdef extern from *:
    """
    #ifdef _OPENMP
        #include <omp.h>
        #define PYFFF_OPENMP_PARALLELISM_ENABLED 1
    #else
        #define PYFFF_OPENMP_PARALLELISM_ENABLED 0
        #define omp_get_max_threads() 1
        #define omp_get_thread_num() 0
        #define omp_get_num_threads() 1
    #endif
    """
    bint PYFFF_OPENMP_PARALLELISM_ENABLED

    int omp_get_max_threads() noexcept nogil
    int omp_get_thread_num() noexcept nogil
    int omp_get_num_threads() noexcept nogil

// The "avx512" kernel table: kernels_avx2.cpp compiled a second time for AVX-512 F/BW/VL +
// AVX512_VNNI (one source; the int8 decode kernels differ where it tests GEMMA3_KERNELS_AVX512:
// vpdpbusd products in ymm registers, 4-token row x token tiles).
// Picked at run time where cpu_has_avx512() says yes (kernels_portable.cpp, select_kernels).
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
// GCC 12's AVX-512 intrinsics (_mm512_cvtepi32_ps, _mm512_unpacklo_ps, ...) pass a
// self-initialized `__Y = __Y` "undefined" vector and warn about it when inlined (GCC bug 105593,
// fixed in 13): not our code's variables.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#define GEMMA3_KERNELS_AVX512 1
#include "backend/cpu/kernels_avx2.cpp"

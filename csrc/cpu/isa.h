// Run-time choice between the two builds of the CPU kernels compiled twice (nearest_code.cpp,
// scalar.cpp): the baseline ISA (SSE2 on x86-64, which every x86-64 CPU has) and AVX2 (+ FMA
// where asked). FASTVQ_CPU_BASELINE=1 in the environment forces the baseline build, so tests can
// compare the two on one machine; it is read once per process.
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#define FASTVQ_X86 1
#endif

// For helpers of the kernels compiled per ISA: inlined into each target("...") caller, they take
// its instruction set (a helper left out of line is compiled for the baseline ISA).
#define FASTVQ_INLINE inline __attribute__((always_inline))

namespace fastvq {
namespace cpu {

inline bool baseline_forced() {
  static const bool forced = [] {
    const char* v = std::getenv("FASTVQ_CPU_BASELINE");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return forced;
}

// True where the AVX2 build may run: the CPU has AVX2 (and FMA if with_fma) and the baseline
// is not forced.
inline bool use_avx2(bool with_fma) {
#if defined(FASTVQ_X86)
  static const bool avx2 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
  }();
  static const bool fma = __builtin_cpu_supports("fma") != 0;
  return !baseline_forced() && avx2 && (fma || !with_fma);
#else
  (void)with_fma;
  return false;
#endif
}

}  // namespace cpu
}  // namespace fastvq

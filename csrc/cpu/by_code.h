// Scatter by code ownership, shared by the CPU kernels that sum rows into per-code buffers
// (quantize.cpp: dL/dcodebook; ema.cpp: EMA counts and sums).
//
// Codes [0, K) are split into consecutive ranges holding about equally many rows, one range per
// thread. Each thread scans all of idx and handles only the rows whose code it owns, in
// increasing n. So every code is summed by one thread in row order: no atomics, no races, and
// results are bit-identical run to run and whatever the thread count (the deterministic mode
// for free). The price is that each thread reads all N indices (8 bytes per row against the
// 2-4 * D bytes of the row it may sum), and one hot code is one thread's work.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <vector>

// AT_DISPATCH over the element types of the kernels (float32, bfloat16, float16) only: float64
// stays on the torch path, and its instantiations would be dead code.
#define FASTVQ_DISPATCH_KERNEL_DTYPES(TYPE, NAME, ...)  \
  AT_DISPATCH_SWITCH(TYPE, NAME,                        \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace fastvq {
namespace cpu {

// Bounds b[0] = 0 < ... < b[P] = K of P <= parts code ranges with about N / parts rows each
// (counting each code as one row more, so that empty codes spread too). One serial pass over idx,
// which also checks 0 <= idx[n] < K (a c10::Error naming `op` otherwise).
inline std::vector<int64_t> code_ranges(const char* op, const int64_t* idx, int64_t N, int64_t K,
                                        int64_t parts) {
  std::vector<int64_t> rows(K, 0);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t k = idx[n];
    TORCH_CHECK_VALUE(k >= 0 && k < K, op, ": indices must lie in [0, ", K, "), got indices[", n,
                "] = ", k);
    ++rows[k];
  }
  parts = std::max<int64_t>(1, std::min(parts, K));
  const int64_t total = N + K;
  std::vector<int64_t> bounds{0};
  int64_t seen = 0;
  for (int64_t k = 0; k < K && static_cast<int64_t>(bounds.size()) < parts; ++k) {
    seen += rows[k] + 1;
    // Close range p once it holds p/parts of the total.
    if (seen * parts >= total * static_cast<int64_t>(bounds.size())) bounds.push_back(k + 1);
  }
  if (bounds.back() != K) bounds.push_back(K);
  return bounds;
}

// Runs fn(k0, k1) for every range [bounds[p], bounds[p + 1]) in parallel, one range per task.
template <class Fn>
void for_each_code_range(const std::vector<int64_t>& bounds, const Fn& fn) {
  const int64_t parts = static_cast<int64_t>(bounds.size()) - 1;
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) fn(bounds[p], bounds[p + 1]);
  });
}

// Converts D elements of a row to float32 (bf16/fp16 through c10's conversions).
template <class T>
inline void load_row(const T* src, float* dst, int64_t D) {
  for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(src[d]);
}

template <class T>
inline void store_row(const float* src, T* dst, int64_t D) {
  for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(src[d]);
}

}  // namespace cpu
}  // namespace fastvq

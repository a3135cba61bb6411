// Launch interface of the CUDA kernels of fastvq::ema_scatter_cpp (ema.cu). Plain C++ over the
// CUDA runtime API; the torch glue is ema_torch.cpp. In place, in float32:
//   counts[k] = keep * counts[k] + gain * c[k],   c[k] = sum of w[n]
//   sums[k]   = keep * sums[k]   + gain * s[k],   s[k] = sum of w[n] * z[n]   over idx[n] == k
// Rows of weight 0 are skipped (padding under a mask may hold anything); rows whose index lies
// outside [0, k) are skipped too, never read or written out of bounds.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "nearest_code.h"  // DType

namespace fastvq {
namespace cuda {

// Shared arguments of both variants.
//   counts: (k,) float32 with element stride ldc; sums: (k, d) float32 with row stride lds;
//   z: (n, d) of `dtype` with row stride ldz, unit column stride; weight: (n,) float32 or nullptr
//   (ones). n >= 0, k >= 1, d >= 1. Every code is written, also when n == 0.
struct EmaArgs {
  float* counts;
  int64_t ldc;
  float* sums;
  int64_t lds;
  const void* z;
  int64_t ldz;
  DType dtype;
  const float* weight;
  int64_t n, k, d;
  float keep, gain;
};

// Float32 atomics: a pass that scales the accumulators by keep (skipped for keep == 1), then one
// atomicAdd of gain * w[n] * z[n] per element; idx (n,) int64. Rounding order varies run to run.
cudaError_t launch_ema_atomic(const EmaArgs& a, const int64_t* idx, cudaStream_t stream);

// Deterministic: sorted_idx (n,) ascending and order (n,) the rows in that order, from a stable
// sort of idx (the caller's). Each code's rows are one contiguous run of sorted_idx, summed in a
// fixed order (fixed lane split and tree), so the result is bit-identical run to run. One block
// per code: a code that holds most rows is summed by one block.
cudaError_t launch_ema_sorted(const EmaArgs& a, const int64_t* sorted_idx, const int64_t* order,
                              cudaStream_t stream);

}  // namespace cuda
}  // namespace fastvq

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

// The deterministic variant's plan, made by the caller from a stable sort of idx (the glue's;
// fastvq.ops.codebook._ema_pieces says the same in Python): the rows of code k are
// order[offsets[k]:offsets[k + 1]] (rows of indices outside [0, k) lie outside every run), cut
// into pieces of at most piece_rows rows, an empty run into one empty piece. Code k's pieces are
// piece_offsets[k] .. piece_offsets[k + 1] - 1; piece_code[q] is piece q's code for q < programs
// (k past the last piece, programs >= the number of pieces). A code of several pieces keeps
// their partial sums in the rows slot_offsets[k] .. of partial, (slots, d + 1) float32 (sums,
// then the count), device scratch.
struct EmaPieces {
  const int64_t* order;          // (n,)
  const int64_t* offsets;        // (k + 1,)
  const int64_t* piece_offsets;  // (k + 1,)
  const int64_t* slot_offsets;   // (k + 1,)
  const int64_t* piece_code;     // (programs,)
  int64_t programs;
  int64_t piece_rows;
  float* partial;
};

// Deterministic: each piece summed in a fixed order (fixed lane split and tree), the pieces of a
// code added in piece order, so the result is bit-identical run to run.
cudaError_t launch_ema_pieces(const EmaArgs& a, const EmaPieces& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastvq

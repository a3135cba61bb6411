// Launch interface of the CUDA kernel of fastvq::leech_decode (leech.cu). Plain C++ over the CUDA
// runtime API, so that both the torch glue (leech_torch.cpp) and torch-free test programs include
// it.
//
//   idx[n] = the canonical index (fastvq/lattice/leech.py) of the minimal Leech vector of largest
//            inner product with z[n], ties to the lowest index, 0 for rows with NaN or Inf.
//
// The arithmetic is that of the CPU kernel and the torch path, score for score, so the indices
// are equal bit for bit.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastvq {
namespace cuda {

// Element type of z. Scores are float64 for F64 and float32 otherwise (half types widen exactly).
enum class LeechDType { F32, F64, BF16, F16 };

// Enqueues the decoder on `stream` (device = the current device); returns the first launch error
// or cudaErrorInvalidValue for bad arguments. Execution errors surface at the next synchronizing
// call, as with any kernel.
//   z:       (n, 24) row-major, dtype
//   n >= 0 (n == 0 launches nothing)
//   out_idx: (n,) int64, written for every row.
cudaError_t launch_leech_decode(const void* z, int64_t n, LeechDType dtype, int64_t* out_idx,
                                cudaStream_t stream);

}  // namespace cuda
}  // namespace fastvq

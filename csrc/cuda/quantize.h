// Launch interface of the CUDA kernels of fastvq::quantize_fwd_cpp / quantize_bwd_cpp
// (quantize.cu). Plain C++ over the CUDA runtime API: the torch glue is quantize_torch.cpp.
// Formulas as in csrc/cpu/quantize.cpp, per row n with z = z[n], q = codebook[idx[n]]:
//   forward   zq[n] = q bit for bit; rotation / householder also stats[n] = (s, 1/|z|, 1/|q|, w)
//   backward  dz[n] = s (g - w (e.g) e [+ 2 (q^.g) z^ for rotation]),
//             dcodebook[k] += g over rows with idx == k (float32 atomics: run-to-run rounding of
//             the codebook gradient may differ).
// Indices outside [0, k) never make a kernel touch memory outside its tensors: such a row gets
// NaN in zq and stats (1, 0, 0, 0), and the backward skips it (dz = NaN, no codebook term). The
// Python ops and the glue's callers pass indices from the search, in range by construction.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "nearest_code.h"  // DType

namespace fastvq {
namespace cuda {

// The gradient estimator, as the schema's `grad` string.
enum class Grad { Ste = 0, Rotation = 1, Householder = 2 };

// z, codebook: (n, d), (k, d) row-major of `dtype`; idx (n,) int64; zq (n, d) of `dtype`;
// stats (n, 4) float32, unused (may be null) for Grad::Ste. n >= 0 (0 launches nothing),
// k >= 1, d >= 1. Enqueued on `stream`; returns the launch error.
cudaError_t launch_quantize_fwd(const void* z, const void* codebook, const int64_t* idx, int64_t n,
                                int64_t k, int64_t d, DType dtype, Grad grad, void* zq,
                                float* stats, cudaStream_t stream);

// grad_out, z: (n, d) of `dtype`; codebook (k, d) of `dtype`; stats (n, 4) float32 as the forward
// wrote them (read only when dz != nullptr).
//   dz:     (n, d) of `dtype`, or nullptr (not wanted; must be nullptr for Grad::Ste).
//   dc_acc: (k, d) float32, zero-filled by the caller, or nullptr: the codebook gradient is added
//           into it by atomics; the caller converts it to the codebook's dtype.
cudaError_t launch_quantize_bwd(const void* grad_out, const void* z, const void* codebook,
                                const int64_t* idx, const float* stats, int64_t n, int64_t k,
                                int64_t d, DType dtype, Grad grad, void* dz, float* dc_acc,
                                cudaStream_t stream);

}  // namespace cuda
}  // namespace fastvq

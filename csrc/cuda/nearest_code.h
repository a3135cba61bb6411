// Launch interface of the CUDA kernels of fastvq::nearest_code (nearest_code.cu). Plain C++ over
// the CUDA runtime API, so that both the torch glue (nearest_code.cpp) and torch-free test
// programs include it.
//
//   idx[n] = argmax_k  dot(z[n], codebook[k]) * code_scale[k] + code_bias[k]
//
// Ties go to the lowest k; a NaN score never wins; a row whose scores are all -inf or NaN gets 0.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace fastvq {
namespace cuda {

// Element type of z and codebook (the same for both).
enum class DType { F32, BF16, F16 };

// How an exact float32 search (dtype F32, fast false) multiplies: kNever by 3xTF32 throughout;
// kAlways by a tf32 screening pass, then 3xTF32 over the rows whose best two codes the pass
// cannot tell apart (the same answer, row for row); kAuto screens where the search is large
// (N x K >= 2^24, D >= 24) and its row tiles fill the GPU unsplit.
enum class Screen { kAuto, kNever, kAlways };

// Sets *bytes to the device scratch that launch_nearest_code needs for this problem on the
// current device: the split-K partials (N x S scores and indices), 0 when the row tiles alone
// fill the GPU; a screened search also holds tf32 copies of z and the codebook, per-row norms
// and the list of rows to recheck, O((N + K) D) in all. Depends only on the arguments and the
// current device; queries device attributes, launches nothing.
cudaError_t nearest_code_workspace_bytes(int64_t n, int64_t k, int64_t d, DType dtype, bool fast,
                                         size_t* bytes, Screen screen = Screen::kAuto);

// Enqueues the search on `stream` (device = the current device); returns the first launch error
// or cudaErrorInvalidValue for bad arguments. Execution errors surface at the next synchronizing
// call, as with any kernel.
//   z:          (n, d) row-major, dtype          codebook: (k, d) row-major, dtype
//   code_scale: (k,) float32 or nullptr (1)      code_bias: (k,) float32 or nullptr (0)
//   n >= 0 (n == 0 launches nothing), 1 <= k <= 2^31 - 257, 1 <= d <= 1024.
//   fast:       float32 inputs multiply in bf16 (fp32 accumulate) instead of 3xTF32; no effect
//               for bf16 / fp16 inputs, whose products are exact in fp32.
//   out_idx:    (n,) int64, written for every row.
//   workspace:  device memory of at least nearest_code_workspace_bytes(...) bytes, 16-byte
//               aligned (cudaMalloc and torch's allocator give 256 or more; may be null when
//               the size is 0), used in stream order only.
//   screen:     as for nearest_code_workspace_bytes, which must have been given the same.
cudaError_t launch_nearest_code(const void* z, const void* codebook, const float* code_scale,
                                const float* code_bias, int64_t n, int64_t k, int64_t d,
                                DType dtype, bool fast, int64_t* out_idx, void* workspace,
                                size_t workspace_bytes, cudaStream_t stream,
                                Screen screen = Screen::kAuto);

// Where a screened search left the rows it handed to its 3xTF32 recheck: *count (int32) rows at
// *rows (int64, in no particular order), device pointers into `workspace`, valid once the launch
// has run and until the workspace is reused. Both nullptr where this search does not screen.
// The arguments are launch_nearest_code's. For diagnostics and tests: the share of rows rechecked.
cudaError_t nearest_code_rechecked_rows(int64_t n, int64_t k, int64_t d, DType dtype, bool fast,
                                        const void* workspace, const int32_t** count,
                                        const int64_t** rows, Screen screen = Screen::kAuto);

}  // namespace cuda
}  // namespace fastvq

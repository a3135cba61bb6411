// Torch glue of the CUDA backend of fastvq::ema_scatter_cpp: the same checks as the CPU glue
// (csrc/cpu/ema.cpp, through csrc/checks.h), device guard and current stream, then ema.cu (ema.h).
// deterministic: a stable sort of the indices here (at::sort, on the current stream), then a
// fixed-order segmented sum per code; otherwise float32 atomics. Indices are not range-checked
// here (a device-to-host sync per call): out-of-range rows are skipped by the kernels, and the
// Python op checks the range first (ema_update_'s check_indices).
// Compiled only where torch has CUDA (setup.py); the schema is in csrc/fastvq.cpp.
#include <ATen/core/Tensor.h>
#include <ATen/ops/sort.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "../checks.h"
#include "ema.h"

namespace fastvq {
namespace {

constexpr const char* kOp = "fastvq::ema_scatter_cpp";

void ema_scatter_cuda(const at::Tensor& counts, const at::Tensor& sums, const at::Tensor& z,
                      const at::Tensor& indices, const std::optional<at::Tensor>& weight,
                      double keep, double gain, bool deterministic) {
  TORCH_CHECK(z.is_cuda(), kOp, ": z must be a CUDA tensor, got ", z.device());
  checks::ema_scatter_args(kOp, counts, sums, z, indices, weight);
  const int64_t N = z.size(0), D = z.size(1), K = counts.size(0);

  const c10::cuda::CUDAGuard guard(z.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(z.device().index()).stream();
  const auto dtype = z.scalar_type();
  cuda::EmaArgs args{counts.mutable_data_ptr<float>(),
                     counts.stride(0),
                     sums.mutable_data_ptr<float>(),
                     sums.stride(0),
                     z.const_data_ptr(),
                     z.stride(0),
                     dtype == at::kFloat      ? cuda::DType::F32
                     : dtype == at::kBFloat16 ? cuda::DType::BF16
                                              : cuda::DType::F16,
                     weight.has_value() ? weight->const_data_ptr<float>() : nullptr,
                     N,
                     K,
                     D,
                     static_cast<float>(keep),
                     static_cast<float>(gain)};
  cudaError_t err;
  if (deterministic) {
    // Stable, so that each code's rows keep their order: the sum order depends on the input only.
    const auto [sorted, order] = at::sort(indices, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    err = cuda::launch_ema_sorted(args, sorted.const_data_ptr<int64_t>(),
                                  order.const_data_ptr<int64_t>(), stream);
  } else {
    err = cuda::launch_ema_atomic(args, indices.const_data_ptr<int64_t>(), stream);
  }
  TORCH_CHECK(err == cudaSuccess, kOp, " (CUDA): kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace
}  // namespace fastvq

TORCH_LIBRARY_IMPL(fastvq, CUDA, m) { m.impl("ema_scatter_cpp", &fastvq::ema_scatter_cuda); }

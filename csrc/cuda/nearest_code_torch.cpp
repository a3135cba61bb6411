// Torch glue of the CUDA backend of fastvq::nearest_code: argument checks, device guard, current
// stream and workspace, then the torch-free launch function of nearest_code.cu (nearest_code.h).
// Compiled only where torch has CUDA (setup.py); the schema is in csrc/fastvq.cpp.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "nearest_code.h"

namespace fastvq {
namespace {

constexpr int64_t kMaxDim = 1024;
// Code indices are int32 inside the kernel (nearest_code.h).
constexpr int64_t kMaxCodes = INT32_MAX - 256;

void check_code_term(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& z,
                     int64_t K) {
  if (!t.has_value()) return;
  TORCH_CHECK_VALUE(t->device() == z.device(), "fastvq::nearest_code: ", name,
              " must be on z's device (", z.device(), "), got ", t->device());
  TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, "fastvq::nearest_code: ", name,
              " must be float32, got ", t->scalar_type());
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == K, "fastvq::nearest_code: ", name,
              " must have shape (K,) = (", K, ",), got ", t->sizes());
  TORCH_CHECK_VALUE(t->is_contiguous(), "fastvq::nearest_code: ", name, " must be contiguous");
}

at::Tensor nearest_code_cuda(const at::Tensor& z, const at::Tensor& codebook,
                             const std::optional<at::Tensor>& code_scale,
                             const std::optional<at::Tensor>& code_bias, bool fast,
                             std::optional<bool> screen) {
  TORCH_CHECK_VALUE(z.is_cuda() && codebook.is_cuda(),
              "fastvq::nearest_code (CUDA): z and codebook must be CUDA tensors, got ",
              z.device(), " and ", codebook.device());
  TORCH_CHECK_VALUE(codebook.device() == z.device(),
              "fastvq::nearest_code: z and codebook must be on the same device, got ", z.device(),
              " and ", codebook.device());
  TORCH_CHECK_VALUE(z.dim() == 2, "fastvq::nearest_code: z must have shape (N, D), got ", z.sizes());
  TORCH_CHECK_VALUE(codebook.dim() == 2, "fastvq::nearest_code: codebook must have shape (K, D), got ",
              codebook.sizes());
  const int64_t N = z.size(0);
  const int64_t K = codebook.size(0);
  const int64_t D = codebook.size(1);
  TORCH_CHECK_VALUE(z.size(1) == D, "fastvq::nearest_code: z's D (", z.size(1),
              ") must equal codebook's D (", D, ")");
  TORCH_CHECK_VALUE(K >= 1 && K <= kMaxCodes, "fastvq::nearest_code: K must be between 1 and ",
              kMaxCodes, " on CUDA, got ", K);
  TORCH_CHECK_VALUE(D >= 1 && D <= kMaxDim, "fastvq::nearest_code: D must be between 1 and ", kMaxDim,
              ", got ", D);
  TORCH_CHECK_TYPE(z.scalar_type() == codebook.scalar_type(),
              "fastvq::nearest_code: z and codebook must have the same dtype, got ",
              z.scalar_type(), " and ", codebook.scalar_type());
  const auto dtype = z.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "fastvq::nearest_code: dtype must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK_VALUE(z.is_contiguous() && codebook.is_contiguous(),
              "fastvq::nearest_code: z and codebook must be contiguous");
  check_code_term(code_scale, "code_scale", z, K);
  check_code_term(code_bias, "code_bias", z, K);

  // The launch function works on the current device and the workspace must live there too.
  const c10::cuda::CUDAGuard guard(z.device());
  at::Tensor out = at::empty({N}, z.options().dtype(at::kLong));
  if (N == 0) return out;

  const cuda::DType dt = dtype == at::kFloat      ? cuda::DType::F32
                         : dtype == at::kBFloat16 ? cuda::DType::BF16
                                                  : cuda::DType::F16;
  const cuda::Screen how = !screen.has_value() ? cuda::Screen::kAuto
                           : *screen           ? cuda::Screen::kAlways
                                               : cuda::Screen::kNever;
  size_t workspace_bytes = 0;
  cudaError_t err = cuda::nearest_code_workspace_bytes(N, K, D, dt, fast, &workspace_bytes, how);
  TORCH_CHECK(err == cudaSuccess, "fastvq::nearest_code (CUDA): planning failed: ",
              cudaGetErrorString(err));
  // Through the caching allocator on the current stream: freed at return, reused only by work
  // ordered after this launch on that stream.
  at::Tensor workspace;
  if (workspace_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, z.options().dtype(at::kByte));
  }
  err = cuda::launch_nearest_code(
      z.const_data_ptr(), codebook.const_data_ptr(),
      code_scale.has_value() ? code_scale->const_data_ptr<float>() : nullptr,
      code_bias.has_value() ? code_bias->const_data_ptr<float>() : nullptr, N, K, D, dt, fast,
      out.mutable_data_ptr<int64_t>(),
      workspace_bytes > 0 ? workspace.mutable_data_ptr() : nullptr, workspace_bytes,
      c10::cuda::getCurrentCUDAStream(z.device().index()).stream(), how);
  TORCH_CHECK(err == cudaSuccess, "fastvq::nearest_code (CUDA): kernel launch failed: ",
              cudaGetErrorString(err));
  return out;
}

}  // namespace
}  // namespace fastvq

TORCH_LIBRARY_IMPL(fastvq, CUDA, m) { m.impl("nearest_code", &fastvq::nearest_code_cuda); }

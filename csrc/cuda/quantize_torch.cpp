// Torch glue of the CUDA backend of fastvq::quantize_fwd_cpp / quantize_bwd_cpp: the same checks
// as the CPU glue (csrc/cpu/quantize.cpp, through csrc/checks.h), device guard and current
// stream, then the torch-free launch functions of quantize.cu (quantize.h). Compiled only where
// torch has CUDA (setup.py); the schemas are in csrc/fastvq.cpp.
// Unlike the CPU glue, indices are not range-checked here: that needs a device-to-host sync on
// every call. The kernels never access memory outside the tensors for an out-of-range index (the
// row gets NaN, see quantize.h); the Python ops pass indices from the search.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <tuple>

#include "../checks.h"
#include "quantize.h"

namespace fastvq {
namespace {

constexpr const char* kFwd = "fastvq::quantize_fwd_cpp";
constexpr const char* kBwd = "fastvq::quantize_bwd_cpp";

cuda::Grad parse_grad(const char* op, c10::string_view grad) {
  if (grad == "ste") return cuda::Grad::Ste;
  if (grad == "rotation") return cuda::Grad::Rotation;
  if (grad == "householder") return cuda::Grad::Householder;
  TORCH_CHECK_VALUE(false, op, ": grad must be 'ste', 'rotation' or 'householder', got '",
              std::string(grad), "'");
}

cuda::DType kernel_dtype(const at::Tensor& t) {
  const auto dt = t.scalar_type();
  return dt == at::kFloat ? cuda::DType::F32
         : dt == at::kBFloat16 ? cuda::DType::BF16
                               : cuda::DType::F16;
}

std::tuple<at::Tensor, at::Tensor> quantize_fwd_cuda(const at::Tensor& z,
                                                     const at::Tensor& codebook,
                                                     const at::Tensor& indices,
                                                     c10::string_view grad) {
  const cuda::Grad mode = parse_grad(kFwd, grad);
  TORCH_CHECK_VALUE(z.is_cuda(), kFwd, ": z must be a CUDA tensor, got ", z.device());
  checks::quantize_fwd_args(kFwd, z, codebook, indices);
  const int64_t N = z.size(0), K = codebook.size(0), D = z.size(1);
  const c10::cuda::CUDAGuard guard(z.device());
  at::Tensor zq = at::empty({N, D}, codebook.options());
  at::Tensor stats =
      at::empty({N, mode == cuda::Grad::Ste ? 0 : 4}, z.options().dtype(at::kFloat));
  if (N == 0) return {zq, stats};
  const cudaError_t err = cuda::launch_quantize_fwd(
      z.const_data_ptr(), codebook.const_data_ptr(), indices.const_data_ptr<int64_t>(), N, K, D,
      kernel_dtype(z), mode, zq.mutable_data_ptr(),
      mode == cuda::Grad::Ste ? nullptr : stats.mutable_data_ptr<float>(),
      c10::cuda::getCurrentCUDAStream(z.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, kFwd, " (CUDA): kernel launch failed: ",
              cudaGetErrorString(err));
  return {zq, stats};
}

std::tuple<at::Tensor, at::Tensor> quantize_bwd_cuda(const at::Tensor& grad_out,
                                                     const at::Tensor& z,
                                                     const at::Tensor& codebook,
                                                     const at::Tensor& indices,
                                                     const at::Tensor& stats,
                                                     c10::string_view grad, bool need_z,
                                                     bool need_codebook) {
  const cuda::Grad mode = parse_grad(kBwd, grad);
  TORCH_CHECK_VALUE(z.is_cuda(), kBwd, ": z must be a CUDA tensor, got ", z.device());
  checks::quantize_bwd_args(kBwd, grad_out, z, codebook, indices, stats, need_z,
                            mode == cuda::Grad::Ste);
  const int64_t N = z.size(0), K = codebook.size(0), D = z.size(1);
  const c10::cuda::CUDAGuard guard(z.device());
  at::Tensor dz = at::empty({need_z ? N : 0, D}, z.options());
  // The codebook gradient accumulates in float32 (atomics), converted once at the end.
  at::Tensor dc32 = at::zeros({need_codebook ? K : 0, D}, codebook.options().dtype(at::kFloat));
  const cudaError_t err = cuda::launch_quantize_bwd(
      grad_out.const_data_ptr(), z.const_data_ptr(), codebook.const_data_ptr(),
      indices.const_data_ptr<int64_t>(), need_z ? stats.const_data_ptr<float>() : nullptr, N, K,
      D, kernel_dtype(z), mode, need_z ? dz.mutable_data_ptr() : nullptr,
      need_codebook ? dc32.mutable_data_ptr<float>() : nullptr,
      c10::cuda::getCurrentCUDAStream(z.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, kBwd, " (CUDA): kernel launch failed: ",
              cudaGetErrorString(err));
  return {dz, dc32.to(codebook.scalar_type())};
}

}  // namespace
}  // namespace fastvq

TORCH_LIBRARY_IMPL(fastvq, CUDA, m) {
  m.impl("quantize_fwd_cpp", &fastvq::quantize_fwd_cuda);
  m.impl("quantize_bwd_cpp", &fastvq::quantize_bwd_cuda);
}

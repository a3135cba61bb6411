// Torch glue of the CUDA backend of fastvq::leech_decode: argument checks, device guard, current
// stream, then the torch-free launch function of leech.cu (leech.h). Compiled only where torch has
// CUDA (setup.py); the schema is in csrc/fastvq.cpp.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "leech.h"

namespace fastvq {
namespace {

at::Tensor leech_decode_cuda(const at::Tensor& z) {
  TORCH_CHECK_VALUE(z.is_cuda(), "fastvq::leech_decode (CUDA): z must be a CUDA tensor, got ",
              z.device());
  TORCH_CHECK_VALUE(z.dim() == 2 && z.size(1) == 24,
              "fastvq::leech_decode: z must have shape (N, 24), got ", z.sizes());
  TORCH_CHECK_VALUE(z.is_contiguous(), "fastvq::leech_decode: z must be contiguous");
  const auto dtype = z.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                  dtype == at::kHalf,
              "fastvq::leech_decode: z must be float32, float64, float16 or bfloat16, got ",
              dtype);

  // The launch function works on the current device.
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t N = z.size(0);
  at::Tensor out = at::empty({N}, z.options().dtype(at::kLong));
  if (N == 0) return out;

  const cuda::LeechDType dt = dtype == at::kFloat      ? cuda::LeechDType::F32
                              : dtype == at::kDouble   ? cuda::LeechDType::F64
                              : dtype == at::kBFloat16 ? cuda::LeechDType::BF16
                                                       : cuda::LeechDType::F16;
  const cudaError_t err =
      cuda::launch_leech_decode(z.const_data_ptr(), N, dt, out.mutable_data_ptr<int64_t>(),
                                c10::cuda::getCurrentCUDAStream(z.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, "fastvq::leech_decode (CUDA): kernel launch failed: ",
              cudaGetErrorString(err));
  return out;
}

}  // namespace
}  // namespace fastvq

TORCH_LIBRARY_IMPL(fastvq, CUDA, m) { m.impl("leech_decode", &fastvq::leech_decode_cuda); }

// Torch glue of the CUDA backend of fastvq::ema_scatter_cpp: the same checks as the CPU glue
// (csrc/cpu/ema.cpp, through csrc/checks.h), device guard and current stream, then ema.cu (ema.h).
// deterministic: a stable sort of the indices here (at::sort, on the current stream) and the
// pieces plan of ema.h, then fixed-order sums per piece and per code; otherwise float32 atomics.
// Indices are not range-checked here (a device-to-host sync per call): out-of-range rows are
// skipped by the kernels, and the Python op checks the range first (ema_update_'s check_indices).
// Compiled only where torch has CUDA (setup.py); the schema is in csrc/fastvq.cpp.
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/diff.h>
#include <ATen/ops/div.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gt.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "../checks.h"
#include "ema.h"

namespace fastvq {
namespace {

constexpr const char* kOp = "fastvq::ema_scatter_cpp";
// Rows per piece of a code's run in the deterministic kernels (the Triton kernels' PIECE_ROWS).
constexpr int64_t kPieceRows = 512;

void ema_scatter_cuda(const at::Tensor& counts, const at::Tensor& sums, const at::Tensor& z,
                      const at::Tensor& indices, const std::optional<at::Tensor>& weight,
                      double keep, double gain, bool deterministic) {
  TORCH_CHECK_VALUE(z.is_cuda(), kOp, ": z must be a CUDA tensor, got ", z.device());
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
    const auto [sorted, order] =
        at::sort(indices, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    // ema.h's EmaPieces, as fastvq.ops.codebook._ema_pieces makes it; no host sync.
    const at::Tensor offsets = at::searchsorted(sorted, at::arange(K + 1, indices.options()));
    const at::Tensor pieces =
        at::clamp_min(at::div(at::add(at::diff(offsets), kPieceRows - 1), kPieceRows, "floor"), 1);
    const at::Tensor zero = at::zeros({1}, indices.options());
    const at::Tensor piece_offsets = at::cat({zero, at::cumsum(pieces, 0)});
    const at::Tensor slot_offsets =
        at::cat({zero, at::cumsum(at::mul(pieces, at::gt(pieces, 1)), 0)});
    const int64_t chunks = (N + kPieceRows - 1) / kPieceRows;
    const at::Tensor piece_code =
        at::sub(at::searchsorted(piece_offsets, at::arange(K + chunks, indices.options()),
                                 /*out_int32=*/false, /*right=*/true),
                1);
    const at::Tensor partial =
        at::empty({std::max<int64_t>(2 * chunks, 1), D + 1}, counts.options());
    const cuda::EmaPieces plan{order.const_data_ptr<int64_t>(),
                               offsets.const_data_ptr<int64_t>(),
                               piece_offsets.const_data_ptr<int64_t>(),
                               slot_offsets.const_data_ptr<int64_t>(),
                               piece_code.const_data_ptr<int64_t>(),
                               K + chunks,
                               kPieceRows,
                               partial.mutable_data_ptr<float>()};
    err = cuda::launch_ema_pieces(args, plan, stream);
  } else {
    err = cuda::launch_ema_atomic(args, indices.const_data_ptr<int64_t>(), stream);
  }
  TORCH_CHECK(err == cudaSuccess, kOp, " (CUDA): kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace
}  // namespace fastvq

TORCH_LIBRARY_IMPL(fastvq, CUDA, m) { m.impl("ema_scatter_cpp", &fastvq::ema_scatter_cuda); }

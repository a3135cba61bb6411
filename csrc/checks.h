// Argument checks shared by every C++ glue file (csrc/cpu/*.cpp, csrc/cuda/*_torch.cpp).
//
// The Python ops validate first and raise ValueError / TypeError; these checks guard direct
// calls of torch.ops.fastvq.* and keep kernels from reading out of bounds. Each failure is a
// c10::Error naming the op, the argument and what was expected. `op` is the schema name, e.g.
// "fastvq::quantize_fwd_cpp"; tensors must live on `device` (the device of the main input).
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <optional>

namespace fastvq {
namespace checks {

inline void on_device(const char* op, const at::Tensor& t, const char* name,
                      const c10::Device& device) {
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, " must be on ", device, ", got ", t.device());
}

// t has shape (rows, cols) exactly.
inline void shape2(const char* op, const at::Tensor& t, const char* name, int64_t rows,
                   int64_t cols) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, op, ": ", name,
              " must have shape (", rows, ", ", cols, "), got ", t.sizes());
}

// The element types of the C++ kernels: float32, bfloat16, float16.
inline void kernel_dtype(const char* op, const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op, ": ", name,
              " must be float32, bfloat16 or float16, got ", dt);
}

inline void same_dtype(const char* op, const at::Tensor& a, const char* a_name,
                       const at::Tensor& b, const char* b_name) {
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), op, ": ", a_name, " and ", b_name,
              " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
}

inline void dtype_is(const char* op, const at::Tensor& t, const char* name, at::ScalarType dt) {
  TORCH_CHECK_TYPE(t.scalar_type() == dt, op, ": ", name, " must be ", dt, ", got ", t.scalar_type());
}

inline void contiguous(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// Rows may be strided, elements of a row must be adjacent (stride(1) == 1).
inline void unit_column_stride(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.size(1) <= 1 || t.stride(1) == 1, op, ": ", name,
              " must have unit column stride (stride(1) == 1), got strides ", t.strides());
}

// An output written in place must not hold one memory location twice (an expanded view, rows
// that overlap): threads that own different elements would race on it. Layouts too irregular to
// decide pass, as in ATen's own in-place ops.
inline void no_internal_overlap(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, ": ", name,
              " is written in place and must not refer to one memory location twice (an "
              "expanded or overlapping view); pass a contiguous tensor, got strides ",
              t.strides());
}

// `out`, written in place, must not share memory with `in`, which the kernel reads meanwhile
// (threads would read values other threads already wrote). Only layouts ATen can decide (FULL or
// PARTIAL overlap of dense tensors) fail, as in ATen's own out= checks.
inline void no_overlap(const char* op, const at::Tensor& out, const char* out_name,
                       const at::Tensor& in, const char* in_name) {
  const auto status = at::get_overlap_status(out, in);
  TORCH_CHECK_VALUE(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial, op,
              ": ", out_name, " is written in place and must not share memory with ", in_name,
              " (pass a copy)");
}

// (n,) of dtype `dt` on `device`, contiguous.
inline void vector(const char* op, const at::Tensor& t, const char* name, int64_t n,
                   at::ScalarType dt, const c10::Device& device) {
  on_device(op, t, name, device);
  dtype_is(op, t, name, dt);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape (", n,
              ",), got ", t.sizes());
  contiguous(op, t, name);
}

inline void optional_vector(const char* op, const std::optional<at::Tensor>& t, const char* name,
                            int64_t n, at::ScalarType dt, const c10::Device& device) {
  if (t.has_value()) vector(op, *t, name, n, dt, device);
}

// The (N, D) rows and (K, D) codebook of a search or a gather: 2-D, one kernel dtype, one
// device, contiguous, K >= 1 and 1 <= D <= max_dim. Returns nothing; read N, K, D from the sizes.
inline void rows_and_codebook(const char* op, const at::Tensor& z, const at::Tensor& codebook,
                              int64_t max_dim) {
  on_device(op, codebook, "codebook", z.device());
  TORCH_CHECK_VALUE(z.dim() == 2, op, ": z must have shape (N, D), got ", z.sizes());
  TORCH_CHECK_VALUE(codebook.dim() == 2, op, ": codebook must have shape (K, D), got ",
              codebook.sizes());
  const int64_t D = codebook.size(1);
  TORCH_CHECK_VALUE(z.size(1) == D, op, ": z's D (", z.size(1), ") must equal codebook's D (", D, ")");
  TORCH_CHECK_VALUE(codebook.size(0) >= 1, op, ": codebook must hold at least one code (K >= 1)");
  TORCH_CHECK_VALUE(D >= 1 && D <= max_dim, op, ": D must be between 1 and ", max_dim, ", got ", D);
  same_dtype(op, z, "z", codebook, "codebook");
  kernel_dtype(op, z, "z");
  contiguous(op, z, "z");
  contiguous(op, codebook, "codebook");
}

// --- the argument contracts of the ops (schemas in csrc/fastvq.cpp), one per op for every device:
// the glue checks its own device type, then calls these.

// quantize_fwd_cpp: z (N, D) and codebook (K, D) as in rows_and_codebook, indices (N,) int64.
inline void quantize_fwd_args(const char* op, const at::Tensor& z, const at::Tensor& codebook,
                              const at::Tensor& indices) {
  rows_and_codebook(op, z, codebook, std::numeric_limits<int64_t>::max());
  vector(op, indices, "indices", z.size(0), at::kLong, z.device());
}

// quantize_bwd_cpp: the forward's arguments, grad_out (N, D) like z, and with need_z (rotation /
// householder only) the forward's float32 stats (N, 4).
inline void quantize_bwd_args(const char* op, const at::Tensor& grad_out, const at::Tensor& z,
                              const at::Tensor& codebook, const at::Tensor& indices,
                              const at::Tensor& stats, bool need_z, bool ste) {
  TORCH_CHECK_VALUE(!(need_z && ste), op,
              ": need_z is for rotation / householder; the STE gradient of z is grad_out itself");
  quantize_fwd_args(op, z, codebook, indices);
  on_device(op, grad_out, "grad_out", z.device());
  shape2(op, grad_out, "grad_out", z.size(0), z.size(1));
  same_dtype(op, grad_out, "grad_out", z, "z");
  contiguous(op, grad_out, "grad_out");
  if (need_z) {
    on_device(op, stats, "stats", z.device());
    dtype_is(op, stats, "stats", at::kFloat);
    shape2(op, stats, "stats", z.size(0), 4);
    contiguous(op, stats, "stats");
  }
}

// ema_scatter_cpp: z (N, D >= 1) of a kernel dtype with unit column stride; counts (K >= 1,) and
// sums (K, D) float32 accumulators written in place; indices (N,) int64; weight (N,) float32 or
// None.
inline void ema_scatter_args(const char* op, const at::Tensor& counts, const at::Tensor& sums,
                             const at::Tensor& z, const at::Tensor& indices,
                             const std::optional<at::Tensor>& weight) {
  TORCH_CHECK_VALUE(z.dim() == 2 && z.size(1) >= 1, op, ": z must have shape (N, D) with D >= 1, got ",
              z.sizes());
  kernel_dtype(op, z, "z");
  unit_column_stride(op, z, "z");
  TORCH_CHECK_VALUE(counts.dim() == 1 && counts.size(0) >= 1, op,
              ": counts must have shape (K,) with K >= 1, got ", counts.sizes());
  for (const auto* t : {&counts, &sums}) {
    const char* name = t == &counts ? "counts" : "sums";
    on_device(op, *t, name, z.device());
    dtype_is(op, *t, name, at::kFloat);
    no_internal_overlap(op, *t, name);
  }
  shape2(op, sums, "sums", counts.size(0), z.size(1));
  unit_column_stride(op, sums, "sums");
  vector(op, indices, "indices", z.size(0), at::kLong, z.device());
  optional_vector(op, weight, "weight", z.size(0), at::kFloat, z.device());
  for (const auto* t : {&counts, &sums}) {
    const char* name = t == &counts ? "counts" : "sums";
    no_overlap(op, *t, name, z, "z");
    no_overlap(op, *t, name, indices, "indices");
    if (weight.has_value()) no_overlap(op, *t, name, *weight, "weight");
  }
  no_overlap(op, counts, "counts", sums, "sums");
}

}  // namespace checks
}  // namespace fastvq

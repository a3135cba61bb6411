// CPU kernels of the scalar quantizers' ops (fastvq/ops/scalar.py): FSQ forward / backward, the
// LFQ / BSQ sign forward, the BSQ backward, and the factorized binary entropy forward / backward.
// The same float32 arithmetic as the Triton kernels (kernels/scalar.py), formula for formula:
//   tanh(v) = sign(v) (1 - e) / (1 + e) and tanh'(v) = 4e / (1 + e)^2 with e = exp(-2|v|);
//   H(sigmoid(a)) = log(1 + e) + |a| e / (1 + e) with e = exp(-|a|), p(1 - p) = e / (1 + e)^2.
// bf16 / fp16 are widened exactly and results rounded to nearest even once.
//
// Layout: rows are processed in tiles of about kTile elements (R = max(1, kTile / D) whole rows),
// widened into a float32 buffer; the elementwise math then runs over the flat tile with the
// per-dimension parameters pre-expanded to the tile's length, branch-free, so GCC vectorizes it
// at -O3 even at D = 6 (a loop over one row would be 6 long). exp and log1p are the short
// polynomials below, because libm's are not vectorizable without -ffast-math, which would also
// break the NaN rules. These ops are bytes bound on a GPU but compute bound here: about 40 flops
// per element against 6-12 bytes.
//
// Column sums (entropy forward) are per-tile partials reduced in tile order in float64, so every
// result is bit-identical run to run and for any thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#include "../checks.h"
#include "by_code.h"
#include "isa.h"

namespace fastvq {
namespace {

// Elements per tile, and the largest D (FSQ's int64 indices and LFQ / BSQ's bit masks allow at most
// 62; the entropy terms take up to 1024, as the Triton kernels do).
constexpr int64_t kTile = 1024;
constexpr int64_t kGrainElements = 1 << 14;  // elements per parallel task
constexpr int kMaxBits = 62;                 // LFQ / BSQ indices are int64 bit masks

// --- the kernels, compiled twice ------------------------------------------------------------

// 8 float lanes instead of SSE2's 4 where the CPU has AVX2, picked at run time: FSQ forward at
// N = 65,536, D = 6 took 2.3 ms on one core with SSE2 and 1.15 with AVX2, the entropy forward at
// D = 18 7.8 and 3.8 (2-core EPYC dev box). No FMA in either build (contraction would round
// a * b + c once in one and twice in the other), and no reordered sums, so both builds return
// the same bits (tested).
namespace baseline {
#include "scalar_kernels.inc"
}  // namespace baseline

#if defined(FASTVQ_X86)
#pragma GCC push_options
#pragma GCC target("avx2")
namespace avx2 {
#include "scalar_kernels.inc"
}  // namespace avx2
#pragma GCC pop_options
// kernel(args...) from the AVX2 build where it runs, else from the baseline build.
#define FASTVQ_SCALAR_KERNEL(kernel, ...) \
  (cpu::use_avx2(/*with_fma=*/false) ? avx2::kernel(__VA_ARGS__) : baseline::kernel(__VA_ARGS__))
#else
#define FASTVQ_SCALAR_KERNEL(kernel, ...) baseline::kernel(__VA_ARGS__)
#endif

// --- glue ---------------------------------------------------------------------------------------

// z (N, D) on the CPU, a kernel dtype, contiguous, 1 <= D <= max_dim.
void check_z(const char* op, const at::Tensor& z, int64_t max_dim) {
  TORCH_CHECK_VALUE(z.device().is_cpu(), op, ": z must be a CPU tensor, got ", z.device());
  TORCH_CHECK_VALUE(z.dim() == 2 && z.size(1) >= 1 && z.size(1) <= max_dim, op,
              ": z must have shape (N, D) with 1 <= D <= ", max_dim, ", got ", z.sizes());
  checks::kernel_dtype(op, z, "z");
  checks::contiguous(op, z, "z");
}

// grad (N, D) like z.
void check_grad(const char* op, const at::Tensor& g, const at::Tensor& z) {
  checks::on_device(op, g, "grad_codes", z.device());
  checks::shape2(op, g, "grad_codes", z.size(0), z.size(1));
  checks::same_dtype(op, g, "grad_codes", z, "z");
  checks::contiguous(op, g, "grad_codes");
}

void check_params(const char* op, const at::Tensor& params, const at::Tensor& z) {
  checks::on_device(op, params, "params", z.device());
  checks::dtype_is(op, params, "params", at::kFloat);
  checks::shape2(op, params, "params", 6, z.size(1));
  checks::contiguous(op, params, "params");
}

std::tuple<at::Tensor, at::Tensor> fsq_fwd_cpu(const at::Tensor& z, const at::Tensor& params,
                                               const at::Tensor& basis) {
  constexpr const char* op = "fastvq::fsq_fwd_cpp";
  check_z(op, z, kTile);
  check_params(op, params, z);
  checks::vector(op, basis, "basis", z.size(1), at::kLong, z.device());
  const int64_t N = z.size(0), D = z.size(1);
  at::Tensor codes = at::empty_like(z);
  at::Tensor idx = at::empty({N}, z.options().dtype(at::kLong));
  FASTVQ_DISPATCH_KERNEL_DTYPES(z.scalar_type(), "fsq_fwd", [&] {
    FASTVQ_SCALAR_KERNEL(fsq_fwd_kernel<scalar_t>, z.const_data_ptr<scalar_t>(),
                         params.const_data_ptr<float>(), basis.const_data_ptr<int64_t>(), N, D,
                         codes.mutable_data_ptr<scalar_t>(), idx.mutable_data_ptr<int64_t>());
  });
  return {codes, idx};
}

at::Tensor fsq_bwd_cpu(const at::Tensor& grad_codes, const at::Tensor& z,
                       const at::Tensor& params) {
  constexpr const char* op = "fastvq::fsq_bwd_cpp";
  check_z(op, z, kTile);
  check_grad(op, grad_codes, z);
  check_params(op, params, z);
  at::Tensor dz = at::empty_like(z);
  FASTVQ_DISPATCH_KERNEL_DTYPES(z.scalar_type(), "fsq_bwd", [&] {
    FASTVQ_SCALAR_KERNEL(fsq_bwd_kernel<scalar_t>, grad_codes.const_data_ptr<scalar_t>(),
                         z.const_data_ptr<scalar_t>(), params.const_data_ptr<float>(), z.size(0),
                         z.size(1), dz.mutable_data_ptr<scalar_t>());
  });
  return dz;
}

std::tuple<at::Tensor, at::Tensor> sign_fwd_cpu(const at::Tensor& z, double scale) {
  constexpr const char* op = "fastvq::sign_fwd_cpp";
  check_z(op, z, kMaxBits);
  // The indices come from the codes' signs: a scale <= 0 or NaN would flip or zero them.
  TORCH_CHECK_VALUE(scale > 0 && std::isfinite(scale), op, ": scale must be finite and > 0, got ", scale);
  at::Tensor codes = at::empty_like(z);
  at::Tensor idx = at::empty({z.size(0)}, z.options().dtype(at::kLong));
  FASTVQ_DISPATCH_KERNEL_DTYPES(z.scalar_type(), "sign_fwd", [&] {
    FASTVQ_SCALAR_KERNEL(sign_fwd_kernel<scalar_t>, z.const_data_ptr<scalar_t>(),
                         static_cast<float>(scale), z.size(0), z.size(1),
                         codes.mutable_data_ptr<scalar_t>(), idx.mutable_data_ptr<int64_t>());
  });
  return {codes, idx};
}

at::Tensor bsq_bwd_cpu(const at::Tensor& grad_codes, const at::Tensor& z) {
  constexpr const char* op = "fastvq::bsq_bwd_cpp";
  check_z(op, z, kMaxBits);
  check_grad(op, grad_codes, z);
  at::Tensor dz = at::empty_like(z);
  FASTVQ_DISPATCH_KERNEL_DTYPES(z.scalar_type(), "bsq_bwd", [&] {
    FASTVQ_SCALAR_KERNEL(bsq_bwd_kernel<scalar_t>, grad_codes.const_data_ptr<scalar_t>(),
                         z.const_data_ptr<scalar_t>(), z.size(0), z.size(1),
                         dz.mutable_data_ptr<scalar_t>());
  });
  return dz;
}

std::tuple<at::Tensor, at::Tensor> binary_entropy_fwd_cpu(const at::Tensor& z, double coef,
                                                          bool spherical) {
  constexpr const char* op = "fastvq::binary_entropy_fwd_cpp";
  check_z(op, z, kTile);
  const int64_t N = z.size(0), D = z.size(1);
  at::Tensor rows = at::empty({N}, z.options().dtype(at::kFloat));
  at::Tensor cols = at::zeros({2, D}, z.options().dtype(at::kFloat));
  FASTVQ_DISPATCH_KERNEL_DTYPES(z.scalar_type(), "binary_entropy_fwd", [&] {
    FASTVQ_SCALAR_KERNEL(entropy_fwd_kernel<scalar_t>, z.const_data_ptr<scalar_t>(),
                         static_cast<float>(coef), spherical, N, D, rows.mutable_data_ptr<float>(),
                         cols.mutable_data_ptr<float>());
  });
  return {rows, cols};
}

at::Tensor binary_entropy_bwd_cpu(const at::Tensor& grad_rows, const at::Tensor& grad_cols,
                                  const at::Tensor& z, double coef, bool spherical) {
  constexpr const char* op = "fastvq::binary_entropy_bwd_cpp";
  check_z(op, z, kTile);
  const int64_t N = z.size(0), D = z.size(1);
  checks::vector(op, grad_rows, "grad_rows", N, at::kFloat, z.device());
  checks::on_device(op, grad_cols, "grad_cols", z.device());
  checks::dtype_is(op, grad_cols, "grad_cols", at::kFloat);
  checks::shape2(op, grad_cols, "grad_cols", 2, D);
  checks::contiguous(op, grad_cols, "grad_cols");
  at::Tensor dz = at::empty_like(z);
  FASTVQ_DISPATCH_KERNEL_DTYPES(z.scalar_type(), "binary_entropy_bwd", [&] {
    FASTVQ_SCALAR_KERNEL(entropy_bwd_kernel<scalar_t>, grad_rows.const_data_ptr<float>(),
                         grad_cols.const_data_ptr<float>(), z.const_data_ptr<scalar_t>(),
                         static_cast<float>(coef), spherical, N, D,
                         dz.mutable_data_ptr<scalar_t>());
  });
  return dz;
}

}  // namespace
}  // namespace fastvq

TORCH_LIBRARY_IMPL(fastvq, CPU, m) {
  m.impl("fsq_fwd_cpp", &fastvq::fsq_fwd_cpu);
  m.impl("fsq_bwd_cpp", &fastvq::fsq_bwd_cpu);
  m.impl("sign_fwd_cpp", &fastvq::sign_fwd_cpu);
  m.impl("bsq_bwd_cpp", &fastvq::bsq_bwd_cpu);
  m.impl("binary_entropy_fwd_cpp", &fastvq::binary_entropy_fwd_cpu);
  m.impl("binary_entropy_bwd_cpp", &fastvq::binary_entropy_bwd_cpu);
}

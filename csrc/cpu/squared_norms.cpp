// CPU kernel of fastvq::squared_norms: out[k] = sum_d x[k][d]^2 in float64, one pass over x. It
// gives the C++ search its per-code terms (_squared_norms in fastvq/ops/nearest_code.py): PyTorch
// would first write a K x D float64 temporary (code_terms' copy, or vector_norm's) into memory
// taken anew from the system each call, whose page faults cost more than the search at few rows.
//
// Squares of float32, float16 and bfloat16 values are exact in float64, so only the additions
// round. Rows of D >= 8 are summed in 8 interleaved partial sums (vector adds, no chain of one
// add's latency per element), the last D % 8 elements into the first ones, which are then folded
// pairwise (s[j] += s[j + 4], then + 2, + 1); shorter rows in order. The order depends on D
// alone, not on the thread count or the row's place in the batch.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace fastvq {
namespace {

constexpr const char* kOp = "fastvq::squared_norms";
constexpr int kSums = 8;  // partial sums per row
constexpr int64_t kGrainElements = 1 << 15;  // elements of x per parallel task, at least

// s[j] += x[j]^2 for j < S: independent adds that the compiler turns into vector ones.
template <int S, class T>
inline void add_squares(const T* x, double (&s)[S]) {
  for (int j = 0; j < S; ++j) {
    const double v = static_cast<double>(x[j]);
    s[j] += v * v;
  }
}

template <int S, class T>
void squared_norms_kernel(const T* x, int64_t K, int64_t D, double* out) {
  at::parallel_for(0, K, std::max<int64_t>(1, kGrainElements / D), [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const T* row = x + k * D;
      double s[S] = {};
      int64_t d = 0;
      for (; d + S <= D; d += S) add_squares(row + d, s);
      for (int j = 0; d < D; ++d, ++j) {
        const double v = static_cast<double>(row[d]);
        s[j] += v * v;
      }
      for (int w = S / 2; w > 0; w /= 2) {
        for (int j = 0; j < w; ++j) s[j] += s[j + w];
      }
      out[k] = s[0];
    }
  });
}

at::Tensor squared_norms_cpu(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), kOp, " (CPU): x must be a CPU tensor, got ", x.device());
  TORCH_CHECK_VALUE(x.dim() == 2, kOp, ": x must have shape (K, D), got ", x.sizes());
  TORCH_CHECK_VALUE(x.is_contiguous(), kOp, ": x must be contiguous");
  const auto dt = x.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              kOp, ": x must be float32, float64, float16 or bfloat16, got ", dt);
  const int64_t K = x.size(0), D = x.size(1);
  at::Tensor out = at::empty({K}, x.options().dtype(at::kDouble));
  if (D == 0) return out.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "squared_norms", [&] {
    const auto kernel = D >= kSums ? squared_norms_kernel<kSums, scalar_t>
                                   : squared_norms_kernel<1, scalar_t>;
    kernel(x.const_data_ptr<scalar_t>(), K, D, out.mutable_data_ptr<double>());
  });
  return out;
}

}  // namespace
}  // namespace fastvq

TORCH_LIBRARY_IMPL(fastvq, CPU, m) { m.impl("squared_norms", &fastvq::squared_norms_cpu); }

// CPU kernel of fastvq::ema_scatter_cpp: per-code weighted counts and sums of the rows of z,
// folded into EMA accumulators in place:
//   counts[k] = keep * counts[k] + gain * c[k],   c[k] = sum of w[n]
//   sums[k]   = keep * sums[k]   + gain * s[k],   s[k] = sum of w[n] * z[n]   over idx[n] == k
// in float32 whatever z's dtype. By code ownership (by_code.h): each thread sums the rows of its
// codes in increasing n into a private buffer and writes its codes once, so the result is
// bit-identical run to run and for any thread count; `deterministic` is therefore ignored here.
// Rows of weight 0 (padding under a mask) are skipped, as in kernels/ema.py.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "../checks.h"
#include "by_code.h"

namespace fastvq {
namespace {

constexpr const char* kOp = "fastvq::ema_scatter_cpp";
// Rows per float32 partial sum of one code: a float32 running sum of n similar values errs by up
// to n 2^-24 of itself (a count stops growing at 2^24), so once a code's partial holds kFlushRows
// rows it moves into a double total, allocated when a code first fills a partial (a hot code; the
// usual batch spreads a few rows over each code and never does). Without weights the count
// already in a register counts the rows; with weights (which may be small or negative: their sum
// is no row count) a separate counter does. At N = 16,384, K = 4096, D = 32 on one thread here
// (best of 500): 0.19-0.20 ms, against 0.185 without any flush (inexact past 2^24 rows of a code)
// and 0.205-0.21 with the separate counter.
constexpr int kFlushRows = 256;

template <class T>
void ema_kernel(const T* z, int64_t ldz, const int64_t* idx, const float* weight, int64_t N,
                int64_t D, float* counts, int64_t ldc, float* sums, int64_t lds, float keep,
                float gain, const std::vector<int64_t>& bounds) {
  cpu::for_each_code_range(bounds, [&](int64_t k0, int64_t k1) {
    // (k1 - k0) x (D + 1): the sums, then the count, of each owned code.
    const int64_t width = D + 1;
    std::vector<float> acc((k1 - k0) * width, 0.f);
    std::vector<double> total;  // (k1 - k0) x (D + 1) once a partial fills
    const uint64_t span = static_cast<uint64_t>(k1 - k0);
    std::vector<int> rows(weight != nullptr ? span : 0);  // rows in each partial, with weights
    for (int64_t n = 0; n < N; ++n) {
      const uint64_t j = static_cast<uint64_t>(idx[n] - k0);
      if (j >= span) continue;
      const float w = weight != nullptr ? weight[n] : 1.f;
      if (w == 0.f) continue;
      float* a = acc.data() + j * width;
      const T* x = z + n * ldz;
      for (int64_t d = 0; d < D; ++d) a[d] += w * static_cast<float>(x[d]);
      a[D] += w;
      if (weight != nullptr ? ++rows[j] == kFlushRows : a[D] >= kFlushRows) {
        if (total.empty()) total.assign(acc.size(), 0.0);
        double* t = total.data() + j * width;
        for (int64_t d = 0; d <= D; ++d) t[d] += a[d], a[d] = 0.f;
        if (weight != nullptr) rows[j] = 0;
      }
    }
    for (int64_t k = k0; k < k1; ++k) {
      const float* a = acc.data() + (k - k0) * width;
      const double* t = total.empty() ? nullptr : total.data() + (k - k0) * width;
      const auto sum = [&](int64_t d) { return t ? static_cast<float>(t[d] + a[d]) : a[d]; };
      float* s = sums + k * lds;
      for (int64_t d = 0; d < D; ++d) s[d] = keep * s[d] + gain * sum(d);
      counts[k * ldc] = keep * counts[k * ldc] + gain * sum(D);
    }
  });
}

void ema_scatter_cpu(const at::Tensor& counts, const at::Tensor& sums, const at::Tensor& z,
                     const at::Tensor& indices, const std::optional<at::Tensor>& weight,
                     double keep, double gain, bool deterministic) {
  (void)deterministic;  // always deterministic on the CPU (see the top of the file)
  TORCH_CHECK_VALUE(z.device().is_cpu(), kOp, ": z must be a CPU tensor, got ", z.device());
  checks::ema_scatter_args(kOp, counts, sums, z, indices, weight);
  const int64_t N = z.size(0), D = z.size(1), K = counts.size(0);
  // Every code is written, even with N = 0 (then only scaled by keep).
  const auto bounds = cpu::code_ranges(kOp, indices.const_data_ptr<int64_t>(), N, K,
                                       at::get_num_threads());
  FASTVQ_DISPATCH_KERNEL_DTYPES(z.scalar_type(), "ema_scatter", [&] {
    ema_kernel<scalar_t>(z.const_data_ptr<scalar_t>(), z.stride(0),
                         indices.const_data_ptr<int64_t>(),
                         weight.has_value() ? weight->const_data_ptr<float>() : nullptr, N, D,
                         counts.mutable_data_ptr<float>(), counts.stride(0),
                         sums.mutable_data_ptr<float>(), sums.stride(0), static_cast<float>(keep),
                         static_cast<float>(gain), bounds);
  });
}

}  // namespace
}  // namespace fastvq

TORCH_LIBRARY_IMPL(fastvq, CPU, m) { m.impl("ema_scatter_cpp", &fastvq::ema_scatter_cpu); }

// CPU glue shared by the lattice-shell decoders (leech.cpp, e8.cpp): checks that z is a contiguous
// (N, kDim) CPU tensor and returns the (N,) int64 indices that decode_rows gives its rows. Rows
// reach decode_rows in blocks of at most kShellBlock, widened to the scores' type T (float for
// float32, float16 and bfloat16, whose values widen exactly; double for float64) and scaled by
// leech::row_scale. Blocks are split over threads by at::parallel_for in tasks of at least
// `grain` rows; every row gets the same arithmetic whichever block it lands in (the decoders
// promise this), so results do not depend on the thread count.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../leech_decode.h"

namespace fastvq {

constexpr int kShellBlock = 16;

template <typename T, int kDim, typename In, typename DecodeRows>
void decode_scaled_rows(const In* z, int64_t n, int64_t grain, int64_t* out,
                        const DecodeRows& decode_rows) {
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    T rows[kShellBlock][kDim];
    for (int64_t r0 = begin; r0 < end; r0 += kShellBlock) {
      const int m = static_cast<int>(std::min<int64_t>(kShellBlock, end - r0));
      for (int r = 0; r < m; ++r) {
        const In* x = z + (r0 + r) * kDim;
        T largest = 0;
        for (int p = 0; p < kDim; ++p) {
          rows[r][p] = static_cast<T>(x[p]);
          // NaN is dropped: such rows get 0 anyway
          largest = std::max(largest, std::abs(rows[r][p]));
        }
        const T scale = leech::row_scale(largest);
        for (int p = 0; p < kDim; ++p) rows[r][p] *= scale;
      }
      decode_rows(static_cast<const T(*)[kDim]>(rows), m, out + r0);
    }
  });
}

// decode_rows(rows, m, out): out[r] = the index of rows[r], r < m <= kShellBlock, for rows of type
// const float (*)[kDim] and const double (*)[kDim] (a generic lambda).
template <int kDim, typename DecodeRows>
at::Tensor decode_shell_rows(const char* op, const at::Tensor& z, int64_t grain,
                             const DecodeRows& decode_rows) {
  TORCH_CHECK(z.device().is_cpu(), op, " (CPU): z must be a CPU tensor, got ", z.device());
  TORCH_CHECK(z.dim() == 2 && z.size(1) == kDim, op, ": z must have shape (N, ", kDim, "), got ",
              z.sizes());
  TORCH_CHECK(z.is_contiguous(), op, ": z must be contiguous");
  const int64_t n = z.size(0);
  at::Tensor out = at::empty({n}, z.options().dtype(at::kLong));
  int64_t* o = out.mutable_data_ptr<int64_t>();
  switch (z.scalar_type()) {
    case at::kFloat:
      decode_scaled_rows<float, kDim>(z.const_data_ptr<float>(), n, grain, o, decode_rows);
      break;
    case at::kDouble:
      decode_scaled_rows<double, kDim>(z.const_data_ptr<double>(), n, grain, o, decode_rows);
      break;
    case at::kHalf:
      decode_scaled_rows<float, kDim>(z.const_data_ptr<c10::Half>(), n, grain, o, decode_rows);
      break;
    case at::kBFloat16:
      decode_scaled_rows<float, kDim>(z.const_data_ptr<c10::BFloat16>(), n, grain, o, decode_rows);
      break;
    default:
      TORCH_CHECK(false, op, ": z must be float32, float64, float16 or bfloat16, got ",
                  z.scalar_type());
  }
  return out;
}

}  // namespace fastvq

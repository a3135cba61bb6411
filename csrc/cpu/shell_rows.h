// CPU glue shared by the lattice-shell decoders (leech.cpp, e8.cpp): checks that z is a contiguous
// (N, kDim) CPU tensor and returns the (N,) int64 indices decode_row(row) gives each row, where
// row is the row widened to the scores' type T (float for float32, float16 and bfloat16, whose
// values widen exactly; double for float64) and scaled by leech::row_scale. Rows are split over
// threads by at::parallel_for in tasks of at least `grain` rows; every row runs the same serial
// code, so results do not depend on the thread count.
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

template <typename T, int kDim, typename In, typename DecodeRow>
void decode_scaled_rows(const In* z, int64_t n, int64_t grain, int64_t* out,
                        const DecodeRow& decode_row) {
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    T row[kDim];
    for (int64_t r = begin; r < end; ++r) {
      T largest = 0;
      for (int p = 0; p < kDim; ++p) {
        row[p] = static_cast<T>(z[r * kDim + p]);
        largest = std::max(largest, std::abs(row[p]));  // NaN is dropped: such rows get 0 anyway
      }
      const T scale = leech::row_scale(largest);
      for (int p = 0; p < kDim; ++p) row[p] *= scale;
      out[r] = decode_row(static_cast<const T*>(row));
    }
  });
}

// decode_row: a callable taking const float* and const double* (a generic lambda).
template <int kDim, typename DecodeRow>
at::Tensor decode_shell_rows(const char* op, const at::Tensor& z, int64_t grain,
                             const DecodeRow& decode_row) {
  TORCH_CHECK(z.device().is_cpu(), op, " (CPU): z must be a CPU tensor, got ", z.device());
  TORCH_CHECK(z.dim() == 2 && z.size(1) == kDim, op, ": z must have shape (N, ", kDim, "), got ",
              z.sizes());
  TORCH_CHECK(z.is_contiguous(), op, ": z must be contiguous");
  const int64_t n = z.size(0);
  at::Tensor out = at::empty({n}, z.options().dtype(at::kLong));
  int64_t* o = out.mutable_data_ptr<int64_t>();
  switch (z.scalar_type()) {
    case at::kFloat:
      decode_scaled_rows<float, kDim>(z.const_data_ptr<float>(), n, grain, o, decode_row);
      break;
    case at::kDouble:
      decode_scaled_rows<double, kDim>(z.const_data_ptr<double>(), n, grain, o, decode_row);
      break;
    case at::kHalf:
      decode_scaled_rows<float, kDim>(z.const_data_ptr<c10::Half>(), n, grain, o, decode_row);
      break;
    case at::kBFloat16:
      decode_scaled_rows<float, kDim>(z.const_data_ptr<c10::BFloat16>(), n, grain, o, decode_row);
      break;
    default:
      TORCH_CHECK(false, op, ": z must be float32, float64, float16 or bfloat16, got ",
                  z.scalar_type());
  }
  return out;
}

}  // namespace fastvq

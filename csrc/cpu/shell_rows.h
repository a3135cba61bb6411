// CPU glue of the lattice decoders. with_rows checks an (N, kDim) input and dispatches on its
// dtype (e8.cpp, leech.cpp). decode_shell_rows (leech.cpp) returns the (N,) int64 indices that
// decode_rows gives the rows, which reach it in blocks of at most kShellBlock, widened to the
// scores' type T (float for float32, float16 and bfloat16, whose values widen exactly; double for
// float64) and scaled by leech::row_scale. Blocks are split over threads by at::parallel_for in
// tasks of at least `grain` rows; every row gets the same arithmetic whichever block it lands in
// (the decoder promises this), so results do not depend on the thread count.
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

// f(T(), data) for x, a CPU tensor (N, kDim) named `name` of op `op`, after checking it: data its
// contiguous elements, T the compute type (float for float32, float16 and bfloat16, whose values
// widen exactly; double for float64).
template <int kDim, typename F>
void with_rows(const char* op, const char* name, const at::Tensor& x, const F& f) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, " (CPU): ", name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == kDim, op, ": ", name, " must have shape (N, ", kDim,
              "), got ", x.sizes());
  TORCH_CHECK_VALUE(x.is_contiguous(), op, ": ", name, " must be contiguous");
  switch (x.scalar_type()) {
    case at::kFloat:
      return f(float(), x.const_data_ptr<float>());
    case at::kDouble:
      return f(double(), x.const_data_ptr<double>());
    case at::kHalf:
      return f(float(), x.const_data_ptr<c10::Half>());
    case at::kBFloat16:
      return f(float(), x.const_data_ptr<c10::BFloat16>());
    default:
      TORCH_CHECK_TYPE(false, op, ": ", name, " must be float32, float64, float16 or bfloat16, got ",
                  x.scalar_type());
  }
}

// decode_rows(rows, m, out): out[r] = the index of rows[r], r < m <= kShellBlock, for rows of type
// const float (*)[kDim] and const double (*)[kDim] (a generic lambda).
template <int kDim, typename DecodeRows>
at::Tensor decode_shell_rows(const char* op, const at::Tensor& z, int64_t grain,
                             const DecodeRows& decode_rows) {
  at::Tensor out;
  with_rows<kDim>(op, "z", z, [&](auto t, const auto* in) {
    out = at::empty({z.size(0)}, z.options().dtype(at::kLong));
    decode_scaled_rows<decltype(t), kDim>(in, z.size(0), grain, out.mutable_data_ptr<int64_t>(),
                                          decode_rows);
  });
  return out;
}

}  // namespace fastvq

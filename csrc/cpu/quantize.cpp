// CPU kernels of fastvq::quantize_fwd_cpp and fastvq::quantize_bwd_cpp: the gather + estimator
// statistics after the search, and the closed-form backward (formulas in kernels/quantize.py and
// fastvq/ops/quantize.py, which these match up to float32 summation order).
//
// Per row n, z = z[n], q = codebook[idx[n]] upcast to float32, g = dL/dz_q[n]:
//   forward   z_q[n] = q (bit for bit); rotation / householder also stats[n] = (s, 1/|z|, 1/|q|, w)
//             with s = |q|/|z|, e = z^ + sigma q^ (sigma = +1 rotation, -1 householder),
//             w = 2/|e|^2; degenerate rows store (1, 0, 0, 0) (STE), householder e = 0 stores w = 0
//             (e = 0: |e|^2 below float32's smallest normal).
//   backward  dz = s (g - w (e.g) e [+ 2 (q^.g) z^ for rotation]) in z's dtype;
//             dcodebook[k] = sum of g over rows with idx == k, by code ownership (by_code.h):
//             no atomics, bit-identical whatever the thread count.
// Rows are independent and bytes bound (forward reads q + z, backward g + z + q per row); the
// per-row sums use 8 interleaved partial sums in a fixed order (dot below).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "../checks.h"
#include "by_code.h"

namespace fastvq {
namespace {

constexpr const char* kFwd = "fastvq::quantize_fwd_cpp";
constexpr const char* kBwd = "fastvq::quantize_bwd_cpp";
enum Mode { kSte = 0, kRotation = 1, kHouseholder = 2 };
// Rows per parallel task: about 16 K elements, so that a task outlasts its scheduling.
constexpr int64_t kGrainElements = 1 << 14;

int parse_mode(const char* op, c10::string_view grad) {
  if (grad == "ste") return kSte;
  if (grad == "rotation") return kRotation;
  if (grad == "householder") return kHouseholder;
  TORCH_CHECK_VALUE(false, op, ": grad must be 'ste', 'rotation' or 'householder', got '",
              std::string(grad), "'");
}

// sum of a[d] * b[d]: 8 interleaved partial sums, combined pairwise. One fixed order for every
// row, call and thread count, and 8 independent chains instead of one (a single running sum is
// bound by the 4-cycle add latency: 32 serial adds per row at D = 32). Both norms go through the
// same order, so z = -q or z = 2q give |z| = |q| or 2|q| exactly, as the degenerate rules need.
inline float dot(const float* a, const float* b, int64_t D) {
  float s[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    for (int j = 0; j < 8; ++j) s[j] += a[d + j] * b[d + j];
  }
  for (int j = 0; d + j < D; ++j) s[j] += a[d + j] * b[d + j];
  return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
}

// The per-row statistics of kernels/quantize.py's forward. e is a scratch row of D floats.
// Divisors are replaced by 1 where they are 0, so that no inf/NaN is ever formed.
inline void row_stats(const float* z, const float* q, float* e, int64_t D, int mode, float* out) {
  const float inf = std::numeric_limits<float>::infinity();
  const float nz = std::sqrt(dot(z, z, D));
  const float nq = std::sqrt(dot(q, q, D));
  float scale = nq / (nz > 0.f ? nz : 1.f);
  bool ok = nz > 0.f && nq > 0.f && nz < inf && scale < inf;
  float inv_z = ok ? 1.f / nz : 0.f;
  float inv_q = ok ? 1.f / nq : 0.f;
  const float sign = mode == kRotation ? 1.f : -1.f;
  for (int64_t d = 0; d < D; ++d) e[d] = z[d] * inv_z + sign * (q[d] * inv_q);
  const float e2 = dot(e, e, D);
  // Below float32's smallest normal e counts as 0 (fastvq/reference/quantize.py says why).
  const bool e_ok = e2 >= std::numeric_limits<float>::min();
  if (mode == kRotation && !e_ok) {
    ok = false;  // z^ = -q^: the rotation is not unique; the row falls back to STE
    inv_z = inv_q = 0.f;
  }
  out[0] = ok ? scale : 1.f;
  out[1] = inv_z;
  out[2] = inv_q;
  out[3] = ok && e_ok ? 2.f / e2 : 0.f;
}

// dz = s (g - w (e.g) e [+ 2 (q^.g) z^]) for one row; buf holds 2 D floats of scratch.
inline void row_dz(const float* g, const float* z, const float* q, const float* st, float* buf,
                   int64_t D, int mode, float* dz) {
  const float scale = st[0], inv_z = st[1], inv_q = st[2], w = st[3];
  float* zs = buf;
  float* e = buf + D;
  const float sign = mode == kRotation ? 1.f : -1.f;
  for (int64_t d = 0; d < D; ++d) {
    zs[d] = z[d] * inv_z;
    e[d] = zs[d] + sign * (q[d] * inv_q);
  }
  const float wp = w * dot(e, g, D);
  // A fallback row (inv_q = 0) whose q.g overflows: 0, not inf * 0 = NaN.
  const float qg2 = mode == kRotation && inv_q > 0.f ? 2.f * (dot(q, g, D) * inv_q) : 0.f;
  for (int64_t d = 0; d < D; ++d) dz[d] = scale * ((g[d] - wp * e[d]) + qg2 * zs[d]);
}

template <class T>
void fwd_kernel(const T* z, const T* cb, const int64_t* idx, int64_t N, int64_t D, int mode,
                T* zq, float* stats) {
  const int64_t grain = std::max<int64_t>(1, kGrainElements / D);
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    std::vector<float> buf(mode == kSte ? 0 : 3 * D);
    for (int64_t n = n0; n < n1; ++n) {
      const T* q = cb + idx[n] * D;
      std::memcpy(zq + n * D, q, sizeof(T) * D);
      if (mode == kSte) continue;
      cpu::load_row(z + n * D, buf.data(), D);
      cpu::load_row(q, buf.data() + D, D);
      row_stats(buf.data(), buf.data() + D, buf.data() + 2 * D, D, mode, stats + 4 * n);
    }
  });
}

// One row of the backward: dz (if dz != nullptr) from g, z and q.
template <class T>
inline void bwd_row(const T* g, const T* z, const T* cb, const int64_t* idx, const float* stats,
                    int64_t n, int64_t D, int mode, T* dz, float* buf) {
  float* gf = buf;
  float* zf = buf + D;
  float* qf = buf + 2 * D;
  float* out = buf + 3 * D;
  cpu::load_row(g + n * D, gf, D);
  cpu::load_row(z + n * D, zf, D);
  cpu::load_row(cb + idx[n] * D, qf, D);
  row_dz(gf, zf, qf, stats + 4 * n, buf + 4 * D, D, mode, out);
  cpu::store_row(out, dz + n * D, D);
}

template <class T>
void bwd_kernel(const T* g, const T* z, const T* cb, const int64_t* idx, const float* stats,
                int64_t N, int64_t K, int64_t D, int mode, T* dz, T* dc) {
  if (dc == nullptr) {  // z only: rows in parallel
    const int64_t grain = std::max<int64_t>(1, kGrainElements / D);
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      std::vector<float> buf(6 * D);
      for (int64_t n = n0; n < n1; ++n) bwd_row(g, z, cb, idx, stats, n, D, mode, dz, buf.data());
    });
    return;
  }
  // The codebook gradient by code ownership; the owner of a row's code also writes its dz, so g
  // is read once for both.
  const auto bounds = cpu::code_ranges(kBwd, idx, N, K, at::get_num_threads());
  cpu::for_each_code_range(bounds, [&](int64_t k0, int64_t k1) {
    std::vector<float> acc((k1 - k0) * D, 0.f);
    std::vector<float> buf(6 * D);
    const uint64_t span = static_cast<uint64_t>(k1 - k0);
    for (int64_t n = 0; n < N; ++n) {
      const uint64_t j = static_cast<uint64_t>(idx[n] - k0);
      if (j >= span) continue;
      float* a = acc.data() + j * D;
      const T* gr = g + n * D;
      for (int64_t d = 0; d < D; ++d) a[d] += static_cast<float>(gr[d]);
      if (dz != nullptr) bwd_row(g, z, cb, idx, stats, n, D, mode, dz, buf.data());
    }
    cpu::store_row(acc.data(), dc + k0 * D, (k1 - k0) * D);
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_fwd_cpu(const at::Tensor& z, const at::Tensor& codebook,
                                                    const at::Tensor& indices,
                                                    c10::string_view grad) {
  const int mode = parse_mode(kFwd, grad);
  TORCH_CHECK_VALUE(z.device().is_cpu(), kFwd, ": z must be a CPU tensor, got ", z.device());
  checks::quantize_fwd_args(kFwd, z, codebook, indices);
  const int64_t N = z.size(0), K = codebook.size(0), D = z.size(1);
  at::Tensor zq = at::empty({N, D}, codebook.options());
  at::Tensor stats = at::empty({N, mode == kSte ? 0 : 4}, z.options().dtype(at::kFloat));
  if (N == 0) return {zq, stats};
  const int64_t* idx = indices.const_data_ptr<int64_t>();
  // Checked before any row is read: the gather must not leave the codebook.
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK_VALUE(idx[n] >= 0 && idx[n] < K, kFwd, ": indices must lie in [0, ", K,
                "), got indices[", n, "] = ", idx[n]);
  }
  FASTVQ_DISPATCH_KERNEL_DTYPES(z.scalar_type(), "quantize_fwd", [&] {
    fwd_kernel<scalar_t>(z.const_data_ptr<scalar_t>(), codebook.const_data_ptr<scalar_t>(), idx, N,
                         D, mode, zq.mutable_data_ptr<scalar_t>(),
                         mode == kSte ? nullptr : stats.mutable_data_ptr<float>());
  });
  return {zq, stats};
}

std::tuple<at::Tensor, at::Tensor> quantize_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& z,
                                                    const at::Tensor& codebook,
                                                    const at::Tensor& indices,
                                                    const at::Tensor& stats, c10::string_view grad,
                                                    bool need_z, bool need_codebook) {
  const int mode = parse_mode(kBwd, grad);
  TORCH_CHECK_VALUE(z.device().is_cpu(), kBwd, ": z must be a CPU tensor, got ", z.device());
  checks::quantize_bwd_args(kBwd, grad_out, z, codebook, indices, stats, need_z, mode == kSte);
  const int64_t N = z.size(0), K = codebook.size(0), D = z.size(1);
  at::Tensor dz = at::empty({need_z ? N : 0, D}, z.options());
  at::Tensor dc = at::empty({need_codebook ? K : 0, D}, codebook.options());
  if (!need_z && !need_codebook) return {dz, dc};
  if (N == 0) {
    dc.zero_();
    return {dz, dc};
  }
  const int64_t* idx = indices.const_data_ptr<int64_t>();
  if (!need_codebook) {  // code_ranges checks the indices otherwise
    for (int64_t n = 0; n < N; ++n) {
      TORCH_CHECK_VALUE(idx[n] >= 0 && idx[n] < K, kBwd, ": indices must lie in [0, ", K,
                  "), got indices[", n, "] = ", idx[n]);
    }
  }
  FASTVQ_DISPATCH_KERNEL_DTYPES(z.scalar_type(), "quantize_bwd", [&] {
    bwd_kernel<scalar_t>(grad_out.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(),
                         codebook.const_data_ptr<scalar_t>(), idx,
                         need_z ? stats.const_data_ptr<float>() : nullptr, N, K, D, mode,
                         need_z ? dz.mutable_data_ptr<scalar_t>() : nullptr,
                         need_codebook ? dc.mutable_data_ptr<scalar_t>() : nullptr);
  });
  return {dz, dc};
}

}  // namespace
}  // namespace fastvq

TORCH_LIBRARY_IMPL(fastvq, CPU, m) {
  m.impl("quantize_fwd_cpp", &fastvq::quantize_fwd_cpu);
  m.impl("quantize_bwd_cpp", &fastvq::quantize_bwd_cpu);
}

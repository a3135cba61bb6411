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
#include <vector>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#include "../checks.h"
#include "by_code.h"

namespace fastvq {
namespace {

// Elements per tile, and the largest D (FSQ's int64 indices and LFQ / BSQ's bit masks allow at most
// 62; the entropy terms take up to 1024, as the Triton kernels do).
constexpr int64_t kTile = 1024;
constexpr int64_t kGrainElements = 1 << 14;  // elements per parallel task
constexpr int kMaxBits = 62;                // LFQ / BSQ indices are int64 bit masks

// --- vectorizable float32 math ------------------------------------------------------------------

// Round to nearest, ties to even, for |x| < 2^22, as torch.round and Triton's _round_half_even:
// adding and subtracting 1.5 * 2^23 leaves the rounded value (FE_TONEAREST). NaN stays NaN.
inline float round_half_even(float x) {
  constexpr float kMagic = 12582912.f;
  return (x + kMagic) - kMagic;
}

// exp(x) for x <= 0 to about 1 ulp, 0 below -80 (e^-80 < 2e-35, under the float32 rounding of
// anything it is added to): x = n ln2 + r, |r| <= ln2 / 2, exp(r) by Cephes' degree-7 minimax
// polynomial, 2^n (n >= -116) from the exponent bits. NaN passes through.
inline float exp_nonpositive(float x) {
  const float xc = x > -80.f ? x : -80.f;
  const float n = round_half_even(xc * 1.44269504088896341f);
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  const float y = p * scale;
  return x >= -80.f ? y : (x < -80.f ? 0.f : x);
}

// log(1 + e) for e in [0, 1], to a few ulps and without cancellation at small e:
// 2 atanh(s) = 2 s (1 + s^2/3 + ... + s^12/13), s = e / (2 + e) <= 1/3, in Estrin's form (a short
// dependency chain); the first omitted term is below 2^-26 relative. Below s = 2^-15 the series
// is 1 in float32: evaluating it at max(s, 2^-15) keeps its powers from underflowing.
inline float log1p_unit(float e) {
  const float s = e / (2.f + e);
  const float sc = s > 0x1p-15f ? s : 0x1p-15f;
  const float s2 = sc * sc, s4 = s2 * s2;
  const float lo = (1.f + s2 * (1.f / 3.f)) + s4 * (1.f / 5.f + s2 * (1.f / 7.f));
  const float hi = (1.f / 9.f + s2 * (1.f / 11.f)) + s4 * (1.f / 13.f);
  return 2.f * s * (lo + (s4 * s4) * hi);
}

// e = exp(-2|v|) in (0, 1]: tanh(v) and 1 - tanh(v)^2 without overflow.
inline float tanh_of(float v, float e) {
  const float t = (1.f - e) / (1.f + e);
  return v < 0.f ? -t : t;
}

inline float slope_of(float e) { return 4.f * e / ((1.f + e) * (1.f + e)); }

// 1 / |row|, 0 for a zero (or infinite) norm, as kernels/scalar.py's _inv_norm.
inline float inv_norm(const float* x, int64_t D) {
  float s = 0.f;
  for (int64_t d = 0; d < D; ++d) s += x[d] * x[d];
  const float norm = std::sqrt(s);
  return norm > 0.f ? 1.f / norm : 0.f;
}

// Flush-to-zero for the current thread while a task runs, restored after. Vectorized code
// evaluates both sides of every select, so saturated lanes form products like e^2 ~ 1e-70 that
// underflow; each underflowing vector instruction costs x86 cores a ~100-cycle microcode assist
// (measured: the entropy forward 1.8x slower at inv_temperature = 100 than at 1). Results are
// unchanged beyond values below 2^-126. Inputs keep their subnormals (no DAZ), so signs and
// comparisons of tiny inputs stay exact.
class FlushToZero {
#if defined(__SSE__)
 public:
  FlushToZero() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | _MM_FLUSH_ZERO_ON); }
  ~FlushToZero() { _mm_setcsr(saved_); }

 private:
  unsigned int saved_;
#endif
};

// --- tiling -------------------------------------------------------------------------------------

struct Tiles {
  int64_t rows;   // rows per tile
  int64_t count;  // tiles
  int64_t grain;  // tiles per parallel task
};

Tiles tiles_for(int64_t N, int64_t D) {
  const int64_t rows = std::max<int64_t>(1, kTile / D);
  const int64_t count = (N + rows - 1) / rows;
  return {rows, count, std::max<int64_t>(1, kGrainElements / (rows * D))};
}

// Runs fn(tile, n0, n1) for the rows [n0, n1) of every tile, tiles in parallel.
template <class Fn>
void for_each_tile(int64_t N, int64_t D, const Fn& fn) {
  const Tiles t = tiles_for(N, D);
  at::parallel_for(0, t.count, t.grain, [&](int64_t t0, int64_t t1) {
    FlushToZero ftz;
    for (int64_t i = t0; i < t1; ++i) fn(i, i * t.rows, std::min(N, (i + 1) * t.rows));
  });
}

// Row r of params (P, D) repeated to fill a tile: out[i] = params[r][i % D], i < rows * D.
std::vector<float> expand(const float* params, int64_t r, int64_t D, int64_t rows) {
  std::vector<float> out(rows * D);
  for (int64_t i = 0; i < rows * D; ++i) out[i] = params[r * D + i % D];
  return out;
}

using Buffer = std::array<float, kTile>;

// --- FSQ ----------------------------------------------------------------------------------------

// params (6, D) float32 rows: shift, h, offset, L // 2, L - 1 - L // 2, gain = h / (L // 2).
enum Param { kShift = 0, kHalfL, kOffset, kHalfWidth, kTop, kGain };

template <class T>
void fsq_fwd_kernel(const T* z, const float* params, const int64_t* basis, int64_t N, int64_t D,
                    T* codes, int64_t* idx) {
  const int64_t R = tiles_for(N, D).rows;
  const auto shift = expand(params, kShift, D, R), half_l = expand(params, kHalfL, D, R),
             offset = expand(params, kOffset, D, R), half_width = expand(params, kHalfWidth, D, R),
             top = expand(params, kTop, D, R);
  for_each_tile(N, D, [&](int64_t, int64_t n0, int64_t n1) {
    Buffer x, digit;
    const int64_t m = (n1 - n0) * D;
    cpu::load_row(z + n0 * D, x.data(), m);
    for (int64_t i = 0; i < m; ++i) {
      const float v = x[i] + shift[i];
      const float t = tanh_of(v, exp_nonpositive(-2.f * std::abs(v)));
      float r = round_half_even(t * half_l[i] - offset[i]);
      r = r == r ? r : 0.f;  // NaN -> level 0
      r = std::min(std::max(r, -half_width[i]), top[i]);
      x[i] = r / half_width[i];
      digit[i] = r + half_width[i];
    }
    cpu::store_row(x.data(), codes + n0 * D, m);
    for (int64_t n = n0; n < n1; ++n) {
      const float* dg = digit.data() + (n - n0) * D;
      int64_t s = 0;
      for (int64_t d = 0; d < D; ++d) s += static_cast<int64_t>(dg[d]) * basis[d];
      idx[n] = s;
    }
  });
}

template <class T>
void fsq_bwd_kernel(const T* g, const T* z, const float* params, int64_t N, int64_t D, T* dz) {
  const int64_t R = tiles_for(N, D).rows;
  const auto shift = expand(params, kShift, D, R), gain = expand(params, kGain, D, R);
  for_each_tile(N, D, [&](int64_t, int64_t n0, int64_t n1) {
    Buffer x, gf;
    const int64_t m = (n1 - n0) * D;
    cpu::load_row(z + n0 * D, x.data(), m);
    cpu::load_row(g + n0 * D, gf.data(), m);
    for (int64_t i = 0; i < m; ++i) {
      const float v = x[i] + shift[i];
      x[i] = gf[i] * slope_of(exp_nonpositive(-2.f * std::abs(v))) * gain[i];
    }
    cpu::store_row(x.data(), dz + n0 * D, m);
  });
}

// --- LFQ / BSQ ----------------------------------------------------------------------------------

template <class T>
void sign_fwd_kernel(const T* z, float scale, int64_t N, int64_t D, T* codes, int64_t* idx) {
  for_each_tile(N, D, [&](int64_t, int64_t n0, int64_t n1) {
    Buffer x;
    const int64_t m = (n1 - n0) * D;
    cpu::load_row(z + n0 * D, x.data(), m);
    for (int64_t i = 0; i < m; ++i) x[i] = x[i] >= 0.f ? scale : -scale;  // NaN -> -scale
    cpu::store_row(x.data(), codes + n0 * D, m);
    for (int64_t n = 0; n < n1 - n0; ++n) {
      int64_t bits = 0;
      for (int64_t d = 0; d < D; ++d) bits |= static_cast<int64_t>(x[n * D + d] > 0.f) << d;
      idx[n0 + n] = bits;
    }
  });
}

// dz = (g - u (u . g)) / |z|, u = z / |z|; 0 for a zero row.
template <class T>
void bsq_bwd_kernel(const T* g, const T* z, int64_t N, int64_t D, T* dz) {
  for_each_tile(N, D, [&](int64_t, int64_t n0, int64_t n1) {
    Buffer x, gf;
    const int64_t m = (n1 - n0) * D;
    cpu::load_row(z + n0 * D, x.data(), m);
    cpu::load_row(g + n0 * D, gf.data(), m);
    for (int64_t n = 0; n < n1 - n0; ++n) {
      float* u = x.data() + n * D;
      const float* gr = gf.data() + n * D;
      const float inv = inv_norm(u, D);
      float ug = 0.f;
      for (int64_t d = 0; d < D; ++d) {
        u[d] *= inv;
        ug += u[d] * gr[d];
      }
      for (int64_t d = 0; d < D; ++d) u[d] = (gr[d] - u[d] * ug) * inv;
    }
    cpu::store_row(x.data(), dz + n0 * D, m);
  });
}

// --- factorized binary entropy ------------------------------------------------------------------

// x = z (or z / |z| per row when spherical) of a tile, in place; inv (rows,) gets 1 / |z|.
inline void normalize_rows(float* x, float* inv, int64_t rows, int64_t D) {
  for (int64_t n = 0; n < rows; ++n) {
    inv[n] = inv_norm(x + n * D, D);
    for (int64_t d = 0; d < D; ++d) x[n * D + d] *= inv[n];
  }
}

template <class T>
void entropy_fwd_kernel(const T* z, float coef, bool spherical, int64_t N, int64_t D, float* rows,
                        float* cols) {
  const Tiles t = tiles_for(N, D);
  std::vector<float> partial(t.count * 2 * D);  // per tile: sums of p(+), then of p(-)
  for_each_tile(N, D, [&](int64_t tile, int64_t n0, int64_t n1) {
    Buffer x, h, plus, minus, inv;
    const int64_t m = (n1 - n0) * D;
    cpu::load_row(z + n0 * D, x.data(), m);
    if (spherical) normalize_rows(x.data(), inv.data(), n1 - n0, D);
    for (int64_t i = 0; i < m; ++i) {
      const float a = coef * x[i];
      const float e = exp_nonpositive(-std::abs(a));
      const float p_hi = 1.f / (1.f + e), p_lo = e * p_hi;
      h[i] = log1p_unit(e) + std::abs(a) * e * p_hi;
      plus[i] = a >= 0.f ? p_hi : p_lo;
      minus[i] = a >= 0.f ? p_lo : p_hi;
    }
    float* part = partial.data() + tile * 2 * D;
    for (int64_t d = 0; d < 2 * D; ++d) part[d] = 0.f;
    for (int64_t n = 0; n < n1 - n0; ++n) {
      float s = 0.f;
      for (int64_t d = 0; d < D; ++d) {
        s += h[n * D + d];
        part[d] += plus[n * D + d];
        part[D + d] += minus[n * D + d];
      }
      rows[n0 + n] = s;
    }
  });
  std::vector<double> acc(2 * D, 0.0);
  for (int64_t tile = 0; tile < t.count; ++tile) {
    for (int64_t d = 0; d < 2 * D; ++d) acc[d] += partial[tile * 2 * D + d];
  }
  for (int64_t d = 0; d < 2 * D; ++d) cols[d] = static_cast<float>(acc[d]);
}

// dx = coef p(1 - p) ((g_col[0] - g_col[1]) - a g_row), pulled back through z / |z| if spherical.
template <class T>
void entropy_bwd_kernel(const float* g_row, const float* g_col, const T* z, float coef,
                        bool spherical, int64_t N, int64_t D, T* dz) {
  const int64_t R = tiles_for(N, D).rows;
  std::vector<float> g_diff(R * D);
  for (int64_t i = 0; i < R * D; ++i) g_diff[i] = g_col[i % D] - g_col[D + i % D];
  for_each_tile(N, D, [&](int64_t, int64_t n0, int64_t n1) {
    Buffer x, dx, gr, inv;
    const int64_t m = (n1 - n0) * D;
    cpu::load_row(z + n0 * D, x.data(), m);
    if (spherical) normalize_rows(x.data(), inv.data(), n1 - n0, D);
    for (int64_t n = 0; n < n1 - n0; ++n) std::fill_n(gr.data() + n * D, D, g_row[n0 + n]);
    for (int64_t i = 0; i < m; ++i) {
      const float a = coef * x[i];
      const float e = exp_nonpositive(-std::abs(a));
      const float w = e / ((1.f + e) * (1.f + e));
      dx[i] = coef * w * (g_diff[i] - a * gr[i]);
    }
    if (spherical) {
      for (int64_t n = 0; n < n1 - n0; ++n) {
        const float* u = x.data() + n * D;
        float* v = dx.data() + n * D;
        float uv = 0.f;
        for (int64_t d = 0; d < D; ++d) uv += u[d] * v[d];
        for (int64_t d = 0; d < D; ++d) v[d] = (v[d] - u[d] * uv) * inv[n];
      }
    }
    cpu::store_row(dx.data(), dz + n0 * D, m);
  });
}

// --- glue ---------------------------------------------------------------------------------------

// z (N, D) on the CPU, a kernel dtype, contiguous, 1 <= D <= max_dim.
void check_z(const char* op, const at::Tensor& z, int64_t max_dim) {
  TORCH_CHECK(z.device().is_cpu(), op, ": z must be a CPU tensor, got ", z.device());
  TORCH_CHECK(z.dim() == 2 && z.size(1) >= 1 && z.size(1) <= max_dim, op,
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
    fsq_fwd_kernel<scalar_t>(z.const_data_ptr<scalar_t>(), params.const_data_ptr<float>(),
                             basis.const_data_ptr<int64_t>(), N, D,
                             codes.mutable_data_ptr<scalar_t>(), idx.mutable_data_ptr<int64_t>());
  });
  return {codes, idx};
}

at::Tensor fsq_bwd_cpu(const at::Tensor& grad_codes, const at::Tensor& z, const at::Tensor& params) {
  constexpr const char* op = "fastvq::fsq_bwd_cpp";
  check_z(op, z, kTile);
  check_grad(op, grad_codes, z);
  check_params(op, params, z);
  at::Tensor dz = at::empty_like(z);
  FASTVQ_DISPATCH_KERNEL_DTYPES(z.scalar_type(), "fsq_bwd", [&] {
    fsq_bwd_kernel<scalar_t>(grad_codes.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(),
                             params.const_data_ptr<float>(), z.size(0), z.size(1),
                             dz.mutable_data_ptr<scalar_t>());
  });
  return dz;
}

std::tuple<at::Tensor, at::Tensor> sign_fwd_cpu(const at::Tensor& z, double scale) {
  constexpr const char* op = "fastvq::sign_fwd_cpp";
  check_z(op, z, kMaxBits);
  at::Tensor codes = at::empty_like(z);
  at::Tensor idx = at::empty({z.size(0)}, z.options().dtype(at::kLong));
  FASTVQ_DISPATCH_KERNEL_DTYPES(z.scalar_type(), "sign_fwd", [&] {
    sign_fwd_kernel<scalar_t>(z.const_data_ptr<scalar_t>(), static_cast<float>(scale), z.size(0),
                              z.size(1), codes.mutable_data_ptr<scalar_t>(),
                              idx.mutable_data_ptr<int64_t>());
  });
  return {codes, idx};
}

at::Tensor bsq_bwd_cpu(const at::Tensor& grad_codes, const at::Tensor& z) {
  constexpr const char* op = "fastvq::bsq_bwd_cpp";
  check_z(op, z, kMaxBits);
  check_grad(op, grad_codes, z);
  at::Tensor dz = at::empty_like(z);
  FASTVQ_DISPATCH_KERNEL_DTYPES(z.scalar_type(), "bsq_bwd", [&] {
    bsq_bwd_kernel<scalar_t>(grad_codes.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(),
                             z.size(0), z.size(1), dz.mutable_data_ptr<scalar_t>());
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
    entropy_fwd_kernel<scalar_t>(z.const_data_ptr<scalar_t>(), static_cast<float>(coef),
                                 spherical, N, D, rows.mutable_data_ptr<float>(),
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
    entropy_bwd_kernel<scalar_t>(grad_rows.const_data_ptr<float>(),
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

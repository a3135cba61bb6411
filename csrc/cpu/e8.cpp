// CPU kernels of fastvq::e8_shell_decode: the canonical index of the E8 minimal vector (240 codes,
// fastvq/lattice/e8.py) of largest inner product with each row of z (N, 8); and of
// fastvq::e8_nearest, the nearest point of the lattice itself (below, after the shell decoder).
//
// The decoder of fastvq/lattice/e8.py (_decode) with the same arithmetic, score for score, so the
// indices equal the torch path's bit for bit (ties included). Against the doubled codes:
//   - pair shape (+-2, +-2, 0^6): 2 (|z_i| + |z_j|) at the two largest |z| (first of equals);
//   - half-integer shape (+-1)^8, even minus count: sum |z| as the tree
//     ((u0 + u1) + (u2 + u3)) + ((u4 + u5) + (u6 + u7)), less 2 min |z| if z has an odd number of
//     minus signs (one sign must flip, at a least |z|, chosen as leech::even_sign_rank does).
//   About 150 instructions per row, branch-free, against 240 x 8 multiply-adds for brute force.
//   Instruction bound: 41 ns per row on one core of the 2-core EPYC dev box (2.7 ms for
//   N = 65,536, whose 2 MiB of input stream in a fraction of that); 1.6 ms on both cores.
// Ties go to the lowest index (the pair shape on equal scores); a row with NaN or Inf gets 0; a row
// beyond 2^64 is scaled first (leech::row_scale). Scores in float32 for float32, float16 and
// bfloat16 inputs (half inputs widen exactly), in float64 for float64. Threads: at::parallel_for
// over rows, every row the same serial code, so results do not depend on the thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "../leech_decode.h"
#include "isa.h"
#include "shell_rows.h"

namespace fastvq {
namespace {

constexpr int64_t kStart2 = 112;  // 28 pairs x 4 signs

template <typename T>
T max_of(T a, T b) {
  return a < b ? b : a;
}

// reverse7[m]: bit 6 - k set for each bit k of the 7-bit m. The rank of a sign pattern is the
// reversal of its minus mask on slots 0..6 (slot 0 is the most significant bit).
struct Reverse7 {
  uint8_t r[128];
  constexpr Reverse7() : r() {
    for (int m = 0; m < 128; ++m) {
      for (int k = 0; k < 7; ++k) r[m] |= ((m >> k) & 1) << (6 - k);
    }
  }
};
constexpr Reverse7 kReverse7;

// Branch-free but for the NaN / Inf test (the ternaries compile to selects): on random rows the
// shape, the argmax positions and the flipped sign are unpredictable, and a mispredicted branch
// costs about as much as the whole row (a branchy first version took 86 ns per row, this one 41).
template <typename T>
int64_t decode_row(const T* z) {
  T u[8];
  uint32_t neg = 0;
  bool finite = true;
  for (int p = 0; p < 8; ++p) {
    u[p] = std::abs(z[p]);
    finite &= u[p] <= std::numeric_limits<T>::max();  // false for NaN and Inf
    neg |= static_cast<uint32_t>(z[p] < 0) << p;
  }
  if (!finite) return 0;
  // The two largest |z| (top2 == top1 on a tie) and the least. min_of / max_of on values:
  // std::min / std::max return references, which GCC turned into branches here.
  T top1 = u[0], top2 = 0, least = u[0];
  for (int p = 1; p < 8; ++p) {
    top2 = max_of(top2, leech::min_of(top1, u[p]));
    top1 = max_of(top1, u[p]);
    least = leech::min_of(least, u[p]);
  }
  uint32_t at_top1 = 0, at_top2 = 0, at_least = 0;
  for (int p = 0; p < 8; ++p) {
    at_top1 |= static_cast<uint32_t>(u[p] == top1) << p;
    at_top2 |= static_cast<uint32_t>(u[p] == top2) << p;
    at_least |= static_cast<uint32_t>(u[p] == least) << p;
  }
  const int i = __builtin_ctz(at_top1);               // the first largest |z|
  const int j = __builtin_ctz(at_top2 & ~(1u << i));  // the first largest of the others
  const int64_t index1 = leech::pair_index<8>(z, i, j);

  // Half-integer shape: sign(z); an odd minus count flips one least |z| (_common.best_even_signs),
  // the one of least key: k for a minus at slot k < 7, 8 for slot 7, 22 - k for a plus at k < 7.
  const uint32_t odd = __builtin_popcount(neg) & 1u;
  const uint32_t keys = (at_least & neg & 0x7fu) | ((at_least & 0x80u) << 1) |
                        (static_cast<uint32_t>(kReverse7.r[at_least & ~neg & 0x7fu]) << 16);
  const int key = __builtin_ctz(keys);  // keys != 0: some |z| is the least
  const int flip = key < 7 ? key : (key == 8 ? 7 : 22 - key);
  const int64_t index2 = kStart2 + kReverse7.r[(neg ^ (odd << flip)) & 0x7fu];

  const T total = ((u[0] + u[1]) + (u[2] + u[3])) + ((u[4] + u[5]) + (u[6] + u[7]));
  const T score2 = odd ? total - 2 * least : total;
  // >= keeps the pair shape (the lower indices) on equal scores.
  return 2 * (top1 + top2) >= score2 ? index1 : index2;
}

at::Tensor e8_shell_decode_cpu(const at::Tensor& z) {
  // ~150 instructions per row: 2,048 rows (64 KiB of float32 input) amortise a task.
  return decode_shell_rows<8>("fastvq::e8_shell_decode", z, 2048,
                              [](const auto* rows, int m, int64_t* out) {
                                for (int r = 0; r < m; ++r) out[r] = decode_row(rows[r]);
                              });
}

// --- e8_nearest ---------------------------------------------------------------------------------
//
// The nearest E8 point to each row of x (N, 8): fastvq/lattice/e8.py _nearest, op for op, so the
// points equal the torch path's bit for bit (-0 included). For y (float32; float64 for float64):
//   p0 = nearest D8 point of y, p1 = nearest D8 point of y - 1/2, plus 1/2; nearest D8 point of v:
//   f = round(v) (ties to even), the parity of the count of odd f, and if odd, the first coordinate
//   of largest |v - f| moved by +1 (v - f >= 0) or -1; p1 wins if its squared distance is less,
//   each distance the tree ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7)) of squares rounded
//   once. A row with NaN or Inf: round(y).
// Rows are widened into tiles of kNearestTile rows, one array per coordinate, so that every step
// is elementwise over the rows of a tile and branch-free (selects): GCC vectorizes the row loop
// (scalar code would take about 40 data-dependent branches per row: the argmax, the parity, the
// winner). round() is (|v| + 2^p) - 2^p with v's sign (p = 23, 52 for double) below 2^p, v itself
// above (an integer, or Inf / NaN): torch.round's value and sign, in SSE2 as in AVX2.
// Compiled twice, as scalar.cpp's kernels: SSE2 (4 float lanes) and AVX2 (8 lanes, one-instruction
// selects), picked at run time; neither contracts to FMA, so both return the same bits (tested).
// N = 65,536 float32 rows on the 2-core EPYC dev box: one core 2.4 ms with SSE2, 0.95 ms with AVX2;
// both cores 0.5-0.75 ms (a noisy shared box), against 9-15 ms for the torch path.

constexpr int64_t kNearestTile = 256;

template <typename T>
struct Magic;
template <>
struct Magic<float> {
  static constexpr float kRound = 0x1p23f;   // ulp 1 from here: |v| < kRound rounds on adding it
  static constexpr float kParity = 0x1p24f;  // ulp 2 from here: every value is even
};
template <>
struct Magic<double> {
  static constexpr double kRound = 0x1p52;
  static constexpr double kParity = 0x1p53;
};

#define FASTVQ_INLINE inline __attribute__((always_inline))

// torch.round(v): to nearest, ties to even; [-0.5, -0] gives -0; Inf and NaN pass.
template <typename T>
FASTVQ_INLINE T round_half_even(T v) {
  const T a = std::abs(v);
  const T r = (a + Magic<T>::kRound) - Magic<T>::kRound;
  return std::copysign(a < Magic<T>::kRound ? r : a, v);
}

// 1 if the integer-valued f is odd, else 0 (exact: below kParity, adding it rounds odd values to
// even, i.e. changes them; from kParity up every value is even).
template <typename T>
FASTVQ_INLINE T odd_of(T f) {
  const T a = std::abs(f);
  return a < Magic<T>::kParity && (a + Magic<T>::kParity) - Magic<T>::kParity != a ? T(1) : T(0);
}

// The nearest D8 point p of v (one row's coordinates), _nearest_d8; f = round(v).
template <typename T>
FASTVQ_INLINE void nearest_d8(const T (&v)[8], T (&p)[8], T (&f)[8]) {
  T best = -1, err_k = 0, k = 0, odd = 0;  // best < every |err|: coordinate 0 starts the argmax
#pragma GCC unroll 8
  for (int c = 0; c < 8; ++c) {
    f[c] = round_half_even(v[c]);
    const T err = v[c] - f[c];
    const T a = std::abs(err);
    // Strictly larger: the first of equal maxima. Every value, masks included, has T's width (k
    // too), and no bool is kept: GCC vectorizes the row loop only then.
    err_k = a > best ? err : err_k;
    k = a > best ? T(c) : k;
    best = a > best ? a : best;
    odd = odd_of(f[c]) != 0 ? T(1) - odd : odd;
  }
  const T step = err_k >= 0 ? T(1) : T(-1);
  k = odd != 0 ? k : T(-1);  // no coordinate moves on an even sum
#pragma GCC unroll 8
  for (int c = 0; c < 8; ++c) p[c] = k == T(c) ? f[c] + step : f[c];
}

template <typename T>
FASTVQ_INLINE T squared_distance(const T (&y)[8], const T (&p)[8]) {
  T s[8];
#pragma GCC unroll 8
  for (int c = 0; c < 8; ++c) s[c] = (y[c] - p[c]) * (y[c] - p[c]);
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

// out[c][r] = the nearest E8 point to row r of y[c][r], r < m. Inlined into the two builds below.
template <typename T>
FASTVQ_INLINE void nearest_tile(const T (*__restrict y)[kNearestTile],
                                T (*__restrict out)[kNearestTile], int64_t m) {
  for (int64_t r = 0; r < m; ++r) {
    T v[8], f[8], p0[8], h[8], p1[8], unused[8];
    T finite = 1;
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c) {
      v[c] = y[c][r];
      h[c] = v[c] - T(0.5);
      finite = std::abs(v[c]) <= std::numeric_limits<T>::max() ? finite : T(0);  // NaN, Inf: 0
    }
    nearest_d8(v, p0, f);
    nearest_d8(h, p1, unused);
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c) p1[c] += T(0.5);
    const T d0 = squared_distance(v, p0);
    const T d1 = squared_distance(v, p1);
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c) {
      const T point = d1 < d0 ? p1[c] : p0[c];  // the D8 point on equal distance
      out[c][r] = finite != 0 ? point : f[c];
    }
  }
}

template <typename T>
void nearest_tile_baseline(const T (*y)[kNearestTile], T (*out)[kNearestTile], int64_t m) {
  nearest_tile<T>(y, out, m);
}

#if defined(FASTVQ_X86)
template <typename T>
__attribute__((target("avx2"))) void nearest_tile_avx2(const T (*y)[kNearestTile],
                                                       T (*out)[kNearestTile], int64_t m) {
  nearest_tile<T>(y, out, m);
}
#endif

template <typename T, typename In>
void nearest_rows(const In* x, In* out, int64_t n) {
#if defined(FASTVQ_X86)
  const bool avx2 = cpu::use_avx2(/*with_fma=*/false);
#endif
  // ~35 ns per row with SSE2, ~15 with AVX2: 2,048 rows (64 KiB of float32) amortise a task.
  at::parallel_for(0, n, 2048, [&](int64_t begin, int64_t end) {
    alignas(64) T y[8][kNearestTile];
    alignas(64) T p[8][kNearestTile];
    for (int64_t r0 = begin; r0 < end; r0 += kNearestTile) {
      const int64_t m = std::min(kNearestTile, end - r0);
      const In* xr = x + r0 * 8;
      for (int64_t r = 0; r < m; ++r) {
#pragma GCC unroll 8
        for (int c = 0; c < 8; ++c) y[c][r] = static_cast<T>(xr[r * 8 + c]);
      }
#if defined(FASTVQ_X86)
      if (avx2) {
        nearest_tile_avx2<T>(y, p, m);
      } else {
        nearest_tile_baseline<T>(y, p, m);
      }
#else
      nearest_tile_baseline<T>(y, p, m);
#endif
      In* o = out + r0 * 8;
      for (int64_t r = 0; r < m; ++r) {
#pragma GCC unroll 8
        for (int c = 0; c < 8; ++c) o[r * 8 + c] = static_cast<In>(p[c][r]);  // to nearest even
      }
    }
  });
}

at::Tensor e8_nearest_cpu(const at::Tensor& x) {
  const char* op = "fastvq::e8_nearest";
  TORCH_CHECK(x.device().is_cpu(), op, " (CPU): x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2 && x.size(1) == 8, op, ": x must have shape (N, 8), got ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  const int64_t n = x.size(0);
  at::Tensor out = at::empty({n, 8}, x.options());
  switch (x.scalar_type()) {
    case at::kFloat:
      nearest_rows<float>(x.const_data_ptr<float>(), out.mutable_data_ptr<float>(), n);
      break;
    case at::kDouble:
      nearest_rows<double>(x.const_data_ptr<double>(), out.mutable_data_ptr<double>(), n);
      break;
    case at::kHalf:
      nearest_rows<float>(x.const_data_ptr<c10::Half>(), out.mutable_data_ptr<c10::Half>(), n);
      break;
    case at::kBFloat16:
      nearest_rows<float>(x.const_data_ptr<c10::BFloat16>(), out.mutable_data_ptr<c10::BFloat16>(),
                          n);
      break;
    default:
      TORCH_CHECK(false, op, ": x must be float32, float64, float16 or bfloat16, got ",
                  x.scalar_type());
  }
  return out;
}

}  // namespace
}  // namespace fastvq

TORCH_LIBRARY_IMPL(fastvq, CPU, m) {
  m.impl("e8_shell_decode", &fastvq::e8_shell_decode_cpu);
  m.impl("e8_nearest", &fastvq::e8_nearest_cpu);
}

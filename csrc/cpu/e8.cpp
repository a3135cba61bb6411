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
//   About 150 operations per row, against 240 x 8 multiply-adds for brute force.
// Rows are decoded as e8_nearest's below are: tiles of kTileRows rows, one array per coordinate,
// every step a select over the rows of a tile (the argmax positions, the flipped sign and the
// winner too), so GCC vectorizes the row loop; SSE2 and AVX2 builds picked at run time. One core
// of a 2-core Intel Xeon dev box, N = 65,536 (thread CPU time, A/B in one session), ns per row:
// float32 19-21 with AVX2 and 32 with SSE2, against 43-45 for the branch-free row-at-a-time
// kernel this replaced (bit masks, ctz, a table); float64 38 with AVX2 (42-46 before) but 65 with
// SSE2 (45 before): two double lanes do not pay for the selects. Float32 is the common case (and
// float16 and bfloat16 decode in it).
// Ties go to the lowest index (the pair shape on equal scores); a row with NaN or Inf gets 0; a row
// beyond 2^64 is scaled first (leech::row_scale). Scores in float32 for float32, float16 and
// bfloat16 inputs (half inputs widen exactly), in float64 for float64. Threads: at::parallel_for
// over rows, every row the same arithmetic in any lane, so results do not depend on the thread
// count; neither build contracts to FMA (products here are by 2 or of small integers: exact).
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
#include <type_traits>

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

constexpr int64_t kTileRows = 256;  // rows per tile, both decoders

// Indices (as T, exact: below 240) of the rows y[p][r], r < m, of a tile, each row scaled by
// leech::row_scale first. Branch-free selects over the rows of the tile, every value (masks and
// positions too) of T's width, so that GCC vectorizes the row loop. Inlined into the two builds
// below.
template <typename T>
FASTVQ_INLINE void decode_block(const T (*__restrict y)[kTileRows], T* __restrict index,
                                int64_t m) {
  for (int64_t r = 0; r < m; ++r) {
    T v[8], u[8];
    T finite = 1, odd = 0, largest = 0;  // odd: the parity of the number of z < 0
#pragma GCC unroll 8
    for (int p = 0; p < 8; ++p) {
      v[p] = y[p][r];
      // NaN is dropped (such rows get index 0 anyway), as in shell_rows.h
      largest = largest < std::abs(v[p]) ? std::abs(v[p]) : largest;
    }
    const T scale = leech::row_scale(largest);
#pragma GCC unroll 8
    for (int p = 0; p < 8; ++p) {
      v[p] *= scale;
      u[p] = std::abs(v[p]);
      finite = u[p] <= std::numeric_limits<T>::max() ? finite : T(0);  // NaN, Inf: 0
      odd = v[p] < 0 ? T(1) - odd : odd;
    }
    // The two largest |z| (top2 == top1 on a tie) and the least.
    T top1 = u[0], top2 = 0, least = u[0];
#pragma GCC unroll 8
    for (int p = 1; p < 8; ++p) {
      top2 = max_of(top2, leech::min_of(top1, u[p]));
      top1 = max_of(top1, u[p]);
      least = leech::min_of(least, u[p]);
    }
    // Pair shape: i the first largest |z|, j the first largest of the others; the pair's index
    // as leech::pair_index<8>: pair (a, b), a < b, then the signs of z there.
    T i = 7, j = 7;
#pragma GCC unroll 8
    for (int p = 6; p >= 0; --p) i = u[p] == top1 ? T(p) : i;
#pragma GCC unroll 8
    for (int p = 7; p >= 0; --p) {
      const T others = T(p) == i ? T(-1) : u[p];  // -1: below every |z|
      j = others == top2 ? T(p) : j;
    }
    const T a = leech::min_of(i, j), b = max_of(i, j);
    T neg_a = 0, neg_b = 0;
#pragma GCC unroll 8
    for (int p = 0; p < 8; ++p) {
      const T minus = v[p] < 0 ? T(1) : T(0);
      neg_a = a == T(p) ? minus : neg_a;
      neg_b = b == T(p) ? minus : neg_b;
    }
    const T pair = a * 7 - a * (a - 1) / 2 + (b - a - 1);  // small integers: exact
    const T index1 = pair * 4 + 2 * neg_a + neg_b;

    // Half-integer shape: sign(z); an odd minus count flips one least |z|
    // (_common.best_even_signs), the one of least key: k for a minus at slot k < 7, 8 for slot 7,
    // 22 - k for a plus at k < 7. The rank of the signs is the minus mask on slots 0..6, slot 0
    // the most significant bit.
    T flip = 0, best_key = 100;
#pragma GCC unroll 8
    for (int p = 0; p < 8; ++p) {
      const T key = u[p] != least ? T(100) : p == 7 ? T(8) : v[p] < 0 ? T(p) : T(22 - p);
      flip = key < best_key ? T(p) : flip;
      best_key = key < best_key ? key : best_key;
    }
    T rank = 0;
#pragma GCC unroll 7
    for (int p = 0; p < 7; ++p) {
      const T minus = v[p] < 0 ? T(1) : T(0);
      const T flipped = flip == T(p) ? odd : T(0);
      rank = minus != flipped ? rank + T(1 << (6 - p)) : rank;
    }
    const T index2 = T(kStart2) + rank;

    const T total = ((u[0] + u[1]) + (u[2] + u[3])) + ((u[4] + u[5]) + (u[6] + u[7]));
    const T score2 = odd != 0 ? total - 2 * least : total;
    // >= keeps the pair shape (the lower indices) on equal scores.
    const T best = 2 * (top1 + top2) >= score2 ? index1 : index2;
    index[r] = finite != 0 ? best : T(0);
  }
}

template <typename T>
void decode_block_baseline(const T (*y)[kTileRows], T* index, int64_t m) {
  decode_block<T>(y, index, m);
}

#if defined(FASTVQ_X86)
template <typename T>
__attribute__((target("avx2"))) void decode_block_avx2(const T (*y)[kTileRows], T* index,
                                                       int64_t m) {
  decode_block<T>(y, index, m);
}
#endif

// --- e8_nearest ---------------------------------------------------------------------------------
//
// The nearest E8 point to each row of x (N, 8): fastvq/lattice/e8.py _nearest, op for op, so the
// points equal the torch path's bit for bit (-0 included). For y (float32; float64 for float64):
//   p0 = nearest D8 point of y, p1 = nearest D8 point of y - 1/2, plus 1/2; nearest D8 point of v:
//   f = round(v) (ties to even), the parity of the count of odd f, and if odd, the first coordinate
//   of largest |v - f| moved by +1 (v - f >= 0) or -1; p1 wins if its squared distance is less,
//   each distance the tree ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7)) of squares rounded
//   once. A row with NaN or Inf: round(y).
// Rows are widened into tiles of kTileRows rows, one array per coordinate (for_each_tile), so that
// every step is elementwise over the rows of a tile and branch-free (selects): GCC vectorizes the
// row loop (scalar code would take about 40 data-dependent branches per row: the argmax, the
// parity, the winner). round() is (|v| + 2^p) - 2^p with v's sign (p = 23, 52 for double) below
// 2^p, v itself above (an integer, or Inf / NaN): torch.round's value and sign, in SSE2 as in AVX2.
// Compiled twice, as scalar.cpp's kernels: SSE2 (4 float lanes) and AVX2 (8 lanes, one-instruction
// selects), picked at run time; neither contracts to FMA, so both return the same bits (tested).
// N = 65,536 float32 rows on the 2-core EPYC dev box: one core 2.4 ms with SSE2, 0.95 ms with AVX2;
// both cores 0.5-0.75 ms (a noisy shared box), against 9-15 ms for the torch path.

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
FASTVQ_INLINE void nearest_tile(const T (*__restrict y)[kTileRows],
                                T (*__restrict out)[kTileRows], int64_t m) {
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
void nearest_tile_baseline(const T (*y)[kTileRows], T (*out)[kTileRows], int64_t m) {
  nearest_tile<T>(y, out, m);
}

#if defined(FASTVQ_X86)
template <typename T>
__attribute__((target("avx2"))) void nearest_tile_avx2(const T (*y)[kTileRows],
                                                       T (*out)[kTileRows], int64_t m) {
  nearest_tile<T>(y, out, m);
}
#endif

// kernel_avx2(...) where the AVX2 build may run, else kernel_baseline(...).
#if defined(FASTVQ_X86)
#define FASTVQ_TILE_KERNEL(kernel, ...)                                                    \
  (cpu::use_avx2(/*with_fma=*/false) ? kernel##_avx2(__VA_ARGS__) : kernel##_baseline(__VA_ARGS__))
#else
#define FASTVQ_TILE_KERNEL(kernel, ...) kernel##_baseline(__VA_ARGS__)
#endif

// Both decoders: the rows of x (N, 8) widened to T into tiles of kTileRows rows, one array per
// coordinate (y[c][r]), handed to tile(y, r0, m) for rows r0 .. r0 + m; 2,048 rows (64 KiB of
// float32) per parallel task.
template <typename T, typename In, typename Tile>
void for_each_tile(const In* x, int64_t n, const Tile& tile) {
  at::parallel_for(0, n, 2048, [&](int64_t begin, int64_t end) {
    alignas(64) T y[8][kTileRows];
    for (int64_t r0 = begin; r0 < end; r0 += kTileRows) {
      const int64_t m = std::min(kTileRows, end - r0);
      const In* xr = x + r0 * 8;
      for (int64_t r = 0; r < m; ++r) {
#pragma GCC unroll 8
        for (int c = 0; c < 8; ++c) y[c][r] = static_cast<T>(xr[r * 8 + c]);
      }
      tile(y, r0, m);
    }
  });
}

at::Tensor e8_shell_decode_cpu(const at::Tensor& z) {
  at::Tensor out;
  with_rows<8>("fastvq::e8_shell_decode", "z", z, [&](auto t, const auto* in) {
    using T = decltype(t);
    out = at::empty({z.size(0)}, z.options().dtype(at::kLong));
    int64_t* o = out.mutable_data_ptr<int64_t>();
    for_each_tile<T>(in, z.size(0), [&](const T (*y)[kTileRows], int64_t r0, int64_t m) {
      alignas(64) T index[kTileRows];
      FASTVQ_TILE_KERNEL(decode_block, y, index, m);
      for (int64_t r = 0; r < m; ++r) o[r0 + r] = static_cast<int64_t>(index[r]);
    });
  });
  return out;
}

at::Tensor e8_nearest_cpu(const at::Tensor& x) {
  at::Tensor out;
  with_rows<8>("fastvq::e8_nearest", "x", x, [&](auto t, const auto* in) {
    using T = decltype(t);
    using In = std::remove_cv_t<std::remove_pointer_t<decltype(in)>>;
    out = at::empty({x.size(0), 8}, x.options());
    In* o = out.mutable_data_ptr<In>();
    for_each_tile<T>(in, x.size(0), [&](const T (*y)[kTileRows], int64_t r0, int64_t m) {
      alignas(64) T p[8][kTileRows];
      FASTVQ_TILE_KERNEL(nearest_tile, y, p, m);
      for (int64_t r = 0; r < m; ++r) {
#pragma GCC unroll 8
        // to nearest even
        for (int c = 0; c < 8; ++c) o[(r0 + r) * 8 + c] = static_cast<In>(p[c][r]);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace fastvq

TORCH_LIBRARY_IMPL(fastvq, CPU, m) {
  m.impl("e8_shell_decode", &fastvq::e8_shell_decode_cpu);
  m.impl("e8_nearest", &fastvq::e8_nearest_cpu);
}

// CPU kernel of fastvq::leech_decode: the canonical index of the unit Leech code (196,560 minimal
// vectors, fastvq/lattice/leech.py) of largest inner product with each row of z (N, 24).
//
// The structured decoder of fastvq/lattice/leech.py (_decode) with the same arithmetic, score for
// score, so the indices equal the torch path's bit for bit (ties included):
//   - Per row, tables over the 4 groups of 6 coordinates and the 64 sign patterns e of a group
//     (4 x 64 entries each): the signed sum of z with -1 on e, summed left to right, and its least
//     term (shape 3); the sum of |z| over the subset e, left to right, its least |z| (+inf if
//     empty) and the sign (-1)^(number of z < 0 on e) (shape 2). About 6k operations.
//   - Shape 3, codeword m = (l0, l1) on coordinates 0..11 and (h0, h1) = high12(m) on 12..23:
//     score = ((S0[l0] + S1[l1]) + (S2[h0] + S3[h1])) - 4 min(the four minima). 4,096 x ~10
//     (3 adds, 3 mins, 1 multiply-add, 1 xor, 2 index ops, 1 compare) = ~41k operations.
//   - Shape 2, octad o: 2 ((A0 + A1) + (A2 + A3)) - 4 [odd minus count on o] min(the four minima),
//     the parity from the product of the four groups' signs: 759 x ~16 = ~12k.
//   - Shape 1: the two largest |z| (~50), then one sign fix (even_sign_rank) and one position
//     (best_position) for the winners (~150).
//   About 60k operations per row, 80x fewer than the 4.7M multiply-adds of brute force.
// Rows are decoded kTile (16) at a time, a row per SIMD lane: the tables hold a tile's rows side
// by side, and the codeword and octad loops read the same entries for every row, so each step is
// a few vector instructions over the tile (GCC vector extensions: 2 vectors of 8 floats with AVX2,
// 4 of 4 with SSE2, the build picked at run time as in e8.cpp; 4 vectors for every 8 rows in
// float64). The tables of a float32 tile take 80 KiB, the shape-3 loop reads 32 of them.
// On one core of a 2-core Intel Xeon dev box (AVX-512 capable, 48 KiB L1d, 2 MiB L2), float32
// rows, thread CPU time, A/B in one session: 2.5 us per row with AVX2 and 3.3 with SSE2, against
// 11.7 for the row-at-a-time kernel this replaced, whose every table load took its own index
// arithmetic; 8 rows a tile ran 3.0 us, 32 no faster than 16 (and float64 slower).
// Ties go to the lowest index (lower shape, then lower codeword / octad / pair); a row with NaN or
// Inf gets index 0, as in the torch path; a row beyond 2^64 is scaled first (leech::row_scale).
// Scores are computed in float32 for float32, float16 and bfloat16 inputs (half inputs are
// widened exactly) and in float64 for float64; each row's arithmetic is the scalar recipe above
// whichever lane it takes, and neither build contracts to FMA (the products are exact anyway).
// Threads: at::parallel_for (OpenMP) over rows, so results do not depend on the thread count.
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <type_traits>

#include "../leech_decode.h"
#include "isa.h"
#include "shell_rows.h"

namespace fastvq {
namespace {

using leech::kOctads;

constexpr int kTile = kShellBlock;  // rows per tile, one per lane

const leech::GolayTables& golay_tables() {
  static const leech::GolayTables tables = leech::make_golay_tables();  // thread-safe (C++11)
  return tables;
}

// One tile: its rows y[p][v] (row r is lane r % W of vector r / W) and their tables over the 4
// groups of 6 coordinates and the 64 sign patterns e of a group, in vectors of kBytes (16 for
// SSE2, 32 for AVX2; GCC vector extensions, so both builds share this code). 82 KiB in float32,
// 164 in float64: one per thread on the heap, not on the stack, which a small thread stack (musl's
// 128 KiB default, Python's threading.stack_size, OMP_STACKSIZE) would not hold.
template <typename T, int kBytes>
struct alignas(64) Tile {
  static constexpr int W = kBytes / sizeof(T);  // lanes per vector
  static constexpr int NV = kTile / W;          // vectors per tile
  typedef T V __attribute__((vector_size(kBytes)));
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> I;
  typedef I M __attribute__((vector_size(kBytes)));  // comparison masks, and |x| by a bit mask
  V y[24][NV];
  V s_sum[4][64][NV], s_min[4][64][NV];  // z with -1 on e: sum left to right, least term
  V a_sum[4][64][NV], a_min[4][64][NV];  // |z| on e: sum left to right, least (+inf if none)
  V a_sign[4][64][NV];                   // (-1)^(number of z < 0 on e)
  V score2[NV], octad2[NV], score3[NV], word3[NV];  // each row's best octad and codeword
};

// min_of on vectors: b where b < a, else a (the scalar rule's value, ties included). A macro, not
// a function: a helper returning a 32-byte vector is compiled for the baseline ISA before it is
// inlined (nearest_code.cpp says more). Its arguments are plain values, evaluated twice.
#define FASTVQ_VMIN(a, b) ((b) < (a) ? (b) : (a))

// Shapes 2 and 3 for the tile's rows (all kTile lanes: the caller pads). Inlined into the two
// builds below.
template <typename T, int kBytes>
FASTVQ_INLINE void decode_tile(Tile<T, kBytes>& t, const leech::GolayTables& g) {
  using V = typename Tile<T, kBytes>::V;
  using M = typename Tile<T, kBytes>::M;
  constexpr int NV = Tile<T, kBytes>::NV;
  const T inf = std::numeric_limits<T>::infinity();
  const M magnitude = M{} + std::numeric_limits<typename Tile<T, kBytes>::I>::max();
  for (int k = 0; k < 4; ++k) {
    for (int e = 0; e < 64; ++e) {
      for (int v = 0; v < NV; ++v) {
        V s = t.y[6 * k][v], mn = s, as = V{}, am = V{} + inf, sign = V{} + T(1);
        for (int c = 0; c < 6; ++c) {
          const V x = t.y[6 * k + c][v];
          const V a = (V)((M)x & magnitude);  // std::abs: the sign bit cleared
          if ((e >> c) & 1) {
            const V minus = -x;
            s = c == 0 ? minus : s + minus;
            mn = c == 0 ? minus : FASTVQ_VMIN(mn, minus);
            as = c == 0 ? a : as + a;
            am = FASTVQ_VMIN(am, a);
            sign = x < 0 ? -sign : sign;
          } else if (c > 0) {
            s = s + x;
            mn = FASTVQ_VMIN(mn, x);
          }
        }
        t.s_sum[k][e][v] = s, t.s_min[k][e][v] = mn;
        t.a_sum[k][e][v] = as, t.a_min[k][e][v] = am, t.a_sign[k][e][v] = sign;
      }
    }
  }

  // Shape 3: codeword m = l1 * 64 + l0 in increasing order, so the strict > keeps the first
  // maximum.
  for (int v = 0; v < NV; ++v) t.score3[v] = V{} - inf, t.word3[v] = V{};
  V m = V{};  // the codeword, counted in T: exact up to 4095
  for (int l1 = 0; l1 < 64; ++l1) {
    const uint32_t hh = g.hhi[l1];
    for (int l0 = 0; l0 < 64; ++l0, m += 1) {
      const uint32_t hi = hh ^ g.hlo[l0];
      const int e2 = hi & 63, e3 = hi >> 6;
      for (int v = 0; v < NV; ++v) {
        const V s =
            (t.s_sum[0][l0][v] + t.s_sum[1][l1][v]) + (t.s_sum[2][e2][v] + t.s_sum[3][e3][v]);
        const V mn = FASTVQ_VMIN(FASTVQ_VMIN(t.s_min[0][l0][v], t.s_min[1][l1][v]),
                                 FASTVQ_VMIN(t.s_min[2][e2][v], t.s_min[3][e3][v]));
        const V score = s - 4 * mn;  // 4 * mn is exact: one rounding, fused or not
        const M better = score > t.score3[v];
        t.word3[v] = better ? m : t.word3[v];
        t.score3[v] = better ? score : t.score3[v];
      }
    }
  }

  // Shape 2, octads in message order: an odd count of minus signs on the octad costs 4 min |z|.
  for (int v = 0; v < NV; ++v) t.score2[v] = V{} - inf, t.octad2[v] = V{};
  for (int o = 0; o < kOctads; ++o) {
    const uint32_t w = g.octad[o];
    const int e0 = w & 63, e1 = (w >> 6) & 63, e2 = (w >> 12) & 63, e3 = w >> 18;
    const V oct = V{} + static_cast<T>(o);
    for (int v = 0; v < NV; ++v) {
      const V s = 2 * ((t.a_sum[0][e0][v] + t.a_sum[1][e1][v]) +
                       (t.a_sum[2][e2][v] + t.a_sum[3][e3][v]));
      const V mn = FASTVQ_VMIN(FASTVQ_VMIN(t.a_min[0][e0][v], t.a_min[1][e1][v]),
                               FASTVQ_VMIN(t.a_min[2][e2][v], t.a_min[3][e3][v]));
      const V sign = (t.a_sign[0][e0][v] * t.a_sign[1][e1][v]) *
                     (t.a_sign[2][e2][v] * t.a_sign[3][e3][v]);
      const V score = sign < 0 ? s - 4 * mn : s;
      const M better = score > t.score2[v];
      t.octad2[v] = better ? oct : t.octad2[v];
      t.score2[v] = better ? score : t.score2[v];
    }
  }
}

template <typename T>
void decode_tile_baseline(Tile<T, 16>& t, const leech::GolayTables& g) {
  decode_tile(t, g);
}

#if defined(FASTVQ_X86)
template <typename T>
__attribute__((target("avx2"))) void decode_tile_avx2(Tile<T, 32>& t,
                                                      const leech::GolayTables& g) {
  decode_tile(t, g);
}
#endif

// The index of row z given its best octad and codeword: shape 1 (the two largest |z|), then the
// winning shape's sign pattern or position.
template <typename T>
int64_t finish_row(const T* z, T score2, int octad2, T score3, int word3,
                   const leech::GolayTables& g) {
  for (int p = 0; p < 24; ++p) {
    if (!std::isfinite(z[p])) return 0;
  }
  // The first largest |z|, then the first largest of the others.
  int i = 0, j = -1;
  for (int p = 1; p < 24; ++p) {
    if (std::abs(z[p]) > std::abs(z[i])) i = p;
  }
  for (int p = 0; p < 24; ++p) {
    if (p != i && (j < 0 || std::abs(z[p]) > std::abs(z[j]))) j = p;
  }
  const T score1 = 4 * (std::abs(z[i]) + std::abs(z[j]));

  // >= keeps the lower shape on equal scores.
  if (score1 >= score2 && score1 >= score3) return leech::pair_index(z, i, j);
  if (score2 >= score3) {
    return leech::kStart2 + octad2 * 128 + leech::even_sign_rank(z, g.octad[octad2]);
  }
  const uint32_t word = static_cast<uint32_t>(word3) | (leech::high12(word3) << 12);
  return leech::kStart3 + static_cast<int64_t>(word3) * 24 + leech::best_position(z, word);
}

// out[r] = the index of rows[r], r < m <= kTile, through a tile of kBytes vectors.
template <int kBytes, typename T, typename DecodeTile>
void decode_rows(const T (*rows)[24], int m, int64_t* out, const DecodeTile& decode_tile) {
  const leech::GolayTables& g = golay_tables();
  using Tl = Tile<T, kBytes>;
  thread_local const std::unique_ptr<Tl> tile = std::make_unique<Tl>();
  Tl& t = *tile;
  for (int p = 0; p < 24; ++p) {
    for (int r = 0; r < kTile; ++r) t.y[p][r / Tl::W][r % Tl::W] = rows[r < m ? r : 0][p];
  }
  decode_tile(t, g);
  for (int r = 0; r < m; ++r) {
    const int v = r / Tl::W, lane = r % Tl::W;
    out[r] = finish_row(rows[r], t.score2[v][lane], static_cast<int>(t.octad2[v][lane]),
                        t.score3[v][lane], static_cast<int>(t.word3[v][lane]), g);
  }
}

template <typename T>
void decode_rows(const T (*rows)[24], int m, int64_t* out) {
#if defined(FASTVQ_X86)
  if (cpu::use_avx2(/*with_fma=*/false)) {
    return decode_rows<32>(rows, m, out, [](Tile<T, 32>& t, const leech::GolayTables& g) {
      decode_tile_avx2(t, g);
    });
  }
#endif
  decode_rows<16>(rows, m, out, [](Tile<T, 16>& t, const leech::GolayTables& g) {
    decode_tile_baseline(t, g);
  });
}

at::Tensor leech_decode_cpu(const at::Tensor& z) {
  // ~60k operations per row: 16 rows are enough work to amortise a task.
  return decode_shell_rows<24>("fastvq::leech_decode", z, 16,
                               [](const auto* rows, int m, int64_t* out) {
                                 decode_rows(rows, m, out);
                               });
}

}  // namespace
}  // namespace fastvq

TORCH_LIBRARY_IMPL(fastvq, CPU, m) { m.impl("leech_decode", &fastvq::leech_decode_cpu); }

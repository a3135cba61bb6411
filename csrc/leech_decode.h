// Per-row pieces of the structured Leech decoder (fastvq::leech_decode) shared by the CPU kernel
// (cpu/leech.cpp) and the CUDA kernel (cuda/leech.cu): the Golay code's parity half, the index
// arithmetic of the canonical order and its tie rules. Plain C++ with __host__ __device__ under
// nvcc; no torch. The E8 shell decoder (cpu/e8.cpp) uses pair_index and row_scale: its two shapes
// follow the same order and rules. The order and the rules are those of fastvq/lattice/leech.py
// and _common.py:
//   [0, 1104)        (+-4, +-4, 0^22): pair * 4 + 2 neg_i + neg_j, pairs i < j lexicographic
//   [1104, 98256)    (+-2^8) on octad o: 1104 + o * 128 + rank of the signs (even parity)
//   [98256, 196560)  codeword m, position p: 98256 + m * 24 + p
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FASTVQ_HD __host__ __device__ __forceinline__
#else
#define FASTVQ_HD inline
#endif

namespace fastvq {
namespace leech {

constexpr int kOctads = 759;
constexpr int64_t kStart2 = 1104;   // 276 pairs x 4 signs
constexpr int64_t kStart3 = 98256;  // + 759 octads x 128 sign patterns

// Scores reach 48 max|z|: a row whose largest |z| exceeds 2^64 is scaled by 2^-100 first, so no
// score overflows (float32 tops out at 2^128) and the argmax is unchanged (a power of two is
// exact; only coordinates below 2^-90 of the largest can lose bits to underflow). Every backend,
// the torch path included, applies the same rule, so their indices stay equal bit for bit.
template <typename T>
FASTVQ_HD T row_scale(T largest_abs) {
  return largest_abs > T(0x1p64) ? T(0x1p-100) : T(1);
}

template <typename T>
FASTVQ_HD T min_of(T a, T b) {
  return b < a ? b : a;
}

// Row i of the Golay generator's parity half (fastvq/lattice/golay.py GENERATOR, right of the
// space): bit j is coordinate 12 + j of codeword 1 << i.
FASTVQ_HD uint32_t parity_row(int i) {
  constexpr uint32_t rows[12] = {0xa3b, 0xc76, 0x8ed, 0x9da, 0xbb4, 0xf68,
                                 0xed1, 0xda3, 0xb47, 0xe8e, 0xd1d, 0x7ff};
  return rows[i];
}

// Coordinates 12..23 of codeword m (its coordinates 0..11 are m: the code is systematic).
FASTVQ_HD uint32_t high12(uint32_t m) {
  uint32_t h = 0;
  for (int i = 0; i < 12; ++i) h ^= ((m >> i) & 1u) ? parity_row(i) : 0u;
  return h;
}

FASTVQ_HD int popcount24(uint32_t x) {
  int c = 0;
  for (int i = 0; i < 24; ++i) c += (x >> i) & 1u;
  return c;
}

// Golay tables shared by all rows (3,292 bytes: the CUDA kernel takes them as a parameter):
// high12 of the low and high 6 message bits (high12 is linear, so high12(l0 + 64 l1) =
// hlo[l0] ^ hhi[l1]) and the octads' 24-bit masks in message order.
struct GolayTables {
  uint32_t octad[kOctads];
  uint16_t hlo[64], hhi[64];
};

inline GolayTables make_golay_tables() {
  GolayTables g{};
  for (uint32_t e = 0; e < 64; ++e) {
    g.hlo[e] = static_cast<uint16_t>(high12(e));
    g.hhi[e] = static_cast<uint16_t>(high12(e << 6));
  }
  int o = 0;
  for (uint32_t m = 0; m < 4096; ++m) {
    const uint32_t word = m | (high12(m) << 12);
    if (popcount24(word) == 8) g.octad[o++] = word;
  }
  return g;
}

// Index of the pair vector with +-4 at i != j and the signs of z there (a zero takes +); kDim = 8
// gives the E8 shell's pair vectors (+-1, +-1, 0^6), which follow the same order.
template <int kDim = 24, typename T>
FASTVQ_HD int64_t pair_index(const T* z, int i, int j) {
  const int a = i < j ? i : j, b = i < j ? j : i;
  // pairs (a', .) with a' < a come first
  const int64_t pair = a * (kDim - 1) - a * (a - 1) / 2 + (b - a - 1);
  return pair * 4 + 2 * (z[a] < 0) + (z[b] < 0);
}

// Lowest rank among the even sign patterns s maximizing sum_k s_k z[p_k] on the octad with
// 24-bit mask `octad` (p_0 < ... < p_7), as _common.best_even_signs: s = sign(z) (zeros +); if
// its minus count is odd, flip one sign at a least |z|, choosing by key: a minus at the smallest
// k < 7, then k = 7, then a plus at the largest k < 7.
template <typename T>
FASTVQ_HD int even_sign_rank(const T* z, uint32_t octad) {
  int pos[8];
  for (int p = 0, k = 0; p < 24; ++p) {
    if ((octad >> p) & 1u) pos[k++] = p;
  }
  T least = z[pos[0]] < 0 ? -z[pos[0]] : z[pos[0]];
  int negs = 0;
  for (int k = 0; k < 8; ++k) {
    const T a = z[pos[k]] < 0 ? -z[pos[k]] : z[pos[k]];
    least = a < least ? a : least;
    negs += z[pos[k]] < 0;
  }
  int flip = -1, best_key = 100;
  for (int k = 0; k < 8; ++k) {
    const T w = z[pos[k]];
    const T a = w < 0 ? -w : w;
    const int key = (w < 0 && k < 7) ? k : (k == 7 ? 8 : 22 - k);
    if (a == least && key < best_key) {
      best_key = key;
      flip = k;
    }
  }
  int rank = 0;
  for (int k = 0; k < 7; ++k) {
    const int neg = (z[pos[k]] < 0) ^ ((negs & 1) && k == flip);
    rank |= neg << (6 - k);
  }
  return rank;
}

// First position p minimizing s_p z_p, s = -1 on the 24-bit codeword `word` and +1 elsewhere.
template <typename T>
FASTVQ_HD int best_position(const T* z, uint32_t word) {
  int best = 0;
  T best_v = (word & 1u) ? -z[0] : z[0];
  for (int p = 1; p < 24; ++p) {
    const T v = ((word >> p) & 1u) ? -z[p] : z[p];
    if (v < best_v) {
      best_v = v;
      best = p;
    }
  }
  return best;
}

}  // namespace leech
}  // namespace fastvq

// CPU kernel of fastvq::e8_shell_decode: the canonical index of the E8 minimal vector (240 codes,
// fastvq/lattice/e8.py) of largest inner product with each row of z (N, 8).
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
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "../leech_decode.h"
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
                              [](const auto* row) { return decode_row(row); });
}

}  // namespace
}  // namespace fastvq

TORCH_LIBRARY_IMPL(fastvq, CPU, m) { m.impl("e8_shell_decode", &fastvq::e8_shell_decode_cpu); }

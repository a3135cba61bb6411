// CPU kernel of fastvq::nearest_code: idx[n] = argmax_k dot(z[n], c[k]) * scale[k] + bias[k],
// and of fastvq::nearest_code_topk: the k best codes per row, best first.
//
// A GEMM with the argmax fused into its epilogue, so N x K scores never reach memory:
//   - The codebook is packed block by block (96 KiB of float32 per block, so a block stays in L2
//     while every row group of the work item passes over it) into tiles of NR = 2W codes (W =
//     vector lanes: 8 with AVX2) stored d-major, tile[d][j], through WxW register transposes;
//     bf16/fp16 become float32 here.
//   - The micro-kernel keeps MR = 6 rows x NR codes of float32 accumulators (12 vector
//     registers, + 2 for the code vectors + 1 broadcast = 15 of the 16 AVX2/SSE registers): for
//     each d it broadcasts z[r][d] and FMAs it with the NR codes of tile[d], 12 FMAs per 2 vector
//     loads + 6 broadcasts. Fewer rows (N % 6, small N) step over up to 4 tiles at once so that
//     FMA latency stays hidden.
//   - Epilogue per tile: score = acc * scale + bias, then a per-lane running best (value and
//     block-relative index) updated with a strict `>`. Each lane sees its codes in increasing k,
//     so it keeps the lowest index of its maximum; the lanes are reduced at the end of the block
//     by (larger value, then lower index), and blocks and K-splits are merged in increasing k
//     with a strict `>`. NaN scores never pass `>`, and padding codes score -inf (scale 0,
//     bias -inf), so neither ever wins; a row whose scores are all -inf/NaN keeps index 0.
//   - Top-k swaps only the epilogue (a template argument), so that its scores are the argmax's
//     bit for bit and column 0 is nearest_code's answer. Per row, the k-th best score so far is
//     a threshold: a tile that does not beat it costs one compare and a test per vector, about
//     the argmax's blends, and most tiles do not (at K = 16,384, 55 of 1,024 tiles per row beat
//     it for k = 8, 418 for k = 128). Those are saved and merged out of line into the row's pool
//     (TopkPools), which lives across blocks. Codes reach a row in increasing k (lanes, tiles,
//     blocks), so a strict `>` and stable pools keep the lowest index on ties with no index
//     compare in the hot loop; NaN never passes it, and rows with fewer than k scores above -inf
//     are completed with the lowest unused indices (-inf and NaN rank equal). K-splits merge
//     their sorted lists by (score, then split).
//   - Every score is the same chain of operations over d whatever the row or code position,
//     the block or the split (remainder rows run the same chain; remainder codes are zero-padded
//     lanes), so results depend neither on the thread count nor on the rest of the batch.
//   - Work items are (rows) x (codes): large N splits rows only; fewer than kMinRowsPerItem rows
//     per thread also splits K into S <= 64 ranges and reduces the (N, S) partial bests
//     (splitting K adds no packing work; splitting rows repacks the codebook once per item,
//     which 1024 rows amortise to ~1%).
//   - The hot function is compiled twice: 8 lanes for AVX2+FMA (picked at run time with
//     __builtin_cpu_supports) and 4 lanes for the baseline ISA (SSE2 on x86-64, NEON on
//     aarch64), so the library runs anywhere. It is plain C++ on GCC/Clang vector extensions
//     (no intrinsics); float contraction (-ffp-contract=fast, GCC's default for C++) turns
//     acc += a * b into vfmadd231ps. Results can differ in the last bits between the two.
// Measured (bench/results/nearest_code-cpu.json, 2-core Intel Xeon, AVX2 build): 0.152 TFLOP/s at
// N = 8192, K = 16,384, D = 32, 10.8x the chunked PyTorch reference in the same run; top-8 1.11x
// the argmax's time there (on an earlier 2-core AMD EPYC: 0.121 TFLOP/s, top-8 1.21x; 1 thread,
// same shape: k = 32 1.9x, k = 128 3.4x the argmax's time). An AVX-512 build (16 lanes, same
// micro-kernel) ran no faster on that Xeon (82 against 78-83 GFLOP/s, one core, N = 2048,
// K = 16,384, D = 32): not kept.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <utility>

#include "isa.h"

#if !defined(__GNUC__)
#error "csrc/cpu/nearest_code.cpp needs GCC or Clang vector extensions"
#endif

namespace fastvq {
namespace {

constexpr int MR = 6;                   // rows per micro-kernel
constexpr int64_t kCodeUnit = 16;       // K splits and blocks start at multiples of this (>= NR)
constexpr int64_t kBlockBytes = 96 * 1024;  // packed float32 codes per block (L2 is 512 KiB);
                                            // 24-384 KiB ran D = 32 alike, 96 led at D >= 256
constexpr int64_t kMinRowsPerItem = 1024;   // fewer rows per thread than this: also split K
constexpr int64_t kMaxSplits = 64;
constexpr int64_t kMaxDim = 1024;
constexpr int64_t kMaxTopk = 128;    // k of nearest_code_topk (fastvq.ops.nearest_code.MAX_TOPK)
constexpr int64_t kSortedMaxK = 16;  // top-k pools up to this k stay sorted (TopkPools)

typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x4 __attribute__((vector_size(16)));
typedef uint32_t u32x4 __attribute__((vector_size(16)));
typedef uint16_t u16x4 __attribute__((vector_size(8)));

#if defined(__clang__)
#define FASTVQ_SHUFFLE(I, a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define FASTVQ_SHUFFLE(I, a, b, ...) __builtin_shuffle(a, b, I{__VA_ARGS__})
#endif

// Vector policies: lane count W and the matching float / int / uint / uint16 vector types.
// 32-byte vectors are only for the AVX2 build: lowered to SSE2 they live in memory (GCC builds
// each broadcast through the stack), which made the baseline build 40x slower than AVX2.
// Helpers here take vectors by reference only: a helper returning a 32-byte vector is compiled
// for the baseline ISA before it is inlined (GCC then built broadcasts from vinsertps chains).
struct Lanes8 {
  static constexpr int W = 8;
  using F = f32x8;
  using I = i32x8;
  using U = u32x8;
  using H = u16x8;
  // r[e][j] <- r[j][e] (unpack, shuffle, then 128-bit lane permutes).
  static FASTVQ_INLINE void transpose(F (&r)[8]) {
    F t[8], u[8];
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = FASTVQ_SHUFFLE(I, r[2 * i], r[2 * i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
      t[2 * i + 1] = FASTVQ_SHUFFLE(I, r[2 * i], r[2 * i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int i = 0; i < 2; ++i) {
      const F* q = t + 4 * i;
      u[4 * i + 0] = FASTVQ_SHUFFLE(I, q[0], q[2], 0, 1, 8, 9, 4, 5, 12, 13);
      u[4 * i + 1] = FASTVQ_SHUFFLE(I, q[0], q[2], 2, 3, 10, 11, 6, 7, 14, 15);
      u[4 * i + 2] = FASTVQ_SHUFFLE(I, q[1], q[3], 0, 1, 8, 9, 4, 5, 12, 13);
      u[4 * i + 3] = FASTVQ_SHUFFLE(I, q[1], q[3], 2, 3, 10, 11, 6, 7, 14, 15);
    }
    for (int i = 0; i < 4; ++i) {
      r[i] = FASTVQ_SHUFFLE(I, u[i], u[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
      r[i + 4] = FASTVQ_SHUFFLE(I, u[i], u[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    }
  }
  // Whether any lane of the mask m is set. Without intrinsics there is no movemask: OR the two
  // halves, then two 64-bit moves (6 instructions with the branch; vptest would be 2).
  static FASTVQ_INLINE bool any(const I& m) {
    i32x4 h[2];
    std::memcpy(h, &m, sizeof h);
    const i32x4 o = h[0] | h[1];
    uint64_t q[2];
    std::memcpy(q, &o, sizeof q);
    return (q[0] | q[1]) != 0;
  }
};

struct Lanes4 {
  static constexpr int W = 4;
  using F = f32x4;
  using I = i32x4;
  using U = u32x4;
  using H = u16x4;
  static FASTVQ_INLINE void transpose(F (&r)[4]) {
    const F t0 = FASTVQ_SHUFFLE(I, r[0], r[1], 0, 4, 1, 5);
    const F t1 = FASTVQ_SHUFFLE(I, r[0], r[1], 2, 6, 3, 7);
    const F t2 = FASTVQ_SHUFFLE(I, r[2], r[3], 0, 4, 1, 5);
    const F t3 = FASTVQ_SHUFFLE(I, r[2], r[3], 2, 6, 3, 7);
    r[0] = FASTVQ_SHUFFLE(I, t0, t2, 0, 1, 4, 5);
    r[1] = FASTVQ_SHUFFLE(I, t0, t2, 2, 3, 6, 7);
    r[2] = FASTVQ_SHUFFLE(I, t1, t3, 0, 1, 4, 5);
    r[3] = FASTVQ_SHUFFLE(I, t1, t3, 2, 3, 6, 7);
  }
  static FASTVQ_INLINE bool any(const I& m) {
    uint64_t q[2];
    std::memcpy(q, &m, sizeof q);
    return (q[0] | q[1]) != 0;
  }
};

template <class T>
FASTVQ_INLINE void load_vec(T& v, const void* p) {
  std::memcpy(&v, p, sizeof v);
}

template <class T>
FASTVQ_INLINE void store_vec(void* p, const T& v) {
  std::memcpy(p, &v, sizeof v);
}

enum class In { F32, BF16, F16 };

FASTVQ_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

FASTVQ_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// IEEE half -> float without branches (the formula of c10::detail::fp16_ieee_to_fp32_value);
// load_lanes applies the same formula lane-wise.
FASTVQ_INLINE float half_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t bits =
      two_w < (1u << 27) ? float_to_bits(denormalized) : float_to_bits(normalized);
  return bits_to_float(sign | bits);
}

template <In kIn>
FASTVQ_INLINE float load_elem(const void* base, int64_t i) {
  if constexpr (kIn == In::F32) {
    return static_cast<const float*>(base)[i];
  } else if constexpr (kIn == In::BF16) {
    return bits_to_float(static_cast<uint32_t>(static_cast<const uint16_t*>(base)[i]) << 16);
  } else {
    return half_to_float(static_cast<const uint16_t*>(base)[i]);
  }
}

// out <- base[i..i+W) as float32.
template <In kIn, class V>
FASTVQ_INLINE void load_lanes(typename V::F& out, const void* base, int64_t i) {
  using F = typename V::F;
  using U = typename V::U;
  if constexpr (kIn == In::F32) {
    load_vec(out, static_cast<const float*>(base) + i);
  } else {
    typename V::H h;
    load_vec(h, static_cast<const uint16_t*>(base) + i);
    const U w = __builtin_convertvector(h, U) << 16;
    if constexpr (kIn == In::BF16) {
      out = reinterpret_cast<F>(w);
    } else {
      const U sign = w & 0x80000000u;
      const U two_w = w + w;
      const F normalized = reinterpret_cast<F>((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
      const F denormalized = reinterpret_cast<F>((two_w >> 17) | (126u << 23)) - 0.5f;
      const U bits = two_w < (1u << 27) ? reinterpret_cast<U>(denormalized)
                                        : reinterpret_cast<U>(normalized);
      out = reinterpret_cast<F>(sign | bits);
    }
  }
}

struct Problem {
  const void* z;         // (N, D) of the input dtype
  const void* codebook;  // (K, D) of the input dtype
  const float* scale;    // (K,) or nullptr (1)
  const float* bias;     // (K,) or nullptr (0)
  int64_t N, K, D;
  int64_t block_codes;  // codes per packed block, a multiple of kCodeUnit
  int64_t splits;       // S: K ranges; 1 writes `out` directly
  int64_t topk;         // k of nearest_code_topk; 0 for nearest_code
  int64_t* out;         // (N,), or (N, k) for top-k
  float* part_val;      // (N, S), or (N, S, k) for top-k, when S > 1
  int64_t* part_idx;    // (N, S), or (N, S, k) for top-k, when S > 1
};

// Owns a 64-byte-aligned float buffer (c10's CPU allocation, no tensor machinery per item).
struct Buffer {
  explicit Buffer(int64_t n) : p(static_cast<float*>(c10::alloc_cpu(sizeof(float) * n))) {}
  ~Buffer() { c10::free_cpu(p); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  float* p;
};

// Packs `tiles` tiles from code k0 as tile[t][d][j] = c[k0 + t*NR + j][d], with scale and bias
// beside; codes past K become zero vectors with scale 0 and bias -inf (they never win). Full
// tiles go through register transposes, so that packing costs about as much as reading the
// codebook, which is what small N (N = 1, K = 2^20) is bound by.
template <In kIn, class V>
FASTVQ_INLINE void pack_block(const Problem& p, int64_t k0, int64_t tiles, float* pk, float* sc,
                              float* bs) {
  constexpr int W = V::W;
  constexpr int NR = 2 * W;
  using F = typename V::F;
  const int64_t D = p.D;
  const void* const cb = p.codebook;
  const int64_t esize = kIn == In::F32 ? 4 : 2;
  for (int64_t t = 0; t < tiles; ++t) {
    float* dst = pk + t * D * NR;
    const int64_t kt = k0 + t * NR;
    if (kt + NR <= p.K) {
      // The codebook streams from DRAM once when N is small: prefetch 4 tiles ahead.
      if (kt + 5 * NR <= p.K) {
        const char* ahead = static_cast<const char*>(cb) + (kt + 4 * NR) * D * esize;
        for (int64_t off = 0; off < NR * D * esize; off += 64) __builtin_prefetch(ahead + off);
      }
      const int64_t dw = D / W * W;
      for (int h = 0; h < 2; ++h) {
        for (int64_t d = 0; d < dw; d += W) {
          const int64_t row = (kt + h * W) * D + d;
          F r[W];
          for (int j = 0; j < W; ++j) load_lanes<kIn, V>(r[j], cb, row + j * D);
          V::transpose(r);
          for (int e = 0; e < W; ++e) store_vec(dst + (d + e) * NR + h * W, r[e]);
        }
      }
      for (int64_t d = dw; d < D; ++d) {
        for (int j = 0; j < NR; ++j) dst[d * NR + j] = load_elem<kIn>(cb, (kt + j) * D + d);
      }
    } else {
      for (int j = 0; j < NR; ++j) {
        const int64_t k = kt + j;
        if (k < p.K) {
          for (int64_t d = 0; d < D; ++d) dst[d * NR + j] = load_elem<kIn>(cb, k * D + d);
        } else {
          for (int64_t d = 0; d < D; ++d) dst[d * NR + j] = 0.f;
        }
      }
    }
  }
  const int64_t real = std::min(tiles * NR, p.K - k0);
  const float* const scale = p.scale;
  const float* const bias = p.bias;
  for (int64_t j = 0; j < real; ++j) sc[j] = scale ? scale[k0 + j] : 1.f;
  for (int64_t j = 0; j < real; ++j) bs[j] = bias ? bias[k0 + j] : 0.f;
  for (int64_t j = real; j < tiles * NR; ++j) {
    sc[j] = 0.f;
    bs[j] = -std::numeric_limits<float>::infinity();
  }
}

// TT consecutive tiles from tile t for R rows, then the epilogue of each tile in increasing k:
// score = acc * scale + bias, handed to `epi` (ArgmaxLanes or TopkLanes) tile by tile.
template <class V, int R, int TT, class Epi>
FASTVQ_INLINE void tiles_step(const float* const* zr, const float* pk, const float* sc,
                              const float* bs, int64_t t, int64_t D, Epi& epi) {
  constexpr int W = V::W;
  constexpr int NR = 2 * W;
  using F = typename V::F;
  using I = typename V::I;
  const float* b = pk + t * D * NR;
  const int64_t tile_stride = D * NR;
  F acc[TT][R][2];
  for (int u = 0; u < TT; ++u) {
    for (int r = 0; r < R; ++r) acc[u][r][0] = acc[u][r][1] = F{};
  }
  for (int64_t d = 0; d < D; ++d) {
#pragma GCC unroll 4
    for (int u = 0; u < TT; ++u) {
      F b0, b1;
      load_vec(b0, b + u * tile_stride + d * NR);
      load_vec(b1, b + u * tile_stride + d * NR + W);
#pragma GCC unroll 6
      for (int r = 0; r < R; ++r) {
        // A broadcast written inline: through a helper function, GCC built it with vinsertps
        // chains (2.5x slower at D = 32) instead of vbroadcastss.
        const float x = zr[r][d];
        F a;
        if constexpr (V::W == 8) {
          a = F{x, x, x, x, x, x, x, x};
        } else {
          a = F{x, x, x, x};
        }
        acc[u][r][0] += a * b0;
        acc[u][r][1] += a * b1;
      }
    }
  }
  I lane;
  for (int l = 0; l < W; ++l) lane[l] = l;
#pragma GCC unroll 4
  for (int u = 0; u < TT; ++u) {
    const int64_t c = (t + u) * NR;
    F s0, s1, c0, c1;
    load_vec(s0, sc + c);
    load_vec(s1, sc + c + W);
    load_vec(c0, bs + c);
    load_vec(c1, bs + c + W);
    const I i0 = lane + static_cast<int32_t>(c);
    const I i1 = lane + static_cast<int32_t>(c + W);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const F x0 = acc[u][r][0] * s0 + c0;
      const F x1 = acc[u][r][1] * s1 + c1;
      epi.take(u, r, x0, x1, i0, i1);
    }
  }
  epi.step_done(t);
}

// The TT-tile steps over `tiles` packed tiles, in increasing k.
template <class V, int R, class Epi>
FASTVQ_INLINE void sweep(const float* const* zr, const float* pk, const float* sc, const float* bs,
                         int64_t tiles, int64_t D, Epi& epi) {
  // Few rows leave FMA latency exposed (one row: 2 chains of 4-cycle FMAs); stepping over
  // several tiles fills the 2 * MR accumulators. Each score is still the same chain over d.
  constexpr int TT = MR / R > 4 ? 4 : MR / R;
  int64_t t = 0;
  for (; t + TT <= tiles; t += TT) tiles_step<V, R, TT>(zr, pk, sc, bs, t, D, epi);
  for (; t < tiles; ++t) tiles_step<V, R, 1>(zr, pk, sc, bs, t, D, epi);
}

// nearest_code's epilogue: a per-lane running best (value, block-relative index), strict `>`.
template <class V, int R>
struct ArgmaxLanes {
  using F = typename V::F;
  using I = typename V::I;
  F bv[R][2];
  I bi[R][2];
  FASTVQ_INLINE void take(int, int r, const F& x0, const F& x1, const I& i0, const I& i1) {
    const I m0 = x0 > bv[r][0];
    const I m1 = x1 > bv[r][1];
    bv[r][0] = m0 ? x0 : bv[r][0];
    bv[r][1] = m1 ? x1 : bv[r][1];
    bi[r][0] = m0 ? i0 : bi[r][0];
    bi[r][1] = m1 ? i1 : bi[r][1];
  }
  FASTVQ_INLINE void step_done(int64_t) {}
};

// R rows (1..MR) against `tiles` packed tiles: the best score of each row over the block and its
// block-relative index (INT32_MAX with value -inf when no code of the block beats -inf).
template <class V, int R>
FASTVQ_INLINE void run_group(const float* const* zr, const float* pk, const float* sc,
                             const float* bs, int64_t tiles, int64_t D, float* best_v,
                             int32_t* best_i) {
  using F = typename V::F;
  using I = typename V::I;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int32_t no_idx = std::numeric_limits<int32_t>::max();
  ArgmaxLanes<V, R> e;
  for (int r = 0; r < R; ++r) {
    for (int h = 0; h < 2; ++h) {
      e.bv[r][h] = F{} + neg_inf;
      e.bi[r][h] = I{} + no_idx;
    }
  }
  sweep<V, R>(zr, pk, sc, bs, tiles, D, e);
  for (int r = 0; r < R; ++r) {
    float v = neg_inf;
    int32_t i = no_idx;
    for (int h = 0; h < 2; ++h) {
      for (int l = 0; l < V::W; ++l) {
        const float lv = e.bv[r][h][l];
        const int32_t li = e.bi[r][h][l];
        if (lv > v || (lv == v && li < i)) {
          v = lv;
          i = li;
        }
      }
    }
    best_v[r] = v;
    best_i[r] = i;
  }
}

// The top-k pools of a group's rows. Row r's pool holds cnt[r] (score, index) pairs at
// vals + r * cap and idx + r * cap, every score above -inf, and thr[r], a score that at least k
// pooled codes reach (-inf until then): a later code scoring <= thr[r] can never enter the top k
// (on equal scores the pooled codes have the lower indices). Two layouts:
//   - k <= kSortedMaxK: cap = k, sorted best first (empty slots -inf), kept by insertion, so
//     thr[r] is exactly the k-th best so far and each insertion moves a few entries.
//   - larger k: cap = 2k + NR, unsorted in increasing index (codes arrive in increasing k), and
//     shrunk (stably) to the best k whenever it reaches 2k. The threshold lags (~1.4x the
//     candidates), but no candidate pays an insertion: at N = 8192, K = 16,384, D = 32 sorted
//     insertion took k = 32 to 2.0x and k = 128 to 5.6x the argmax time, pools to 1.8x and 3.2x;
//     at k = 8 insertion led (1.15x against 1.3x).
// k0: the global index of the block's first code.
struct TopkPools {
  float* vals;
  int64_t* idx;
  int64_t* cnt;
  float* thr;
  int64_t k;
  int64_t cap;
  int64_t k0;
};

// Puts (s, i) into a sorted list of k whose last score is below s, after every entry >= s (those
// came earlier, so they have lower indices), dropping the last entry.
FASTVQ_INLINE void list_insert(float* vals, int64_t* idx, int64_t k, float s, int64_t i) {
  int64_t j = k - 1;
  for (; j > 0 && vals[j - 1] < s; --j) {
    vals[j] = vals[j - 1];
    idx[j] = idx[j - 1];
  }
  vals[j] = s;
  idx[j] = i;
}

// The k-th largest of a[0..n) (1 <= k <= n, no NaN), reordering a; tmp holds n floats.
// Quickselect with branchless splits: std::nth_element's mispredicted branches in pool_shrink
// took k = 128 from 3.3x to 4.5x the argmax time.
float kth_largest(float* a, float* tmp, int64_t n, int64_t k) {
  for (int round = 0;; ++round) {
    if (n <= 16 || round == 64) {  // small, or pivots that keep failing: the library's introselect
      std::nth_element(a, a + k - 1, a + n, std::greater<float>());
      return a[k - 1];
    }
    const float x0 = a[0], x1 = a[n / 2], x2 = a[n - 1];
    const float p = std::max(std::min(x0, x1), std::min(std::max(x0, x1), x2));  // median of 3
    int64_t g = 0;  // a[0..g) <- the values above p; tmp[0..n - g) <- the others
    for (int64_t i = 0; i < n; ++i) {
      const float x = a[i];
      const bool above = x > p;
      a[g] = x;
      tmp[i - g] = x;
      g += above;
    }
    if (g >= k) {
      n = g;
      continue;
    }
    int64_t lo = 0;  // a[0..lo) <- the values below p
    for (int64_t i = 0; i < n - g; ++i) {
      const float x = tmp[i];
      a[lo] = x;
      lo += x < p;
    }
    const int64_t eq = n - g - lo;  // >= 1: p is one of the values
    if (g + eq >= k) return p;
    k -= g + eq;
    n = lo;
  }
}

// Shrinks a pool of c > k pairs to its best k, keeping their (index) order; returns the k-th
// best score. scratch holds 2c floats.
float pool_shrink(float* vals, int64_t* idx, int64_t c, int64_t k, float* scratch) {
  std::copy(vals, vals + c, scratch);
  const float kth = kth_largest(scratch, scratch + c, c, k);
  int64_t above = 0;
  for (int64_t i = 0; i < c; ++i) above += vals[i] > kth;
  int64_t need = k - above;  // codes scoring exactly kth that stay: the lowest indices first
  int64_t w = 0;
  for (int64_t i = 0; i < c; ++i) {
    const float v = vals[i];
    const bool tie = v == kth && need > 0;
    need -= tie;
    const int64_t ix = idx[i];
    vals[w] = v;
    idx[w] = ix;
    w += (v > kth) | tie;
  }
  return kth;
}

// The slow path of TopkLanes: the lanes of the flagged (tile u, row r) pairs that beat their
// row's threshold join its pool, in increasing bit = u * R + r, so that each row sees its codes
// in increasing k. Out of line and scalar: the hot loop keeps its registers.
__attribute__((noinline)) void topk_take(const float* buf, uint32_t hits, int R, int NR, int64_t c,
                                         const TopkPools& pools) {
  float scratch[2 * (2 * kMaxTopk + 16)];  // pool_shrink's, for up to 2k + NR - 1 pairs
  const int64_t k = pools.k;
  for (; hits != 0; hits &= hits - 1) {
    const int bit = __builtin_ctz(hits);
    const int u = bit / R;
    const int r = bit % R;
    float* v = pools.vals + r * pools.cap;
    int64_t* ix = pools.idx + r * pools.cap;
    const float* s = buf + bit * NR;
    const int64_t base = pools.k0 + c + u * NR;
    int64_t n = pools.cnt[r];
    if (k <= kSortedMaxK) {
      for (int l = 0; l < NR; ++l) {
        if (s[l] > v[k - 1]) {
          list_insert(v, ix, k, s[l], base + l);
          n += n < k;
        }
      }
      pools.thr[r] = v[k - 1];
      pools.cnt[r] = n;
      continue;
    }
    const float t = pools.thr[r];
    for (int l = 0; l < NR; ++l) {  // n < 2k, and cap = 2k + NR leaves room for every lane
      v[n] = s[l];
      ix[n] = base + l;
      n += s[l] > t;
    }
    if (n >= 2 * k) {
      pools.thr[r] = pool_shrink(v, ix, n, k, scratch);
      n = k;
    }
    pools.cnt[r] = n;
  }
}

// nearest_code_topk's epilogue: in the common case no lane beats its row's threshold (one
// compare per vector and a test); a (tile, row) with a lane above it is saved and flagged, and
// the flagged ones join the pools once the step's accumulators are dead.
template <class V, int R>
struct TopkLanes {
  using F = typename V::F;
  using I = typename V::I;
  static constexpr int W = V::W;
  static constexpr int NR = 2 * W;
  static constexpr int kMaxTT = MR / R > 4 ? 4 : MR / R;
  alignas(64) float buf[kMaxTT * R * NR];
  uint32_t hits;
  TopkPools pools;
  FASTVQ_INLINE void take(int u, int r, const F& x0, const F& x1, const I&, const I&) {
    const float t = pools.thr[r];
    F tv;
    if constexpr (W == 8) {
      tv = F{t, t, t, t, t, t, t, t};
    } else {
      tv = F{t, t, t, t};
    }
    // NaN never passes `>`: NaN scores rank below every number without a test of their own.
    if (V::any((x0 > tv) | (x1 > tv))) {
      store_vec(buf + (u * R + r) * NR, x0);
      store_vec(buf + (u * R + r) * NR + W, x1);
      hits |= 1u << (u * R + r);
    }
  }
  FASTVQ_INLINE void step_done(int64_t t) {
    if (hits != 0) {
      topk_take(buf, hits, R, NR, t * NR, pools);
      hits = 0;
    }
  }
};

// R rows (1..MR) against `tiles` packed tiles, every code of the block offered to their pools.
template <class V, int R>
FASTVQ_INLINE void run_group(const float* const* zr, const float* pk, const float* sc,
                             const float* bs, int64_t tiles, int64_t D, const TopkPools& pools) {
  TopkLanes<V, R> e;
  e.pools = pools;
  e.hits = 0;
  sweep<V, R>(zr, pk, sc, bs, tiles, D, e);
}

// run_group for the last R < MR rows of an item, R made a compile-time constant.
template <class V, int R = MR - 1, class... Out>
FASTVQ_INLINE void run_rest(int rows, const float* const* zr, const float* pk, const float* sc,
                            const float* bs, int64_t tiles, int64_t D, Out... out) {
  if constexpr (R >= 1) {
    if (rows == R) {
      run_group<V, R>(zr, pk, sc, bs, tiles, D, out...);
    } else {
      run_rest<V, R - 1>(rows, zr, pk, sc, bs, tiles, D, out...);
    }
  }
}

// out[c..k) <- the lowest indices not in out[0..c) (distinct): the codes that scored -inf or
// NaN, which rank equal, so they go by index.
void fill_rest(int64_t* out, int64_t c, int64_t k) {
  if (c == k) return;
  int64_t taken[kMaxTopk];
  std::copy(out, out + c, taken);
  std::sort(taken, taken + c);
  int64_t m = 0;
  int64_t t = 0;
  for (int64_t j = c; j < k; ++j, ++m) {
    for (; t < c && taken[t] == m; ++t) ++m;
    out[j] = m;
  }
}

// A row's pool of c pairs -> its top k, best first: out[0..k) <- the best min(c, k) indices by
// (score descending, index ascending), then, where fewer than k codes scored above -inf, the
// lowest indices not among them (fill_rest). vals and idx are reordered; out_val (if not null)
// gets the scores, -inf past c.
void pool_finish(float* vals, int64_t* idx, int64_t c, int64_t k, float* scratch, int64_t* out,
                 float* out_val) {
  if (c > k) {
    pool_shrink(vals, idx, c, k, scratch);
    c = k;
  }
  std::pair<float, int64_t> e[kMaxTopk];
  for (int64_t j = 0; j < c; ++j) e[j] = {vals[j], idx[j]};
  std::sort(e, e + c, [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  });
  for (int64_t j = 0; j < c; ++j) out[j] = e[j].second;
  if (out_val != nullptr) {
    for (int64_t j = 0; j < k; ++j) {
      out_val[j] = j < c ? e[j].first : -std::numeric_limits<float>::infinity();
    }
  }
  fill_rest(out, c, k);
}

// One work item: rows [n0, n1) against codes [c0, c1) (split s of p.splits). c0 and c1 are
// multiples of kCodeUnit, or c1 = K.
template <In kIn, class V, bool kTopk>
FASTVQ_INLINE void item_body(const Problem& p, int64_t n0, int64_t n1, int64_t c0, int64_t c1,
                             int64_t s) {
  constexpr int NR = 2 * V::W;
  const int64_t D = p.D;
  const int64_t blk = std::min(p.block_codes, c1 - c0);
  const int64_t blk_tiles = (blk + NR - 1) / NR;
  // Per row: the running best (value, index), or the top-k pool (cap pairs, count, threshold).
  const int64_t k = kTopk ? p.topk : 1;
  const int64_t cap = !kTopk ? 1 : k <= kSortedMaxK ? k : 2 * k + NR;
  Buffer pk(blk_tiles * NR * D);
  Buffer sc(blk_tiles * NR);
  Buffer bs(blk_tiles * NR);
  Buffer zbuf(kIn == In::F32 ? 1 : MR * D);
  Buffer row_v((n1 - n0) * cap);
  std::unique_ptr<int64_t[]> row_i(new int64_t[(n1 - n0) * cap]);
  Buffer row_t(kTopk ? n1 - n0 : 1);
  std::unique_ptr<int64_t[]> row_c(new int64_t[kTopk ? n1 - n0 : 1]);
  if constexpr (kTopk) {
    for (int64_t n = 0; n < n1 - n0; ++n) {
      row_t.p[n] = -std::numeric_limits<float>::infinity();
      row_c[n] = 0;
    }
    if (k <= kSortedMaxK) {
      for (int64_t n = 0; n < (n1 - n0) * cap; ++n) {
        row_v.p[n] = -std::numeric_limits<float>::infinity();
      }
    }
  } else {
    for (int64_t n = 0; n < n1 - n0; ++n) {
      row_v.p[n] = -std::numeric_limits<float>::infinity();
      row_i[n] = 0;
    }
  }

  for (int64_t k0 = c0; k0 < c1; k0 += blk) {
    const int64_t tiles = (std::min(blk, c1 - k0) + NR - 1) / NR;
    pack_block<kIn, V>(p, k0, tiles, pk.p, sc.p, bs.p);
    for (int64_t n = n0; n < n1; n += MR) {
      const int R = static_cast<int>(std::min<int64_t>(MR, n1 - n));
      const float* zr[MR];
      if constexpr (kIn == In::F32) {
        for (int r = 0; r < R; ++r) zr[r] = static_cast<const float*>(p.z) + (n + r) * D;
      } else {
        constexpr int W = V::W;
        for (int r = 0; r < R; ++r) {
          float* dst = zbuf.p + r * D;
          const int64_t off = (n + r) * D;
          int64_t d = 0;
          for (; d + W <= D; d += W) {
            typename V::F v;
            load_lanes<kIn, V>(v, p.z, off + d);
            store_vec(dst + d, v);
          }
          for (; d < D; ++d) dst[d] = load_elem<kIn>(p.z, off + d);
          zr[r] = dst;
        }
      }
      if constexpr (kTopk) {
        // The pools live across blocks, which arrive in increasing k like the tiles in a block.
        const int64_t i = n - n0;
        const TopkPools pools{
            row_v.p + i * cap, row_i.get() + i * cap, row_c.get() + i, row_t.p + i, k, cap, k0};
        if (R == MR) {
          run_group<V, MR>(zr, pk.p, sc.p, bs.p, tiles, D, pools);
        } else {
          run_rest<V>(R, zr, pk.p, sc.p, bs.p, tiles, D, pools);
        }
      } else {
        float bv[MR];
        int32_t bi[MR];
        if (R == MR) {
          run_group<V, MR>(zr, pk.p, sc.p, bs.p, tiles, D, bv, bi);
        } else {
          run_rest<V>(R, zr, pk.p, sc.p, bs.p, tiles, D, &bv[0], &bi[0]);
        }
        // Blocks arrive in increasing k, so a strict `>` keeps the lowest index on ties.
        for (int r = 0; r < R; ++r) {
          if (bv[r] > row_v.p[n - n0 + r]) {
            row_v.p[n - n0 + r] = bv[r];
            row_i[n - n0 + r] = k0 + bi[r];
          }
        }
      }
    }
  }

  if constexpr (kTopk) {
    // (N, k) indices, or each split's sorted top k with its scores for the merge.
    std::unique_ptr<float[]> scratch(new float[2 * cap]);
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t i = n - n0;
      if (p.splits == 1) {
        pool_finish(row_v.p + i * cap, row_i.get() + i * cap, row_c[i], k, scratch.get(),
                    p.out + n * k, nullptr);
      } else {
        const int64_t at = (n * p.splits + s) * k;
        pool_finish(row_v.p + i * cap, row_i.get() + i * cap, row_c[i], k, scratch.get(),
                    p.part_idx + at, p.part_val + at);
      }
    }
  } else {
    for (int64_t n = n0; n < n1; ++n) {
      if (p.splits == 1) {
        p.out[n] = row_i[n - n0];
      } else {
        p.part_val[n * p.splits + s] = row_v.p[n - n0];
        p.part_idx[n * p.splits + s] = row_i[n - n0];
      }
    }
  }
}

template <In kIn, bool kTopk>
void item_generic(const Problem& p, int64_t n0, int64_t n1, int64_t c0, int64_t c1, int64_t s) {
  item_body<kIn, Lanes4, kTopk>(p, n0, n1, c0, c1, s);
}

#if defined(FASTVQ_X86) && !defined(FASTVQ_NO_MULTIVERSION)
template <In kIn, bool kTopk>
__attribute__((target("avx2,fma"))) void item_avx2(const Problem& p, int64_t n0, int64_t n1,
                                                   int64_t c0, int64_t c1, int64_t s) {
  item_body<kIn, Lanes8, kTopk>(p, n0, n1, c0, c1, s);
}
#endif

using ItemFn = void (*)(const Problem&, int64_t, int64_t, int64_t, int64_t, int64_t);

template <In kIn, bool kTopk>
ItemFn pick_item_fn() {
#if defined(FASTVQ_X86) && !defined(FASTVQ_NO_MULTIVERSION)
  if (cpu::use_avx2(/*with_fma=*/true)) return &item_avx2<kIn, kTopk>;
#endif
  return &item_generic<kIn, kTopk>;
}

void check_code_term(const std::optional<at::Tensor>& t, const char* op, const char* name,
                     int64_t K) {
  if (!t.has_value()) return;
  TORCH_CHECK_VALUE(t->device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ",
              t->device());
  TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
              t->scalar_type());
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == K, op, ": ", name, " must have shape (K,) = (", K,
              ",), got ", t->sizes());
  TORCH_CHECK_VALUE(t->is_contiguous(), op, ": ", name, " must be contiguous");
}

// nearest_code (topk = 0: out (N,)) and nearest_code_topk (topk = k: out (N, k)).
at::Tensor nearest_code_run(const char* op, const at::Tensor& z, const at::Tensor& codebook,
                            const std::optional<at::Tensor>& code_scale,
                            const std::optional<at::Tensor>& code_bias, int64_t topk) {
  TORCH_CHECK_VALUE(z.device().is_cpu() && codebook.device().is_cpu(), op,
              " (CPU): z and codebook must be CPU tensors, got ", z.device(), " and ",
              codebook.device());
  TORCH_CHECK_VALUE(z.dim() == 2, op, ": z must have shape (N, D), got ", z.sizes());
  TORCH_CHECK_VALUE(codebook.dim() == 2, op, ": codebook must have shape (K, D), got ", codebook.sizes());
  const int64_t N = z.size(0);
  const int64_t K = codebook.size(0);
  const int64_t D = codebook.size(1);
  TORCH_CHECK_VALUE(z.size(1) == D, op, ": z's D (", z.size(1), ") must equal codebook's D (", D, ")");
  TORCH_CHECK_VALUE(K >= 1, op, ": codebook must hold at least one code (K >= 1)");
  TORCH_CHECK_VALUE(D >= 1 && D <= kMaxDim, op, ": D must be between 1 and ", kMaxDim, ", got ", D);
  TORCH_CHECK_TYPE(z.scalar_type() == codebook.scalar_type(), op,
              ": z and codebook must have the same dtype, got ", z.scalar_type(), " and ",
              codebook.scalar_type());
  const auto dtype = z.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": dtype must be float32, bfloat16 or float16, got ", dtype);
  for (const auto* t : {&z, &codebook}) {
    TORCH_CHECK_VALUE(t->is_contiguous(), op, ": ", t == &z ? "z" : "codebook", " must be contiguous");
  }
  check_code_term(code_scale, op, "code_scale", K);
  check_code_term(code_bias, op, "code_bias", K);

  at::Tensor out = topk > 0 ? at::empty({N, topk}, z.options().dtype(at::kLong))
                            : at::empty({N}, z.options().dtype(at::kLong));
  if (N == 0) return out;

  Problem p{};
  p.z = z.data_ptr();
  p.codebook = codebook.data_ptr();
  p.scale = code_scale.has_value() ? code_scale->data_ptr<float>() : nullptr;
  p.bias = code_bias.has_value() ? code_bias->data_ptr<float>() : nullptr;
  p.N = N;
  p.K = K;
  p.D = D;
  p.block_codes = std::max<int64_t>(kCodeUnit, kBlockBytes / (sizeof(float) * D) / kCodeUnit *
                                                   kCodeUnit);
  if (dtype != at::kFloat) {
    // Half rows are converted once per (row group, block): at D = 1024 a 3-tile block made the
    // conversion cost as much as the FMAs; 128 codes bound it to ~1/8.
    p.block_codes = std::max<int64_t>(p.block_codes, 8 * kCodeUnit);
  }
  p.topk = topk;
  p.out = out.data_ptr<int64_t>();

  ItemFn fn;
  if (topk > 0) {
    fn = dtype == at::kFloat      ? pick_item_fn<In::F32, true>()
         : dtype == at::kBFloat16 ? pick_item_fn<In::BF16, true>()
                                  : pick_item_fn<In::F16, true>();
  } else {
    fn = dtype == at::kFloat      ? pick_item_fn<In::F32, false>()
         : dtype == at::kBFloat16 ? pick_item_fn<In::BF16, false>()
                                  : pick_item_fn<In::F16, false>();
  }

  // Rows are handed out in groups of MR, codes in units of kCodeUnit.
  const int64_t groups = (N + MR - 1) / MR;
  const int64_t units = (K + kCodeUnit - 1) / kCodeUnit;
  const int64_t threads = std::max(1, at::get_num_threads());
  const int64_t min_groups = (kMinRowsPerItem + MR - 1) / MR;
  auto run = [&](int64_t g0, int64_t g1, int64_t u0, int64_t u1, int64_t s) {
    fn(p, g0 * MR, std::min(g1 * MR, N), u0 * kCodeUnit, std::min(u1 * kCodeUnit, K), s);
  };

  if (threads == 1 || groups >= threads * min_groups || units == 1) {
    // Rows only: each thread packs the codebook once for its (large) row range.
    p.splits = 1;
    at::parallel_for(0, groups, min_groups,
                     [&](int64_t g0, int64_t g1) { run(g0, g1, 0, units, 0); });
    return out;
  }

  // Few rows per thread: split K into S ranges as well, so that R * S items cover the threads.
  const int64_t R = std::min(threads, (groups + min_groups - 1) / min_groups);
  const int64_t S = std::min({kMaxSplits, (threads + R - 1) / R, units});
  if (S == 1) {
    p.splits = 1;
    at::parallel_for(0, R, 1, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) run(r * groups / R, (r + 1) * groups / R, 0, units, 0);
    });
    return out;
  }
  const int64_t k = std::max<int64_t>(topk, 1);
  at::Tensor part_val = at::empty({N, S, k}, z.options().dtype(at::kFloat));
  at::Tensor part_idx = at::empty({N, S, k}, z.options().dtype(at::kLong));
  p.splits = S;
  p.part_val = part_val.data_ptr<float>();
  p.part_idx = part_idx.data_ptr<int64_t>();
  at::parallel_for(0, R * S, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t r = i / S;
      const int64_t s = i % S;
      run(r * groups / R, (r + 1) * groups / R, s * units / S, (s + 1) * units / S, s);
    }
  });
  int64_t* o = p.out;
  const float* pv = p.part_val;
  const int64_t* pi = p.part_idx;
  if (topk > 0) {
    // Merge the S sorted lists of a row: a strict `>` takes the earlier split on equal scores,
    // and splits hold increasing k ranges, so ties stay in index order.
    at::parallel_for(0, N, std::max<int64_t>(1, 4096 / (S * k)), [&](int64_t b, int64_t e) {
      int64_t pos[kMaxSplits];
      for (int64_t n = b; n < e; ++n) {
        const float* v = pv + n * S * k;
        const int64_t* ix = pi + n * S * k;
        int64_t* on = o + n * k;
        std::fill(pos, pos + S, 0);
        int64_t j = 0;
        for (; j < k; ++j) {
          int64_t best = -1;
          float bv = -std::numeric_limits<float>::infinity();  // past a split's codes: -inf
          for (int64_t s = 0; s < S; ++s) {
            if (pos[s] < k && v[s * k + pos[s]] > bv) {
              bv = v[s * k + pos[s]];
              best = s;
            }
          }
          if (best < 0) break;
          on[j] = ix[best * k + pos[best]++];
        }
        fill_rest(on, j, k);
      }
    });
    return out;
  }
  // Splits hold increasing k ranges, so a strict `>` keeps the lowest index on ties.
  at::parallel_for(0, N, 4096, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      float v = -std::numeric_limits<float>::infinity();
      int64_t idx = 0;
      for (int64_t s = 0; s < S; ++s) {
        if (pv[n * S + s] > v) {
          v = pv[n * S + s];
          idx = pi[n * S + s];
        }
      }
      o[n] = idx;
    }
  });
  return out;
}

at::Tensor nearest_code_cpu(const at::Tensor& z, const at::Tensor& codebook,
                            const std::optional<at::Tensor>& code_scale,
                            const std::optional<at::Tensor>& code_bias, bool fast,
                            std::optional<bool> screen) {
  (void)fast;  // float32 products are exact-mode products already; there is nothing faster here
  (void)screen;
  return nearest_code_run("fastvq::nearest_code", z, codebook, code_scale, code_bias, 0);
}

at::Tensor nearest_code_topk_cpu(const at::Tensor& z, const at::Tensor& codebook,
                                 const std::optional<at::Tensor>& code_scale,
                                 const std::optional<at::Tensor>& code_bias, int64_t k, bool fast) {
  (void)fast;
  const char* op = "fastvq::nearest_code_topk";
  TORCH_CHECK_VALUE(codebook.dim() == 2, op, ": codebook must have shape (K, D), got ", codebook.sizes());
  const int64_t max_k = std::min(codebook.size(0), kMaxTopk);
  TORCH_CHECK_VALUE(k >= 1 && k <= max_k, op, ": k must be between 1 and min(K, ", kMaxTopk,
              ") = ", max_k, ", got k = ", k);
  return nearest_code_run(op, z, codebook, code_scale, code_bias, k);
}

}  // namespace
}  // namespace fastvq

TORCH_LIBRARY_IMPL(fastvq, CPU, m) {
  m.impl("nearest_code", &fastvq::nearest_code_cpu);
  m.impl("nearest_code_topk", &fastvq::nearest_code_topk_cpu);
}

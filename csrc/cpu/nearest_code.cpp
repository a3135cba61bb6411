// CPU kernel of fastvq::nearest_code: idx[n] = argmax_k dot(z[n], c[k]) * scale[k] + bias[k].
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
// Measured (bench/results/nearest_code-cpu.json, 2-core AMD EPYC, AVX2): 0.104 TFLOP/s at
// N = 8192, K = 16,384, D = 32, 10.7x the chunked PyTorch reference in the same run.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>

#include "isa.h"

#if !defined(__GNUC__)
#error "csrc/cpu/nearest_code.cpp needs GCC or Clang vector extensions"
#endif

#define FASTVQ_INLINE inline __attribute__((always_inline))

namespace fastvq {
namespace {

constexpr int MR = 6;                   // rows per micro-kernel
constexpr int64_t kCodeUnit = 16;       // K splits and blocks start at multiples of this (>= NR)
constexpr int64_t kBlockBytes = 96 * 1024;  // packed float32 codes per block (L2 is 512 KiB);
                                            // 24-384 KiB ran D = 32 alike, 96 led at D >= 256
constexpr int64_t kMinRowsPerItem = 1024;   // fewer rows per thread than this: also split K
constexpr int64_t kMaxSplits = 64;
constexpr int64_t kMaxDim = 1024;

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
  int64_t* out;         // (N,)
  float* part_val;      // (N, S) when S > 1
  int64_t* part_idx;    // (N, S) when S > 1
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
// score = acc * scale + bias, and a lane takes the score when it beats its best with a strict `>`.
template <class V, int R, int TT>
FASTVQ_INLINE void tiles_step(const float* const* zr, const float* pk, const float* sc,
                              const float* bs, int64_t t, int64_t D, typename V::F (&bv)[R][2],
                              typename V::I (&bi)[R][2]) {
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
      const I m0 = x0 > bv[r][0];
      const I m1 = x1 > bv[r][1];
      bv[r][0] = m0 ? x0 : bv[r][0];
      bv[r][1] = m1 ? x1 : bv[r][1];
      bi[r][0] = m0 ? i0 : bi[r][0];
      bi[r][1] = m1 ? i1 : bi[r][1];
    }
  }
}

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
  F bv[R][2];
  I bi[R][2];
  for (int r = 0; r < R; ++r) {
    for (int h = 0; h < 2; ++h) {
      bv[r][h] = F{} + neg_inf;
      bi[r][h] = I{} + no_idx;
    }
  }
  // Few rows leave FMA latency exposed (one row: 2 chains of 4-cycle FMAs); stepping over
  // several tiles fills the 2 * MR accumulators. Each score is still the same chain over d.
  constexpr int TT = MR / R > 4 ? 4 : MR / R;
  int64_t t = 0;
  for (; t + TT <= tiles; t += TT) tiles_step<V, R, TT>(zr, pk, sc, bs, t, D, bv, bi);
  for (; t < tiles; ++t) tiles_step<V, R, 1>(zr, pk, sc, bs, t, D, bv, bi);
  for (int r = 0; r < R; ++r) {
    float v = neg_inf;
    int32_t i = no_idx;
    for (int h = 0; h < 2; ++h) {
      for (int l = 0; l < V::W; ++l) {
        const float lv = bv[r][h][l];
        const int32_t li = bi[r][h][l];
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

// run_group for the last R < MR rows of an item, R made a compile-time constant.
template <class V, int R = MR - 1>
FASTVQ_INLINE void run_rest(int rows, const float* const* zr, const float* pk, const float* sc,
                            const float* bs, int64_t tiles, int64_t D, float* best_v,
                            int32_t* best_i) {
  if constexpr (R >= 1) {
    if (rows == R) {
      run_group<V, R>(zr, pk, sc, bs, tiles, D, best_v, best_i);
    } else {
      run_rest<V, R - 1>(rows, zr, pk, sc, bs, tiles, D, best_v, best_i);
    }
  }
}

// One work item: rows [n0, n1) against codes [c0, c1) (split s of p.splits). c0 and c1 are
// multiples of kCodeUnit, or c1 = K.
template <In kIn, class V>
FASTVQ_INLINE void item_body(const Problem& p, int64_t n0, int64_t n1, int64_t c0, int64_t c1,
                             int64_t s) {
  constexpr int NR = 2 * V::W;
  const int64_t D = p.D;
  const int64_t blk = std::min(p.block_codes, c1 - c0);
  const int64_t blk_tiles = (blk + NR - 1) / NR;
  Buffer pk(blk_tiles * NR * D);
  Buffer sc(blk_tiles * NR);
  Buffer bs(blk_tiles * NR);
  Buffer zbuf(kIn == In::F32 ? 1 : MR * D);
  Buffer row_v(n1 - n0);
  std::unique_ptr<int64_t[]> row_i(new int64_t[n1 - n0]);
  for (int64_t n = 0; n < n1 - n0; ++n) {
    row_v.p[n] = -std::numeric_limits<float>::infinity();
    row_i[n] = 0;
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
      float bv[MR];
      int32_t bi[MR];
      if (R == MR) {
        run_group<V, MR>(zr, pk.p, sc.p, bs.p, tiles, D, bv, bi);
      } else {
        run_rest<V>(R, zr, pk.p, sc.p, bs.p, tiles, D, bv, bi);
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

  for (int64_t n = n0; n < n1; ++n) {
    if (p.splits == 1) {
      p.out[n] = row_i[n - n0];
    } else {
      p.part_val[n * p.splits + s] = row_v.p[n - n0];
      p.part_idx[n * p.splits + s] = row_i[n - n0];
    }
  }
}

template <In kIn>
void item_generic(const Problem& p, int64_t n0, int64_t n1, int64_t c0, int64_t c1, int64_t s) {
  item_body<kIn, Lanes4>(p, n0, n1, c0, c1, s);
}

#if defined(FASTVQ_X86) && !defined(FASTVQ_NO_MULTIVERSION)
template <In kIn>
__attribute__((target("avx2,fma"))) void item_avx2(const Problem& p, int64_t n0, int64_t n1,
                                                   int64_t c0, int64_t c1, int64_t s) {
  item_body<kIn, Lanes8>(p, n0, n1, c0, c1, s);
}
#endif

using ItemFn = void (*)(const Problem&, int64_t, int64_t, int64_t, int64_t, int64_t);

template <In kIn>
ItemFn pick_item_fn() {
#if defined(FASTVQ_X86) && !defined(FASTVQ_NO_MULTIVERSION)
  if (cpu::use_avx2(/*with_fma=*/true)) return &item_avx2<kIn>;
#endif
  return &item_generic<kIn>;
}

void check_code_term(const std::optional<at::Tensor>& t, const char* name, int64_t K) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device().is_cpu(), "fastvq::nearest_code: ", name,
              " must be a CPU tensor, got device ", t->device());
  TORCH_CHECK(t->scalar_type() == at::kFloat, "fastvq::nearest_code: ", name,
              " must be float32, got ", t->scalar_type());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == K, "fastvq::nearest_code: ", name,
              " must have shape (K,) = (", K, ",), got ", t->sizes());
  TORCH_CHECK(t->is_contiguous(), "fastvq::nearest_code: ", name, " must be contiguous");
}

at::Tensor nearest_code_cpu(const at::Tensor& z, const at::Tensor& codebook,
                            const std::optional<at::Tensor>& code_scale,
                            const std::optional<at::Tensor>& code_bias, bool fast) {
  (void)fast;  // float32 products are exact-mode products already; there is nothing faster here
  TORCH_CHECK(z.device().is_cpu() && codebook.device().is_cpu(),
              "fastvq::nearest_code (CPU): z and codebook must be CPU tensors, got ", z.device(),
              " and ", codebook.device());
  TORCH_CHECK(z.dim() == 2, "fastvq::nearest_code: z must have shape (N, D), got ", z.sizes());
  TORCH_CHECK(codebook.dim() == 2, "fastvq::nearest_code: codebook must have shape (K, D), got ",
              codebook.sizes());
  const int64_t N = z.size(0);
  const int64_t K = codebook.size(0);
  const int64_t D = codebook.size(1);
  TORCH_CHECK(z.size(1) == D, "fastvq::nearest_code: z's D (", z.size(1),
              ") must equal codebook's D (", D, ")");
  TORCH_CHECK(K >= 1, "fastvq::nearest_code: codebook must hold at least one code (K >= 1)");
  TORCH_CHECK(D >= 1 && D <= kMaxDim, "fastvq::nearest_code: D must be between 1 and ", kMaxDim,
              ", got ", D);
  TORCH_CHECK(z.scalar_type() == codebook.scalar_type(),
              "fastvq::nearest_code: z and codebook must have the same dtype, got ",
              z.scalar_type(), " and ", codebook.scalar_type());
  const auto dtype = z.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "fastvq::nearest_code: dtype must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(z.is_contiguous() && codebook.is_contiguous(),
              "fastvq::nearest_code: z and codebook must be contiguous");
  check_code_term(code_scale, "code_scale", K);
  check_code_term(code_bias, "code_bias", K);

  at::Tensor out = at::empty({N}, z.options().dtype(at::kLong));
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
  p.out = out.data_ptr<int64_t>();

  ItemFn fn = dtype == at::kFloat      ? pick_item_fn<In::F32>()
              : dtype == at::kBFloat16 ? pick_item_fn<In::BF16>()
                                       : pick_item_fn<In::F16>();

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
  at::Tensor part_val = at::empty({N, S}, z.options().dtype(at::kFloat));
  at::Tensor part_idx = at::empty({N, S}, z.options().dtype(at::kLong));
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
  // Splits hold increasing k ranges, so a strict `>` keeps the lowest index on ties.
  int64_t* o = p.out;
  const float* pv = p.part_val;
  const int64_t* pi = p.part_idx;
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

}  // namespace
}  // namespace fastvq

TORCH_LIBRARY_IMPL(fastvq, CPU, m) { m.impl("nearest_code", &fastvq::nearest_code_cpu); }

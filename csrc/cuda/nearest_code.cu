// CUDA kernels of fastvq::nearest_code: idx[n] = argmax_k dot(z[n], c[k]) * scale[k] + bias[k].
// Torch-free (raw pointers); the launch interface is nearest_code.h, the torch glue
// nearest_code.cpp.
//
// Design: a tensor-core GEMM z @ codebook^T whose epilogue keeps a running argmax, so the N x K
// scores never leave the SM.
//   - CTA = 8 warps, tile of BM = 128 rows of z x BN = 128 codes; warps 2 (M) x 4 (N), each warp
//     64 rows x 32 codes = 4 x 4 mma.sync accumulators of 16 x 8. The CTA walks its codebook range
//     tile by tile and each tile over D in BK = 32 chunks.
//   - Products through PTX mma.sync (mma_sync.h; HMMA on sm_80 and sm_90), whose documented
//     fragment layouts let the epilogue work on the accumulators in registers:
//       bf16 / fp16 inputs: m16n8k16 with operands of the input type, fp32 accumulate (exact
//                           products);
//       float32, fast:      operands rounded to bf16 while staged into shared memory (2^-8 relative
//                           per operand; the precision of the torch and Triton fast paths);
//       float32, exact:     3xTF32, m16n8k8 tf32: x = hi + lo with hi = tf32(x), lo = tf32(x - hi),
//                           acc += lo*hi' + hi*lo' + hi*hi' (lo*lo' dropped): about 2^-21
//                           relative per product, within "float32 up to rounding";
//       float32, screened:  large exact searches (nearest_code.h's Screen) as the Triton
//                           search does them (kernels/nearest_code.py's module docstring):
//                           tf32_split_kernel rounds z and the codebook to tf32 and takes the
//                           norms of both and of their residuals; a screening pass (kScreen: one
//                           tf32 MMA per term, a runner-up per lane row, merged with the bests)
//                           appends the rows whose margin is within twice screening_bound to a
//                           list (an atomic counter: order free, answers not); then a 3xTF32
//                           pass over the listed rows only, its CTAs past the count exiting at
//                           once, so nothing waits on the host. The same answer as 3xTF32.
//   - Staging: global -> registers -> shared memory, double-buffered: the loads of stage s + 1 are
//     issued before the MMAs of stage s and stored after them, one __syncthreads per stage. 16-byte
//     loads when D and the base pointers allow, else element loads; rows past N or K and columns
//     past D are zero-filled, so any D (1, 3, 24, 33, 1024) runs the same code. The z block of the
//     CTA (128 x D) stays resident in shared memory when it fits the device's opt-in limit (on
//     H100's 227 KB: D <= 800 with 16-bit staging, D <= 352 for exact fp32), so only codebook
//     tiles stream; otherwise z streams chunk by chunk beside them. Operands go from shared memory
//     to registers by ldmatrix.x4 in the fragment layouts (conflict-free, see SmemLayout).
//   - Epilogue, in registers, per warp and without a barrier: after a tile's last chunk each lane
//     holds the scores of 8 rows x 8 codes (the C layout: rows g, g + 8 of each 16-row fragment,
//     codes 2t, 2t + 1 of each 8-code fragment), the 8 codes' scale and bias in registers (-inf
//     bias for codes past K): score = fmaf(acc, scale, bias), then `score > best` (strict) and two
//     selects. A lane visits its codes in increasing k, so it keeps the lowest index of its
//     maximum; NaN fails the comparison and never wins; best starts at (-inf, 0).
//   - End of CTA: the 4 lanes of a row merge (xor shuffles) and then the 4 warps of a row merge
//     through shared memory by (larger score, then lower index), which keeps "lowest index among
//     the maxima" and "0 when nothing beats -inf". Split-K CTAs write (score, index) partials to
//     the workspace and a second kernel reduces them per row the same way.
//   - Split-K: when the row tiles cannot fill the GPU (N = 1, K = 2^20), the codebook is split into
//     S ranges of whole tiles, S chosen for wave efficiency (see choose_splits). The per-score
//     arithmetic is the same with or without splits, so the result does not depend on S.
//   - 64-bit offsets everywhere a row index meets D; code indices are int32 (K <= 2^31 - 257).
//
// Performance model (DESIGN.md ceilings; predictions, nothing here has run on a GPU) at
// N = K = 65,536, D = 32: 4.3e9 candidates, 2.75e11 flop.
//   - Tensor cores: bf16/fp16/fast at the 772 TFLOP/s wgmma ceiling 0.36 ms; mma.sync runs below
//     the wgmma rate on Hopper. Exact (3xTF32) is 3 tf32 products per term: 8.2e11 flop at
//     391 TFLOP/s = 2.1 ms at best.
//   - Epilogue: 4 lane instructions per candidate (FFMA, FSETP, 2 selects), 0.125 warp
//     instructions per candidate: 5.4e8 over 132 SMs x 4 schedulers at ~1.75 GHz = 0.6 ms, now
//     with no shared-memory traffic (the WMMA version stored every accumulator to shared memory
//     and read it back: 8 B per candidate, 34 GB, ~1.1 ms at ~30 TB/s over the chip).
//   - Operand loads: ~3 B per candidate at D = 32 (each 16-bit A fragment serves 4 codes' MMAs,
//     each B fragment 4 row blocks): 13 GB, ~0.45 ms of shared-memory bandwidth; 6 ldmatrix.x4
//     per 16 MMAs per k16 step (32-bit loads took 24).
//   - So expect ~0.8-1.2 ms for bf16 (epilogue, loads and MMAs overlapping across the 8 warps,
//     not within one) and ~2.5-3 ms for exact fp32 by 3xTF32, against the design's 0.4-0.7 ms
//     for a kernel that overlaps the epilogue with the MMAs explicitly. Screened exact fp32: a
//     tf32 pass (0.7 ms of MMAs at 391 TFLOP/s, 6 epilogue instructions per candidate: ~0.9 ms)
//     plus 3xTF32 over ~6 % of the rows (bench/results/screening_share.json): ~1.1-1.4 ms.
//   - L2 -> SM: each of the N / 128 = 512 row tiles reads the codebook once: 4.3 GB in fp32
//     (2.1 GB in 16-bit), well under a millisecond at L2 rates but not free.
// Next steps, in order of expected gain:
//   1. sm_90a: wgmma with codebook tiles brought by TMA (cp.async.bulk.tensor, 128B swizzle,
//      3-4 stages on mbarriers) from a producer warp (setmaxnreg), z resident in shared memory,
//      two consumer warpgroups ping-ponging so one runs the argmax epilogue while the other's
//      wgmma runs (as FlashAttention-3 overlaps softmax). Persistent grid, tile scheduler.
//   2. cp.async staging instead of the register round trip.
//   3. Thread-block clusters of 2 along N with TMA multicast of codebook tiles: halves L2 reads.
//   4. A screening pass in bf16 (twice tf32's rate) with its wider bound, if the share of rows
//      it leaves to the recheck stays small.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>

#include "mma_sync.h"
#include "nearest_code.h"

namespace fastvq {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBM = 128;  // rows of z per CTA
constexpr int kBN = 128;  // codes per tile
constexpr int kBK = 32;   // D per pipeline stage
constexpr int kWM = 64;   // rows per warp
constexpr int kWN = 32;   // codes per warp
constexpr int kWarpsN = kBN / kWN;
constexpr int kFragsM = kWM / 16;
constexpr int kFragsN = kWN / 8;
static_assert(kFragsN % 2 == 0, "ldmatrix.x4 loads the B fragments of two 8-code blocks");
static_assert((kBM / kWM) * kWarpsN == kWarps, "warp grid must cover the CTA tile");
// Epilogue: lane (g, t) holds rows g and g + 8 of each of the warp's kFragsM 16-row fragments and
// codes 2t, 2t + 1 of each of its kFragsN 8-code fragments (mma_sync.h's C layout): 8 of the warp's
// 64 rows, 8 of its 32 codes per tile.
constexpr int kLaneRows = kFragsM * 2;
constexpr int kLaneCodes = kFragsN * 2;

constexpr int64_t kMaxDim = 1024;
constexpr int64_t kMaxCodes = INT32_MAX - 2 * kBN;
// A split walks at least this many tiles so that its prologue (z block load) and final merge stay
// small next to its loop (a guess to revisit with measurements).
constexpr int64_t kMinTilesPerSplit = 4;
// The contract allows an (N, S) partial buffer with S <= 64; more splits only while N * S <= K,
// which keeps the buffer O(N + K) and lets N = 1 use every SM (64 CTAs would leave half of an
// H100's 132 SMs idle).
constexpr int64_t kSplitsCap = 64;
constexpr int64_t kMaxGridY = 65535;
constexpr int kReduceThreads = 256;
constexpr int kSplitThreads = 256;
constexpr float kFloatMin = 1.17549435e-38f;  // FLT_MIN
// The exact float32 search screens from this many candidates (N x K) and dimensions up, sizing
// the recheck's split for 1 / kRecheckShare of the rows: kernels/nearest_code.py's
// SCREEN_MIN_WORK, SCREEN_MIN_DIM and RECHECK_SHARE (unmeasured guesses, as there).
constexpr int64_t kScreenMinWork = int64_t{1} << 24;
constexpr int64_t kScreenMinDim = 24;
constexpr int64_t kRecheckShare = 16;
// The codebook's maxima that screening_bound takes (Params::code_terms).
constexpr int kCodeTerms = 5;

constexpr float kNegInf = -__builtin_huge_valf();

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ constexpr size_t align_up(size_t a, size_t b) { return (a + b - 1) / b * b; }
__host__ __device__ constexpr int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// ---------------------------------------------------------------------------------------------
// Products. S is the shared-memory element: float (3xTF32) or a 16-bit type (bf16 / fp16 MMAs).
// A warp's tile is kFragsM x kFragsN accumulators of 16 rows x 8 codes (mma_sync.h's C layout).
// Operands come from shared memory by ldmatrix.x4, whose four 8 x 16-byte matrices are one A
// fragment (rows +0 / +8 x the step's first / second 16 bytes of columns) or the B fragments of
// two 8-code blocks. The padded row pitches (SmemLayout) put each 8-row phase on 32 distinct
// banks.

using Acc = float[kFragsM][kFragsN][4];

// The row lane l addresses for ldmatrix.x4: matrix m = l / 8 is rows (m & 1) * 8 + [0, 8) and the
// (m >> 1)-th 16 bytes of the k-step for A; for B, codes (m >> 1) * 8 + [0, 8) and the (m & 1)-th
// 16 bytes.
template <class S>
__device__ __forceinline__ const S* a_row(const S* a, int lda, int mi, int k0, int lane) {
  const int m = lane >> 3;
  return a + (mi * 16 + (m & 1) * 8 + (lane & 7)) * lda + k0 + (m >> 1) * (16 / sizeof(S));
}

template <class S>
__device__ __forceinline__ const S* b_row(const S* b, int ldb, int ni, int k0, int lane) {
  const int m = lane >> 3;
  return b + (ni * 8 + (m >> 1) * 8 + (lane & 7)) * ldb + k0 + (m & 1) * (16 / sizeof(S));
}

template <class S>
struct Mma {
  static_assert(sizeof(S) == 2, "16-bit MMA path");
  static constexpr int kStep = 16;

  // acc[mi][ni] += A[mi*16.., 0..ksteps*16) * B[ni*8.., same]^T. a: the warp's 64 rows of z,
  // row-major with leading dimension lda; b: its 32 codes, one code per row (col-major B).
  static __device__ __forceinline__ void run(Acc& acc, const S* a, int lda, const S* b, int ldb,
                                             int ksteps) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int kk = 0; kk < kBK / kStep; ++kk) {
      if (kk < ksteps) {
        uint32_t fa[kFragsM][4];
        uint32_t fb[kFragsN][2];
#pragma unroll
        for (int mi = 0; mi < kFragsM; ++mi) {
          ptx::ldmatrix_x4(fa[mi], a_row(a, lda, mi, kk * kStep, lane));
        }
#pragma unroll
        for (int ni = 0; ni < kFragsN; ni += 2) {
          uint32_t r[4];
          ptx::ldmatrix_x4(r, b_row(b, ldb, ni, kk * kStep, lane));
          fb[ni][0] = r[0];
          fb[ni][1] = r[1];
          fb[ni + 1][0] = r[2];
          fb[ni + 1][1] = r[3];
        }
#pragma unroll
        for (int mi = 0; mi < kFragsM; ++mi) {
#pragma unroll
          for (int ni = 0; ni < kFragsN; ++ni) ptx::mma_m16n8k16<S>(acc[mi][ni], fa[mi], fb[ni]);
        }
      }
    }
  }
};

// float32: 3xTF32 (kThree), or one tf32 product of operands that hold tf32 values already (the
// screening pass, whose inputs the host-side split rounded).
template <bool kThree>
struct MmaTf32 {
  static constexpr int kStep = 8;

  // hi = tf32(x), lo = tf32(x - hi); x - hi is exact in fp32, and hi + lo carries 22 of x's 24
  // significant bits.
  static __device__ __forceinline__ void split(uint32_t (&x)[4], uint32_t (&lo)[4]) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const float v = __uint_as_float(x[r]);
      x[r] = ptx::to_tf32(v);
      lo[r] = ptx::to_tf32(v - __uint_as_float(x[r]));
    }
  }

  static __device__ __forceinline__ void run(Acc& acc, const float* a, int lda, const float* b,
                                             int ldb, int ksteps) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int kk = 0; kk < kBK / kStep; ++kk) {
      if (kk < ksteps) {
        // ah / bh: the raw floats, then (kThree) their tf32 high parts; al / bl: the low parts.
        uint32_t ah[kFragsM][4], al[kFragsM][4];
        uint32_t bh[kFragsN][2], bl[kFragsN][2];
#pragma unroll
        for (int mi = 0; mi < kFragsM; ++mi) {
          ptx::ldmatrix_x4(ah[mi], a_row(a, lda, mi, kk * kStep, lane));
          if constexpr (kThree) split(ah[mi], al[mi]);
        }
#pragma unroll
        for (int ni = 0; ni < kFragsN; ni += 2) {
          uint32_t r[4], lo[4];
          ptx::ldmatrix_x4(r, b_row(b, ldb, ni, kk * kStep, lane));
          if constexpr (kThree) split(r, lo);
          bh[ni][0] = r[0];
          bh[ni][1] = r[1];
          bh[ni + 1][0] = r[2];
          bh[ni + 1][1] = r[3];
          if constexpr (kThree) {
            bl[ni][0] = lo[0];
            bl[ni][1] = lo[1];
            bl[ni + 1][0] = lo[2];
            bl[ni + 1][1] = lo[3];
          }
        }
        // The small cross terms first, so that they are not absorbed by a large partial sum.
#pragma unroll
        for (int mi = 0; mi < kFragsM; ++mi) {
#pragma unroll
          for (int ni = 0; ni < kFragsN; ++ni) {
            if constexpr (kThree) {
              ptx::mma_m16n8k8_tf32(acc[mi][ni], al[mi], bh[ni]);
              ptx::mma_m16n8k8_tf32(acc[mi][ni], ah[mi], bl[ni]);
            }
            ptx::mma_m16n8k8_tf32(acc[mi][ni], ah[mi], bh[ni]);
          }
        }
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Staging: a stage is ROWS rows x kBK columns of z or codebook, moved in 16-byte units of
// kVec = 16 / sizeof(In) elements, unit u = threadIdx.x + i * kThreads -> (row u / kUnitsPerRow,
// column (u % kUnitsPerRow) * kVec), so a warp reads whole row segments (coalesced).

template <class In>
__device__ __forceinline__ uint32_t load_bits(const In* p) {
  if constexpr (sizeof(In) == 4) {
    return __ldg(reinterpret_cast<const unsigned int*>(p));
  } else {
    return __ldg(reinterpret_cast<const unsigned short*>(p));
  }
}

// Elements [col, col + kVec) of row `row` (of `rows`, each `d` long) as raw bits; zero where the
// row or a column is out of range. vec: d % kVec == 0 and the base is 16-byte aligned.
template <class In>
__device__ __forceinline__ uint4 load_unit(const In* __restrict__ base, int64_t row, int64_t rows,
                                           int64_t col, int64_t d, bool vec) {
  constexpr int kVec = 16 / sizeof(In);
  uint4 u = make_uint4(0u, 0u, 0u, 0u);
  if (row >= rows || col >= d) return u;
  const In* p = base + row * d + col;
  if (vec) return __ldg(reinterpret_cast<const uint4*>(p));
  uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    if (col + e < d) {
      const uint32_t bits = load_bits(p + e);
      if constexpr (sizeof(In) == 4) {
        w[e] = bits;
      } else {
        w[e / 2] |= bits << (16 * (e % 2));
      }
    }
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

template <class In, class S>
__device__ __forceinline__ void store_unit(S* dst, const uint4& u) {
  if constexpr (std::is_same<In, S>::value) {
    *reinterpret_cast<uint4*>(dst) = u;
  } else {
    static_assert(std::is_same<In, float>::value && std::is_same<S, __nv_bfloat16>::value,
                  "the only conversion is float32 -> bf16 (fast mode)");
    const __nv_bfloat162 lo = __floats2bfloat162_rn(__uint_as_float(u.x), __uint_as_float(u.y));
    const __nv_bfloat162 hi = __floats2bfloat162_rn(__uint_as_float(u.z), __uint_as_float(u.w));
    uint2 w;
    w.x = *reinterpret_cast<const uint32_t*>(&lo);
    w.y = *reinterpret_cast<const uint32_t*>(&hi);
    *reinterpret_cast<uint2*>(dst) = w;
  }
}

template <class In, int ROWS>
struct Stage {
  static constexpr int kVec = 16 / sizeof(In);
  static constexpr int kUnitsPerRow = kBK / kVec;
  static constexpr int kUnits = ROWS * kUnitsPerRow / kThreads;
  static_assert(ROWS * kUnitsPerRow % kThreads == 0, "stage must split evenly over the CTA");
  uint4 u[kUnits];

  // Rows row0 + [0, ROWS) of base, or with a map the rows it lists at those entries (entries
  // from map_end on load zeros).
  __device__ __forceinline__ void load(const In* base, int64_t row0, int64_t rows, int64_t col0,
                                       int64_t d, bool vec, const int64_t* map = nullptr,
                                       int64_t map_end = 0) {
#pragma unroll
    for (int i = 0; i < kUnits; ++i) {
      const int unit = threadIdx.x + i * kThreads;
      int64_t row = row0 + unit / kUnitsPerRow;
      if (map != nullptr) row = row < map_end ? map[row] : rows;
      u[i] = load_unit(base, row, rows, col0 + (unit % kUnitsPerRow) * kVec, d, vec);
    }
  }

  template <class S>
  __device__ __forceinline__ void store(S* dst, int ld) const {
#pragma unroll
    for (int i = 0; i < kUnits; ++i) {
      const int unit = threadIdx.x + i * kThreads;
      store_unit<In>(dst + (unit / kUnitsPerRow) * ld + (unit % kUnitsPerRow) * kVec, u[i]);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Shared-memory layout, shared by the kernel and the host (byte offsets, 128-byte aligned):
//   [B: 2 stages x kBN x ldb] [A: resident kBM x lda, or 2 stages x kBM x lda]
// ld = columns + 16 bytes of padding (4 floats or 8 halves): a row pitch of 4 x (odd) words, so
// the 8 rows a fragment load touches start on 8 distinct groups of 4 banks, and the 4 words each
// row gives (lanes t = 0..3) fill them: no bank conflicts there, nor in 16-byte staging stores.

struct SmemLayout {
  int ldb, lda;
  size_t a_offset, bytes;
};

__host__ __device__ inline SmemLayout smem_layout(int elem_bytes, bool a_resident, int64_t d) {
  SmemLayout l;
  const int pad = 16 / elem_bytes;
  l.ldb = kBK + pad;
  l.lda = a_resident ? static_cast<int>(ceil_div(d, kBK) * kBK) + pad : kBK + pad;
  const size_t b_bytes = size_t{2} * kBN * l.ldb * elem_bytes;
  const size_t a_bytes = static_cast<size_t>(a_resident ? 1 : 2) * kBM * l.lda * elem_bytes;
  l.a_offset = align_up(b_bytes, 128);
  l.bytes = l.a_offset + a_bytes;
  return l;
}

struct Params {
  const void* z;         // (n, d)
  const void* codebook;  // (k, d)
  const float* scale;    // (k,) or nullptr
  const float* bias;     // (k,) or nullptr
  int64_t n, k, d;
  int64_t tiles_per_split;  // codebook tiles per blockIdx.y
  int splits;               // S; 1 writes out directly
  int chunks;               // ceil(d / kBK)
  bool a_resident;
  bool vec;         // 16-byte global loads
  int64_t* out;     // (n,)
  float* part_v;    // (n, S) when S > 1
  int32_t* part_i;  // (n, S) when S > 1
  // A recheck searches only the rows listed in rows[0, *row_count): CTA x takes entries
  // [x * kBM, (x + 1) * kBM), its partials go to (entry, split) and its indices to the rows.
  const int64_t* rows;  // or nullptr: all n rows
  const int32_t* row_count;
  // The screening pass appends the rows whose margin is not above twice screening_bound to
  // flagged[(*flagged_count)++], in no particular order.
  const double* z_terms;     // (n, 2): |z|, |z - tf32(z)|
  const double* code_terms;  // (5,): maxima of s |c|, s |c - tf32(c)|, |bias|, s, |c| (s = |scale|)
  double rel, tiny_d;
  int64_t* flagged;
  int32_t* flagged_count;
};

// kernels/nearest_code.py's _screening_bound, where the derivation is: per row, a bound on
// |screening score - 3xTF32 score| that holds for every code, infinite where a score or a
// product's partial sum may come near float32's range.
__device__ __forceinline__ double screening_bound(double z_norm, double z_res, const double* code,
                                                  double rel, double tiny_d) {
  const double u = code[0], v = code[1], bias_max = code[2], scale_max = code[3], c_max = code[4];
  const double z_tilde = z_norm + z_res;
  const double bound = z_res * u + z_tilde * v + rel * (z_tilde * (u + v) + bias_max);
  const double reach = z_tilde * (u + v + c_max) + bias_max;
  // NaN reach (non-finite inputs) fails the comparison too.
  return reach < 0x1p126 ? (bound + tiny_d * (1 + scale_max)) * 1.0009765625 : __builtin_huge_val();
}

// (v, i) replaces (bv, bi): larger score, or the same score at a lower index. Never NaN here:
// candidates enter the running bests only through `>`.
__device__ __forceinline__ bool better(float v, int32_t i, float bv, int32_t bi) {
  return v > bv || (v == bv && i < bi);
}

// ---------------------------------------------------------------------------------------------

// kScreen: the screening pass (float32 operands already rounded to tf32): one tf32 product per
// term, and each lane keeps beside its best the best of its other codes (its runner-up), so that
// the row's margin decides whether the row is flagged for the 3xTF32 recheck.
template <class In, class S, bool kScreen>
__global__ void __launch_bounds__(kThreads, 1) nearest_code_kernel(const Params p) {
  static_assert(!kScreen || (std::is_same<In, float>::value && std::is_same<S, float>::value),
                "only the exact float32 search screens");
  using M =
      typename std::conditional<std::is_same<S, float>::value, MmaTf32<!kScreen>, Mma<S>>::type;
  extern __shared__ __align__(128) unsigned char smem[];

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wm = warp / kWarpsN;
  const int wn = warp % kWarpsN;
  const int g = lane >> 2;  // epilogue: rows g, g + 8 of each fragment
  const int tg = lane & 3;  // epilogue: codes 2 tg, 2 tg + 1 of each fragment

  const SmemLayout lay = smem_layout(sizeof(S), p.a_resident, p.d);
  S* const b_smem = reinterpret_cast<S*>(smem);
  S* const a_smem = reinterpret_cast<S*>(smem + lay.a_offset);

  const In* const z = static_cast<const In*>(p.z);
  const In* const cb = static_cast<const In*>(p.codebook);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBM;
  // A recheck's CTAs past its listed rows exit, before any barrier.
  const int64_t row_end = p.rows != nullptr ? int64_t{*p.row_count} : p.n;
  if (row0 >= row_end) return;
  const int split = blockIdx.y;
  const int64_t code0 = static_cast<int64_t>(split) * p.tiles_per_split * kBN;
  const int64_t tiles = min64(p.tiles_per_split, ceil_div(p.k - code0, kBN));
  const int64_t steps = tiles * p.chunks;
  // Warps whose 64 rows all lie past N (N <= 64) skip MMAs and epilogue; they still stage.
  const bool warp_active = row0 + wm * kWM < row_end;

  float best_v[kLaneRows];
  int32_t best_i[kLaneRows];
  float runner[kLaneRows];  // kScreen
#pragma unroll
  for (int r = 0; r < kLaneRows; ++r) {
    best_v[r] = kNegInf;
    best_i[r] = 0;
    runner[r] = kNegInf;
  }

  // Prologue: the first codebook stage and z's first chunk in flight together; a resident z block
  // loads chunk c + 1 while chunk c is stored (up to 25 chunks at D = 800 in 16-bit).
  Stage<In, kBN> stage_b;
  Stage<In, kBM> stage_a;
  stage_b.load(cb, code0, p.k, 0, p.d, p.vec);
  stage_a.load(z, row0, p.n, 0, p.d, p.vec, p.rows, row_end);
  if (p.a_resident) {
    for (int c = 0; c < p.chunks; ++c) {
      Stage<In, kBM> next;
      if (c + 1 < p.chunks) {
        next.load(z, row0, p.n, int64_t{c + 1} * kBK, p.d, p.vec, p.rows, row_end);
      }
      stage_a.store(a_smem + c * kBK, lay.lda);
      stage_a = next;
    }
  } else {
    stage_a.store(a_smem, lay.lda);
  }
  stage_b.store(b_smem, lay.ldb);
  __syncthreads();

  Acc acc;
  float sc[kLaneCodes], bs[kLaneCodes];
  int64_t t = 0;  // tile of this step
  int c = 0;      // D chunk of this step
  for (int64_t s = 0; s < steps; ++s) {
    const int buf = static_cast<int>(s & 1);
    int64_t t_next = t;
    int c_next = c + 1;
    if (c_next == p.chunks) {
      c_next = 0;
      ++t_next;
    }
    const bool has_next = s + 1 < steps;
    // Loads of the next stage are in flight during this stage's MMAs.
    if (has_next) {
      stage_b.load(cb, code0 + t_next * kBN, p.k, int64_t{c_next} * kBK, p.d, p.vec);
      if (!p.a_resident) {
        stage_a.load(z, row0, p.n, int64_t{c_next} * kBK, p.d, p.vec, p.rows, row_end);
      }
    }
    const bool last_chunk = c == p.chunks - 1;
    const int64_t tile_code = code0 + t * kBN + wn * kWN + 2 * tg;  // the lane's first code
    if (last_chunk) {
      // Codes past K get scale 0 and bias -inf: their (zero) accumulator scores -inf (NaN if z
      // holds inf), which never passes `>`. Lane code e is tile_code + 8 (e / 2) + e % 2.
#pragma unroll
      for (int e = 0; e < kLaneCodes; ++e) {
        const int64_t kk = tile_code + 8 * (e / 2) + e % 2;
        const bool in = kk < p.k;
        sc[e] = in ? (p.scale ? __ldg(p.scale + kk) : 1.f) : 0.f;
        bs[e] = in ? (p.bias ? __ldg(p.bias + kk) : 0.f) : kNegInf;
      }
    }
    if (warp_active) {
      if (c == 0) {
#pragma unroll
        for (int mi = 0; mi < kFragsM; ++mi) {
#pragma unroll
          for (int ni = 0; ni < kFragsN; ++ni) {
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;
          }
        }
      }
      const S* a = p.a_resident ? a_smem + c * kBK : a_smem + buf * kBM * lay.lda;
      a += wm * kWM * lay.lda;
      const S* b = b_smem + (buf * kBN + wn * kWN) * lay.ldb;
      // k-steps past D hold only zero padding (D = 1: one k-step of the chunk's 2 or 4).
      const int64_t rem = p.d - int64_t{c} * kBK;
      const int ksteps = static_cast<int>(min64(kBK / M::kStep, ceil_div(rem, M::kStep)));
      M::run(acc, a, lay.lda, b, lay.ldb, ksteps);
    }
    if (has_next) {
      // The other buffer was last read in step s - 1, before that step's barrier.
      stage_b.store(b_smem + (buf ^ 1) * kBN * lay.ldb, lay.ldb);
      if (!p.a_resident) stage_a.store(a_smem + (buf ^ 1) * kBM * lay.lda, lay.lda);
    }
    if (last_chunk && warp_active) {
      const int32_t kq = static_cast<int32_t>(tile_code);
#pragma unroll
      for (int r = 0; r < kLaneRows; ++r) {
        float& bv = best_v[r];
        int32_t& bi = best_i[r];
        // Codes in increasing order, so that `>` keeps the lowest index of equal scores.
#pragma unroll
        for (int e = 0; e < kLaneCodes; ++e) {
          const float score = fmaf(acc[r / 2][e / 2][2 * (r % 2) + e % 2], sc[e], bs[e]);
          // The loser of score and best (NaN loses fminf) may be the runner-up.
          if constexpr (kScreen) runner[r] = fmaxf(runner[r], fminf(score, bv));
          const bool take = score > bv;  // strict: ties keep the lower k, NaN never wins
          bv = take ? score : bv;
          bi = take ? kq + 8 * (e / 2) + e % 2 : bi;
        }
      }
    }
    __syncthreads();
    t = t_next;
    c = c_next;
  }

  // Merge: the 4 lanes of a row (tg), then the 4 warps of a row; the staging buffers are free
  // after the loop's last barrier. Merging two (best, runner-up) pairs, the runner-up is the
  // best of the two runners-up and the smaller best.
  float* const red_v = reinterpret_cast<float*>(smem);
  int32_t* const red_i = reinterpret_cast<int32_t*>(smem + sizeof(float) * kWarpsN * kBM);
  float* const red_r = reinterpret_cast<float*>(smem + 2 * sizeof(float) * kWarpsN * kBM);
#pragma unroll
  for (int r = 0; r < kLaneRows; ++r) {
    float v = best_v[r];
    int32_t i = best_i[r];
    float rv = runner[r];
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, v, off);
      const int32_t oi = __shfl_xor_sync(0xffffffffu, i, off);
      if constexpr (kScreen) {
        rv = fmaxf(fmaxf(rv, __shfl_xor_sync(0xffffffffu, rv, off)), fminf(v, ov));
      }
      if (better(ov, oi, v, i)) {
        v = ov;
        i = oi;
      }
    }
    if (tg == 0) {
      const int row = wm * kWM + (r / 2) * 16 + g + 8 * (r % 2);
      red_v[wn * kBM + row] = v;
      red_i[wn * kBM + row] = i;
      if constexpr (kScreen) red_r[wn * kBM + row] = rv;
    }
  }
  __syncthreads();
  if (tid < kBM) {
    float v = red_v[tid];
    int32_t i = red_i[tid];
    float rv = kScreen ? red_r[tid] : 0.f;
#pragma unroll
    for (int w = 1; w < kWarpsN; ++w) {
      const float ov = red_v[w * kBM + tid];
      if constexpr (kScreen) rv = fmaxf(fmaxf(rv, red_r[w * kBM + tid]), fminf(v, ov));
      if (better(ov, red_i[w * kBM + tid], v, i)) {
        v = ov;
        i = red_i[w * kBM + tid];
      }
    }
    const int64_t entry = row0 + tid;
    if (entry < row_end) {
      const int64_t row = p.rows != nullptr ? p.rows[entry] : entry;
      if (p.splits == 1) {
        p.out[row] = i;
      } else {
        p.part_v[entry * p.splits + split] = v;
        p.part_i[entry * p.splits + split] = i;
      }
      if constexpr (kScreen) {
        // NaN margins or bounds fail the comparison: flagged.
        const double bound = screening_bound(p.z_terms[2 * row], p.z_terms[2 * row + 1],
                                             p.code_terms, p.rel, p.tiny_d);
        if (!(double{v} - double{rv} > 2 * bound)) p.flagged[atomicAdd(p.flagged_count, 1)] = row;
      }
    }
  }
}

// out[row] = index of the best (score, index) partial of the row over the S splits; entry e of
// the partials is row e, or rows[e] for e < *row_count.
__global__ void __launch_bounds__(kReduceThreads)
    reduce_splits_kernel(const float* __restrict__ part_v, const int32_t* __restrict__ part_i,
                         int64_t n, int splits, const int64_t* __restrict__ rows,
                         const int32_t* __restrict__ row_count, int64_t* __restrict__ out) {
  const int64_t entry = static_cast<int64_t>(blockIdx.x) * kReduceThreads + threadIdx.x;
  if (entry >= (rows != nullptr ? int64_t{*row_count} : n)) return;
  float v = kNegInf;
  int32_t i = 0;
  for (int s = 0; s < splits; ++s) {
    const float pv = part_v[entry * splits + s];
    const int32_t pi = part_i[entry * splits + s];
    if (better(pv, pi, v, i)) {
      v = pv;
      i = pi;
    }
  }
  out[rows != nullptr ? rows[entry] : entry] = i;
}

// The screening pass's inputs (kernels/nearest_code.py's _tf32_split_reference says why this
// rounding): one warp per row of x (r, d) float32 writes the row rounded to tf32 (to nearest, ties
// away from zero; magnitudes below FLT_MIN flush to 0) and, in float64, the norms of the row and
// of its residual times |scale| to terms (r, 2) (unless null), and raises maxima[0..4] (unless
// null: non-negative doubles as bits, whose integer order is theirs, NaN above all) to the maxima
// of both norms, |bias|, |scale| (1 without one) and the unscaled norm.
__global__ void __launch_bounds__(kSplitThreads)
    tf32_split_kernel(const float* __restrict__ x, const float* __restrict__ scale,
                      const float* __restrict__ bias, int64_t r, int64_t d,
                      float* __restrict__ rounded, double* __restrict__ terms,
                      unsigned long long* __restrict__ maxima) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kSplitThreads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (row >= r) return;  // whole warps: no shuffle is left waiting
  double squares = 0.0, res_squares = 0.0;
  for (int64_t c = lane; c < d; c += 32) {
    const float v = x[row * d + c];
    const float t =
        fabsf(v) < kFloatMin ? 0.f : __uint_as_float((__float_as_uint(v) + 0x1000u) & 0xffffe000u);
    rounded[row * d + c] = t;
    const double res = v - t;  // exact in float32 (Sterbenz)
    squares += double{v} * double{v};
    res_squares += res * res;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    squares += __shfl_xor_sync(0xffffffffu, squares, off);
    res_squares += __shfl_xor_sync(0xffffffffu, res_squares, off);
  }
  if (lane != 0) return;
  const double s = scale != nullptr ? fabs(double{scale[row]}) : 1.0;
  const double unscaled = sqrt(squares);
  const double norm = unscaled * s, res = sqrt(res_squares) * s;
  if (terms != nullptr) {
    terms[2 * row] = norm;
    terms[2 * row + 1] = res;
  }
  if (maxima != nullptr) {
    const auto bits = [](double value) {
      return static_cast<unsigned long long>(__double_as_longlong(value));
    };
    atomicMax(maxima, bits(norm));
    atomicMax(maxima + 1, bits(res));
    atomicMax(maxima + 2, bits(bias != nullptr ? fabs(double{bias[row]}) : 0.0));
    atomicMax(maxima + 3, bits(s));
    atomicMax(maxima + 4, bits(unscaled));
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

struct Plan {
  SmemLayout smem;
  bool a_resident;
  int64_t row_tiles;
  int64_t tiles_per_split;
  int splits;
  size_t part_i_offset;  // byte offset of the int32 partials in the workspace
  size_t workspace;
};

// Raises the kernel's dynamic shared-memory limit to the device's opt-in maximum, once per
// device (cudaFuncSetAttribute applies to the current device).
template <class In, class S, bool kScreen>
cudaError_t ensure_smem_limit(int device, int optin) {
  static std::atomic<uint64_t> done{0};
  const uint64_t bit = device < 64 ? uint64_t{1} << device : 0;
  if (bit && (done.load(std::memory_order_relaxed) & bit)) return cudaSuccess;
  const cudaError_t err = cudaFuncSetAttribute(nearest_code_kernel<In, S, kScreen>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, optin);
  if (err == cudaSuccess && bit) done.fetch_or(bit, std::memory_order_relaxed);
  return err;
}

// Resident CTAs per SM for a dynamic shared-memory size, cached per device: the plan is made twice
// per call (workspace query, launch) and the occupancy query is the costly part of it.
template <class In, class S, bool kScreen>
cudaError_t blocks_per_sm(int device, size_t smem_bytes, int* per_sm) {
  static std::atomic<uint64_t> cache[64];  // (smem_bytes << 16) | (per_sm << 1) | valid
  const bool cacheable = device >= 0 && device < 64;
  if (cacheable) {
    const uint64_t v = cache[device].load(std::memory_order_relaxed);
    if ((v & 1) && (v >> 16) == smem_bytes) {
      *per_sm = static_cast<int>((v >> 1) & 0x7fff);
      return cudaSuccess;
    }
  }
  const cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      per_sm, nearest_code_kernel<In, S, kScreen>, kThreads, smem_bytes);
  if (err == cudaSuccess && cacheable) {
    cache[device].store((uint64_t{smem_bytes} << 16) | (uint64_t(*per_sm & 0x7fff) << 1) | 1,
                        std::memory_order_relaxed);
  }
  return err;
}

// Wave efficiency of `ctas` equal CTAs over `slots` resident CTA slots.
double wave_efficiency(int64_t ctas, int64_t slots) {
  return static_cast<double>(ctas) / static_cast<double>(ceil_div(ctas, slots) * slots);
}

// Fewest splits whose wave efficiency is within 5% of the best reachable, so that N = 1 spreads
// over every SM and N = 65,536 (512 row tiles) stays unsplit. Each split holds whole tiles and
// none is empty.
void choose_splits(int64_t n, int64_t k, int64_t row_tiles, int64_t slots, Plan* plan) {
  const int64_t k_tiles = ceil_div(k, kBN);
  int64_t max_splits = std::max<int64_t>(kSplitsCap, k / n);
  max_splits = std::min(
      {max_splits, std::max<int64_t>(1, k_tiles / kMinTilesPerSplit), kMaxGridY, 2 * slots});
  auto splits_for = [&](int64_t s) { return ceil_div(k_tiles, ceil_div(k_tiles, s)); };
  double best_eff = 0.0;
  for (int64_t s = 1; s <= max_splits; ++s) {
    best_eff = std::max(best_eff, wave_efficiency(row_tiles * splits_for(s), slots));
  }
  int64_t chosen = 1;
  for (int64_t s = 1; s <= max_splits; ++s) {
    if (wave_efficiency(row_tiles * splits_for(s), slots) >= 0.95 * best_eff) {
      chosen = s;
      break;
    }
  }
  plan->tiles_per_split = ceil_div(k_tiles, chosen);
  plan->splits = static_cast<int>(ceil_div(k_tiles, plan->tiles_per_split));
}

// `split_rows`: the rows whose tiles the split count is chosen for (a recheck's expected rows);
// the grid still covers all n rows, and the partials are n x S.
template <class In, class S, bool kScreen = false>
cudaError_t make_plan_typed(int64_t n, int64_t k, int64_t d, Plan* plan, int64_t split_rows = -1) {
  int device = 0, sms = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  err = ensure_smem_limit<In, S, kScreen>(device, optin);
  if (err != cudaSuccess) return err;

  // z resident when its block fits (every staged byte of z then comes from global memory once).
  plan->a_resident = true;
  plan->smem = smem_layout(sizeof(S), true, d);
  if (plan->smem.bytes > static_cast<size_t>(optin)) {
    plan->a_resident = false;
    plan->smem = smem_layout(sizeof(S), false, d);
    if (plan->smem.bytes > static_cast<size_t>(optin)) return cudaErrorInvalidConfiguration;
  }
  int per_sm = 0;
  err = blocks_per_sm<In, S, kScreen>(device, plan->smem.bytes, &per_sm);
  if (err != cudaSuccess) return err;
  const int64_t slots = int64_t{sms} * std::max(per_sm, 1);

  plan->row_tiles = ceil_div(n, kBM);
  const int64_t rows = split_rows >= 0 ? std::max<int64_t>(split_rows, 1) : n;
  choose_splits(rows, k, ceil_div(rows, kBM), slots, plan);
  plan->part_i_offset = 0;
  plan->workspace = 0;
  if (plan->splits > 1) {
    const size_t entries = static_cast<size_t>(n) * static_cast<size_t>(plan->splits);
    plan->part_i_offset = align_up(entries * sizeof(float), 256);
    plan->workspace = plan->part_i_offset + entries * sizeof(int32_t);
  }
  return cudaSuccess;
}

bool valid_sizes(int64_t n, int64_t k, int64_t d) {
  return n >= 0 && n <= INT32_MAX * int64_t{kBM} && k >= 1 && k <= kMaxCodes && d >= 1 &&
         d <= kMaxDim;
}

cudaError_t make_plan(int64_t n, int64_t k, int64_t d, DType dtype, bool fast, Plan* plan) {
  switch (dtype) {
    case DType::F32:
      return fast ? make_plan_typed<float, __nv_bfloat16>(n, k, d, plan)
                  : make_plan_typed<float, float>(n, k, d, plan);
    case DType::BF16:
      return make_plan_typed<__nv_bfloat16, __nv_bfloat16>(n, k, d, plan);
    case DType::F16:
      return make_plan_typed<__half, __half>(n, k, d, plan);
  }
  return cudaErrorInvalidValue;
}

template <class In, class S, bool kScreen = false>
cudaError_t launch_typed(const Params& params, const Plan& plan, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(plan.row_tiles), static_cast<unsigned>(plan.splits));
  nearest_code_kernel<In, S, kScreen><<<grid, kThreads, plan.smem.bytes, stream>>>(params);
  return cudaGetLastError();
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The Params of one search over z and codebook (elem bytes per element) by `plan`; split partials
// in `workspace` as the plan lays them out; no row list, no screening.
Params make_params(const void* z, const void* codebook, const float* code_scale,
                   const float* code_bias, int64_t n, int64_t k, int64_t d, int64_t elem,
                   const Plan& plan, int64_t* out_idx, void* workspace) {
  Params params{};
  params.z = z;
  params.codebook = codebook;
  params.scale = code_scale;
  params.bias = code_bias;
  params.n = n;
  params.k = k;
  params.d = d;
  params.tiles_per_split = plan.tiles_per_split;
  params.splits = plan.splits;
  params.chunks = static_cast<int>(ceil_div(d, kBK));
  params.a_resident = plan.a_resident;
  params.vec = d % (16 / elem) == 0 && aligned16(z) && aligned16(codebook);
  params.out = out_idx;
  if (plan.splits > 1) {
    params.part_v = static_cast<float*>(workspace);
    params.part_i =
        reinterpret_cast<int32_t*>(static_cast<unsigned char*>(workspace) + plan.part_i_offset);
  }
  return params;
}

// The exact float32 search by screening (kernels/nearest_code.py's module docstring says how):
// the screening pass's plan (never split: a row's margin needs all its codes in one CTA), the
// recheck's (split for the rows it expects), and the workspace: the recheck's partials first,
// then the byte offsets below.
struct Screening {
  Plan pass, recheck;
  size_t z_tf32, c_tf32, z_terms, maxima, count, rows, bytes;
};

// *screens: whether the search screens (exact float32 only: `screen`, or by size), and if so its
// plan.
cudaError_t plan_screening(int64_t n, int64_t k, int64_t d, DType dtype, bool fast, Screen screen,
                           bool* screens, Screening* sc) {
  *screens = false;
  // The flagged-row counter is int32 (beyond 2^31 rows z alone would exceed any GPU's memory).
  if (dtype != DType::F32 || fast || screen == Screen::kNever || n > INT32_MAX) return cudaSuccess;
  cudaError_t err = make_plan_typed<float, float, true>(n, k, d, &sc->pass);
  if (err != cudaSuccess) return err;
  const bool big = n >= ceil_div(kScreenMinWork, k) && d >= kScreenMinDim;
  if (screen == Screen::kAuto && !(big && sc->pass.splits == 1)) return cudaSuccess;
  sc->pass.tiles_per_split = ceil_div(k, kBN);
  sc->pass.splits = 1;
  sc->pass.workspace = 0;
  err = make_plan_typed<float, float>(n, k, d, &sc->recheck, ceil_div(n, kRecheckShare));
  if (err != cudaSuccess) return err;
  size_t end = sc->recheck.workspace;
  const auto take = [&end](size_t bytes) {
    const size_t at = align_up(end, 256);
    end = at + bytes;
    return at;
  };
  const size_t nn = static_cast<size_t>(n), kk = static_cast<size_t>(k);
  const size_t dd = static_cast<size_t>(d);
  sc->z_tf32 = take(nn * dd * sizeof(float));
  sc->c_tf32 = take(kk * dd * sizeof(float));
  sc->z_terms = take(nn * 2 * sizeof(double));
  sc->maxima = take(kCodeTerms * sizeof(unsigned long long) + sizeof(int32_t));  // then the count
  sc->count = sc->maxima + kCodeTerms * sizeof(unsigned long long);
  sc->rows = take(nn * sizeof(int64_t));
  sc->bytes = end;
  *screens = true;
  return cudaSuccess;
}

cudaError_t launch_screened(const float* z, const float* codebook, const float* code_scale,
                            const float* code_bias, int64_t n, int64_t k, int64_t d,
                            int64_t* out_idx, void* workspace, size_t workspace_bytes,
                            const Screening& sc, cudaStream_t stream) {
  if (workspace == nullptr || workspace_bytes < sc.bytes || !aligned16(workspace)) {
    return cudaErrorInvalidValue;
  }
  const int64_t rows_per_block = kSplitThreads / 32;
  if (ceil_div(std::max(n, k), rows_per_block) > INT32_MAX) return cudaErrorInvalidConfiguration;
  unsigned char* const w = static_cast<unsigned char*>(workspace);
  float* const z_tf32 = reinterpret_cast<float*>(w + sc.z_tf32);
  float* const c_tf32 = reinterpret_cast<float*>(w + sc.c_tf32);
  double* const z_terms = reinterpret_cast<double*>(w + sc.z_terms);
  auto* const maxima = reinterpret_cast<unsigned long long*>(w + sc.maxima);
  int32_t* const count = reinterpret_cast<int32_t*>(w + sc.count);
  int64_t* const rows = reinterpret_cast<int64_t*>(w + sc.rows);

  cudaError_t err =
      cudaMemsetAsync(maxima, 0, kCodeTerms * sizeof(unsigned long long) + sizeof(int32_t), stream);
  if (err != cudaSuccess) return err;
  tf32_split_kernel<<<static_cast<unsigned>(ceil_div(n, rows_per_block)), kSplitThreads, 0,
                      stream>>>(z, nullptr, nullptr, n, d, z_tf32, z_terms, nullptr);
  tf32_split_kernel<<<static_cast<unsigned>(ceil_div(k, rows_per_block)), kSplitThreads, 0,
                      stream>>>(codebook, code_scale, code_bias, k, d, c_tf32, nullptr, maxima);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  Params pass = make_params(z_tf32, c_tf32, code_scale, code_bias, n, k, d, sizeof(float), sc.pass,
                            out_idx, nullptr);
  pass.z_terms = z_terms;
  pass.code_terms = reinterpret_cast<const double*>(maxima);
  // kernels/nearest_code.py's _screening_constants.
  pass.rel = (2 * d + 16) * 0x1p-22 + 0x1p-18 + 0x1p-20;
  pass.tiny_d = (8 * d + 8) * double{kFloatMin};
  pass.flagged = rows;
  pass.flagged_count = count;
  err = launch_typed<float, float, true>(pass, sc.pass, stream);
  if (err != cudaSuccess) return err;

  Params recheck = make_params(z, codebook, code_scale, code_bias, n, k, d, sizeof(float),
                               sc.recheck, out_idx, workspace);
  recheck.rows = rows;
  recheck.row_count = count;
  err = launch_typed<float, float>(recheck, sc.recheck, stream);
  if (err != cudaSuccess || sc.recheck.splits == 1) return err;
  const unsigned blocks = static_cast<unsigned>(ceil_div(n, kReduceThreads));
  reduce_splits_kernel<<<blocks, kReduceThreads, 0, stream>>>(
      recheck.part_v, recheck.part_i, n, sc.recheck.splits, rows, count, out_idx);
  return cudaGetLastError();
}

}  // namespace

cudaError_t nearest_code_workspace_bytes(int64_t n, int64_t k, int64_t d, DType dtype, bool fast,
                                         size_t* bytes, Screen screen) {
  if (bytes == nullptr || !valid_sizes(n, k, d)) return cudaErrorInvalidValue;
  *bytes = 0;
  if (n == 0) return cudaSuccess;
  Screening sc;
  bool screens = false;
  cudaError_t err = plan_screening(n, k, d, dtype, fast, screen, &screens, &sc);
  if (err != cudaSuccess || screens) {
    if (screens) *bytes = sc.bytes;
    return err;
  }
  Plan plan;
  err = make_plan(n, k, d, dtype, fast, &plan);
  if (err != cudaSuccess) return err;
  *bytes = plan.workspace;
  return cudaSuccess;
}

cudaError_t nearest_code_rechecked_rows(int64_t n, int64_t k, int64_t d, DType dtype, bool fast,
                                        const void* workspace, const int32_t** count,
                                        const int64_t** rows, Screen screen) {
  if (count == nullptr || rows == nullptr || !valid_sizes(n, k, d)) return cudaErrorInvalidValue;
  *count = nullptr;
  *rows = nullptr;
  if (n == 0) return cudaSuccess;
  Screening sc;
  bool screens = false;
  const cudaError_t err = plan_screening(n, k, d, dtype, fast, screen, &screens, &sc);
  if (err != cudaSuccess || !screens) return err;
  if (workspace == nullptr) return cudaErrorInvalidValue;
  const unsigned char* const w = static_cast<const unsigned char*>(workspace);
  *count = reinterpret_cast<const int32_t*>(w + sc.count);
  *rows = reinterpret_cast<const int64_t*>(w + sc.rows);
  return cudaSuccess;
}

cudaError_t launch_nearest_code(const void* z, const void* codebook, const float* code_scale,
                                const float* code_bias, int64_t n, int64_t k, int64_t d,
                                DType dtype, bool fast, int64_t* out_idx, void* workspace,
                                size_t workspace_bytes, cudaStream_t stream, Screen screen) {
  if (!valid_sizes(n, k, d)) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  if (z == nullptr || codebook == nullptr || out_idx == nullptr) return cudaErrorInvalidValue;
  Screening sc;
  bool screens = false;
  cudaError_t err = plan_screening(n, k, d, dtype, fast, screen, &screens, &sc);
  if (err != cudaSuccess) return err;
  if (screens) {
    return launch_screened(static_cast<const float*>(z), static_cast<const float*>(codebook),
                           code_scale, code_bias, n, k, d, out_idx, workspace, workspace_bytes, sc,
                           stream);
  }
  Plan plan;
  err = make_plan(n, k, d, dtype, fast, &plan);
  if (err != cudaSuccess) return err;
  if (plan.workspace > 0 &&
      (workspace == nullptr || workspace_bytes < plan.workspace || !aligned16(workspace))) {
    return cudaErrorInvalidValue;
  }

  const Params params = make_params(z, codebook, code_scale, code_bias, n, k, d,
                                    dtype == DType::F32 ? 4 : 2, plan, out_idx, workspace);
  switch (dtype) {
    case DType::F32:
      err = fast ? launch_typed<float, __nv_bfloat16>(params, plan, stream)
                 : launch_typed<float, float>(params, plan, stream);
      break;
    case DType::BF16:
      err = launch_typed<__nv_bfloat16, __nv_bfloat16>(params, plan, stream);
      break;
    case DType::F16:
      err = launch_typed<__half, __half>(params, plan, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  if (err != cudaSuccess || plan.splits == 1) return err;

  const unsigned blocks = static_cast<unsigned>(ceil_div(n, kReduceThreads));
  reduce_splits_kernel<<<blocks, kReduceThreads, 0, stream>>>(
      params.part_v, params.part_i, n, plan.splits, nullptr, nullptr, out_idx);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastvq

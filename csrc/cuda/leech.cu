// CUDA kernel of fastvq::leech_decode: the canonical index of the unit Leech code (196,560 minimal
// vectors, fastvq/lattice/leech.py) of largest inner product with each row of z (N, 24).
// Torch-free (raw pointers); the launch interface is leech.h, the torch glue leech_torch.cpp.
//
// The structured decoder of the CPU kernel (cpu/leech.cpp) and the torch path (_decode), with the
// same arithmetic score for score, so the indices are equal bit for bit, ties included. The
// per-row pieces (overflow scaling, index arithmetic, sign fix, position) are the shared
// __host__ __device__ functions of ../leech_decode.h, which the CPU kernel runs too.
//
// Design: one warp per row, W = 4 warps per CTA, a grid-stride loop over rows.
//   - Lane p < 24 loads z[p] (widened to the score type); the warp checks finiteness (__any_sync),
//     takes the largest |z| (xor shuffles) for the overflow scale, and builds the 24-bit mask of
//     minus signs (__ballot_sync). The scaled row goes to shared memory.
//   - Per-row tables in shared memory, 4 groups x 64 sign patterns, (sum, min) pairs: signed sums
//     of z with -1 on the pattern and their least term (shape 3), sums of |z| over the subset and
//     its least |z| (shape 2). Lane l builds entries l + 32 j, j < 8: 8 x 6 x ~8 operations.
//   - Shape 3: lane l owns l0 in {l, l + 32} (its group-0 entries in registers) and loops over
//     l1 = 0..63: group 1's entry is a broadcast load, groups 2 and 3 are read at
//     high12(m) = hhi[l1] ^ hlo[l0]. Per codeword: 2 shared loads, 3 adds, 3 minima, 1 fma,
//     a compare and 2 selects. Codewords m = 64 l1 + l0 arrive in increasing order per lane, so
//     a strict `>` keeps the lane's first maximum.
//   - Shape 2: lane l owns octads l + 32 j (increasing), 4 shared loads per octad, the parity of
//     the minus signs on it by __popc.
//   - Merges by (larger score, then lower index) with xor shuffles: the first maximum. Shape 1 is
//     two such merges over the lanes' |z|. Lane 0 then picks the shape and forms the index.
// Shared memory: tables 4 KiB per warp (8 KiB for float64) + Golay tables 3.3 KiB per CTA.
//
// Performance model (DESIGN.md ceilings; nothing here has run on a GPU): ~128 codewords x ~15
// instructions + ~24 octads x ~25 + ~400 for the tables and merges = ~2.9k warp instructions per
// row; N = 65,536 rows is 1.9e8 warp instructions, 0.2 ms at the 9.2e11 warp instructions/s of
// 132 SMs x 4 schedulers x 1.75 GHz if the shared-memory loads (2.2 per codeword, random within
// a 64-entry table: bank conflicts) keep up. Unmeasured. The sm_90 SASS (nvcc 13, 48 registers)
// is heavier than this model: 25 instructions per codeword (min_of's compare-and-select is two
// instructions where fminf would be one) and 36 per octad, ~4.7k warp instructions per row, so
// ~0.33 ms at full issue.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../leech_decode.h"
#include "leech.h"

namespace fastvq {
namespace cuda {
namespace {

using leech::kOctads;
using leech::min_of;

constexpr int kWarps = 4;  // rows in flight per CTA: one warp each
constexpr unsigned kFull = 0xffffffffu;
constexpr int kNoIndex = 0x7fffffff;

// 16-byte alignment for double lets one 128-bit load fetch a pair.
template <typename T>
struct alignas(2 * sizeof(T)) SumMin {
  T sum, min;
};

__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ double widen(double x) { return x; }
__device__ __forceinline__ float widen(__half x) { return __half2float(x); }
__device__ __forceinline__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ float abs_of(float x) { return fabsf(x); }
__device__ __forceinline__ double abs_of(double x) { return fabs(x); }

// (score, index) merged over the warp: larger score, then lower index. Every lane ends with the
// same pair (a total order over distinct indices).
template <typename T>
__device__ __forceinline__ void warp_best(T& score, int& index) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const T s = __shfl_xor_sync(kFull, score, offset);
    const int i = __shfl_xor_sync(kFull, index, offset);
    if (s > score || (s == score && i < index)) {
      score = s;
      index = i;
    }
  }
}

template <typename T>
__device__ __forceinline__ void shape3_candidate(const SumMin<T>& q0, const SumMin<T>& q1,
                                                 SumMin<T> (*sg)[64], uint32_t hi, int m,
                                                 T& best, int& best_m) {
  const SumMin<T> q2 = sg[2][hi & 63], q3 = sg[3][hi >> 6];
  const T s = (q0.sum + q1.sum) + (q2.sum + q3.sum);
  const T mn = min_of(min_of(q0.min, q1.min), min_of(q2.min, q3.min));
  const T score = s - 4 * mn;  // 4 * mn is exact: one rounding, fused or not
  if (score > best) {
    best = score;
    best_m = m;
  }
}

// In: the element type of z; T: the type of the scores.
template <typename In, typename T>
__global__ void __launch_bounds__(kWarps * 32)
    leech_decode_kernel(const In* __restrict__ z, int64_t n, int64_t* __restrict__ out,
                        const leech::GolayTables tables) {
  __shared__ uint32_t octad_s[kOctads];
  __shared__ uint16_t hlo_s[64], hhi_s[64];
  __shared__ SumMin<T> sg_s[kWarps][4][64];
  __shared__ SumMin<T> ab_s[kWarps][4][64];
  __shared__ T z_s[kWarps][24];
  for (int t = static_cast<int>(threadIdx.x); t < kOctads; t += blockDim.x) octad_s[t] = tables.octad[t];
  for (int t = static_cast<int>(threadIdx.x); t < 64; t += blockDim.x) {
    hlo_s[t] = tables.hlo[t];
    hhi_s[t] = tables.hhi[t];
  }
  __syncthreads();

  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  SumMin<T>(*sg)[64] = sg_s[warp];
  SumMin<T>(*ab)[64] = ab_s[warp];
  T* zr = z_s[warp];
  const T inf = static_cast<T>(INFINITY);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  // The row depends on the warp only, so every branch below on row data is warp-uniform.
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp; row < n; row += stride) {
    T x = lane < 24 ? widen(z[row * 24 + lane]) : T(0);
    if (__any_sync(kFull, !isfinite(x))) {
      if (lane == 0) out[row] = 0;
      continue;
    }
    T largest = abs_of(x);
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      largest = max(largest, __shfl_xor_sync(kFull, largest, offset));
    }
    x *= leech::row_scale(largest);
    if (lane < 24) zr[lane] = x;
    const uint32_t neg = __ballot_sync(kFull, x < 0);  // lanes past 24 hold 0
    __syncwarp();

    // Tables, entry = 64 k + e: group k, pattern e; sums left to right as in the CPU kernel.
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int entry = lane + 32 * j, k = entry >> 6, e = entry & 63;
      const T* g = zr + 6 * k;
      T t = (e & 1) ? -g[0] : g[0];
      T s = t, mn = t;
      T a = abs_of(g[0]);
      T as = (e & 1) ? a : T(0), am = (e & 1) ? a : inf;
#pragma unroll
      for (int c = 1; c < 6; ++c) {
        const bool on = (e >> c) & 1;
        t = on ? -g[c] : g[c];
        s = s + t;
        mn = min_of(mn, t);
        a = abs_of(g[c]);
        if (on) {
          as = as + a;
          am = min_of(am, a);
        }
      }
      sg[k][e] = {s, mn};
      ab[k][e] = {as, am};
    }
    __syncwarp();

    // Shape 3.
    T best3 = -inf;
    int word3 = kNoIndex;
    {
      const SumMin<T> a0 = sg[0][lane], b0 = sg[0][lane + 32];
      const uint32_t ha = hlo_s[lane], hb = hlo_s[lane + 32];
      for (int l1 = 0; l1 < 64; ++l1) {
        const SumMin<T> q1 = sg[1][l1];
        const uint32_t hh = hhi_s[l1];
        shape3_candidate<T>(a0, q1, sg, hh ^ ha, l1 * 64 + lane, best3, word3);
        shape3_candidate<T>(b0, q1, sg, hh ^ hb, l1 * 64 + lane + 32, best3, word3);
      }
    }
    warp_best(best3, word3);

    // Shape 2.
    T best2 = -inf;
    int octad2 = kNoIndex;
    for (int o = lane; o < kOctads; o += 32) {
      const uint32_t w = octad_s[o];
      const SumMin<T> q0 = ab[0][w & 63], q1 = ab[1][(w >> 6) & 63], q2 = ab[2][(w >> 12) & 63],
                      q3 = ab[3][w >> 18];
      const T s = 2 * ((q0.sum + q1.sum) + (q2.sum + q3.sum));
      const T mn = min_of(min_of(q0.min, q1.min), min_of(q2.min, q3.min));
      const T score = (__popc(w & neg) & 1) ? s - 4 * mn : s;
      if (score > best2) {
        best2 = score;
        octad2 = o;
      }
    }
    warp_best(best2, octad2);

    // Shape 1: the first largest |z| (i), then the first largest of the others (j).
    T top1 = lane < 24 ? abs_of(x) : T(-1);
    int i = lane;
    warp_best(top1, i);
    T top2 = lane < 24 && lane != i ? abs_of(x) : T(-1);
    int j = lane;
    warp_best(top2, j);

    if (lane == 0) {
      const T best1 = 4 * (top1 + top2);
      int64_t index;
      // >= keeps the lower shape on equal scores.
      if (best1 >= best2 && best1 >= best3) {
        index = leech::pair_index(zr, i, j);
      } else if (best2 >= best3) {
        index = leech::kStart2 + static_cast<int64_t>(octad2) * 128 +
                leech::even_sign_rank(zr, octad_s[octad2]);
      } else {
        const uint32_t m = static_cast<uint32_t>(word3);
        const uint32_t word = m | (static_cast<uint32_t>(hlo_s[m & 63] ^ hhi_s[m >> 6]) << 12);
        index = leech::kStart3 + static_cast<int64_t>(word3) * 24 + leech::best_position(zr, word);
      }
      out[row] = index;
    }
    __syncwarp();  // the next row overwrites zr and the tables
  }
}

template <typename In, typename T>
cudaError_t launch(const void* z, int64_t n, int64_t* out, cudaStream_t stream) {
  // Built once on the host, passed by value (3,292 of the 4,096 parameter bytes): no per-device
  // constant-memory setup.
  static const leech::GolayTables tables = leech::make_golay_tables();
  // Up to 2^20 CTAs of 4 rows; larger N loops (the CTA prologue is ~1k shared stores).
  const int64_t blocks = std::min<int64_t>((n + kWarps - 1) / kWarps, int64_t{1} << 20);
  leech_decode_kernel<In, T><<<static_cast<unsigned>(blocks), kWarps * 32, 0, stream>>>(
      static_cast<const In*>(z), n, out, tables);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_leech_decode(const void* z, int64_t n, LeechDType dtype, int64_t* out_idx,
                                cudaStream_t stream) {
  if (n < 0 || (n > 0 && (z == nullptr || out_idx == nullptr))) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  switch (dtype) {
    case LeechDType::F32:
      return launch<float, float>(z, n, out_idx, stream);
    case LeechDType::F64:
      return launch<double, double>(z, n, out_idx, stream);
    case LeechDType::BF16:
      return launch<__nv_bfloat16, float>(z, n, out_idx, stream);
    case LeechDType::F16:
      return launch<__half, float>(z, n, out_idx, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastvq

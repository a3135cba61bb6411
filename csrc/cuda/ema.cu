// CUDA kernels of fastvq::ema_scatter_cpp: EMA counts and sums by scatter (ema.h). Torch-free.
//
// Bytes bound: read z once (2-4 B per element), write K * D sums. Two variants:
//   atomic:        scale pass (K * (D + 1) elements), then a group of TPR = 4..32 lanes per row
//                  adds gain * w * z[n] into sums[idx[n]] by float32 atomicAdd; atomics contend
//                  only on hot codes.
//   deterministic: after a stable sort, each code's run of sorted rows is cut into pieces of at
//                  most piece_rows rows (the glue's plan, ema.h), one 32 x 8 block per piece:
//                  lane x owns column c0 + x, row group y sums rows lo + y, lo + y + 8, ... in
//                  order, and the 8 partials are added in y order. A code of one piece is
//                  written there; the pieces of a longer run store partial sums that a second
//                  kernel adds in piece order. A fixed order whatever the GPU, run or timing,
//                  and a code holding most of N spreads over N / piece_rows blocks.
// 64-bit offsets wherever a row index meets a stride. Performance: unmeasured (no GPU in the
// sessions that wrote this).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "ema.h"

namespace fastvq {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 16;
constexpr int kCols = 32;                     // deterministic kernel: columns per pass (x)
constexpr int kRowGroups = kThreads / kCols;  // rows summed side by side (y)

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

__global__ void scale_kernel(float* __restrict__ counts, int64_t ldc, float* __restrict__ sums,
                             int64_t lds, int64_t k, int64_t d, float keep) {
  const int64_t total = k * (d + 1);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / (d + 1), col = i % (d + 1);
    float* p = col == d ? counts + row * ldc : sums + row * lds + col;
    *p = keep * *p;
  }
}

template <class T, int TPR>
__global__ void __launch_bounds__(kThreads)
    atomic_kernel(float* __restrict__ counts, int64_t ldc, float* __restrict__ sums, int64_t lds,
                  const T* __restrict__ z, int64_t ldz, const float* __restrict__ weight,
                  const int64_t* __restrict__ idx, int64_t n, int64_t k, int64_t d, float gain) {
  constexpr int kRowsPerBlock = kThreads / TPR;
  const int lane = threadIdx.x % TPR;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / TPR; row < n;
       row += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const int64_t code = idx[row];
    const float w = weight != nullptr ? weight[row] : 1.f;
    if (code < 0 || code >= k || w == 0.f) continue;
    const float gw = gain * w;
    const T* x = z + row * ldz;
    float* s = sums + code * lds;
    for (int64_t j = lane; j < d; j += TPR) atomicAdd(s + j, gw * to_float(x[j]));
    if (lane == 0) atomicAdd(counts + code * ldc, gw);
  }
}

// One block per piece (grid-stride): the fixed-order sum of its rows, written to the code when
// the code has one piece, else to the piece's partial slot. Every branch is block-uniform.
template <class T>
__global__ void __launch_bounds__(kThreads)
    piece_kernel(EmaArgs a, const T* __restrict__ z, EmaPieces p) {
  __shared__ float part[kRowGroups][kCols + 1];
  __shared__ float part_w[kRowGroups];
  const int x = threadIdx.x % kCols, y = threadIdx.x / kCols;
  for (int64_t piece = blockIdx.x; piece < p.programs; piece += gridDim.x) {
    const int64_t code = p.piece_code[piece];
    if (code >= a.k) break;  // past the last piece: so are the later ones
    const int64_t first = p.piece_offsets[code];
    const bool alone = p.piece_offsets[code + 1] - first == 1;
    const int64_t lo = p.offsets[code] + (piece - first) * p.piece_rows;
    const int64_t end = p.offsets[code + 1];
    const int64_t hi = lo + p.piece_rows < end ? lo + p.piece_rows : end;
    float* const slot =
        alone ? nullptr : p.partial + (p.slot_offsets[code] + piece - first) * (a.d + 1);
    for (int64_t c0 = 0; c0 < a.d; c0 += kCols) {
      const int64_t col = c0 + x;
      float acc = 0.f, acc_w = 0.f;
      for (int64_t j = lo + y; j < hi; j += kRowGroups) {
        const int64_t row = p.order[j];
        const float w = a.weight != nullptr ? a.weight[row] : 1.f;
        if (w == 0.f) continue;
        if (col < a.d) acc += w * to_float(z[row * a.ldz + col]);
        acc_w += w;
      }
      part[y][x] = acc;
      if (x == 0) part_w[y] = acc_w;
      __syncthreads();
      if (y == 0) {
        float total = 0.f;
        for (int r = 0; r < kRowGroups; ++r) total += part[r][x];
        if (col < a.d) {
          float* s = a.sums + code * a.lds + col;
          if (alone) {
            *s = a.keep * *s + a.gain * total;
          } else {
            slot[col] = total;
          }
        }
        if (c0 == 0 && x == 0) {
          float total_w = 0.f;
          for (int r = 0; r < kRowGroups; ++r) total_w += part_w[r];
          float* c = a.counts + code * a.ldc;
          if (alone) {
            *c = a.keep * *c + a.gain * total_w;
          } else {
            slot[a.d] = total_w;
          }
        }
      }
      __syncthreads();  // part is rewritten by the next pass, or the next piece
    }
  }
}

// One block per code of several pieces (grid-stride): its partials added in piece order.
__global__ void __launch_bounds__(kThreads) combine_kernel(EmaArgs a, EmaPieces p) {
  for (int64_t code = blockIdx.x; code < a.k; code += gridDim.x) {
    const int64_t pieces = p.piece_offsets[code + 1] - p.piece_offsets[code];
    if (pieces == 1) continue;
    const float* const slots = p.partial + p.slot_offsets[code] * (a.d + 1);
    for (int64_t col = threadIdx.x; col <= a.d; col += blockDim.x) {
      float total = 0.f;
      for (int64_t s = 0; s < pieces; ++s) total += slots[s * (a.d + 1) + col];
      float* out = col < a.d ? a.sums + code * a.lds + col : a.counts + code * a.ldc;
      *out = a.keep * *out + a.gain * total;
    }
  }
}

int lanes_for(int64_t d) { return d <= 4 ? 4 : d <= 8 ? 8 : d <= 16 ? 16 : 32; }

template <class T>
cudaError_t atomic_typed(const EmaArgs& a, const int64_t* idx, cudaStream_t stream) {
  const int tpr = lanes_for(a.d);
  const int64_t rows_per_block = kThreads / tpr;
  const dim3 grid(
      static_cast<unsigned>(std::min(kMaxBlocks, (a.n + rows_per_block - 1) / rows_per_block)));
  const auto* z = static_cast<const T*>(a.z);
#define FASTVQ_EMA_ATOMIC(TPR_)                                                                   \
  atomic_kernel<T, TPR_><<<grid, kThreads, 0, stream>>>(a.counts, a.ldc, a.sums, a.lds, z, a.ldz, \
                                                        a.weight, idx, a.n, a.k, a.d, a.gain)
  switch (tpr) {
    case 4:
      FASTVQ_EMA_ATOMIC(4);
      break;
    case 8:
      FASTVQ_EMA_ATOMIC(8);
      break;
    case 16:
      FASTVQ_EMA_ATOMIC(16);
      break;
    default:
      FASTVQ_EMA_ATOMIC(32);
  }
#undef FASTVQ_EMA_ATOMIC
  return cudaGetLastError();
}

template <class T>
cudaError_t pieces_typed(const EmaArgs& a, const EmaPieces& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(std::min(kMaxBlocks, p.programs)));
  piece_kernel<T><<<grid, kThreads, 0, stream>>>(a, static_cast<const T*>(a.z), p);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  combine_kernel<<<static_cast<unsigned>(std::min(kMaxBlocks, a.k)), kThreads, 0, stream>>>(a, p);
  return cudaGetLastError();
}

bool bad_args(const EmaArgs& a) { return a.n < 0 || a.k < 1 || a.d < 1; }

}  // namespace

cudaError_t launch_ema_atomic(const EmaArgs& a, const int64_t* idx, cudaStream_t stream) {
  if (bad_args(a)) return cudaErrorInvalidValue;
  if (a.keep != 1.f) {
    const int64_t total = a.k * (a.d + 1);
    const dim3 grid(static_cast<unsigned>(std::min(kMaxBlocks, (total + kThreads - 1) / kThreads)));
    scale_kernel<<<grid, kThreads, 0, stream>>>(a.counts, a.ldc, a.sums, a.lds, a.k, a.d, a.keep);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (a.n == 0) return cudaSuccess;
  switch (a.dtype) {
    case DType::F32:
      return atomic_typed<float>(a, idx, stream);
    case DType::BF16:
      return atomic_typed<__nv_bfloat16>(a, idx, stream);
    case DType::F16:
      return atomic_typed<__half>(a, idx, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_ema_pieces(const EmaArgs& a, const EmaPieces& p, cudaStream_t stream) {
  if (bad_args(a) || p.programs < a.k || p.piece_rows < 1) return cudaErrorInvalidValue;
  switch (a.dtype) {
    case DType::F32:
      return pieces_typed<float>(a, p, stream);
    case DType::BF16:
      return pieces_typed<__nv_bfloat16>(a, p, stream);
    case DType::F16:
      return pieces_typed<__half>(a, p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastvq

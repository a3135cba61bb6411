// CUDA kernels of fastvq::ema_scatter_cpp: EMA counts and sums by scatter (ema.h). Torch-free.
//
// Bytes bound: read z once (2-4 B per element), write K * D sums. Two variants:
//   atomic:        scale pass (K * (D + 1) elements), then a group of TPR = 4..32 lanes per row
//                  adds gain * w * z[n] into sums[idx[n]] by float32 atomicAdd; atomics contend
//                  only on hot codes.
//   deterministic: after a stable sort (the glue's), one 32 x 8 block per code finds the code's
//                  run [lo, hi) of sorted indices by binary search; lane x owns column c0 + x,
//                  row group y sums rows lo + y, lo + y + 8, ... in order, and the 8 partials are
//                  added in y order: a fixed order whatever the GPU, run or timing.
// 64-bit offsets wherever a row index meets a stride. Performance: unmeasured (no GPU in the
// session that wrote this); a code holding most of N is one block's work in the deterministic
// variant (a two-level split of long runs is the next step if that shows).
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
constexpr int kCols = 32;  // deterministic kernel: columns per pass (x)
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
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / TPR;
       row < n; row += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
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

// First position in sorted[0, n) whose value is >= key.
__device__ __forceinline__ int64_t lower_bound(const int64_t* sorted, int64_t n, int64_t key) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (sorted[mid] < key) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    sorted_kernel(float* __restrict__ counts, int64_t ldc, float* __restrict__ sums, int64_t lds,
                  const T* __restrict__ z, int64_t ldz, const float* __restrict__ weight,
                  const int64_t* __restrict__ sorted, const int64_t* __restrict__ order, int64_t n,
                  int64_t k, int64_t d, float keep, float gain) {
  __shared__ float part[kRowGroups][kCols + 1];
  __shared__ float part_w[kRowGroups];
  __shared__ int64_t run[2];
  const int x = threadIdx.x % kCols, y = threadIdx.x / kCols;
  for (int64_t code = blockIdx.x; code < k; code += gridDim.x) {
    if (threadIdx.x < 2) run[threadIdx.x] = lower_bound(sorted, n, code + threadIdx.x);
    __syncthreads();
    const int64_t lo = run[0], hi = run[1];
    for (int64_t c0 = 0; c0 < d; c0 += kCols) {
      const int64_t col = c0 + x;
      float acc = 0.f, acc_w = 0.f;
      for (int64_t j = lo + y; j < hi; j += kRowGroups) {
        const int64_t row = order[j];
        const float w = weight != nullptr ? weight[row] : 1.f;
        if (w == 0.f) continue;
        if (col < d) acc += w * to_float(z[row * ldz + col]);
        acc_w += w;
      }
      part[y][x] = acc;
      if (x == 0) part_w[y] = acc_w;
      __syncthreads();
      if (y == 0) {
        float total = 0.f;
        for (int r = 0; r < kRowGroups; ++r) total += part[r][x];
        if (col < d) {
          float* s = sums + code * lds + col;
          *s = keep * *s + gain * total;
        }
        if (c0 == 0 && x == 0) {
          float total_w = 0.f;
          for (int r = 0; r < kRowGroups; ++r) total_w += part_w[r];
          float* c = counts + code * ldc;
          *c = keep * *c + gain * total_w;
        }
      }
      __syncthreads();  // part is rewritten by the next pass, run by the next code
    }
  }
}

int lanes_for(int64_t d) { return d <= 4 ? 4 : d <= 8 ? 8 : d <= 16 ? 16 : 32; }

template <class T>
cudaError_t atomic_typed(const EmaArgs& a, const int64_t* idx, cudaStream_t stream) {
  const int tpr = lanes_for(a.d);
  const int64_t rows_per_block = kThreads / tpr;
  const dim3 grid(static_cast<unsigned>(
      std::min(kMaxBlocks, (a.n + rows_per_block - 1) / rows_per_block)));
  const auto* z = static_cast<const T*>(a.z);
#define FASTVQ_EMA_ATOMIC(TPR_)                                                                  \
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
cudaError_t sorted_typed(const EmaArgs& a, const int64_t* sorted, const int64_t* order,
                         cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(std::min(kMaxBlocks, a.k)));
  sorted_kernel<T><<<grid, kThreads, 0, stream>>>(a.counts, a.ldc, a.sums, a.lds,
                                                  static_cast<const T*>(a.z), a.ldz, a.weight,
                                                  sorted, order, a.n, a.k, a.d, a.keep, a.gain);
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

cudaError_t launch_ema_sorted(const EmaArgs& a, const int64_t* sorted_idx, const int64_t* order,
                              cudaStream_t stream) {
  if (bad_args(a)) return cudaErrorInvalidValue;
  switch (a.dtype) {
    case DType::F32:
      return sorted_typed<float>(a, sorted_idx, order, stream);
    case DType::BF16:
      return sorted_typed<__nv_bfloat16>(a, sorted_idx, order, stream);
    case DType::F16:
      return sorted_typed<__half>(a, sorted_idx, order, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastvq

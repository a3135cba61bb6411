// CUDA kernels of fastvq::quantize_fwd_cpp / quantize_bwd_cpp: the gather after the search, the
// per-row statistics of the rotation / Householder estimators, and their closed-form backward.
// Torch-free (raw pointers); launch interface quantize.h, torch glue quantize_torch.cpp. Formulas
// and degenerate-row rules are those of csrc/cpu/quantize.cpp and kernels/quantize.py.
//
// Design: bytes bound (the forward reads z and q and writes q, the backward reads g, z and q and
// writes dz), so one group of TPR lanes walks one row with coalesced element loads; TPR = 4..32
// follows D so that small D does not idle most of a warp. Row sums (|z|^2, |q|^2, |e|^2, e.g,
// q.g) are lane partials combined by an xor butterfly, which leaves the same value in every lane
// of the group. The second pass over a row (e after the norms; dz after the dot products)
// re-reads it, from L1/L2 for the row sizes of VQ (D <= 1024).
// Exactness the degenerate rules need: |z| and |q| go through the same lane split and butterfly,
// so z = -q or z = 2q give |z| = |q| or 2|q| exactly, and z^ and q^ use __fmul_rn (never
// contracted into an FMA) so that e = z^ + q^ is exactly 0 for z = -q (rotation -> STE) and
// e = z^ - q^ exactly 0 for z^ = q^ (householder -> s g).
// The codebook gradient: float32 atomicAdd into a zeroed (K, D) buffer (run-to-run rounding may
// differ; a hot code serializes its atomics at L2). 64-bit offsets wherever a row meets D.
// Performance: unmeasured (no GPU in the session that wrote this).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "quantize.h"

namespace fastvq {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 16;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}

// Sum over the TPR lanes of a group; every lane of the group gets the same value (a + b == b + a
// bit for bit at each butterfly stage). All 32 lanes of the warp must call it.
template <int TPR>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int off = TPR / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off, TPR);
  return v;
}

struct Stats {
  float scale, inv_z, inv_q, w;
};

// kernels/quantize.py's per-row statistics from the squared norms and, for e2, a callback that
// sums |z inv_z + sign q inv_q|^2 over the row. Divisors are never 0: no inf/NaN is formed.
template <class E2>
__device__ __forceinline__ Stats row_stats(float zz, float qq, bool rotation, const E2& e2_of) {
  const float inf = __int_as_float(0x7f800000);
  const float nz = sqrtf(zz);
  const float nq = sqrtf(qq);
  const float scale = nq / (nz > 0.f ? nz : 1.f);
  bool ok = nz > 0.f && nq > 0.f && nz < inf && scale < inf;
  float inv_z = ok ? 1.f / nz : 0.f;
  float inv_q = ok ? 1.f / nq : 0.f;
  const float e2 = e2_of(inv_z, inv_q);
  // Below float32's smallest normal e counts as 0 (fastvq/reference/quantize.py says why).
  const bool e_ok = e2 >= 1.17549435e-38f;
  if (rotation && !e_ok) {
    ok = false;  // z^ = -q^: the rotation is not unique; the row falls back to STE
    inv_z = inv_q = 0.f;
  }
  return {ok ? scale : 1.f, inv_z, inv_q, ok && e_ok ? 2.f / e2 : 0.f};
}

// The row index of this lane's group in the grid-stride loop below, and whether it is a row.
template <int TPR>
struct RowLoop {
  static constexpr int kRowsPerBlock = kThreads / TPR;
  __device__ static int64_t first() {
    return static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / TPR;
  }
  __device__ static int64_t step() { return static_cast<int64_t>(gridDim.x) * kRowsPerBlock; }
};

template <class T, int TPR>
__global__ void __launch_bounds__(kThreads)
    quantize_fwd_kernel(const T* __restrict__ z, const T* __restrict__ cb,
                        const int64_t* __restrict__ idx, int64_t n, int64_t k, int64_t d, int mode,
                        T* __restrict__ zq, float* __restrict__ stats) {
  const int lane = threadIdx.x % TPR;
  const float sign = mode == static_cast<int>(Grad::Rotation) ? 1.f : -1.f;
  const bool ste = mode == static_cast<int>(Grad::Ste);
  // Uniform trip count over the block, so that every lane reaches the shuffles.
  for (int64_t base = RowLoop<TPR>::first() - threadIdx.x / TPR; base < n;
       base += RowLoop<TPR>::step()) {
    const int64_t row = base + threadIdx.x / TPR;
    const bool active = row < n;
    const int64_t code = active ? idx[row] : 0;
    const bool valid = active && code >= 0 && code < k;
    const T* zr = z + row * d;
    const T* qr = cb + code * d;
    T* out = zq + row * d;
    float zz = 0.f, qq = 0.f;
    for (int64_t j = lane; j < d; j += TPR) {
      if (valid) {
        const T q = qr[j];
        out[j] = q;
        if (!ste) {
          const float zv = to_float(zr[j]), qv = to_float(q);
          zz += zv * zv;
          qq += qv * qv;
        }
      } else if (active) {
        out[j] = from_float<T>(__int_as_float(0x7fc00000));
      }
    }
    if (ste) continue;
    zz = group_sum<TPR>(zz);
    qq = group_sum<TPR>(qq);
    const Stats st = row_stats(zz, qq, !ste && sign > 0.f, [&](float inv_z, float inv_q) {
      float e2 = 0.f;
      for (int64_t j = lane; j < d; j += TPR) {
        if (!valid) break;
        const float e = __fmul_rn(to_float(zr[j]), inv_z) + sign * __fmul_rn(to_float(qr[j]), inv_q);
        e2 += e * e;
      }
      return group_sum<TPR>(e2);
    });
    if (active && lane == 0) {
      float* s = stats + 4 * row;
      if (valid) {
        s[0] = st.scale, s[1] = st.inv_z, s[2] = st.inv_q, s[3] = st.w;
      } else {
        s[0] = 1.f, s[1] = 0.f, s[2] = 0.f, s[3] = 0.f;
      }
    }
  }
}

template <class T, int TPR>
__global__ void __launch_bounds__(kThreads)
    quantize_bwd_kernel(const T* __restrict__ g, const T* __restrict__ z, const T* __restrict__ cb,
                        const int64_t* __restrict__ idx, const float* __restrict__ stats, int64_t n,
                        int64_t k, int64_t d, int mode, T* __restrict__ dz,
                        float* __restrict__ dc) {
  const int lane = threadIdx.x % TPR;
  const bool rotation = mode == static_cast<int>(Grad::Rotation);
  const float sign = rotation ? 1.f : -1.f;
  for (int64_t base = RowLoop<TPR>::first() - threadIdx.x / TPR; base < n;
       base += RowLoop<TPR>::step()) {
    const int64_t row = base + threadIdx.x / TPR;
    const bool active = row < n;
    const int64_t code = active ? idx[row] : 0;
    const bool valid = active && code >= 0 && code < k;
    const T* gr = g + row * d;
    const T* zr = z + row * d;
    const T* qr = cb + code * d;
    float scale = 1.f, inv_z = 0.f, inv_q = 0.f, w = 0.f;
    if (dz != nullptr && valid) {
      const float* s = stats + 4 * row;
      scale = s[0], inv_z = s[1], inv_q = s[2], w = s[3];
    }
    float eg = 0.f, qg = 0.f;
    for (int64_t j = lane; j < d; j += TPR) {
      if (!valid) break;
      const float gv = to_float(gr[j]);
      if (dc != nullptr) atomicAdd(dc + code * d + j, gv);
      if (dz != nullptr) {
        const float qv = to_float(qr[j]);
        const float e = __fmul_rn(to_float(zr[j]), inv_z) + sign * __fmul_rn(qv, inv_q);
        eg += e * gv;
        qg += qv * gv;
      }
    }
    if (dz == nullptr) continue;
    eg = group_sum<TPR>(eg);
    qg = group_sum<TPR>(qg);
    const float wp = w * eg;
    const float qg2 = rotation && inv_q > 0.f ? 2.f * (qg * inv_q) : 0.f;  // inf * 0: a NaN
    T* out = dz + row * d;
    for (int64_t j = lane; j < d; j += TPR) {
      if (!active) break;
      float v = __int_as_float(0x7fc00000);
      if (valid) {
        const float gv = to_float(gr[j]);
        const float zs = __fmul_rn(to_float(zr[j]), inv_z);
        const float e = zs + sign * __fmul_rn(to_float(qr[j]), inv_q);
        v = scale * ((gv - wp * e) + qg2 * zs);
      }
      out[j] = from_float<T>(v);
    }
  }
}

// Lanes per row: the smallest power of two >= d, from 4 to 32.
int lanes_for(int64_t d) { return d <= 4 ? 4 : d <= 8 ? 8 : d <= 16 ? 16 : 32; }

unsigned blocks_for(int64_t n, int tpr) {
  const int64_t rows_per_block = kThreads / tpr;
  return static_cast<unsigned>(std::min(kMaxBlocks, (n + rows_per_block - 1) / rows_per_block));
}

template <class T>
cudaError_t fwd_typed(const void* z, const void* cb, const int64_t* idx, int64_t n, int64_t k,
                      int64_t d, int mode, void* zq, float* stats, cudaStream_t stream) {
  const int tpr = lanes_for(d);
  const dim3 grid(blocks_for(n, tpr)), block(kThreads);
  const auto* zt = static_cast<const T*>(z);
  const auto* ct = static_cast<const T*>(cb);
  auto* out = static_cast<T*>(zq);
  switch (tpr) {
    case 4:
      quantize_fwd_kernel<T, 4><<<grid, block, 0, stream>>>(zt, ct, idx, n, k, d, mode, out, stats);
      break;
    case 8:
      quantize_fwd_kernel<T, 8><<<grid, block, 0, stream>>>(zt, ct, idx, n, k, d, mode, out, stats);
      break;
    case 16:
      quantize_fwd_kernel<T, 16><<<grid, block, 0, stream>>>(zt, ct, idx, n, k, d, mode, out,
                                                             stats);
      break;
    default:
      quantize_fwd_kernel<T, 32><<<grid, block, 0, stream>>>(zt, ct, idx, n, k, d, mode, out,
                                                             stats);
  }
  return cudaGetLastError();
}

template <class T>
cudaError_t bwd_typed(const void* g, const void* z, const void* cb, const int64_t* idx,
                      const float* stats, int64_t n, int64_t k, int64_t d, int mode, void* dz,
                      float* dc, cudaStream_t stream) {
  const int tpr = lanes_for(d);
  const dim3 grid(blocks_for(n, tpr)), block(kThreads);
  const auto* gt = static_cast<const T*>(g);
  const auto* zt = static_cast<const T*>(z);
  const auto* ct = static_cast<const T*>(cb);
  auto* out = static_cast<T*>(dz);
  switch (tpr) {
    case 4:
      quantize_bwd_kernel<T, 4><<<grid, block, 0, stream>>>(gt, zt, ct, idx, stats, n, k, d, mode,
                                                            out, dc);
      break;
    case 8:
      quantize_bwd_kernel<T, 8><<<grid, block, 0, stream>>>(gt, zt, ct, idx, stats, n, k, d, mode,
                                                            out, dc);
      break;
    case 16:
      quantize_bwd_kernel<T, 16><<<grid, block, 0, stream>>>(gt, zt, ct, idx, stats, n, k, d,
                                                             mode, out, dc);
      break;
    default:
      quantize_bwd_kernel<T, 32><<<grid, block, 0, stream>>>(gt, zt, ct, idx, stats, n, k, d,
                                                             mode, out, dc);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_quantize_fwd(const void* z, const void* codebook, const int64_t* idx, int64_t n,
                                int64_t k, int64_t d, DType dtype, Grad grad, void* zq,
                                float* stats, cudaStream_t stream) {
  const int mode = static_cast<int>(grad);
  if (n < 0 || k < 1 || d < 1 || (grad != Grad::Ste && stats == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (n == 0) return cudaSuccess;
  switch (dtype) {
    case DType::F32:
      return fwd_typed<float>(z, codebook, idx, n, k, d, mode, zq, stats, stream);
    case DType::BF16:
      return fwd_typed<__nv_bfloat16>(z, codebook, idx, n, k, d, mode, zq, stats, stream);
    case DType::F16:
      return fwd_typed<__half>(z, codebook, idx, n, k, d, mode, zq, stats, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_quantize_bwd(const void* grad_out, const void* z, const void* codebook,
                                const int64_t* idx, const float* stats, int64_t n, int64_t k,
                                int64_t d, DType dtype, Grad grad, void* dz, float* dc_acc,
                                cudaStream_t stream) {
  const int mode = static_cast<int>(grad);
  if (n < 0 || k < 1 || d < 1 || (dz != nullptr && (grad == Grad::Ste || stats == nullptr))) {
    return cudaErrorInvalidValue;
  }
  if (n == 0 || (dz == nullptr && dc_acc == nullptr)) return cudaSuccess;
  switch (dtype) {
    case DType::F32:
      return bwd_typed<float>(grad_out, z, codebook, idx, stats, n, k, d, mode, dz, dc_acc,
                              stream);
    case DType::BF16:
      return bwd_typed<__nv_bfloat16>(grad_out, z, codebook, idx, stats, n, k, d, mode, dz,
                                      dc_acc, stream);
    case DType::F16:
      return bwd_typed<__half>(grad_out, z, codebook, idx, stats, n, k, d, mode, dz, dc_acc,
                               stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastvq

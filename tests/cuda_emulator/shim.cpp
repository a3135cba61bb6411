// C entry points to the launch functions of csrc/cuda/{nearest_code,quantize,ema,leech}.cu,
// compiled against emulator.h, for tests/test_cuda_emulated.py (through ctypes and run_calls.py).
// Every argument is a pointer, an int64_t or a double, so ctypes needs no signature table; enums
// are passed as their values (nearest_code.h's DType, quantize.h's Grad, leech.h's LeechDType).
// Each returns the launch function's cudaError_t. Streams are null: the emulator runs every
// launch to completion.
#include <cstdint>

#include "ema.h"
#include "leech.h"
#include "nearest_code.h"
#include "quantize.h"

using fastvq::cuda::DType;
using fastvq::cuda::EmaArgs;
using fastvq::cuda::EmaPieces;
using fastvq::cuda::Grad;
using fastvq::cuda::LeechDType;

extern "C" {

// The seed of the emulator's thread order (emulator.h) for the launches that follow.
int emu_seed(int64_t seed) {
  fastvq_emu::set_seed(static_cast<uint64_t>(seed));
  return cudaSuccess;
}

// The emulated device's SM count and opt-in shared memory per block, for the plans that follow.
int emu_device(int64_t sms, int64_t smem_per_block_optin) {
  fastvq_emu::set_device(static_cast<int>(sms), static_cast<int>(smem_per_block_optin));
  return cudaSuccess;
}

// nearest_code's `precision`: 0 exact (screening chosen by size, which these small searches
// never are), 1 fast, 2 exact with the tf32 screening pass forced.
constexpr fastvq::cuda::Screen screen_of(int64_t precision) {
  return precision == 2 ? fastvq::cuda::Screen::kAlways : fastvq::cuda::Screen::kAuto;
}

// *bytes = nearest_code_workspace_bytes(...), as an int64_t.
int emu_nearest_code_workspace(int64_t n, int64_t k, int64_t d, int64_t dtype, int64_t precision,
                               int64_t* bytes) {
  size_t b = 0;
  const cudaError_t err = fastvq::cuda::nearest_code_workspace_bytes(
      n, k, d, static_cast<DType>(dtype), precision == 1, &b, screen_of(precision));
  *bytes = static_cast<int64_t>(b);
  return err;
}

int emu_nearest_code(const void* z, const void* codebook, const float* scale, const float* bias,
                     int64_t n, int64_t k, int64_t d, int64_t dtype, int64_t precision,
                     int64_t* out, void* workspace, int64_t workspace_bytes) {
  return fastvq::cuda::launch_nearest_code(
      z, codebook, scale, bias, n, k, d, static_cast<DType>(dtype), precision == 1, out, workspace,
      static_cast<size_t>(workspace_bytes), nullptr, screen_of(precision));
}

// After emu_nearest_code, given its workspace: *count = the number of rows it rechecked and
// rows[:*count] their indices (rows holds n), or *count = -1 where the search did not screen.
int emu_nearest_code_rechecked(int64_t n, int64_t k, int64_t d, int64_t dtype, int64_t precision,
                               const void* workspace, int64_t* count, int64_t* rows) {
  const int32_t* listed_count = nullptr;
  const int64_t* listed = nullptr;
  const cudaError_t err = fastvq::cuda::nearest_code_rechecked_rows(
      n, k, d, static_cast<DType>(dtype), precision == 1, workspace, &listed_count, &listed,
      screen_of(precision));
  *count = listed_count == nullptr ? -1 : *listed_count;
  for (int64_t i = 0; i < *count; ++i) rows[i] = listed[i];
  return err;
}

int emu_quantize_fwd(const void* z, const void* codebook, const int64_t* idx, int64_t n, int64_t k,
                     int64_t d, int64_t dtype, int64_t grad, void* zq, float* stats) {
  return fastvq::cuda::launch_quantize_fwd(z, codebook, idx, n, k, d, static_cast<DType>(dtype),
                                           static_cast<Grad>(grad), zq, stats, nullptr);
}

int emu_quantize_bwd(const void* grad_out, const void* z, const void* codebook, const int64_t* idx,
                     const float* stats, int64_t n, int64_t k, int64_t d, int64_t dtype,
                     int64_t grad, void* dz, float* dc_acc) {
  return fastvq::cuda::launch_quantize_bwd(grad_out, z, codebook, idx, stats, n, k, d,
                                           static_cast<DType>(dtype), static_cast<Grad>(grad), dz,
                                           dc_acc, nullptr);
}

// EmaArgs' fields, then the rows: `idx` for the atomic variant, or ema.h's EmaPieces (order ..
// partial) for the deterministic one, which runs when order is not null.
int emu_ema(float* counts, int64_t ldc, float* sums, int64_t lds, const void* z, int64_t ldz,
            int64_t dtype, const float* weight, int64_t n, int64_t k, int64_t d, double keep,
            double gain, const int64_t* idx, const int64_t* order, const int64_t* offsets,
            const int64_t* piece_offsets, const int64_t* slot_offsets, const int64_t* piece_code,
            int64_t programs, int64_t piece_rows, float* partial) {
  const EmaArgs a{.counts = counts,
                  .ldc = ldc,
                  .sums = sums,
                  .lds = lds,
                  .z = z,
                  .ldz = ldz,
                  .dtype = static_cast<DType>(dtype),
                  .weight = weight,
                  .n = n,
                  .k = k,
                  .d = d,
                  .keep = static_cast<float>(keep),
                  .gain = static_cast<float>(gain)};
  if (order == nullptr) return fastvq::cuda::launch_ema_atomic(a, idx, nullptr);
  const EmaPieces p{order,      offsets,  piece_offsets, slot_offsets,
                    piece_code, programs, piece_rows,    partial};
  return fastvq::cuda::launch_ema_pieces(a, p, nullptr);
}

int emu_leech_decode(const void* z, int64_t n, int64_t dtype, int64_t* out_idx) {
  return fastvq::cuda::launch_leech_decode(z, n, static_cast<LeechDType>(dtype), out_idx, nullptr);
}

}  // extern "C"

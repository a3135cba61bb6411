// Warp-wide tensor-core products through PTX mma.sync (sm_80 and up). Unlike WMMA's, these
// fragment layouts are documented (PTX ISA, "Matrix Fragments for mma.m16n8k16" and "...k8"), so
// a kernel loads its operands straight from shared memory and reads its accumulators in
// registers, knowing each one's (row, column). With g = lane / 4 and t = lane % 4:
//
//   A, 16 x 16 row-major, 16-bit:  register r holds row g + 8 (r & 1), columns 2t + 8 (r >> 1)
//                                  + {0, 1} (the lower column in the low half)
//   A, 16 x 8 row-major, tf32:     register r holds row g + 8 (r & 1), column t + 4 (r >> 1)
//   B, 16 x 8 column-major, 16-bit: register r holds column g, rows 2t + 8r + {0, 1}
//   B, 8 x 8 column-major, tf32:   register r holds column g, row t + 4r
//   C and D, 16 x 8 float32:       element e is row g + 8 (e >> 1), column 2t + (e & 1)
//
// tests/cuda_emulator/emulator.h defines FASTVQ_EMULATED_PTX and these functions itself, as a
// model of the layouts above, so that CI runs the kernels that use them.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#ifndef FASTVQ_EMULATED_PTX

namespace fastvq {
namespace cuda {
namespace ptx {

// d += a b, m16n8k16, S = __nv_bfloat16 or __half operands, float32 accumulate.
template <class S>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]) {
  if constexpr (std::is_same<S, __nv_bfloat16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    static_assert(std::is_same<S, __half>::value, "bf16 or fp16 operands");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// d += a b, m16n8k8, tf32 operands (from to_tf32), float32 accumulate.
__device__ __forceinline__ void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4],
                                                 const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: four 8 x 8 matrices of 16-bit elements, each 8 rows
// of 16 bytes in shared memory. Lane l gives the (16-byte aligned) address of row l % 8 of matrix
// l / 8 and receives in r[j] the 32-bit word l % 4 of row l / 4 of matrix j: for 16-bit types
// the A and B fragment registers above, and for float32 seen as 16-bit pairs (8 rows of 4
// floats) the tf32 ones.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  const auto address = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

// cvt.rna.tf32.f32: x rounded to tf32 (to nearest, ties away from zero), as float32 bits whose
// low 13 bits are zero.
__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t bits;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(bits) : "f"(x));
  return bits;
}

}  // namespace ptx
}  // namespace cuda
}  // namespace fastvq

#endif  // FASTVQ_EMULATED_PTX

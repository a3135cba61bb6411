// Every fastvq op schema, in one place. Kernels register implementations per dispatch key in
// csrc/cpu/<op>.cpp and csrc/cuda/<op>.cpp; fake (meta) implementations live in fastvq/ops.
#include <Python.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include "cpu/isa.h"

TORCH_LIBRARY(fastvq, m) {
  // idx[n] = argmax_k  dot(z[n], codebook[k]) * code_scale[k] + code_bias[k]
  // z (N, D) and codebook (K, D) contiguous, one floating dtype; code_scale, code_bias (K,)
  // float32 or None (1 and 0). Dot products accumulate in float32; `fast` allows reduced-precision
  // products (bf16/tf32) for float32 inputs. Ties go to the lowest k; NaN scores never win; a row
  // whose scores are all -inf or NaN gets 0. Returns int64 (N,). `screen` changes only how an
  // exact float32 search on a GPU runs, never its answer: True by a tf32 screening pass and a
  // 3xTF32 recheck of the rows it cannot decide (tf32 copies of z and codebook in scratch), False
  // by 3xTF32 alone, None chosen by size; the CPU kernel ignores it.
  m.def(
      "nearest_code(Tensor z, Tensor codebook, Tensor? code_scale, Tensor? code_bias, bool fast, "
      "bool? screen=None) -> Tensor");
  // The k best codes per row: score[n][j] = dot(z[n], codebook[j]) * code_scale[j] + code_bias[j]
  // with nearest_code's inputs and arithmetic (its answer is column 0), 1 <= k <= min(K, 128).
  // Returns int64 (N, k): the indices of each row's k largest scores, best first; equal scores in
  // increasing index; NaN scores rank as -inf (a row of NaN gets 0, 1, ..., k-1, a NaN code comes
  // after every number). `fast` as in nearest_code.
  m.def(
      "nearest_code_topk(Tensor z, Tensor codebook, Tensor? code_scale, Tensor? code_bias, int k, "
      "bool fast) -> Tensor");
  // The sum of squares of each row of x, accumulated in float64 (the squares of float32 and half
  // values exactly): the codes' norms behind the C++ search's per-code terms. CPU only (the
  // Triton search's: squared_norms_triton in kernels/nearest_code.py). x (K, D) contiguous
  // float32/float64/float16/bfloat16. Returns float64 (K,).
  m.def("squared_norms(Tensor x) -> Tensor");
  // Structured Leech decoder (fastvq/lattice/leech.py): idx[n] = the canonical index of the
  // minimal Leech vector of largest inner product with z[n], ties to the lowest index, 0 for rows
  // with NaN or Inf. z (N, 24) contiguous float32/float64/float16/bfloat16 (scores in float32,
  // float64 for float64). Returns int64 (N,).
  m.def("leech_decode(Tensor z) -> Tensor");
  // The E8 shell decoder (fastvq/lattice/e8.py _decode), CPU only (CUDA tensors: its Triton twin in
  // kernels/e8.py): idx[n] = the canonical index of the minimal E8 vector of largest inner product
  // with z[n], ties to the lowest index, 0 for rows with NaN or Inf. z (N, 8) contiguous
  // float32/float64/float16/bfloat16 (scores in float32, float64 for float64). Returns int64 (N,).
  m.def("e8_shell_decode(Tensor z) -> Tensor");
  // The nearest E8 lattice point to each row (fastvq/lattice/e8.py _nearest, bit for bit, -0
  // included), CPU only (CUDA tensors: its Triton twin in kernels/e8.py). x (N, 8) contiguous
  // float32/float64/float16/bfloat16, computed in float32 (float64 for float64); the D8 point on
  // equal distance; rows with NaN or Inf are rounded coordinate by coordinate (torch.round).
  // Returns (N, 8) of x's dtype (rounded to nearest even).
  m.def("e8_nearest(Tensor x) -> Tensor");
  // fastvq.quantize after the search (formulas in fastvq/ops/quantize.py). z (N, D) and codebook
  // (K, D) contiguous, one dtype (float32/bf16/fp16); indices (N,) int64 in [0, K); grad "ste",
  // "rotation" or "householder". Forward: z_q = codebook[indices] (N, D) and float32 per-row
  // stats (N, 4) = (s, 1/|z|, 1/|q|, w) ((N, 0) for "ste"). Out-of-range indices: RuntimeError on
  // the CPU; on CUDA (no host sync to check) the row's z_q is NaN and the backward skips it.
  m.def(
      "quantize_fwd_cpp(Tensor z, Tensor codebook, Tensor indices, str grad) -> (Tensor, Tensor)");
  // Backward: (dz, dcodebook) from grad_out = dL/dz_q (N, D) of z's dtype; dz (N, D) if need_z
  // (rotation / householder only) else (0, D); dcodebook (K, D) = sum of grad_out rows per code if
  // need_codebook else (0, D), both in the inputs' dtype. stats as the forward returned them.
  m.def(
      "quantize_bwd_cpp(Tensor grad_out, Tensor z, Tensor codebook, Tensor indices, Tensor stats, "
      "str grad, bool need_z, bool need_codebook) -> (Tensor, Tensor)");
  // EMA statistics in place: counts = keep * counts + gain * c, sums = keep * sums + gain * s with
  // c[k] = sum of w[n], s[k] = sum of w[n] z[n] over indices[n] == k, in float32. counts (K,) and
  // sums (K, D) float32 (any row stride, unit column stride); z (N, D) float32/bf16/fp16 with unit
  // column stride; indices (N,) int64 in [0, K); weight (N,) float32 or None (ones).
  // deterministic: bit-identical run to run (the CPU kernel always is; CUDA: a stable sort, then
  // a fixed-order sum per code, instead of float32 atomics). Out-of-range indices: RuntimeError
  // on the CPU; rows skipped on CUDA (no host sync to check).
  m.def(
      "ema_scatter_cpp(Tensor(a!) counts, Tensor(b!) sums, Tensor z, Tensor indices, "
      "Tensor? weight, float keep, float gain, bool deterministic) -> ()");
  // The scalar quantizers of fastvq/ops/scalar.py (formulas there), CPU only (on GPUs their
  // Triton twins in kernels/scalar.py). z and grad_codes (N, D) contiguous float32/bf16/fp16,
  // computed in float32, results in z's dtype; D <= 62 for the sign ops, <= 1024 otherwise.
  // FSQ: params (6, D) float32 rows shift, h, offset, L // 2, L - 1 - L // 2, h / (L // 2);
  // basis (D,) int64 mixed-radix weights. Returns (codes, int64 indices) and dz.
  m.def("fsq_fwd_cpp(Tensor z, Tensor params, Tensor basis) -> (Tensor, Tensor)");
  m.def("fsq_bwd_cpp(Tensor grad_codes, Tensor z, Tensor params) -> Tensor");
  // LFQ (scale 1) / BSQ (scale 1/sqrt(D)) codes +-scale from z >= 0 and bit-packed indices;
  // BSQ's backward through z / |z|.
  m.def("sign_fwd_cpp(Tensor z, float scale) -> (Tensor, Tensor)");
  m.def("bsq_bwd_cpp(Tensor grad_codes, Tensor z) -> Tensor");
  // Binary entropy of sigmoid(coef * x), x = z or z / |z| (spherical): float32 row entropies (N,)
  // and column sums (2, D) of p(+), p(-); the backward from their float32 gradients.
  m.def(
      "binary_entropy_fwd_cpp(Tensor z, float coef, bool spherical) -> (Tensor, Tensor)");
  m.def(
      "binary_entropy_bwd_cpp(Tensor grad_rows, Tensor grad_cols, Tensor z, float coef, "
      "bool spherical) -> Tensor");
}

// The in-place update's version counts, on every device: autograd then refuses a backward that
// saved counts or sums before the update (as for torch's own in-place ops) instead of reading the
// updated values silently.
// (torch's inplace-or-view fallback bumps only returned tensors; this op returns none.)
static void bump_written_versions(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                                  torch::jit::Stack* stack) {
  const at::Tensor counts = (*stack)[0].toTensor(), sums = (*stack)[1].toTensor();
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  counts.unsafeGetTensorImpl()->bump_version();
  sums.unsafeGetTensorImpl()->bump_version();
}

TORCH_LIBRARY_IMPL(fastvq, ADInplaceOrView, m) {
  m.impl("ema_scatter_cpp", torch::CppFunction::makeFromBoxedFunction<&bump_written_versions>());
}

// Which build of the CPU kernels this process runs (csrc/cpu/isa.h), for fastvq.backends():
// "avx2+fma" (all of them AVX2), "avx2" (the search, which wants FMA, runs its baseline build) or
// "baseline" (SSE2 on x86-64; FASTVQ_CPU_BASELINE=1 forces it).
static PyObject* cpu_isa(PyObject*, PyObject*) {
  namespace cpu = fastvq::cpu;
  return PyUnicode_FromString(cpu::use_avx2(/*with_fma=*/true)    ? "avx2+fma"
                              : cpu::use_avx2(/*with_fma=*/false) ? "avx2"
                                                                  : "baseline");
}

// The extension is loaded for its op registrations; cpu_isa is its one Python function.
extern "C" PyObject* PyInit__C(void) {
  static PyMethodDef methods[] = {{"cpu_isa", cpu_isa, METH_NOARGS, nullptr},
                                  {nullptr, nullptr, 0, nullptr}};
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module);
}

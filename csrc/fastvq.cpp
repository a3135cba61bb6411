// Every fastvq op schema, in one place. Kernels register implementations per dispatch key in
// csrc/cpu/<op>.cpp and csrc/cuda/<op>.cpp; fake (meta) implementations live in fastvq/ops.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fastvq, m) {
  // idx[n] = argmax_k  dot(z[n], codebook[k]) * code_scale[k] + code_bias[k]
  // z (N, D) and codebook (K, D) contiguous, one floating dtype; code_scale, code_bias (K,)
  // float32 or None (1 and 0). Dot products accumulate in float32; `fast` allows reduced-precision
  // products (bf16/tf32) for float32 inputs. Ties go to the lowest k; NaN scores never win; a row
  // whose scores are all -inf or NaN gets 0. Returns int64 (N,).
  m.def(
      "nearest_code(Tensor z, Tensor codebook, Tensor? code_scale, Tensor? code_bias, bool fast) "
      "-> Tensor");
}

// The extension is loaded for its op registrations only; Python needs a module init to import it.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

"""Compile every Triton kernel of fastvq for an H100 (sm_90) on a machine without a GPU.

The launchers in fastvq.kernels run on CPU tensors with Triton's launch replaced by
triton.compile of the same kernel, arguments, constexprs and launch options, down to a cubin
(Triton bundles ptxas). That checks what the interpreter cannot: types, layouts and lowering of
the GPU tile sizes. Each compiled specialization prints one line with its registers, its spills
(STL: local-memory stores in the SASS; STACK: the stack frame in bytes; cuobjdump's LOCAL field
stays 0 for spilled registers) and its shared memory (Triton allocates it dynamically at launch:
the kernel's metadata, not cuobjdump's SHARED, which counts static shared memory only). The
kernels in HOT may not spill, and no kernel may ask for more shared memory than an H100 gives a
block: only a GPU run would show either (local-memory traffic in the inner loop, or a launch
error). The kernels in IEEE_ONLY are also read in PTX for arithmetic that rounds differently from
the interpreter's numpy.

python tests/triton_sm90.py   (run with TRITON_INTERPRET unset; tests/test_build.py does so)
"""

import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

TARGET = GPUTarget("cuda", 90, 32)
OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion")
POINTER = {
    torch.float32: "*fp32",
    torch.float64: "*fp64",
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.int64: "*i64",
    torch.int32: "*i32",
    torch.int8: "*i8",
}
_compiled: dict[str, str] = {}
# Kernels whose docstrings promise the CPU reference's rounding, operation by operation (bit for
# bit, or an exact cancellation such as quantize's e = z^ - q^ = 0 at z = q). Their PTX may hold
# no fused multiply-add (launch them with enable_fp_fusion=False: Triton fuses a * b + c by
# default) and no approximate division, square root, exp or log (`/` on float32 is div.full.f32,
# up to 2 ulps off, and tl.sqrt sqrt.approx.f32; tl.div_rn and tl.sqrt_rn round exactly). The
# interpreter rounds each operation exactly, so only the compiled code can show these.
IEEE_ONLY = {
    "_quantize_fwd_kernel",
    "_quantize_bwd_kernel",
    "_e8_nearest_fwd_kernel",
    "_leech_decode_fwd_kernel",
}
NOT_IEEE = re.compile(r"\b(fma\.rn|div\.full|(div|sqrt|rcp|ex2|lg2|sin|cos|tanh)\.approx)\.\S+")
_not_ieee: list[str] = []
# The searches and the per-row kernels of training steps: a spill there is local-memory traffic on
# every K tile or row. 227 KiB: the most shared memory an sm_90 block may opt in to.
HOT = (
    "_nearest_code_fwd_kernel",
    "_nearest_code_topk_kernel",
    "_quantize_fwd_kernel",
    "_quantize_bwd_kernel",
    "_ema_scatter_fwd_kernel",
    "_ema_piece_kernel",
    "_ema_combine_kernel",
    "_leech_decode_fwd_kernel",
)
MAX_SHARED = 227 * 1024
_over_budget: list[str] = []


def _type(value) -> str:
    if isinstance(value, torch.Tensor):
        return POINTER[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def _resources(kernel) -> tuple[str, int]:
    """The resource summary of a compiled kernel, and its spill stores (STL instructions)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        dump = [tool, "--dump-resource-usage", f.name]
        out = subprocess.run(dump, capture_output=True, text=True)
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    fields = dict(w.split(":", 1) for w in out.stdout.split() if w.split(":")[0].isupper())
    stl = len(re.findall(r"\bSTL(\.\w+)*\s", sass))
    summary = (
        f"REG {fields.get('REG')} STL {stl} STACK {fields.get('STACK')} "
        f"SHARED {kernel.metadata.shared}"
    )
    return summary, stl


def _compile_instead_of_launch(self, *args, grid, warmup, **kwargs):
    options = {k: kwargs.pop(k) for k in OPTIONS if k in kwargs}
    # positional arguments first (constexprs may be positional too), then keywords
    bound = dict(zip([p.name for p in self.params[: len(args)]], args, strict=True)) | kwargs
    signature, constexprs = {}, {}
    for p in self.params:
        value = bound[p.name] if p.name in bound else p.default
        if p.is_constexpr or value is None:
            signature[p.name], constexprs[p.name] = "constexpr", value
        else:
            signature[p.name] = _type(value)
    key = f"{self.__name__} {signature} {constexprs} {options}"
    if key not in _compiled:
        start = time.perf_counter()
        source = ASTSource(self, signature, constexprs)
        kernel = triton.compile(source, target=TARGET, options=options)
        types = ",".join(sorted({t for t in signature.values() if t.startswith("*")}))
        flags = " ".join(f"{k}={v}" for k, v in constexprs.items())
        summary, stl = _resources(kernel)
        _compiled[key] = (
            f"{self.__name__} ({types}) [{flags}] {options}: {summary}, "
            f"{time.perf_counter() - start:.1f} s"
        )
        print(_compiled[key], flush=True)
        if (stl and self.__name__ in HOT) or kernel.metadata.shared > MAX_SHARED:
            _over_budget.append(_compiled[key])
        if self.__name__ in IEEE_ONLY:
            found = sorted({m.group(0) for m in NOT_IEEE.finditer(kernel.asm["ptx"])})
            if found:
                _not_ieee.append(f"{self.__name__} [{flags}] {options}: {found}")


def _launch_everything():
    """Every launcher in fastvq.kernels, over the dtypes and tile classes the ops use."""
    from fastvq.kernels import e8, ema, leech, nearest_code, quantize, scalar

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        e8.e8_shell_decode_triton(torch.randn(1000, 8, generator=g).to(dtype))
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        e8.e8_nearest_triton(torch.randn(1000, 8, generator=g).to(dtype))
    for dtype in (torch.float32, torch.float64):
        leech.leech_decode_triton(torch.randn(100, 24, generator=g).to(dtype))
    # nearest code: each precision, one and several D chunks, small and large N, split codebooks,
    # the exact float32 search by 3xTF32 alone and screened (tf32 pass, recheck unsplit / split);
    # K = 4000 adds the masked epilogue (EVEN_K False), the heavier specialization in registers
    for dtype, fast, n, d, k, splits, screen in [
        (torch.float32, False, 4096, 32, 4096, 1, False),
        (torch.float32, False, 4096, 32, 4096, 1, True),
        (torch.float32, False, 4096, 256, 4096, 4, True),
        (torch.float32, False, 4096, 256, 4000, 1, False),
        (torch.float32, True, 4096, 32, 4096, 1, None),
        (torch.float32, True, 48, 128, 4000, 1, None),
        (torch.bfloat16, False, 4096, 32, 4096, 1, None),
        (torch.bfloat16, False, 4096, 256, 4000, 1, None),
        (torch.float16, False, 48, 256, 4096, 1, None),
        (torch.float32, False, 48, 64, 4000, 1, False),
        (torch.float32, False, 8, 300, 4096, 4, False),
        (torch.bfloat16, False, 8, 128, 4000, 1, None),
        (torch.bfloat16, False, 100, 8, 4096, 4, None),
        # the largest tiles in shared memory and registers (a static review's sm_90 compiles:
        # 128 KiB, 232-254 registers): fast D 65-128, exact D 33-64 by 3xTF32 and screened,
        # 16-bit D 96 and 128
        (torch.float32, True, 4096, 128, 4096, 1, None),
        (torch.float32, False, 4096, 64, 4096, 1, False),
        (torch.float32, False, 4096, 64, 4096, 1, True),
        (torch.bfloat16, False, 4096, 128, 4096, 1, None),
        (torch.float16, False, 4096, 96, 4096, 1, None),
    ]:
        z = torch.randn(n, d, generator=g).to(dtype)
        codebook = torch.randn(k, d, generator=g).to(dtype)
        bias = torch.randn(k, generator=g)
        nearest_code.nearest_code_triton(
            z, codebook, None, bias, fast, splits=splits, screen=screen
        )
    # the search's code terms: one and several D chunks
    for dtype, d in ((torch.float32, 32), (torch.bfloat16, 300), (torch.float16, 8)):
        nearest_code.squared_norms_triton(torch.randn(5000, d, generator=g).to(dtype))
    # nearest code top-k: k's register classes (KP 8, 32, 128), one and several D chunks, bf16
    for dtype, fast, n, d, k in [
        (torch.float32, False, 4096, 32, 8),
        (torch.bfloat16, False, 4096, 32, 8),
        (torch.float32, True, 4096, 32, 32),
        (torch.float32, False, 4096, 32, 128),
        (torch.bfloat16, False, 4096, 256, 128),
        (torch.bfloat16, False, 8, 256, 8),
        (torch.bfloat16, False, 8, 128, 8),
        (torch.float32, True, 8, 256, 128),
        (torch.bfloat16, False, 4096, 128, 8),
        (torch.float32, True, 4096, 128, 128),
        (torch.float32, False, 4096, 64, 128),
    ]:
        z = torch.randn(n, d, generator=g).to(dtype)
        codebook = torch.randn(4000, d, generator=g).to(dtype)
        bias = torch.randn(4000, generator=g)
        nearest_code.nearest_code_topk_triton(z, codebook, None, bias, k, fast)
    for dtype in (torch.float32, torch.bfloat16):
        n, k, d = 256, 64, 32
        z = torch.randn(n, d, generator=g).to(dtype)
        codebook = torch.randn(k, d, generator=g).to(dtype)
        idx = torch.randint(0, k, (n,), generator=g)
        counts, sums, weight = torch.zeros(k), torch.zeros(k, d), torch.rand(n, generator=g)
        for w in (None, weight):
            ema.ema_scatter(counts, sums, z, idx, w, 0.1)
            ema.ema_segment(counts, sums, z, idx, w, 0.9, 0.1)
        for grad in ("ste", "rotation", "householder"):
            z_q, stats = quantize.quantize_fwd(z, codebook, idx, grad)
            need_z = grad != "ste"
            quantize.quantize_bwd(z_q, z, codebook, idx, stats, grad, need_z, True)
            if need_z:
                quantize.quantize_bwd(z_q, z, codebook, idx, stats, grad, True, False)
        z6 = torch.randn(n, 6, generator=g).to(dtype)
        params = torch.rand(6, 6, generator=g)
        scalar.fsq_fwd(z6, params, torch.arange(6))
        scalar.fsq_bwd(z6, z6, params)
        z18 = torch.randn(n, 18, generator=g).to(dtype)
        for spherical in (False, True):
            scalar.sign_fwd(z18, spherical)
            scalar.binary_entropy_fwd(z18, 1.0, spherical)
            scalar.binary_entropy_bwd(torch.rand(n), torch.rand(2, 18), z18, 1.0, spherical)
        scalar.bsq_bwd(z18, z18)


def _all_kernels() -> set[str]:
    import importlib
    import pkgutil

    import fastvq.kernels

    names = set()
    for info in pkgutil.iter_modules(fastvq.kernels.__path__):
        module = importlib.import_module(f"fastvq.kernels.{info.name}")
        names |= {
            name
            for name, value in vars(module).items()
            if isinstance(value, JITFunction) and name.endswith("_kernel")
        }
    return names


def main() -> int:
    assert os.environ.get("TRITON_INTERPRET") != "1", "unset TRITON_INTERPRET: this compiles"
    JITFunction.run = _compile_instead_of_launch
    _launch_everything()
    compiled = {line.split(" ", 1)[0] for line in _compiled.values()}
    print(f"{len(_compiled)} specializations of {len(compiled)} kernels compiled for sm_90")
    missing = _all_kernels() - compiled
    if missing:
        print(f"never launched here (add them to _launch_everything): {sorted(missing)}")
        return 1
    if _over_budget:
        print("spills in HOT kernels or shared memory over 227 KiB:", *_over_budget, sep="\n")
        return 1
    if _not_ieee:
        print("IEEE_ONLY kernels with fused or approximate float arithmetic:", *_not_ieee, sep="\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

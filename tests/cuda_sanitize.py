"""Small launches of every GPU kernel of fastvq (CUDA C++ and Triton), for compute-sanitizer:

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 tests/cuda_sanitize.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python3 tests/cuda_sanitize.py cuda

(bench/gpu.sh runs both.) The CPU emulator (tests/cuda_emulator) runs the .cu files under
AddressSanitizer, but it cannot see races between warps on shared memory, misaligned vector
loads, or the Triton kernels' compiled code: the sanitizer on a GPU can. The shapes are small and
odd (N = 37, K = 301, D = 33 and 32; z starts one element into its buffer) so that each masked
edge and each unaligned fallback runs. Backends to run: the arguments ("cuda", "triton"; default
both that are available). With --device cpu it runs the same calls on CPU tensors (backend "cpu",
or "triton" under TRITON_INTERPRET=1), which is how the tests keep it working without a GPU.
"""

import argparse
import sys

import torch

import fastvq
from fastvq.lattice import e8_nearest, e8_shell_quantize, leech_quantize


def _inputs(device, dtype, d, n=37, k=301):
    g = torch.Generator(device="cpu").manual_seed(0)
    # z one element into its buffer, made on the device: a base pointer no vector load may assume
    # aligned (D = 32 would otherwise take the 16-byte loads)
    z = torch.randn(n * d + 1, generator=g).to(device, dtype)[1:].view(n, d)
    codebook = torch.randn(k, d, generator=g)
    return z, codebook.to(device, dtype)


def run(backend: str, device: str) -> None:
    for dtype, d in ((torch.float32, 33), (torch.float32, 32), (torch.bfloat16, 32)):
        z, codebook = _inputs(device, dtype, d)
        for metric in ("l2", "cosine", "dot"):
            for precision in ("exact", "fast"):
                fastvq.nearest_code(
                    z, codebook, metric=metric, precision=precision, backend=backend
                )
        # the exact float32 search screened by a tf32 pass and rechecked, or by 3xTF32 alone
        op = (
            torch.ops.fastvq.nearest_code_triton
            if backend == "triton"
            else torch.ops.fastvq.nearest_code
        )
        for screen in (True, False):
            op(z.float(), codebook.float(), None, None, False, screen=screen)
        if backend != "cuda":  # no CUDA C++ top-k
            fastvq.nearest_code(z, codebook, k=8, backend=backend, return_distance=True)
        for grad in ("ste", "rotation", "householder"):
            zz, cc = z.clone().requires_grad_(), codebook.clone().requires_grad_()
            z_q, idx = fastvq.quantize(zz, cc, grad=grad, backend=backend)
            z_q.float().square().sum().backward()
        for deterministic in (True, False):
            cluster_size = torch.ones(codebook.shape[0], device=device)
            embed_sum = codebook.float().clone()
            weight = torch.rand(z.shape[0], device=device)
            fastvq.ema_update_(
                cluster_size,
                embed_sum,
                z,
                idx,
                0.9,
                weight=weight,
                deterministic=deterministic,
                backend=backend,
            )
        leech_quantize(torch.randn(37, 24, device=device, dtype=dtype), backend=backend)
        if backend != "cuda":  # Triton (and C++ on the CPU) only
            e8_nearest(torch.randn(37, 8, device=device, dtype=dtype), backend=backend)
            e8_shell_quantize(torch.randn(37, 8, device=device, dtype=dtype), backend=backend)
            z6 = torch.randn(37, 6, device=device, dtype=dtype, requires_grad=True)
            codes, _ = fastvq.fsq(z6, [8, 8, 8, 5, 5, 5], backend=backend)
            codes.float().sum().backward()
            z18 = torch.randn(37, 18, device=device, dtype=dtype, requires_grad=True)
            for quantize, name in ((fastvq.lfq, "lfq"), (fastvq.bsq, "bsq")):
                codes, _ = quantize(z18, backend=backend)
                loss = fastvq.binary_entropy_loss(
                    z18, inv_temperature=1.0, quantizer=name, backend=backend
                )
                (codes.float().sum() + sum(t.sum() for t in loss)).backward()
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("backends", nargs="*", help="cuda, triton or cpu")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = parser.parse_args(argv)
    if set(args.backends) - {"cuda", "triton", "cpu"}:
        parser.error(f"backends are cuda, triton or cpu, got {args.backends}")
    names = args.backends or (["cpu"] if args.device == "cpu" else ["cuda", "triton"])
    for backend in names:
        if not fastvq.backends()[backend].available:
            print(f"cuda_sanitize: backend {backend} skipped: {fastvq.backends()[backend].reason}")
            continue
        run(backend, args.device)
        print(f"cuda_sanitize: backend {backend} on {args.device}: every launch returned")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

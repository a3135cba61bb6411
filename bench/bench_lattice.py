"""Leech Λ24 decoding (issue 4): the structured decoder against brute force over the 196,560 codes.

Peers: fastvq.lattice.leech_quantize (each backend where it takes backend=), the fused brute force
fastvq.nearest_code(metric="dot") over leech_codebook() (exact and fast), the chunked float32
PyTorch reference, a bfloat16 GEMM + argmax (what the Λ24-SQ authors' code does, N x K memory),
and flash-kmeans' fused Triton search on unit z (l2 on unit vectors = max inner product; CUDA).
Checked before timing on sampled rows: tie-aware against the float64 argmax (agree, ok), and
extra.agree_structured, the fraction equal to the structured decoder's indices. TFLOP/s counts
brute force's 2·N·K·D, for every row (the structured decoder's "rate" is the brute-force
equivalent).

E8: e8_shell_quantize (the 240 minimal vectors, decoded from their two shapes; the "auto" backend
and the torch decoder) against brute force
nearest_code(metric="dot") over e8_shell_codebook() and its chunked PyTorch reference (tie-aware
check); e8_nearest (the lattice itself; each backend where it runs, against its torch path as the
peer) checked by membership in E8, by no root neighbour p + r (r among the 240 minimal vectors)
being closer to x than p, and extra.equal_torch_path, the fraction of sampled rows equal to the
torch path's bit for bit (1.0 for every backend). GB/s counts z read and the int64 index (shell)
or the 8 floats (lattice point) written.

python -m bench.bench_lattice [--quick] [--out DIR]
"""

import inspect

import torch

import fastvq
from bench.bench_nearest_code import flash_kmeans_assign
from bench.common import DEVICE, check_indices, cli, measure, sample_rows
from fastvq.lattice import (
    E8_SHELL_SIZE,
    LEECH_SIZE,
    e8_nearest,
    e8_shell_codebook,
    e8_shell_quantize,
    leech_codebook,
    leech_quantize,
)

SHAPES = {
    "cuda": [("leech", 65536), ("e8", 1048576)],
    "cpu": [("leech", 512), ("e8", 65536)],
    "quick": [("leech", 16), ("e8", 64)],
}
CHECK_ROWS = 128  # the float64 check holds (rows, 196560) scores: 200 MB at 128 rows
BACKENDS = {"cuda": ("triton", "cuda"), "cpu": ("cpu", "torch")}


def structured(z, backend):
    if "backend" in inspect.signature(leech_quantize).parameters:
        return lambda: leech_quantize(z, backend=backend)[0]
    return lambda: leech_quantize(z)[0]


def peers(z, c):
    """name -> (setup() -> fn returning indices, precision of the tie-aware check, arith)."""
    out = {}
    if "backend" in inspect.signature(leech_quantize).parameters:
        for b in ("auto", *BACKENDS[DEVICE]):
            out[f"fastvq leech structured {b}"] = (lambda b=b: structured(z, b), "exact", None)
    else:
        out["fastvq leech structured"] = (lambda: structured(z, None), "exact", None)
    for precision, arith in (("exact", "tf32"), ("fast", "bf16")):
        out[f"fastvq brute force dot {precision}"] = (
            lambda p=precision: lambda: fastvq.nearest_code(z, c, metric="dot", precision=p),
            precision,
            arith,
        )
    out["torch chunked fp32"] = (
        lambda: lambda: fastvq.nearest_code(z, c, metric="dot", backend="torch"),
        "exact",
        "fp32",
    )
    out["torch bf16 GEMM + argmax"] = (
        lambda: (lambda zb, cb: lambda: (zb @ cb.T).argmax(1))(z.bfloat16(), c.bfloat16()),
        "fast",
        "bf16",
    )
    unit = torch.nn.functional.normalize(z, dim=-1)
    out["flash-kmeans triton (unit z)"] = (lambda: flash_kmeans_assign(unit, c), "fast", "tf32")
    return out


def run_leech(n, c, reps):
    z = torch.randn(n, 24, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    sub = sample_rows(n, CHECK_ROWS, DEVICE)
    reference = leech_quantize(z[sub])[0]

    def check(idx, precision):
        result = check_indices(z, c, idx, "dot", precision, rows=CHECK_ROWS)
        same = (idx[sub].long() == reference).double().mean().item()
        return result | {"extra": {"agree_structured": same}}

    return [
        measure(
            name,
            {"op": "leech", "N": n, "K": LEECH_SIZE, "D": 24},
            setup,
            check=lambda idx, p=precision: check(idx, p),
            reps=reps,
            flops=2 * n * LEECH_SIZE * 24,
            arith=arith,
            need_bytes=2 * 2 * n * LEECH_SIZE if "GEMM" in name else None,
        )
        for name, (setup, precision, arith) in peers(z, c).items()
    ]


def run_e8(n, reps):
    z = torch.randn(n, 8, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    c = e8_shell_codebook(device=DEVICE)
    shape = {"op": "e8", "N": n, "K": E8_SHELL_SIZE, "D": 8}
    shell = {
        "fastvq e8_shell_quantize": lambda: lambda: e8_shell_quantize(z)[0],
        "fastvq e8_shell_quantize torch decoder": lambda: (
            lambda: e8_shell_quantize(z, backend="torch")[0]
        ),
        "fastvq brute force dot exact": lambda: lambda: fastvq.nearest_code(z, c, metric="dot"),
        "torch chunked fp32": lambda: (
            lambda: fastvq.nearest_code(z, c, metric="dot", backend="torch")
        ),
    }
    rows = [
        measure(
            name,
            shape,
            setup,
            check=lambda idx: check_indices(z, c, idx, "dot", "exact"),
            reps=reps,
            flops=2 * n * E8_SHELL_SIZE * 8,
            arith="fp32",
            nbytes=4 * 8 * n + 8 * n,
        )
        for name, setup in shell.items()
    ]
    x = 4 * z  # spread over several lattice cells

    def check_point(p):
        sub = sample_rows(n, 4096, DEVICE)
        x64, p64 = x[sub].double(), p[sub].double()
        twice = 2 * p64
        member = (twice == twice.round()).all(-1) & (
            (twice % 2 == 0).all(-1) | (twice % 2 == 1).all(-1)
        )
        member &= p64.sum(-1) % 2 == 0
        best = (x64 - p64).square().sum(-1)
        roots = c.double()
        near = (x64[:, None] - p64[:, None] - roots).square().sum(-1).amin(-1)
        ok = bool(member.all()) and bool((best <= near + 1e-9).all())
        same = e8_nearest(x[sub], backend="torch").view(torch.int32) == p[sub].view(torch.int32)
        extra = {"equal_torch_path": same.all(-1).double().mean().item()}
        agree = (member & (best <= near + 1e-9)).double().mean().item()
        return {"ok": ok, "agree": agree, "extra": extra}

    nearest = {}
    if "backend" in inspect.signature(e8_nearest).parameters:
        for b in ("auto", BACKENDS[DEVICE][0]):  # "cpu" on CPU tensors, "triton" on CUDA ones
            nearest[f"fastvq e8_nearest {b}"] = lambda b=b: lambda: e8_nearest(x, backend=b)
        nearest["torch path (e8_nearest torch)"] = lambda: lambda: e8_nearest(x, backend="torch")
    else:
        nearest["fastvq e8_nearest (lattice)"] = lambda: lambda: e8_nearest(x)
    for name, setup in nearest.items():
        rows.append(
            measure(
                name,
                shape | {"K": "lattice"},
                setup,
                check=check_point,
                reps=reps,
                nbytes=2 * 4 * 8 * n,
            )
        )
    return rows


def run(shapes, reps, quick):
    rows = []
    for op, n in shapes:
        if op == "leech":
            rows += run_leech(n, leech_codebook(device=DEVICE), reps)
        else:
            rows += run_e8(n, reps)
    return rows


def main(argv=None):
    return cli(argv, __doc__, "lattice", run, SHAPES)


if __name__ == "__main__":
    main()

"""nearest_code against what users otherwise run, in one process and one table.

Peers: the naive expansion + argmin users write (fp32, tf32 and bf16 on GPU), torch.cdist + argmin,
the naive code under torch.compile, and fastvq's chunked PyTorch reference. Correctness is checked
before timing: agreement with the float64 argmin on a row subsample, and the tie-aware check.
"""

import argparse
import time

import torch

import fastvq
from bench.common import Row, device_name, save
from fastvq.reference import METRICS  # noqa: F401  (the metrics the op accepts; l2 is timed here)
from fastvq.testing import check_nearest

GPU_SHAPES = [(65536, 65536, 32), (65536, 16384, 8), (65536, 196560, 24), (16384, 65536, 256)]
CPU_SHAPES = [(8192, 16384, 32)]
QUICK_SHAPES = [(256, 1024, 32)]
# Limits for "percent of peak" (H100, DESIGN.md); None on CPU where no ceiling was measured.
H100_TFLOPS = {"bf16": 772.0, "tf32": 391.0, "fp32": 52.0}


def naive(z, c):
    return ((z * z).sum(-1, keepdim=True) - 2 * z @ c.T + (c * c).sum(-1)).argmin(1)


def cdist(z, c):
    return torch.cdist(z, c).argmin(1)


def peers(device):
    """name -> (function of (z, codebook), arithmetic used for the percent-of-peak column)."""
    out = {
        "fastvq exact": (lambda z, c: fastvq.nearest_code(z, c), "tf32"),
        "fastvq fast": (lambda z, c: fastvq.nearest_code(z, c, precision="fast"), "bf16"),
        "torch naive fp32": (naive, "fp32"),
        "torch cdist fp32": (cdist, "fp32"),
        "torch chunked fp32": (lambda z, c: fastvq.nearest_code(z, c, backend="torch"), "fp32"),
        "torch naive compiled": (torch.compile(naive), "fp32"),
    }
    if device == "cuda":
        for name in ("triton", "cuda"):
            if fastvq.backends()[name].available:
                out[f"fastvq {name} exact"] = (
                    lambda z, c, b=name: fastvq.nearest_code(z, c, backend=b),
                    "tf32",
                )
        out["torch naive bf16"] = (lambda z, c: naive(z.bfloat16(), c.bfloat16()), "bf16")

        def tf32(z, c):
            old = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                return naive(z, c)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = old

        out["torch naive tf32"] = (tf32, "tf32")
    return out


def timed(fn, z, c, device, reps):
    """(median, p20, p80) milliseconds."""
    if device == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(lambda: fn(z, c), quantiles=[0.5, 0.2, 0.8]))
    fn(z, c)  # warm-up (and compilation)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn(z, c)
        times.append(1e3 * (time.perf_counter() - t))
    times = torch.tensor(times)
    return tuple(torch.quantile(times, torch.tensor([0.5, 0.2, 0.8])).tolist())


def agreement(idx, z, c, rows=512):
    """Fraction of a row subsample equal to the float64 argmin, and the tie-aware verdict."""
    sub = torch.linspace(0, len(z) - 1, min(rows, len(z))).long().to(z.device)
    exact = fastvq.nearest_code(z[sub].double(), c.double(), backend="torch")
    rate = (idx[sub] == exact).double().mean().item()
    try:
        check_nearest(z[sub], c, idx[sub], precision="fast")
        ok = True
    except AssertionError:
        ok = False
    return rate, ok


def run(shapes, device, reps):
    rows = []
    for n, k, d in shapes:
        g = torch.Generator().manual_seed(0)
        z = torch.randn(n, d, generator=g).to(device)
        c = torch.randn(k, d, generator=g).to(device)
        flops = 2 * n * k * d
        for name, (fn, arith) in peers(device).items():
            row = Row(name=name, n=n, k=k, d=d)
            try:
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                idx = fn(z, c)
                row.agree, row.tie_aware_ok = agreement(idx, z, c)
                row.ms, row.ms_p20, row.ms_p80 = timed(fn, z, c, device, reps)
                row.tflops = flops / row.ms / 1e9
                if device == "cuda":
                    row.peak_gib = torch.cuda.max_memory_allocated() / 2**30
                    row.percent_of_peak = 100 * row.tflops / H100_TFLOPS[arith]
            except torch.OutOfMemoryError:
                row.status = "OOM"
            rows.append(row)
            print(row.line(), flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = QUICK_SHAPES if args.quick else GPU_SHAPES if device == "cuda" else CPU_SHAPES
    print(Row.header())
    rows = run(shapes, device, args.reps)
    path = save(args.out, f"nearest_code-{device_name(device)}", rows, {"shapes": shapes})
    print(f"saved {path}")
    return path


if __name__ == "__main__":
    main()

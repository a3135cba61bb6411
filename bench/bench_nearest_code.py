"""nearest_code against what users otherwise run, in one process and one table.

Peers: the naive expansion + argmin users write (fp32, tf32 and bf16 on GPU), torch.cdist + argmin,
the naive code under torch.compile, fastvq's chunked PyTorch reference, and flash-kmeans' fused
Triton assignment kernel (CUDA only). Correctness is checked before timing: agreement with the
float64 argmin on a row subsample, and the tie-aware check for the peer's arithmetic.
TFLOP/s counts the 2·N·K·D flops of the distance GEMM. On GPU, each fastvq backend and precision
has its row, and `fastvq <backend> exact unscreened` is that backend's exact search without its
tf32 screening pass (3xTF32 on every candidate), for the ratio screening buys; `fastvq triton exact,
code terms in eager PyTorch` is the Triton row with code_terms' square().sum() (a K x D temporary
written and read back, and a finite check that reads the codebook again) in place of its one-read
squared norms, for what those buy at small N.

Top-k rows (k = 8, the beam width of a residual-VQ beam search): fastvq.nearest_code(k=8) against
the same peers followed by torch.topk, checked tie-aware against the float64 k nearest.

python -m bench.bench_nearest_code [--quick] [--out DIR]
"""

import torch

import fastvq
from bench.common import DEVICE, Skip, check_indices, cli, measure
from fastvq.ops._validate import check_finite
from fastvq.ops.nearest_code import _squared_norms
from fastvq.reference import code_terms

SHAPES = {
    # Last: a small batch over a large codebook, where only split-K fills the GPU (argmin, top-k).
    "cuda": [
        (65536, 65536, 32),
        (65536, 16384, 8),
        (65536, 196560, 24),
        (16384, 65536, 256),
        (64, 1048576, 32),
    ],
    # Last: a few rows over a large codebook, where the per-code terms cost as much as the search.
    "cpu": [(8192, 16384, 32), (4, 262144, 32)],
    "quick": [(256, 1024, 32)],
}


def naive(z, c):
    return ((z * z).sum(-1, keepdim=True) - 2 * z @ c.T + (c * c).sum(-1)).argmin(1)


def cdist(z, c):
    return torch.cdist(z, c).argmin(1)


def _tf32(z, c):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return naive(z, c)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _exact_search(backend, screen=None, eager_terms=False):
    """The exact l2 search of `backend` ("triton" or "cuda") as fastvq.nearest_code runs it: the
    input check (a host sync) and the code terms from the backend's squared norms, then the search
    with `screen`. screen=False against the screened row gives the ratio screening buys;
    eager_terms (code_terms' K x D temporary, and a check that reads the codebook itself, as
    before the squared norms) what those buy at small N."""
    ops = torch.ops.fastvq
    op = ops.nearest_code_triton if backend == "triton" else ops.nearest_code

    def run(z, c):
        squared_norms = None if eager_terms else _squared_norms(c, "l2", backend)
        check_finite(z=z, codebook=c if squared_norms is None else squared_norms)
        return op(z, c, None, code_terms(c, "l2", squared_norms)[1], False, screen)

    return run


def flash_kmeans_assign(z, c, dtype=torch.float32):
    """Setup of flash-kmeans' fused Triton assignment (flash_kmeans.assign_euclid_triton): the
    (1, N, D) batch layout, the dtype cast and x_sq = |z|^2 are prepared outside the timed call,
    as its k-means loop does once per run; c_sq is computed inside, as there."""
    if DEVICE != "cuda":
        raise Skip("needs CUDA")
    from flash_kmeans.assign_euclid_triton import euclid_assign_triton

    x, cb = z.to(dtype)[None].contiguous(), c.to(dtype)[None].contiguous()
    x_sq = z.float().square().sum(-1)[None]
    return lambda: euclid_assign_triton(x, cb, x_sq)[0]


def peers(quick: bool) -> dict:
    """name -> (setup(z, codebook) -> fn, arithmetic of the percent-of-peak column)."""

    def plain(fn):
        return lambda z, c: lambda: fn(z, c)

    def compiled(z, c):
        if quick:
            raise Skip("compile time (--quick)")
        # Static shapes: after the first shape, automatic dynamic shapes would hand the later
        # ones a kernel compiled for symbolic sizes, a handicap the peer would not have alone.
        fn = torch.compile(naive, dynamic=False)
        return lambda: fn(z, c)

    out = {
        "fastvq exact": (plain(fastvq.nearest_code), "tf32"),
        "fastvq fast": (plain(lambda z, c: fastvq.nearest_code(z, c, precision="fast")), "bf16"),
    }
    if DEVICE == "cuda":
        for backend in ("triton", "cuda"):
            for precision, arith in (("exact", "tf32"), ("fast", "bf16")):
                fn = lambda z, c, b=backend, p=precision: fastvq.nearest_code(  # noqa: E731
                    z, c, backend=b, precision=p
                )
                out[f"fastvq {backend} {precision}"] = (plain(fn), arith)
            out[f"fastvq {backend} exact unscreened"] = (
                plain(_exact_search(backend, screen=False)),
                "tf32",
            )
        out["fastvq triton exact, code terms in eager PyTorch"] = (
            plain(_exact_search("triton", eager_terms=True)),
            "tf32",
        )
    out |= {
        "torch naive fp32": (plain(naive), "fp32"),
        "torch cdist fp32": (plain(cdist), "fp32"),
        "torch chunked fp32": (
            plain(lambda z, c: fastvq.nearest_code(z, c, backend="torch")),
            "fp32",
        ),
        "torch naive compiled": (compiled, "fp32"),
        "flash-kmeans triton fp32": (flash_kmeans_assign, "tf32"),
    }
    if DEVICE == "cuda":
        out |= {
            "torch naive tf32": (plain(_tf32), "tf32"),
            "torch naive bf16": (lambda z, c: plain(naive)(z.bfloat16(), c.bfloat16()), "bf16"),
            "flash-kmeans triton fp16": (
                lambda z, c: flash_kmeans_assign(z, c, torch.float16),
                "bf16",
            ),
        }
    return out


TOPK = 8


def naive_topk(z, c):
    dist = (z * z).sum(-1, keepdim=True) - 2 * z @ c.T + (c * c).sum(-1)
    return dist.topk(TOPK, dim=1, largest=False).indices


def topk_peers() -> dict:
    def plain(fn):
        return lambda z, c: lambda: fn(z, c)

    out = {f"fastvq top-{TOPK}": (plain(lambda z, c: fastvq.nearest_code(z, c, k=TOPK)), "tf32")}
    if DEVICE == "cuda":
        fn = lambda z, c: fastvq.nearest_code(z, c, k=TOPK, backend="triton")  # noqa: E731
        out[f"fastvq triton top-{TOPK}"] = (plain(fn), "tf32")
    out |= {
        f"torch naive top-{TOPK} fp32": (plain(naive_topk), "fp32"),
        f"torch cdist top-{TOPK} fp32": (
            plain(lambda z, c: torch.cdist(z, c).topk(TOPK, dim=1, largest=False).indices),
            "fp32",
        ),
    }
    if DEVICE != "cuda":  # the fallback's chunk loop syncs per chunk: seconds at K = 196,560 on GPU
        out[f"torch chunked top-{TOPK} fp32"] = (
            plain(lambda z, c: fastvq.nearest_code(z, c, k=TOPK, backend="torch")),
            "fp32",
        )
    if DEVICE == "cuda":
        out[f"torch naive top-{TOPK} bf16"] = (
            lambda z, c: plain(naive_topk)(z.bfloat16(), c.bfloat16()),
            "bf16",
        )
    return out


def run(shapes, reps, quick):
    rows = []
    for n, k, d in shapes:
        g = torch.Generator().manual_seed(0)
        z = torch.randn(n, d, generator=g).to(DEVICE)
        c = torch.randn(k, d, generator=g).to(DEVICE)
        tables = ((peers(quick), {}), (topk_peers(), {"k": TOPK}))
        for table, extra in tables:
            for name, (setup, arith) in table.items():
                # tf32, bf16 and fp16 peers are held to their own arithmetic's rounding, fastvq's
                # rows to their precision argument.
                exact = arith == "fp32" or (name.startswith("fastvq") and not name.endswith("fast"))
                precision = "exact" if exact else "fast"
                rows.append(
                    measure(
                        name,
                        {"N": n, "K": k, "D": d, **extra},
                        lambda s=setup, z=z, c=c: s(z, c),
                        check=lambda idx, p=precision, z=z, c=c: check_indices(z, c, idx, "l2", p),
                        reps=reps,
                        flops=2 * n * k * d,
                        arith=arith,
                        # unfused peers hold about two (N, K) score matrices at once
                        need_bytes=2 * (2 if "bf16" in name else 4) * n * k
                        if "naive" in name or "cdist" in name
                        else None,
                    )
                )
    return rows


def main(argv=None):
    return cli(argv, __doc__, "nearest_code", run, SHAPES)


if __name__ == "__main__":
    main()

"""pytest-benchmark microbenchmarks of nearest_code per backend (not part of `make test`):

python -m pytest bench/test_microbench.py --benchmark-json bench/results/micro.json
"""

import pytest
import torch

import fastvq
from fastvq.testing import backend_cases, check_nearest

CUDA = torch.cuda.is_available()
SHAPES = [(65536, 65536, 32), (16384, 65536, 256)] if CUDA else [(8192, 16384, 32)]
CASES = [c for c in backend_cases() if c[0] == ("cuda" if CUDA else "cpu") and c[1] != "triton"]
if CUDA:
    CASES += [("cuda", "triton")] if fastvq.backends()["triton"].available else []


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_nearest_code(benchmark, shape, case, precision):
    device, backend = case
    n, k, d = shape
    g = torch.Generator().manual_seed(0)
    z, codebook = (torch.randn(m, d, generator=g).to(device) for m in (n, k))

    def run():
        idx = fastvq.nearest_code(z, codebook, precision=precision, backend=backend)
        if CUDA:
            torch.cuda.synchronize()
        return idx

    idx = benchmark(run)
    rows = torch.arange(0, n, max(1, n // 256), device=device)
    check_nearest(z[rows], codebook, idx[rows], precision=precision)
    if benchmark.stats is not None:  # None under --benchmark-disable (a run without timings)
        median = benchmark.stats["median"]
        benchmark.extra_info.update(n=n, k=k, d=d, tflops_per_s=2 * n * k * d / median / 1e12)

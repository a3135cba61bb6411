"""The share of rows the exact float32 GPU searches recheck with 3xTF32 after their tf32 screening
pass (fastvq.kernels.nearest_code, `_screened_search`; the CUDA kernel does the same), for
Gaussian data at the bench shapes.

The share is a property of the data and of the error bound, not of the device: a row is rechecked
when its best two tf32 screening scores lie within twice `_screening_bound`. This computes the
screening scores in float64 from the tf32-rounded operands (the pass's products are exact; only
its float32 accumulation differs, far below the bound) for a sample of rows, and saves
<out>/screening_share.json. It also records the largest ratio of |screening score - true score| to
the bound over the sample, which must stay below 1; with a GPU, also that ratio for the scores as
its tensor cores accumulate them (a tf32 matmul of the same tf32 operands), which checks the
bound's model of tensor-core accumulation on the hardware.

python -m bench.screening_share [--rows 1024] [--out DIR]
"""

import argparse
import os

import torch
from fastvq.kernels.nearest_code import _screening_reference

from bench.common import RESULTS, environment, positive_int, write_json
from fastvq.reference import METRICS, code_terms

SHAPES = [(65536, 32), (16384, 8), (196560, 24), (65536, 256), (16384, 1024)]  # (K, D)


def _scores(z, codebook, scale, bias):
    s = z.double() @ codebook.double().T
    if scale is not None:
        s = s * scale.double()
    return s if bias is None else s + bias.double()


def _tensor_core_scores(z_tf32, c_tf32, scale, bias):
    """The screening scores as a GPU's tensor cores accumulate them: a tf32 matmul (cuBLAS) of
    the tf32 operands, then scale and bias in float32, returned in float64 on the CPU."""
    allow = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        s = z_tf32.cuda() @ c_tf32.cuda().T
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow
    if scale is not None:
        s = s * scale.cuda()
    return (s if bias is None else s + bias.cuda()).double().cpu()


def share(rows: int, k: int, d: int, metric: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, d, generator=g)
    codebook = torch.randn(k, d, generator=g)
    scale, bias = code_terms(codebook, metric)
    z_tf32, c_tf32, bound = _screening_reference(z, codebook, scale, bias)
    gpu = torch.cuda.is_available()
    rechecked, ratio, gpu_ratio = 0, 0.0, 0.0
    for start in range(0, rows, 128):  # 128 x K float64 scores at a time
        sl = slice(start, start + 128)
        screen = _scores(z_tf32[sl], c_tf32, scale, bias)
        true = _scores(z[sl], codebook, scale, bias)
        top = screen.topk(2, dim=1).values
        rechecked += int((~(top[:, 0] - top[:, 1] > 2 * bound[sl])).sum())
        ratio = max(ratio, float(((screen - true).abs().amax(1) / bound[sl]).max()))
        if gpu:
            tensor_cores = _tensor_core_scores(z_tf32[sl], c_tf32, scale, bias)
            err = (tensor_cores - true).abs().amax(1) / bound[sl]
            gpu_ratio = max(gpu_ratio, float(err.max()))
    return {"K": k, "D": d, "metric": metric, "rows": rows, "rechecked": rechecked,
            "share": rechecked / rows, "max_error_over_bound": ratio,
            "max_error_over_bound_tensor_cores": gpu_ratio if gpu else None}  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=positive_int, default=1024)
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "screening_share.json")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cases = [(k, d, metric) for k, d in SHAPES for metric in METRICS]
    results = []
    for k, d, metric in cases:
        results.append(share(args.rows, k, d, metric))
        r = results[-1]
        gpu = r["max_error_over_bound_tensor_cores"]
        gpu = f", tensor cores {gpu:.3f}" if gpu is not None else ""
        line = f"K={k:6} D={d:4} {metric:6} rechecked {r['share']:6.2%}"
        print(f"{line} max error / bound {r['max_error_over_bound']:.3f}{gpu}", flush=True)
        # Saved after every case: a timeout (gpu.sh's step) keeps the cases done.
        record = {"environment": environment(device, args.out), "sample_rows": args.rows}
        write_json(path, record | {"complete": len(results) == len(cases), "results": results})
    print(f"saved {path}")


if __name__ == "__main__":
    main()

"""FSQ / LFQ / BSQ and the LFQ / BSQ entropy terms (issue 4), forward + backward, against peers.

entropy:  fastvq.binary_entropy_loss (per-sample and codebook entropy over 2^d codes, factorized,
          O(N d)) vs autograd through the same formula in plain PyTorch (fastvq.reference.scalar)
          vs vector-quantize-pytorch's LFQ(codebook_size=2**d, entropy_loss_weight=0.1), which
          enumerates the 2^d codes (N x 2^d memory). Loss: per_sample - codebook entropy. Checked:
          both entropies and dL/dz against float64 (err); for vector-quantize-pytorch, its
          per-sample entropy (the same quantity up to its 1e-5 clamp in the log), and its joint
          codebook entropy in extra (the factorized one bounds it from above).
quantize: fsq(levels=[8,8,8,5,5,5]), lfq, bsq (d = 18) forward + backward with a fixed random
          dL/dcodes, vs autograd through fastvq.reference.scalar and vector-quantize-pytorch's
          FSQ / LFQ. Checked: indices equal to the reference in float32 (agree), codes and dL/dz
          against float64 (err). GB/s counts the bytes the op must move: z read and codes + int64
          indices written forward; dL/dcodes and z read and dL/dz written backward (LFQ's
          identity backward moves nothing). Each kind's last row copies as many bytes on the
          device: the copy bandwidth the issue's 70 % is of, measured in the same run.

python -m bench.bench_scalar [--quick] [--out DIR]
"""

from functools import partial

import torch

import fastvq
from bench.common import DEVICE, cli, measure, rel_err
from fastvq.reference import scalar as ref

SHAPES = {
    "cuda": [("entropy", 4096, 18), ("entropy", 65536, 18), ("quantize", 1048576, 18)],
    "cpu": [("entropy", 4096, 12), ("entropy", 65536, 18), ("quantize", 65536, 18)],
    "quick": [("entropy", 64, 6), ("quantize", 256, 8)],
}
INV_TEMPERATURE = 100.0  # vector-quantize-pytorch's LFQ default
LEVELS = [8, 8, 8, 5, 5, 5]
COPY = "torch copy (same bytes)"


def _grad(out, z, g):
    return torch.autograd.grad(out, z, g)[0]


# --- entropy -----------------------------------------------------------------------------------


def entropy_peers(z, quantizer):
    """name -> setup() -> fn returning (per_sample, codebook, dL/dz, extra)."""

    def autograd(loss_fn):
        def setup():
            zz = z.clone().requires_grad_()

            def step():
                per_sample, codebook = loss_fn(zz)
                return per_sample, codebook, _grad(per_sample - codebook, zz, None), {}

            return step

        return setup

    def vqp():
        from vector_quantize_pytorch import LFQ

        d = z.shape[-1]
        layer = LFQ(
            dim=d, codebook_size=2**d, entropy_loss_weight=0.1, spherical=quantizer == "bsq"
        )
        layer = layer.to(DEVICE).train()
        zz = z[None].clone().requires_grad_()

        def step():
            (_, _, aux), parts = layer(zz, INV_TEMPERATURE, return_loss_breakdown=True)
            # aux = 0.1 * (per_sample - codebook entropy): undo the weight for the gradient check
            dz = _grad(aux / 0.1, zz, None)[0]
            return (
                parts.per_sample_entropy,
                None,
                dz,
                # a tensor: .item() here would add a host sync to the timed step
                {"joint_codebook": parts.batch_entropy.detach()},
            )

        return step

    peers = {
        f"fastvq {quantizer} entropy": autograd(
            lambda zz: fastvq.binary_entropy_loss(
                zz, inv_temperature=INV_TEMPERATURE, quantizer=quantizer
            )
        ),
        f"torch {quantizer} entropy (autograd)": autograd(
            lambda zz: ref.binary_entropy_loss(zz, INV_TEMPERATURE, quantizer)
        ),
    }
    if quantizer == "lfq":
        peers["vqp LFQ entropy"] = vqp
    return peers


def run_entropy(n, d, reps):
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    rows = []
    for quantizer in ("lfq", "bsq"):
        z64 = z.double().requires_grad_()
        per64, code64 = ref.binary_entropy_loss(z64, INV_TEMPERATURE, quantizer)
        (dz64,) = torch.autograd.grad(per64 - code64, z64)

        def check(out, per64=per64, code64=code64, dz64=dz64):
            per, code, dz, extra = out
            # vqp's gradient is not compared: its codebook entropy is the joint one, not ours.
            errs = [rel_err(per, per64)] + (
                [rel_err(code, code64), rel_err(dz, dz64)] if code is not None else []
            )
            extra = {k: v.item() for k, v in extra.items()} | {
                "per_sample": per.item(),
                "codebook": None if code is None else code.item(),
            }
            return {
                "err": max(errs),
                "ok": max(errs) < 1e-4 if code is not None else None,
                "extra": extra,
            }

        for name, setup in entropy_peers(z, quantizer).items():
            rows.append(
                measure(
                    name,
                    {"op": "entropy", "N": n, "d": d, "codes": 2**d},
                    setup,
                    check=check,
                    reps=reps,
                    nbytes=3 * 4 * n * d,  # z read forward and backward, dL/dz written
                    # vqp: (N, 2^d) distances, probabilities and their gradients in float32;
                    # 28 GiB at N = 4,096, d = 18 on an H100 (issue 4): 7 such arrays
                    need_bytes=7 * 4 * n * 2**d if "vqp" in name else None,
                )
            )
    return rows


# --- quantize ----------------------------------------------------------------------------------


def quantize_peers(z, g, kind):
    """name -> setup() -> fn returning (codes, indices, dL/dz)."""

    def autograd(fn):
        def setup():
            zz = z.clone().requires_grad_()

            def step():
                codes, idx = fn(zz)
                return codes, idx, _grad(codes, zz, g)

            return step

        return setup

    def vqp():
        from vector_quantize_pytorch import FSQ, LFQ

        d = z.shape[-1]
        if kind == "fsq":
            layer = FSQ(LEVELS)
        else:
            layer = LFQ(dim=d, codebook_size=2**d, entropy_loss_weight=0.0, spherical=kind == "bsq")
        layer = layer.to(DEVICE).train()
        zz = z[None].clone().requires_grad_()

        def step():
            out = layer(zz)
            codes, idx = out[0], out[1]
            return codes[0], idx[0].long(), _grad(codes, zz, g[None])[0]

        return step

    ours = {"fsq": lambda zz: fastvq.fsq(zz, LEVELS), "lfq": fastvq.lfq, "bsq": fastvq.bsq}
    theirs = {"fsq": lambda zz: ref.fsq(zz, LEVELS), "lfq": ref.lfq, "bsq": ref.bsq}
    return {
        f"fastvq {kind}": autograd(ours[kind]),
        f"torch {kind} (reference autograd)": autograd(theirs[kind]),
        f"vqp {kind.upper()}": vqp,
    }


# |b - (k + 1/2)| below which an FSQ bound b is a rounding tie: float32 tanh and its inputs'
# rounding move b by ~1e-6 (3.5 times a few ulps), so either neighbour is right there. Seed 0's
# 1,048,576 rows (the CUDA shape) hold one, where float32 and float64 disagree (err 0.5 before).
FSQ_TIE = 1e-5


def quantize_check(kind, z, g):
    """check(out, same_order) of one quantizer's rows on z with dL/dcodes g: agree is the share of
    rows whose codes equal the float32 reference's; ok needs every code and index equal to it
    (FSQ: except elements at a rounding tie, either neighbour) and codes and dL/dz within 1e-5
    of float64 (err, ties at their float64 code)."""
    forward = {"fsq": lambda x: ref.fsq(x, LEVELS), "lfq": ref.lfq, "bsq": ref.bsq}[kind]
    codes32, idx32 = forward(z)
    z64 = z.double().requires_grad_()
    codes64 = forward(z64)[0]
    (dz64,) = torch.autograd.grad(codes64, z64, g.double())
    tie = torch.zeros_like(z, dtype=torch.bool)
    if kind == "fsq":  # LFQ / BSQ take signs: a tie is z == 0 exactly
        b = ref.fsq_bound(z.double(), LEVELS)
        tie = ((b - b.floor()) - 0.5).abs() < FSQ_TIE

    def check(out, same_order=True):
        codes, idx, dz = out
        # agree on whole code vectors (to rounding: 1/sqrt(d) is computed differently): vector-
        # quantize-pytorch numbers LFQ / BSQ codes in another bit order, so only FSQ indices
        # are compared across libraries.
        close = (codes - codes32).abs() <= 1e-6 * codes32.abs().max()
        agree = close.all(-1).double().mean().item()
        same = bool(((idx.long() == idx32) | tie.any(-1)).all()) if same_order else True
        err = max(rel_err(torch.where(tie, codes64, codes), codes64), rel_err(dz, dz64))
        return {"agree": agree, "err": err, "ok": bool((close | tie).all()) and same and err < 1e-5}

    return check


def run_quantize(n, d, reps):
    gen = torch.Generator().manual_seed(0)
    rows = []
    for kind in ("fsq", "lfq", "bsq"):
        dim = len(LEVELS) if kind == "fsq" else d
        z = torch.randn(n, dim, generator=gen).to(DEVICE)
        g = torch.randn(n, dim, generator=gen).to(DEVICE)
        check = quantize_check(kind, z, g)
        # 4 bytes per element of z, codes, dL/dcodes, dL/dz; 8 per index
        nbytes = (8 if kind == "lfq" else 20) * n * dim + 8 * n
        for name, setup in quantize_peers(z, g, kind).items():
            rows.append(
                measure(
                    name,
                    {"op": kind, "N": n, "D": dim},
                    setup,
                    check=partial(check, same_order=kind == "fsq" or "vqp" not in name),
                    reps=reps,
                    nbytes=nbytes,
                    # vqp's LFQ computes its entropy terms in training mode whatever their weight
                    need_bytes=7 * 4 * n * 2**dim if "vqp" in name and kind != "fsq" else None,
                )
            )
        # The measured ceiling for the same bytes (issue 4 asks for 70 % of the copy bandwidth):
        # a device copy reading nbytes / 2 and writing nbytes / 2.
        src = torch.randn(nbytes // 8, generator=gen).to(DEVICE)
        dst = torch.empty_like(src)
        rows.append(
            measure(
                COPY,
                {"op": kind, "N": n, "D": dim},
                lambda src=src, dst=dst: partial(dst.copy_, src),
                reps=reps,
                nbytes=nbytes,
            )
        )
    return rows


def run(shapes, reps, quick):
    runners = {"entropy": run_entropy, "quantize": run_quantize}
    return [row for op, n, d in shapes for row in runners[op](n, d, reps)]


def main(argv=None):
    return cli(argv, __doc__, "scalar", run, SHAPES)


if __name__ == "__main__":
    main()

"""Quantizer modules (issue 5) and a VQGAN training step (issue 6) against vector-quantize-pytorch.

vq:    one training step of fastvq.nn.VectorQuantize against vector_quantize_pytorch.VectorQuantize
       built with the same arguments (ARGS, with and without rotation_trick) and the same starting
       codebook: forward (search, estimator, commitment loss, EMA update, dead-code check and
       reset, all inside the module in training mode), then backward of (quantized * g).sum() +
       loss to the input for a fixed random g. Checked on the first call: tie-aware indices
       against the float64 argmin over the starting codebook (the EMA update comes after the
       search in both libraries), and err = max |quantized - codebook[indices]| / max |code|.
       GiB: peak device memory of one step (CUDA only). TFLOP/s counts the search's 2·N·K·D.
rvq_beam: one training step of ResidualVQ (4 layers, beam_size 4: per layer each beam keeps its
       4 nearest codes, the 4 best paths survive) in both libraries from the same state (the peer's
       state dict loaded into fastvq's): forward, backward of (quantized * g).sum() + loss, the
       EMA update of the chosen path. The peer's top-k builds an (N·beams, 4, K) one-hot.
       Checked: quantized equals the sum of the chosen codes of the starting codebooks (err).
vqgan: one generator step of a VQGAN tokenizer (fastvq.models.build_tokenizer: taming's f16
       network at 256x256 on CUDA, a small one on CPU) with either library's VectorQuantize:
       forward, L1 reconstruction + quantizer loss, backward, Adam step (no discriminator or LPIPS:
       they need local weights, and leaving them out makes the quantizer's share an upper bound).
       The quantizer alone on the same latents, (B, h·w, D), is timed in the same run; extra holds
       images_per_s and quantizer_share = quantizer ms / step ms (issue 6's target: <= 5 %).
       bf16 autocast on CUDA, as the VQGAN recipe trains; float32 on CPU.

python -m bench.bench_nn [--quick] [--out DIR]
"""

import contextlib

import torch

from bench.common import DEVICE, Skip, check_indices, cli, measure, rel_err

SHAPES = {
    # (op, batch, seq or image side, K, D)
    "cuda": [
        ("vq", 256, 256, 16384, 8),
        ("vq", 256, 256, 65536, 32),
        ("vq", 64, 256, 65536, 256),
        ("rvq_beam", 64, 256, 16384, 32),
        ("vqgan", 8, 256, 65536, 8),
    ],
    "cpu": [
        ("vq", 16, 256, 4096, 8),
        ("vq", 8, 256, 16384, 32),
        ("rvq_beam", 8, 256, 1024, 32),
        ("vqgan", 2, 32, 1024, 8),
    ],
    "quick": [("vq", 2, 32, 64, 8), ("rvq_beam", 2, 32, 64, 8), ("vqgan", 1, 16, 64, 8)],
}
# Same arguments for both libraries: EMA as vector-quantize-pytorch's README trains (decay 0.99,
# dead codes below 2), commitment 0.25 as VQ-VAE; no k-means init (the starting codebook is given).
ARGS = dict(decay=0.99, commitment_weight=0.25, threshold_ema_dead_code=2, kmeans_init=False)
# vector-quantize-pytorch's step: 24 GiB at N = 65,536, K = 16,384 on an H100 (issue 5), that is
# 24 bytes per (row, code) pair for its distance, one-hot and softmax-sized arrays.
PEER_BYTES_PER_PAIR = 24


def _autocast(amp: bool):
    if amp:
        return torch.autocast(DEVICE, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def quantizer_class(library: str):
    if library == "fastvq":
        from fastvq.nn.vector_quantize import VectorQuantize
    else:
        from vector_quantize_pytorch import VectorQuantize
    return VectorQuantize


def set_codebook(layer: torch.nn.Module, codebook: torch.Tensor) -> None:
    """Give either library's VectorQuantize the same starting state: codebook and EMA sums equal to
    `codebook`, cluster sizes 1 (both libraries' own initial values, so only the codes differ)."""
    with torch.no_grad():
        for name, value in layer.state_dict(keep_vars=True).items():
            if name.endswith(("embed", "embed_avg")):
                value.copy_(codebook.view(value.shape))
            elif name.endswith("cluster_size"):
                value.fill_(1.0)


# --- vq ----------------------------------------------------------------------------------------


def run_vq(b, s, k, d, reps, amp=False, label="", rotations=(False, True)):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, s, d, generator=gen).to(DEVICE)
    g = torch.randn(b, s, d, generator=gen).to(DEVICE)
    c = torch.randn(k, d, generator=gen).to(DEVICE)
    n = b * s
    rows = []
    for rotation in rotations:
        for library in ("fastvq", "vqp"):

            def setup(library=library, rotation=rotation):
                layer = quantizer_class(library)(
                    dim=d, codebook_size=k, rotation_trick=rotation, **ARGS
                )
                layer = layer.to(DEVICE).train()
                set_codebook(layer, c)
                xx = x.clone().requires_grad_()

                def step():
                    with _autocast(amp):
                        q, idx, loss = layer(xx)
                        total = (q.float() * g).sum() + loss.sum()
                    (dx,) = torch.autograd.grad(total, xx)
                    return idx, q.detach(), dx, loss.detach()

                return step

            def check(out):
                idx, q, dx, loss = out
                flat = idx.reshape(-1)
                # bf16 autocast searches in float32 in fastvq, not necessarily in the peer
                result = check_indices(x.reshape(-1, d), c, flat, "l2", "fast" if amp else "exact")
                result["err"] = rel_err(q.reshape(-1, d), c[flat].double())
                finite = bool(torch.isfinite(dx).all()) and bool(torch.isfinite(loss).all())
                # float32: the peer's rotation output is the code up to rounding (1.2e-6 at D =
                # 256), fastvq's the code itself
                result["ok"] = result["ok"] and finite and result["err"] < (1e-2 if amp else 1e-5)
                return result

            name = f"{library} VectorQuantize{' rotation' if rotation else ''}{label}"
            rows.append(
                measure(
                    name,
                    {"op": "vq", "B": b, "S": s, "K": k, "D": d},
                    setup,
                    check=check,
                    reps=reps,
                    flops=2 * n * k * d,
                    arith="tf32",
                    need_bytes=PEER_BYTES_PER_PAIR * n * k if library == "vqp" else None,
                )
            )
    return rows


# --- rvq_beam ----------------------------------------------------------------------------------

LAYERS, BEAM = 4, 4


def run_rvq_beam(b, s, k, d, reps):
    from fastvq.nn import ResidualVQ

    try:
        from vector_quantize_pytorch import ResidualVQ as PeerResidualVQ
    except ImportError:  # the peer's row says so; fastvq's still runs, from its own start
        PeerResidualVQ = None

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, s, d, generator=gen).to(DEVICE)
    g = torch.randn(b, s, d, generator=gen).to(DEVICE)
    args = dict(dim=d, num_quantizers=LAYERS, codebook_size=k, beam_size=BEAM, **ARGS)
    torch.manual_seed(0)
    state = (PeerResidualVQ or ResidualVQ)(**args).state_dict()
    # "layers.i._codebook.embed" (the peer's) or "layers.i.embed" (fastvq's)
    books = [v.to(DEVICE).reshape(k, d) for n, v in state.items() if n.endswith(".embed")]
    rows = []
    for library, cls in (("fastvq", ResidualVQ), ("vqp", PeerResidualVQ)):

        def setup(cls=cls):
            if cls is None:
                raise ImportError(name="vector_quantize_pytorch")
            layer = cls(**args)
            layer.load_state_dict(state)
            layer = layer.to(DEVICE).train()
            xx = x.clone().requires_grad_()

            def step():
                q, idx, loss = layer(xx)
                (dx,) = torch.autograd.grad((q * g).sum() + loss.sum(), xx)
                return idx, q.detach(), dx

            return step

        def check(out):
            idx, q, dx = out
            codes = sum(book[idx[..., i]] for i, book in enumerate(books))
            err = rel_err(q, codes.double())
            return {"err": err, "ok": err < 1e-5 and bool(torch.isfinite(dx).all())}

        rows.append(
            measure(
                f"{library} ResidualVQ beam {BEAM}",
                {"op": "rvq_beam", "B": b, "S": s, "K": k, "D": d, "layers": LAYERS},
                setup,
                check=check,
                reps=reps,
                flops=2 * b * s * k * d * (1 + BEAM * (LAYERS - 1)),  # one beam enters layer 0
                arith="tf32",
                # the peer's (N * beams, beams, K) float32 one-hot, per layer
                need_bytes=4 * b * s * BEAM * BEAM * k if library == "vqp" else None,
            )
        )
    return rows


# --- vqgan -------------------------------------------------------------------------------------


def vqgan_config(resolution: int, k: int, d: int, library: str, small: bool) -> dict:
    """build_tokenizer's "model" section: taming's f16 VQGAN, or a small f2 one for CPU runs. The
    quantizer as configs/vqgan_65k.yaml trains it: low-dimensional codes with the rotation trick."""
    model = {
        "arch": "vqgan",
        "resolution": resolution,
        "embed_dim": d,
        "quantizer": {
            "type": quantizer_class(library),
            "codebook_size": k,
            "rotation_trick": True,
            **ARGS,
        },
    }
    if small:
        model |= dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], z_channels=32)
        model["norm_groups"] = 8
    return model


def _skip(reason: str):
    raise Skip(reason)


def run_vqgan(b, resolution, k, d, reps, quick):
    shape = {"op": "vqgan", "B": b, "R": resolution, "K": k, "D": d}
    small = DEVICE != "cuda" or quick
    try:
        from fastvq.models import build_tokenizer

        build_tokenizer(vqgan_config(resolution, k, d, "fastvq", small))
    except Exception as e:  # noqa: BLE001  (issue 6's models may be missing or broken)
        reason = f"fastvq.models does not build: {type(e).__name__}: {str(e)[:120]}"
        return [
            measure(f"{lib} VQGAN step", shape, lambda r=reason: _skip(r))
            for lib in ("fastvq", "vqp")
        ]
    amp = DEVICE == "cuda"
    gen = torch.Generator().manual_seed(0)
    x = (2 * torch.rand(b, 3, resolution, resolution, generator=gen) - 1).to(DEVICE)
    tokens = (resolution // (2 if small else 16)) ** 2  # per image: the quantizer's sequence
    rows = []
    for library in ("fastvq", "vqp"):

        def setup(library=library):
            torch.manual_seed(0)
            tok = build_tokenizer(vqgan_config(resolution, k, d, library, small)).to(DEVICE)
            tok.train()
            opt = torch.optim.Adam([p for p in tok.parameters() if p.requires_grad], lr=1e-4)

            def step():
                with _autocast(amp):
                    out = tok(x)
                    loss = (out.recon.float() - x).abs().mean() + out.quant_loss.float()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss.detach(), out.indices

            return step

        def check(out):
            loss, idx = out
            ok = bool(torch.isfinite(loss)) and 0 <= int(idx.min()) and int(idx.max()) < k
            ok = ok and idx.numel() == b * tokens
            return {"ok": ok, "extra": {"loss": loss.item()}}

        rows.append(
            measure(
                f"{library} VQGAN step",
                shape,
                setup,
                check=check,
                reps=reps,
                need_bytes=PEER_BYTES_PER_PAIR * b * tokens * k if library == "vqp" else None,
            )
        )
    # the quantizer alone on the latents it sees in the step, (B, h*w, D), in the same autocast
    alone = run_vq(b, tokens, k, d, reps, amp, " (VQGAN latents)", rotations=(True,))
    for step, q in zip(rows, alone, strict=True):
        if step.status == "ok":
            step.extra["images_per_s"] = 1e3 * b / step.ms
            if q.status == "ok":
                step.extra["quantizer_ms"] = q.ms
                step.extra["quantizer_share"] = q.ms / step.ms
    return rows + alone


def run(shapes, reps, quick):
    rows = []
    for op, b, s, k, d in shapes:
        if op == "vq":
            rows += run_vq(b, s, k, d, reps)
        elif op == "rvq_beam":
            rows += run_rvq_beam(b, s, k, d, reps)
        else:
            rows += run_vqgan(b, s, k, d, reps, quick)
    return rows


def main(argv=None):
    return cli(argv, __doc__, "nn", run, SHAPES)


if __name__ == "__main__":
    main()

"""End to end on CPU: a short run through the command line lowers the reconstruction error and
writes its logs, figures and evaluation; `fastvq eval` reproduces that evaluation; the collapse
sweep records MSE and perplexity per codebook size."""

import csv
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import fastvq
from fastvq.nn import defer_codebook_updates
from fastvq.train.cli import main
from fastvq.train.config import load_config
from fastvq.train.trainer import Trainer, lr_factor, resolve_num_workers


def _png_folder(root, n=12, res=16):
    """Smooth random images as PNG files (what a user's image folder holds)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        low = torch.from_numpy(rng.random((1, 3, 4, 4)))
        img = torch.nn.functional.interpolate(low, size=(res, res), mode="bilinear")[0]
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(
            root / f"{i}.png"
        )


def test_lr_schedule():
    assert lr_factor(0, 100, 10, "cosine", 0.0) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine", 0.0) == 1.0
    assert lr_factor(10, 100, 10, "cosine", 0.0) == 1.0
    assert lr_factor(55, 100, 10, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(50, 100, 0, "constant", 0.0) == 1.0


def test_discriminator_schedule_spans_the_steps_it_takes(make_config, datasets):
    # It steps from loss.disc_start on: warmup from there, min_lr_ratio at train.steps.
    cfg = make_config(
        *("disc={ndf: 4, n_layers: 1}", "loss.disc_weight=0.5", "loss.disc_start=4"),
        *("train.steps=10", "optim.warmup_steps=2", "optim.min_lr_ratio=0.1"),
    )
    trainer = Trainer(cfg, datasets=datasets)
    factors = [trainer.disc_sched.lr_lambdas[0](s) for s in range(7)]  # disc steps 4..10
    assert factors[:2] == pytest.approx([0.5, 1.0])
    assert factors[4] == pytest.approx(0.1 + 0.9 * 0.5)
    assert factors[6] == pytest.approx(0.1)


def test_training_lowers_reconstruction_error(make_config, datasets):
    cfg = make_config("train.steps=60", "model.ch=8", "optim.lr=1e-2", "train.ema_decay=0.5")
    trainer = Trainer(cfg, datasets=datasets)
    before = trainer.evaluate(save_images=False)  # about the mean-colour predictor's error
    result = trainer.fit()
    after = result["eval"]
    assert after["mse"] < 0.7 * before["mse"], (before, after)  # 0.057 -> 0.023 here
    assert np.mean(result["history"][-5:]) < np.mean(result["history"][:5])
    assert after["usage"] > 0.25  # the codebook did not collapse to a few codes


def test_log_csv_records_the_gradient_norm(make_config, datasets):
    """grad_norm was computed every step but left out of log.csv's columns."""
    trainer = Trainer(make_config("train.steps=2", "train.log_every=1"), datasets=datasets)
    logged = []
    step = trainer.train_step
    trainer.train_step = lambda batches: (logged.append(step(batches)), logged[-1])[1]
    trainer.fit()
    rows = [r for r in csv.DictReader(open(trainer.out_dir / "log.csv")) if r["loss"]]
    assert [float(r["grad_norm"]) for r in rows] == pytest.approx(
        [logs["grad_norm"] for logs in logged], rel=1e-5
    )


def test_cli_train_then_eval(tmp_path, capsys):
    _png_folder(tmp_path / "images")
    (tmp_path / "tiny.yaml").write_text(
        """
model:
  arch: rotated_vqvae
  ch: 4
  ch_mult: [1, 2]
  num_res_blocks: 1
  z_channels: 8
  attn_heads: 2
  quantizer: {type: VectorQuantize, codebook_size: 16, decay: 0.8}
optim: {lr: 3e-3}
train: {steps: 8, batch_size: 4, log_every: 4, device: cpu, progress: false}
data: {kind: folder, resolution: 16}
eval: {batch_size: 4}
"""
    )
    run = tmp_path / "run"
    args = ["--config", str(tmp_path / "tiny.yaml"), f"data.path={tmp_path / 'images'}",
            f"train.out_dir={run}"]  # fmt: skip
    assert main(["train", *args]) == 0
    saved = json.loads((run / "eval.json").read_text())
    assert saved["step"] == 8 and saved["images"] == 2 and 0 < saved["usage"] <= 1
    rows = list(csv.DictReader(open(run / "log.csv")))
    assert [r["step"] for r in rows if r["loss"]] == ["4", "8"]
    assert all(float(r["images_per_s"]) > 0 for r in rows if r["loss"])
    # Each row's lr is the one its step trained with (the schedule's value before it moved on).
    o = load_config(run / "config.yaml")["optim"]
    want = [3e-3 * lr_factor(s - 1, 8, o["warmup_steps"], o["schedule"], o["min_lr_ratio"])
            for s in (4, 8)]  # fmt: skip
    assert [float(r["lr"]) for r in rows if r["loss"]] == pytest.approx(want, rel=1e-5)
    assert (run / "images" / "recon_0000008.png").is_file()
    assert (run / "images" / "usage_0000008.png").is_file()
    assert load_config(run / "config.yaml")["train"]["steps"] == 8
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run / "checkpoints" / "latest.pt")]) == 0
    printed = json.loads(capsys.readouterr().out)
    again = json.loads((run / "eval" / "eval.json").read_text())
    assert printed == again
    # A checkpoint outside a run's checkpoints/ evaluates into eval/ beside it.
    (tmp_path / "elsewhere").mkdir()
    moved = tmp_path / "elsewhere" / "model.pt"
    moved.write_bytes((run / "checkpoints" / "latest.pt").read_bytes())
    assert main(["eval", "--checkpoint", str(moved)]) == 0
    capsys.readouterr()
    assert json.loads((moved.parent / "eval" / "eval.json").read_text()) == again
    for key in ("mse", "psnr", "ssim", "usage", "perplexity"):
        assert again[key] == pytest.approx(saved[key], rel=1e-6), key
    # Starting the same command again resumes: the run is complete, nothing more is trained.
    assert main(["train", *args]) == 0
    assert json.loads((run / "eval.json").read_text())["mse"] == pytest.approx(saved["mse"])
    # Fewer steps than the checkpoint has: an error, not that run's evaluation as this one's.
    steps = json.loads((run / "eval.json").read_text())["step"]
    with pytest.raises(ValueError, match=f"train.steps={steps - 1}, but .* is at step {steps}"):
        main(["train", *args, f"train.steps={steps - 1}"])


def test_cli_help_and_errors(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "fastvq train --config" in text and "overrides" in text.lower()
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        main(["train", "--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(SystemExit):
        main(["demo", "--help"])  # reaches the demo's own parser
    assert "python -m fastvq.demo [-h] [--quiet]" in capsys.readouterr().out
    (tmp_path / "c.yaml").write_text("data: {kind: folder, path: null}\n")
    with pytest.raises(ValueError, match="data.path"):
        main(["train", "--config", str(tmp_path / "c.yaml")])
    # fastvq bench hands every argument, leading options included, to bench.run in the checkout.
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, cwd: calls.append((cmd, cwd)) or 0)
    assert main(["bench", "--quick", "--only", "scalar"]) == 0
    assert calls == [([sys.executable, "-m", "bench.run", "--quick", "--only", "scalar"],
                      Path(fastvq.__file__).resolve().parents[1])]  # fmt: skip
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "passed to bench.run" in capsys.readouterr().out


def test_collapse_sweep_records_mse_and_perplexity(tmp_path, capsys):
    """The collapse recipe end to end at toy size (configs/collapse_sweep.yaml with overrides):
    pretrain without VQ, k-means-initialised fine-tunes for two codebook sizes, and the
    from-scratch baseline; sweep.csv holds MSE and perplexity per size and variant."""
    import pickle

    rng = np.random.default_rng(0)
    cifar = tmp_path / "cifar"
    cifar.mkdir()
    for name, n in (("data_batch_1", 16), ("test_batch", 8)):
        low = torch.from_numpy(rng.random((n, 3, 4, 4)))
        img = torch.nn.functional.interpolate(low, size=(32, 32), mode="bilinear")
        data = (img * 255).to(torch.uint8).reshape(n, -1).numpy()
        with open(cifar / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": [0] * n}, f)
    sweep_cfg = Path(__file__).resolve().parents[2] / "configs" / "collapse_sweep.yaml"
    overrides = [f"data.path={cifar}", f"train.out_dir={tmp_path / 'sweep'}", "model.ch=4",
                 "model.num_res_blocks=1", "model.z_channels=8", "model.attn_heads=2",
                 "train.steps=3", "train.batch_size=4", "train.progress=false",
                 "train.device=cpu", "init.kmeans_batches=2", "init.kmeans_iters=2",
                 "eval.batch_size=8"]  # fmt: skip
    assert main(["sweep", "--config", str(sweep_cfg), "--values", "16,64", *overrides]) == 0
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "sweep.csv")))
    got = {(r["variant"], r["model.quantizer.codebook_size"]) for r in rows}
    assert got == {(v, k) for v in ("pretrained", "scratch") for k in ("16", "64")}
    for r in rows:
        assert float(r["mse"]) > 0 and 1 <= float(r["perplexity"]) <= int(
            r["model.quantizer.codebook_size"]
        )
    pre = load_config(tmp_path / "sweep" / "pretrain" / "config.yaml")
    assert pre["train"]["vq"] is False
    fine = load_config(tmp_path / "sweep" / "pretrained_codebook_size_64" / "config.yaml")
    assert fine["init"]["kmeans"] and fine["init"]["checkpoint"].endswith("latest.pt")
    assert fine["model"]["quantizer"]["codebook_size"] == 64
    assert "sweep pretrained codebook_size=16: mse" in capsys.readouterr().out


def test_bf16_autocast_and_accumulation_run(make_config, datasets):
    trainer = Trainer(
        make_config("train.steps=2", "train.bf16=true", "optim.accum_steps=2"), datasets=datasets
    )
    result = trainer.fit()
    assert trainer.items == 2 * 2 * 8  # steps x micro-batches x batch
    assert all(np.isfinite(result["history"])) and np.isfinite(result["eval"]["mse"])
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # autocast only


def test_residual_quantizer_code_statistics_per_layer(make_config, datasets, tmp_path):
    """A ResidualVQ with a codebook size per layer and quantize dropout trains, resumes and
    evaluates: its code counts are per layer, each against its own size, and skip dropped
    layers (-1), where one K-bin histogram failed on the second layer's codes and on -1."""
    q = "{type: ResidualVQ, num_quantizers: 2, codebook_size: [4, 32], quantize_dropout: true}"
    trainer = Trainer(make_config("train.steps=4", f"model.quantizer={q}"), datasets=datasets)
    result = trainer.fit()
    counts = trainer.window_codes.counts
    assert counts.shape == (2, 32) and int(counts[0, 4:].sum()) == 0
    r = result["eval"]
    assert 0 < r["usage"] <= 1 and r["codes_used"] <= 4 + 32 and r["perplexity"] >= 1
    rows = list(csv.DictReader(open(trainer.out_dir / "log.csv")))
    assert any(row.get("usage") for row in rows)

    resumed = Trainer(make_config("train.steps=4", f"model.quantizer={q}"), datasets=datasets)
    resumed.load_state(trainer.ckpt_dir / "latest.pt")
    assert resumed.window_codes.counts.shape == (2, 32)


def model_tokens(trainer, x) -> int:
    with torch.no_grad():
        return trainer.model.latents(x[:1]).shape[-2:].numel()


def test_init_from_pretrained_autoencoder_then_kmeans(make_config, datasets, tmp_path):
    """The collapse recipe's stages 1 -> 2: weights from the VQ-free pretraining, then a codebook
    k-means-fitted to the pretrained encoder's outputs (lower distortion than the random one)."""
    pre = Trainer(
        make_config("train.vq=false", "train.steps=2", f"train.out_dir={tmp_path / 'pre'}"),
        datasets=datasets,
    )
    pre.fit()
    ckpt = tmp_path / "pre" / "checkpoints" / "latest.pt"
    common = ("train.steps=0", f"init.checkpoint={ckpt}", "init.kmeans_batches=2")
    plain = Trainer(make_config(*common, f"train.out_dir={tmp_path / 'a'}"), datasets=datasets)
    fitted = Trainer(
        make_config(
            *common, "init.kmeans=true", "train.ema_decay=0.9", f"train.out_dir={tmp_path / 'b'}"
        ),
        datasets=datasets,
    )
    for key, v in pre.model.encoder.state_dict().items():
        assert torch.equal(v, fitted.model.encoder.state_dict()[key]), key
    # The weights' EMA (what evaluation uses) starts from the fitted model, codebook included.
    for key, v in fitted.model.state_dict().items():
        assert torch.equal(v, fitted.ema.state_dict()[key]), key
    x = torch.stack([datasets[1][i] for i in range(8)])

    def distortion(trainer):
        # Of the latents training quantizes: train mode (batch statistics; after 2 pretraining
        # steps the running ones are still mostly their 0 / 1 init), running statistics put back.
        model = trainer.model.train()
        saved = [b.clone() for b in model.buffers()]
        with torch.no_grad():
            z = model.latents(x).permute(0, 2, 3, 1).reshape(-1, 8).double()
            codes = model.quantizer.codebook.double()
            for b, v in zip(model.buffers(), saved, strict=True):
                b.copy_(v)
        return torch.cdist(z, codes).min(1).values.square().mean().item()

    assert distortion(fitted) < 0.5 * distortion(plain)
    # The EMA counts start in the units the EMA keeps, rows per training step (the k-means saw
    # kmeans_batches = 2 steps' rows): 2x too many would start it twice as sure of the codes.
    per_step = fitted.cfg["train"]["batch_size"] * model_tokens(fitted, x)
    assert fitted.model.quantizer.cluster_size.sum().item() == pytest.approx(per_step)
    with pytest.raises(ValueError, match="lacks"):
        Trainer(
            make_config("model.ch=8", f"init.checkpoint={ckpt}", f"train.out_dir={tmp_path}"),
            datasets=datasets,
        )


def test_compiled_training_follows_eager(make_config, datasets, tmp_path):
    # train.compile wraps the model in torch.compile (inductor): the quantizer traces without
    # graph breaks, so the compiled run takes the same steps as eager, up to float reordering.
    from torch._dynamo.utils import counters

    counters.clear()
    histories = []
    for compiled in (False, True):
        torch.manual_seed(0)
        cfg = make_config(
            "train.steps=3",
            f"train.compile={str(compiled).lower()}",
            f"train.out_dir={tmp_path / str(compiled)}",  # a fresh run each, not a resume
        )
        histories.append(Trainer(cfg, datasets=datasets).fit()["history"])
    np.testing.assert_allclose(histories[1], histories[0], rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


def _draw(n, seed):
    """n fresh (8, 3, 16, 16) float64 batches in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(8, 3, 16, 16, generator=g, dtype=torch.float64) * 2 - 1 for _ in range(n)]


def test_train_steps_match_a_plain_pytorch_reference(make_config, datasets):
    """Two optimizer steps of two micro-batches each against the same recipe written out in plain
    PyTorch, in float64: gradient accumulation as a mean (one EMA codebook update), clipping of
    the total norm, AdamW with the configured betas and weight decay on matrices only, the warmup
    learning rate of each step applied before the schedule moves, the EMA weights lerped by
    1 - decay and buffers copied."""
    import copy

    from fastvq.models import build_tokenizer

    lr, clip, decay, wd = 3e-3, 0.02, 0.7, 0.1
    cfg = make_config("optim.accum_steps=2", f"optim.grad_clip={clip}", f"train.ema_decay={decay}",
                      f"optim.weight_decay={wd}", "optim.betas=[0.5, 0.9]", "optim.warmup_steps=2",
                      f"optim.lr={lr}")  # fmt: skip
    torch.manual_seed(0)
    trainer = Trainer(cfg, model=build_tokenizer(cfg["model"]).double(), datasets=datasets)
    ref = copy.deepcopy(trainer.model)
    ref_ema = copy.deepcopy(trainer.model).requires_grad_(False)
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": wd},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=lr, betas=(0.5, 0.9),
    )  # fmt: skip
    assert any(p.dim() < 2 for p in params) and any(p.dim() >= 2 for p in params)
    for step, factor in enumerate((0.5, 1.0)):  # warmup over 2 steps: (step + 1) / 2
        xs = _draw(2, seed=10 + step)
        torch.manual_seed(step)
        logs = trainer.train_step(iter(xs))
        trainer.step += 1

        torch.manual_seed(step)
        ref.train()
        losses, recs = [], []
        with defer_codebook_updates(ref):  # the EMA codebook's one update per step
            for x in xs:
                out = ref(x)
                rec = (out.recon - x).abs().mean()
                loss = rec + out.quant_loss
                (loss / 2).backward()
                losses.append(float(loss.detach()))
                recs.append(float(rec.detach()))
        norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        assert norm > 2 * clip  # the clipping is active
        for group in opt.param_groups:
            group["lr"] = lr * factor
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            for e, p in zip(ref_ema.parameters(), ref.parameters(), strict=True):
                e.copy_(decay * e + (1 - decay) * p)
            for e, b in zip(ref_ema.buffers(), ref.buffers(), strict=True):
                e.copy_(b)

        assert logs["lr"] == pytest.approx(lr * factor, rel=1e-12)
        assert logs["grad_norm"] == pytest.approx(norm, rel=1e-9)
        assert logs["loss"] == pytest.approx(sum(losses) / 2, rel=1e-6)  # via float32
        assert logs["recon"] == pytest.approx(sum(recs) / 2, rel=1e-9)
        for (k, v), w in zip(trainer.model.state_dict().items(), ref.state_dict().values(),
                             strict=True):  # fmt: skip
            torch.testing.assert_close(v, w, rtol=1e-9, atol=1e-12, msg=k)
        for (k, v), w in zip(trainer.ema.state_dict().items(), ref_ema.state_dict().values(),
                             strict=True):  # fmt: skip
            torch.testing.assert_close(v, w, rtol=1e-9, atol=1e-12, msg=k)
    last = trainer.model.decoder.conv_out.weight
    assert not torch.equal(trainer.ema.decoder.conv_out.weight, last)  # the EMA lags


def test_accumulated_micro_batches_step_as_one_batch(tmp_path, datasets):
    """Two micro-batches of 8 take the optimizer step one batch of 16 takes, the EMA codebook's
    update and dead-code reset included (a GroupNorm model: no batch statistics; float64). The
    quantizer updated on each micro-batch gave gradients 30 % off and decayed its EMA twice."""
    from fastvq.models import build_tokenizer

    vqgan = ["model.arch=vqgan", "model.ch=8", "model.ch_mult=[1,2]", "model.num_res_blocks=1",
             "model.attn_resolutions=[]", "model.resolution=16", "model.norm_groups=4",
             "model.quantizer={type: VectorQuantize, codebook_size: 16, decay: 0.8, "
             "threshold_ema_dead_code: 2}"]  # fmt: skip
    xs = _draw(2, seed=21)
    states = []
    for accum, batches in ((1, [torch.cat(xs)]), (2, xs)):
        cfg = load_config(None, [*vqgan, "data.resolution=16", "train.device=cpu",
                                 f"train.out_dir={tmp_path / str(accum)}", "train.progress=false",
                                 f"optim.accum_steps={accum}", f"train.batch_size={16 // accum}",
                                 ])  # fmt: skip
        torch.manual_seed(0)
        trainer = Trainer(cfg, model=build_tokenizer(cfg["model"]).double(), datasets=datasets)
        torch.manual_seed(1)
        trainer.train_step(iter(batches))
        states.append(trainer.model.state_dict())
    assert (states[1]["quantizer.cluster_size"] == 2).any()  # dead codes were reset to 2
    for k, v in states[0].items():
        torch.testing.assert_close(states[1][k], v, rtol=1e-6, atol=1e-9, msg=k)


def test_discriminator_steps_match_a_plain_pytorch_reference(make_config, datasets):
    """From loss.disc_start on, each step ends with one discriminator step whose gradient is the
    mean hinge loss over the step's micro-batches (the generator pass adds nothing to it), clipped,
    at optim.disc_lr on its own warmup schedule; the learning rate moves once per disc step."""
    import copy

    import torch.nn.functional as F

    from fastvq.models import build_tokenizer

    disc_lr, clip = 1e-3, 0.05
    cfg = make_config("disc={ndf: 4, n_layers: 1, norm: none}", "loss.disc_weight=0.5",
                      "loss.disc_start=1", "optim.accum_steps=2", f"optim.disc_lr={disc_lr}",
                      f"optim.grad_clip={clip}", "optim.warmup_steps=2")  # fmt: skip
    torch.manual_seed(0)
    trainer = Trainer(cfg, model=build_tokenizer(cfg["model"]).double(), datasets=datasets)
    trainer.loss_fn.double()
    seen = []
    disc_step = trainer._disc_step

    def recorded_disc_step(xs, recons, autocast):
        frozen = copy.deepcopy(trainer.disc).requires_grad_(True)
        for x, r in zip(xs, recons, strict=True):
            d = 0.5 * (F.relu(1 - frozen(x)).mean() + F.relu(1 + frozen(r)).mean())
            (d / len(xs)).backward()
        torch.nn.utils.clip_grad_norm_(list(frozen.parameters()), clip)
        seen.append({"step": trainer.step, "want": [p.grad for p in frozen.parameters()]})
        return disc_step(xs, recons, autocast)

    def before_disc_opt_step(opt, args, kwargs):
        seen[-1]["got"] = [p.grad.clone() for p in trainer.disc.parameters()]
        seen[-1]["lr"] = opt.param_groups[0]["lr"]

    trainer._disc_step = recorded_disc_step
    trainer.disc_opt.register_step_pre_hook(before_disc_opt_step)
    for step in range(3):
        trainer.train_step(iter(_draw(2, seed=20 + step)))
        trainer.step += 1
    assert [s["step"] for s in seen] == [1, 2]
    assert [s["lr"] for s in seen] == pytest.approx([disc_lr / 2, disc_lr], rel=1e-12)
    for s in seen:
        assert len(s["got"]) == len(s["want"]) > 0
        for got, want in zip(s["got"], s["want"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-13)


def test_huge_implicit_codebook_trains_resumes_and_evaluates(make_config, datasets):
    """BSQ with 2**36 codes: the usage window and the evaluation count sparsely (a dense table
    was 512 GiB, and no step could run); the window survives a checkpoint."""
    cfg = make_config("model.quantizer={type: BSQ, codebook_size: 68719476736}", "train.steps=2")
    trainer = Trainer(cfg, datasets=datasets)
    trainer.train_step(trainer._batches())
    trainer.save()
    window = trainer.window_codes.counts
    assert window.is_sparse and int(window.values().sum()) == 8 * 16
    resumed = Trainer(cfg, datasets=datasets)  # train.resume: loads latest.pt
    got = resumed.window_codes.counts
    assert torch.equal(got.indices(), window.indices())
    assert torch.equal(got.values(), window.values())
    r = resumed.fit()["eval"]
    assert 0 < r["codes_used"] <= 16 * 16 and r["usage"] == r["codes_used"] / 2**36


def test_ema_weights_evaluate_and_initialise_and_usage_window(make_config, datasets, tmp_path):
    """evaluate() scores the EMA weights; init.checkpoint takes a checkpoint's EMA weights; the
    logged code usage covers the steps since the previous log line only."""
    from fastvq.train.metrics import mse

    trainer = Trainer(make_config("train.steps=3", "train.ema_decay=0.5"), datasets=datasets)
    windows = []
    stats = trainer.window_codes.stats
    trainer.window_codes.stats = lambda: (windows.append(int(trainer.window_codes.counts.sum())),
                                          stats())[1]  # fmt: skip
    trainer.fit()
    assert windows == [2 * 8 * 16, 1 * 8 * 16]  # logs at steps 2 and 3; 4 x 4 codes per image
    x = torch.stack([datasets[1][i] for i in range(len(datasets[1]))])
    with torch.no_grad():
        ema_mse = mse(x, trainer.ema.eval()(x).recon.clamp(-1, 1)).mean().item()
        live_mse = mse(x, trainer.model.eval()(x).recon.clamp(-1, 1)).mean().item()
    assert abs(ema_mse - live_mse) > 1e-6 * live_mse
    assert trainer.evaluate(save_images=False)["mse"] == pytest.approx(ema_mse, rel=1e-5)

    ckpt = trainer.ckpt_dir / "latest.pt"
    init = Trainer(
        make_config(f"init.checkpoint={ckpt}", f"train.out_dir={tmp_path / 'init'}"),
        datasets=datasets,
    )
    for key, v in trainer.ema.state_dict().items():
        assert torch.equal(init.model.state_dict()[key], v), key


def test_cli_eval_refuses_checkpoints_that_do_not_fit(tmp_path, make_config, datasets):
    """fastvq eval loads every weight, the quantizer's included (init.checkpoint may skip it): a
    model section that differs from the checkpoint's is an error, never a random codebook; a
    checkpoint without its config, or a file that is no checkpoint, says what it needs."""
    _png_folder(tmp_path / "images")
    cfg = make_config("train.steps=1", "data.kind=folder", f"data.path={tmp_path / 'images'}")
    trainer = Trainer(cfg, datasets=datasets)
    trainer.fit()
    latest = str(trainer.ckpt_dir / "latest.pt")
    with pytest.warns(UserWarning, match="codebook_size 16 -> 8"):
        with pytest.raises(ValueError, match="quantizer.embed"):
            main(["eval", "--checkpoint", latest, "model.quantizer.codebook_size=8"])
    # Weights that fit another tokenizer (FSQ levels reordered) evaluate it, but not silently.
    fsq = ["model.quantizer={type: FSQ, levels: [8, 5, 5]}", f"train.out_dir={tmp_path / 'f'}"]
    fsq_run = Trainer(make_config("train.steps=1", *fsq), datasets=datasets)
    fsq_run.fit()
    with pytest.warns(UserWarning, match=r"model.quantizer.levels \[8, 5, 5\] -> \[5, 5, 8\]"):
        main(["eval", "--checkpoint", str(fsq_run.ckpt_dir / "latest.pt"),
              f"--out={tmp_path / 'e'}", "model.quantizer.levels=[5, 5, 8]"])  # fmt: skip
    torch.save(trainer.model.state_dict(), tmp_path / "weights.pt")
    with pytest.raises(ValueError, match="holds no config.*--config"):
        main(["eval", "--checkpoint", str(tmp_path / "weights.pt")])
    with pytest.raises(ValueError, match="config.yaml' could not be read"):
        main(["eval", "--checkpoint", str(trainer.out_dir / "config.yaml")])
    data = (trainer.ckpt_dir / "latest.pt").read_bytes()
    torch.save({"step": 1}, tmp_path / "small.pt")
    small = (tmp_path / "small.pt").read_bytes()
    # truncated (torch.load raises OSError, or RuntimeError for the small archive), a pickle of
    # an unknown protocol (ValueError)
    for bad in (data[:5000], data[: len(data) // 2], small[: len(small) // 2], b"\x80\x09xyz"):
        (tmp_path / "cut.pt").write_bytes(bad)
        with pytest.raises(ValueError, match="cut.pt' could not be read"):
            main(["eval", "--checkpoint", str(tmp_path / "cut.pt")])


def test_pick_device_names_the_key():
    from fastvq.train.trainer import pick_device

    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="train.device must be 'auto' or a torch device"):
        pick_device("bogus")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="train.device='cuda', but torch sees no CUDA"):
            pick_device("cuda")


def test_cli_eval_refuses_extra_quantizer_layers(tmp_path, make_config, datasets):
    # Every weight this model has is in the checkpoint, but not every weight of the checkpoint
    # is in this model: evaluated anyway, the 2-layer stack would stand for the 4-layer one.
    _png_folder(tmp_path / "images")
    rvq = "model.quantizer={type: ResidualVQ, num_quantizers: 4, codebook_size: 8}"
    folder = ["data.kind=folder", f"data.path={tmp_path / 'images'}"]
    trainer = Trainer(make_config("train.steps=1", *folder, rvq), datasets=datasets)
    trainer.fit()
    torch.save(trainer.model.state_dict(), tmp_path / "weights.pt")  # no config to compare
    with pytest.raises(ValueError, match=r"quantizer\.layers\.2\."):
        config = str(trainer.out_dir / "config.yaml")
        main(["eval", "--checkpoint", str(tmp_path / "weights.pt"), "--config", config,
              "model.quantizer.num_quantizers=2"])  # fmt: skip


class _MeanColour(torch.nn.Module):
    """A stand-in rFID feature extractor: (B, 3, H, W) -> (B, 3)."""

    def forward(self, x):
        return x.mean((2, 3))


class _OneVector(torch.nn.Module):
    def forward(self, x):
        return x.mean((0, 2, 3))[None]  # one vector for the whole batch


def test_model_lists_and_embed_dim_are_checked(make_config, datasets):
    """model.ch_mult=2 failed with "'int' object is not iterable", naming no key; embed_dim=0
    was read as unset."""
    from fastvq.models import build_tokenizer

    with pytest.raises(ValueError, match="model.ch_mult must be a list of ints.*, got 2"):
        Trainer(make_config("model.ch_mult=2"), datasets=datasets)
    with pytest.raises(ValueError, match="model.embed_dim must be a positive int.*, got 0"):
        Trainer(make_config("model.embed_dim=0"), datasets=datasets)
    q = {"type": "VectorQuantize", "codebook_size": 8}
    vqgan = dict(arch="vqgan", ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=4,
                 norm_groups=4, quantizer=q)  # fmt: skip
    with pytest.raises(ValueError, match="model.attn_resolutions must be a list of ints"):
        build_tokenizer({**vqgan, "attn_resolutions": 16})
    assert build_tokenizer({**vqgan, "attn_resolutions": [], "embed_dim": 3}).quantizer.dim == 3
    # A resolution no level has (512 px with [16]) dropped every attention block silently.
    with pytest.raises(ValueError, match=r"levels \[32, 16\] .*, got \[8\]"):
        build_tokenizer({**vqgan, "resolution": 32, "attn_resolutions": [8]})
    for key, bad in (
        ("norm_groups", 0),
        ("resolution", None),
        ("num_res_blocks", 1.5),
        ("ch", "8"),
        ("z_channels", 0),  # "dim must be >= 1", no key named
        ("out_channels", -1),  # torch's "negative dimension"
    ):
        with pytest.raises(ValueError, match=f"model.{key} must be an int"):
            build_tokenizer({**vqgan, key: bad})
    rotated = dict(arch="rotated_vqvae", ch=8, z_channels=4, quantizer=q)
    with pytest.raises(ValueError, match="model.attn_heads must be an int >= 0, got -1"):
        build_tokenizer({**rotated, "attn_heads": -1})
    assert build_tokenizer({**rotated, "attn_heads": 0})  # a decoder without attention
    with pytest.raises(ValueError, match="model.quant_conv must be true or false, got 'no'"):
        build_tokenizer({**rotated, "quant_conv": "no"})  # a string in YAML 1.2, truthy


def test_fid_features_that_are_no_extractor_are_named_at_start(make_config, datasets, tmp_path):
    """A torch.save'd state_dict trained to the end, then failed in torch.jit.load with an
    internal miniz error; an extractor without (B, F) output failed after training too."""
    torch.save(_MeanColour().state_dict(), tmp_path / "state_dict.pt")
    torch.jit.script(_OneVector()).save(str(tmp_path / "one.pt"))
    for name, why in (("state_dict.pt", "RuntimeError"), ("one.pt", r"2 images gave .*\[1, 3\]")):
        match = f"eval.fid_features '.*{name}' is not a TorchScript feature extractor .*{why}"
        with pytest.raises(ValueError, match=match):
            Trainer(make_config(f"eval.fid_features={tmp_path / name}"), datasets=datasets)
    torch.jit.script(_MeanColour()).save(str(tmp_path / "mean.pt"))
    trainer = Trainer(make_config(f"eval.fid_features={tmp_path / 'mean.pt'}"), datasets=datasets)
    assert trainer.evaluate(save_images=False)["rfid"] >= 0


def test_settings_that_cannot_work_are_named(make_config, datasets, tmp_path):
    with pytest.raises(ValueError, match="data.resolution must be a multiple of .* factor 4"):
        Trainer(make_config("data.resolution=18"), datasets=datasets)
    # e.g. collapse_finetune run before collapse_pretrain: the recipe names the checkpoint
    with pytest.raises(FileNotFoundError, match="init.checkpoint .*pre.pt' does not exist"):
        Trainer(make_config(f"init.checkpoint={tmp_path / 'pre.pt'}"), datasets=datasets)
    # The rFID extractor loads at each evaluation: a missing one is named before training.
    with pytest.raises(FileNotFoundError, match="eval.fid_features .*inception.pt' does not"):
        Trainer(make_config(f"eval.fid_features={tmp_path / 'inception.pt'}"), datasets=datasets)
    # rFID needs a covariance, so 2 images: named before training, not after it.
    torch.jit.script(_MeanColour()).save(str(tmp_path / "features.pt"))
    fid = f"eval.fid_features={tmp_path / 'features.pt'}"
    with pytest.raises(ValueError, match="rFID needs at least 2 evaluation images"):
        Trainer(make_config(fid, "eval.max_batches=1", "eval.batch_size=1"), datasets=datasets)
    with pytest.raises(ValueError, match="the evaluation has 1"):
        Trainer(make_config(fid), datasets=(datasets[0], torch.utils.data.Subset(datasets[1], [0])))
    with pytest.raises(ValueError, match="evaluation split of data.path=None is empty"):
        Trainer(make_config(), datasets=(datasets[0], torch.utils.data.Subset(datasets[1], [])))


def test_schedules_that_never_finish_are_named(make_config, datasets):
    """A short trial of a long recipe is accepted, with a warning: the learning rate never
    reached optim.lr, or the discriminator never trained, without a word."""
    with pytest.warns(UserWarning, match="optim.warmup_steps=5 > train.steps=4: the learning"):
        Trainer(make_config("train.steps=4", "optim.warmup_steps=5"), datasets=datasets)
    gan = ["disc={ndf: 4, n_layers: 1}", "loss.disc_weight=0.5", "loss.disc_start=4"]
    with pytest.warns(UserWarning, match="loss.disc_start=4 >= train.steps=4: the discrim"):
        Trainer(make_config("train.steps=4", *gan), datasets=datasets)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer(make_config("train.steps=5", "optim.warmup_steps=5", *gan), datasets=datasets)


def test_reconstruction_grid_takes_num_images_from_several_batches(
    make_config, datasets, monkeypatch
):
    """The grid took its images from the first evaluation batch only: 16 asked, 2 shown."""
    grids = []
    monkeypatch.setattr("fastvq.train.trainer.save_grid", lambda x, r, path: grids.append((x, r)))
    trainer = Trainer(make_config("eval.batch_size=2", "eval.num_images=5"), datasets=datasets)
    trainer.evaluate()
    ((x, recon),) = grids
    want = torch.stack([trainer.eval_set[i] for i in range(5)])
    assert torch.equal(x.cpu(), want) and recon.shape == want.shape


@pytest.mark.parametrize("key", ["in_channels", "out_channels"])
def test_trainer_refuses_models_for_other_than_rgb_images(make_config, datasets, key):
    """Every dataset yields RGB: in_channels=1 failed at step 0 in a convolution, and
    out_channels=1 trained on a broadcast loss, then failed at the first evaluation."""
    with pytest.raises(ValueError, match=f"model.{key} must be 3 .*RGB.*, got 1"):
        Trainer(make_config(f"model.{key}=1"), datasets=datasets)


def test_kmeans_init_fits_the_latents_training_sees(make_config, datasets):
    """The collapse baseline: k-means on an untrained BatchNorm encoder. Training normalizes by
    batch statistics; eval mode by the untouched running ones (0 / 1), whose latents here are
    ~10x smaller in norm, so a codebook fitted to them sat near the origin, away from every
    training latent (distortion 0.87 of the latents' power against 0.30)."""
    cfg = make_config("train.steps=0", "init.kmeans=true", "init.kmeans_batches=2")
    torch.manual_seed(0)
    from fastvq.models import build_tokenizer

    model = build_tokenizer(cfg["model"])
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    trainer = Trainer(cfg, model=model, datasets=datasets)
    for key, v in trainer.model.encoder.state_dict().items():  # running statistics put back
        assert torch.equal(v, before[key]), key
    x = torch.stack([datasets[1][i] for i in range(16)])
    model.train()
    with torch.no_grad():
        z = model.latents(x).permute(0, 2, 3, 1).reshape(-1, 8).double()
    codes = model.quantizer.codebook.double()
    distortion = torch.cdist(z, codes).min(1).values.square().mean()
    assert distortion < 0.5 * z.square().sum(1).mean()


def test_amsgrad_reaches_every_optimizer(make_config, datasets):
    # The collapse recipe's Adam(amsgrad=True); the discriminator's optimizer follows optim too.
    cfg = make_config("optim.amsgrad=true", "disc={ndf: 4, n_layers: 1}", "loss.disc_weight=0.1")
    trainer = Trainer(cfg, datasets=datasets)
    groups = trainer.opt.param_groups + trainer.disc_opt.param_groups
    assert all(g["amsgrad"] for g in groups)
    hyper = "{type: HyperCodebook, codebook_size: 16, codebook_dim: 4, embed_dim: 4, hidden_dim: 8}"
    meta = make_config("optim.amsgrad=true", f"model.quantizer={hyper}", "meta.enabled=true")
    assert all(g["amsgrad"] for g in Trainer(meta, datasets=datasets).meta_opt.param_groups)
    assert not any(g["amsgrad"] for g in Trainer(make_config(), datasets=datasets).opt.param_groups)


def test_evaluation_scores_lpips_on_the_8bit_reconstructions(make_config, datasets):
    # Every image metric sees the reconstruction as saved (metrics.to_8bit), LPIPS included.
    from fastvq.train.metrics import to_8bit

    class Spy(torch.nn.Module):
        def forward(self, x, recon):
            seen.append(recon)
            return recon.new_zeros(len(recon))

    seen, trainer = [], Trainer(make_config(), datasets=datasets)
    trainer.loss_fn.lpips = Spy()
    result = trainer.evaluate(save_images=False)
    assert seen and result["lpips"] == 0.0
    assert all(torch.equal(to_8bit(r), r) for r in seen)


def test_kmeans_init_takes_residual_vq_and_refuses_fixed_codebooks(make_config, datasets):
    # kmeans_init: its layers start un-initted, so `initted` shows that init_from ran.
    rvq = "{type: ResidualVQ, num_quantizers: 2, codebook_size: 8, kmeans_init: true}"
    cfg = make_config(f"model.quantizer={rvq}", "init.kmeans=true", "init.kmeans_batches=1")
    trainer = Trainer(cfg, datasets=datasets)
    assert all(bool(layer.initted) for layer in trainer.model.quantizer.layers)
    # A grouped stack initialises each group's stack (it was refused: "no learnable codebook").
    grvq = rvq.replace("ResidualVQ", "GroupedResidualVQ, groups: 2")
    cfg = make_config(f"model.quantizer={grvq}", "init.kmeans=true", "init.kmeans_batches=1")
    trainer = Trainer(cfg, datasets=datasets)
    assert all(bool(layer.initted) for s in trainer.model.quantizer.rvqs for layer in s.layers)
    with pytest.raises(ValueError, match="init.kmeans: SimVQ has no learnable codebook"):
        Trainer(
            make_config("model.quantizer={type: SimVQ, codebook_size: 8}", "init.kmeans=true"),
            datasets=datasets,
        )


def test_sweep_refuses_keys_it_would_ignore(tmp_path):
    sweep = "sweep: {config: c.yaml, key: train.seed, values: [1], baselin: true}\n"
    (tmp_path / "s.yaml").write_text(sweep)
    with pytest.raises(ValueError, match="unknown key sweep.baselin"):
        main(["sweep", "--config", str(tmp_path / "s.yaml")])
    (tmp_path / "s.yaml").write_text(sweep.replace(", baselin: true", "") + "train: {steps: 2}\n")
    with pytest.raises(ValueError, match="unknown key train"):
        main(["sweep", "--config", str(tmp_path / "s.yaml")])
    # An override of the sweep: section was checked as a run's config ("unknown config section").
    (tmp_path / "s.yaml").write_text(sweep.replace(", baselin: true", ""))
    with pytest.raises(ValueError, match="'sweep.out_dir=x': .* train.out_dir=DIR"):
        main(["sweep", "--config", str(tmp_path / "s.yaml"), "sweep.out_dir=x"])


@pytest.mark.parametrize(
    "spec, values, match",
    [
        ({"values": []}, None, "sweep.values must be a non-empty list"),
        ({"values": 3}, None, "sweep.values must be a non-empty list, got 3"),
        ({"config": ["c.yaml"]}, None, "sweep.config must be a string"),
        ({"key": 5}, None, "sweep.key must be a string"),
        ({"out_dir": 5}, None, "sweep.out_dir must be a string"),
        ({}, "8,,16", "--values '8,,16': comma-separated values, none of them empty"),
        ({}, "", "--values '': comma-separated values, none of them empty"),
        ({"values": [1, -2]}, None, "train.steps must be >= 0, got -2"),  # before the first run
        ({"baseline": "yes"}, None, "sweep.baseline must be true or false"),
    ],
)
def test_sweep_checks_its_section_and_every_value_before_running(tmp_path, spec, values, match):
    import yaml

    (tmp_path / "c.yaml").write_text(f"train: {{steps: 1, out_dir: {tmp_path / 'runs'}}}\n")
    spec = {"config": "c.yaml", "key": "train.steps", "values": [1], **spec}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"sweep": spec}))
    args = ["sweep", "--config", str(tmp_path / "s.yaml")]
    with pytest.raises(ValueError, match=match):
        main([*args, *(["--values", values] if values is not None else [])])
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_sweep_passes_each_value_as_yaml(tmp_path, monkeypatch):
    # null stays null (not the string "None"), and a null pretrain means none.
    from fastvq.train import cli

    spec = "{config: c.yaml, key: optim.disc_lr, values: [null, 0.001], pretrain: null}"
    (tmp_path / "s.yaml").write_text(f"sweep: {spec}\n")
    (tmp_path / "c.yaml").write_text("train: {steps: 1}\n")
    runs = []
    monkeypatch.setattr(
        cli, "train", lambda config, overrides: runs.append(overrides) or {"eval": {"mse": 0.5}}
    )
    rows = cli.sweep(str(tmp_path / "s.yaml"), None, [f"train.out_dir={tmp_path / 'out'}"])
    assert [r["optim.disc_lr"] for r in rows] == [None, 0.001]
    assert ["optim.disc_lr=null" in o for o in runs] == [True, False]
    assert ["optim.disc_lr=0.001" in o for o in runs] == [False, True]


def test_sweep_reads_floats_as_configs_do_and_tables_every_column(tmp_path, monkeypatch):
    # A sweep file's 1e-3 was the string '1e-3' (PyYAML's 1.1 rules), refused as optim.lr; and
    # sweep.csv took the first row's columns only (a quantizer's usage, lpips, rfid were lost).
    import csv

    from fastvq.train import cli

    (tmp_path / "s.yaml").write_text(
        "sweep: {config: c.yaml, key: optim.lr, values: [1e-3, 2e-3]}\n"
    )
    (tmp_path / "c.yaml").write_text("train: {steps: 1}\n")
    results = iter([{"eval": {"mse": 0.5}}, {"eval": {"mse": 0.4, "usage": 0.25}}])
    monkeypatch.setattr(cli, "train", lambda config, overrides: next(results))
    rows = cli.sweep(str(tmp_path / "s.yaml"), None, [f"train.out_dir={tmp_path / 'out'}"])
    assert [r["optim.lr"] for r in rows] == [0.001, 0.002]
    table = list(csv.DictReader(open(tmp_path / "out" / "sweep.csv")))
    assert [r["usage"] for r in table] == ["", "0.25"]
    # "~" in the runs' folder: the tables went to a directory named "~" under the cwd.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    results = iter([{"eval": {"mse": 0.5}}, {"eval": {"mse": 0.4}}])
    cli.sweep(str(tmp_path / "s.yaml"), None, ["train.out_dir=~/sweep"])
    assert (tmp_path / "home" / "sweep" / "sweep.csv").is_file()


def test_cli_reports_a_bad_setting_in_one_line(tmp_path, capsys, monkeypatch):
    # The console script printed a traceback for every mistake; FASTVQ_DEBUG=1 keeps it.
    from fastvq.train.cli import run

    missing = str(tmp_path / "missing.yaml")
    assert run(["train", "--config", missing]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastvq: error: config file") and "Traceback" not in err
    assert run(["train", "--config", "demo", "train.steps=abc"]) == 2
    assert "train.steps" in capsys.readouterr().err
    # The disc section went to the discriminator unchecked (a TypeError's traceback), and an
    # out_dir that is a file raised FileExistsError through the console script.
    for override, match in (
        ("disc.ndf=abc", "bad disc config .* ndf must be an int"),
        ("disc.foo=1", "bad disc config .* 'foo'"),
        ("disc.n_layers=0", "n_layers must be >= 1"),
        (f"train.out_dir={missing}", "File exists"),
    ):
        if override.startswith("train.out_dir"):
            open(missing, "w").close()
        assert run(["train", "--config", "demo", "train.steps=1", override]) == 2
        err = capsys.readouterr().err
        assert re.search(match, err) and "Traceback" not in err and len(err.splitlines()) == 1
    os.remove(missing)
    monkeypatch.setenv("FASTVQ_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        run(["train", "--config", missing])


def test_sweep_under_torchrun_writes_its_tables_once(tmp_path, monkeypatch, capsys):
    # Every rank holds the same all-reduced results: rank 0 alone prints and writes them.
    from fastvq.train import cli

    (tmp_path / "s.yaml").write_text("sweep: {config: c.yaml, key: train.seed, values: [1, 2]}\n")
    (tmp_path / "c.yaml").write_text("train: {steps: 1}\n")  # read to check each value's config
    monkeypatch.setattr(cli, "train", lambda config, overrides: {"eval": {"mse": 0.5}})
    for rank, written in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        rows = cli.sweep(str(tmp_path / "s.yaml"), None, [f"train.out_dir={tmp_path / 'out'}"])
        assert [r["train.seed"] for r in rows] == [1, 2]
        assert (tmp_path / "out" / "sweep.csv").is_file() == written
        assert ("sweep scratch seed=1: mse 0.5" in capsys.readouterr().out) == written


def test_cli_leaves_a_callers_process_group_alone(tmp_path, monkeypatch):
    # main() closes only a group the Trainer started under torchrun, never its caller's.
    import torch.distributed as dist

    from fastvq.testing import free_port
    from fastvq.train import cli

    (tmp_path / "s.yaml").write_text("sweep: {config: c.yaml, key: train.seed, values: [1]}\n")
    (tmp_path / "c.yaml").write_text("train: {steps: 1}\n")
    monkeypatch.setattr(cli, "train", lambda config, overrides: {"eval": {"mse": 0.5}})
    init = f"tcp://127.0.0.1:{free_port()}"
    dist.init_process_group("gloo", init_method=init, rank=0, world_size=1)
    try:
        out = f"train.out_dir={tmp_path / 'out'}"
        assert cli.main(["sweep", "--config", str(tmp_path / "s.yaml"), out]) == 0
        assert dist.is_initialized()
        # Under torchrun's environment too (train, eval, tokenize): no second init, which raises.
        from fastvq.train.trainer import join_process_group

        monkeypatch.setenv("WORLD_SIZE", "2")
        assert join_process_group(torch.device("cpu")) == (0, 2) and dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_data_workers_load_the_same_batches(make_config, datasets, monkeypatch):
    # Each item's crop is seeded by its place in the stream, so two workers feed the steps and
    # the evaluation exactly what the main process does.
    runs = [
        Trainer(make_config("train.steps=3", f"train.num_workers={w}"), datasets=datasets).fit()
        for w in (0, 2)
    ]
    assert runs[0]["history"] == runs[1]["history"] and runs[0]["eval"] == runs[1]["eval"]
    # "auto": none on CPU; on CUDA min(8, cores per local process).
    assert resolve_num_workers("auto", torch.device("cpu")) == 0
    assert resolve_num_workers(3, torch.device("cpu")) == 3
    monkeypatch.setattr(os, "cpu_count", lambda: 24)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert resolve_num_workers("auto", torch.device("cuda", 0)) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert resolve_num_workers("auto", torch.device("cuda", 0)) == 8

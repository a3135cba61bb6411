"""Checkpoints: kill / resume continues the same run bit for bit on CPU, atomic writes survive a
crash mid-save, the NaN/Inf guard stops with the last good checkpoint kept, overfit-one-batch."""

import csv
import math
import os
import random
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from fastvq.ops._validate import NonFiniteError
from fastvq.train import checkpoint as ckpt
from fastvq.train.trainer import NonFiniteLossError, Trainer, lr_factor

# A VQGAN-style run: EMA weights, a discriminator from step 2 with LeCAM, gradient accumulation,
# warmup: every piece of state a resumed step depends on.
FULL = [
    "train.steps=6",
    "train.ckpt_every=3",
    "train.ema_decay=0.9",
    "optim.warmup_steps=2",
    "optim.accum_steps=2",
    "disc={ndf: 4, n_layers: 1, norm: batch}",
    "loss.disc_weight=0.5",
    "loss.disc_start=2",
    "loss.lecam_weight=0.1",
]


class Killed(Exception):
    pass


def _state(trainer):
    return {
        **{f"model.{k}": v for k, v in trainer.model.state_dict().items()},
        **{f"ema.{k}": v for k, v in trainer.ema.state_dict().items()},
        **{f"loss.{k}": v for k, v in trainer.loss_fn.state_dict().items()},
    }


def test_kill_and_resume_is_exact(make_config, datasets, tmp_path):
    straight = Trainer(make_config(*FULL, f"train.out_dir={tmp_path / 'a'}"), datasets=datasets)
    a = straight.fit()

    cfg = make_config(*FULL, f"train.out_dir={tmp_path / 'b'}")
    first = Trainer(cfg, datasets=datasets)
    step = first.train_step

    def dies_after_the_checkpoint(batches):
        if first.step == 5:
            raise Killed  # the process dies two steps after step 3's checkpoint (step 4 logged)
        return step(batches)

    first.train_step = dies_after_the_checkpoint
    with pytest.raises(Killed):
        first.fit()
    assert ckpt.load(tmp_path / "b" / "checkpoints" / "latest.pt")["step"] == 3
    resumed = Trainer(cfg, datasets=datasets)  # fresh objects, state from latest.pt only
    assert resumed.step == 3
    b = resumed.fit()

    assert len(a["history"]) == 6 and a["history"] == b["history"]  # the same loss curve, exactly
    sa, sb = _state(straight), _state(resumed)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    for name in ("opt", "disc_opt"):
        oa, ob = getattr(straight, name).state_dict(), getattr(resumed, name).state_dict()
        for i, s in oa["state"].items():
            assert all(torch.equal(s[k], ob["state"][i][k]) for k in s), (name, i)
    assert straight.sched.get_last_lr() == resumed.sched.get_last_lr()
    assert a["eval"] == b["eval"]
    # The log holds each step once, with the values of the straight run (but its timing).
    logs = [list(csv.DictReader(open(tmp_path / run / "log.csv"))) for run in ("a", "b")]
    for rows in logs:
        for row in rows:
            row.pop("images_per_s")
    assert logs[0] == logs[1] and [r["step"] for r in logs[0] if r["loss"]] == ["2", "4", "6"]


def test_resume_refuses_a_different_world_size(make_config, datasets):
    trainer = Trainer(make_config("train.steps=1"), datasets=datasets)
    trainer.fit()
    path = trainer.ckpt_dir / "latest.pt"
    state = ckpt.load(path)
    state["world"] = 2
    ckpt.save_atomic(state, path)
    with pytest.raises(ValueError, match="2 processes"):
        Trainer(make_config("train.steps=2"), datasets=datasets)


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "latest.pt"
    ckpt.save_atomic({"step": 1, "w": torch.arange(4)}, path)

    def torn_save(obj, f):
        f.write(b"PK\x03\x04 half a zip file")
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of the write

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert ckpt.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"]  # the temp file is gone


def test_rng_state_round_trip():
    """Resuming restores every generator a step draws from: python, numpy and torch's (dropout,
    LFQ's code subsets, dead codes). The kill-and-resume test's model draws from none of them."""
    state = ckpt.rng_state()
    want = (random.random(), np.random.rand(), torch.rand(4))
    random.random(), np.random.rand(3), torch.rand(9)  # the streams move on
    ckpt.set_rng_state(state)
    got = (random.random(), np.random.rand(), torch.rand(4))
    assert got[:2] == want[:2] and torch.equal(got[2], want[2])


def test_save_writes_its_temporary_file_beside_the_target(tmp_path, monkeypatch):
    """os.replace is atomic only within one filesystem (across, it fails with EXDEV): the
    temporary file must sit in the target's folder, not in /tmp."""
    sources = []
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (sources.append(Path(a)), replace(a, b)))
    path = ckpt.save_atomic({"step": 1}, tmp_path / "run" / "latest.pt")
    assert [s.parent for s in sources] == [path.parent] and ckpt.load(path)["step"] == 1


def test_unreadable_paths_and_states_are_named(tmp_path):
    with pytest.raises(ValueError, match="is a folder, not a checkpoint file"):
        ckpt.load(tmp_path)
    with pytest.raises(ValueError, match="is a folder"):
        ckpt.load_weights(torch.nn.Linear(2, 2), tmp_path)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds a list, not a trainer checkpoint or a state_dict"):
        ckpt.load_weights(torch.nn.Linear(2, 2), tmp_path / "list.pt")


def test_non_strict_loads_skip_quantizer_weights_of_another_shape(tmp_path):
    """init.checkpoint: a pretrained autoencoder's weights load into a model with another
    codebook; its quantizer keeps its own weights, everything else is the checkpoint's."""
    from fastvq.models import build_tokenizer

    model = dict(arch="rotated_vqvae", ch=4, ch_mult=[1, 2], num_res_blocks=1, z_channels=8,
                 attn_heads=2)  # fmt: skip
    torch.manual_seed(0)
    trained = build_tokenizer(
        {**model, "quantizer": {"type": "VectorQuantize", "codebook_size": 16}}
    )
    torch.save(trained.state_dict(), tmp_path / "pre.pt")
    other = build_tokenizer({**model, "quantizer": {"type": "VectorQuantize", "codebook_size": 32}})
    before = {k: v.clone() for k, v in other.quantizer.state_dict().items()}
    with pytest.raises(ValueError, match="lacks .* weights of this model"):
        ckpt.load_weights(other, tmp_path / "pre.pt")  # strict
    ckpt.load_weights(other, tmp_path / "pre.pt", strict=False)
    for k, v in other.state_dict().items():
        if k.startswith("quantizer."):
            assert torch.equal(v, before[k[len("quantizer.") :]]), k
        else:
            assert torch.equal(v, trained.state_dict()[k]), k


def test_strict_loads_take_what_the_models_load_hooks_accept(tmp_path):
    """LatentQuantize's fixed values left the state dict; runs saved with them (fastvq eval,
    tokenize) still load strictly, and a key no module takes is still refused."""
    from fastvq.models import build_tokenizer

    cfg = dict(arch="rotated_vqvae", ch=4, ch_mult=[1, 2], num_res_blocks=1, z_channels=8,
               attn_heads=2, quantizer={"type": "LatentQuantize", "levels": [5, 4],
                                        "optimize_values": False})  # fmt: skip
    torch.manual_seed(0)
    state = build_tokenizer(cfg).state_dict()
    state.update({"quantizer._values_0": torch.zeros(5), "quantizer._values_1": torch.zeros(4)})
    torch.save(state, tmp_path / "older.pt")
    model = build_tokenizer(cfg)
    ckpt.load_weights(model, tmp_path / "older.pt")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    torch.save({**state, "quantizer.other": torch.zeros(1)}, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match=r"holds others, e.g. \['quantizer.other'\]"):
        ckpt.load_weights(build_tokenizer(cfg), tmp_path / "extra.pt")


def test_flipped_bytes_fail_the_crc_check(tmp_path):
    """torch.load does not check the archive's CRCs: flipped bytes in a tensor's data loaded as
    changed weights, without a word."""
    path = tmp_path / "latest.pt"
    w = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    ckpt.save_atomic({"step": 1, "w": w}, path)
    assert torch.equal(ckpt.load(path)["w"], w)
    data = bytearray(path.read_bytes())
    start = data.find(w[:4].numpy().tobytes())  # the tensor's bytes, stored uncompressed
    assert start > 0
    data[start + 100 : start + 300] = bytes(b ^ 0xFF for b in data[start + 100 : start + 300])
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="latest.pt' is corrupt: its entry .*/data/.* fails"):
        ckpt.load(path)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_checkpoints_get_the_umask_mode(tmp_path, umask):
    """mkstemp makes the file 0600: other users could not evaluate a shared run's checkpoint."""
    old = os.umask(umask)
    try:
        path = ckpt.save_atomic({"step": 1}, tmp_path / "latest.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_killed_process_mid_save_leaves_latest_loadable(tmp_path):
    """A real crash: the writing process exits abruptly (no cleanup) halfway through the write."""
    path = tmp_path / "latest.pt"
    ckpt.save_atomic({"step": 1, "w": torch.ones(3)}, path)
    script = textwrap.dedent(f"""
        import os, torch
        from fastvq.train import checkpoint as ckpt
        def dying_save(obj, f):
            f.write(b"x" * 1000)
            f.flush()
            os._exit(9)
        torch.save = dying_save
        ckpt.save_atomic({{"step": 2}}, {str(path)!r})
    """)
    rc = subprocess.run([sys.executable, "-c", script], timeout=120).returncode
    assert rc == 9
    assert ckpt.load(path)["step"] == 1  # a stray temp file may remain; latest is intact
    assert torch.equal(ckpt.load(path)["w"], torch.ones(3))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.load(tmp_path / "nope.pt")


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_nan_guard_stops_and_keeps_last_good_checkpoint(make_config, datasets, bad):
    # An Inf loss stops as a NaN one does, by its own name: a NaN-only check (value != value)
    # let it through to backward, and the run stopped on the NaN gradient norm it gave instead.
    trainer = Trainer(make_config("train.steps=6", "train.ckpt_every=2"), datasets=datasets)
    gen_loss = trainer.loss_fn.generator_loss

    def poisoned(x, x_hat, quant_loss, step, last_layer=None):
        total, logs = gen_loss(x, x_hat, quant_loss, step, last_layer)
        return (total * float(bad) if step >= 3 else total), logs

    trainer.loss_fn.generator_loss = poisoned
    with pytest.raises(NonFiniteLossError, match=rf"loss is {bad} at step 3.*last good checkpoint"):
        trainer.fit()
    latest = ckpt.load(trainer.ckpt_dir / "latest.pt")
    assert latest["step"] == 2 and len(latest["history"]) == 2
    assert all(v.isfinite().all() for v in latest["model"].values() if v.is_floating_point())
    # The NaN never reached the weights: the guard fires before backward.
    assert all(p.isfinite().all() for p in trainer.model.parameters())


def test_nan_guard_stops_on_non_finite_discriminator_gradients(make_config, datasets):
    # sqrt(0 * d_loss) adds 0 to the discriminator's loss and NaN to its gradients: the guard
    # stops before its optimizer steps, so its weights stay finite.
    gan = ["disc={ndf: 4, n_layers: 1}", "loss.disc_weight=0.5", "loss.disc_start=0"]
    trainer = Trainer(make_config("train.steps=4", *gan), datasets=datasets)
    d_loss = trainer.loss_fn.discriminator_loss

    def poisoned(x, recon, step, micro_batches=1):
        total, logs = d_loss(x, recon, step, micro_batches)
        return (total + (total * 0).sqrt() if step >= 1 else total), logs

    trainer.loss_fn.discriminator_loss = poisoned
    with pytest.raises(NonFiniteLossError, match=r"discriminator's gradient norm is nan at step 1"):
        trainer.fit()
    assert all(p.isfinite().all() for p in trainer.disc.parameters())


def test_nan_guard_stops_when_the_latents_blow_up(make_config, datasets):
    # The quantizer refuses NaN latents before any loss exists: the guard must still stop the
    # run, with its advice, rather than let the quantizer's ValueError through.
    trainer = Trainer(make_config("train.steps=6", "train.ckpt_every=2"), datasets=datasets)
    latents, calls = trainer.model.latents, []

    def poisoned(x):
        calls.append(None)
        z = latents(x)
        return z * float("nan") if len(calls) >= 3 else z

    trainer.model.latents = poisoned
    with pytest.raises(NonFiniteLossError, match=r"quantizer at step 2.*last good checkpoint"):
        trainer.fit()
    assert ckpt.load(trainer.ckpt_dir / "latest.pt")["step"] == 2


def test_nan_guard_can_be_disabled(make_config, datasets):
    trainer = Trainer(make_config("train.steps=1", "train.nan_guard=false"), datasets=datasets)
    assert trainer._check_finite(torch.tensor(float("inf")), {})[0] == float("inf")
    # The quantizer's own error then comes through as it is, not as the guard's stop.
    latents = trainer.model.latents
    trainer.model.latents = lambda x: latents(x) * float("nan")
    with pytest.raises(NonFiniteError, match="contains NaN or Inf"):
        trainer.fit()


def test_check_finite_returns_every_log_as_a_float(make_config, datasets):
    # Tensor logs come back in the loss's sync; a plain number is passed through as a float.
    trainer = Trainer(make_config("train.steps=1"), datasets=datasets)
    half = torch.tensor(2.5, dtype=torch.bfloat16)
    value, logs = trainer._check_finite(torch.tensor(1.5), {"a": half, "b": 3, "c": 0.25})
    assert value == 1.5 and logs == {"a": 2.5, "b": 3.0, "c": 0.25}
    assert all(type(v) is float for v in logs.values())


def test_overfit_one_batch(make_config, datasets):
    trainer = Trainer(
        make_config("train.overfit_one_batch=true", "train.steps=40", "optim.lr=1e-2"),
        datasets=datasets,
    )
    result = trainer.fit()
    assert trainer.items == 8  # one batch drawn, reused for every step
    first, last = result["history"][0], result["history"][-1]
    assert last < 0.3 * first, result["history"]


def test_resume_at_a_logged_step_restores_generators_and_keeps_its_log_row(
    make_config, datasets, tmp_path
):
    """Killed after step 2's checkpoint, which step 2 also logged: the resumed run starts with
    every generator as the checkpoint saved it, and log.csv keeps step 2's row (it is not trained
    again, so it would never be written again)."""
    import random

    import numpy as np

    cfg = make_config("train.steps=4", "train.ckpt_every=2", "train.log_every=2")
    first = Trainer(cfg, datasets=datasets)
    step = first.train_step

    def dies_at_step_3(batches):
        if first.step == 3:
            raise Killed
        return step(batches)

    first.train_step = dies_at_step_3
    with pytest.raises(Killed):
        first.fit()
    saved = ckpt.load(first.ckpt_dir / "latest.pt")
    assert saved["step"] == 2
    random.seed(1)
    np.random.seed(1)
    resumed = Trainer(cfg, datasets=datasets)
    rng = saved["rng"][0]
    assert resumed.step == 2
    assert torch.equal(torch.get_rng_state(), rng["torch"])
    assert random.getstate() == rng["python"]
    assert np.array_equal(np.random.get_state()[1], rng["numpy"][1])
    resumed.fit()
    rows = list(csv.DictReader(open(resumed.out_dir / "log.csv")))
    assert [r["step"] for r in rows if r["loss"]] == ["2", "4"]


def test_the_same_command_again_resumes_a_finished_run_at_its_end(make_config, datasets):
    """Rerunning a finished run's command (the same train.steps) trains no step and evaluates
    the saved weights; only fewer steps than the checkpoint holds are refused."""
    first = Trainer(make_config("train.steps=2"), datasets=datasets)
    want = first.fit()
    again = Trainer(make_config("train.steps=2"), datasets=datasets)
    assert again.step == 2
    got = again.fit()
    assert again.step == 2 and got["history"] == want["history"]
    with pytest.raises(ValueError, match="train.steps=1, but .* is at step 2"):
        Trainer(make_config("train.steps=1"), datasets=datasets)


def test_resume_with_more_steps_and_another_lr_follows_the_new_config(make_config, datasets):
    """A finished run started again with more steps (and here a new optim.lr) trains on with the
    new schedule from its first resumed step: not the old schedule's last rate (0 at the end of
    its cosine), nor the checkpoint's base rate. Moments and step counts come from the
    checkpoint."""
    Trainer(make_config("train.steps=2"), datasets=datasets).fit()
    resumed = Trainer(make_config("train.steps=4", "optim.lr=1e-3"), datasets=datasets)
    assert resumed.step == 2 and resumed.opt.state  # Adam moments restored
    lrs = []
    step = resumed.train_step

    def recorded(batches):
        logs = step(batches)
        lrs.append(logs["lr"])
        return logs

    resumed.train_step = recorded
    resumed.fit()
    assert lrs == pytest.approx([1e-3 * lr_factor(s, 4, 0, "cosine", 0.0) for s in (2, 3)])


def test_resume_takes_the_optimizer_settings_of_the_new_config(make_config, datasets):
    """betas and weight decay come from the resumed run's config like the learning rate, and
    the schedule's last rate is the one the optimizer holds (not the checkpoint's)."""
    Trainer(make_config("train.steps=2"), datasets=datasets).fit()
    resumed = Trainer(
        make_config("train.steps=4", "optim.betas=[0.5, 0.9]", "optim.weight_decay=0.25"),
        datasets=datasets,
    )
    assert resumed.step == 2 and resumed.opt.state
    groups = resumed.opt.param_groups
    assert [g["betas"] for g in groups] == [(0.5, 0.9)] * 2
    assert [g["weight_decay"] for g in groups] == [0.25, 0.0]  # the no-decay group stays 0
    assert resumed.sched.get_last_lr() == [g["lr"] for g in groups]
    assert groups[0]["lr"] == pytest.approx(3e-3 * lr_factor(2, 4, 0, "cosine", 0.0))


def test_resume_can_turn_amsgrad_on(make_config, datasets):
    # The checkpoint's AdamW state has no running maximum of the second moments: seeded from
    # them, else the first resumed step raised KeyError 'max_exp_avg_sq'.
    Trainer(make_config("train.steps=2"), datasets=datasets).fit()
    resumed = Trainer(make_config("train.steps=3", "optim.amsgrad=true"), datasets=datasets)
    assert all(g["amsgrad"] for g in resumed.opt.param_groups) and resumed.opt.state
    for st in resumed.opt.state.values():  # the running maximum starts at the moments so far
        assert torch.equal(st["max_exp_avg_sq"], st["exp_avg_sq"])
    resumed.fit()
    assert resumed.step == 3


def test_resume_with_another_model_names_the_change(make_config, datasets):
    Trainer(make_config("train.steps=1"), datasets=datasets).fit()
    other = "model.quantizer={type: VectorQuantize, codebook_size: 8, decay: 0.8}"
    with pytest.raises(ValueError, match=r"model.quantizer.codebook_size 16 -> 8.*train.out_dir"):
        Trainer(make_config("train.steps=2", other), datasets=datasets)
    with pytest.raises(ValueError, match=r"disc.ndf None -> 4"):
        Trainer(
            make_config("train.steps=2", "disc={ndf: 4, n_layers: 1}", "loss.disc_weight=0.5"),
            datasets=datasets,
        )


def test_resume_with_another_model_whose_weights_fit_warns(make_config, datasets):
    # FSQ levels reordered: no weight changes shape, so the run resumed without a word, and
    # its saved config then claimed the whole run used the new levels.
    fsq = "model.quantizer={type: FSQ, levels: [%s]}"
    Trainer(make_config("train.steps=1", fsq % "8, 5, 5"), datasets=datasets).fit()
    with pytest.warns(UserWarning, match=r"model.quantizer.levels \[8, 5, 5\] -> \[5, 5, 8\]"):
        Trainer(make_config("train.steps=2", fsq % "5, 5, 8"), datasets=datasets)


def test_resume_with_other_data_or_seed_warns(make_config, datasets):
    # A new train.seed re-seeded the data stream while the generators came from the checkpoint:
    # its data order matched neither run, without a word. Logging settings and optim stay quiet.
    import warnings

    Trainer(make_config("train.steps=1"), datasets=datasets).fit()
    changes = ("train.seed=3", "data.flip=false", "loss.recon_weight=0.5")
    match = (
        r"\(data.flip True -> False, loss.recon_weight 1.0 -> 0.5, train.seed 0 -> 3\); training"
    )
    with pytest.warns(UserWarning, match=match):
        Trainer(make_config("train.steps=2", *changes), datasets=datasets)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = ("train.steps=2", "train.log_every=1", "optim.lr=1e-3", "meta.fd_eps=0.5")
        Trainer(make_config(*quiet), datasets=datasets)  # (meta is off: its settings unused)


def test_checkpoints_leave_lpips_out(make_config, datasets, tmp_path):
    """LPIPS's frozen weights come from loss.lpips's files: a checkpoint holds the discriminator
    and LeCAM state of the loss module but none of LPIPS's 14.7 M weights, and resuming (here
    with the perceptual term switched on) keeps the weights the files hold."""
    from fastvq.models.lpips import LPIPS

    torch.manual_seed(0)
    files = {"backbone": tmp_path / "vgg.pth", "head": tmp_path / "lin.pth"}
    want = LPIPS().state_dict()  # random weights under both files' key names
    for path in files.values():
        torch.save(want, path)
    lpips = f"loss.lpips={{backbone: {files['backbone']}, head: {files['head']}}}"
    gan = ["disc={ndf: 4, n_layers: 1}", "loss.disc_weight=0.5", "loss.lecam_weight=0.1"]
    first = Trainer(make_config("train.steps=1", *gan), datasets=datasets)
    first.fit()
    saved = ckpt.load(first.out_dir / "checkpoints" / "latest.pt")["loss"]
    assert saved and not any(k.startswith("lpips.") for k in saved)
    resumed = Trainer(
        make_config("train.steps=2", *gan, "loss.perceptual_weight=0.5", lpips), datasets=datasets
    )
    assert resumed.step == 1
    for k, v in resumed.loss_fn.lpips.state_dict().items():
        assert torch.equal(v, want[k]), k
    for k, v in first.loss_fn.discriminator.state_dict().items():
        assert torch.equal(v, resumed.loss_fn.discriminator.state_dict()[k]), k
    resumed.fit()
    saved = ckpt.load(resumed.out_dir / "checkpoints" / "latest.pt")["loss"]
    assert not any(k.startswith("lpips.") for k in saved)


@pytest.mark.parametrize("clip", ["1.0", "0.0"])
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_nan_guard_stops_on_non_finite_gradients_of_a_finite_loss(make_config, datasets, clip, bad):
    """sqrt(0 * sum) adds 0 to the loss and NaN to every decoder gradient; an overflow in
    backward makes one Inf (a guard that looked for NaN only, norm != norm, let it through). The
    guard stops before the optimizer steps (with or without clipping), so no NaN reaches the
    weights or the checkpoint written after that step, and the error says so rather than the
    next forward's."""
    trainer = Trainer(
        make_config("train.steps=4", "train.ckpt_every=1", f"optim.grad_clip={clip}"),
        datasets=datasets,
    )
    if bad == "nan":
        gen_loss = trainer.loss_fn.generator_loss

        def poisoned(x, x_hat, quant_loss, step, last_layer=None):
            total, logs = gen_loss(x, x_hat, quant_loss, step, last_layer)
            return (total + (x_hat.sum() * 0).sqrt() if step >= 2 else total), logs

        trainer.loss_fn.generator_loss = poisoned
    else:
        weight = trainer.model.decoder.conv_out.weight
        weight.register_hook(lambda g: torch.full_like(g, math.inf) if trainer.step >= 2 else g)
    with pytest.raises(NonFiniteLossError, match=rf"gradient norm is {bad} at step 2.*last good"):
        trainer.fit()
    latest = ckpt.load(trainer.ckpt_dir / "latest.pt")
    assert latest["step"] == 2
    assert all(v.isfinite().all() for v in latest["model"].values() if v.is_floating_point())
    assert all(p.isfinite().all() for p in trainer.model.parameters())


def test_resume_keeps_the_trained_codebook_of_a_kmeans_run(make_config, datasets):
    """init.kmeans fits the codebook before the first step only: the same command resumed (more
    steps) ran the k-means again on the trained encoder and replaced the codebook and its EMA
    statistics with a fresh fit."""
    kmeans = ("init.kmeans=true", "init.kmeans_batches=1", "init.kmeans_iters=2")
    first = Trainer(make_config("train.steps=2", *kmeans), datasets=datasets)
    first.fit()
    saved = ckpt.load(first.ckpt_dir / "latest.pt")["model"]
    resumed = Trainer(make_config("train.steps=4", *kmeans), datasets=datasets)
    assert resumed.step == 2
    state = resumed.model.state_dict()
    assert state.keys() == saved.keys()
    for k, v in saved.items():
        assert torch.equal(state[k], v), k


def test_ema_turned_on_at_resume_starts_from_the_resumed_weights(make_config, datasets):
    """A checkpoint without EMA weights (train.ema_decay=0) resumed with train.ema_decay > 0:
    the EMA copy starts from the resumed model, not from the untrained weights the model was
    built with (which evaluation would then score)."""
    Trainer(make_config("train.steps=2"), datasets=datasets).fit()
    with pytest.warns(UserWarning, match=r"train.ema_decay 0.0 -> 0.9"):
        resumed = Trainer(make_config("train.steps=4", "train.ema_decay=0.9"), datasets=datasets)
    assert resumed.step == 2
    ema = resumed.ema.state_dict()
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(ema[k], v), k

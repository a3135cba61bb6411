"""DDP on 2 CPU processes (gloo): each rank trains on its own shard, yet weights and EMA
codebooks stay identical across ranks, evaluation is all-reduced, one checkpoint is written."""

import textwrap

import torch

from fastvq.testing import torchrun_ranks

# Each worker's start: a tiny dataset, the same on every rank.
PRELUDE = textwrap.dedent("""
    import sys
    import torch
    torch.set_num_threads(1)
    from fastvq.train.config import load_config
    from fastvq.train.data import TensorImages
    from fastvq.train.trainer import Trainer

    out = sys.argv[1]
    g = torch.Generator().manual_seed(0)
    low = torch.rand(40, 3, 2, 2, generator=g)
    imgs = (torch.nn.functional.interpolate(low, size=(16, 16), mode="bilinear") * 255).byte()
    data = TensorImages(imgs[:32], 16, train=True), TensorImages(imgs[32:], 16, train=False)
    # The tiny tokenizer every worker trains on those images.
    TINY = [
        "model.arch=rotated_vqvae", "model.ch=4", "model.ch_mult=[1,2]",
        "model.num_res_blocks=1", "model.z_channels=8", "model.attn_heads=2",
        "data.resolution=16", "train.device=cpu", "train.progress=false",
    ]
""")

WORKER = PRELUDE + textwrap.dedent("""
    cfg = load_config(None, [
        *TINY, "model.quantizer={type: VectorQuantize, codebook_size: 16, decay: 0.5}",
        "train.batch_size=4", "train.steps=3", f"train.out_dir={out}/run", "eval.batch_size=4",
        "disc={ndf: 4, n_layers: 1, norm: none}", "loss.disc_weight=0.5",
    ])
    trainer = Trainer(cfg, datasets=data)
    first = next(trainer._batches())
    trainer.items = 0
    step, snapshots = trainer.train_step, []

    def train_step(batches):
        logs = step(batches)
        # The quantizer's state right after its update, before any broadcast could mask a
        # missing all-reduce.
        snapshots.append({k: v.clone() for k, v in trainer.model.quantizer.state_dict().items()})
        return logs

    trainer.train_step = train_step
    result = trainer.fit()
    q = trainer.model.quantizer
    torch.save({
        "model": trainer.model.state_dict(),
        "disc": trainer.disc.state_dict(),
        "sync": q.sync_codebook,
        "snapshots": snapshots,
        "first": first,
        "eval": result["eval"],
        "history": result["history"],
    }, f"{out}/rank{trainer.rank}.pt")
""")


def test_ddp_two_cpu_processes_keep_codebooks_in_sync(tmp_path):
    torchrun_ranks(WORKER, tmp_path, 2, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert r0["sync"] and r1["sync"]  # built after init_process_group: statistics all-reduced
    assert not torch.equal(r0["first"], r1["first"])  # each rank reads its own shard
    assert len(r0["snapshots"]) == 3
    for s0, s1 in zip(r0["snapshots"], r1["snapshots"], strict=True):
        assert s0.keys() and s0.keys() == s1.keys()
        for key, v in s0.items():
            assert torch.equal(v, s1[key]), key  # codebook and its EMA statistics, every step
    for key, v in r0["model"].items():
        assert torch.equal(v, r1["model"][key]), key  # BatchNorm statistics too, after fit
    for key, v in r0["disc"].items():
        assert torch.equal(v, r1["disc"][key]), key
    assert r0["eval"] == r1["eval"] and r0["eval"]["images"] == 8  # all-reduced over 2 shards
    assert r0["history"] == r1["history"]  # the logged loss is the mean over ranks
    ckpts = list((tmp_path / "run" / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["latest.pt"]
    assert len(torch.load(ckpts[0], weights_only=False)["rng"]) == 2  # every rank's generators


# The script starts the group itself (after importing the trainer, as its docstring asks).
OWN_GROUP_WORKER = PRELUDE + textwrap.dedent("""
    torch.distributed.init_process_group("gloo")
    cfg = load_config(None, [
        *TINY, "model.quantizer={type: VectorQuantize, codebook_size: 16}", "train.steps=1",
        "train.batch_size=4", f"train.out_dir={out}/run", "eval.max_batches=1",
    ])
    Trainer(cfg, datasets=data).fit()
""")


def test_ddp_in_a_group_the_script_started(tmp_path):
    """The harness's thread check: DDP's constructor did not pin the script's group."""
    torchrun_ranks(OWN_GROUP_WORKER, tmp_path, 2, str(tmp_path))


RESUME_WORKER = PRELUDE + textwrap.dedent("""

    def cfg(run, steps):
        return load_config(None, [
            *TINY, "model.quantizer={type: VectorQuantize, codebook_size: 16, decay: 0.5}",
            "train.batch_size=2", f"train.steps={steps}", f"train.out_dir={out}/{run}",
            "eval.batch_size=4", "eval.max_batches=1", "train.ckpt_every=2",
            "optim.schedule=constant", "train.overfit_one_batch=true",
            "disc={ndf: 4, n_layers: 1, norm: none}", "loss.disc_weight=0.5",
            "loss.disc_start=0", "loss.lecam_weight=0.5",
        ])

    straight = Trainer(cfg("straight", 4), datasets=data)
    history = straight.fit()["history"]
    Trainer(cfg("resumed", 2), datasets=data).fit()
    resumed = Trainer(cfg("resumed", 4), datasets=data)
    batch = resumed.fixed_batch.clone()
    torch.save({
        "history": (history, resumed.fit()["history"]),
        "batch": (straight.fixed_batch, batch),
        "lecam": (straight.loss_fn.ema_real, straight.loss_fn.ema_fake),
    }, f"{out}/rank{resumed.rank}.pt")
""")


def test_ddp_resume_keeps_every_rank_state(tmp_path):
    # A checkpoint held rank 0's overfit_one_batch batch, which every rank then resumed with,
    # and LeCAM's averages of rank 0's logits only (each rank's drifted apart).
    torchrun_ranks(RESUME_WORKER, tmp_path, 2, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    for r in (r0, r1):
        assert torch.equal(*r["batch"])  # its own batch again
        straight, resumed = r["history"]
        assert straight == resumed  # bit for bit
    assert not torch.equal(r0["batch"][0], r1["batch"][0])
    assert r0["lecam"] == r1["lecam"] and r0["lecam"][0] != 0


COUNTS_WORKER = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    from fastvq.train.metrics import CodeCounts

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    codes = CodeCounts((2**36, 8), "cpu")
    if rank == 0:  # rank 1 counted nothing: its share is zeros
        codes.update(torch.tensor([[[[5, 1], [2**36 - 1, 1]]], [[[5, 7], [-1, 0]]]]))
    codes.all_reduce()
    torch.save(codes.counts, f"{sys.argv[1]}/rank{rank}.pt")
""")


def test_sparse_code_counts_all_reduce_over_two_processes(tmp_path):
    """Counts of a 2**36-code codebook are sparse, which NCCL cannot all-reduce: gathered."""
    torchrun_ranks(COUNTS_WORKER, tmp_path, 2, str(tmp_path), timeout=120)
    for rank in range(2):
        counts = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert counts.is_sparse and counts.shape == (2, 2**36)
        assert counts.indices().tolist() == [[0, 0, 1, 1, 1], [5, 2**36 - 1, 0, 1, 7]]
        assert counts.values().tolist() == [2, 1, 1, 2, 1]


UNUSED_WORKER = PRELUDE + textwrap.dedent("""
    def cfg(run, unused):
        return load_config(None, [
            *TINY, "model.quantizer={type: LatentQuantize, levels: [4, 4], dim: 8, "
            "quantization_loss_weight: 0}",
            "train.batch_size=2", "train.steps=2", f"train.out_dir={out}/{run}",
            "eval.max_batches=1",
            f"train.find_unused_parameters={unused}",
        ])

    try:
        Trainer(cfg("auto", "null"), datasets=data).fit()
        raise AssertionError("DDP did not fail")
    except RuntimeError as e:
        assert "set train.find_unused_parameters=true" in str(e), e
    trainer = Trainer(cfg("set", "true"), datasets=data)
    trainer.fit()
    assert trainer.step == 2
""")


def test_ddp_parameters_left_without_gradient(tmp_path):
    """LatentQuantize with quantization_loss_weight 0 leaves its values untrained: DDP's next
    step fails, with a message naming the setting that fixes it, and runs with the setting."""
    torchrun_ranks(UNUSED_WORKER, tmp_path, 2, str(tmp_path))


ACCUM_WORKER = PRELUDE + textwrap.dedent("""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def run(accum):
        cfg = load_config(None, [
            *TINY, "model.quantizer={type: VectorQuantize, codebook_size: 16, decay: 0.5}",
            "train.batch_size=2", "train.steps=2", f"train.out_dir={out}/accum{accum}",
            "eval.max_batches=1",
            f"optim.accum_steps={accum}",
        ])
        trainer = Trainer(cfg, datasets=data)
        calls = []

        def counted(state, bucket):
            calls.append(None)
            return allreduce_hook(state, bucket)

        trainer.ddp.register_comm_hook(None, counted)
        trainer.fit()
        return len(calls), trainer.model.state_dict()

    (plain, _), (accum, model) = run(1), run(3)
    rank = torch.distributed.get_rank()
    torch.save({"calls": (plain, accum), "model": model}, f"{out}/rank{rank}.pt")
""")


def test_ddp_accumulation_all_reduces_once_per_step(tmp_path):
    """Gradient accumulation under DDP: one all-reduce of the gradients per optimizer step (in
    the last micro-batch's backward), not one per micro-batch; the ranks stay identical."""
    torchrun_ranks(ACCUM_WORKER, tmp_path, 2, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    plain, accum = r0["calls"]
    assert plain > 0 and accum == plain
    for key, v in r0["model"].items():
        assert torch.equal(v, r1["model"][key]), key


SHARDS_WORKER = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    from fastvq.train.losses import adaptive_disc_weight
    from fastvq.train.meta import hypergradient

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(0)  # the same parameters and batch on both ranks
    x, y = torch.randn(2, 8, 5, 3, generator=g, dtype=torch.float64)
    w = torch.randn(3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    psi = torch.randn(3, 3, generator=g, dtype=torch.float64, requires_grad=True)

    def losses(rows):
        out = torch.tanh(x[rows] @ w) @ psi
        return (out - y[rows]).square().mean(), out.sin().mean()

    whole, shard = slice(None), slice(4 * rank, 4 * rank + 4)
    result = {}
    for name, rows, synced in (("whole", whole, False), ("shards", shard, True)):
        nll, gan = losses(rows)
        weight = adaptive_disc_weight(nll, gan, w, all_reduce=synced)
        (hyper,), _ = hypergradient(
            [w], [psi], lambda: losses(rows)[0], inner_lr=0.5, fd_eps=1e-3, all_reduce=synced
        )
        result[name] = (weight, hyper)
    torch.save(result, f"{sys.argv[1]}/rank{rank}.pt")
""")


def test_adaptive_weight_and_hypergradient_of_the_whole_batch(tmp_path):
    """Each rank took its own shard's gradient norms for the adaptive GAN weight (85.0 and 62.8
    where the batch gives 90.4) and unrolled MQVAE's inner step on its shard alone: with
    all_reduce both are the whole batch's, on every rank."""
    torchrun_ranks(SHARDS_WORKER, tmp_path, 2, str(tmp_path), timeout=120)
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        for got, want in zip(r["shards"], r["whole"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
        assert r["whole"][1].abs().max() > 0


WIRING_WORKER = PRELUDE + textwrap.dedent("""
    import fastvq.train.losses as losses
    import fastvq.train.meta as meta

    seen = {"adaptive": [], "hyper": []}
    adaptive, hyper = losses.adaptive_disc_weight, meta.hypergradient

    def spy_adaptive(*args, **kwargs):
        seen["adaptive"].append(kwargs.get("all_reduce"))
        return adaptive(*args, **kwargs)

    def spy_hyper(*args, **kwargs):
        seen["hyper"].append(kwargs.get("all_reduce"))
        return hyper(*args, **kwargs)

    losses.adaptive_disc_weight, meta.hypergradient = spy_adaptive, spy_hyper
    cfg = load_config(None, [
        *TINY, "model.embed_dim=4", "loss.recon=l2",
        "model.quantizer={type: HyperCodebook, codebook_size: 16, codebook_dim: 4, embed_dim: 4,"
        " hidden_dim: 8}",
        "meta={enabled: true, inner_lr: 0.1, codebook_every: 1, fd_eps: 0.01}",
        "disc={ndf: 4, n_layers: 1, norm: none}", "loss.disc_weight=0.5", "loss.disc_start=0",
        "train.batch_size=4", "train.steps=2", f"train.out_dir={out}/run", "train.eval_every=0",
        "eval.batch_size=4", "eval.max_batches=1",
    ])
    trainer = Trainer(cfg, datasets=data)
    trainer.fit()
    upper = [p.detach().clone() for p in trainer.model.quantizer.parameters()]
    torch.save({"seen": seen, "upper": upper}, f"{out}/rank{trainer.rank}.pt")
""")


def test_ddp_takes_the_adaptive_weight_and_the_hypergradient_over_every_rank(tmp_path):
    """The trainer hands all_reduce to both under DDP (their whole-batch results are tested
    above): the ranks' hyper-nets stay equal."""
    torchrun_ranks(WIRING_WORKER, tmp_path, 2, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    for r in (r0, r1):
        assert r["seen"]["adaptive"] and set(r["seen"]["adaptive"]) == {True}, r["seen"]
        assert r["seen"]["hyper"] and set(r["seen"]["hyper"]) == {True}, r["seen"]
    assert all(torch.equal(a, b) for a, b in zip(r0["upper"], r1["upper"], strict=True))

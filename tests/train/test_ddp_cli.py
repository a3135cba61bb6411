"""`fastvq train` as torchrun runs it (2 CPU processes, gloo): k-means init reads each rank's own
shard, a limited evaluation (eval.max_batches) evaluates the images one process would, the
process group is closed before exit; and evaluation sums (rFID's included) merge when a rank
evaluated nothing.

The last test runs this file as a script, which forks its two ranks (see
fastvq.testing.run_rank_script)."""

import json
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import torch
import torch.distributed as dist

from fastvq.testing import checkout_env, run_rank_script, torchrun_ranks
from fastvq.train.cli import main
from fastvq.train.metrics import Evaluator

B, KMEANS_BATCHES = 2, 2

# Runs `fastvq train` through cli.main, recording which images each rank's k-means init encodes.
WORKER = textwrap.dedent("""
    import os
    import sys
    import torch
    torch.set_num_threads(1)
    import torch.distributed as dist
    from fastvq.models.tokenizer import Tokenizer
    from fastvq.train import trainer as tr
    from fastvq.train.cli import main

    out, args = sys.argv[1], sys.argv[2:]
    seen = []
    kmeans_init, latents = tr.Trainer.kmeans_init, Tokenizer.latents

    def recorded_kmeans_init(self):
        def record(model, x):
            seen.append(x.clone())
            return latents(model, x)

        Tokenizer.latents = record
        try:
            kmeans_init(self)
        finally:
            Tokenizer.latents = latents

    tr.Trainer.kmeans_init = recorded_kmeans_init
    assert main(args) == 0
    rank = os.environ["RANK"]
    torch.save({"seen": seen, "initialized": dist.is_initialized()}, f"{out}/rank{rank}.pt")
""")


class Features(torch.nn.Module):
    """A stand-in rFID feature extractor (eval.fid_features takes a TorchScript file)."""

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)


def _cifar(root, n_train: int, n_test: int) -> None:
    g = np.random.default_rng(0)
    root.mkdir()
    for name, n in (("data_batch_1", n_train), ("test_batch", n_test)):
        low = torch.from_numpy(g.random((n, 3, 2, 2), dtype=np.float32))
        img = torch.nn.functional.interpolate(low, size=(32, 32), mode="bilinear")
        data = (img * 255).round().to(torch.uint8).reshape(n, -1).numpy()
        with open(root / name, "wb") as f:
            pickle.dump({b"data": data}, f)


def _args(tmp_path, out: str, batch: int, *overrides: str) -> list[str]:
    return [
        "train", "--config", str(tmp_path / "config.yaml"), f"train.out_dir={tmp_path / out}",
        f"train.batch_size={batch}", *overrides,
    ]  # fmt: skip


def _run(tmp_path, out: str, batch: int, world: int, *overrides: str) -> list[dict]:
    torchrun_ranks(
        WORKER, tmp_path, world, str(tmp_path / out), *_args(tmp_path, out, batch, *overrides)
    )
    return [torch.load(tmp_path / out / f"rank{r}.pt") for r in range(world)]


MODEL = (
    "{arch: rotated_vqvae, ch: 4, ch_mult: [1, 2], num_res_blocks: 1, z_channels: 8, "
    "attn_heads: 2, quantizer: {type: VectorQuantize, codebook_size: 16, decay: 0.8}}"
)


def test_torchrun_train_matches_one_process_in_kmeans_data_and_eval(tmp_path):
    _cifar(tmp_path / "cifar", 16, 9)
    torch.jit.script(Features()).save(str(tmp_path / "features.pt"))
    (tmp_path / "config.yaml").write_text(f"""
model: {MODEL}
data: {{kind: cifar10, path: {tmp_path / "cifar"}, resolution: 16}}
train: {{steps: 2, device: cpu, progress: false}}
init: {{kmeans: true, kmeans_batches: {KMEANS_BATCHES}, kmeans_iters: 2}}
eval: {{batch_size: 3, max_batches: 2, fid_features: {tmp_path / "features.pt"}}}
""")
    ranks = _run(tmp_path, "ddp", B, world=2)
    (single,) = _run(tmp_path, "single", 2 * B, world=1)

    # The group is closed before exit (left to interpreter exit, gloo could abort the process).
    assert not any(r["initialized"] for r in ranks)
    # Each rank's k-means encodes its own shard: together the images of one process at 2B.
    seen = [torch.cat(r["seen"]) for r in (*ranks, single)]
    assert len(seen[0]) == len(seen[1]) == B * KMEANS_BATCHES
    assert not (seen[0][:, None] == seen[1][None]).flatten(2).all(-1).any()
    union = torch.cat(seen[:2]).flatten(1)
    assert torch.equal(union.unique(dim=0), seen[2].flatten(1).unique(dim=0))

    # The 2-rank run's final evaluation covers the first 2 x 3 images, as one process evaluating
    # its checkpoint does (train.ema_decay = 0: the evaluated weights are the checkpoint's).
    trained = json.loads((tmp_path / "ddp" / "eval.json").read_text())
    ckpt = tmp_path / "ddp" / "checkpoints" / "latest.pt"
    env = checkout_env(OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "fastvq", "eval", "--checkpoint", str(ckpt), "--out",
           str(tmp_path / "eval1")]  # fmt: skip
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=240)
    alone = json.loads((tmp_path / "eval1" / "eval.json").read_text())
    assert trained["images"] == alone["images"] == 6
    for key in ("mse", "psnr", "ssim", "usage", "perplexity", "rfid"):
        assert abs(trained[key] - alone[key]) <= 1e-6 * (1 + abs(alone[key])), key


def test_torchrun_train_with_quantize_dropout_of_learnable_codebooks(tmp_path):
    # Layers that quantize dropout skips give their codebook parameters no gradient; DDP fails
    # at its next step unless told to look for unused parameters.
    _cifar(tmp_path / "cifar", 8, 2)
    quantizer = (
        "{type: ResidualVQ, num_quantizers: 3, codebook_size: 8, quantize_dropout: true, "
        "learnable_codebook: true, ema_update: false}"
    )
    (tmp_path / "config.yaml").write_text(f"""
model: {MODEL}
data: {{kind: cifar10, path: {tmp_path / "cifar"}, resolution: 16}}
train: {{steps: 4, device: cpu, progress: false}}
""")
    _run(tmp_path, "ddp", 2, 2, f"model.quantizer={quantizer}")
    ckpt = torch.load(tmp_path / "ddp" / "checkpoints" / "latest.pt", weights_only=False)
    assert ckpt["step"] == 4


# `fastvq ARGS` through cli.main, which leaves the process group it started.
CLI = textwrap.dedent("""
    import sys
    import torch.distributed
    from fastvq.train.cli import main
    assert main(sys.argv[1:]) == 0
    assert not torch.distributed.is_initialized()
""")


def test_torchrun_tokenize_writes_the_file_one_process_writes(tmp_path):
    # 9 test images over 2 ranks in batches of 2: shards of 5 and 4 rows, interleaved.
    _cifar(tmp_path / "cifar", 8, 9)
    (tmp_path / "config.yaml").write_text(f"""
model: {MODEL}
data: {{kind: cifar10, path: {tmp_path / "cifar"}, resolution: 16}}
train: {{steps: 1, device: cpu, progress: false, ema_decay: 0.5}}
eval: {{batch_size: 2}}
""")
    assert main(_args(tmp_path, "run", 4)) == 0
    ckpt = str(tmp_path / "run" / "checkpoints" / "latest.pt")
    tokenize = ["tokenize", "--checkpoint", ckpt, "--split", "val", "--out"]
    torchrun_ranks(CLI, tmp_path, 2, *tokenize, str(tmp_path / "ddp"))
    assert main([*tokenize, str(tmp_path / "one")]) == 0
    ddp, one = (np.load(tmp_path / d / "tokens-val.npy") for d in ("ddp", "one"))
    assert ddp.shape == (9, 4, 4) and np.array_equal(ddp, one)
    info = [json.loads((tmp_path / d / "tokens-val.json").read_text()) for d in ("ddp", "one")]
    assert info[0] == info[1]


def test_torchrun_demo_leaves_its_process_group(tmp_path):
    # `fastvq demo` returned before main's teardown: its group was left to interpreter exit.
    demo = ["demo", "--quiet", "train.steps=1", "train.batch_size=4", "model.ch=8"]
    torchrun_ranks(CLI, tmp_path, 2, *demo, "eval.max_batches=1", f"train.out_dir={tmp_path}")


# A quantizer that does not sync its statistics: each rank's k-means clusters its own shard.
UNSYNCED = textwrap.dedent("""
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
    cfg = load_config(None, [
        "model.arch=rotated_vqvae", "model.ch=4", "model.ch_mult=[1,2]",
        "model.num_res_blocks=1", "model.z_channels=8", "model.attn_heads=2",
        "model.quantizer={type: VectorQuantize, codebook_size: 8, sync_codebook: false}",
        "data.resolution=16", "train.batch_size=4", "train.steps=0", "train.device=cpu",
        "train.progress=false", f"train.out_dir={out}/run", "train.ema_decay=0.9",
        "init.kmeans=true", "init.kmeans_batches=2", "init.kmeans_iters=2",
    ])
    trainer = Trainer(cfg, datasets=data)
    torch.save({
        "model": trainer.model.quantizer.state_dict(),
        "ema": trainer.ema.quantizer.state_dict(),
    }, f"{out}/rank{trainer.rank}.pt")
""")


def test_kmeans_init_of_an_unsynced_quantizer_gives_every_rank_rank_0s_codebook(tmp_path):
    # DDP broadcasts the model's state at its start, but not the weights' EMA copy: without the
    # trainer's broadcast each rank's EMA copy (what evaluation uses) held its own shard's fit.
    torchrun_ranks(UNSYNCED, tmp_path, 2, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["model"].keys() == r0["ema"].keys() and "embed" in r0["model"]
    for k, v in r0["model"].items():
        assert torch.equal(v, r1["model"][k]), k
        assert torch.equal(v, r0["ema"][k]) and torch.equal(v, r1["ema"][k]), k


def _images(size=12):
    g = torch.Generator().manual_seed(0)
    x, recon = torch.rand(2, 3, 3, size, size, generator=g) * 2 - 1
    return x, recon


def _features(x):
    return x.flatten(1)[:, :4]


def _worker(rank: int, out_dir: str, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        ev = Evaluator(None, torch.device("cpu"), _features)
        if rank == 0:  # rank 1's evaluation shard is empty (more ranks than images)
            ev.update(*_images(), None)
        ev.all_reduce()
        # SSIM needs 11 pixels a side: rank 1's 8-pixel images leave it undefined for the whole set.
        small = Evaluator(None, torch.device("cpu"))
        small.update(*_images(12 if rank == 0 else 8), None)
        small.all_reduce()
        torch.save((ev.result(), small.result()), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_eval_metrics_merge_across_ranks(tmp_path):
    ranks = run_rank_script(__file__, tmp_path, 2)
    one = Evaluator(None, torch.device("cpu"), _features)
    one.update(*_images(), None)
    want = one.result()
    assert want["images"] == 3 and "rfid" in want
    assert [r[0] for r in ranks] == [want, want]
    for merged in (r[1] for r in ranks):
        assert merged["images"] == 6 and merged["ssim"] is None and merged["psnr"] > 0


if __name__ == "__main__":
    torch.multiprocessing.start_processes(
        _worker, args=(sys.argv[1], int(sys.argv[2])), nprocs=2, start_method="fork"
    )

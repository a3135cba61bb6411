"""Configs: overrides and their errors, `base:` files, and every recipe in configs/ loading and
building its tokenizer (at reduced size), with the seed papers' settings checked."""

from pathlib import Path

import pytest
import torch

from fastvq.models.tokenizer import build_quantizer
from fastvq.train.config import load_config, parse_value

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPES = sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name != "collapse_sweep.yaml")


def test_overrides_parse_as_yaml(tmp_path):
    overrides = ["optim.lr=1e-4", "optim.betas=[0.5, 0.9]", "loss.lpips=null",
                 "train.bf16=true", "model.quantizer={type: FSQ, levels: [8, 5]}"]  # fmt: skip
    cfg = load_config(None, overrides)
    assert cfg["optim"]["lr"] == 1e-4 and cfg["optim"]["betas"] == [0.5, 0.9]
    assert cfg["loss"]["lpips"] is None and cfg["train"]["bf16"] is True
    assert cfg["model"]["quantizer"] == {"type": "FSQ", "levels": [8, 5]}
    assert parse_value("3e-4") == 3e-4  # YAML 1.1 would read this as a string
    lr = load_config(None, ["optim.lr=1"])["optim"]["lr"]
    assert lr == 1.0 and isinstance(lr, float)  # ints widen to floats
    (tmp_path / "base.yaml").write_text("optim: {lr: 1e-3, weight_decay: 0.1}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\noptim: {lr: 5e-4}\n")
    cfg = load_config(tmp_path / "child.yaml", ["optim.weight_decay=0.2"])
    assert cfg["optim"]["lr"] == 5e-4 and cfg["optim"]["weight_decay"] == 0.2
    # A base that is no file beside it is a shipped recipe (it was "does not exist"); a
    # demo.yaml beside it comes first.
    (tmp_path / "mine.yaml").write_text("base: demo\ntrain: {steps: 7}\n")
    cfg, demo = load_config(tmp_path / "mine.yaml"), load_config("demo")
    assert cfg["train"]["steps"] == 7 and cfg["model"] == demo["model"]
    (tmp_path / "demo.yaml").write_text("train: {batch_size: 3}\n")
    assert load_config(tmp_path / "mine.yaml")["train"]["batch_size"] == 3


@pytest.mark.parametrize(
    "override,err,match",
    [
        ("optim.lrr=1e-3", ValueError, "unknown config key optim.lrr"),
        ("trian.steps=3", ValueError, "unknown config section 'trian'"),
        ("train.steps=ten", ValueError, "train.steps must be int"),
        ("train.steps=-1", ValueError, "train.steps must be >= 0"),
        ("train.log_every=0", ValueError, "train.log_every must be >= 1"),
        ("eval.num_images=0", ValueError, "eval.num_images must be >= 1"),
        ("train.bf16=1", ValueError, "train.bf16 must be bool"),
        ("loss.recon=l3", ValueError, "loss.recon must be one of"),
        ("optim.betas=[0.9]", ValueError, "optim.betas"),
        ("data.kind=folder", ValueError, "data.path must be a directory"),
        ("train.steps", ValueError, "section.key=value"),
        ("train..steps=1", ValueError, "bad key"),
        ("optim.lr.x=1", ValueError, "optim.lr must be float"),
        ("train.ema_decay=1.0", ValueError, r"train.ema_decay must be in \[0, 1\)"),
        ("optim.accum_steps=0", ValueError, "optim.accum_steps must be >= 1"),
        ("data.val_fraction=1.0", ValueError, r"data.val_fraction must be in \(0, 1\)"),
        ("data.val_fraction=0", ValueError, r"data.val_fraction must be in \(0, 1\)"),
        ("train.num_workers=some", ValueError, "train.num_workers must be int or 'auto'"),
        ("train.num_workers=-1", ValueError, "train.num_workers must be >= 0"),
        # seed * 1_000_003 overflowed 64 bits at the first batch ("Overflow when unpacking")
        ("train.seed=100000000000000", ValueError, r"train.seed must be in \[0, 2\*\*32\)"),
        ("train.seed=-1", ValueError, r"train.seed must be in \[0, 2\*\*32\)"),
        # null only where it is the default (unset); those keys take their type or null
        ("train.steps=null", ValueError, "train.steps must be int, got None"),
        ("train.out_dir=null", ValueError, "train.out_dir must be str, got None"),
        ("train.vq=null", ValueError, "train.vq must be bool, got None"),
        ("data.path=5", ValueError, "data.path must be str or null, got 5"),
        ("optim.disc_lr=abc", ValueError, "optim.disc_lr must be float or null"),
        ("loss.lpips=vgg", ValueError, "loss.lpips must be dict or null"),
        ("optim.min_lr_ratio=-1", ValueError, r"optim.min_lr_ratio must be in \[0, 1\]"),
        ("optim.min_lr_ratio=1.5", ValueError, r"optim.min_lr_ratio must be in \[0, 1\]"),
        ("optim.betas=[0.9, 1.0]", ValueError, r"optim.betas must be .* in \[0, 1\)"),
        ("optim.betas=[false, 0.9]", ValueError, "optim.betas must be a list .* of numbers"),
        ("loss.disc_weight=-1", ValueError, "loss.disc_weight must be >= 0"),
        ("loss.perceptual_weight=-1", ValueError, "loss.perceptual_weight must be >= 0"),
        ("loss.lecam_weight=-1", ValueError, "loss.lecam_weight must be >= 0"),
        ("loss.disc_start=-1", ValueError, "loss.disc_start must be >= 0"),
        ("init.kmeans_iters=-1", ValueError, "init.kmeans_iters must be >= 0"),
        ("meta.inner_lr=0", ValueError, "meta.inner_lr must be > 0"),
        ("meta.fd_eps=0", ValueError, "meta.fd_eps must be > 0"),
        ("optim.weight_decay=-1", ValueError, "optim.weight_decay must be >= 0"),
        ("optim.disc_lr=0", ValueError, "optim.disc_lr must be > 0 or null"),
        ("optim.grad_clip=-1", ValueError, "optim.grad_clip must be >= 0"),
        ("optim.betas=[a, b]", ValueError, r"optim.betas must be a list \[b1, b2\] of numbers"),
        ("optim.betas=[2, 3]", ValueError, r"optim.betas must be .* in \[0, 1\)"),
        ("loss.recon_weight=-1", ValueError, "loss.recon_weight must be >= 0"),
        ("loss.quant_weight=-1", ValueError, "loss.quant_weight must be >= 0"),
        ("train.eval_every=-2", ValueError, "train.eval_every must be >= 0"),
        ("train.ckpt_every=-1", ValueError, "train.ckpt_every must be >= 0"),
        ("eval.batch_size=0", ValueError, "eval.batch_size must be >= 1"),
        ("eval.max_batches=-1", ValueError, "eval.max_batches must be >= 0"),
        ("init.kmeans_batches=0", ValueError, "init.kmeans_batches must be >= 1"),
        ("meta.codebook_every=0", ValueError, "meta.codebook_every must be >= 1"),
        ("data.epoch_size=0", ValueError, "data.epoch_size must be >= 1"),
        ("data.path=/data", ValueError, "data.path must be null for data.kind=samples"),
        ("train.steps=[", ValueError, r"override 'train.steps=\[': value '\[' is not valid YAML"),
        # YAML 1.2: "yes" is a string; floats are finite
        ("train.bf16=yes", ValueError, "train.bf16 must be bool, got 'yes'"),
        ("train.steps=1:30", ValueError, "train.steps must be int, got '1:30'"),
        ("optim.lr=.inf", ValueError, "optim.lr must be finite, got inf"),
        ("data.scale=.nan", ValueError, "data.scale must be finite, got nan"),
    ],
)
def test_override_errors(override, err, match):
    with pytest.raises(err, match=match):
        load_config(None, [override])


def test_scalars_are_yaml_1_2_and_paths_expand_home(tmp_path, monkeypatch):
    # PyYAML's YAML 1.1 read "010" as octal 8, "1:30" as 90, "on" as True, a date as a date.
    assert [parse_value(t) for t in ("010", "0o17", "0x1F", "-3", "true", "FALSE")] == [
        10, 15, 31, -3, True, False,
    ]  # fmt: skip
    for text in ("1:30", "on", "yes", "no", "2024-01-01", "1_000"):
        assert parse_value(text) == text
    (tmp_path / "c.yaml").write_text("train: {steps: 010, out_dir: 2024-01-01}\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg["train"]["steps"] == 10 and cfg["train"]["out_dir"] == "2024-01-01"
    # A run's config.yaml reads back as written ("08" was dumped bare, and read back as 8).
    from fastvq.train.config import dump_config

    cfg = load_config(None, ["train.out_dir='08'", "data.path=null"])
    dump_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg
    for text in ("a: !!bool yes", "a: !!int 0b11"):  # explicit tags are held to YAML 1.2 too
        with pytest.raises(ValueError, match="is no (bool|int)"):
            parse_value(text)
    # "~" was expanded in data.path alone: train.out_dir=~/x made a directory named "~".
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(
        None,
        ["train.out_dir=~/run", "init.checkpoint=~/a.pt", "eval.fid_features=~/f.pt",
         "loss.lpips={backbone: ~/b.pth, head: ~/h.pth}"],
    )  # fmt: skip
    assert cfg["train"]["out_dir"] == str(tmp_path / "run")
    assert cfg["init"]["checkpoint"] == str(tmp_path / "a.pt")
    assert cfg["eval"]["fid_features"] == str(tmp_path / "f.pt")
    assert cfg["loss"]["lpips"] == {
        "backbone": str(tmp_path / "b.pth"),
        "head": str(tmp_path / "h.pth"),
    }


def test_file_errors_and_missing_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(FileNotFoundError, match="nor a shipped recipe .*rotated_vqvae"):
        load_config("rotatd_vqvae")
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ValueError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "bases.yaml").write_text("base: [list.yaml]\n")
    with pytest.raises(ValueError, match="base must be one file name"):
        load_config(tmp_path / "bases.yaml")
    from fastvq.train.data import build_datasets

    cfg = load_config(None, ["data.kind=cifar10", f"data.path={tmp_path / 'cifar'}"])
    with pytest.raises(FileNotFoundError, match="data.path .*cifar.* is not a directory"):
        build_datasets(cfg["data"])


# Reduced sizes that keep each recipe's architecture family and quantizer.
SMALL = {
    "rotated_vqvae": ["model.ch=8", "model.num_res_blocks=1", "model.z_channels=16",
                      "model.attn_heads=2"],
    "vqgan": ["model.ch=32", "model.ch_mult=[1,2]", "model.num_res_blocks=1",
              "model.attn_resolutions=[8]", "model.resolution=16"],
}  # fmt: skip


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_loads_and_builds(name):
    from fastvq.models import build_tokenizer

    data = [] if name == "demo.yaml" else ["data.path=/data"]  # the demo's bundled photographs
    cfg = load_config(CONFIGS / name, data)
    arch = cfg["model"]["arch"]
    cfg = load_config(CONFIGS / name, [*data, *SMALL[arch]])
    torch.manual_seed(0)
    tok = build_tokenizer(cfg["model"]).eval()
    res = 16
    with torch.no_grad():
        out = tok(torch.rand(1, 3, res, res) * 2 - 1)
    assert out.recon.shape == (1, 3, res, res) and out.indices is not None
    assert int(out.indices.max()) < tok.codebook_size
    assert tok.codebook_size == cfg["model"]["quantizer"].get(
        "codebook_size", {"LeechQuantize": 196_560}.get(cfg["model"]["quantizer"]["type"])
    )


def test_recipes_match_the_papers():
    rot = load_config(CONFIGS / "rotated_vqvae.yaml", ["data.path=/data"])
    assert rot["optim"]["lr"] == 2e-4 and rot["optim"]["weight_decay"] == 0.01
    assert rot["optim"]["schedule"] == "cosine" and rot["train"]["batch_size"] == 128
    q = rot["model"]["quantizer"]
    assert q["decay"] == 0.99 and q["commitment_weight"] == 0.25
    assert rot["model"]["ch_mult"] == [1, 2, 4] and rot["model"]["num_res_blocks"] == 6
    # The paper's eq. 4: one Householder reflection, not Fifty et al.'s rotation trick.
    assert build_quantizer(q, 256).grad == "householder"

    pre = load_config(CONFIGS / "collapse_pretrain.yaml", ["data.path=/data"])
    fine = load_config(CONFIGS / "collapse_finetune.yaml", ["data.path=/data"])
    assert pre["train"]["vq"] is False and fine["train"]["vq"] is True
    # van den Oord's VQ-VAE: straight-through gradient (VectorQuantize defaults to the rotation
    # trick), EMA decay 0.99, beta 0.25; Adam with amsgrad.
    q = fine["model"]["quantizer"]
    assert build_quantizer(q, 32).grad == "ste" and q["decay"] == 0.99
    assert fine["optim"]["amsgrad"] and fine["optim"]["lr"] == 3e-4
    assert fine["init"]["kmeans"] and fine["init"]["checkpoint"].endswith("latest.pt")
    import yaml

    sweep = yaml.safe_load((CONFIGS / "collapse_sweep.yaml").read_text())["sweep"]
    assert sweep["values"] == [16, 64, 256, 1024, 4096, 16384, 65536]
    assert sweep["key"] == "model.quantizer.codebook_size"

    mq = load_config(CONFIGS / "mqvae.yaml", ["data.path=/data"])
    assert mq["meta"]["enabled"] and mq["meta"]["codebook_every"] > 1
    assert mq["model"]["quantizer"]["type"] == "HyperCodebook"
    assert mq["optim"]["weight_decay"] == 0.0 and mq["optim"]["betas"] == [0.9, 0.95]
    assert mq["data"]["flip"] is False  # "No additional augmentations are used for CIFAR10"
    # psi = the hyper-net and its embedding only: the 32-d codes need no projection in the
    # quantizer (an upper-level parameter otherwise, trained only at the meta steps).
    from fastvq.models import build_tokenizer
    from fastvq.train.meta import split_parameters

    small = load_config(CONFIGS / "mqvae.yaml", ["data.path=/data", *SMALL["rotated_vqvae"]])
    tok = build_tokenizer(small["model"])
    assert not tok.quantizer.has_projections
    names = {id(p): n for n, p in tok.named_parameters()}
    _, upper = split_parameters(tok)
    assert all(names[id(p)].startswith("quantizer.codebook_generator.") for p in upper)

    gan = load_config(CONFIGS / "vqgan_65k.yaml", ["data.path=/data"])
    assert gan["model"]["quantizer"]["codebook_size"] == 65536
    assert gan["loss"]["disc_weight"] > 0 and gan["loss"]["adaptive_weight"]
    leech = load_config(CONFIGS / "leech.yaml", ["data.path=/data"])
    assert leech["model"]["quantizer"]["type"] == "LeechQuantize"
    assert leech["model"]["embed_dim"] == 24
    # The post: L1 + LPIPS + GAN, "the commitment loss is gone too".
    assert leech["model"]["quantizer"]["commitment_weight"] == 0.0
    assert leech["loss"]["recon"] == "l1" and leech["loss"]["perceptual_weight"] > 0

"""Training configs: YAML files plus dotted command-line overrides, validated against one schema.

A config is a plain nested dict with the sections of DEFAULTS. A file may name a `base:` file
(relative to itself, else a shipped recipe: `base: demo`) whose values it overrides, so a
recipe states only what differs. Overrides are "section.key=value" strings whose value is
parsed as YAML ("optim.lr=1e-4" is a float, "loss.lpips=null" is None, "optim.betas=[0.5,0.9]"
a list). Nothing is ever exec'd. Files and overrides read scalars as YAML 1.2 does: only
true / false are booleans ("yes" and "on" are strings), "010" is 10, "1:30" and "2024-01-01"
are strings. Paths may start with "~".
"""

import copy
import math
import os
import re
from importlib import resources
from pathlib import Path

import yaml

# Sections whose contents are passed as keyword arguments to a builder (build_tokenizer, the
# discriminator, LPIPS), so their keys are the builder's to validate, not ours.
FREE_FORM = {"model", "disc"}

DEFAULTS: dict = {
    "model": {},
    "loss": {
        "recon": "l1",
        "recon_weight": 1.0,
        "perceptual_weight": 0.0,
        "lpips": None,  # {backbone: path, head: path}: local weight files, never downloaded
        "disc_weight": 0.0,
        "disc_start": 0,
        "disc_loss": "hinge",
        "adaptive_weight": True,
        "lecam_weight": 0.0,
        "lecam_decay": 0.99,  # per discriminator step, whatever optim.accum_steps
        "quant_weight": 1.0,
    },
    "disc": None,  # {ndf, n_layers, norm} builds a PatchGAN discriminator
    "optim": {
        "lr": 2e-4,
        "weight_decay": 0.0,
        "betas": [0.9, 0.99],
        "amsgrad": False,  # AdamW's AMSGrad variant (the collapse study's Adam(amsgrad=True))
        "disc_lr": None,  # None: same as lr; its warmup and decay span loss.disc_start..steps
        "warmup_steps": 0,
        "schedule": "cosine",
        "min_lr_ratio": 0.0,
        "grad_clip": 1.0,  # 0 disables clipping
        "accum_steps": 1,
    },
    "train": {
        "steps": 1000,
        "batch_size": 32,  # per process and micro-batch: a step sees batch * accum * world
        "bf16": False,
        "compile": False,
        "ema_decay": 0.0,  # 0 disables the EMA copy; evaluation then uses the live weights
        "eval_every": 0,  # 0: only at the end
        "ckpt_every": 0,  # 0: only at the end
        "out_dir": "runs/fastvq",
        "seed": 0,
        "overfit_one_batch": False,
        "log_every": 10,
        "vq": True,  # False trains the autoencoder without its quantizer (collapse pretraining)
        "resume": True,  # continue from out_dir/checkpoints/latest.pt when it exists
        "device": "auto",
        # Data-loading processes: "auto" is 0 on CPU and min(8, cores per local process) on CUDA.
        "num_workers": "auto",
        "progress": True,
        "nan_guard": True,  # stop before a step on a non-finite loss or gradient norm
        # DDP's find_unused_parameters; null: only where parameters are known to go without a
        # gradient (train.vq=false, quantize dropout). Set true for a quantizer whose loss
        # weights leave some untrained (LatentQuantize with quantization_loss_weight 0).
        "find_unused_parameters": None,
    },
    "data": {
        "kind": "samples",
        "path": None,
        "resolution": 64,
        "val_fraction": 0.2,
        "scale": 1.0,  # resize images by this factor before cropping (folder, samples)
        "flip": True,
        "epoch_size": 1024,  # crops per epoch for "samples" (a few photographs, many crops)
    },
    "init": {
        "checkpoint": None,  # model weights to start from (e.g. the pretrained autoencoder)
        "kmeans": False,  # k-means the codebook on the encoder's outputs before training
        "kmeans_batches": 8,
        "kmeans_iters": 10,
    },
    "eval": {
        "batch_size": 64,
        "max_batches": 0,  # the first max_batches * batch_size images (over all ranks); 0: all
        # TorchScript file mapping (B, 3, H, W) in [0, 1] to (B, F); it resizes and normalizes
        # for its network itself (see metrics.load_feature_fn)
        "fid_features": None,
        "num_images": 16,  # reconstructions in the saved grid
    },
    "meta": {"enabled": False, "inner_lr": 1e-3, "codebook_every": 1, "fd_eps": 0.01},
}

INT_OR_AUTO = {"train.num_workers"}
# The type of the keys whose default is None (unset), when they are set.
WHEN_SET = {
    "loss.lpips": dict,
    "optim.disc_lr": float,
    "data.path": str,
    "init.checkpoint": str,
    "eval.fid_features": str,
    "train.find_unused_parameters": bool,
}
# Paths: "~" is expanded (a literal "~" directory under out_dir is a trap for `rm -rf ~`).
PATHS = {"data.path", "train.out_dir", "init.checkpoint", "eval.fid_features"}
CHOICES = {
    "loss.recon": ("l1", "l2"),
    "loss.disc_loss": ("hinge", "non_saturating"),
    "optim.schedule": ("cosine", "constant"),
    "data.kind": ("folder", "cifar10", "samples"),
}

# PyYAML follows YAML 1.1, where "1e-4" (no dot) is a string, "010" an octal 8, "1:30" the
# sexagesimal 90, "yes" / "on" booleans and "2024-01-01" a date: every config writes learning
# rates as 1e-4, so scalars are resolved with YAML 1.2's core schema instead.
_FLOAT = re.compile(
    r"^[-+]?(?:[0-9]+\.[0-9]*(?:[eE][-+]?[0-9]+)?|\.[0-9]+(?:[eE][-+]?[0-9]+)?"
    r"|[0-9]+[eE][-+]?[0-9]+|\.inf|\.Inf|\.INF|\.nan|\.NaN|\.NAN)$"
)
_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")


class _Loader(yaml.SafeLoader):
    def construct_yaml_int(self, node):
        text = self.construct_scalar(node)
        if not _INT.match(text):  # an explicit !!int 0b11 or 1_000
            raise yaml.constructor.ConstructorError(
                None, None, f"{text!r} is no int", node.start_mark
            )
        return int(text, 8 if text.startswith("0o") else 16 if text.startswith("0x") else 10)

    def construct_yaml_bool(self, node):
        text = self.construct_scalar(node)
        if not _BOOL.match(text):  # an explicit !!bool yes
            raise yaml.constructor.ConstructorError(
                None, None, f"{text!r} is no bool", node.start_mark
            )
        return text.lower() == "true"


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
_Loader.add_constructor("tag:yaml.org,2002:bool", _Loader.construct_yaml_bool)
_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag == "tag:yaml.org,2002:merge"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _tag, _rx, _first in (
    ("null", _NULL, ["~", "n", "N", ""]),
    ("bool", _BOOL, list("tTfF")),
    ("int", _INT, list("-+0123456789")),
    ("float", _FLOAT, list("-+0123456789.")),
):
    _Loader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", _rx, _first)


class _Dumper(yaml.SafeDumper):
    """Quotes the strings that _Loader would read as something else ("08", "1e-4" as a string),
    so that a run's config.yaml reads back as it was written."""


_Dumper.yaml_implicit_resolvers = _Loader.yaml_implicit_resolvers


def parse_value(text: str):
    """A command-line value parsed as YAML: '1e-4' -> 0.0001, 'null' -> None, '[1, 2]' -> list."""
    try:
        return load_yaml(text)
    except yaml.YAMLError as e:
        raise ValueError(f"value {text!r} is not valid YAML ({e.problem})") from None


def load_yaml(stream):
    """A config or sweep file's YAML, floats read as YAML 1.2 does (1e-3 is a float, where
    PyYAML's 1.1 rules make it a string), as on the command line."""
    return yaml.load(stream, Loader=_Loader)


def _read(path: Path, seen: tuple = ()) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    if path.resolve() in seen:
        raise ValueError(f"config {str(path)!r}: `base:` files form a cycle")
    with open(path) as f:
        cfg = load_yaml(f) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"config {str(path)!r} must be a YAML mapping, got {type(cfg).__name__}")
    base = cfg.pop("base", None)
    if base is None:
        return cfg
    if not isinstance(base, str):
        raise ValueError(f"config {str(path)!r}: base must be one file name, got {base!r}")
    target = path.parent / base
    if not target.is_file() and Path(base).parent == Path("."):
        # base: demo names demo.yaml beside the config, else the shipped recipe
        beside, shipped = target.with_suffix(".yaml"), _recipes() / f"{Path(base).stem}.yaml"
        target = beside if beside.is_file() else shipped if shipped.is_file() else target
    return merge(_read(target, (*seen, path.resolve())), cfg)


def merge(base: dict, update: dict) -> dict:
    """Deep copy of base with update's values; nested dicts merge, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_override(cfg: dict, override: str) -> None:
    """Set cfg[a][b] = value in place from the string "a.b=value" (value parsed as YAML)."""
    if "=" not in override:
        raise ValueError(f"override {override!r} must look like section.key=value")
    key, text = override.split("=", 1)
    parts = key.strip().split(".")
    if any(not p for p in parts):
        raise ValueError(f"override {override!r}: bad key {key!r}")
    node = cfg
    for i, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            raise ValueError(f"override {override!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = node[part]
    try:
        node[parts[-1]] = parse_value(text)
    except ValueError as e:
        raise ValueError(f"override {override!r}: {e}") from None


def _type_ok(default, value) -> bool:
    if value is None:  # only where unset is the default ("null" elsewhere is a type error)
        return default is None
    if isinstance(default, type):  # WHEN_SET's type of a key whose default is None
        default = default()
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, type(default))


def validate(cfg: dict) -> dict:
    """Fill defaults and check every key and type; ValueError names the bad key. Returns cfg."""
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise ValueError(
            f"unknown config section {sorted(unknown)[0]!r}; sections are {sorted(DEFAULTS)}"
        )
    out = {}
    for section, defaults in DEFAULTS.items():
        value = cfg.get(section, copy.deepcopy(defaults))
        if section in FREE_FORM:
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"config section {section!r} must be a mapping or null")
            out[section] = value
            continue
        if not isinstance(value, dict):
            raise ValueError(f"config section {section!r} must be a mapping, got {value!r}")
        for key in value:
            if key not in defaults:
                raise ValueError(
                    f"unknown config key {section}.{key}; {section} has: {', '.join(defaults)}"
                )
        merged = {**copy.deepcopy(defaults), **value}
        for key, v in merged.items():
            if f"{section}.{key}" in INT_OR_AUTO:
                if v != "auto" and not _type_ok(0, v):
                    raise ValueError(f"config key {section}.{key} must be int or 'auto', got {v!r}")
            elif defaults[key] is None and section not in FREE_FORM:
                kind = WHEN_SET[f"{section}.{key}"]
                if v is not None and not _type_ok(kind, v):
                    raise ValueError(
                        f"config key {section}.{key} must be {kind.__name__} or null, got {v!r}"
                    )
            elif not _type_ok(defaults[key], v):
                raise ValueError(
                    f"config key {section}.{key} must be {type(defaults[key]).__name__}, got {v!r}"
                )
            choices = CHOICES.get(f"{section}.{key}")
            if choices and v not in choices:
                raise ValueError(f"config key {section}.{key} must be one of {choices}, got {v!r}")
            if isinstance(defaults[key], float) and isinstance(v, int):
                merged[key] = float(v)
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"config key {section}.{key} must be finite, got {v!r}")
            if f"{section}.{key}" in PATHS and isinstance(v, str):
                merged[key] = os.path.expanduser(v)
            if f"{section}.{key}" == "loss.lpips" and isinstance(v, dict):
                merged[key] = {
                    name: os.path.expanduser(f) if isinstance(f, str) else f
                    for name, f in v.items()
                }
        out[section] = merged
    _check_ranges(out)
    return out


def _check_ranges(cfg: dict) -> None:
    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            section, name = key.split(".")
            raise ValueError(f"config key {key} must be {what}, got {cfg[section][name]!r}")

    t, o, d, e, i, m = (cfg[s] for s in ("train", "optim", "data", "eval", "init", "meta"))
    for key in ("steps", "eval_every", "ckpt_every"):  # 0: off, or only at the end
        need(t[key] >= 0, f"train.{key}", ">= 0")
    need(t["batch_size"] >= 1, "train.batch_size", ">= 1")
    # Derived seeds (seed * 1_000_003 + epoch for the data order) must stay within 64 bits.
    need(0 <= t["seed"] < 2**32, "train.seed", "in [0, 2**32)")
    need(t["log_every"] >= 1, "train.log_every", ">= 1")
    need(t["num_workers"] == "auto" or t["num_workers"] >= 0, "train.num_workers", ">= 0")
    need(0.0 <= t["ema_decay"] < 1.0, "train.ema_decay", "in [0, 1)")
    for key in ("recon_weight", "perceptual_weight", "disc_weight", "lecam_weight", "quant_weight"):
        need(cfg["loss"][key] >= 0, f"loss.{key}", ">= 0")
    need(cfg["loss"]["disc_start"] >= 0, "loss.disc_start", ">= 0")
    need(o["accum_steps"] >= 1, "optim.accum_steps", ">= 1")
    need(o["lr"] > 0, "optim.lr", "> 0")
    need(o["disc_lr"] is None or o["disc_lr"] > 0, "optim.disc_lr", "> 0 or null")
    need(o["weight_decay"] >= 0, "optim.weight_decay", ">= 0")
    need(o["warmup_steps"] >= 0, "optim.warmup_steps", ">= 0")
    need(0.0 <= o["min_lr_ratio"] <= 1.0, "optim.min_lr_ratio", "in [0, 1]")
    need(o["grad_clip"] >= 0, "optim.grad_clip", ">= 0 (0 disables clipping)")
    betas = o["betas"]
    need(
        isinstance(betas, list)
        and len(betas) == 2
        and all(
            isinstance(b, int | float) and not isinstance(b, bool) and 0 <= b < 1 for b in betas
        ),
        "optim.betas",
        "a list [b1, b2] of numbers in [0, 1)",
    )
    need(d["resolution"] >= 1, "data.resolution", ">= 1")
    need(0.0 < d["val_fraction"] < 1.0, "data.val_fraction", "in (0, 1)")
    need(d["scale"] > 0, "data.scale", "> 0")
    need(d["epoch_size"] >= 1, "data.epoch_size", ">= 1")
    if d["kind"] != "samples":
        need(d["path"] is not None, "data.path", f"a directory for data.kind={d['kind']}")
    else:
        need(d["path"] is None, "data.path", "null for data.kind=samples (the bundled photographs)")
    need(e["batch_size"] >= 1, "eval.batch_size", ">= 1")
    need(e["max_batches"] >= 0, "eval.max_batches", ">= 0 (0: all)")
    need(e["num_images"] >= 1, "eval.num_images", ">= 1")
    need(i["kmeans_batches"] >= 1, "init.kmeans_batches", ">= 1")
    need(i["kmeans_iters"] >= 0, "init.kmeans_iters", ">= 0")
    need(m["codebook_every"] >= 1, "meta.codebook_every", ">= 1")
    need(m["inner_lr"] > 0, "meta.inner_lr", "> 0")
    need(m["fd_eps"] > 0, "meta.fd_eps", "> 0")


def changed_keys(old, new, prefix: str) -> list[str]:
    """Dotted keys whose values differ between two nested config dicts (None: empty)."""
    old, new = old or {}, new or {}
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_keys(a, b, f"{prefix}.{key}")
        elif a != b:
            out.append(f"{prefix}.{key} {a!r} -> {b!r}")
    return out


def _recipes() -> Path:
    return Path(str(resources.files("fastvq.configs")))


def resolve_config(path: str | Path) -> Path:
    """path itself if it is a file, else the shipped recipe of that name (bare names only)."""
    path = Path(path).expanduser()
    if path.is_file() or path.parent != Path("."):
        return path
    recipes = _recipes()
    shipped = recipes / path.with_suffix(".yaml").name
    if not shipped.is_file():
        names = ", ".join(sorted(p.stem for p in recipes.glob("*.yaml")))
        raise FileNotFoundError(
            f"config {str(path)!r} is neither a file nor a shipped recipe (one of: {names})"
        )
    return shipped


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> dict:
    """Read a YAML config (following `base:` files), apply "a.b=value" overrides, validate.

    Args:
        path: a YAML file; or the name of a recipe shipped with fastvq (configs/<name>.yaml,
            installed as fastvq.configs), e.g. "demo" or "vqgan_65k"; or None for the defaults.
        overrides: strings "section.key=value"; the value is parsed as YAML.

    Returns:
        a nested dict with every section of DEFAULTS filled in.

    Raises:
        FileNotFoundError for a missing file; ValueError naming the key for an unknown key, a
        wrong type or an out-of-range value.
    """
    cfg = _read(resolve_config(path)) if path is not None else {}
    for override in overrides:
        apply_override(cfg, override)
    return validate(cfg)


def dump_config(cfg: dict, path: str | Path) -> None:
    """Write cfg as YAML (the run's exact settings, saved next to its checkpoints)."""
    with open(path, "w") as f:
        yaml.dump(cfg, f, Dumper=_Dumper, sort_keys=False)

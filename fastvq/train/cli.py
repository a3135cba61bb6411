"""The `fastvq` command line: train, eval, sweep, bench and demo.

Entry point fastvq.train.cli:main (the `fastvq` console script and `python -m fastvq`).
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

EPILOG = """\
examples:
  fastvq demo                 # a small tokenizer on bundled photos, ~22 s on 2 CPU cores
  fastvq train --config rotated_vqvae data.kind=cifar10 data.path=~/data/cifar10
  fastvq train --config vqgan_65k data.path=~/imagenet optim.lr=1e-4 train.bf16=true
  torchrun --nproc_per_node 8 -m fastvq train --config vqgan_65k data.path=...
  fastvq eval --checkpoint runs/vqgan_65k/checkpoints/latest.pt
  fastvq tokenize --checkpoint runs/vqgan_65k/checkpoints/latest.pt --split train
  fastvq sweep --config collapse_sweep data.path=~/data/cifar10
  fastvq bench --quick

Overrides are section.key=value pairs after the options; values are YAML ("1e-4", "null",
"[0.5, 0.9]"). Sections: model, loss, disc, optim, train, data, init, eval, meta (see
fastvq/train/config.py for every key and its default). A run writes config.yaml, log.csv,
checkpoints/latest.pt, eval.json and images/ under train.out_dir, and resumes from its latest
checkpoint when started again with the same out_dir.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastvq",
        description="Train and evaluate image tokenizers on fastvq's quantizers.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    t = sub.add_parser(
        "train",
        help="train a tokenizer from a YAML config",
        description="Train a tokenizer. Resumes from train.out_dir/checkpoints/latest.pt if it "
        "exists (train.resume=false starts over): the model must be the same; train.steps and the "
        "optim settings may change, and the schedule follows them. Works under torchrun for "
        "several GPUs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument(
        "--config",
        required=True,
        help="YAML file, or a shipped recipe by name: demo, rotated_vqvae, vqgan_65k, ...",
    )
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")

    e = sub.add_parser(
        "eval",
        help="evaluate a checkpoint (JSON metrics + PNG reconstructions)",
        description="Evaluate a checkpoint's EMA weights (or its weights when it has no EMA) on "
        "the evaluation split: MSE, PSNR, SSIM, codebook usage, perplexity and entropy over the "
        "whole split; LPIPS when loss.perceptual_weight > 0 (weights in loss.lpips), rFID when "
        "eval.fid_features names a feature extractor. Writes eval.json, "
        "a reconstruction grid and a code-usage histogram.",
    )
    e.add_argument("--checkpoint", required=True, help="a checkpoint written by fastvq train")
    e.add_argument("--config", help="config (default: the one stored in the checkpoint)")
    e.add_argument(
        "--out",
        help="output directory (default: <run>/eval for <run>/checkpoints/*.pt, else eval/ "
        "beside the checkpoint)",
    )
    e.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")

    k = sub.add_parser(
        "tokenize",
        help="encode a split of the data into token grids (.npy) with a trained tokenizer",
        description="Encode every image of a split with a checkpoint's EMA weights (or its "
        "weights when it has no EMA, or with --weights model) into DIR/tokens-SPLIT.npy: row i "
        "is image i's index grid (h, w), (h, w, Q) for residual quantizers, (h, w, G, Q) for "
        "grouped ones, in the smallest of uint16, int32 and int64 that holds the codebook "
        "sizes. Both splits take the evaluation transform (centre crops, no random flips), under "
        "bf16 autocast when the run trained so (train.bf16=false encodes in float32). "
        "DIR/tokens-SPLIT.json describes the file; for image folders, DIR/tokens-SPLIT.txt "
        "lists row i's image (relative to data.path); CIFAR-10's rows are in the batches' "
        "order (data_batch_1 ... 5, test_batch). The data section is the checkpoint's: "
        "data.path=... tokenizes another dataset; the model section cannot be overridden. "
        "Works under torchrun (each rank encodes its shard into the same file).",
    )
    k.add_argument("--checkpoint", required=True, help="a checkpoint written by fastvq train")
    k.add_argument("--split", choices=("train", "val"), default="train", help="default: train")
    k.add_argument(
        "--out",
        help="output directory (default: <run>/tokens for <run>/checkpoints/*.pt, else tokens/ "
        "beside the checkpoint)",
    )
    k.add_argument(
        "--weights",
        choices=("ema", "model"),
        default="ema",
        help="the EMA of the weights (default, when the run kept one) or the trained weights",
    )
    k.add_argument(
        "--flip",
        action="store_true",
        help="also the mirror images: row i is (2, h, w...), image i's grid then its mirror's "
        "(LlamaGen's flip augmentation)",
    )
    k.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")

    s = sub.add_parser(
        "sweep",
        help="train and evaluate one config over several values of a key (collapse study)",
        description="Run a sweep config (e.g. collapse_sweep): optionally pretrain once "
        "without VQ, then train and evaluate each value of sweep.key (e.g. codebook sizes 16 ... "
        "65,536), with and without the pretrained initialisation; writes sweep.csv and "
        "sweep.json with MSE, PSNR, usage and perplexity per run.",
    )
    s.add_argument("--config", required=True, help="sweep YAML with a `sweep:` section")
    s.add_argument("--values", help="comma-separated values replacing sweep.values")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides for every run")

    b = sub.add_parser(
        "bench",
        help="run the repository's benchmarks (python -m bench.run)",
        description=(
            "Runs `python -m bench.run ARGS` from the fastvq source checkout: records go to its "
            "bench/results unless --out DIR (a relative DIR, and --summary / --targets DIR, "
            "are taken from where you run fastvq). ARGS: [--quick] [--only MODULE ...] "
            "[--out DIR] [--reps N] [--threads N] | --summary DIR | --targets DIR; see "
            "bench/README.md."
        ),
    )
    b.add_argument("args", nargs="*", help="passed to bench.run (e.g. --quick)")

    # Listed for --help only: main() hands `fastvq demo ...` to fastvq.demo and `fastvq bench
    # ...` to bench.run before parsing.
    sub.add_parser("demo", help="train a small tokenizer on bundled photographs (see demo --help)")
    return p


def train(config: str, overrides: list[str]) -> dict:
    """Load the config and train; returns Trainer.fit()'s dict."""
    from fastvq.train.config import load_config
    from fastvq.train.trainer import Trainer

    return Trainer(load_config(config, overrides)).fit()


def _beside_run(checkpoint: Path, name: str) -> Path:
    """<run>/checkpoints/x.pt -> <run>/name; a checkpoint anywhere else -> name/ beside it."""
    home = checkpoint.resolve().parent
    return (home.parent if home.name == "checkpoints" else home) / name


def evaluate(checkpoint: str, config: str | None, out: str | None, overrides: list[str]) -> dict:
    """Evaluate a checkpoint; writes eval.json and PNGs under `out`; returns the metrics."""
    from fastvq.train import checkpoint as ckpt
    from fastvq.train.config import changed_keys, load_config
    from fastvq.train.trainer import Trainer

    path = Path(checkpoint).expanduser()
    state = ckpt.load(path)
    if config is not None:
        cfg = load_config(config, overrides)
    else:
        hint = "; fastvq eval takes the run's config.yaml with --config"
        cfg = ckpt.trained_config(state, path, overrides, hint)
    saved = state.get("config") if isinstance(state, dict) else None  # a bare state_dict: none
    saved = saved.get("model") if isinstance(saved, dict) else cfg["model"]
    changed = changed_keys(saved, cfg["model"], "model")
    if changed:  # weights that still fit (FSQ levels reordered) evaluate another tokenizer
        warnings.warn(  # but beam_size, say, is an evaluation setting: said, not refused
            f"evaluating {str(path)!r} with a model section other than the one it was trained "
            f"with ({', '.join(changed)})",
            stacklevel=2,
        )
    out_dir = Path(out).expanduser() if out else _beside_run(path, "eval")
    # Weights only: no optimizer state, no resume, no EMA copy (load_weights takes the EMA
    # weights when the checkpoint has them), and every weight, the quantizer's included: a
    # model section that differs from the checkpoint's is an error, not a random codebook.
    out_dir.mkdir(parents=True, exist_ok=True)  # before the evaluation, not after it
    cfg["train"].update(out_dir=str(out_dir), resume=False, ema_decay=0.0, compile=False)
    cfg["init"].update(checkpoint=None, kmeans=False)
    trainer = Trainer(cfg)
    ckpt.load_weights(trainer.model, path, state=state)
    trainer.step = state.get("step", 0)
    result = trainer.evaluate(use_ema=False)
    if trainer.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "eval.json", "w") as f:
            json.dump(result, f, indent=2)
        print(json.dumps(result, indent=2))
    return result


def tokenize(
    checkpoint: str,
    split: str,
    out: str | None,
    overrides: list[str],
    weights: str = "ema",
    flip: bool = False,
) -> dict:
    """Encode a split into <out>/tokens-<split>.npy (see the `tokenize` --help); returns the
    description written beside it as tokens-<split>.json."""
    from fastvq.models import build_tokenizer
    from fastvq.train import checkpoint as ckpt
    from fastvq.train.data import build_datasets, check_resolution
    from fastvq.train.tokens import index_dtype, write_tokens
    from fastvq.train.trainer import join_process_group, pick_device, resolve_num_workers

    path = Path(checkpoint).expanduser()
    # The tokenizer is the checkpoint's: a model override builds another one, and one whose
    # weights still fit (FSQ levels [8, 5, 5] -> [5, 5, 8]: no weights) writes other codes.
    model_overrides = [o for o in overrides if o.split("=", 1)[0].strip().split(".")[0] == "model"]
    if model_overrides:
        raise ValueError(
            f"tokenize takes the checkpoint's model section as it was trained; drop "
            f"{model_overrides[0]!r} (the data, eval and train sections may be)"
        )
    state = ckpt.load(path)
    cfg = ckpt.tokenizer_config(state, path, overrides)
    data = cfg["data"]
    if data["kind"] != "samples":  # tokens-SPLIT.txt names images relative to it, from anywhere
        data["path"] = str(Path(data["path"]).resolve())  # "~" expanded by the config
    dataset = build_datasets(data, augment=False)[split == "val"]
    if dataset is None:
        raise ValueError(
            "data.kind=samples trains on random crops of its photographs, not on a fixed set of "
            "images: tokenize --split val, or point data.kind=folder at images"
        )
    model = build_tokenizer(cfg["model"])
    check_resolution(model, data["resolution"])
    ckpt.load_weights(model, path, ema=weights == "ema", state=state)
    device = pick_device(cfg["train"]["device"])
    rank, world = join_process_group(device)
    model.to(device).eval()
    out_dir = Path(out).expanduser() if out else _beside_run(path, "tokens")
    target = out_dir / f"tokens-{split}.npy"
    workers = resolve_num_workers(cfg["train"]["num_workers"], device)
    shape = write_tokens(
        model, dataset, target, batch_size=cfg["eval"]["batch_size"], device=device,
        bf16=cfg["train"]["bf16"], rank=rank, world=world, num_workers=workers, flip=flip,
    )  # fmt: skip
    files = getattr(dataset, "files", None)
    info = {
        "tokens": target.name,
        "shape": list(shape),
        "dtype": index_dtype(model.codebook_sizes).name,
        "codebook_sizes": list(model.codebook_sizes or []) or None,
        "checkpoint": str(path.resolve()),
        "step": state.get("step"),
        "weights": "ema" if weights == "ema" and state.get("ema") else "model",
        "split": split,
        "data": data,
        "bf16": cfg["train"]["bf16"],  # encoded under bf16 autocast: a few codes differ
        "flip": flip,  # axis 1: the image's grid, then its mirror image's
        "files": f"tokens-{split}.txt" if files is not None else None,
    }
    if rank == 0:
        if files is not None:
            root = Path(data["path"])
            # The names' bytes as the filesystem holds them: a name that is not UTF-8 (a
            # Latin-1 archive) made write_text raise after the whole split was encoded.
            names = [os.fsencode(Path(f).relative_to(root)) for f in files]
            (out_dir / info["files"]).write_bytes(b"".join(n + b"\n" for n in names))
        (out_dir / f"tokens-{split}.json").write_text(json.dumps(info, indent=2) + "\n")
        print(json.dumps({k: info[k] for k in ("tokens", "shape", "dtype", "weights")}))
    return info


def sweep(config: str, values: str | None, overrides: list[str]) -> list[dict]:
    """Run the sweep described by a YAML file's `sweep:` section; see the `sweep` --help."""
    from fastvq.train.config import load_config, load_yaml, parse_value, resolve_config

    path = resolve_config(config)
    with open(path) as f:
        doc = load_yaml(f) or {}  # 1e-3 a float, as in configs and on the command line
    spec = doc.get("sweep") if isinstance(doc, dict) else None
    if not isinstance(spec, dict) or not {"config", "key", "values"} <= set(spec):
        raise ValueError(f"{config}: needs a `sweep:` mapping with config, key and values")
    # Anything else would be ignored without a word (settings belong in the run's config or on
    # the command line).
    keys = {"config", "key", "values", "pretrain", "baseline", "out_dir"}
    extra = sorted(set(doc) - {"sweep"}) + [f"sweep.{k}" for k in sorted(set(spec) - keys)]
    if extra:
        raise ValueError(
            f"{config}: unknown key {extra[0]}; a sweep file holds only `sweep:` with "
            f"{', '.join(sorted(keys))} (put run settings in its config or on the command line)"
        )
    for key, kind in (("config", str), ("key", str), ("pretrain", str | None), ("out_dir", str)):
        if key in spec and not isinstance(spec[key], kind):
            raise ValueError(f"{config}: sweep.{key} must be a string, got {spec[key]!r}")
    if not isinstance(spec.get("baseline", False), bool):
        raise ValueError(f"{config}: sweep.baseline must be true or false")
    if values is not None:
        if not all(v.strip() for v in values.split(",")):
            raise ValueError(f"--values {values!r}: comma-separated values, none of them empty")
        vals = [parse_value(v) for v in values.split(",")]
    else:
        vals = spec["values"]
    if not isinstance(vals, list) or not vals:
        raise ValueError(f"{config}: sweep.values must be a non-empty list, got {vals!r}")
    for o in overrides:
        if o.split("=", 1)[0].strip().startswith("sweep."):
            raise ValueError(
                f"{o!r}: the sweep: section is the sweep file's, not an override's: --values "
                "replaces its values and train.out_dir=DIR its out_dir (copy the file for the rest)"
            )
    out_root = Path(spec.get("out_dir", "runs/sweep")).expanduser()
    for o in overrides:
        if o.startswith("train.out_dir="):
            out_root = Path(o.split("=", 1)[1]).expanduser()
    overrides = [o for o in overrides if not o.startswith("train.out_dir=")]
    run_cfg = path.parent / spec["config"]

    def setting(value) -> str:  # the override for one value (JSON is YAML: null, lists, "text")
        return f"{spec['key']}={json.dumps(value)}"

    for value in vals:  # every value's config checked before the first run starts
        load_config(run_cfg, [*overrides, setting(value)])
    init = None
    if spec.get("pretrain"):
        pre = load_config(
            path.parent / spec["pretrain"], [*overrides, f"train.out_dir={out_root / 'pretrain'}"]
        )
        from fastvq.train.trainer import Trainer

        Trainer(pre).fit()
        init = out_root / "pretrain" / "checkpoints" / "latest.pt"
    variants = [("pretrained", init)] if init is not None else [("scratch", None)]
    if init is not None and spec.get("baseline", False):
        variants.append(("scratch", None))
    rows, leader = [], int(os.environ.get("RANK", 0)) == 0
    name = spec["key"].split(".")[-1]
    for value in vals:
        for variant, init_ckpt in variants:
            run_dir = out_root / f"{variant}_{name}_{value}"
            extra = [setting(value), f"train.out_dir={run_dir}"]
            extra.append(f"init.checkpoint={init_ckpt if init_ckpt else 'null'}")
            r = train(str(run_cfg), [*overrides, *extra])["eval"]
            rows.append({"variant": variant, spec["key"]: value, **r})
            if leader:
                print(f"sweep {variant} {name}={value}: " + ", ".join(
                    f"{k} {r[k]:.4g}" for k in ("mse", "psnr", "usage", "perplexity") if k in r
                ))  # fmt: skip
    if not leader:  # under torchrun every rank holds the same (all-reduced) results
        return rows
    out_root.mkdir(parents=True, exist_ok=True)
    with open(out_root / "sweep.json", "w") as f:
        json.dump(rows, f, indent=2)
    with open(out_root / "sweep.csv", "w", newline="") as f:
        # Every row's columns: a variant's (usage, lpips, rfid) may be missing from the first.
        writer = csv.DictWriter(f, list(dict.fromkeys(k for row in rows for k in row)))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def bench(args: list[str]) -> int:
    """Run `python -m bench.run args` from the source checkout holding this fastvq."""
    import fastvq

    root = Path(fastvq.__file__).resolve().parent.parent
    if not (root / "bench" / "run.py").is_file():
        print(
            "fastvq bench runs the benchmarks of a fastvq source checkout (bench/run.py), which "
            f"this installation ({root}) does not have: clone the repository and run "
            "`python -m bench.run` from its root.",
            file=sys.stderr,
        )
        return 2
    return subprocess.call([sys.executable, "-m", "bench.run", *_absolute_paths(args)], cwd=root)


_BENCH_PATH_OPTIONS = ("--out", "--summary", "--targets")


def _absolute_paths(args: list[str]) -> list[str]:
    """bench.run's folder arguments made absolute: it runs from the checkout, and a user's
    `fastvq bench --out results` means ./results where they stand, not one in the checkout."""
    out, follows_option = [], False
    for arg in args:
        option, eq, value = arg.partition("=")
        if follows_option and not arg.startswith("-"):  # else: bench.run says what is missing
            arg = os.path.abspath(arg)
        elif eq and option in _BENCH_PATH_OPTIONS:
            arg = f"{option}={os.path.abspath(value)}"
        follows_option = arg in _BENCH_PATH_OPTIONS
        out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    """`fastvq COMMAND ...`; returns the process exit code.

    Under torchrun the command's Trainer starts the process group, and main leaves it once the
    command is done (fastvq.train.trainer.leave_process_group). A caller's own group is left
    alone, and so is the group of a command that raised: joining gloo's threads could wait for a
    collective the other ranks never finish.
    """
    import torch.distributed as dist

    started_here = not (dist.is_available() and dist.is_initialized())
    code = _command(sys.argv[1:] if argv is None else list(argv))
    if started_here and dist.is_available() and dist.is_initialized():
        from fastvq.train.trainer import leave_process_group

        leave_process_group()
    return code


def _command(argv: list[str]) -> int:
    if argv[:1] == ["demo"]:  # every argument, --help included, belongs to fastvq.demo
        from fastvq.demo import main as demo

        demo(argv[1:])
        return 0
    if argv[:1] == ["bench"] and argv[1:2] not in (["-h"], ["--help"]):
        # Every argument belongs to bench.run: argparse's REMAINDER refuses a leading option
        # ("fastvq bench --quick": unrecognized arguments).
        return bench(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "train":
        train(args.config, args.overrides)
    elif args.command == "eval":
        evaluate(args.checkpoint, args.config, args.out, args.overrides)
    elif args.command == "tokenize":
        tokenize(args.checkpoint, args.split, args.out, args.overrides, args.weights, args.flip)
    elif args.command == "sweep":
        sweep(args.config, args.values, args.overrides)
    return 0


def run(argv: list[str] | None = None) -> int:
    """The `fastvq` console script and `python -m fastvq`: main(), with a bad setting, argument
    or file (ValueError; OSError: a missing file, an output path that is a file) reported in one
    line on stderr and exit code 2, not a traceback; FASTVQ_DEBUG=1 shows the traceback."""
    try:
        return main(argv)
    except (ValueError, OSError) as e:
        if os.environ.get("FASTVQ_DEBUG") == "1":
            raise
        print(f"fastvq: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run())

"""Demo: train a small image tokenizer on real photographs, then print its held-out evaluation.

The photographs are the ones scikit-learn ships (china.jpg, flower.jpg; plus scikit-image's
colour samples when it is installed): 32x32 training crops from the left 80 % of each image,
evaluation on tiles of the held-out right strips. The model is a small rotated VQ-VAE with a
512-code fastvq.nn.VectorQuantize (configs/demo.yaml). Nothing is downloaded. It runs on the GPU
and fastvq's kernels when present, else on CPU.

    python -m fastvq.demo                  # or: fastvq demo; make demo
    python -m fastvq.demo train.steps=100  # any config override (section.key=value)
"""

import argparse
import sys
import time

import torch


def load_demo_config(overrides=()) -> dict:
    """The demo's validated config: the shipped recipe configs/demo.yaml plus overrides."""
    from fastvq.train.config import load_config

    return load_config("demo", overrides)


@torch.no_grad()
def mean_colour_mse(eval_set) -> float:
    """MSE (on [0, 1] pixels) of the trivial predictor that paints each held-out crop in its own
    mean colour: a tokenizer worth its bits must beat it."""
    total, n = 0.0, 0
    for i in range(len(eval_set)):
        x = (eval_set[i].double() + 1) / 2
        total += float((x - x.mean((1, 2), keepdim=True)).square().mean())
        n += 1
    return total / n


def main(argv=None) -> dict:
    """Train and evaluate the demo tokenizer; returns the final evaluation (fastvq.train
    metrics) plus "initial_mse" (the untrained model), "mean_colour_mse" (the trivial
    baseline), "train_seconds" and "device"."""
    parser = argparse.ArgumentParser(
        prog="python -m fastvq.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + (["train.progress=false"] if args.quiet else [])

    import fastvq
    from fastvq.train.trainer import Trainer

    cfg = load_demo_config(overrides)
    trainer = Trainer(cfg)
    t, data = cfg["train"], cfg["data"]
    k = trainer.codebook_size if t["vq"] else None  # overrides may swap the quantizer or drop it
    codes = f"{k} codes" if k else "no codebook"
    backends = [name for name, b in fastvq.backends().items() if b.available]
    source = (
        f"{len(trainer.train_set.images)} photographs"  # the bundled ones (data.kind=samples)
        if data["kind"] == "samples"
        else f"data.path {data['path']}"
    )
    print(
        f"fastvq demo on {trainer.device} (backends: {', '.join(backends)}): a "
        f"{cfg['model']['arch']} tokenizer with {codes}, {t['steps']} steps of "
        f"{t['batch_size']} crops of {data['resolution']}x{data['resolution']} from {source}; "
        "evaluation on "
        f"{len(trainer.eval_set)} held-out tiles"
    )
    initial = trainer.evaluate(save_images=False)
    baseline = mean_colour_mse(trainer.eval_set)
    start = time.perf_counter()
    result = trainer.fit()["eval"]
    seconds = time.perf_counter() - start
    result = {
        **result,
        "initial_mse": initial["mse"],
        "mean_colour_mse": baseline,
        "train_seconds": seconds,
        "device": str(trainer.device),
    }
    print(f"trained in {seconds:.0f} s; held-out evaluation ({result['images']} tiles):")
    print(f"  MSE        {result['mse']:.5f}   (untrained {initial['mse']:.5f}, "
          f"mean-colour baseline {baseline:.5f})")  # fmt: skip
    print(f"  PSNR       {result['psnr']:.2f} dB   SSIM {result['ssim']:.3f}")
    if "codes_used" in result:
        print(
            f"  codes      {result['codes_used']}/{k} used ({100 * result['usage']:.0f} %), "
            f"perplexity {result['perplexity']:.1f}, entropy {result['entropy_bits']:.2f} bits"
        )
    print(f"  outputs    {trainer.out_dir}/ (eval.json, log.csv, images/)")
    return result


if __name__ == "__main__":  # as `fastvq demo`: one-line errors, the process group left at the end
    from fastvq.train.cli import run

    sys.exit(run(["demo", *sys.argv[1:]]))

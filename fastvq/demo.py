"""Demo: quantize real image patches with a 65,536-code codebook, then time the search.

Training data: every 4x4 RGB patch (D = 48) of scikit-learn's sample photograph china.jpg; held out:
flower.jpg. The codebook is 65,536 training patches refined by Lloyd steps built on
fastvq.nearest_code and index_add_ (no N x K matrix anywhere). Run: python -m fastvq.demo
"""

import argparse
import time

import torch

import fastvq

PATCH = 4


def patches(image: torch.Tensor, stride: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (num_patches, PATCH * PATCH * 3) float32 in [0, 1]."""
    x = image.permute(2, 0, 1)[None].float() / 255
    cols = torch.nn.functional.unfold(x, PATCH, stride=stride)  # (1, 3 * P * P, L)
    return cols[0].T.contiguous()


def reconstruct(cols: torch.Tensor, shape) -> torch.Tensor:
    h, w = shape[0] // PATCH * PATCH, shape[1] // PATCH * PATCH
    img = torch.nn.functional.fold(cols.T[None], (h, w), PATCH, stride=PATCH)
    return img[0].permute(1, 2, 0)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return (10 * torch.log10(1 / (a - b).square().mean())).item()


def lloyd(x: torch.Tensor, codebook: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        idx = fastvq.nearest_code(x, codebook)
        sums = torch.zeros_like(codebook).index_add_(0, idx, x)
        counts = torch.zeros(len(codebook), device=x.device).index_add_(
            0, idx, torch.ones_like(idx, dtype=x.dtype)
        )
        used = counts > 0  # unused codes keep their patch
        codebook = torch.where(used[:, None], sums / counts.clamp(min=1)[:, None], codebook)
    return codebook


def timed(fn, device) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--codes", type=int, default=65536)
    parser.add_argument("--lloyd", type=int, default=2)
    args = parser.parse_args(argv)
    from sklearn.datasets import load_sample_images  # ships the photographs in its wheel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    china, flower = (torch.from_numpy(im.copy()) for im in load_sample_images().images)
    train = patches(china, stride=2).to(device)
    test = patches(flower, stride=PATCH).to(device)
    print(f"device {device}; backends: {[k for k, v in fastvq.backends().items() if v.available]}")
    print(
        f"train {tuple(train.shape)} patches of china.jpg, test {tuple(test.shape)} of flower.jpg"
    )

    g = torch.Generator().manual_seed(0)
    results = {}
    for k in (256, args.codes):
        start = train[torch.randperm(len(train), generator=g)[:k].to(device)]
        t = time.perf_counter()
        codebook = lloyd(train, start, args.lloyd)
        fit = time.perf_counter() - t
        idx = fastvq.nearest_code(test, codebook)
        results[k] = psnr(reconstruct(codebook[idx], flower.shape), reconstruct(test, flower.shape))
        print(
            f"K = {k:6}: {args.lloyd} Lloyd steps in {fit:5.1f} s; "
            f"held-out PSNR {results[k]:.2f} dB, {torch.unique(idx).numel()} codes used"
        )
    mean = (
        test.view(len(test), PATCH * PATCH, 3).mean(1, keepdim=True).expand(-1, PATCH * PATCH, -1)
    )
    flat = psnr(
        reconstruct(mean.reshape(len(test), -1), flower.shape), reconstruct(test, flower.shape)
    )
    print(f"per-patch mean colour (baseline): PSNR {flat:.2f} dB")

    n = min(len(test), 8192)
    z = test[:n]

    def naive():
        return ((z * z).sum(-1, keepdim=True) - 2 * z @ codebook.T + (codebook**2).sum(-1)).argmin(
            1
        )

    def fused():
        return fastvq.nearest_code(z, codebook)

    rows = [("fastvq.nearest_code", fused), ("naive PyTorch fp32", naive)]
    print(
        f"search of {n} held-out patches over {args.codes} codes, D = {z.shape[1]} (one run each):"
    )
    for name, fn in rows:
        print(f"  {name:22} {timed(fn, device):8.1f} ms")
    return results, flat


if __name__ == "__main__":
    main()

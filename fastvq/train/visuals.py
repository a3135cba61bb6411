"""PNG figures without matplotlib: reconstruction grids and code-usage histograms (PIL only)."""

from pathlib import Path

import numpy as np
import torch


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(x: torch.Tensor, recon: torch.Tensor, path, ncol: int = 8, pad: int = 2) -> Path:
    """Save originals and reconstructions as a PNG: rows alternate originals / reconstructions,
    `ncol` images per row, `pad` white pixels between images. x, recon: (B, 3, H, W) in [-1, 1]."""
    from PIL import Image

    a, b = to_uint8(x), to_uint8(recon)
    n, h, w, _ = a.shape
    ncol = min(ncol, n)
    nrow = -(-n // ncol)
    canvas = np.full((2 * nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        left = pad + c * (w + pad)
        for k, img in enumerate((a[i], b[i])):
            top = pad + (2 * r + k) * (h + pad)
            canvas[top : top + h, left : left + w] = img
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path


def save_usage_histogram(counts: torch.Tensor, path, width: int = 512, height: int = 200) -> Path:
    """Save a PNG of code counts sorted in decreasing order, on a log scale (one column per code
    bucket; with K > width codes each column shows the mean of K / width sorted codes), with the
    share of unused codes shaded red. counts: (K,) non-negative."""
    from PIL import Image, ImageDraw

    c = counts.detach().double().cpu().flatten().sort(descending=True).values
    k = len(c)
    cols = min(width, k)
    edges = torch.linspace(0, k, cols + 1).long()
    means = torch.stack([c[edges[i] : max(edges[i + 1], edges[i] + 1)].mean() for i in range(cols)])
    logc = torch.log10(1 + means)
    top = float(logc.max()) or 1.0
    img = Image.new("RGB", (cols, height + 14), "white")
    draw = ImageDraw.Draw(img)
    for i, v in enumerate(logc.tolist()):
        bar = round(height * v / top)
        color = (40, 90, 200) if means[i] > 0 else (220, 60, 60)
        draw.line([(i, height), (i, height - max(bar, 1 if means[i] == 0 else bar))], fill=color)
    used = int((c > 0).sum())
    draw.text((2, height + 1), f"{used}/{k} codes used, max count {int(c[0])}", fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path

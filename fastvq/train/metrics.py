"""Evaluation metrics: MSE, PSNR, SSIM, codebook usage from accumulated counts, Fréchet distance.

Images are (B, C, H, W) in [-1, 1] (the tokenizer's range). The Evaluator scores the 8-bit images
a reconstruction is saved as: both images rounded to the 256 levels (to_8bit, the rounding of
LlamaGen's reconstruction script and torchvision's save_image), then mapped to [0, 1].
  MSE:  per image, in [0, 1] units (a quarter of an l2 loss on [-1, 1]), averaged over images.
  PSNR: per image with data range 1 (the same dB as uint8 with 255), averaged over images, as
        LlamaGen does (skimage peak_signal_noise_ratio per image); a perfect image counts 120 dB.
  SSIM: Wang et al. 2004 (11 x 11 Gaussian, sigma 1.5, K1 0.01, K2 0.03, data range 1, valid
        windows, channels averaged) = skimage structural_similarity(gaussian_weights=True,
        sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=-1), per image;
        None (JSON null) for images under 11 pixels on a side, which hold no window.
        LlamaGen's script calls skimage's defaults instead (7 x 7 uniform window) with
        data_range=2 on [0, 1] images, which read 0.04 to 0.21 higher here: not comparable.
  rFID: Fréchet distance of the feature means and covariances (N - 1, as np.cov in pytorch-fid
        and torch-fidelity) of the real and the reconstructed 8-bit images in [0, 1], in float64.
        FID is biased upward at small N: papers use ImageNet's 50,000 val images at 256 x 256.
Codebook statistics come from counts accumulated over the whole evaluation set
(fastvq.code_counts), never averaged per batch: a per-batch perplexity understates usage by up to
the ratio of set size to batch size.
"""

import math

import torch
import torch.nn.functional as F

import fastvq
from fastvq.ops._validate import check_floating


def _unit(x: torch.Tensor) -> torch.Tensor:
    return (x.double() + 1) / 2


def to_8bit(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] clamped and rounded to the 256 levels of an 8-bit file, still in [-1, 1]:
    floor(127.5 x + 128) is LlamaGen's uint8 conversion (= save_image's floor(255 u + 0.5))."""
    return (x.clamp(-1, 1) * 127.5 + 128).floor_() / 127.5 - 1  # at most 255.5 -> 255


def mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error on [0, 1] images: (B, C, H, W) in [-1, 1] -> (B,) float64."""
    check_floating("x", x)
    check_floating("y", y)
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"x and y must be equal (B, C, H, W) shapes, got {x.shape}, {y.shape}")
    return (_unit(x) - _unit(y)).square().flatten(1).mean(1)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for data range 1 (images in [-1, 1] mapped to [0, 1]) -> (B,) float64;
    identical images give inf."""
    return -10 * torch.log10(mse(x, y))


def _gaussian(size: int, sigma: float, dtype, device) -> torch.Tensor:
    t = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004): 11 x 11 Gaussian window with sigma 1.5, K1 = 0.01,
    K2 = 0.03, data range 1, statistics over valid windows only, averaged over channels.

    x, y: (B, C, H, W) in [-1, 1] with H, W >= window. Returns (B,) float64.
    """
    mse(x, y)  # shape and dtype checks
    if min(x.shape[-2:]) < window:
        raise ValueError(f"images must be at least {window} pixels on each side, got {x.shape}")
    a, b = _unit(x), _unit(y)
    c = a.shape[1]
    g = _gaussian(window, sigma, a.dtype, a.device)
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window)

    def blur(t):
        return F.conv2d(t, kernel, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return s.flatten(1).mean(1)


def _psd_eigenvalues(w: torch.Tensor) -> torch.Tensor:
    """A PSD matrix's computed eigenvalues with the rounding noise of its zero ones (below
    n * eps * the largest) set to 0: a covariance of fewer samples than features has one zero
    eigenvalue per missing sample, and the square roots of their noise, ~sqrt(eps * largest)
    each, add up (-8e-4 in an rFID of 400 images of 2048 features)."""
    tol = w.abs().max() * w.numel() * torch.finfo(w.dtype).eps
    return torch.where(w > tol, w, 0)


def _sqrt_psd(a: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition."""
    w, v = torch.linalg.eigh((a + a.T) / 2)
    return (v * _psd_eigenvalues(w).sqrt()) @ v.T


def trace_sqrt_product(s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """tr sqrt(s1 @ s2) for symmetric PSD s1, s2, as the sum of the singular values of
    sqrt(s1) sqrt(s2) (its squares are the eigenvalues of s1 s2): two symmetric
    eigendecompositions and an SVD replace the general (and less stable) matrix square root, and
    no square root is taken of the products' rounding noise (the eigenvalues of sqrt(s1) s2
    sqrt(s1) span the square of one covariance's range)."""
    return torch.linalg.svdvals(_sqrt_psd(s1) @ _sqrt_psd(s2)).sum()


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)), in float64.

    mu: (F,), sigma: (F, F) symmetric PSD (tensors or arrays). The FID of two feature sets.
    """
    mu1, mu2, s1, s2 = (torch.as_tensor(t, dtype=torch.float64) for t in (mu1, mu2, sigma1, sigma2))
    if s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)) or mu1.shape != mu2.shape:
        raise ValueError(f"need mu (F,) and sigma (F, F), got {mu1.shape}, {s1.shape}, {s2.shape}")
    d = (mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * trace_sqrt_product(s1, s2)
    return float(d)


class FeatureStats:
    """Running mean and covariance of (B, F) features, in float64 (sum and sum of outer products);
    merge across processes by summing `n`, `total` and `outer`."""

    def __init__(self):
        self.n, self.total, self.outer = 0, None, None

    def update(self, feats: torch.Tensor) -> None:
        f = feats.detach().double().flatten(1)
        if self.total is None:
            self.total = torch.zeros(f.shape[1], dtype=torch.float64, device=f.device)
            self.outer = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64, device=f.device)
        self.n += len(f)
        self.total += f.sum(0)
        self.outer += f.T @ f

    def all_reduce(self, device) -> None:
        """Sums n, total and outer across processes; a process that saw no features (an empty
        evaluation shard) contributes zeros of the others' width instead of failing on None."""
        import torch.distributed as dist

        n = torch.tensor([self.n], device=device)
        width = torch.tensor([0 if self.total is None else len(self.total)], device=device)
        dist.all_reduce(n)
        dist.all_reduce(width, op=dist.ReduceOp.MAX)
        self.n, width = int(n), int(width)
        if self.total is None and width:
            self.total = torch.zeros(width, dtype=torch.float64, device=device)
            self.outer = torch.zeros(width, width, dtype=torch.float64, device=device)
        if self.total is not None:
            dist.all_reduce(self.total)
            dist.all_reduce(self.outer)

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.n < 2:
            raise ValueError(f"need at least 2 feature rows for a covariance, got {self.n}")
        mu = self.total / self.n
        cov = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu, cov


def code_stats(counts: torch.Tensor, sizes=None) -> dict:
    """Usage (fraction of codes used), perplexity and entropy in bits of accumulated counts (K,),
    or of counts (C, K) of C codebooks whose sizes are `sizes` (C,) (default: K each): then each
    statistic is the mean over the codebooks of its value for each, and codes_used their sum."""
    c = counts.double().reshape(-1, counts.shape[-1])
    sizes = torch.as_tensor(sizes if sizes is not None else [c.shape[1]] * len(c)).double()
    used = (c > 0).sum(1)
    ppl = fastvq.perplexity(c)
    return {
        "usage": float((used / sizes).mean()),
        "codes_used": int(used.sum()),
        "perplexity": float(ppl.mean()),
        "entropy_bits": float(torch.log2(ppl.clamp(min=1)).mean()),
    }


class CodeCounts:
    """How often each code was chosen, accumulated per codebook.

    Tokenizer indices (B, h, w, *slots) hold one code of each of the C = prod(slots) codebooks
    (residual layers, groups, heads) per position. sizes: each codebook's size in that order, or
    one size for all (an int; Tokenizer.codebook_sizes gives them). Entries < 0 (a layer that
    quantize dropout skipped) are not counted. counts: (C, max(sizes)) int64, allocated at the
    first update; a sparse COO tensor of that shape when the dense table would hold more than
    DENSE_LIMIT entries (BSQ with 2**36 implicit codes: a 512 GiB table), exact all the same.
    """

    DENSE_LIMIT = 2**24  # entries: a 128 MiB int64 table

    def __init__(self, sizes, device):
        self.sizes = (int(sizes),) if isinstance(sizes, int) else tuple(int(k) for k in sizes)
        self.device = device
        self.counts: torch.Tensor | None = None
        self._limit: torch.Tensor | None = None  # (C,) sizes on device

    def _sizes(self, c: int) -> tuple[int, ...]:
        if len(self.sizes) == 1:
            return self.sizes * c
        if len(self.sizes) != c:
            raise ValueError(
                f"indices hold {c} codes per position, but the quantizer has {len(self.sizes)} "
                f"codebooks (sizes {self.sizes})"
            )
        return self.sizes

    def update(self, indices: torch.Tensor) -> None:
        if indices.dim() < 3:
            raise ValueError(f"indices must be (B, h, w, *slots), got {tuple(indices.shape)}")
        c = math.prod(indices.shape[3:])
        sizes = self._sizes(c)
        if self.counts is None:
            self.counts = self._empty((c, max(sizes)))
        elif len(self.counts) != c:
            raise ValueError(f"indices hold {c} codes per position, earlier {len(self.counts)}")
        idx = indices.reshape(-1, c).to(self.device)
        if self._limit is None or self._limit.shape[0] != c:
            # Built once: a host-to-device copy of a list waits for the stream on CUDA.
            self._limit = torch.tensor(sizes, device=self.device)
        # One host sync per training step, this range check; the counts add without another
        # (code_counts took three more: boolean indexing's data-dependent size, its own range
        # check, which the one here covers, and bincount's maximum).
        if bool((idx >= self._limit).any()):
            raise ValueError(f"indices must lie below their codebook's size {sizes}")
        valid = idx >= 0  # < 0: a layer that quantize dropout skipped, not counted
        if self.counts.is_sparse:  # more host syncs (the valid entries' number, coalesce)
            rows = torch.arange(c, device=idx.device).expand_as(idx)[valid]
            ones = torch.ones_like(rows)
            new = self._sparse(torch.stack([rows, idx[valid]]), ones, self.counts.shape)
            self.counts = (self.counts + new).coalesce()
            return
        flat = idx + torch.arange(c, device=idx.device) * self.counts.shape[1]
        self.counts.view(-1).index_add_(
            0, torch.where(valid, flat, 0).view(-1), valid.view(-1).to(self.counts.dtype)
        )

    @staticmethod
    def _sparse(indices, values, shape) -> torch.Tensor:
        # check_invariants=False said explicitly: torch warns when it is left implicit.
        return torch.sparse_coo_tensor(indices, values, shape, check_invariants=False)

    def _empty(self, shape) -> torch.Tensor:
        if math.prod(shape) <= self.DENSE_LIMIT:
            return torch.zeros(shape, dtype=torch.int64, device=self.device)
        none = torch.empty(2, 0, dtype=torch.int64, device=self.device)
        return self._sparse(none, none[0], shape).coalesce()

    def all_reduce(self) -> None:
        """Sums the counts across processes (a process that counted nothing contributes zeros)."""
        import torch.distributed as dist

        shape = torch.tensor(self.counts.shape if self.counts is not None else (0, 0))
        shape = shape.to(self.device)
        dist.all_reduce(shape, op=dist.ReduceOp.MAX)
        if self.counts is None and int(shape[0]):
            self.counts = self._empty(shape.tolist())
        if self.counts is None:
            return
        if not self.counts.is_sparse:
            dist.all_reduce(self.counts)
            return
        # NCCL reduces no sparse tensors: gather every process's entries, padded to the longest.
        n = torch.tensor([self.counts._nnz()], device=self.device)
        lengths = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
        dist.all_gather(lengths, n)
        longest = int(max(lengths))
        own = torch.cat([self.counts.indices(), self.counts.values()[None]])  # (3, nnz)
        own = F.pad(own, (0, longest - own.shape[1]))
        parts = [torch.empty_like(own) for _ in lengths]
        dist.all_gather(parts, own)
        every = torch.cat([p[:, : int(k)] for p, k in zip(parts, lengths, strict=True)], 1)
        self.counts = self._sparse(every[:2], every[2], self.counts.shape).coalesce()

    def _table(self) -> torch.Tensor:
        """The counts as a dense table: sparse ones as (C, most codes one codebook used), each
        row its codebook's non-zero counts and then zeros. Unused codes add nothing to
        code_stats' used count or perplexity, so both come out the same as from the full table."""
        if not self.counts.is_sparse:
            return self.counts
        rows, values = self.counts.indices()[0], self.counts.values()  # coalesced: rows sorted
        used = torch.bincount(rows, minlength=len(self.counts))
        cols = torch.arange(len(rows), device=rows.device) - (used.cumsum(0) - used)[rows]
        table = values.new_zeros(len(self.counts), max(int(used.max()), 1))
        table[rows, cols] = values
        return table

    def stats(self) -> dict:
        """code_stats of the counts; {} before any update."""
        if self.counts is None:
            return {}
        return code_stats(self._table(), self._sizes(len(self.counts)))

    def every_code(self) -> torch.Tensor:
        """The counts of every code of every codebook, (sum(sizes),): the padding left out.
        Dense counts only (a sparse table's every code may not fit in memory)."""
        if self.counts.is_sparse:
            raise ValueError(f"every_code: {sum(self._sizes(len(self.counts)))} codes are too many")
        sizes = self._sizes(len(self.counts))
        return torch.cat([row[:k] for row, k in zip(self.counts, sizes, strict=True)])

    def zero_(self) -> None:
        if self.counts is not None and self.counts.is_sparse:
            self.counts = self._empty(self.counts.shape)
        elif self.counts is not None:
            self.counts.zero_()


class Evaluator:
    """Accumulates reconstruction metrics and code counts over an evaluation set.

    update(x, recon, indices) per batch; result() -> dict of means over every image seen and the
    code statistics of all indices seen (CodeCounts, with codebook_sizes as Tokenizer gives them;
    None: none). `all_reduce` sums the accumulators across processes; SSIM stays defined only where
    every process saw images of at least 11 pixels a side.
    """

    def __init__(self, codebook_sizes, device, feature_fn=None):
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # mse, psnr, ssim
        self.n = 0
        self.ssim_defined = True
        # int64 keeps counts exact; K = 196,560 (Leech) is 1.5 MiB.
        self.codes = CodeCounts(codebook_sizes, device) if codebook_sizes else None
        self.feature_fn = feature_fn
        self.real, self.fake = FeatureStats(), FeatureStats()

    @torch.no_grad()
    def update(self, x: torch.Tensor, recon: torch.Tensor, indices: torch.Tensor | None) -> None:
        # Scored as the 8-bit images they are saved as, as the papers' scripts score them: a
        # reconstruction overshooting [-1, 1] is clamped, and one within half a level of the
        # image is the image (the rounding moves PSNR by ~0.06 dB at 38 dB, 0.006 dB at 29 dB).
        recon = to_8bit(recon.float())
        x = to_8bit(x.float())  # data loaders give 8-bit levels already: then a no-op
        m = mse(x, recon)
        p = -10 * torch.log10(m.clamp(min=1e-12))  # a perfect image counts as 120 dB, not inf
        self.ssim_defined &= min(x.shape[-2:]) >= 11
        s = ssim(x, recon) if self.ssim_defined else torch.zeros_like(m)
        self.sums += torch.stack([m.sum(), p.sum(), s.sum()])
        self.n += len(x)
        if self.codes is not None and indices is not None:
            self.codes.update(indices)
        if self.feature_fn is not None:
            self.real.update(self.feature_fn((x + 1) / 2))
            self.fake.update(self.feature_fn((recon + 1) / 2))

    def all_reduce(self) -> None:
        import torch.distributed as dist

        # SSIM is defined for the whole set only if it was on every rank: count the ranks where not.
        n = torch.tensor(
            [float(self.n), float(not self.ssim_defined)],
            dtype=torch.float64,
            device=self.sums.device,
        )
        for t in (self.sums, n):
            dist.all_reduce(t)
        if self.codes is not None:
            self.codes.all_reduce()
        self.n, self.ssim_defined = int(n[0].item()), not n[1].item()
        if self.feature_fn is not None:
            for st in (self.real, self.fake):
                st.all_reduce(self.sums.device)

    def result(self) -> dict:
        if self.n == 0:
            raise ValueError("no images were evaluated")
        m, p, s = (self.sums / self.n).tolist()
        out = {"images": self.n, "mse": m, "psnr": p, "ssim": s if self.ssim_defined else None}
        if self.codes is not None:
            out.update(self.codes.stats())
        if self.feature_fn is not None:
            out["rfid"] = frechet_distance(*self.real.mean_cov(), *self.fake.mean_cov())
        return out


def check_feature_file(path) -> None:
    """FileNotFoundError unless eval.fid_features names a file."""
    from pathlib import Path

    if not Path(path).is_file():
        raise FileNotFoundError(
            f"eval.fid_features {str(path)!r} does not exist: give a TorchScript file mapping "
            "(B, 3, H, W) images in [0, 1] to (B, F) features, or set eval.fid_features=null"
        )


def load_feature_fn(path, device):
    """A TorchScript feature extractor from a local file (e.g. an exported Inception for rFID):
    (B, 3, H, W) in [0, 1] (8-bit levels, at the evaluation resolution) -> (B, F). The file does
    its own resizing and normalization, e.g. pytorch-fid's InceptionV3([3], resize_input=True,
    normalize_input=True) (299 x 299 bilinear, then [-1, 1]) returning its pool3 features (B, 2048);
    torch-fidelity's extractor takes uint8 and needs (255 x).round().to(torch.uint8) first.
    Never downloads. ValueError naming the key where the file is no TorchScript module (e.g. a
    torch.save'd state_dict)."""
    check_feature_file(path)
    try:
        net = torch.jit.load(str(path), map_location=device).eval()
    except RuntimeError as e:  # torch's miniz errors: "failed locating file constants.pkl"
        raise ValueError(_not_extractor(path, e)) from e

    def features(x):
        return net(x).flatten(1)

    return features


def _not_extractor(path, e: Exception) -> str:
    return (
        f"eval.fid_features {str(path)!r} is not a TorchScript feature extractor "
        f"({type(e).__name__}: {str(e).splitlines()[0][:120]}): give a file written by "
        "torch.jit.script(net).save(path) mapping (B, 3, H, W) images in [0, 1] to (B, F) "
        "features, or set eval.fid_features=null"
    )


@torch.no_grad()
def check_feature_fn(path, device, resolution: int) -> None:
    """ValueError unless eval.fid_features loads (load_feature_fn) and maps two black images
    (2, 3, resolution, resolution) to (2, F) features: the trainer checks this at start, since the
    extractor first runs at an evaluation, possibly after all of training."""
    features = load_feature_fn(path, device)
    try:
        out = features(torch.zeros(2, 3, resolution, resolution, device=device))
    except Exception as e:  # whatever the user's network raises, or no tensor to flatten
        raise ValueError(_not_extractor(path, e)) from e
    if len(out) != 2 or not out.is_floating_point():
        raise ValueError(_not_extractor(path, ValueError(f"2 images gave {out.dtype} {out.shape}")))

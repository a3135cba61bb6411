"""Metrics on inputs with known answers; the Fréchet distance against scipy.linalg.sqrtm."""

import math

import numpy as np
import pytest
import torch

from fastvq.train.metrics import (
    CodeCounts,
    Evaluator,
    FeatureStats,
    code_stats,
    frechet_distance,
    mse,
    psnr,
    ssim,
    to_8bit,
    trace_sqrt_product,
)


def _levels(g, shape, lo=0, hi=255):
    """Images on the 8-bit grid, as data loaders give them: uint8 levels lo..hi in [-1, 1]."""
    return torch.randint(lo, hi + 1, shape, generator=g).double() / 127.5 - 1


def _scipy_fid(mu1, s1, mu2, s2):
    from scipy import linalg

    covmean = linalg.sqrtm(s1 @ s2)
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("f,n", [(3, 50), (16, 40), (24, 200)])
def test_frechet_distance_matches_scipy(f, n):
    pytest.importorskip("scipy")
    g = torch.Generator().manual_seed(f)
    a = torch.randn(n, f, generator=g, dtype=torch.float64)
    b = (
        torch.randn(n, f, generator=g, dtype=torch.float64)
        @ torch.randn(f, f, generator=g, dtype=torch.float64)
        + 0.5
    )
    stats = []
    for feats in (a, b):
        st = FeatureStats()
        for chunk in feats.split(7):  # accumulated over batches
            st.update(chunk)
        mu, cov = st.mean_cov()
        np.testing.assert_allclose(mu.numpy(), feats.mean(0).numpy(), rtol=1e-12)
        np.testing.assert_allclose(cov.numpy(), np.cov(feats.numpy().T), rtol=1e-9, atol=1e-12)
        stats.append((mu.numpy(), cov.numpy()))
    ours = frechet_distance(stats[0][0], stats[0][1], stats[1][0], stats[1][1])
    want = _scipy_fid(stats[0][0], stats[0][1], stats[1][0], stats[1][1])
    assert ours == pytest.approx(want, rel=1e-6)
    assert frechet_distance(*stats[0], *stats[0]) == pytest.approx(0, abs=1e-8)
    with pytest.raises(ValueError, match="sigma"):
        frechet_distance(stats[0][0], stats[0][1], stats[1][0][:2], stats[1][1])


def test_mse_psnr_ssim_on_known_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g, dtype=torch.float64) * 1.6 - 0.8
    y = x + 0.2  # 0.1 in [0, 1] units
    torch.testing.assert_close(mse(x, y), torch.full((2,), 0.01, dtype=torch.float64))
    torch.testing.assert_close(psnr(x, y), torch.full((2,), 20.0, dtype=torch.float64))
    assert torch.isinf(psnr(x, x)).all()
    torch.testing.assert_close(ssim(x, x), torch.ones(2, dtype=torch.float64))
    s = ssim(x, -x)
    assert (s < 0.1).all()
    with pytest.raises(ValueError, match="shapes"):
        mse(x, y[:1])
    with pytest.raises(ValueError, match="11 pixels"):
        ssim(x[..., :8, :8], y[..., :8, :8])
    with pytest.raises(TypeError):
        mse(x.long(), y.long())


@pytest.mark.parametrize("shape", [(1, 3, 24, 20), (2, 1, 13, 17)])
def test_ssim_matches_scipy_gaussian_filter_reference(shape):
    """scikit-image's structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1, channel_axis=0) re-done with scipy.ndimage (mode
    reflect, its default): filter, crop the border, mean over each channel, then the channels;
    per image, grayscale too."""
    ndimage = pytest.importorskip("scipy.ndimage")
    g = torch.Generator().manual_seed(1)
    x = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
    c1, c2, want = 0.01**2, 0.03**2, []

    def f(t):
        return ndimage.gaussian_filter(t, sigma=1.5, truncate=3.5, mode="reflect")  # 11 taps

    for a, b in zip(((x + 1) / 2).numpy(), ((y + 1) / 2).numpy(), strict=True):
        per_channel = []
        for u, v in zip(a, b, strict=True):
            mu_u, mu_v = f(u), f(v)
            vu, vv, cuv = f(u * u) - mu_u**2, f(v * v) - mu_v**2, f(u * v) - mu_u * mu_v
            s_map = ((2 * mu_u * mu_v + c1) * (2 * cuv + c2)) / (
                (mu_u**2 + mu_v**2 + c1) * (vu + vv + c2)
            )
            per_channel.append(s_map[5:-5, 5:-5].mean())
        want.append(np.mean(per_channel))
    np.testing.assert_allclose(ssim(x, y).numpy(), want, rtol=1e-9)


def test_code_stats_and_evaluator():
    st = code_stats(torch.tensor([3, 3, 0, 0]))
    assert st["usage"] == 0.5 and st["codes_used"] == 2
    assert st["perplexity"] == pytest.approx(2.0) and st["entropy_bits"] == pytest.approx(1.0)
    st = code_stats(torch.tensor([1, 1, 1, 1, 4]))
    p = np.array([1, 1, 1, 1, 4]) / 8
    assert st["perplexity"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))

    # Usage is counted over the whole set, not averaged per batch: two batches using disjoint
    # halves of the codebook give full usage and perplexity K.
    ev = Evaluator(8, "cpu")
    x = _levels(torch.Generator().manual_seed(0), (4, 3, 12, 12), 0, 200)
    ev.update(x, x, torch.arange(4).view(1, 2, 2).expand(4, 2, 2))
    ev.update(x, x + 51 / 127.5, torch.arange(4, 8).view(1, 2, 2).expand(4, 2, 2))
    r = ev.result()
    assert r["images"] == 8 and r["usage"] == 1.0 and r["perplexity"] == pytest.approx(8.0)
    assert r["mse"] == pytest.approx(0.02, rel=1e-5)  # half the images off by 51 / 255 = 0.2
    assert r["psnr"] == pytest.approx((120 + 13.979400) / 2, rel=1e-5)  # perfect counts 120 dB
    with pytest.raises(ValueError, match="no images"):
        Evaluator(4, "cpu").result()


def test_code_counts_per_codebook():
    """Residual indices (B, h, w, Q) count per layer, each against its own size: two layers using
    disjoint halves of one 8-code range have usage 1/2 each (pooled counts would say 1), a
    64-code second layer is no out-of-range error, and dropped layers (-1) are not counted."""
    layer0 = torch.arange(4).repeat(9).view(1, 6, 6)
    ev = Evaluator(8, "cpu")
    x = torch.rand(2, 3, 12, 12) * 1.6 - 0.8
    ev.update(x, x, torch.stack([layer0, layer0 + 4], -1).expand(2, 6, 6, 2))
    r = ev.result()
    assert r["usage"] == 0.5 and r["codes_used"] == 8 and r["perplexity"] == pytest.approx(4.0)

    codes = CodeCounts((8, 64), "cpu")
    second = torch.arange(36).view(1, 6, 6)
    second[0, 0, :3] = -1  # quantize dropout skipped the layer at three positions
    codes.update(torch.stack([layer0, second], -1))
    assert codes.counts.shape == (2, 64) and codes.counts.sum(1).tolist() == [36, 33]
    st = codes.stats()
    assert st["usage"] == pytest.approx((4 / 8 + 33 / 64) / 2)
    assert st["perplexity"] == pytest.approx((4 + 33) / 2)
    assert st["entropy_bits"] == pytest.approx((2 + math.log2(33)) / 2)
    assert codes.every_code().shape == (72,) and int(codes.every_code().sum()) == 69
    with pytest.raises(ValueError, match="below their codebook's size"):
        codes.update(torch.stack([layer0 + 5, second], -1))  # 8 is past the first codebook
    with pytest.raises(ValueError, match="3 codes per position"):
        codes.update(torch.zeros(1, 2, 2, 3, dtype=torch.long))


def test_sparse_code_counts_match_dense_ones(monkeypatch):
    """Above DENSE_LIMIT entries the counts are sparse: the same statistics as the dense table
    (per codebook, dropped layers skipped), zeroed to empty."""
    g = torch.Generator().manual_seed(3)
    batches = [torch.stack([torch.randint(-1, 8, (2, 3, 3), generator=g),
                            torch.randint(-1, 64, (2, 3, 3), generator=g)], -1)
               for _ in range(3)]  # fmt: skip
    dense = CodeCounts((8, 64), "cpu")
    for b in batches:
        dense.update(b)
    monkeypatch.setattr(CodeCounts, "DENSE_LIMIT", 2 * 64 - 1)
    sparse = CodeCounts((8, 64), "cpu")
    for b in batches:
        sparse.update(b)
    assert sparse.counts.is_sparse and torch.equal(sparse.counts.to_dense(), dense.counts)
    want, got = dense.stats(), sparse.stats()
    assert got["usage"] == want["usage"] and got["codes_used"] == want["codes_used"]
    for key in ("perplexity", "entropy_bits"):
        assert got[key] == pytest.approx(want[key], rel=1e-12)
    with pytest.raises(ValueError, match="72 codes are too many"):
        sparse.every_code()
    sparse.zero_()
    assert sparse.counts._nnz() == 0 and sparse.stats()["codes_used"] == 0


def test_code_counts_of_a_huge_implicit_codebook():
    """BSQ's 2**36 codes: a dense table would be 512 GiB; the sparse one counts exactly."""
    codes = CodeCounts(2**36, "cpu")
    last = 2**36 - 1
    codes.update(torch.tensor([[[0, last], [last, 5]]]))
    st = codes.stats()
    assert st["codes_used"] == 3 and st["usage"] == 3 / 2**36
    assert st["perplexity"] == pytest.approx(8**0.5)  # p = 1/4, 1/2, 1/4
    with pytest.raises(ValueError, match="below their codebook's size"):
        codes.update(torch.tensor([[[2**36]]]))


def test_evaluator_clamps_reconstructions_to_the_image_range():
    """A reconstruction overshooting [-1, 1] is scored as the image it displays (clamped)."""
    g = torch.Generator().manual_seed(4)
    x = _levels(g, (2, 3, 12, 12), 25, 230)
    recon = x + torch.randn(x.shape, generator=g, dtype=torch.float64)
    assert (recon.abs() > 1).any()
    ev = Evaluator(None, "cpu")
    ev.update(x, recon, None)
    r = ev.result()
    clamped = to_8bit(recon.clamp(-1, 1))
    assert r["mse"] == pytest.approx(mse(x, clamped).mean().item(), rel=1e-6)
    assert r["ssim"] == pytest.approx(ssim(x, clamped).mean().item(), rel=1e-6)


def _llamagen_psnr(x, recon):
    """LlamaGen's tokenizer/tokenizer_image/reconstruction_vq_ddp.py: the reconstruction to uint8 by
    clamp(127.5 r + 128, 0, 255) truncated, /255; the ground truth (x + 1) / 2 as it is; skimage's
    peak_signal_noise_ratio (data range 1 for float images in [0, 1]) per image, averaged."""
    gt = ((x + 1) / 2).numpy()
    r = torch.clamp(127.5 * recon + 128.0, 0, 255).to(torch.uint8).numpy().astype(np.float32) / 255
    err = ((r.astype(np.float64) - gt) ** 2).reshape(len(gt), -1).mean(1)
    return float(np.mean(10 * np.log10(1 / err)))


def test_evaluator_scores_the_8bit_images_as_llamagen_does():
    """Reconstructions are rounded to the 256 levels of the saved image before any metric: PSNR
    is then LlamaGen's number (the float reconstruction read 0.018 dB higher here, 36.549 for
    36.531), and one within half a level of the image is the image (it read 56 dB)."""
    g = torch.Generator().manual_seed(5)
    x = _levels(g, (6, 3, 16, 16))
    recon = x + 0.03 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    ev = Evaluator(None, "cpu")
    ev.update(x, recon, None)
    assert ev.result()["psnr"] == pytest.approx(_llamagen_psnr(x, recon), abs=1e-4)

    ev = Evaluator(None, "cpu")
    ev.update(x, x + 0.4 / 127.5, None)  # 0.4 of a level
    r = ev.result()
    assert r["mse"] == 0 and r["psnr"] == pytest.approx(120) and r["ssim"] == pytest.approx(1)

    torch.testing.assert_close(to_8bit(x), x, rtol=0, atol=1e-12)  # the data's levels stay
    # 0 lies halfway between levels 127 and 128: it rounds up, as floor(127.5 x + 128) does
    torch.testing.assert_close(
        to_8bit(torch.tensor([-1.5, 1.5, 0.0])), torch.tensor([-1, 1, 1 / 255])
    )


def test_feature_extractor_gets_8bit_images_in_unit_range():
    """rFID's extractor sees what the PSNR sees: [0, 1] on the 1/255 grid, real and
    reconstructed, as the papers' Inception saw their PNG files."""
    seen = []

    def feature_fn(t):
        seen.append(t)
        return t.mean((2, 3))

    g = torch.Generator().manual_seed(6)
    x = _levels(g, (4, 3, 12, 12))
    recon = 1.2 * x + 0.05 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    ev = Evaluator(None, "cpu", feature_fn)
    ev.update(x, recon, None)
    assert len(seen) == 2 and ev.result()["rfid"] > 0
    for t in seen:
        assert t.min() >= 0 and t.max() <= 1
        torch.testing.assert_close(t * 255, (t * 255).round(), rtol=0, atol=1e-4)


def test_evaluator_ssim_is_null_for_images_without_an_11_pixel_window():
    """eval.json must stay valid JSON (no NaN) for 8 x 8 images: SSIM is None, the rest scored."""
    import json

    g = torch.Generator().manual_seed(6)
    x = _levels(g, (4, 3, 8, 8))
    ev = Evaluator([16], "cpu")
    ev.update(x, x.flip(0), torch.randint(0, 16, (4, 2, 2), generator=g))
    r = ev.result()
    assert r["ssim"] is None and r["mse"] > 0 and math.isfinite(r["psnr"])
    assert json.loads(json.dumps(r, allow_nan=False)) == r


@pytest.mark.parametrize(
    "sizes, defined",
    [
        ([(11, 11)], True),
        ([(10, 10)], False),
        ([(8, 16)], False),
        ([(16, 8)], False),
        ([(8, 8), (12, 12)], False),
    ],
)
def test_evaluator_ssim_needs_every_image_11_pixels_on_each_side(sizes, defined):
    """11 x 11 images hold one window and are scored; an image under 11 pixels on either side, in
    any batch, makes SSIM None, also where later batches would have a window."""
    g = torch.Generator().manual_seed(7)
    ev = Evaluator(None, "cpu")
    scores = []
    for h, w in sizes:
        x = _levels(g, (2, 3, h, w))
        ev.update(x, x.flip(0), None)
        scores.append(ssim(x, x.flip(0)) if defined else None)
    got = ev.result()["ssim"]
    if defined:
        assert got == pytest.approx(torch.cat(scores).mean().item())
    else:
        assert got is None


@pytest.mark.parametrize("n", [10, 400])
def test_frechet_distance_of_rank_deficient_covariances(n):
    """M10: fewer images than features (rFID on a small evaluation set): the exact distance, and
    0 for a set against itself. The square roots of the zero eigenvalues' rounding noise once
    added up to -8e-4 at 400 images of 2048 ReLU features (here 1024)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 1024, generator=g, dtype=torch.float64) * 0.1
    feats = [torch.randn(n, 64, generator=g, dtype=torch.float64) @ w + 0.3]
    noise = torch.randn(feats[0].shape, generator=g, dtype=torch.float64)
    feats = [feats[0].relu(), (feats[0] + 0.05 * noise).relu()]
    stats = []
    for f in feats:
        st = FeatureStats()
        st.update(f)
        stats.append(st.mean_cov())
    (mu1, s1), (mu2, s2) = stats
    # Exact: the nonzero eigenvalues of s1 s2 = a.T a s2 are those of the n x n a s2 a.T, but
    # for the one of the all-ones vector, which centring takes out of a.T (dropped: the least).
    a = (feats[0] - mu1) / (n - 1) ** 0.5
    cross = torch.linalg.eigvalsh(a @ s2 @ a.T)[1:].sqrt().sum()
    want = (mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * cross
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want.item(), rel=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-9)


@pytest.mark.parametrize("power", [1.5, 3.0])
def test_trace_sqrt_product_of_ill_conditioned_covariances(power):
    """More images than features, eigenvalues spanning 1e-8 (1e-15) to 1: tr sqrt(s1 s2) to
    1e-10. Through the eigenvalues of sqrt(s1) s2 sqrt(s1), whose range is the square of one
    covariance's, it was off by 1e-5 (flooring them at n * eps * max) or 4e-7 (not)."""
    g = torch.Generator().manual_seed(0)
    n, f = 1000, 256
    sv = torch.arange(1, f + 1, dtype=torch.float64) ** -power
    w = torch.linalg.qr(torch.randn(f, f, generator=g, dtype=torch.float64))[0] * sv
    a = []
    for _ in range(2):
        x = torch.randn(n, f, generator=g, dtype=torch.float64) @ w.T
        a.append((x - x.mean(0)) / (n - 1) ** 0.5)
    s1, s2 = (t.T @ t for t in a)
    # Exact: tr sqrt(a1.T a1 a2.T a2) is the sum of the singular values of a1 a2.T.
    want = torch.linalg.svdvals(a[0] @ a[1].T).sum()
    torch.testing.assert_close(trace_sqrt_product(s1, s2), want, rtol=1e-10, atol=0)
    assert abs(frechet_distance(torch.zeros(f), s1, torch.zeros(f), s1)) < 1e-10


def test_feature_stats_accumulate_float32_features_in_float64():
    """M22: float32 features with a large mean: the covariance is the float64 one."""
    g = torch.Generator().manual_seed(0)
    f = (torch.rand(4096, 8, generator=g, dtype=torch.float64) * 0.1 + 10).float()
    st = FeatureStats()
    for chunk in f.split(256):
        st.update(chunk)
    _, cov = st.mean_cov()
    torch.testing.assert_close(cov, torch.cov(f.double().T), rtol=1e-6, atol=1e-9)


def test_feature_stats_need_two_rows():
    """M12."""
    st = FeatureStats()
    st.update(torch.randn(1, 4))
    with pytest.raises(ValueError, match="at least 2"):
        st.mean_cov()


def test_code_counts_one_size_for_several_codebooks():
    """M26: sizes given as one int for C codebooks: every_code is (C * K,)."""
    cc = CodeCounts(8, "cpu")
    idx = torch.randint(0, 8, (2, 3, 3, 2), generator=torch.Generator().manual_seed(0))
    cc.update(idx)
    every = cc.every_code()
    assert every.shape == (16,)
    assert torch.equal(every[:8], torch.bincount(idx[..., 0].flatten(), minlength=8))
    assert torch.equal(every[8:], torch.bincount(idx[..., 1].flatten(), minlength=8))


def test_mse_needs_4d_images():
    """M29."""
    with pytest.raises(ValueError, match="B, C, H, W"):
        mse(torch.zeros(3, 4, 4), torch.ones(3, 4, 4))

"""LPIPS: metric properties with random weights, the formula against a functional re-derivation,
weight files with torchvision's / lpips' names round-tripping, and the missing-file error."""

import pytest
import torch
import torch.nn.functional as F

from fastvq.models import LPIPS

# torchvision.models.vgg16().features: conv layers at these indices, with these widths.
VGG16_CONVS = {
    0: 64,
    2: 64,
    5: 128,
    7: 128,
    10: 256,
    12: 256,
    14: 256,
    17: 512,
    19: 512,
    21: 512,
    24: 512,
    26: 512,
    28: 512,
}


@pytest.fixture(scope="module")
def lpips():
    torch.manual_seed(0)
    return LPIPS()


def _images(seed, b=2, res=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, res, res, generator=g, dtype=dtype) * 2 - 1


def test_metric_properties(lpips):
    x, y = _images(1), _images(2)
    d = lpips(x, y)
    assert d.shape == (2,)
    assert (d > 0).all()
    assert torch.equal(d, lpips(y, x))  # symmetric bit for bit: (a - b)^2 = (b - a)^2
    assert torch.equal(lpips(x, x), torch.zeros(2))
    x.requires_grad_(True)
    lpips(x, y).sum().backward()
    assert x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in lpips.parameters())


def test_refuses_images_below_min_size(lpips):
    x = _images(1, res=16)
    assert lpips(x, x.flip(-1)).shape == (2,)  # 16 px: the last tap is 1 x 1
    with pytest.raises(ValueError, match="at least 16 px per side, got .16, 15."):
        lpips(x[..., :15], x[..., 1:])


def test_state_dict_names(lpips):
    state = lpips.state_dict()
    expected = {
        f"features.{i}.weight": (c, c_in, 3, 3)
        for (i, c), c_in in zip(
            VGG16_CONVS.items(), [3, *list(VGG16_CONVS.values())[:-1]], strict=True
        )
    }
    expected |= {f"features.{i}.bias": (c,) for i, c in VGG16_CONVS.items()}
    expected |= {
        f"lin{i}.model.1.weight": (1, c, 1, 1) for i, c in enumerate([64, 128, 256, 512, 512])
    }
    assert {k: tuple(v.shape) for k, v in state.items()} == expected


def _reference(state, x, y):
    """LPIPS re-derived with functional ops from the state dict (lpips.LPIPS(net='vgg') math)."""
    return sum(_reference_terms(state, x, y))


def _reference_terms(state, x, y):
    """The five layers' terms of _reference, each (B,)."""
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=x.dtype).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=x.dtype).view(1, 3, 1, 1)
    taps = {2: 0, 7: 1, 14: 2, 21: 3, 28: 4}  # the conv whose relu is relu1_2 ... relu5_3
    feats = []
    for h in (x, y):
        h, out = (h - shift) / scale, []
        for i in sorted(VGG16_CONVS):
            if i in (5, 10, 17, 24):
                h = F.max_pool2d(h, 2)
            h = F.relu(
                F.conv2d(h, state[f"features.{i}.weight"], state[f"features.{i}.bias"], padding=1)
            )
            if i in taps:
                out.append(h / (h.norm(dim=1, keepdim=True) + 1e-10))
        feats.append(out)
    terms = []
    for k, (a, b) in enumerate(zip(*feats, strict=True)):
        w = state[f"lin{k}.model.1.weight"].view(1, -1, 1, 1)
        terms.append(((a - b) ** 2 * w).sum(1).mean((1, 2)))
    return terms


def test_matches_functional_reference(lpips):
    x, y = _images(3), _images(4)
    # float32 on both sides: float64 convolutions cost 4 s more here than the check is worth.
    ref = _reference(lpips.state_dict(), x, y)
    torch.testing.assert_close(lpips(x, y), ref, rtol=1e-4, atol=1e-6)


def test_target_without_grad_builds_no_graph(lpips):
    """The loss's usual call, lpips(target, reconstruction): only the reconstruction's pass
    saves activations for the backward, about half of what two inputs with grad save."""

    def saved(x, y):
        count = [0]

        def pack(t):
            count[0] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lpips(x, y).sum().backward()
        return count[0]

    x, y = _images(5), _images(6)
    both = saved(x.clone().requires_grad_(), y.clone().requires_grad_())
    one = saved(x, y.clone().requires_grad_())
    assert 0 < one < 0.6 * both


def test_weight_files_round_trip(tmp_path, lpips):
    torch.manual_seed(1)
    other = LPIPS()  # different random weights
    x, y = _images(5), _images(6)
    assert not torch.allclose(other(x, y), lpips(x, y))
    state = lpips.state_dict()
    backbone = {k: v.clone() for k, v in state.items() if k.startswith("features.")}
    backbone["classifier.0.weight"] = torch.randn(4, 4)  # torchvision files carry these too
    head = {k: v.clone() for k, v in state.items() if k.startswith("lin")}
    torch.save(backbone, tmp_path / "vgg16.pth")
    torch.save(head, tmp_path / "vgg.pth")
    loaded = LPIPS.from_files(tmp_path / "vgg16.pth", tmp_path / "vgg.pth")
    assert torch.equal(loaded(x, y), lpips(x, y))
    loaded.train()
    assert not loaded.training  # dropout in the heads stays off


def test_missing_or_wrong_files(tmp_path, lpips):
    with pytest.raises(FileNotFoundError, match="backbone.*vgg16"):
        LPIPS.from_files(tmp_path / "nope.pth", tmp_path / "vgg.pth")
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="lacks"):
        lpips.load_backbone(tmp_path / "partial.pth")
    assert lpips.features[0].weight.abs().sum() > 0  # a failed load changes nothing
    with pytest.raises(FileNotFoundError, match="head.*lin0"):
        lpips.load_head(tmp_path / "missing_head.pth")
    with pytest.raises(ValueError, match="B, 3, H, W"):
        lpips(torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 16))


def test_every_tap_matches_the_reference():
    """With random weights the deep taps' terms are ~1e-10 of the first's (deep random features
    all point alike), so the test above cannot see relu4_3 / relu5_3. Here each head is divided
    by its layer's float64 reference term: every layer then adds about 1 to the distance."""
    torch.manual_seed(0)
    model = LPIPS().double()
    x, y = _images(7, dtype=torch.float64), _images(8, dtype=torch.float64)
    terms = _reference_terms(model.state_dict(), x, y)
    assert min(t.min().item() for t in terms) > 0
    with torch.no_grad():
        for i, t in enumerate(terms):
            getattr(model, f"lin{i}").model[1].weight.div_(t.mean())
    expected = sum(t / t.mean() for t in terms)
    torch.testing.assert_close(model(x, y), expected, rtol=1e-7, atol=0)

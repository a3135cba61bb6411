"""LPIPS (Zhang et al. 2018) with a VGG16 backbone in plain torch; weights only from local files.

Parameter names match the two files people already have, so they load as they are:
  backbone: torchvision's vgg16 state_dict (`features.N.weight`, `features.N.bias`; the
            `classifier.*` entries are ignored), e.g. vgg16-397923af.pth from torch's hub cache;
  head:     the lpips package's linear heads (`lin0.model.1.weight` ... `lin4.model.1.weight`),
            i.e. lpips/weights/v0.1/vgg.pth from `pip download lpips`.
Nothing is ever downloaded: a missing file is an error that says which file to provide.
"""

import os

import torch
import torch.nn.functional as F
from torch import nn

# torchvision's vgg16 "D" configuration: conv widths, "M" = 2x2 max-pool.
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
# LPIPS taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: indices into vgg16.features.
TAPS = (3, 8, 15, 22, 29)
CHANNELS = (64, 128, 256, 512, 512)
# lpips' ScalingLayer: inputs in [-1, 1] -> ImageNet-normalized, in lpips' own constants.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)

BACKBONE_HINT = (
    "torchvision's vgg16 ImageNet state_dict (keys features.N.weight/bias), e.g. "
    "vgg16-397923af.pth from ~/.cache/torch/hub/checkpoints"
)
HEAD_HINT = (
    "the lpips package's VGG linear heads, lpips/weights/v0.1/vgg.pth "
    "(keys lin0.model.1.weight ...)"
)


def vgg16_features() -> nn.Sequential:
    """torchvision.models.vgg16().features up to relu5_3, with torchvision's module indices."""
    layers, c_in = [], 3
    for v in VGG16_CFG[:-1]:  # the last pool is never tapped
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU()]
            c_in = v
    return nn.Sequential(*layers)


class _Lin(nn.Module):
    """lpips.NetLinLayer: Dropout, then a bias-free 1x1 conv to one channel (model.0, model.1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


def _load(path, hint: str, what: str) -> dict:
    if path is None or not os.path.isfile(os.fspath(path)):
        raise FileNotFoundError(
            f"LPIPS {what} file not found: {path!r}. Provide {hint} and set its path in the "
            f"config (loss.lpips.{what}), or disable the perceptual loss "
            "(loss.perceptual_weight=0, loss.lpips=null). fastvq never downloads weights."
        )
    return torch.load(os.fspath(path), map_location="cpu", weights_only=True)


class LPIPS(nn.Module):
    """Learned perceptual distance: lpips(x, y) (B,) for x, y (B, 3, H, W) in [-1, 1].

    d = sum over the five taps l of mean_hw( w_l . (f_l(x)^ - f_l(y)^)^2 ), f^ = f / (|f|_c + 1e-10)
    (unit-normalized over channels), w_l >= 0 the linear heads: lpips' "vgg" v0.1 model exactly.
    Frozen (requires_grad False, eval mode); gradients still flow to the inputs.

    As a metric this is LPIPS-VGG, the taming/LlamaGen perceptual loss's network: the lpips
    package's default and recommended metric is AlexNet (lpips.LPIPS(net='alex')), whose values
    differ, so compare with papers' LPIPS-VGG numbers only (SimVQ's evaluation reports both).

    Images need at least min_size = 16 px per side: the deepest tap follows four 2x2 poolings.

    LPIPS() has random weights (heads |N(0, 1)| so distances are positive): for tests and shapes.
    LPIPS.from_files(backbone, head) loads the real ones.
    """

    min_size = 16

    def __init__(self):
        super().__init__()
        self.features = vgg16_features()
        for i, c in enumerate(CHANNELS):
            lin = _Lin(c)
            with torch.no_grad():
                nn.init.normal_(lin.model[1].weight).abs_()
            self.add_module(f"lin{i}", lin)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_files(cls, backbone, head) -> "LPIPS":
        """Build with torchvision's vgg16 state_dict at `backbone` and lpips' vgg.pth at `head`."""
        model = cls()
        model.load_backbone(backbone)
        model.load_head(head)
        return model

    def load_backbone(self, path) -> None:
        state = _load(path, BACKBONE_HINT, "backbone")
        expected = [k for k in self.state_dict() if k.startswith("features.")]
        missing = [k for k in expected if k not in state]
        if missing:
            raise ValueError(
                f"backbone file {path!r} lacks {missing[:4]}...; expected {BACKBONE_HINT}"
            )
        self.load_state_dict({k: state[k] for k in expected}, strict=False)

    def load_head(self, path) -> None:
        state = _load(path, HEAD_HINT, "head")
        expected = [f"lin{i}.model.1.weight" for i in range(len(CHANNELS))]
        missing = [k for k in expected if k not in state]
        if missing:
            raise ValueError(f"head file {path!r} lacks {missing}; expected {HEAD_HINT}")
        self.load_state_dict({k: state[k] for k in expected}, strict=False)

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # always eval: the heads' Dropout must stay off

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, h = [], (x - self.shift) / self.scale
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in TAPS:
                out.append(h / (h.square().sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(
                f"x and y must both be (B, 3, H, W), got {tuple(x.shape)}, {tuple(y.shape)}"
            )
        if min(x.shape[-2:]) < self.min_size:
            raise ValueError(
                f"x and y need at least {self.min_size} px per side, got {tuple(x.shape[-2:])}"
            )
        # One pass each, as lpips does: the weights are frozen, so an input without grad (the
        # target) builds no graph, where one pass of torch.cat([x, y]) kept both halves'
        # activations and ran the backward through both.
        taps = []
        for t in (x, y):
            with torch.set_grad_enabled(torch.is_grad_enabled() and t.requires_grad):
                taps.append(self._taps(t))
        d = 0
        for i, (fx, fy) in enumerate(zip(*taps, strict=True)):
            lin = getattr(self, f"lin{i}").model[1]
            d = d + F.conv2d((fx - fy).square(), lin.weight).mean((1, 2, 3))
        return d

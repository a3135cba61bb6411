import pytest
import torch

from fastvq.train.config import load_config
from fastvq.train.data import TensorImages

TINY_MODEL = [
    "model.arch=rotated_vqvae",
    "model.ch=4",
    "model.ch_mult=[1,2]",
    "model.num_res_blocks=1",
    "model.z_channels=8",
    "model.attn_heads=2",
    "model.quantizer={type: VectorQuantize, codebook_size: 16, decay: 0.8}",
]


def smooth_images(n: int, res: int = 16, seed: int = 0) -> torch.Tensor:
    """(n, 3, res, res) uint8 images of random low-frequency colour blobs: learnable structure,
    unlike white noise, so a few steps of training visibly lower the reconstruction error."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 2, 2, generator=g)
    img = torch.nn.functional.interpolate(low, size=(res, res), mode="bilinear")
    return (img * 255).round().to(torch.uint8)


def tiny_config(tmp_path, *overrides) -> dict:
    """A validated config for a few-thousand-parameter tokenizer at 16x16 on CPU."""
    return load_config(
        None,
        [
            *TINY_MODEL,
            "data.resolution=16",
            "train.batch_size=8",
            "train.steps=6",
            "train.log_every=2",
            "train.progress=false",
            "train.device=cpu",
            f"train.out_dir={tmp_path / 'run'}",
            "optim.lr=3e-3",
            "eval.batch_size=16",
            *overrides,
        ],
    )


def tiny_datasets(n_train: int = 64, n_eval: int = 16, res: int = 16):
    return (
        TensorImages(smooth_images(n_train, res, seed=1), res, train=True),
        TensorImages(smooth_images(n_eval, res, seed=2), res, train=False),
    )


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convolutions: one intra-op thread avoids oversubscribing the shared 2-core machine."""
    was = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(was)


@pytest.fixture
def make_config(tmp_path):
    """make_config(*overrides) -> tiny_config(tmp_path, *overrides)."""
    return lambda *overrides: tiny_config(tmp_path, *overrides)


@pytest.fixture
def datasets():
    return tiny_datasets()

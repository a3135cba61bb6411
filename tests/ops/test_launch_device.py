"""Every Triton host launcher runs on its inputs' GPU: Triton launches on the current device,
so inputs on cuda:1 with cuda:0 current ran on cuda:0 with cuda:1's pointers. Checked on the CPU
with a stand-in tensor and a recording torch.cuda.device (no multi-GPU machine here)."""

import contextlib
import importlib
import inspect

import pytest
import torch
from fastvq.kernels import on_input_device

MODULES = ["e8", "ema", "leech", "nearest_code", "quantize", "scalar"]


def test_every_public_launcher_takes_its_inputs_device():
    launchers = []
    for name in MODULES:
        module = importlib.import_module(f"fastvq.kernels.{name}")
        for attr, fn in vars(module).items():
            if inspect.isfunction(fn) and fn.__module__ == module.__name__:
                if not attr.startswith("_"):
                    launchers.append(fn)
    assert len(launchers) >= 15
    unguarded = [f.__name__ for f in launchers if getattr(f, "__wrapped__", None) is None]
    assert unguarded == []


class _OnSecondGpu:
    is_cuda = True
    device = torch.device("cuda", 1)


def test_on_input_device_makes_the_inputs_gpu_current(monkeypatch):
    current = ["cuda:0"]

    @contextlib.contextmanager
    def device(d):
        was, current[0] = current[0], str(d)
        yield
        current[0] = was

    monkeypatch.setattr(torch.cuda, "device", device)
    seen = []
    launch = on_input_device(lambda x, *args, **kwargs: seen.append((current[0], args, kwargs)))
    launch(_OnSecondGpu(), 3, block=4)
    launch(torch.zeros(2), 5)  # CPU tensors (the interpreter) leave the device alone
    assert seen == [("cuda:1", (3,), {"block": 4}), ("cuda:0", (5,), {})]
    assert current == ["cuda:0"]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_nearest_code_on_the_second_gpu():
    import fastvq

    z, codebook = torch.randn(100, 16, device="cuda:1"), torch.randn(50, 16, device="cuda:1")
    with torch.cuda.device(0):
        got = fastvq.nearest_code(z, codebook, backend="triton")
    want = torch.cdist(z.double(), codebook.double()).argmin(1)
    assert got.device == z.device and torch.equal(got, want)

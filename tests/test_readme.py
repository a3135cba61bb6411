"""The README's Python examples run as written, at small sizes on the CPU: a renamed function or
argument fails here before a newcomer finds it."""

import os
import re

import pytest
import torch

import fastvq

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
BLOCKS = re.findall(r"```python\n(.*?)```", open(README).read(), re.DOTALL)


def _small(code: str) -> str:
    """The README's shapes (65,536 vectors and codes on a GPU) scaled to the CPU tests'."""
    return code.replace('device="cuda"', 'device="cpu"').replace("65536", "64")


def _inputs() -> dict:
    """What the examples assume their reader already has: z (N, 32) or (N, 6) or (N, 24)
    latents by section, x encoder outputs, the EMA statistics."""
    k = 64
    return {
        "torch": torch,
        "fastvq": fastvq,
        "z": torch.randn(200, 32),
        "codebook": torch.randn(k, 32),
        "x": torch.randn(300, 32),
        "cluster_size": torch.rand(k) + 0.5,
        "embed_sum": torch.randn(k, 32),
        "counts": torch.zeros(k, dtype=torch.int64),
        "z8": torch.randn(50, 8),
    }


def test_readme_has_the_examples_this_test_runs():
    assert len(BLOCKS) == 5, "update _inputs() and the cases below with the README's examples"


@pytest.mark.parametrize("block", range(len(BLOCKS)))
def test_readme_example_runs(block):
    code = _small(BLOCKS[block])
    env = _inputs()
    if "fastvq.fsq(" in code:
        env["z"] = torch.randn(200, 6)  # FSQ's levels set D = 6; LFQ/BSQ take any d <= 62
    if "lattice.leech_quantize" in code:
        env["z"] = torch.randn(40, 24)
    if "VectorQuantize(" in code:
        env["x"] = torch.randn(2, 40, 256)
    exec(compile(code, f"README.md block {block}", "exec"), env)
    if "nearest_code" in code:
        assert env["idx"].shape == (64,) and env["top8"].shape == (64, 8)
        assert torch.equal(env["top8"][:, 0], env["idx"])
    if "VectorQuantize(" in code:
        assert env["quantized"].shape == env["x"].shape and env["indices"].shape == (2, 40)

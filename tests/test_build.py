"""Build checks that need no GPU: the CUDA sources compile with nvcc (torch-free by design)."""

import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=os.path.basename)
def test_cuda_source_compiles(source, tmp_path):
    # sm_90 is the target (H100); sm_80 keeps the portable WMMA path honest.
    for arch in ("sm_90", "sm_80"):
        result = subprocess.run(
            [
                "nvcc",
                "-std=c++17",
                "-O3",
                f"-arch={arch}",
                "-Werror",
                "all-warnings",
                "-c",
                source,
                "-o",
                str(tmp_path / f"{arch}.o"),
            ],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr


def test_cuda_sources_include_no_torch_headers():
    # The CPU torch wheel ships no CUDA headers: a .cu that includes torch compiles nowhere here.
    for source in CUDA_SOURCES:
        text = open(source).read()
        for header in ("<torch/", "<ATen/", "<c10/"):
            assert header not in text, f"{source} includes {header}"

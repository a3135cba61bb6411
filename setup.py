"""Build fastvq._C from csrc/: CPU kernels always, CUDA kernels when torch has CUDA and nvcc exists.

Install with `pip install --no-build-isolation -e .` after torch (see the README): build isolation
would fetch a second, multi-GB torch just to compile against.
"""

import glob
import os
import re

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as e:  # pragma: no cover - only without torch
    raise SystemExit(
        "fastvq builds against an installed torch: install torch first, then "
        "`pip install --no-build-isolation -e .`"
    ) from e


# The CUDA kernels use bf16 and tf32 tensor cores (PTX mma.sync): compute capability 8.0 and up.
MIN_CUDA_ARCH = (8, 0)
# Without a visible GPU: Ampere SASS, Hopper SASS, and Hopper PTX that newer GPUs compile at load.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
_NAMED_ARCHS_SUPPORTED = ("Ampere", "Ampere+Tegra", "Ada", "Hopper", "Blackwell", "Blackwell+Tegra")


def _arch_supported(entry: str) -> bool:
    """One TORCH_CUDA_ARCH_LIST entry ("8.6", "9.0a+PTX", "Hopper", ...) is >= MIN_CUDA_ARCH."""
    number = re.match(r"(\d+)\.(\d+)", entry)
    if number is None:
        return entry in _NAMED_ARCHS_SUPPORTED
    return (int(number[1]), int(number[2])) >= MIN_CUDA_ARCH


def cuda_arch_list(requested: str | None, visible: list[tuple[int, int]]) -> str | None:
    """The TORCH_CUDA_ARCH_LIST to build the CUDA kernels for, or None to build without them.

    requested: the user's TORCH_CUDA_ARCH_LIST (None, "" or "native": the visible GPUs');
    visible: the compute capabilities of the visible GPUs. Architectures below MIN_CUDA_ARCH are
    dropped (a PyTorch image's list usually starts at 5.0 or 7.0, where the kernels do not
    compile); the newest one kept carries PTX if any requested entry did. With neither a list
    nor a GPU (a build box), DEFAULT_CUDA_ARCHS: torch would otherwise fail to pick any.
    """
    if requested and requested != "native":
        entries = requested.replace(" ", ";").split(";")
    elif visible:
        entries = [f"{major}.{minor}" for major, minor in sorted(set(visible))]
        entries[-1] += "+PTX"
    else:
        return DEFAULT_CUDA_ARCHS
    entries = [e for e in entries if e]
    kept = [e for e in entries if _arch_supported(e)]
    if kept and any(e.endswith("+PTX") for e in entries) and not kept[-1].endswith("+PTX"):
        kept[-1] += "+PTX"
    return ";".join(kept) or None


def extensions():
    if os.environ.get("FASTVQ_NO_EXTENSION") == "1":
        return []
    sources = ["csrc/fastvq.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    # -fno-trapping-math: fastvq never reads floating-point exception flags, and without it GCC
    # will not if-convert a loop with a float compare, so branch-free elementwise kernels
    # (csrc/cpu/scalar.cpp) stay scalar. Values are unchanged (NaN rules included).
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-fno-trapping-math"]
    with_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.environ.get("FASTVQ_NO_CUDA") != "1"
    )
    if with_cuda:
        visible = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
        requested = os.environ.get("TORCH_CUDA_ARCH_LIST")
        archs = cuda_arch_list(requested, visible)
        if archs is None:
            print(
                f"fastvq: no CUDA architecture >= {MIN_CUDA_ARCH[0]}.{MIN_CUDA_ARCH[1]} in "
                f"TORCH_CUDA_ARCH_LIST={requested!r} / visible GPUs {visible}: building without "
                "the CUDA kernels (the Triton kernels still run on the GPU)"
            )
            with_cuda = False
        else:
            if archs != requested:
                print(f"fastvq: building the CUDA kernels for TORCH_CUDA_ARCH_LIST={archs}")
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    if not with_cuda:
        return [
            CppExtension(
                "fastvq._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
            )
        ]
    sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
    nvcc = ["-O3", "-std=c++17", "-lineinfo"]
    return [
        CUDAExtension(
            "fastvq._C",
            sources,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    ]


if __name__ == "__main__":  # pip runs this file as __main__; the tests import cuda_arch_list
    setup(
        name="fastvq",
        version="0.1.0",
        # kernels/ and configs/ sit at the top of the repository and install inside the package.
        packages=[
            *find_packages(include=["fastvq", "fastvq.*"]),
            "fastvq.kernels",
            "fastvq.configs",
        ],
        package_dir={"fastvq.kernels": "kernels", "fastvq.configs": "configs"},
        package_data={"fastvq.configs": ["*.yaml"]},
        ext_modules=extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        python_requires=">=3.10",
        # torch is deliberately absent: a bare requirement would let pip replace the installed
        # (CPU or CUDA) torch with a multi-GB CUDA build. Install torch first (see the Makefile).
        install_requires=["numpy", "pillow", "pyyaml"],
        entry_points={"console_scripts": ["fastvq = fastvq.train.cli:run"]},
    )

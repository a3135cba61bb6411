"""Build fastvq._C from csrc/: CPU kernels always, CUDA kernels when torch has CUDA and nvcc exists.

Install with `pip install --no-build-isolation -e .` after torch (see the README): build isolation
would fetch a second, multi-GB torch just to compile against.
"""

import glob
import os

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as e:  # pragma: no cover - only without torch
    raise SystemExit(
        "fastvq builds against an installed torch: install torch first, then "
        "`pip install --no-build-isolation -e .`"
    ) from e


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


setup(
    name="fastvq",
    version="0.1.0",
    # kernels/ and configs/ sit at the top of the repository and install inside the package.
    packages=[*find_packages(include=["fastvq", "fastvq.*"]), "fastvq.kernels", "fastvq.configs"],
    package_dir={"fastvq.kernels": "kernels", "fastvq.configs": "configs"},
    package_data={"fastvq.configs": ["*.yaml"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    # torch is deliberately absent: a bare requirement would let pip replace the installed
    # (CPU or CUDA) torch with a multi-GB CUDA build. Install torch first (see the Makefile).
    install_requires=["numpy", "pillow", "pyyaml"],
    entry_points={"console_scripts": ["fastvq = fastvq.train.cli:main"]},
)

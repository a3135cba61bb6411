"""Build checks that need no GPU: the CUDA sources compile with nvcc (torch-free by design), and
every Triton kernel compiles for sm_90 at the tile sizes its launcher picks on a GPU."""

import glob
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

from fastvq.testing import checkout_env, cuda_include_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
GLUE_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*_torch.cpp")))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=os.path.basename)
def test_cuda_source_compiles(source, tmp_path):
    # With the flags torch's CUDAExtension adds to every .cu of setup.py's build
    # (-D__CUDA_NO_HALF_OPERATORS__ and the like: no implicit half / bf16 arithmetic or
    # conversions), so that code only this check accepts fails here, not on the GPU machine.
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    # sm_90 is the target (H100); sm_80, the oldest the CUDA kernels build for, has mma.sync too.
    for arch in ("sm_90", "sm_80"):
        result = subprocess.run(
            [
                "nvcc",
                *COMMON_NVCC_FLAGS,
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


@pytest.mark.skipif(
    cuda_include_dir() is None or shutil.which("g++") is None, reason="needs nvcc's headers and g++"
)
def test_cuda_glue_parses_against_torch_headers(tmp_path):
    # The torch glue (csrc/cuda/*_torch.cpp) is built only where torch has CUDA, so a typo there
    # would first show on the GPU machine. A CPU wheel still ships the c10/cuda headers, less one
    # header its CMake build generates: stub that, and parse (not link) every glue file.
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    flags = ["-std=c++17", "-fsyntax-only", "-Werror", "-Wall", "-I", str(tmp_path)]
    for path in [*include_paths(), cuda_include_dir(), sysconfig.get_paths()["include"]]:
        flags += ["-isystem", path]
    # One translation unit for all of them: the torch headers dominate (about 10 s per parse).
    # Should that fail, each file alone tells a real error from a name shared between files.
    unit = tmp_path / "all_glue.cpp"
    unit.write_text("".join(f'#include "{source}"\n' for source in GLUE_SOURCES))
    if subprocess.run(["g++", *flags, str(unit)], capture_output=True).returncode == 0:
        return
    for source in GLUE_SOURCES:
        result = subprocess.run(["g++", *flags, source], capture_output=True, text=True)
        assert result.returncode == 0, f"{os.path.basename(source)}:\n{result.stderr[-4000:]}"


def _bundled_ptxas() -> str | None:
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "ptxas")
    return path if os.path.exists(path) else None


@pytest.mark.skipif(_bundled_ptxas() is None, reason="needs triton with its NVIDIA backend")
def test_triton_kernels_compile_for_sm90():
    """The interpreter that runs the Triton kernels in CI checks neither types nor layouts as the
    compiler does, nor the GPU tile sizes: tests/triton_sm90.py compiles every kernel, as each
    launcher would launch it on an H100, to a cubin, and fails if one is never launched there."""
    env = {k: v for k, v in checkout_env().items() if k != "TRITON_INTERPRET"}
    script = os.path.join(ROOT, "tests", "triton_sm90.py")
    result = subprocess.run(
        [sys.executable, script], env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "kernels compiled for sm_90" in result.stdout


def test_cuda_sanitize_script_runs():
    """tests/cuda_sanitize.py, which gpu.sh runs under compute-sanitizer, makes the same calls on
    CPU tensors: the C++ kernels, and where no GPU exists the Triton ones under the interpreter.
    On a GPU machine gpu.sh runs the Triton calls compiled, and the image's Triton may have an
    interpreter its numpy breaks (Triton 3.6's, with numpy 2.4 and later: "only 0-dimensional
    arrays can be converted to Python scalars")."""
    import torch

    import fastvq

    backends = ["cpu"] if torch.cuda.is_available() else ["cpu", "triton"]
    script = os.path.join(ROOT, "tests", "cuda_sanitize.py")
    env = dict(checkout_env(), TRITON_INTERPRET="1")
    cmd = [sys.executable, script, "--device", "cpu", *backends]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    for backend in backends:
        if fastvq.backends()[backend].available:
            assert f"backend {backend} on cpu: every launch returned" in result.stdout


def test_cuda_sanitize_arguments(monkeypatch, capsys):
    """Its command line: no backend named runs both GPU backends on CUDA tensors (gpu.sh's
    memcheck), the C++ one with --device cpu; an unavailable backend is skipped, saying why; an
    unknown one is refused."""
    import fastvq
    from fastvq.ops._backends import Backend

    path = os.path.join(ROOT, "tests", "cuda_sanitize.py")
    spec = importlib.util.spec_from_file_location("cuda_sanitize", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    calls = []
    monkeypatch.setattr(script, "run", lambda backend, device: calls.append((backend, device)))
    report = {name: Backend(True, "") for name in ("triton", "cuda", "cpu", "torch")}
    monkeypatch.setattr(fastvq, "backends", lambda: report)
    assert script.main([]) == 0 and calls == [("cuda", "cuda"), ("triton", "cuda")]
    calls.clear()
    assert script.main(["--device", "cpu"]) == 0 and calls == [("cpu", "cpu")]
    calls.clear()
    report["cuda"] = Backend(False, "no GPU here")
    assert script.main(["cuda", "triton"]) == 0 and calls == [("triton", "cuda")]
    assert "backend cuda skipped: no GPU here" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        script.main(["cpu", "gpu"])


def test_cuda_arch_list_keeps_what_the_kernels_support():
    # setup.py's choice of TORCH_CUDA_ARCH_LIST: the tensor-core kernels need sm_80+, so a PyTorch
    # image's list loses its older entries rather than failing the whole build.
    spec = importlib.util.spec_from_file_location("fastvq_setup", os.path.join(ROOT, "setup.py"))
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)
    pick = setup.cuda_arch_list
    assert pick("5.0;6.0;7.0;7.5;8.0;8.6;9.0+PTX", []) == "8.0;8.6;9.0+PTX"
    assert pick("7.0 7.5 8.0 8.6", []) == "8.0;8.6"
    assert pick("7.5;8.6+PTX;9.0", []) == "8.6+PTX;9.0+PTX"  # PTX moves to the newest kept
    assert pick("Volta;Turing;Ampere;Hopper", []) == "Ampere;Hopper"
    assert pick("9.0a;10.0", [(7, 5)]) == "9.0a;10.0"  # an explicit list wins over the GPUs
    assert pick("7.0;7.5+PTX", [(9, 0)]) is None  # nothing left: build without CUDA kernels
    assert pick(None, [(9, 0), (8, 6), (9, 0)]) == "8.6;9.0+PTX"
    assert pick("native", [(7, 5)]) is None
    assert pick("", []) == pick(None, []) == setup.DEFAULT_CUDA_ARCHS == "8.0;9.0+PTX"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split()[2:]) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def test_cpu_baseline_env_selects_the_baseline_build():
    """The ISA-comparison tests (fastvq.testing.run_isa_builds) rely on FASTVQ_CPU_BASELINE=1
    switching the C++ CPU kernels to their baseline build, and on =0 leaving AVX2 on where the CPU
    has it: otherwise they would compare one build with itself and pass."""
    pytest.importorskip("fastvq._C", reason="fastvq._C is not built")
    isa = {}
    for baseline in ("1", "0"):
        run = subprocess.run(
            [sys.executable, "-c", "import fastvq._ext as e; print(e.CPU_ISA)"],
            env=dict(os.environ, FASTVQ_CPU_BASELINE=baseline), capture_output=True, text=True,
            check=True,
        )  # fmt: skip
        isa[baseline] = run.stdout.strip()
    assert isa["1"] == "baseline"
    flags = _cpu_flags()
    expected = "avx2+fma" if {"avx2", "fma"} <= flags else "avx2" if "avx2" in flags else None
    if expected is None:
        pytest.skip("not a Linux x86-64 CPU with AVX2: only the baseline build exists here")
    assert isa["0"] == expected


def _ancestor_imports(path: str, module: str) -> list[str]:
    """The module-level imports in `path` that name a package above `module` itself ("fastvq",
    "fastvq.lattice" for fastvq.lattice.leech) rather than a module under it."""
    import ast

    parts = module.split(".")
    ancestors = {".".join(parts[:i]) for i in range(1, len(parts))}
    found = []
    for node in ast.parse(open(path).read()).body:  # module level only: function bodies run later
        if isinstance(node, ast.Try):
            node = node.body[0]
        names = [node.module] if isinstance(node, ast.ImportFrom) else []
        names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        found += [f"line {node.lineno}: {name}" for name in names if name in ancestors]
    return found


def test_import_fastvq_reaches_its_subpackages_on_first_use():
    """fastvq.train.load_tokenizer, as the README writes it, after a bare `import fastvq`, which
    imports neither the training stack nor the layers until then."""
    code = (
        "import sys, fastvq\n"
        "assert 'fastvq.train' not in sys.modules and 'fastvq.nn' not in sys.modules\n"
        "assert 'train' in dir(fastvq) and 'nn' in dir(fastvq)  # tab completion\n"
        "assert callable(fastvq.train.load_tokenizer) and fastvq.nn.VectorQuantize\n"
        "try:\n    fastvq.trian\nexcept AttributeError as e:\n    print(e)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], env=checkout_env(), capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "module 'fastvq' has no attribute 'trian'"


def test_modules_of_import_fastvq_never_import_their_own_package():
    """`from fastvq import _ext` (or `import fastvq.x.y as z`) inside a module that fastvq's
    __init__ runs waits for that __init__ to finish. With one thread running it and another
    importing such a module directly, each waits for the other: CPython then hands one of them
    a partly initialised module and the import fails."""
    run = subprocess.run(
        [sys.executable, "-c", "import sys, fastvq; print(*sorted(m for m in sys.modules "
         "if m.startswith('fastvq.') and m != 'fastvq._C'))"],
        env=checkout_env(), capture_output=True, text=True, check=True,
    )  # fmt: skip
    modules = run.stdout.split()
    assert "fastvq.ops.nearest_code" in modules and "fastvq.lattice.leech" in modules, modules
    for module in modules:
        spec = importlib.util.find_spec(module)
        assert _ancestor_imports(spec.origin, module) == [], module

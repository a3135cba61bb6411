import os

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter where no GPU exists. Triton reads this
# when a kernel is decorated, so it must be set before fastvq.kernels is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_sessionstart(session):
    """Triton 3.6's interpreter (and older) takes a loop bound computed in the kernel to a Python
    int in a way numpy 2.4 deprecates and 2.5 refuses: a hundred Triton tests would fail with
    "only 0-dimensional arrays can be converted to Python scalars". Say so once instead."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import numpy
        import triton
        import triton.language as tl
    except ImportError:
        return

    @triton.jit
    def loop(x_ptr, n):
        acc = 0.0
        for _ in range(0, tl.minimum(tl.load(x_ptr).to(tl.int32), n)):
            acc += 1.0
        tl.store(x_ptr, acc)

    x = torch.full((1,), 3.0)
    try:
        loop[(1,)](x, 5)
    except Exception as e:  # triton.runtime.errors.InterpreterError
        if "0-dimensional arrays" not in str(e):
            raise
        pytest.exit(
            f"Triton {triton.__version__}'s interpreter fails under numpy {numpy.__version__}: "
            "install numpy<2.4 to run the Triton tests on the CPU (Triton 3.9 has no such limit)",
            returncode=4,
        )
    assert x.item() == 3.0


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poison():
    """Fill every fresh allocation (torch.empty, at::empty) with NaN / the largest integer, so a
    kernel that leaves part of its output unwritten fails the test instead of passing by luck."""
    # fill_uninitialized_memory needs deterministic mode, which also moves fastvq's atomic sums
    # (EMA, the codebook gradient) to their deterministic paths: the tests of the atomic paths
    # do without this fixture.
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(was)


@pytest.fixture
def deterministic_algorithms():
    """torch.use_deterministic_algorithms(True) for one test."""
    was = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was, warn_only=warn_only)

"""The CUDA kernels of csrc/cuda/nearest_code.cu, quantize.cu, ema.cu and leech.cu, executed on
the CPU through their real launch functions, against float64 and the CPU ops of the same contract.

CI has no GPU. tests/cuda_emulator/emulator.h runs every CUDA thread as a fiber and emulates the
tensor cores' mma.sync (its header says what it models and what not); here each
`kernel<<<grid, block, smem, stream>>>(args)` of the four files becomes an emulator call, g++
compiles them with AddressSanitizer and UBSan where the toolchain has them (an out-of-bounds access
in a kernel fails the test), and a child process (tests/cuda_emulator/run_calls.py) calls the launch
functions through ctypes, under a timeout so that a hang fails instead of stalling CI.

Outputs are poisoned before a launch with what they must not keep. Floating outputs follow
tests/ops/test_quantize.py's rule, with the CPU op as the peer in the same precision:
max|out - ref64| <= 2 max|cpu - ref64| + atol * max(1, max|ref64|). The gather and the Leech
indices must be equal bit for bit.
"""

import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastvq.lattice import LEECH_SIZE, leech_codes
from fastvq.ops.codebook import _ema_pieces
from fastvq.ops.quantize import _bwd_torch, _fwd_torch
from fastvq.reference import code_terms
from fastvq.testing import (
    check_nearest,
    cuda_include_dir,
    random_search_inputs,
    screening_near_ties,
    screening_overflows,
    screening_rechecks,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
EMULATOR_DIR = os.path.join(ROOT, "tests", "cuda_emulator")
KERNEL_FILES = ["nearest_code.cu", "quantize.cu", "ema.cu", "leech.cu"]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
KERNEL_DTYPE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # nearest_code.h's DType
LEECH_DTYPE = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
GRADS = {"ste": 0, "rotation": 1, "householder": 2}  # quantize.h's Grad
ATOL = {torch.float32: 2.0**-20, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# (D, padding): D = 1 and 3 give 4 lanes per row, 33 and 70 a partial last pass of 32 lanes.
# Padded rows exercise the EMA strides; unpadded ones end where AddressSanitizer's redzone starts.
SHAPES = [(1, 2), (3, 0), (33, 2), (70, 0)]
BAD_CODES = [-1, 1 << 40]  # plus K itself: rows that the kernels must skip, touching nothing
# A hang (a deadlock the emulator misses, an endless loop) must fail the test, not stall CI; the
# slowest child here takes about 1 s under AddressSanitizer.
TIMEOUT_S = 60


_LAUNCH = re.compile(r"(\w+(?:<[^<>;]*>)?)<<<(.*?)>>>\s*\(", re.S)
_SHARED = re.compile(r"__shared__[^;]*;")
_DYNAMIC_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([^;\[]+?)\s+(\w+)\[\];"
)


def emulated_source(source: str) -> str:
    """A .cu for emulator.h: `kernel<<<config>>>(args)` becomes `::fastvq_emu::launch("kernel",
    address of kernel, config, [&] { kernel(args); })`, `extern __shared__ T name[];` becomes
    `T* const name = ...` the block's dynamic shared memory, and every other `__shared__ T
    name[...];` is followed by `::fastvq_emu::fresh_shared(name, sizeof name);`. Newlines are
    kept, so that compiler and sanitizer messages give the .cu's own lines."""
    out, pos = [], 0
    for match in _LAUNCH.finditer(source):
        depth, end = 1, match.end()
        while depth:  # the arguments end at the parenthesis that balances the opening one
            depth += {"(": 1, ")": -1}.get(source[end], 0)
            end += 1
        kernel, config, args = match[1], match[2], source[match.end() : end - 1]
        address = f"reinterpret_cast<const void*>(&{kernel})"
        out += [
            source[pos : match.start()],
            f'::fastvq_emu::launch("{kernel}", {address}, {config}, ',
        ]
        out.append(f"[&] {{ {kernel}({args}); }})")
        pos = end
    source = "".join(out) + source[pos:]
    source = _DYNAMIC_SHARED.sub(
        lambda m: f"{m[1]}* const {m[2]} = static_cast<{m[1]}*>(::fastvq_emu::dynamic_shared());",
        source,
    )

    def fresh(declaration):
        names = re.findall(r"(\w+)\s*\[", declaration[0])  # arrays only: all the kernels have
        assert names, f"a __shared__ declaration to teach the rewrite: {declaration[0]}"
        return declaration[0] + "".join(
            f" ::fastvq_emu::fresh_shared({name}, sizeof {name});" for name in names
        )

    return _SHARED.sub(fresh, source)


class Emulated:
    """The compiled library, and the child process that calls into it."""

    def __init__(self, library: str, env: dict, workdir):
        self.library, self.env, self.workdir = library, env, workdir
        self.runs = itertools.count()

    def run(self, *calls, expect=None):
        """Makes the calls, (function of shim.cpp, argument, ...), in order in one child process.
        Tensor arguments (CPU, contiguous) go through device-like copies and come back in place,
        so a later call sees what an earlier one wrote (distinct tensors must not share memory);
        a (tensor, elements) pair passes a pointer that many elements past the copy's (16-byte
        aligned) start; None is a null pointer, int an int64_t, float a double. Every call must
        return cudaSuccess, or the cudaError_t listed for it in `expect`."""
        args = [a[0] if isinstance(a, tuple) else a for call in calls for a in call[1:]]
        tensors = {id(a): a for a in args if isinstance(a, torch.Tensor)}
        offsets, size = {}, 0
        for key, t in tensors.items():
            assert t.device.type == "cpu" and t.is_contiguous()
            offsets[key], size = size, size + (t.numel() * t.element_size() + 63) // 64 * 64
        path = self.workdir / f"arena{next(self.runs)}.bin"
        # The child writes the file; this process sees its writes through the shared mapping.
        arena = torch.from_file(str(path), shared=True, size=max(size, 1), dtype=torch.uint8)

        def place(t):
            offset = offsets[id(t)]
            return arena[offset : offset + t.numel() * t.element_size()].view(t.dtype)

        for t in tensors.values():
            place(t).copy_(t.reshape(-1))

        def encode(a):
            t, shift = a if isinstance(a, tuple) else (a, 0)
            if isinstance(t, torch.Tensor):
                size = t.numel() * t.element_size()
                return ["buffer", offsets[id(t)], size, shift * t.element_size()]
            if a is None:
                return ["null"]
            return ["float" if isinstance(a, float) else "int", a]

        job = {"library": self.library, "arena": str(path)}
        job["calls"] = [[name, *map(encode, args)] for name, *args in calls]
        try:
            child = subprocess.run(
                [sys.executable, os.path.join(EMULATOR_DIR, "run_calls.py")],
                input=json.dumps(job),
                capture_output=True,
                text=True,
                env=self.env,
                timeout=TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"the emulated kernels ran past {TIMEOUT_S} s: a hang?")
        # AddressSanitizer's one warning that it does not fully support swapcontext: no fiber here
        # unwinds across a switch (no exceptions, no longjmp), where its false positives come from.
        errors = re.sub(r".*makecontext/swapcontext.*\n", "", child.stderr)
        assert child.returncode == 0, errors[-6000:]
        returned = json.loads(child.stdout)
        want = [0] * len(calls) if expect is None else expect
        assert returned == want, f"cudaError_t of each call: {returned}, expected {want}"
        for t in tensors.values():
            t.copy_(place(t).view(t.shape))
        path.unlink()


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    include = cuda_include_dir()
    if include is None or shutil.which("g++") is None:
        pytest.skip("needs nvcc's headers (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h) and g++")
    ops = ["nearest_code", "quantize_fwd_cpp", "quantize_bwd_cpp", "ema_scatter_cpp"]
    ops.append("leech_decode")
    if not all(hasattr(torch.ops.fastvq, op) for op in ops):
        pytest.skip("fastvq._C is not built: its CPU ops are the reference")
    work = tmp_path_factory.mktemp("cuda_emulated")
    flags = ["-std=c++20", "-O2", "-g1", "-fPIC", "-Wno-unknown-pragmas"]
    # nvcc contracts a * b + c into an FMA by default: so does this build where the CPU has FMA
    # (GCC fuses from -O2 on, in places of its own choosing: about 150 FMAs in the four files).
    native = subprocess.run(
        ["g++", "-march=native", "-dM", "-E", "-x", "c++", "/dev/null"],
        capture_output=True,
        text=True,
    )
    flags += (
        ["-ffp-contract=fast", "-mfma"] if "__FMA__" in native.stdout else ["-ffp-contract=off"]
    )
    flags += ["-include", os.path.join(EMULATOR_DIR, "emulator.h"), "-isystem", include]
    flags += ["-I", CUDA_DIR]
    env = dict(os.environ)
    asan = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True)
    if os.path.isabs(asan.stdout.strip()):
        # The instrumented library loads into a Python built without ASan, whose runtime must
        # then be loaded first, by LD_PRELOAD.
        flags += ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
        env |= {"LD_PRELOAD": asan.stdout.strip(), "ASAN_OPTIONS": "detect_leaks=0"}
    sources = [os.path.join(EMULATOR_DIR, "shim.cpp")]
    for name in KERNEL_FILES:
        path = os.path.join(CUDA_DIR, name)
        with open(path) as f:
            text = f.read()
        rewritten = emulated_source(text)
        assert text.count("<<<") > 0 and "<<<" not in rewritten, f"{name}: a launch not rewritten"
        sources.append(work / f"{name}.cpp")
        sources[-1].write_text(f'#line 1 "{path}"\n{rewritten}')
    # About 8 s for the four units on CI's two cores, one g++ each.
    objects = [work / f"{os.path.basename(s)}.o" for s in sources]
    jobs = [
        subprocess.Popen(["g++", *flags, "-c", s, "-o", o], stderr=subprocess.PIPE, text=True)
        for s, o in zip(sources, objects, strict=True)
    ]
    for job in jobs:
        _, errors = job.communicate()
        assert job.returncode == 0, errors[-6000:]
    library = str(work / "libemulated.so")
    link = subprocess.run(["g++", "-shared", *flags, *objects, "-o", library], capture_output=True)
    assert link.returncode == 0, link.stderr.decode()[-6000:]
    return Emulated(library, env, work)


def _assert_parity(out, peer, ref64, what):
    assert out.shape == ref64.shape and out.dtype == peer.dtype, what
    assert bool(out.isfinite().all()), f"{what}: non-finite values (unwritten?)"
    err = (out.double() - ref64).abs().max().item()
    peer_err = (peer.double() - ref64).abs().max().item()
    bound = 2 * peer_err + ATOL[out.dtype] * max(1.0, ref64.abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g} (CPU op {peer_err:.3g})"


def _codes(n, k, gen):
    """(idx, bad): n codes in [0, k), half of them code 0 (contended atomics), except on three
    rows, marked in bad, which hold BAD_CODES and k."""
    idx = torch.randint(0, k, (n,), generator=gen) * (torch.rand(n, generator=gen) < 0.5)
    bad = torch.zeros(n, dtype=torch.bool)
    if n > 10:
        idx[7:10] = torch.tensor([*BAD_CODES, k])
        bad[7:10] = True
    return idx, bad


# --- nearest_code.cu: nearest_code_workspace_bytes / launch_nearest_code ----------------------

# mode: (dtype, the shim's precision: 0 exact, 1 fast, 2 exact by the tf32 screening pass and a
# 3xTF32 recheck, check_nearest's precision).
SEARCH_MODES = {
    "float32": (torch.float32, 0, "exact"),
    "float32-screened": (torch.float32, 2, "exact"),
    "float32-fast": (torch.float32, 1, "fast"),
    "bfloat16": (torch.bfloat16, 0, "exact"),
    "float16": (torch.float16, 0, "exact"),
}
# (SM count, opt-in shared memory per block): an H100, and a device on which the CTA's block of z
# no longer fits resident at the last shape's D and streams beside the codebook instead.
DEVICES = {"h100": (132, 227 << 10), "small": (8, 100 << 10)}
# (N, K, D, metric) per device, D by element size. Partial row and code tiles; D = 1 and 3 lie
# below one k-step, 24 is one chunk of 16-byte loads, 33 a partial second chunk of element loads,
# 1024 the largest D. The first shape of each device splits the codebook over CTAs (4 on 132 SMs,
# 2 on 8 SMs), and its z starts one element past a 16-byte boundary, which rules out 16-byte loads.
SEARCH_SHAPES = {
    "h100": [
        (3, 2200, 24, "l2"),
        (130, 200, 1, "dot"),
        (61, 300, 3, "cosine"),
        (70, 129, 33, "l2"),
        (5, 40, 1024, "l2"),
        (1, 1, 5, "dot"),
    ],
    "small": [(9, 1100, 24, "l2"), (70, 150, {4: 100, 2: 300}, "l2")],
}
# Small integers: every score is exact in every mode, so the answer is exact too.
INTEGER_SHAPE = (67, 150, 7, "l2")


def _search_case(n, k, d, metric, dtype, seed, integer=False):
    """(z, codebook, scale, bias): code terms in float32, as the glue passes them.

    Gaussian; for l2, with near ties whose codes lie far apart, so that an error on either side
    of the products shows: codes 2r and 2r + 1 lie at distances 2 and sqrt(4 + 2^-10) from row
    r in random directions, their scores 2^-11 apart: at D = 24 to 33 beyond the error bound of
    exact arithmetic, well within the error of tf32 (on either operand alone). With integer,
    row 0 holds a NaN (its scores are all NaN: index 0), row 1 an inf (scores of +-inf and NaN),
    row 2 a code that appears again at index K - 1, which must not win the tie."""
    gen = torch.Generator().manual_seed(seed)
    if integer:
        z = torch.randint(-2, 3, (n, d), generator=gen).to(dtype)
        codebook = torch.randint(-2, 3, (k, d), generator=gen).to(dtype)
        codebook[k - 1] = codebook[k // 2]
        z[2] = codebook[k // 2]
        z[0, 0], z[1, d - 1] = math.nan, math.inf
    else:
        z, codebook = (torch.randn(m, d, generator=gen) for m in (n, k))
        pairs = min(n // 2, k // 2) if metric == "l2" else 0
        direction = torch.nn.functional.normalize(torch.randn(2 * pairs, d, generator=gen), dim=1)
        codebook[: 2 * pairs : 2] = z[:pairs] + 2 * direction[::2]
        codebook[1 : 2 * pairs : 2] = z[:pairs] + math.sqrt(4 + 2**-10) * direction[1::2]
        z, codebook = z.to(dtype), codebook.to(dtype)
    scale, bias = code_terms(codebook, metric)
    return z, codebook, scale, bias


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", SEARCH_MODES)
def test_nearest_code(emulated, mode, device):
    dtype, kernel_precision, precision = SEARCH_MODES[mode]
    shapes = [
        (n, k, d[dtype.itemsize] if isinstance(d, dict) else d, metric)
        for n, k, d, metric in SEARCH_SHAPES[device]
    ]
    shapes.append(INTEGER_SHAPE)
    cases = [
        _search_case(*shape, dtype, seed, integer=shape is INTEGER_SHAPE)
        for seed, shape in enumerate(shapes)
    ]
    setup = ("emu_device", *DEVICES[device])
    flags = (KERNEL_DTYPE[dtype], kernel_precision)
    # The plans first, in a process of their own: the workspace each launch needs on this device.
    sizes = [torch.full((1,), -1) for _ in shapes]
    emulated.run(
        setup,
        *[
            ("emu_nearest_code_workspace", *s[:3], *flags, b)
            for s, b in zip(shapes, sizes, strict=True)
        ],
    )
    sizes = [int(b) for b in sizes]
    assert sizes[0] > 0, f"{shapes[0]} no longer splits the codebook on {device}: pick another"
    calls, outs = [setup], []
    for seed, ((n, k, d, _), (z, codebook, scale, bias), size) in enumerate(
        zip(shapes, cases, sizes, strict=True)
    ):
        z_arg = z
        if seed == 0:  # misaligned: z one element into a buffer
            z_arg = (torch.cat([z.new_full((1,), math.nan), z.reshape(-1)]), 1)
        out = torch.full((n,), -1)  # out of range: a row left unwritten fails the check
        workspace = torch.full((size,), 0xFF, dtype=torch.uint8) if size else None  # NaN, -1
        calls.append(("emu_seed", seed))
        calls.append(
            (
                "emu_nearest_code",
                z_arg,
                codebook,
                scale,
                bias,
                n,
                k,
                d,
                *flags,
                out,
                workspace,
                size,
            )
        )
        outs.append(out)
    emulated.run(*calls)

    for shape, (z, codebook, _, bias), out in zip(shapes, cases, outs, strict=True):
        if shape is not INTEGER_SHAPE:
            check_nearest(z, codebook, out, shape[3], precision)
            continue
        scores = z.double() @ codebook.double().T + bias.double()  # all exact
        want = scores.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf).argmax(1)
        if dtype == torch.float32 and kernel_precision != 1:
            # 3xTF32 splits inf into inf + NaN: every score of the row is NaN (screening
            # rechecks the row: its bound is inf)
            want[1] = 0
        assert torch.equal(out, want), f"{shape}: rows {(out != want).nonzero().flatten().tolist()}"


@settings(max_examples=8, deadline=None)
@given(
    n=st.integers(1, 300),
    k=st.integers(1, 600),
    d=st.integers(1, 200),
    mode=st.sampled_from(list(SEARCH_MODES)),
    metric=st.sampled_from(["l2", "dot", "cosine"]),
    device=st.sampled_from(list(DEVICES)),
    misaligned=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_nearest_code_fuzz(emulated, n, k, d, mode, metric, device, misaligned, seed):
    dtype, kernel_precision, precision = SEARCH_MODES[mode]
    z, codebook, scale, bias = _search_case(n, k, d, metric, dtype, seed)
    setup, flags = ("emu_device", *DEVICES[device]), (KERNEL_DTYPE[dtype], kernel_precision)
    size = torch.full((1,), -1)
    emulated.run(setup, ("emu_nearest_code_workspace", n, k, d, *flags, size))
    size = int(size)
    out = torch.full((n,), -1)
    workspace = torch.full((size,), 0xFF, dtype=torch.uint8) if size else None
    z_arg = (torch.cat([z.new_full((1,), math.nan), z.reshape(-1)]), 1) if misaligned else z
    launch = ("emu_nearest_code", z_arg, codebook, scale, bias, n, k, d, *flags, out, workspace)
    emulated.run(setup, ("emu_seed", seed), (*launch, size))
    check_nearest(z, codebook, out, metric, precision)


@pytest.mark.parametrize("device", DEVICES)
def test_nearest_code_screening_is_the_3xtf32_search(emulated, device):
    # Row for row the same answer, on inputs where the screening pass alone errs (near ties in
    # one lane and across lanes, exact ties, an inf row) and on Gaussian ones; the recheck split
    # (3 rows expected of 700 on 132 SMs) or not (8 SMs).
    setup = ("emu_device", *DEVICES[device])
    z, codebook, _ = screening_near_ties()
    cases = [(z, codebook, metric) for metric in ("l2", "dot", "cosine")]
    cases.append((*_search_case(700, 1300, 40, "l2", torch.float32, 5)[:2], "l2"))
    for z, codebook, metric in cases:
        (n, d), k = z.shape, codebook.shape[0]
        scale, bias = code_terms(codebook, metric)
        sizes = [torch.full((1,), -1) for _ in range(2)]
        emulated.run(
            setup,
            *[
                ("emu_nearest_code_workspace", n, k, d, KERNEL_DTYPE[torch.float32], p, b)
                for p, b in zip((0, 2), sizes, strict=True)
            ],
        )
        outs = [torch.full((n,), -1) for _ in range(2)]
        calls = [setup]
        for p, size, out in zip((0, 2), sizes, outs, strict=True):
            size = int(size)
            workspace = torch.full((size,), 0xFF, dtype=torch.uint8) if size else None
            args = (z, codebook, scale, bias, n, k, d, KERNEL_DTYPE[torch.float32], p, out)
            calls.append(("emu_nearest_code", *args, workspace, size))
        emulated.run(*calls)
        assert torch.equal(outs[1], outs[0]), (metric, (outs[1] != outs[0]).nonzero().flatten())


def _screened_search(emulated, z, codebook, scale, bias):
    """(out (N,), the rows the screening pass listed for its recheck) of the screened float32
    search on the H100's settings."""
    (n, d), k = z.shape, codebook.shape[0]
    setup, sizes = ("emu_device", *DEVICES["h100"]), (n, k, d, KERNEL_DTYPE[torch.float32], 2)
    size = torch.full((1,), -1)
    emulated.run(setup, ("emu_nearest_code_workspace", *sizes, size))
    workspace = torch.full((int(size),), 0xFF, dtype=torch.uint8)
    out, count, rows = torch.full((n,), -1), torch.full((1,), -2), torch.full((n,), -1)
    emulated.run(
        setup,
        ("emu_nearest_code", z, codebook, scale, bias, *sizes, out, workspace, int(size)),
        ("emu_nearest_code_rechecked", *sizes, workspace, count, rows),
    )
    return out, rows[: int(count)]


@pytest.mark.parametrize("metric", ["l2", "dot", "cosine"])
def test_nearest_code_screening_rechecks_the_rows_the_reference_does(emulated, metric):
    # The rows the screening pass lists for its recheck, each once, against
    # fastvq.testing.screening_rechecks; they may differ only where a row's margin lies within
    # float32 error of the threshold. Off the origin, so that |bias| weighs in the l2 bound.
    n, k, d = 300, 400, 8
    z, codebook = (x + 2 for x in random_search_inputs(n, k, d, torch.float32, "cpu", 5))
    scale, bias = code_terms(codebook, metric)
    expect, near = screening_rechecks(z, codebook, scale, bias)
    assert 0 < int(expect.sum()) < n, "a test with no (or only) rechecked rows tests nothing"
    _, listed = _screened_search(emulated, z, codebook, scale, bias)
    assert len(listed.unique()) == len(listed) and listed.min() >= 0 and listed.max() < n
    flags = torch.zeros(n, dtype=torch.bool)
    flags[listed] = True
    assert torch.equal(flags[~near], expect[~near])


def test_nearest_code_screening_rechecks_rows_near_float32s_range(emulated):
    # As tests/ops/test_nearest_code.py's Triton twin: |z| |c| = 1.5 2^124, a reach of 1.5 2^126,
    # is rechecked however clear its winner; row 1, of ordinary size, is not.
    z = torch.zeros(2, 8)
    z[0, 0], z[1, 0] = 2.0**63, 1.0
    codebook = torch.zeros(2, 8)
    codebook[:, 0] = torch.tensor([3 * 2.0**61, -3 * 2.0**61])
    out, listed = _screened_search(emulated, z, codebook, None, None)
    assert listed.tolist() == [0] and out.tolist() == [0, 0]


def test_nearest_code_split_k_ties_go_to_the_lowest_index(emulated):
    # K = 2200 splits over 4 CTAs on the H100's settings; row 1's best code is 5 and again 2100
    # (the last split). Small integers: the float64 scores are exact.
    gen = torch.Generator().manual_seed(0)
    n, k, d = 3, 2200, 24
    codebook = torch.randint(-2, 3, (k, d), generator=gen).float()
    codebook[2100] = codebook[5]
    z = torch.randint(-2, 3, (n, d), generator=gen).float()
    z[1] = codebook[5]
    scale, bias = code_terms(codebook, "l2")
    setup, sizes = ("emu_device", *DEVICES["h100"]), (n, k, d, KERNEL_DTYPE[torch.float32], 0)
    size = torch.full((1,), -1)
    emulated.run(setup, ("emu_nearest_code_workspace", *sizes, size))
    assert int(size) > 0, "the search no longer splits K"
    out, workspace = torch.full((n,), -1), torch.full((int(size),), 0xFF, dtype=torch.uint8)
    emulated.run(
        setup, ("emu_nearest_code", z, codebook, scale, bias, *sizes, out, workspace, int(size))
    )
    scores = z.double() @ codebook.double().T + bias.double()
    assert torch.equal(out, scores.argmax(1)) and int(out[1]) == 5  # argmax: the first maximum


def test_nearest_code_rejects_a_misaligned_workspace(emulated):
    # 8 bytes past a 16-byte boundary, where the workspace's doubles and 64-bit atomics would
    # fault on a GPU: the launch returns cudaErrorInvalidValue (1) and writes nothing.
    setup = ("emu_device", *DEVICES["h100"])
    z, codebook, scale, bias = _search_case(3, 2200, 24, "l2", torch.float32, 0)
    for precision in (0, 2):  # split unscreened, screened
        sizes = (3, 2200, 24, KERNEL_DTYPE[torch.float32], precision)
        size = torch.full((1,), -1)
        emulated.run(setup, ("emu_nearest_code_workspace", *sizes, size))
        assert int(size) > 0, precision
        out = torch.full((3,), -1)
        workspace = (torch.full((int(size) + 8,), 0xFF, dtype=torch.uint8), 8)
        launch = ("emu_nearest_code", z, codebook, scale, bias, *sizes, out, workspace, int(size))
        emulated.run(setup, launch, expect=[0, 1])
        assert (out == -1).all(), precision


@pytest.mark.parametrize("d", [2, 24])
def test_nearest_code_screening_rechecks_rows_whose_scores_may_overflow(emulated, d):
    # Where a score overflows in one pass only, the screened search must still answer as 3xTF32
    # does: by rechecking the row, whatever its margin.
    setup = ("emu_device", *DEVICES["h100"])
    for case, (z, codebook, scale, bias) in enumerate(screening_overflows(d)):
        sizes = (1, codebook.shape[0], d, KERNEL_DTYPE[torch.float32])
        size = torch.full((1,), -1)
        emulated.run(setup, ("emu_nearest_code_workspace", *sizes, 2, size))
        workspace = torch.full((int(size),), 0xFF, dtype=torch.uint8)
        outs = [torch.full((1,), -1) for _ in range(2)]
        count, rows = torch.full((1,), -2), torch.full((1,), -1)
        search = ("emu_nearest_code", z, codebook, scale, bias, *sizes)
        emulated.run(
            setup,
            (*search, 0, outs[0], None, 0),
            (*search, 2, outs[1], workspace, int(size)),
            ("emu_nearest_code_rechecked", *sizes, 2, workspace, count, rows),
        )
        assert int(count) == 1 and int(rows[0]) == 0, case
        assert torch.equal(outs[1], outs[0]), case


# --- quantize.cu: launch_quantize_fwd / launch_quantize_bwd ------------------------------------


def _quantize_case(d, dtype, grad, seed):
    """(z, codebook, g, idx, bad): rows, codes, upstream gradient, indices, bad rows."""
    gen = torch.Generator().manual_seed(seed)
    # N leaves a partial last block: 64 rows per block for D <= 4, 8 for D > 16.
    n, k = (150 if d <= 4 else 61), 5
    z, codebook, g = (torch.randn(m, d, generator=gen).to(dtype) for m in (n, k, n))
    idx, bad = _codes(n, k, gen)
    # Degenerate rows, exact in every dtype: z = 0, -q, 2q, q, and a zero code.
    codebook[k - 1] = 0
    idx[4] = k - 1
    q = codebook[idx[:4]]
    z[:4] = torch.stack([0 * q[0], -q[1], 2 * q[2], q[3]])
    return z, codebook, g, idx, bad


@pytest.mark.parametrize("grad", GRADS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize(emulated, dtype, grad):
    ste = grad == "ste"
    # (need dz, need dcodebook) as the glue passes them; dz only for rotation / householder.
    needs = [(False, True)] if ste else [(True, True), (True, False), (False, True)]
    cases, calls = [], []
    for seed, (d, _) in enumerate(SHAPES):
        z, codebook, g, idx, bad = _quantize_case(d, dtype, grad, seed)
        n, k = len(z), len(codebook)
        zq = torch.full_like(z, math.nan)
        zq[bad] = 0  # rows of bad codes must become NaN
        stats = None if ste else torch.full((n, 4), math.nan)
        common = (n, k, d, KERNEL_DTYPE[dtype], GRADS[grad])
        calls.append(("emu_quantize_fwd", z, codebook, idx, *common, zq, stats))
        outs = []
        for need_z, need_c in needs:
            dz = torch.full_like(z, math.nan) if need_z else None
            if need_z:
                dz[bad] = 0
            dc = torch.zeros(k, d) if need_c else None  # the glue's zero-filled accumulator
            calls.append(("emu_quantize_bwd", g, z, codebook, idx, stats, *common, dz, dc))
            outs.append((dz, dc))
        cases.append((z, codebook, g, idx, bad, zq, stats, outs))
    # No launch for N = 0 (a grid of 0 blocks fails on a GPU) nor for neither gradient: both
    # return cudaSuccess, and the last case's outputs, checked below, stay as they are.
    calls.append(("emu_quantize_fwd", z, codebook, idx, 0, *common[1:], zq, stats))
    calls.append(("emu_quantize_bwd", g, z, codebook, idx, stats, *common, None, None))
    emulated.run(*calls)

    for z, codebook, g, idx, bad, zq, stats, outs in cases:
        what = f"D = {z.shape[1]}"
        ok = ~bad
        zq_cpu, stats_cpu = torch.ops.fastvq.quantize_fwd_cpp(z[ok], codebook, idx[ok], grad)
        assert torch.equal(zq[ok], zq_cpu), f"{what}: z_q is not the gather"
        assert bool(zq[bad].isnan().all()), f"{what}: rows of bad codes must be NaN"
        z64, c64, g64 = (t.double() for t in (z[ok], codebook, g[ok]))
        _, stats64 = _fwd_torch(z64, c64, idx[ok], grad)
        if not ste:
            _assert_parity(stats[ok], stats_cpu, stats64, f"{what}: stats")
            assert bool((stats[bad] == torch.tensor([1.0, 0, 0, 0])).all()), f"{what}: bad stats"
        dz64, dc64 = _bwd_torch(g64, z64, c64, idx[ok], stats64, grad, not ste, True)
        dz_cpu, dc_cpu = torch.ops.fastvq.quantize_bwd_cpp(
            g[ok], z[ok], codebook, idx[ok], stats_cpu, grad, not ste, True
        )
        for dz, dc in outs:
            if dz is not None:
                _assert_parity(dz[ok], dz_cpu, dz64, f"{what}: dz")
                assert bool(dz[bad].isnan().all()), f"{what}: dz of bad codes must be NaN"
            if dc is not None:  # the glue converts the float32 accumulator to the codebook's dtype
                _assert_parity(dc.to(dtype), dc_cpu, dc64, f"{what}: dcodebook")


@pytest.mark.parametrize("grad", ["rotation", "householder"])
def test_quantize_nearly_degenerate_rows_fall_back(emulated, grad):
    # |z^ -+ q^|^2 = 4e-40, below float32's smallest normal: the degenerate fallback (g for
    # rotation, s g = g for householder), as the CPU kernel and the reference take it; 2 / |e|^2
    # would overflow to inf and the gradient to NaN. Row 1's |e|^2 is normal: the formula.
    sign = 1.0 if grad == "householder" else -1.0
    z = torch.tensor([[1.0, 3e-20, 0.0], [1.0, 3e-17, 0.0]])
    codebook = torch.tensor([[sign, sign * 1e-20, 0.0]])
    idx, g = torch.zeros(2, dtype=torch.int64), torch.ones(2, 3)
    common = (2, 1, 3, KERNEL_DTYPE[torch.float32], GRADS[grad])
    zq, stats, dz = torch.full_like(z, math.nan), torch.full((2, 4), math.nan), torch.empty_like(z)
    emulated.run(
        ("emu_quantize_fwd", z, codebook, idx, *common, zq, stats),
        ("emu_quantize_bwd", g, z, codebook, idx, stats, *common, dz.fill_(math.nan), None),
    )
    assert torch.equal(dz[0], g[0])
    _, stats_cpu = torch.ops.fastvq.quantize_fwd_cpp(z, codebook, idx, grad)
    dz_cpu, _ = torch.ops.fastvq.quantize_bwd_cpp(g, z, codebook, idx, stats_cpu, grad, True, False)
    torch.testing.assert_close(dz, dz_cpu)
    assert not torch.allclose(dz[1], g[1])


@pytest.mark.parametrize("grad", ["rotation", "householder"])
def test_quantize_scale_overflow_falls_back(emulated, grad):
    # |q| / |z| = 1e19 / 1e-22 overflows float32 (|z|^2 = 1e-44 is subnormal, not 0): the row
    # falls back to STE, stats (1, 0, 0, 0) as the CPU kernel's, and dz = g stays finite. Row 2:
    # |z|^2 overflows, and so does q.g (rotation's 2 (q.g) / |q| was inf * 0 = NaN there).
    z = torch.tensor([[1e-22, 0.0, 0.0], [1.0, 2.0, 0.5], [3e38, 3e38, 3e38]])
    codebook = torch.tensor([[1e19, 0.0, 0.0], [0.5, 1.0, -1.0], [2e38, 2e38, 2e38]])
    idx, g = torch.tensor([0, 1, 2]), torch.ones(3, 3)
    common = (3, 3, 3, KERNEL_DTYPE[torch.float32], GRADS[grad])
    zq, stats = torch.full_like(z, math.nan), torch.full((3, 4), math.nan)
    dz = torch.full_like(z, math.nan)
    emulated.run(
        ("emu_quantize_fwd", z, codebook, idx, *common, zq, stats),
        ("emu_quantize_bwd", g, z, codebook, idx, stats, *common, dz, None),
    )
    _, stats_cpu = torch.ops.fastvq.quantize_fwd_cpp(z, codebook, idx, grad)
    for row in (0, 2):
        assert stats_cpu[row].tolist() == [1.0, 0.0, 0.0, 0.0]
        assert torch.equal(stats[row], stats_cpu[row]) and torch.equal(dz[row], g[row])
    torch.testing.assert_close(stats[1], stats_cpu[1])


# --- ema.cu: launch_ema_atomic / launch_ema_pieces ---------------------------------------------

# Rows per piece in the deterministic plan: few, so that the hot code 0 takes several pieces.
PIECE_ROWS = 16


def _ema_case(n, d, pad, dtype, weighted, seed):
    """Accumulators and rows in padded buffers (counts every other float, sums and z rows `pad`
    wide beyond D): the kernels get their strides. Padding holds NaN or a sentinel."""
    gen = torch.Generator().manual_seed(seed)
    k = 5
    counts = torch.full((k, 2), -7.0)  # counts in column 0: ldc = 2
    counts[:, 0] = torch.rand(k, generator=gen) * 4
    sums = torch.full((k, d + pad), -7.0)
    sums[:, :d] = torch.randn(k, d, generator=gen)
    z = torch.full((n, d + pad), math.nan).to(dtype)  # NaN padding: never read
    z[:, :d] = torch.randn(n, d, generator=gen).to(dtype)
    idx, bad = _codes(n, k, gen)
    weight = None
    if weighted:
        # Weight 0 marks padding rows, which may hold anything: NaN must not leak.
        weight = torch.rand(n, generator=gen) * (torch.arange(n) % 7 != 0)
        z[::7] = math.nan
    return counts, sums, z, idx, bad, weight


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ema_scatter(emulated, dtype, deterministic, weighted):
    # keep = 1 skips the atomic variant's scaling pass; N = 0 must still scale every code.
    shapes = [(150, d, pad, 0.8 if d < 70 else 1.0) for d, pad in SHAPES] + [(0, 3, 1, 0.8)]
    gain = 0.35
    calls, cases = [], []
    for seed, (n, d, pad, keep) in enumerate(shapes):
        counts, sums, z, idx, bad, weight = _ema_case(n, d, pad, dtype, weighted, seed)
        if deterministic:  # the glue's plan: a stable sort, then the pieces
            sorted_codes, order = torch.sort(idx, stable=True)
            *plan, piece_code, slots = _ema_pieces(sorted_codes, 5, PIECE_ROWS)
            assert n == 0 or int(plan[1].diff().max()) > 1, "no code of several pieces"
            partial = torch.full((max(slots, 1), d + 1), math.nan)
            rows = (None, order, *plan, piece_code, len(piece_code), PIECE_ROWS, partial)
        else:
            rows = (idx, None, None, None, None, None, 0, 1, None)
        # The deterministic variant runs twice, under two thread and block orders: the same bits.
        outs = [(counts.clone(), sums.clone()) for _ in range(1 + deterministic)]
        for order, (c, s) in enumerate(outs):
            args = (c, 2, s, d + pad, z, d + pad, KERNEL_DTYPE[dtype], weight, n, 5, d, keep, gain)
            calls += [("emu_seed", order), ("emu_ema", *args, *rows)]
        cases.append((d, keep, counts, sums, z, idx, bad, weight, outs))
    emulated.run(*calls)

    for d, keep, counts, sums, z, idx, bad, weight, outs in cases:
        what = f"N = {len(z)}, D = {d}"
        ok = ~bad  # the CPU op rejects bad codes; the CUDA kernels skip them
        z_ok, idx_ok, w_ok = z[ok, :d], idx[ok], None if weight is None else weight[ok]
        cpu_counts, cpu_sums = counts.clone(), sums.clone()
        torch.ops.fastvq.ema_scatter_cpp(
            cpu_counts[:, 0], cpu_sums[:, :d], z_ok, idx_ok, w_ok, keep, gain, deterministic
        )
        w64 = torch.ones(len(idx_ok), dtype=torch.float64) if w_ok is None else w_ok.double()
        live = w64 != 0
        c64 = torch.zeros(5, dtype=torch.float64).index_add_(0, idx_ok[live], w64[live])
        s64 = torch.zeros(5, d, dtype=torch.float64)
        s64.index_add_(0, idx_ok[live], w64[live, None] * z_ok[live].double())
        for got_counts, got_sums in outs:
            ref = keep * counts[:, 0].double() + gain * c64
            _assert_parity(got_counts[:, 0], cpu_counts[:, 0], ref, f"{what}: counts")
            ref = keep * sums[:, :d].double() + gain * s64
            _assert_parity(got_sums[:, :d], cpu_sums[:, :d], ref, f"{what}: sums")
            assert torch.equal(got_counts[:, 1:], counts[:, 1:]), f"{what}: wrote past counts"
            assert torch.equal(got_sums[:, d:], sums[:, d:]), f"{what}: wrote past sums"
        if deterministic:
            assert all(map(torch.equal, outs[0], outs[1])), f"{what}: not bit-identical"


# --- leech.cu: launch_leech_decode -------------------------------------------------------------


def _leech_inputs(dtype, rows=48):
    """(z, codes): rows of every kind the decoder tells apart, and the indices of the exact codes
    among them (rows 3 * rows onwards). N is one past a multiple of the 4 rows of a block; the
    last 4 rows hold NaN or inf."""
    gen = torch.Generator().manual_seed(LEECH_DTYPE[dtype])
    codes = torch.randint(0, LEECH_SIZE, (rows,), generator=gen)
    parts = [
        torch.randn(rows, 24, generator=gen, dtype=torch.float64),
        torch.randint(-1, 2, (rows, 24), generator=gen).double(),  # ties everywhere
        torch.randint(-3, 4, (rows, 24), generator=gen).double(),
        (leech_codes(codes, torch.float64) * math.sqrt(32)).round(),  # exact integer codes
    ]
    # Past 2^64, the overflow scaling (float16 cannot hold such values): rows times 1e30 or 1e200,
    # and rows whose largest entry is half the largest finite value, where scores overflow unscaled.
    big = {torch.float32: 1e30, torch.bfloat16: 1e30, torch.float64: 1e200}
    if dtype in big:
        gauss = torch.randn(rows, 24, generator=gen, dtype=torch.float64)
        top = torch.finfo(dtype).max / 2
        parts.append(gauss[::2] * big[dtype])
        parts.append(gauss[1::2] * (top / gauss[1::2].abs().amax(1, keepdim=True)))
    special = torch.randn(9, 24, generator=gen, dtype=torch.float64)
    special[0] = 0  # every code ties
    special[5, 3] = math.nan
    special[6] = math.nan
    special[7, 23], special[8, 0] = math.inf, -math.inf
    return torch.cat([*parts, special]).to(dtype), codes


@pytest.mark.parametrize("dtype", list(LEECH_DTYPE), ids=str)
def test_leech_decode(emulated, dtype):
    z, codes = _leech_inputs(dtype)
    out = torch.full((len(z),), -1)
    emulated.run(("emu_leech_decode", z, len(z), LEECH_DTYPE[dtype], out))
    cpu = torch.ops.fastvq.leech_decode(z)
    differ = (out != cpu).nonzero().flatten().tolist()
    assert not differ, (
        f"row {differ[0]}: {z[differ[0]].tolist()}: CUDA {out[differ[0]]}, CPU {cpu[differ[0]]}"
    )
    first = 3 * len(codes)
    assert torch.equal(out[first : first + len(codes)], codes), "an exact code decodes to itself"
    assert not bool(out[-4:].any()), "rows with NaN or inf decode to 0"

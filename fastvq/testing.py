"""Helpers shared by tests and benchmarks: tolerances, backend cases, process-group launches,
a host-sync counter."""

import contextlib
import os
import re
import traceback

import torch

from fastvq.reference import code_terms, nearest_code_scores, topk_scores

# Relative rounding of one product's inputs before the float32 accumulation: "exact" must be at
# least as good as 3xTF32 (about 2^-22), "fast" may round float32 inputs to bf16 (2^-8).
PRODUCT_ROUNDOFF = {"exact": 2.0**-21, "fast": 2.0**-8}
FLOAT32_ROUNDOFF = 2.0**-24


def cpp_op_error(match: str) -> type[Exception]:
    """The exception a C++ op raises for the refusal whose message `match` describes: TypeError
    where it names a dtype (TORCH_CHECK_TYPE in csrc), ValueError otherwise (TORCH_CHECK_VALUE),
    as the Python API's checks."""
    return TypeError if re.search(r"dtype|must be (Float|Long|float|bfloat)", match) else ValueError


def random_search_inputs(n, k, d, dtype, device, seed) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh Gaussian z (n, d) and codebook (k, d) of `dtype` on `device`, from `seed`."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g).to(dtype).to(device)
    codebook = torch.randn(k, d, generator=g).to(dtype).to(device)
    return z, codebook


def screening_near_ties(seed: int = 11) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z (256, 24), codebook (560, 24), near (256,)) float32 on which a tf32 screening pass
    alone picks wrong codes, in ways a screened search must catch: z's rows lie near 60
    centres (near[n] is row n's), the other codes short and far.

    Centres 0-19 have copies 2^-12 apart (tf32's rounding misorders them) at j, j + 128 and
    j + 256: one lane of a 64- or 128-code tile holds all three, so only its runner-up sees the
    near tie. The others have copies 2^-18 apart, mostly equal after tf32 rounding, an exact tie
    of the screening scores that float32 still tells apart: centres 20-39 at j and j + 300,
    codes in different warps of the CUDA kernel's tile; centres 40-59 at 400 + 8m and 402 + 8m,
    two lanes of one warp there. Then an exact duplicate code (399 = 7), an integer row whose
    scores tie exactly (row 4) and an inf row (row 5, for unchecked inputs)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(60, 24, generator=g)
    codebook = 0.5 * torch.randn(560, 24, generator=g)

    def copies(where, which, spread):
        codebook[where] = centres[which] + spread * torch.randn(20, 24, generator=g)

    for start in (0, 128, 256):
        copies(slice(start, start + 20), slice(0, 20), 2.0**-12)
    for start in (20, 320):
        copies(slice(start, start + 20), slice(20, 40), 2.0**-18)
    for start in (400, 402):
        copies(slice(start, start + 160, 8), slice(40, 60), 2.0**-18)
    codebook[399] = codebook[7]
    near = torch.randint(0, 60, (256,), generator=g)
    z = centres[near] + 0.1 * torch.randn(256, 24, generator=g)
    z[3] = codebook[7]
    z[4] = 0.0
    z[4, :2] = 1.0
    z[5, 7] = float("inf")
    return z, codebook, near


def screening_overflows(d: int = 24) -> list[tuple[torch.Tensor, ...]]:
    """(z (1, d), codebook (K, d), scale (K,) or None, bias (K,) or None) float32 cases, d >= 2,
    on which a tf32 screening pass alone and the 3xTF32 search pick different codes because a
    value leaves float32's range in one of them, where no error bound of the scores holds:
    1. code 1's scaled score overflows from its tf32 copy only (1 + 2^-10 for 1 + 2^-10 - 2^-12);
    2. code 0's unscaled product overflows in 3xTF32 only (the tf32 copy sums to 2^128 - 2^116),
       where its scale of 2^-10 would have brought it below code 1;
    3. and 4. a bias near float32's largest value takes code 1's tf32 score to inf, or to -inf;
    5. code 0's tf32 copy is inf (float32's largest value rounds up) under a scale of 0: a NaN
       screening score and a NaN residual norm, where 3xTF32 may score its bias of 2^20 (the
       interpreter's float32 product does; Triton's 3xTF32 on a GPU rounds it to inf as well)."""
    big = torch.finfo(torch.float32).max
    cases = [  # (z's leading entries, the codes' leading entries, scale, bias)
        ([1.0], [[1.0], [1 + 2.0**-10 - 2.0**-12]], [big, big / (1 + 2.0**-10 - 2.0**-13)], None),
        (
            [1.0, 1.0],
            [[2.0**127 + 2.0**116 - 2.0**104, 2.0**127 - 2.0**115 - 2.0**103], [2.0**118] * 2],
            [2.0**-10, 1.0],
            None,
        ),
        ([1.0], [[0.0], [2.0**120 - 2.0**108]], None, [big, 2.0**128 - 2.0**120]),
        (
            [1.0],
            [[-(2.0**120)], [-(2.0**120 - 2.0**108 - 2.0**100)]],
            None,
            [-(2.0**128 - 2.0**110), -(2.0**128 - 2.0**120 + 2.0**108)],
        ),
        ([2.0**-30], [[big], [2.0**40], [0.5]], [0.0, 1.0, 1.0], [2.0**20, 0.0, 0.0]),
    ]
    out = []
    for z_head, code_heads, scale, bias in cases:
        z = torch.zeros(1, d)
        z[0, : len(z_head)] = torch.tensor(z_head)
        codebook = torch.zeros(len(code_heads), d)
        codebook[:, : len(code_heads[0])] = torch.tensor(code_heads)
        terms = (None if t is None else torch.tensor(t) for t in (scale, bias))
        out.append((z, codebook, *terms))
    return out


def screening_rechecks(z, codebook, scale, bias) -> tuple[torch.Tensor, torch.Tensor]:
    """(rechecks, undecided), (N,) bool each, for an exact float32 search that screens: the rows
    whose float64 margin between their best two tf32 screening scores is not above twice
    `_screening_bound` (the rows a screening pass must hand to its 3xTF32 recheck), and the rows
    whose margin lies so near that threshold that a kernel's float32 epilogue may decide either
    way. scale and bias: `code_terms`'s, float32 or None."""
    from fastvq.kernels.nearest_code import _screening_reference

    z_tf32, c_tf32, bound = _screening_reference(z, codebook, scale, bias)
    scores = z_tf32.double() @ c_tf32.double().T
    scores = scores * (1 if scale is None else scale.double()) + (0 if bias is None else bias)
    top = scores.topk(2, dim=1).values
    margin = top[:, 0] - top[:, 1]
    undecided = (margin - 2 * bound).abs() <= 2.0**-18 * top[:, 0].abs().clamp(min=1)
    return ~(margin > 2 * bound), undecided


def score_error_bound(z64, codebook64, scale64, bias64, precision: str) -> torch.Tensor:
    """(N, K) float64 bound on |score computed by a kernel - exact score| for each candidate.

    Worst case of a D-term float32 dot product, (D + 2) u |z| |c|, plus the products' input
    rounding, times |scale|, plus the float32 rounding of the bias.
    """
    d = z64.shape[-1]
    u_in, u_acc = PRODUCT_ROUNDOFF[precision], FLOAT32_ROUNDOFF
    zc = torch.linalg.vector_norm(z64, dim=-1)[:, None] * torch.linalg.vector_norm(
        codebook64, dim=-1
    )
    if scale64 is not None:
        zc = zc * scale64.abs()
    bound = (2 * u_in + (d + 2) * u_acc) * zc
    if bias64 is not None:
        bound = bound + (d + 2) * u_acc * bias64.abs()
    return bound


def check_nearest(
    z: torch.Tensor,
    codebook: torch.Tensor,
    indices: torch.Tensor,
    metric: str = "l2",
    precision: str = "exact",
) -> float:
    """Tie-aware check of nearest-code indices against float64; returns the exact-agreement rate.

    z: (N, D) and codebook: (K, D) as given to the kernel (their values, upcast, are the truth);
    indices: (N,). The chosen code's float64 score must be within the arithmetic's rounding of the
    best float64 score: where the best two codes are closer than that, either is right; elsewhere
    the index must be exact. Builds the (N, K) float64 score matrix on z's device (a GPU's takes
    milliseconds where a host's takes seconds at K = 196,560): small N only.
    """
    z64 = z.detach().reshape(-1, z.shape[-1]).double()
    c64 = codebook.detach().to(z64.device).double()
    indices = indices.detach().reshape(-1).to(z64.device)
    assert indices.dtype == torch.int64, f"indices must be int64, got {indices.dtype}"
    assert indices.shape == (z64.shape[0],), f"indices shape {tuple(indices.shape)}"
    if z64.shape[0] == 0:
        return 1.0
    assert bool(((indices >= 0) & (indices < c64.shape[0])).all()), "index out of range"
    scale, bias = code_terms(c64, metric)
    scores = nearest_code_scores(z64, c64, scale, bias)
    bound = score_error_bound(z64, c64, scale, bias, precision)
    best = scores.argmax(dim=1)
    rows = torch.arange(len(best), device=best.device)
    gap = scores[rows, best] - scores[rows, indices]
    allowed = bound[rows, best] + bound[rows, indices]
    bad = (gap > allowed).nonzero().flatten()
    if len(bad):
        r = int(bad[0])
        raise AssertionError(
            f"{len(bad)} of {len(best)} rows chose a code worse than rounding allows; row {r}: "
            f"chose {int(indices[r])} (score {scores[r, indices[r]].item():.9g}), best "
            f"{int(best[r])} (score {scores[r, best[r]].item():.9g}), gap {gap[r].item():.3g} "
            f"> allowed {allowed[r].item():.3g}"
        )
    return (indices == best).double().mean().item()


def check_nearest_topk(
    z: torch.Tensor,
    codebook: torch.Tensor,
    indices: torch.Tensor,
    metric: str = "l2",
    precision: str = "exact",
) -> float:
    """Tie-aware check of k-nearest indices (N, k) against float64; returns the exact-row rate.

    Scores off by at most b each move every order statistic by at most b, so with slack = twice
    the row's largest bound: the j-th returned code's float64 score is within slack of the true
    j-th best, consecutive returned scores never rise by more than slack, and a row's codes are
    distinct. Exact agreement (rows equal to float64's order, ties by lower index) is the rate.
    """
    z64 = z.detach().reshape(-1, z.shape[-1]).double()  # on z's device, as check_nearest
    c64 = codebook.detach().to(z64.device).double()
    indices = indices.detach().reshape(z64.shape[0], -1).to(z64.device)
    assert indices.dtype == torch.int64, f"indices must be int64, got {indices.dtype}"
    if z64.shape[0] == 0:
        return 1.0
    assert bool(((indices >= 0) & (indices < c64.shape[0])).all()), "index out of range"
    assert bool((indices.sort(1).values.diff(dim=1) != 0).all()), "a code is repeated in a row"
    scale, bias = code_terms(c64, metric)
    scores = nearest_code_scores(z64, c64, scale, bias)
    slack = 2 * score_error_bound(z64, c64, scale, bias, precision).amax(1, keepdim=True)
    best = topk_scores(scores, indices.shape[1])
    got, want = scores.gather(1, indices), scores.gather(1, best)
    bad = ((got < want - slack).any(1) | (got.diff(dim=1) > slack).any(1)).nonzero().flatten()
    if len(bad):
        r = int(bad[0])
        raise AssertionError(
            f"{len(bad)} of {len(best)} rows are not the k nearest up to rounding; row {r}: "
            f"chose {indices[r].tolist()} (scores {got[r].tolist()}), best {best[r].tolist()} "
            f"(scores {want[r].tolist()}), slack {slack[r].item():.3g}"
        )
    return (indices == best).all(1).double().mean().item()


def backend_cases() -> list[tuple[str, str]]:
    """(device, backend) pairs this machine can run, for parametrizing op tests.

    CPU tensors: the torch reference, the C++ kernels if built, and Triton through its interpreter
    when TRITON_INTERPRET=1 and no GPU exists; CUDA tensors: every backend available there.
    """
    import os

    from fastvq.ops._backends import backends

    report, cuda = backends(), torch.cuda.is_available()
    cases = [("cpu", "torch")]
    if report["cpu"].available:
        cases.append(("cpu", "cpu"))
    if report["triton"].available and os.environ.get("TRITON_INTERPRET") == "1" and not cuda:
        cases.append(("cpu", "triton"))
    if cuda:
        cases += [("cuda", b) for b in ("torch", "triton", "cuda") if report[b].available]
    return cases


def free_port() -> int:
    """A free TCP port on 127.0.0.1, for a test's process group."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checkout_env(**extra: str) -> dict[str, str]:
    """os.environ with `extra` and, first on PYTHONPATH, the directory this process imported
    fastvq from: a child running a script file (whose own directory heads its sys.path) then
    tests this checkout's code, not the one an editable install points at."""
    import os

    import fastvq

    root = os.path.dirname(os.path.dirname(os.path.abspath(fastvq.__file__)))
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    return os.environ | {"PYTHONPATH": path, **extra}


def run_rank_script(script: str, out_dir, world: int, timeout: float = 120) -> list:
    """Run `python script out_dir port`, whose __main__ starts `world` gloo ranks on 127.0.0.1:port
    that each save out_dir/rank{r}.pt; returns what they saved, rank by rank.

    A separate script keeps the ranks' fork or spawn away from pytest's process and its threads.
    Each rank gets one intra-op thread (several ranks share the CI's 2 cores); the ranks' output
    is the assertion message when one fails.
    """
    import os
    import subprocess
    import sys

    env = checkout_env(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, "-W", "ignore::FutureWarning", script, str(out_dir), str(free_port())],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]


# Each torchrun_ranks process: the source run as the script __main__, its globals then cleared
# (what it built is freed, even where its functions outlive it, patched into a module), then it
# leaves the process group the way the CLI does, and no thread of the group's may outlive it
# (see leave_process_group).
_RANK_MAIN = """
import gc
import os
import sys
import types

import torch.distributed

path = sys.argv.pop(1)
script = sys.modules["__main__"] = types.ModuleType("__main__")
script.__file__ = path
with open(path) as f:
    exec(compile(f.read(), path, "exec"), script.__dict__)
script.__dict__.clear()
gc.collect()
if torch.distributed.is_initialized():
    from fastvq.train.trainer import leave_process_group

    leave_process_group()
if os.path.isdir("/proc/self/task"):
    threads = len(os.listdir("/proc/self/task"))
    assert threads == 1, f"{threads - 1} threads outlive the process group"
"""


def torchrun_ranks(source: str, tmp_path, world: int, *args: str, timeout: float = 240) -> None:
    """Run `source`, a script's text, as `python worker.py *args` in `world` processes with
    torchrun's environment (RANK, WORLD_SIZE, MASTER_*) and check that every one exits 0.

    Each process then frees what the script built, leaves its process group (unless the script
    did) and checks that the group's threads ended.
    """
    import subprocess
    import sys

    script, runner = os.path.join(tmp_path, "worker.py"), os.path.join(tmp_path, "rank_main.py")
    for path, text in ((script, source), (runner, _RANK_MAIN)):
        with open(path, "w") as f:
            f.write(text)
    port, procs = str(free_port()), []
    for rank in range(world):
        ranks = dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
        env = checkout_env(**ranks, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, runner, script, *args], env=env))
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0] * world


def on_one_thread(fn):
    """fn() with one intra-op thread, the thread count restored after: a kernel's answer without
    threads, to compare with its threaded one (rows split at other places)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        return fn()
    finally:
        torch.set_num_threads(threads)


def run_isa_builds(script: str, out_dir, *args) -> list:
    """Run `python -c script *args out` twice, with FASTVQ_CPU_BASELINE=1 (the C++ CPU kernels'
    SSE2 build) and =0 (AVX2 where the CPU has it); returns what each run saved to `out`, its last
    argument, SSE2 first. A process each: the build is chosen once, when fastvq._C loads."""
    import os
    import subprocess
    import sys

    runs = []
    for baseline in ("1", "0"):
        out = os.path.join(out_dir, f"isa_baseline{baseline}.pt")
        env = dict(os.environ, FASTVQ_CPU_BASELINE=baseline)
        subprocess.run([sys.executable, "-c", script, *map(str, args), out], check=True, env=env)
        runs.append(torch.load(out))
    return runs


def cuda_include_dir() -> str | None:
    """nvcc's include directory (cuda_runtime.h and friends), or None without nvcc. nvcc may be
    a wrapper script (as /usr/local/bin/nvcc is on the dev machines): the usual homes too."""
    import os
    import shutil

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    homes.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in filter(None, homes):
        if os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")):
            return os.path.join(home, "include")
    return None


# Ops whose output size depends on tensor values, or that return a value to Python: on a GPU each
# waits for the stream (a host sync). bincount reads its maximum; index / index_put count only
# with a boolean mask (they run nonzero).
_SYNC_OPS = (
    "_local_scalar_dense",  # .item(), float(), int(), bool(), `if t:`, f"{t:.3g}"
    "nonzero",
    "masked_select",
    "bincount",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "equal",
)


@contextlib.contextmanager
def count_syncs():
    """Record the host syncs a block would make on a GPU, counted on any device: yields a list
    that fills with (what, "file:line"), the innermost fastvq frame (else the caller's) of each.

    Counts value reads (.item(), float(), bool(), ...: aten._local_scalar_dense), ops of
    data-dependent output size (nonzero, unique, masked_select, bincount, boolean-mask indexing)
    and Tensor.tolist / .cpu() / .numpy() (which never dispatch on CPU tensors). Not counted:
    copies between host and device by .to() or copy_ (on CPU tensors they are no-ops or CPU
    copies; on CUDA, torch.tensor(list, device="cuda") and .to("cpu") wait for the stream too)
    and anything inside C++ / Triton kernels. Single-threaded use: it patches torch.Tensor methods.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    syncs, inside = [], [False]

    def where() -> str:
        frames = [
            f
            for f in traceback.extract_stack()
            if f.filename != __file__ and f"{os.sep}torch{os.sep}" not in f.filename
        ]
        mine = [f for f in frames if f"{os.sep}fastvq{os.sep}" in f.filename]
        f = (mine or frames)[-1]
        return f"{f.filename.rsplit(os.sep + 'fastvq' + os.sep, 1)[-1]}:{f.lineno}"

    def record(what: str) -> None:
        if not inside[0]:
            syncs.append((what, where()))

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            masked = name in ("index", "index_put", "index_put_", "_index_put_impl_") and any(
                isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)
                for t in args[1]
            )
            if name in _SYNC_OPS or masked:
                record(name + ("[mask]" if masked else ""))
            return func(*args, **(kwargs or {}))

    def patch(method: str):
        original = getattr(torch.Tensor, method)

        def wrapper(self, *args, **kwargs):
            record(method)
            inside[0] = True
            try:
                return original(self, *args, **kwargs)
            finally:
                inside[0] = False

        setattr(torch.Tensor, method, wrapper)
        return original

    originals = {m: patch(m) for m in ("tolist", "cpu", "numpy")}
    try:
        with Mode():
            yield syncs
    finally:
        for method, original in originals.items():
            setattr(torch.Tensor, method, original)

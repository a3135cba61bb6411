"""Shared pieces of the benchmarks: one result row, one timing helper, one correctness check for
indices, one command line, one JSON file per op and device.

Every bench module builds a list of rows with `measure`, which runs the peer once (the warm-up and
the correctness check), then times it. A peer that is missing, runs out of memory or cannot run on
this device becomes a row with a status instead of a crash, so one failing peer never costs a GPU
session its other numbers.
"""

import argparse
import dataclasses
import functools
import gc
import glob
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Ceilings measured on the H100 of the GPU machine (DESIGN.md): TFLOP/s per arithmetic and the
# device copy in GB/s (bytes read + written). "percent of peak" is left empty on other devices.
H100_LIMITS = {"bf16": 772.0, "tf32": 391.0, "fp32": 52.0, "copy": 3000.0}
# A CPU peer predicted to need more than this is skipped, not tried: the CPU machine is shared and
# has no swap (23 GiB for 6 helpers), so a failed allocation there can take others down with it.
CPU_MEMORY_LIMIT = 4 * 2**30
CHECK_ROWS = 512  # rows sampled for float64 checks: enough to see a 0.2 % disagreement rate
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout
RESULTS = os.path.join("bench", "results")


class Skip(Exception):
    """Raised by a peer's setup when it cannot run here; the row gets status 'skipped: <why>'."""


@dataclasses.dataclass
class Row:
    name: str
    shape: dict
    ms: float | None = None  # median of the timed runs
    ms_p20: float | None = None
    ms_p80: float | None = None
    tflops: float | None = None  # counted flops / median time
    gbps: float | None = None  # bytes the op must move (inputs once, outputs once) / median time
    percent_of_peak: float | None = None  # of the H100 ceiling that binds: arithmetic or copy
    peak_gib: float | None = None  # device memory of a warm call beyond what was allocated before
    agree: float | None = None  # fraction of sampled indices equal to the float64 reference
    err: float | None = None  # max |out - ref64| / max |ref64| over the checked outputs
    ok: bool | None = None  # the op's correctness verdict (tie-aware for indices)
    extra: dict = dataclasses.field(default_factory=dict)
    status: str = "ok"  # "ok", "OOM", "skipped: ...", "unavailable: ...", "error: ..."

    @staticmethod
    def header() -> str:
        return (
            f"{'peer':34} {'shape':30} {'ms':>9} {'p20-p80':>17} {'rate':>11} {'%peak':>6} "
            f"{'GiB':>6} {'agree':>7} {'err':>8}"
        )

    def line(self) -> str:
        shape = " ".join(f"{k}={v}" for k, v in self.shape.items())
        if self.status != "ok":
            return f"{self.name:34} {shape:30} {self.status}"

        def fmt(value, spec, width):
            return f"{value:{width}{spec}}" if value is not None else f"{'-':>{width}}"

        rate = (
            f"{self.tflops:7.3f} TF/s"
            if self.tflops is not None
            else f"{self.gbps:7.1f} GB/s"
            if self.gbps is not None
            else f"{'-':>12}"
        )
        verdict = {None: "", True: "", False: " CHECK-FAILED"}[self.ok]
        return (
            f"{self.name:34} {shape:30} {self.ms:9.3f} {self.ms_p20:8.3f}-{self.ms_p80:8.3f} "
            f"{rate}{fmt(self.percent_of_peak, '.1f', 6)} {fmt(self.peak_gib, '.2f', 6)} "
            f"{fmt(self.agree, '.4f', 7)} {fmt(self.err, '.1e', 8)}{verdict}"
        )


def timeit(fn: Callable, reps: int) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of fn().

    CUDA: triton.testing.do_bench (events, its own warm-up, and an L2 flush before every run, so
    inputs that fit in L2 are not timed from the cache). CPU: wall clock after the caller's warm-up,
    at most `reps` runs and fewer when one run is long (about 3 s of timing per row).
    """
    if DEVICE == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]))
    times = []
    while len(times) < reps and (not times or sum(times) < 3000.0):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    q = torch.quantile(torch.tensor(times), torch.tensor([0.5, 0.2, 0.8]))
    return tuple(q.tolist())


def memory_limit() -> float:
    """Bytes a peer may be predicted to need before it is skipped instead of tried: CPU_MEMORY_LIMIT
    on CPU; on CUDA 90 % of the device's memory (an allocation that fails near the limit can leave
    the allocator fragmented for the rows after it)."""
    if DEVICE == "cuda":
        return 0.9 * torch.cuda.get_device_properties(0).total_memory
    return CPU_MEMORY_LIMIT


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def measure(
    name: str,
    shape: dict,
    setup: Callable[[], Callable],
    *,
    check: Callable | None = None,
    reps: int = 5,
    flops: float | None = None,
    nbytes: float | None = None,
    arith: str | None = None,
    need_bytes: float | None = None,
) -> Row:
    """One row: fn = setup(); out = fn() (warm-up); check(out); on CUDA the peak memory of a
    second fn(); then time fn().

    setup: prepares inputs (dtype conversions, modules) outside the timed region and returns the
        zero-argument callable to time; it raises Skip (or ImportError) when the peer cannot run.
    check: out -> dict of Row fields (agree, err, ok, extra), computed before any timing.
    flops / nbytes: the work counted for the TFLOP/s or GB/s column; arith: the H100 ceiling it is
        compared with ("bf16", "tf32", "fp32"; bytes always against "copy").
    need_bytes: predicted peak memory; a peer over memory_limit() is skipped, not tried.
    """
    row = Row(name=name, shape=dict(shape))
    fn = out = None
    try:
        limit = memory_limit()
        if need_bytes is not None and need_bytes > limit:
            raise Skip(
                f"needs ~{need_bytes / 2**30:.0f} GiB, over the {limit / 2**30:.0f} GiB limit"
            )
        fn = setup()
        out = fn()  # the warm-up, and the output checked: stateful peers' first step
        _sync()
        if check is not None:
            for key, value in check(out).items():
                setattr(row, key, value)
        out = None
        if DEVICE == "cuda":
            # Peak memory of a second call: the first one also holds what a process allocates
            # once (cuBLAS's workspace for whichever peer calls it first, Triton autotuning's and
            # torch.compile's benchmark buffers), which is no op's own.
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            out = fn()
            _sync()
            row.peak_gib = (torch.cuda.max_memory_allocated() - before) / 2**30
            out = None
        row.ms, row.ms_p20, row.ms_p80 = timeit(fn, reps)
        h100 = "h100" in device_name().lower()
        if flops:
            row.tflops = flops / row.ms / 1e9
            if h100 and arith:
                row.percent_of_peak = 100 * row.tflops / H100_LIMITS[arith]
        if nbytes:
            row.gbps = nbytes / row.ms / 1e6
            if h100:  # with flops too: the nearer of the two limits, the one that binds
                bandwidth = 100 * row.gbps / H100_LIMITS["copy"]
                row.percent_of_peak = max(row.percent_of_peak or 0.0, bandwidth)
    except Skip as e:
        row.status = f"skipped: {e}"
    except ImportError as e:
        row.status = f"skipped: {e.name or e} not installed"
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not _is_oom(e):
            row.status = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        else:
            row.status = "OOM"
    except ValueError as e:
        # fastvq's answer to a backend it does not have here ("backend 'cuda' is unavailable",
        # "... has no top-k kernel"); any other ValueError is a failure of the row.
        kind = "unavailable" if str(e).startswith("backend ") else f"error: {type(e).__name__}"
        row.status = f"{kind}: {str(e).splitlines()[0][:200]}"
    except Exception as e:  # noqa: BLE001  (a broken peer must not end the run)
        row.status = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    finally:
        fn = out = None  # an exception in check() or timeit() would otherwise keep the output
        gc.collect()
        if DEVICE == "cuda":
            try:
                torch.cuda.empty_cache()
            except RuntimeError as e:  # a sticky CUDA error (illegal address): rows end here
                if row.status == "ok":
                    row.status = f"error: {type(e).__name__}: {str(e)[:200]}"
                _ROW_HOOK(row)
                raise
    print(row.line(), flush=True)
    _ROW_HOOK(row)
    return row


def _no_hook(row: Row) -> None:
    pass


# cli's: saves the rows measured so far after each row, so that a step cut by its timeout or by
# a CUDA error keeps every row it finished, not only its finished shapes.
_ROW_HOOK = _no_hook


def check_indices(z, codebook, indices, metric="l2", precision="exact", rows=CHECK_ROWS) -> dict:
    """agree: fraction of sampled rows equal to the float64 argmin (argmax for "dot"), or for
    (N, k) indices to the float64 k nearest in order; ok: fastvq.testing's tie-aware verdict
    (check_nearest / check_nearest_topk) for the arithmetic's precision."""
    from fastvq.reference import nearest_code, nearest_code_topk
    from fastvq.testing import check_nearest, check_nearest_topk

    sub = sample_rows(len(z), rows, z.device)
    topk = indices.dim() == 2
    check = check_nearest_topk if topk else check_nearest
    try:
        agree = check(z[sub], codebook, indices[sub].long(), metric, precision)
        return {"agree": agree, "ok": True}
    except AssertionError:
        z64, c64 = z[sub].double(), codebook.double()
        if topk:
            best = nearest_code_topk(z64, c64, indices.shape[1], metric)
            same = (indices[sub].long() == best).all(1)
        else:
            same = indices[sub].long() == nearest_code(z64, c64, metric)
        return {"agree": same.double().mean().item(), "ok": False}


def sample_rows(n: int, rows: int, device) -> torch.Tensor:
    """Evenly spaced row indices, at most `rows` of them."""
    return torch.linspace(0, n - 1, min(rows, n)).long().to(device)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (ref in float64)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def device_name(device: str = DEVICE) -> str:
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


@functools.cache
def gpu_state() -> dict:
    """GPU 0's driver, clocks, temperature and power as nvidia-smi reads them ({} without it):
    a record taken on a down-clocked or hot card says so. Once per process (nvidia-smi can take
    a second to start), after the first row's timings (its first save)."""
    fields = ("driver_version", "clocks.sm", "clocks.max.sm", "clocks.mem", "temperature.gpu",
              "power.draw", "power.limit")  # fmt: skip
    query = ["nvidia-smi", "--id=0", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"]
    try:
        out = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    values = [v.strip() for v in out.strip().split(",")]
    return dict(zip(fields, values, strict=True)) if len(values) == len(fields) else {}


def _git(*args) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT)
    except OSError:
        return None


def _dirty(out: str | None) -> bool:
    """Whether the checkout differs from its commit, the benchmark records aside (bench/results
    and this run's --out folder: records written earlier in the run do not make the code
    dirty). True where git cannot tell: a record is never called clean by mistake."""
    status = _git("status", "--porcelain", "-z", "--untracked-files=all")
    if status is None or status.returncode != 0:
        return True
    root = os.path.realpath(ROOT)
    folders = {os.path.join(root, RESULTS), os.path.realpath(out or RESULTS)}
    for entry in filter(None, status.stdout.split("\0")):
        path = os.path.join(root, entry[3:])  # "XY path", relative to the checkout
        if not (os.path.dirname(path) in folders and path.endswith((".json", ".json.tmp"))):
            return True
    return False


def environment(device: str = DEVICE, out: str | None = None) -> dict:
    """The record's environment; out: the folder the records go to."""
    cpu, flags = platform.processor(), set()
    if os.path.exists("/proc/cpuinfo"):
        info = open("/proc/cpuinfo").read()
        models = re.findall(r"model name\s*:\s*(.*)", info)
        cpu = models[0] if models else cpu
        match = re.search(r"^flags\s*:\s*(.*)$", info, re.M)
        flags = set(match.group(1).split()) if match else set()
    gpu = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        gpu = {
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "l2_mib": getattr(props, "L2_cache_size", 0) / 2**20 or None,
            "cudnn": torch.backends.cudnn.version(),
            **gpu_state(),
        }
    # The commit: a tree copied without its .git (as the device machine's may be) has none to
    # read, so gpu.sh's caller passes it as FASTVQ_GIT_REV.
    head = _git("rev-parse", "HEAD")
    rev = head.stdout.strip() if head is not None and head.returncode == 0 else ""
    if rev and _dirty(out):
        rev += "+dirty"
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else cpu,
        "gpu": gpu,
        "cpu": cpu,
        # The vector extensions the C++ kernels' builds may use (which one runs: backends).
        "cpu_isa": [isa for isa in ("sse2", "avx2", "fma", "avx512f") if isa in flags],
        "threads": torch.get_num_threads(),
        # 1-minute load average at the end of the run: above the thread count, CPU timings are
        # shared with other processes and noisy.
        "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "peers": {p: _version(p) for p in ("vector-quantize-pytorch", "flash-kmeans")},
        "git": rev or os.environ.get("FASTVQ_GIT_REV", "unknown"),
        "backends": {k: v.available for k, v in __import__("fastvq").backends().items()},
    }


def save(folder: str, op: str, rows: list[Row], extra: dict, quick: bool = False) -> str:
    """Write <folder>/<op>-<device>.json (…-quick.json for smoke runs, so that they never replace
    measured numbers) with the environment, `extra` and the rows; returns the path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{op}-{device_name()}{'-quick' if quick else ''}.json")
    record = {
        "op": op,
        "environment": environment(out=folder),
        **extra,
        "rows": [dataclasses.asdict(r) for r in rows],
    }
    write_json(path, record)
    return path


def write_json(path: str, value) -> None:
    """Replace path's contents at once: a run killed mid-write (a GPU step's timeout) leaves the
    previous file, never a truncated one that hides the shapes it had finished."""
    try:
        with open(path + ".tmp", "w") as f:
            json.dump(value, f, indent=1)
        os.replace(path + ".tmp", path)
    except BaseException:
        if os.path.exists(path + ".tmp"):
            os.unlink(path + ".tmp")
        raise


# The row fields that --summary and --targets read: a record without one is of another format
# (a field added to Row later does not make the committed records unreadable).
ROW_KEYS = {"name", "shape", "status", "ms", "ok", "peak_gib", "agree", "extra"}


def records(folder: str) -> list[tuple[str, dict]]:
    """(path, record) of every record `save` wrote in folder, by file name. Other JSON files
    without rows (screening_share.json) are left out; an unreadable file or a record of another
    format is left out with a note on stderr naming it."""
    if not os.path.isdir(folder):
        raise NotADirectoryError(f"{folder!r} is not a folder of benchmark records")
    found = []
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), "*.json"))):
        try:
            with open(path) as f:
                record = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            print(f"skipped {path}: not readable as JSON ({e})", file=sys.stderr)
            continue
        if not isinstance(record, dict) or "rows" not in record:
            continue
        rows = record["rows"]
        if not (
            isinstance(record.get("op"), str)
            and isinstance(record.get("environment"), dict)
            and isinstance(rows, list)
            and all(isinstance(row, dict) and ROW_KEYS <= row.keys() for row in rows)
        ):
            print(f"skipped {path}: not a record of this version's format", file=sys.stderr)
            continue
        found.append((path, record))
    return found


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {value}")
    return value


def cli(argv, doc: str, op: str, run: Callable, shapes: dict) -> str:
    """The command line every bench module shares; shapes = {"cuda": [...], "cpu": [...],
    "quick": [...]}; run(shapes, reps, quick) -> rows. Returns the JSON path."""
    parser = argparse.ArgumentParser(description=doc, allow_abbrev=False)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    parser.add_argument("--out", default=RESULTS, help=f"records' folder (default {RESULTS})")
    parser.add_argument(
        "--reps", type=positive_int, default=5, help="timed runs on CPU (GPU: do_bench)"
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        help="torch CPU threads (default: torch's); recorded in the JSON",
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads > (os.cpu_count() or 1):
            parser.error(f"--threads: this machine has {os.cpu_count()} CPUs, got {args.threads}")
        torch.set_num_threads(args.threads)
    try:  # before any work: a GPU session must not time a whole shape to fail at its save
        os.makedirs(args.out, exist_ok=True)
        if not os.access(args.out, os.W_OK):
            raise PermissionError("not writable")
    except OSError as e:
        parser.error(f"--out {args.out!r}: {e.strerror or e}")
    chosen = shapes["quick"] if args.quick else shapes[DEVICE]
    print(f"== {op} on {device_name()}")
    print(Row.header())
    global _ROW_HOOK
    rows, pending = [], []

    def keep(row: Row) -> None:
        pending.append(row)
        partial = {"quick": args.quick, "reps": args.reps, "shapes": chosen, "complete": False}
        save(args.out, op, rows + pending, partial, args.quick)

    _ROW_HOOK = keep
    try:
        for i, shape in enumerate(chosen):
            pending.clear()
            rows += run([shape], args.reps, args.quick)
            done = {"quick": args.quick, "reps": args.reps, "shapes": chosen}
            done["complete"] = i == len(chosen) - 1
            path = save(args.out, op, rows, done, args.quick)
    finally:
        _ROW_HOOK = _no_hook
    print(f"saved {path}")
    return path

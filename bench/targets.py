"""The issues' performance targets, each checked against the rows of a folder of records.

python -m bench.run --targets DIR    (what a GPU session prints last, after the summary)

TARGETS is the one table: the issue, what is measured, the record (op) and the device it counts on
(a CUDA GPU or a CPU), the rows (name, shape) the value is read from, how the value follows from
those rows, and the bound. Every row of one target comes from one record: a ratio is between rows of
the same run, as the issues ask. Verdicts: "met", "MISSED", or "not measured: <why>" (no record
from that device, the row missing, a row skipped or failed, or a row whose correctness check failed:
a wrong result never meets a target).
"""

import dataclasses
import sys
from collections.abc import Callable

from bench.bench_scalar import COPY
from bench.common import records


@dataclasses.dataclass(frozen=True)
class Target:
    issue: int
    what: str
    device: str  # "cuda": counts on records of a CUDA GPU; "cpu": on records of a CPU
    op: str  # the record: <op>-<device>.json
    rows: tuple  # (name, shape) of each row read; a row matches if its shape holds these items
    value: Callable  # the rows' dicts, in order -> the value compared with the bound
    compare: str  # "<=" or ">="
    bound: float
    unit: str  # " ms", " %", "x"


def ms(row):
    return row["ms"]


def ratio(a, b):
    return a["ms"] / b["ms"]


def share(part, whole):
    return 100 * part["ms"] / whole["ms"]


def peak_gib(row):
    return row["peak_gib"]


def copy_share(op, copy):
    # the copy row moves the op's bytes: the share of the copy bandwidth is a ratio of times
    return 100 * copy["ms"] / op["ms"]


def nkd(n, k, d, **more):
    return {**more, "N": n, "K": k, "D": d}


QUANTIZE = nkd(65536, 65536, 32, op="quantize")
LEECH = {"op": "leech", "N": 65536}
ENTROPY = {"op": "entropy", "N": 65536, "d": 18, "codes": 2**18}
LATENTS = {"B": 8, "S": 256, "K": 65536}  # the f16 VQGAN's 16 x 16 tokens of a 256 x 256 image
TARGETS = [
    Target(2, "nearest_code exact fp32 65536x65536x32", "cuda", "nearest_code",
           (("fastvq exact", nkd(65536, 65536, 32)),), ms, "<=", 0.8, " ms"),
    Target(2, "nearest_code exact fp32 65536x196560x24", "cuda", "nearest_code",
           (("fastvq exact", nkd(65536, 196560, 24)),), ms, "<=", 1.5, " ms"),
    Target(2, "nearest_code exact fp32 16384x65536x256", "cuda", "nearest_code",
           (("fastvq exact", nkd(16384, 65536, 256)),), ms, "<=", 1.0, " ms"),
    Target(2, "nearest_code exact fp32 65536x16384x8", "cuda", "nearest_code",
           (("fastvq exact", nkd(65536, 16384, 8)),), ms, "<=", 0.15, " ms"),
    # "fastvq exact" is backend "auto": the C++ backend on CPU tensors where it is built
    Target(2, "chunked ref / C++ nearest_code 8192x16384x32", "cpu", "nearest_code",
           (("torch chunked fp32", nkd(8192, 16384, 32)), ("fastvq exact", nkd(8192, 16384, 32))),
           ratio, ">=", 3.0, "x"),
    Target(3, "EMA + codebook + dead-code check 65536x65536x32", "cuda", "codebook",
           (("fastvq ema auto", nkd(65536, 65536, 32, op="ema")),), ms, "<=", 0.1, " ms"),
    Target(3, "quantize fwd+bwd rotation / ste 65536x65536x32", "cuda", "codebook",
           (("fastvq quantize rotation auto", QUANTIZE), ("fastvq quantize ste auto", QUANTIZE)),
           ratio, "<=", 1.1, "x"),
    Target(3, "quantize rotation / nearest_code alone", "cuda", "codebook",
           (("fastvq quantize rotation auto", QUANTIZE), ("fastvq nearest_code alone", QUANTIZE)),
           ratio, "<=", 1.2, "x"),
    Target(3, "kmeans 262144 -> 65536 codes, D 32, 10 iters", "cuda", "codebook",
           (("fastvq kmeans (k-means++)", nkd(262144, 65536, 32, op="kmeans", iters=10)),),
           ms, "<=", 50.0, " ms"),
    Target(4, "Leech structured decoder N 65536", "cuda", "lattice",
           (("fastvq leech structured auto", LEECH),), ms, "<=", 0.3, " ms"),
    Target(4, "Leech fused brute force dot / structured", "cuda", "lattice",
           (("fastvq brute force dot exact", LEECH), ("fastvq leech structured auto", LEECH)),
           ratio, ">=", 5.0, "x"),
    Target(4, "LFQ entropy fwd+bwd 65536x18, 2^18 codes", "cuda", "scalar",
           (("fastvq lfq entropy", ENTROPY),), ms, "<=", 0.5, " ms"),
    Target(4, "BSQ entropy fwd+bwd 65536x18, 2^18 codes", "cuda", "scalar",
           (("fastvq bsq entropy", ENTROPY),), ms, "<=", 0.5, " ms"),
    Target(4, "FSQ fwd+bwd N 1048576: share of copy bandwidth", "cuda", "scalar",
           (("fastvq fsq", {"op": "fsq", "N": 1048576}), (COPY, {"op": "fsq", "N": 1048576})),
           copy_share, ">=", 70.0, " %"),
    Target(4, "LFQ fwd+bwd N 1048576: share of copy bandwidth", "cuda", "scalar",
           (("fastvq lfq", {"op": "lfq", "N": 1048576}), (COPY, {"op": "lfq", "N": 1048576})),
           copy_share, ">=", 70.0, " %"),
    Target(4, "BSQ fwd+bwd N 1048576: share of copy bandwidth", "cuda", "scalar",
           (("fastvq bsq", {"op": "bsq", "N": 1048576}), (COPY, {"op": "bsq", "N": 1048576})),
           copy_share, ">=", 70.0, " %"),
    # the quantizer alone on the step's latents over the step: the record's extra.quantizer_share
    Target(6, "VQGAN step: quantizer share", "cuda", "nn",
           (("fastvq VectorQuantize rotation (VQGAN latents)", {"op": "vq", **LATENTS}),
            ("fastvq VQGAN step", {"op": "vqgan", "B": 8, "R": 256, "K": 65536})),
           share, "<=", 5.0, " %"),
]  # fmt: skip
# Issue 5: a VectorQuantize training step (forward + backward + EMA), time and peak memory, with
# and without the rotation trick: (batch, seq, K, D), ms, GiB.
TARGETS += [
    Target(5, f"VQ{label} step {b}x{s} K {k} D {d}: {what}", "cuda", "nn",
           ((f"fastvq VectorQuantize{rot}", {"op": "vq", "B": b, "S": s, "K": k, "D": d}),),
           value, "<=", bound, unit)
    for (b, s, k, d), step_ms, gib in [((256, 256, 16384, 8), 1.5, 0.5),
                                       ((256, 256, 65536, 32), 2.0, 1.0),
                                       ((64, 256, 65536, 256), 3.0, 1.0)]
    for label, rot in (("", ""), (" rot", " rotation"))
    for what, value, bound, unit in (("time", ms, step_ms, " ms"), ("peak", peak_gib, gib, " GiB"))
]  # fmt: skip


def _find(record: dict, name: str, shape: dict) -> dict | None:
    for row in record["rows"]:
        if row["name"] == name and all(row["shape"].get(k) == v for k, v in shape.items()):
            return row
    return None


def evaluate(target: Target, record: dict) -> tuple[str, str]:
    """(measured, verdict) of target on one record."""
    rows = []
    for name, shape in target.rows:
        row = _find(record, name, shape)
        where = f"{name!r} at " + " ".join(f"{k}={v}" for k, v in shape.items())
        if row is None:
            cut = "" if record.get("complete", True) else " (the run stopped early)"
            return "-", f"not measured: no row {where}{cut}"
        if row["status"] != "ok":
            return "-", f"not measured: {where}: {row['status']}"
        if row["ok"] is False:
            return "-", f"not measured: {where}: correctness check failed"
        rows.append(row)
    value = target.value(*rows)
    measured = f"{value:.3g}{target.unit}"
    if len(rows) > 1:
        measured += " (" + " / ".join(f"{r['ms']:.4g}" for r in rows) + " ms)"
    met = value <= target.bound if target.compare == "<=" else value >= target.bound
    return measured, "met" if met else "MISSED"


def _device(record: dict) -> str:
    env = record["environment"]
    return env["device"] if env.get("gpu") else f"{env['device']}, {env['threads']} threads"


def _counted(target: Target, record: dict, measured: str, verdict: str) -> tuple[str, str]:
    """(measured, verdict), the verdict qualified where the record cannot settle the target: a
    time bound is an H100's (another GPU's time, an H200's included, is not counted; a ratio of
    two rows of one run is); a CPU record taken with the load above its threads had its timings
    shared."""
    env = record["environment"]
    settled = verdict in ("met", "MISSED")
    if settled and target.device == "cuda" and target.unit == " ms" and "H100" not in env["device"]:
        return measured, f"not counted: not an H100 ({verdict} on this GPU)"
    load, threads = env.get("load"), env.get("threads")
    if target.device == "cpu" and load is not None and threads and load > threads:
        verdict += f" (load {load:.1f} > {threads} threads: timings shared)"
    return measured, verdict


def report(folder: str) -> list[tuple[Target, str, str, str]]:
    """Prints one line per target and record of its device in folder, or one saying that there is
    none; returns the lines' (target, device, measured, verdict)."""
    every = records(folder)
    if not every:
        print(f"no benchmark records in {folder}", file=sys.stderr)
    found = [r for _, r in every if not r.get("quick")]  # smoke runs measure nothing
    lines = []
    for target in TARGETS:
        ops = [r for r in found if r["op"] == target.op]
        mine = [
            r for r in ops if ("cuda" if r["environment"].get("gpu") else "cpu") == target.device
        ]
        if not mine:
            kind = "a CUDA GPU" if target.device == "cuda" else "a CPU"
            why = f"not measured: no {target.op} record from {kind}"
            if ops:
                why += f" (only {'; '.join(sorted({_device(r) for r in ops}))})"
            lines.append((target, "-", "-", why))
        lines += [(target, _device(r), *_counted(target, r, *evaluate(target, r))) for r in mine]
    print(f"{'#':>2} {'target':48} {'bound':>10} {'device':22} {'measured':28} verdict")
    for target, device, measured, verdict in lines:
        bound = f"{target.compare} {target.bound:g}{target.unit}"
        print(
            f"{target.issue:>2} {target.what[:48]:48} {bound:>10} {device[:22]:22} "
            f"{measured:28} {verdict}"
        )
    return lines

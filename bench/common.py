"""Shared pieces of the benchmarks: one result row, the environment record, the JSON file."""

import dataclasses
import json
import os
import platform
import re
import subprocess

import torch


@dataclasses.dataclass
class Row:
    name: str
    n: int
    k: int
    d: int
    ms: float | None = None
    ms_p20: float | None = None
    ms_p80: float | None = None
    tflops: float | None = None
    percent_of_peak: float | None = None
    peak_gib: float | None = None
    agree: float | None = None  # fraction of sampled rows equal to the float64 argmin
    tie_aware_ok: bool | None = None
    status: str = "ok"

    @staticmethod
    def header() -> str:
        return (
            f"{'peer':26} {'N':>7} {'K':>7} {'D':>4} {'ms':>9} {'p20-p80':>17} "
            f"{'TFLOP/s':>8} {'%peak':>6} {'GiB':>6} {'agree':>7}"
        )

    def line(self) -> str:
        if self.status != "ok":
            return f"{self.name:26} {self.n:7} {self.k:7} {self.d:4} {self.status:>9}"
        pct = f"{self.percent_of_peak:6.1f}" if self.percent_of_peak is not None else f"{'-':>6}"
        gib = f"{self.peak_gib:6.2f}" if self.peak_gib is not None else f"{'-':>6}"
        return (
            f"{self.name:26} {self.n:7} {self.k:7} {self.d:4} {self.ms:9.3f} "
            f"{self.ms_p20:8.3f}-{self.ms_p80:8.3f} {self.tflops:8.3f} {pct} {gib} "
            f"{self.agree:7.4f}{'' if self.tie_aware_ok else ' TIE-CHECK-FAILED'}"
        )


def device_name(device: str) -> str:
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def environment(device: str) -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        models = re.findall(r"model name\s*:\s*(.*)", open("/proc/cpuinfo").read())
        cpu = models[0] if models else cpu
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else cpu,
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "git": git("rev-parse", "HEAD") + ("+dirty" if git("status", "--porcelain") else ""),
        "backends": {k: v.available for k, v in __import__("fastvq").backends().items()},
    }


def save(folder: str, stem: str, rows: list[Row], extra: dict) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{stem}.json")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    record = {
        "environment": environment(device),
        **extra,
        "rows": [dataclasses.asdict(r) for r in rows],
    }
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    return path

"""Run the benchmarks, each saving <out>/<op>-<device>[-quick].json:

python -m bench.run [--quick] [--only nearest_code codebook ...] [--out DIR] [--reps N]
python -m bench.run --summary DIR    (a compact table of every record in DIR)
python -m bench.run --targets DIR    (the issues' performance targets: met, MISSED or not measured)

Every option but --only goes to each module's command line (bench/common.py's cli: also --reps N,
--threads N). A module that fails as a whole, or whose fastvq rows failed (an error or a failed
correctness check), is reported and the others still run; the exit status says whether any failed.
"""

import argparse
import importlib
import json
import os
import sys
import time
import traceback

from bench import targets
from bench.common import records

MODULES = ("nearest_code", "codebook", "lattice", "scalar", "nn")


def _state(record: dict) -> str:
    """What a record's header says besides its device: the commit (a record an earlier run left
    behind shows an older one), smoke run, cut run, busy CPU."""
    env = record["environment"]
    notes = [f"git {env['git'][:12]}"] if env.get("git") else []
    notes += ["quick"] * bool(record.get("quick"))
    notes += ["INCOMPLETE: the run stopped early"] * (record.get("complete") is False)
    load, threads = env.get("load"), env.get("threads")
    if not env.get("gpu") and load is not None and threads and load > threads:
        notes.append(f"load {load:.1f} > {threads} threads: timings shared")
    return "".join(f", {note}" for note in notes)


def summary(folder: str) -> int:
    """One short line per row of every <op>-*.json in folder: what a GPU session prints
    before its targets. Returns the number of records."""
    found = records(folder)
    for path, record in found:
        device = record["environment"].get("device")
        print(f"-- {os.path.basename(path)} ({device}{_state(record)})")
        for row in record["rows"]:
            shape = " ".join(f"{v}" for v in row["shape"].values())
            if row["status"] != "ok":
                print(f"{row['name'][:40]:40} {shape:24} {row['status'][:60]}")
                continue
            gib = f"{row['peak_gib']:.2f}" if row["peak_gib"] is not None else "-"
            agree = f"{row['agree']:.4f}" if row["agree"] is not None else "-"
            extra = " ".join(
                f"{k}={v:.3g}" for k, v in row["extra"].items() if isinstance(v, int | float)
            )
            flag = " CHECK-FAILED" if row["ok"] is False else ""
            print(
                f"{row['name'][:40]:40} {shape:24} {row['ms']:9.3f} ms {gib:>6} GiB "
                f"{agree:>7}{flag} {extra}"
            )
    return len(found)


def failed_rows(path: str) -> list[str]:
    """The fastvq rows of the record at path that errored or failed their correctness check
    (a peer may fail: a missing or out-of-memory peer is a row like any other)."""
    with open(path) as f:
        rows = json.load(f)["rows"]
    return [
        f"{row['name']} {row['shape']}: {'CHECK-FAILED' if row['ok'] is False else row['status']}"
        for row in rows
        if row["name"].startswith("fastvq")
        and (row["status"].startswith("error") or row["ok"] is False)
    ]


def main(argv=None) -> list[str]:
    """Returns the JSON paths written; raises SystemExit(1) after the last module if any failed."""
    # allow_abbrev=False: `fastvq bench` rewrites the folder options' values by their full names
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], add_help=False, allow_abbrev=False
    )
    parser.add_argument("--only", nargs="+", choices=MODULES, default=list(MODULES))
    parser.add_argument("--summary", metavar="DIR")
    parser.add_argument("--targets", metavar="DIR")
    args, rest = parser.parse_known_args(argv)
    if args.summary or args.targets:
        if rest:
            parser.error(f"--summary / --targets read records and take no other options: {rest}")
        for folder in {args.summary, args.targets} - {None}:
            if not os.path.isdir(folder):
                parser.error(f"{folder!r} is not a folder of benchmark records")
        empty = args.summary is not None and not summary(args.summary)
        if empty:
            print(f"no benchmark records in {args.summary}", file=sys.stderr)
        if args.targets:
            targets.report(args.targets)
        if empty:
            raise SystemExit(1)
        return []
    if "-h" in rest or "--help" in rest:
        print(__doc__)
        return []
    paths, failed = [], []
    for name in dict.fromkeys(args.only):  # a module named twice runs once
        start = time.perf_counter()
        try:
            module = importlib.import_module(f"bench.bench_{name}")
            path = module.main(rest)
            paths.append(path)
            if bad := failed_rows(path):
                print(f"{name}: fastvq rows failed:\n  " + "\n  ".join(bad), file=sys.stderr)
                failed.append(name)
        except Exception:  # noqa: BLE001  (one broken module must not cost the others)
            traceback.print_exc()
            failed.append(name)
        print(f"-- {name}: {time.perf_counter() - start:.0f} s", flush=True)
    if failed:
        print(f"FAILED: {' '.join(failed)}", file=sys.stderr)
        raise SystemExit(1)
    return paths


if __name__ == "__main__":
    main(sys.argv[1:])

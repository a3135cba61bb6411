"""Run the benchmarks, each saving <out>/<op>-<device>[-quick].json:

python -m bench.run [--quick] [--only nearest_code codebook ...] [--out DIR] [--reps N]
python -m bench.run --summary DIR    (a compact table of every record in DIR)
python -m bench.run --targets DIR    (the issues' performance targets: met, MISSED or not measured)

Every option but --only goes to each module's command line (bench/common.py's cli). A module that
fails as a whole is reported and the others still run; the exit status says whether any failed.
"""

import argparse
import importlib
import os
import sys
import time
import traceback

from bench import targets
from bench.common import records

MODULES = ("nearest_code", "codebook", "lattice", "scalar", "nn")


def summary(folder: str) -> None:
    """One short line per row of every <op>-*.json in folder: what a GPU session prints
    before its targets."""
    for path, record in records(folder):
        print(f"-- {os.path.basename(path)} ({record['environment'].get('device')})")
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


def main(argv=None) -> list[str]:
    """Returns the JSON paths written; raises SystemExit(1) after the last module if any failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    parser.add_argument("--only", nargs="+", choices=MODULES, default=list(MODULES))
    parser.add_argument("--summary", metavar="DIR")
    parser.add_argument("--targets", metavar="DIR")
    args, rest = parser.parse_known_args(argv)
    if args.summary:
        summary(args.summary)
        return []
    if args.targets:
        targets.report(args.targets)
        return []
    if "-h" in rest or "--help" in rest:
        print(__doc__)
        return []
    paths, failed = [], []
    for name in args.only:
        start = time.perf_counter()
        try:
            module = importlib.import_module(f"bench.bench_{name}")
            paths.append(module.main(rest))
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

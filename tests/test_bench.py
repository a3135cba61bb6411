"""The benchmarks run end to end (--quick, on this machine's device) and write a complete record:
environment, shapes, one row per peer, every fastvq row checked correct before it was timed."""

import dataclasses
import importlib
import json
import os
import platform
import re
import subprocess
import sys

import pytest
import torch

from bench import common
from bench.run import MODULES, main

# Rows that need fastvq.models (issue 6) may be skipped while that package does not build.
MODELS_ROWS = ("VQGAN",)


def _models_build() -> bool:
    try:
        importlib.import_module("fastvq.models")
        return True
    except Exception:  # noqa: BLE001
        return False


@pytest.fixture
def one_thread():
    """The smoke runs use one thread: on the shared 2-core machine, two OpenMP threads wait on each
    other whenever another process holds a core (48 s instead of 19 s for bench_nn at load 7)."""
    threads = torch.get_num_threads()
    yield ["--threads", "1"]
    torch.set_num_threads(threads)


@pytest.mark.parametrize("module", MODULES)
def test_bench_writes_its_record(tmp_path, module, one_thread):
    argv = ["--only", module, "--quick", "--reps", "1", "--out", str(tmp_path), *one_thread]
    (path,) = main(argv)
    assert path.endswith("-quick.json")  # smoke runs never replace measured records
    record = json.load(open(path))
    env = record["environment"]
    assert {"device", "torch", "triton", "git", "backends", "peers", "load"} <= set(env)
    assert env["threads"] == 1 and record["reps"] == 1
    assert env["python"] == platform.python_version() and re.fullmatch(r"\d{4}-.*Z", env["time"])
    assert env["device"] and env["torch"]
    bench = importlib.import_module(f"bench.bench_{module}")
    assert record["quick"] is True and record["complete"] is True
    assert record["shapes"] == [list(s) for s in bench.SHAPES["quick"]]

    rows = record["rows"]
    names = {row["name"] for row in rows}
    assert any(n.startswith("fastvq") for n in names) and any(
        not n.startswith("fastvq") for n in names
    ), names
    for row in rows:
        assert row["shape"], row
        status = row["status"]
        if row["name"].startswith("fastvq"):
            if status.startswith("skipped") and any(m in row["name"] for m in MODELS_ROWS):
                assert not _models_build(), row
                continue
            # fastvq's own rows must run and pass their check: tie-aware indices agreeing with the
            # float64 reference, outputs and gradients within tolerance
            assert status == "ok" and row["ok"] is True and row["ms"] > 0, row
            assert row["agree"] in (None, 1.0), row
            assert row["err"] is None or row["err"] < 1e-4, row
        else:
            # peers may be skipped or run out of memory, but only with a stated reason
            assert status == "ok" or status == "OOM" or status.startswith("skipped: "), row
            assert status != "skipped: ", row
            if status == "ok":
                assert row["ms"] > 0, row
    ok_rows = [r for r in rows if r["status"] == "ok"]
    if module == "nearest_code":  # TFLOP/s counts the distance GEMM's 2·N·K·D over the median
        for row in ok_rows:
            n, k, d = (row["shape"][key] for key in "NKD")
            assert row["tflops"] == pytest.approx(2 * n * k * d / row["ms"] / 1e9), row
    if module == "nn" and _models_build():  # the quantizer alone on the step's latents, over it
        alone = {r["name"].split()[0]: r for r in ok_rows if "(VQGAN latents)" in r["name"]}
        steps = [r for r in ok_rows if r["name"].endswith("VQGAN step")]
        assert any(r["name"].startswith("fastvq") for r in steps), rows
        for row in steps:
            q = alone[row["name"].split()[0]]
            assert row["extra"]["quantizer_ms"] == q["ms"], (row, q)
            assert row["extra"]["quantizer_share"] == pytest.approx(q["ms"] / row["ms"])
    # bench/targets.py finds its rows in the GPU's record by name and shape keys: the quick
    # record has them too (at other sizes)
    from bench.targets import TARGETS

    for target in (t for t in TARGETS if t.op == module):
        for name, shape in target.rows:
            found = [r for r in rows if r["name"] == name and set(shape) <= set(r["shape"])]
            assert found, (target.what, name, shape)
            assert any(r["shape"].get("op") == shape.get("op") for r in found), (name, shape)


def test_run_fails_on_failed_fastvq_rows_and_runs_a_module_once(tmp_path, monkeypatch, capsys):
    """A module whose fastvq row errored or failed its check is a failed module (it exited 0,
    and gpu.sh called the step ok); a failing peer is not; --only a a runs a once."""
    import bench.bench_scalar

    calls = []

    def fake(argv, rows):
        calls.append(argv)
        path = str(tmp_path / "scalar-cpu.json")
        common.write_json(path, {"op": "scalar", "environment": {}, "rows": rows})
        return path

    peer = dataclasses.asdict(common.Row("vqp fsq", {"N": 1}, status="error: RuntimeError: x"))
    good = dataclasses.asdict(common.Row("fastvq fsq", {"N": 1}, ms=1.0, ok=True))
    monkeypatch.setattr(bench.bench_scalar, "main", lambda argv: fake(argv, [peer, good]))
    assert main(["--only", "scalar", "scalar", "--quick"]) == [str(tmp_path / "scalar-cpu.json")]
    assert calls == [["--quick"]]
    unchecked = dict(good, ok=None)  # a row without a check, or a backend not built here
    unavailable = dict(good, ok=None, ms=None, status="unavailable: no CUDA")
    monkeypatch.setattr(
        bench.bench_scalar, "main", lambda argv: fake(argv, [unchecked, unavailable])
    )
    assert main(["--only", "scalar"]) == [str(tmp_path / "scalar-cpu.json")]
    for bad, why in (
        (dict(good, ok=False), "CHECK-FAILED"),
        (dict(good, status="error: y"), "error: y"),
    ):
        monkeypatch.setattr(bench.bench_scalar, "main", lambda argv, b=bad: fake(argv, [b]))
        with pytest.raises(SystemExit) as exc:
            main(["--only", "scalar"])
        assert exc.value.code == 1
        err = capsys.readouterr().err
        assert "scalar: fastvq rows failed" in err and f"{{'N': 1}}: {why}" in err


def test_fastvq_bench_takes_folders_from_where_it_runs(tmp_path, monkeypatch):
    """`fastvq bench` runs bench.run in the checkout: a relative --out / --summary / --targets
    wrote into, or read from, the checkout instead of the user's folder."""
    from fastvq.train.cli import _absolute_paths

    monkeypatch.chdir(tmp_path)
    here = str(tmp_path)
    args = ["--quick", "--out", "res", "--summary=s", "--targets", "t", "--only", "nn", "/abs"]
    assert _absolute_paths(args) == [
        "--quick", "--out", f"{here}/res", f"--summary={here}/s", "--targets", f"{here}/t",
        "--only", "nn", "/abs",
    ]  # fmt: skip
    import fastvq.train.cli as cli

    called = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, cwd: called.append(cmd) or 0)
    assert cli.main(["bench", "--out", "res"]) == 0
    assert called[0][-2:] == ["--out", f"{here}/res"]
    # a missing value stays missing (bench.run's argparse says so), not a folder "--quick"
    assert _absolute_paths(["--out", "--quick"]) == ["--out", "--quick"]
    with pytest.raises(SystemExit) as exc:  # abbreviations would escape the rewriting
        main(["--summ", str(tmp_path)])
    assert exc.value.code == 2


def test_run_reports_a_broken_module(tmp_path, monkeypatch, capsys):
    """One failing module is reported and the exit status says so."""
    import bench.bench_scalar

    monkeypatch.setattr(bench.bench_scalar, "main", lambda argv: 1 / 0)
    with pytest.raises(SystemExit) as exc:
        main(["--only", "scalar", "--quick", "--out", str(tmp_path)])
    assert exc.value.code == 1
    assert "ZeroDivisionError" in capsys.readouterr().err


# --- the harness's bookkeeping, on fake work: what it records, never how fast anything ran ---


@pytest.mark.skipif(common.DEVICE == "cuda", reason="the CPU path of timeit")
def test_timeit_median_and_percentiles(monkeypatch):
    """CPU timeit: `reps` runs, (median, p20, p80) of their durations, on a fake clock."""
    clock, durations = [0.0], iter([0.005, 0.001, 0.003, 0.002, 0.004])
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])
    calls = []

    def fn():
        calls.append(1)
        clock[0] += next(durations)

    median, p20, p80 = common.timeit(fn, reps=5)
    assert len(calls) == 5
    expected = torch.quantile(torch.tensor([1.0, 2, 3, 4, 5]), torch.tensor([0.5, 0.2, 0.8]))
    assert [median, p20, p80] == pytest.approx(expected.tolist())
    assert p20 < median < p80


def test_measure_records_rates_and_check(monkeypatch, capsys):
    """measure: the check's fields land in the row, the p20 / p80 columns are the timer's, TFLOP/s
    and GB/s are the counted work over the median, percent of peak uses the ceiling of the row's
    arithmetic (and the nearer of the two limits on an H100), and a failed check is flagged."""
    monkeypatch.setattr(common, "timeit", lambda fn, reps: (2.0, 1.0, 3.0))
    row = common.measure(
        "p", {"N": 1}, lambda: lambda: 7, check=lambda out: {"agree": 0.5, "ok": out == 8}
    )
    assert (row.ms, row.ms_p20, row.ms_p80) == (2.0, 1.0, 3.0)
    assert row.agree == 0.5 and row.ok is False and row.status == "ok"
    assert "CHECK-FAILED" in capsys.readouterr().out
    assert row.tflops is None and row.gbps is None and row.percent_of_peak is None
    row = common.measure("p", {"N": 1}, lambda: lambda: 8, check=lambda out: {"ok": out == 8},
                         flops=4e9, nbytes=6e6, arith="bf16")  # fmt: skip
    assert row.ok is True and "CHECK-FAILED" not in capsys.readouterr().out
    assert row.tflops == pytest.approx(2.0) and row.gbps == pytest.approx(3.0)
    monkeypatch.setattr(common, "device_name", lambda device=None: "nvidia-h100-80gb-hbm3")
    row = common.measure("p", {}, lambda: lambda: 0, flops=4e9, nbytes=6e6, arith="bf16")
    # bf16 share 100 * 2 / 772 = 0.26 %, copy share 100 * 3 / 3000 = 0.1 %: the arithmetic binds
    assert row.percent_of_peak == pytest.approx(100 * 2.0 / common.H100_LIMITS["bf16"])
    row = common.measure("p", {}, lambda: lambda: 0, flops=4e9, arith="fp32")
    assert row.percent_of_peak == pytest.approx(100 * 2.0 / common.H100_LIMITS["fp32"])
    row = common.measure("p", {}, lambda: lambda: 0, nbytes=6e8)
    assert row.percent_of_peak == pytest.approx(100 * 300.0 / common.H100_LIMITS["copy"])


def _raises(error):
    def setup():
        raise error

    return setup


def test_measure_statuses(monkeypatch):
    """A peer over the memory limit is skipped without being set up; a real error is an error,
    only an allocation failure is OOM; Skip and a missing package are skips with their reason."""
    monkeypatch.setattr(common, "timeit", lambda fn, reps: (1.0, 1.0, 1.0))
    limit = common.memory_limit()
    row = common.measure("p", {}, _raises(AssertionError("set up")), need_bytes=2 * limit)
    assert row.status.startswith("skipped: needs")
    assert common.measure("p", {}, lambda: lambda: 0, need_bytes=limit / 2).status == "ok"
    boom = common.measure("p", {}, _raises(RuntimeError("boom")))
    assert boom.status == "error: RuntimeError: boom"
    assert common.measure("p", {}, _raises(RuntimeError("CUDA out of memory."))).status == "OOM"
    assert common.measure("p", {}, _raises(torch.OutOfMemoryError("x"))).status == "OOM"
    assert common.measure("p", {}, _raises(common.Skip("no GPU"))).status == "skipped: no GPU"
    missing = common.measure("p", {}, _raises(ImportError("x", name="somepkg")))
    assert missing.status == "skipped: somepkg not installed"
    # fastvq's "no such backend here" is unavailable; any other ValueError failed the row.
    gone = common.measure("p", {}, _raises(ValueError("backend 'cuda' is unavailable: x")))
    assert gone.status == "unavailable: backend 'cuda' is unavailable: x"
    bad = common.measure("p", {}, _raises(ValueError("z must be 2-d")))
    assert bad.status == "error: ValueError: z must be 2-d"


def test_check_indices_verdicts():
    """check_indices: wrong indices give ok False and their exact agreement rate; an exact tie
    (a duplicated code) is right either way (ok) but not counted as agreement; top-k indices
    are checked in order; the precision argument sets the tolerance of a near tie."""
    from fastvq.reference import nearest_code, nearest_code_topk

    g = torch.Generator().manual_seed(0)
    z, c = torch.randn(40, 4, generator=g), torch.randn(16, 4, generator=g)
    idx = nearest_code(z.double(), c.double())
    assert common.check_indices(z, c, idx) == {"agree": 1.0, "ok": True}
    bad = idx.clone()
    bad[::4] = (bad[::4] + 1) % 16  # 10 of 40 rows
    assert common.check_indices(z, c, bad) == {"agree": 0.75, "ok": False}
    twin = torch.cat([c, c[idx[:1]]])  # code 16 duplicates row 0's nearest code
    tie = idx.clone()
    tie[0] = 16
    out = common.check_indices(z, twin, tie)
    assert out["ok"] is True and out["agree"] == pytest.approx(39 / 40)
    top = nearest_code_topk(z.double(), c.double(), 3)
    assert common.check_indices(z, c, top) == {"agree": 1.0, "ok": True}
    assert common.check_indices(z, c, top.flip(1))["ok"] is False
    # a near tie (gap 4e-4 in squared distance): within bf16 rounding, not within float32's
    zn = torch.tensor([[0.4999, 0.0, 0.0, 0.0]])
    cn = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    second = torch.tensor([1])
    assert common.check_indices(zn, cn, second, precision="fast")["ok"] is True
    assert common.check_indices(zn, cn, second, precision="exact")["ok"] is False


def test_sample_rows_and_rel_err():
    assert common.sample_rows(10, 4, "cpu").tolist() == [0, 3, 6, 9]  # first to last, even
    assert common.sample_rows(3, 512, "cpu").tolist() == [0, 1, 2]
    ref = torch.tensor([1.0, -4.0], dtype=torch.float64)
    assert common.rel_err(torch.tensor([1.0, -6.0]), ref) == pytest.approx(0.5)  # 2 / max|ref|


def test_environment_records_what_ran(tmp_path, monkeypatch):
    """torch and peer versions as installed, the CPU model as the device on CPU, and the commit,
    "+dirty" when a file under test changed, but not for records written to bench/results."""
    from importlib import metadata

    def version(p):
        try:
            return metadata.version(p)
        except metadata.PackageNotFoundError:
            return None

    repo = tmp_path / "repo"
    (repo / "bench" / "results").mkdir(parents=True)
    (repo / "a.py").write_text("x = 1\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run([*git[:5], "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "c"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    monkeypatch.chdir(repo)
    monkeypatch.setattr(common, "ROOT", str(repo))
    (repo / "bench" / "results" / "op-cpu.json").write_text("{}")
    env = common.environment("cpu")
    assert env["git"] == head.strip()
    assert env["torch"] == torch.__version__ and env["triton"] == version("triton")
    assert env["peers"] == {p: version(p) for p in ("vector-quantize-pytorch", "flash-kmeans")}
    assert env["device"] == env["cpu"]
    if os.path.exists("/proc/cpuinfo"):  # x86-64 always has SSE2
        assert "sse2" in env["cpu_isa"] or platform.machine() != "x86_64"
    # nor do records in the folder of this run's --out, but only records there
    (repo / "mine").mkdir()
    (repo / "mine" / "op-cpu.json").write_text("{}")
    assert common.environment("cpu", out="mine")["git"] == head.strip()
    assert common.environment("cpu")["git"] == head.strip() + "+dirty"
    (repo / "mine" / "notes.py").write_text("")
    assert common.environment("cpu", out="mine")["git"] == head.strip() + "+dirty"
    (repo / "mine" / "notes.py").unlink()
    for out in (".", str(tmp_path / "elsewhere")):  # the checkout itself; outside it
        assert common.environment("cpu", out=out)["git"] == head.strip() + "+dirty", out
    (repo / "mine" / "op-cpu.json").unlink()
    (repo / "a.py").write_text("x = 2\n")
    assert common.environment("cpu")["git"] == head.strip() + "+dirty"
    assert common.environment("cpu", out=str(tmp_path / "elsewhere"))["git"].endswith("+dirty")
    (repo / "a.py").write_text("x = 1\n")
    monkeypatch.chdir(tmp_path)  # git reads the checkout of bench/, wherever the run starts
    saved = common.save(str(repo / "mine"), "op", [], {})  # and its own records don't count
    assert json.loads(open(saved).read())["environment"]["git"] == head.strip()
    failed = subprocess.CompletedProcess([], 128, "", "fatal: outside repository")
    monkeypatch.setattr(common, "_git", lambda *args: failed)
    assert common._dirty(None) is True  # where git cannot tell, never called clean


def test_cli_saves_every_shape_and_completeness(tmp_path, monkeypatch):
    """cli: the record holds the rows of every shape so far, and says complete only after the
    last one (a run cut short keeps what it finished, marked incomplete)."""
    monkeypatch.setattr(common, "timeit", lambda fn, reps: (1.0, 1.0, 1.0))
    shapes = {"quick": [(1,), (2,)], "cpu": [(1,), (2,)], "cuda": [(1,), (2,)]}

    def run(chosen, reps, quick):
        ((n,),) = chosen
        if n == 3:
            raise KeyboardInterrupt
        return [common.measure(f"p{n}", {"n": n}, lambda: lambda: 0)]

    argv = ["--quick", "--out", str(tmp_path)]
    path = common.cli(argv, "doc", "fake", run, shapes)
    assert path == str(tmp_path / f"fake-{common.device_name()}-quick.json")
    record = json.load(open(path))
    assert [r["name"] for r in record["rows"]] == ["p1", "p2"] and record["complete"] is True
    shapes["quick"] = [(1,), (3,)]
    with pytest.raises(KeyboardInterrupt):
        common.cli(argv, "doc", "fake", run, shapes)
    record = json.load(open(path))
    assert [r["name"] for r in record["rows"]] == ["p1"] and record["complete"] is False

    def cut_mid_shape(chosen, reps, quick):  # rows of an unfinished shape are kept too
        ((n,),) = chosen
        rows = [common.measure(f"q{n}", {"n": n}, lambda: lambda: 0)]
        if n == 2:
            rows.append(common.measure("q2b", {"n": n}, lambda: lambda: 0))
            raise KeyboardInterrupt
        return rows

    shapes["quick"] = [(1,), (2,)]
    with pytest.raises(KeyboardInterrupt):
        common.cli(argv, "doc", "fake", cut_mid_shape, shapes)
    record = json.load(open(path))
    assert [r["name"] for r in record["rows"]] == ["q1", "q2", "q2b"]
    assert record["complete"] is False and common._ROW_HOOK is common._no_hook


def test_summary_flags_failed_checks(tmp_path, capsys):
    from bench.run import summary

    ok = dict(dataclasses.asdict(common.Row("good", {"N": 1}, ms=1.0, ok=True)))
    failed = dict(ok, name="wrong", ok=False)
    skipped = dict(dataclasses.asdict(common.Row("absent", {"N": 1})), status="skipped: why")
    record = {"op": "op", "environment": {"device": "dev"}, "rows": [ok, failed, skipped]}
    (tmp_path / "op-dev.json").write_text(json.dumps(record))
    assert summary(str(tmp_path)) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "-- op-dev.json (dev)"
    good, wrong, absent = lines[1:]
    assert "CHECK-FAILED" in wrong and "CHECK-FAILED" not in good
    assert absent.split()[0] == "absent" and "skipped: why" in absent
    # a smoke run, a run cut short and a busy CPU say so in the header
    env = {"device": "cpu", "gpu": None, "threads": 2, "load": 3.5, "git": "0123456789abcdef+dirty"}
    record |= {"environment": env, "quick": True, "complete": False}
    (tmp_path / "op-dev.json").write_text(json.dumps(record))
    summary(str(tmp_path))
    assert capsys.readouterr().out.splitlines()[0] == (
        "-- op-dev.json (cpu, git 0123456789ab, quick, INCOMPLETE: the run stopped early, "
        "load 3.5 > 2 threads: timings shared)"
    )
    # no load note at the thread count, nor for a GPU's record (its host load times nothing)
    for env in (
        {"device": "cpu", "gpu": None, "threads": 2, "load": 2.0},
        {"device": "gpu", "gpu": {"capability": "9.0"}, "threads": 2, "load": 9.0},
    ):
        record |= {"environment": env, "quick": False, "complete": True}
        (tmp_path / "op-dev.json").write_text(json.dumps(record))
        summary(str(tmp_path))
        assert "load" not in capsys.readouterr().out.splitlines()[0]


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--reps", "0"], "--reps: expected an int >= 1, got 0"),
        (["--reps", "-3"], "--reps: expected an int >= 1, got -3"),
        (["--threads", "0"], "--threads: expected an int >= 1, got 0"),
        (["--threads", "100000"], "--threads: this machine has"),
        (["--out", "FILE"], "--out '.*FILE': File exists"),
        (["--out", "FILE/sub"], "--out '.*FILE/sub': Not a directory"),
        (["--out", ""], "--out '': No such file or directory"),
        (["--out", "FILE.d"], "not writable"),
        (["--reps", "x"], "--reps: expected an int >= 1, got 'x'"),
        (["--threads", str((os.cpu_count() or 1) + 1)], "--threads: this machine has"),
    ],
)
def test_cli_refuses_bad_options_before_any_work(tmp_path, monkeypatch, capsys, argv, match):
    """--reps 0 wrote a record of errors over the measured one (exit 0); --threads 100000
    crashed torch; an --out that cannot hold records failed only after a whole shape ran."""
    if match == "not writable":  # root may write anywhere: os.access says what it would
        monkeypatch.setattr(common.os, "access", lambda path, mode: False)
    (tmp_path / "FILE").write_text("x")
    argv = [a.replace("FILE", str(tmp_path / "FILE")) for a in argv]
    ran = []
    with pytest.raises(SystemExit) as exc:
        common.cli(argv, "doc", "fake", lambda *a: ran.append(a) or [], {"cpu": [1], "cuda": [1]})
    assert exc.value.code == 2 and not ran
    assert re.search(match, capsys.readouterr().err)


def test_records_are_written_whole_and_read_with_care(tmp_path, capsys):
    """write_json replaces a record at once (a GPU step killed mid-write keeps the old one), and
    records() names what it cannot read instead of failing on every record of the folder."""
    folder = tmp_path / "res[gpu]"  # glob characters in the name: a folder like any other
    folder.mkdir()
    good = {"op": "op", "environment": {"device": "d"}, "rows": []}
    common.write_json(str(folder / "op-d.json"), good)
    with pytest.raises(TypeError):
        common.write_json(str(folder / "op-d.json"), {"rows": [object()]})
    assert json.loads((folder / "op-d.json").read_text()) == good
    assert not (folder / "op-d.json.tmp").exists()
    (folder / "cut-d.json").write_text('{"op": "cut", "rows": [')
    (folder / "bytes-d.json").write_bytes(b"\xff")
    row = dataclasses.asdict(common.Row("r", {}))
    others = {  # each breaks one clause of the format
        "number": 3,
        "noop": {"environment": {}, "rows": []},
        "env": {"op": "o", "environment": 1, "rows": []},
        "rowsnum": {"op": "o", "environment": {}, "rows": 5},
        "rowstr": {"op": "o", "environment": {}, "rows": ["x"]},
        "rowkeys": {"op": "o", "environment": {}, "rows": [{"shape": {}}]},
    }
    for name, value in others.items():
        (folder / f"{name}-d.json").write_text(json.dumps(value))
    (folder / "fine-d.json").write_text(json.dumps(dict(good, rows=[row])))
    (folder / "screening_share.json").write_text(json.dumps({"results": []}))
    assert [p for p, _ in common.records(str(folder))] == [
        str(folder / "fine-d.json"),
        str(folder / "op-d.json"),
    ]
    err = capsys.readouterr().err
    for name in ("cut", "bytes"):
        assert f"skipped {folder / f'{name}-d.json'}: not readable as JSON" in err
    for name in set(others) - {"number"}:
        assert f"skipped {folder / f'{name}-d.json'}: not a record of this version's" in err
    with pytest.raises(NotADirectoryError, match="is not a folder of benchmark records"):
        common.records(str(tmp_path / "missing"))


def test_summary_and_targets_refuse_what_is_not_a_records_folder(tmp_path, capsys):
    """A mistyped folder read as an empty session ("not measured" everywhere, exit 0)."""
    (tmp_path / "file").write_text("x")
    for option in ("--summary", "--targets"):
        for folder in (tmp_path / "missing", tmp_path / "file"):
            with pytest.raises(SystemExit) as exc:
                main([option, str(folder)])
            assert exc.value.code == 2 and "is not a folder of benchmark records" in (
                capsys.readouterr().err
            )
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exc:
        main(["--summary", str(tmp_path / "empty")])
    assert exc.value.code == 1 and "no benchmark records in" in capsys.readouterr().err
    main(["--targets", str(tmp_path / "empty")])
    assert "no benchmark records in" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # both asked: both printed, then the status
        main(["--summary", str(tmp_path / "empty"), "--targets", str(tmp_path / "empty")])
    assert exc.value.code == 1 and "verdict" in capsys.readouterr().out
    (tmp_path / "full").mkdir()
    record = {"op": "op", "environment": {"device": "d"}, "rows": []}
    (tmp_path / "full" / "op-d.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit) as exc:
        main(["--summary", str(tmp_path / "full"), "--quick"])  # silently ignored before
    assert exc.value.code == 2


def test_targets_verdicts(tmp_path, capsys):
    """--targets: a target is met or MISSED only from a GPU record's ok rows that passed their check
    (a ratio from two rows of one record); a skipped row, a failed check, a row the run did not
    reach, a record from another device or none at all are "not measured", saying why."""
    from bench.run import main
    from bench.targets import TARGETS, evaluate, report

    def row(name, ms=1.0, ok=True, **shape):
        return dataclasses.asdict(common.Row(name, shape, ms=ms, ok=ok))

    def write(file, device, rows, gpu=True, **more):
        env = {"device": device, "gpu": {"capability": "9.0"} if gpu else None, "threads": 2}
        op = file.split("-")[0]
        record = {"op": op, "environment": env, "quick": False, "complete": True, "rows": rows}
        (tmp_path / file).write_text(json.dumps(record | more))

    h100 = "NVIDIA H100 80GB HBM3"
    write("nearest_code-nvidia-h100.json", h100, [
        row("fastvq exact", 0.5, N=65536, K=65536, D=32),  # <= 0.8: met
        row("fastvq exact", 2.0, N=65536, K=196560, D=24),  # <= 1.5: missed
        dict(row("fastvq exact", N=16384, K=65536, D=256), ms=None, status="OOM"),
        row("fastvq exact", 0.1, ok=False, N=65536, K=16384, D=8),  # fast, but wrong
    ])  # fmt: skip
    quantize = {"op": "quantize", "N": 65536, "K": 65536, "D": 32}
    write("codebook-nvidia-h100.json", h100, [
        row("fastvq quantize rotation auto", 1.3, **quantize),
        row("fastvq quantize ste auto", 1.0, **quantize),  # rotation / ste 1.3 > 1.1: missed
    ], complete=False)  # fmt: skip
    write("nearest_code-cpu.json", "AMD EPYC", [
        row("torch chunked fp32", 30.0, N=8192, K=16384, D=32),
        row("fastvq exact", 5.0, N=8192, K=16384, D=32),  # 6x >= 3x: met
    ], gpu=False)  # fmt: skip
    write("nn-cpu.json", "AMD EPYC", [], gpu=False)
    # the share of the copy bandwidth: the same bytes copied in the same run, on any GPU
    fsq = {"op": "fsq", "N": 1048576, "D": 6}
    write("scalar-nvidia-h200.json", "NVIDIA H200", [
        row("fastvq fsq", 0.5, **fsq),
        row("torch copy (same bytes)", 0.4, ok=None, **fsq),  # 80 %: met (a copy has no check)
        row("fastvq lfq", 1.0, op="lfq", N=1048576, D=18),  # no copy row: not measured
    ])  # fmt: skip
    # a smoke run's numbers never count, though its row would meet the target
    write("lattice-nvidia-h100-quick.json", h100, [row("fastvq leech structured auto", 0.1,
          op="leech", N=65536)], quick=True)  # fmt: skip
    (tmp_path / "screening_share.json").write_text(json.dumps({"results": []}))
    (tmp_path / "log.txt").write_text("gpu.sh's log, beside the records\n")

    assert main(["--targets", str(tmp_path)]) == []
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1 + len(TARGETS)  # a header, one line per target (one record or none)
    lines = {
        t.what: (device, value, verdict) for t, device, value, verdict in report(str(tmp_path))
    }
    assert [line.split()[0] for line in printed[1:]] == [str(t.issue) for t in TARGETS]
    assert lines["nearest_code exact fp32 65536x65536x32"] == (h100, "0.5 ms", "met")
    assert lines["nearest_code exact fp32 65536x196560x24"] == (h100, "2 ms", "MISSED")
    assert lines["nearest_code exact fp32 16384x65536x256"] == (
        h100,
        "-",
        "not measured: 'fastvq exact' at N=16384 K=65536 D=256: OOM",
    )
    assert lines["nearest_code exact fp32 65536x16384x8"][2] == (
        "not measured: 'fastvq exact' at N=65536 K=16384 D=8: correctness check failed"
    )
    assert lines["chunked ref / C++ nearest_code 8192x16384x32"] == (
        "AMD EPYC, 2 threads",
        "6x (30 / 5 ms)",
        "met",
    )
    assert lines["quantize fwd+bwd rotation / ste 65536x65536x32"][1:] == (
        "1.3x (1.3 / 1 ms)",
        "MISSED",
    )
    verdict = lines["quantize rotation / nearest_code alone"][2]
    assert verdict == (
        "not measured: no row 'fastvq nearest_code alone' at op=quantize N=65536 K=65536 D=32 "
        "(the run stopped early)"
    )
    assert lines["Leech structured decoder N 65536"] == (
        "-",
        "-",
        "not measured: no lattice record from a CUDA GPU",
    )
    assert lines["VQGAN step: quantizer share"][2] == (
        "not measured: no nn record from a CUDA GPU (only AMD EPYC, 2 threads)"
    )
    assert lines["FSQ fwd+bwd N 1048576: share of copy bandwidth"] == (
        "NVIDIA H200",
        "80 % (0.5 / 0.4 ms)",
        "met",
    )
    assert lines["LFQ fwd+bwd N 1048576: share of copy bandwidth"][2] == (
        "not measured: no row 'torch copy (same bytes)' at op=lfq N=1048576"
    )
    assert lines["LFQ entropy fwd+bwd 65536x18, 2^18 codes"][2].startswith("not measured: no row")
    # a value at the bound meets it, either way; the quantizer's share of a step is part / whole
    by_what = {t.what: t for t in TARGETS}
    for what, ms, expect in (
        ("VQGAN step: quantizer share", (0.25, 5.0), "5 % (0.25 / 5 ms)"),
        ("FSQ fwd+bwd N 1048576: share of copy bandwidth", (2.0, 1.4), "70 % (2 / 1.4 ms)"),
    ):
        target = by_what[what]
        rows = [row(name, t, **shape) for (name, shape), t in zip(target.rows, ms, strict=True)]
        assert evaluate(target, {"rows": rows}) == (expect, "met")


def test_vector_quantize_targets_read_time_and_peak_memory():
    """Issue 5's bounds: a VectorQuantize step's time and its peak memory (peak_gib), each a
    target of its own, with and without the rotation trick."""
    from bench.targets import TARGETS, evaluate

    shape = {"op": "vq", "B": 256, "S": 256, "K": 16384, "D": 8}
    rows = [
        dict(dataclasses.asdict(common.Row(name, shape, ms=1.2, ok=True)), peak_gib=gib)
        for name, gib in (("fastvq VectorQuantize", 0.7), ("fastvq VectorQuantize rotation", 0.3))
    ]
    record = {"environment": {"device": "NVIDIA H100 80GB HBM3", "gpu": {}}, "rows": rows}
    found = {t.what: evaluate(t, record) for t in TARGETS if t.issue == 5}
    assert len(found) == 12
    assert found["VQ step 256x256 K 16384 D 8: time"] == ("1.2 ms", "met")
    assert found["VQ step 256x256 K 16384 D 8: peak"] == ("0.7 GiB", "MISSED")
    assert found["VQ rot step 256x256 K 16384 D 8: peak"] == ("0.3 GiB", "met")
    assert found["VQ step 256x256 K 65536 D 32: time"][1].startswith("not measured: no row")


def test_targets_count_an_h100s_times_and_flag_a_busy_cpu(tmp_path):
    """A time bound is an H100's: another GPU's time (an RTX 4090 meeting 0.8 ms) is shown but
    not counted; a CPU ratio measured with the load above the threads says so."""
    from bench.targets import report

    def write(file, device, rows, gpu=True, load=0.5):
        env = {"device": device, "gpu": {"capability": "8.9"} if gpu else None, "threads": 2}
        env["load"] = load
        record = {"op": file.split("-")[0], "environment": env, "rows": rows}
        (tmp_path / file).write_text(json.dumps(record))

    def row(name, ms, **shape):
        return dataclasses.asdict(common.Row(name, shape, ms=ms, ok=True))

    write("nearest_code-rtx.json", "NVIDIA GeForce RTX 4090", [
        row("fastvq exact", 0.5, N=65536, K=65536, D=32),
        row("fastvq exact", 2.0, N=65536, K=196560, D=24),  # misses 1.5 ms
    ])  # fmt: skip
    write("nearest_code-cpu.json", "AMD EPYC", [
        row("torch chunked fp32", 30.0, N=8192, K=16384, D=32),
        row("fastvq exact", 5.0, N=8192, K=16384, D=32),
    ], gpu=False, load=3.0)  # fmt: skip
    write("scalar-h100.json", "NVIDIA H100 80GB HBM3", [
        row("fastvq fsq", 0.5, op="fsq", N=1048576, D=6),
        row("torch copy (same bytes)", 0.4, op="fsq", N=1048576, D=6),
    ], load=9.0)  # fmt: skip
    lines = {t.what: (value, verdict) for t, _, value, verdict in report(str(tmp_path))}
    assert lines["nearest_code exact fp32 65536x65536x32"] == (
        "0.5 ms",
        "not counted: not an H100 (met on this GPU)",
    )
    assert lines["nearest_code exact fp32 65536x196560x24"][1] == (
        "not counted: not an H100 (MISSED on this GPU)"
    )
    assert lines["chunked ref / C++ nearest_code 8192x16384x32"][1] == (
        "met (load 3.0 > 2 threads: timings shared)"
    )
    assert lines["FSQ fwd+bwd N 1048576: share of copy bandwidth"][1] == "met"  # GPU: no load
    write("nearest_code-cpu.json", "AMD EPYC", [
        row("torch chunked fp32", 30.0, N=8192, K=16384, D=32),
        row("fastvq exact", 5.0, N=8192, K=16384, D=32),
    ], gpu=False, load=2.0)  # fmt: skip
    lines = {t.what: verdict for t, _, _, verdict in report(str(tmp_path))}
    assert lines["chunked ref / C++ nearest_code 8192x16384x32"] == "met"  # at, not above


# --- each bench module's correctness check rejects a wrong fastvq result before timing ---


def _fastvq_rows(rows):
    return [r for r in rows if r.name.startswith("fastvq") and r.status == "ok"]


def test_codebook_checks_catch_wrong_results(monkeypatch):
    import bench.bench_codebook as bench
    import fastvq

    ema_codebook, quantize = fastvq.ema_codebook, fastvq.quantize

    def bad_codebook(cs, es, out=None):
        return ema_codebook(cs, es, out=out).add_(1e-2)

    def bad_gradient(z, c, **kw):  # right codes and indices, dL/dz scaled by 1.5
        z_q, idx = quantize(z, c, **kw)
        return z_q + 0.5 * (z - z.detach()), idx

    monkeypatch.setattr(fastvq, "ema_codebook", bad_codebook)
    monkeypatch.setattr(fastvq, "quantize", bad_gradient)
    rows = bench.run_ema(64, 16, 4, 1) + bench.run_quantize(64, 16, 4, 1)
    checked = [r for r in _fastvq_rows(rows) if "alone" not in r.name]
    assert len(checked) >= 4 and all(r.ok is False for r in checked), rows
    assert all(r.ok is True for r in rows if r.name.startswith("torch"))


def test_scalar_checks_catch_wrong_results(monkeypatch):
    import bench.bench_scalar as bench
    import fastvq

    fsq, entropy = fastvq.fsq, fastvq.binary_entropy_loss

    def bad_indices(z, levels):  # right codes, indices shifted
        codes, idx = fsq(z, levels)
        return codes, (idx + 1) % 64000

    def bad_per_sample(z, **kw):  # per-sample entropy off by 10 %, gradient unchanged
        per_sample, codebook = entropy(z, **kw)
        return per_sample + 0.1 * per_sample.detach(), codebook

    monkeypatch.setattr(fastvq, "fsq", bad_indices)
    monkeypatch.setattr(fastvq, "binary_entropy_loss", bad_per_sample)
    rows = bench.run_entropy(32, 4, 1) + bench.run_quantize(32, 4, 1)
    wrong = [r for r in _fastvq_rows(rows) if r.name in ("fastvq fsq", "fastvq lfq entropy")]
    assert len(wrong) == 2 and all(r.ok is False for r in wrong), rows


def test_lattice_check_catches_a_point_that_is_not_nearest(monkeypatch):
    import bench.bench_lattice as bench

    e8_nearest = bench.e8_nearest
    root = torch.tensor([1.0, 1.0, 0, 0, 0, 0, 0, 0])  # p + root is in E8, one shell further

    monkeypatch.setattr(bench, "e8_nearest", lambda x, **kw: e8_nearest(x, **kw) + root)
    rows = [r for r in bench.run_e8(64, 1) if r.shape.get("K") == "lattice"]
    assert rows and all(r.status == "ok" and r.ok is False for r in rows), rows


def test_nn_check_catches_wrong_indices(monkeypatch):
    """A VectorQuantize that returns the code it names, but not the nearest one, fails the check."""
    import bench.bench_nn as bench
    import fastvq

    quantize = fastvq.quantize

    def second_best(z, c, **kw):
        _, idx = quantize(z, c, **kw)
        idx = (idx + 1) % len(c)
        return c[idx] + (z - z.detach()), idx

    monkeypatch.setattr(fastvq, "quantize", second_best)
    rows = {r.name: r for r in bench.run_vq(1, 16, 32, 4, 1, rotations=(False,))}
    assert rows["fastvq VectorQuantize"].status == "ok", rows
    assert rows["fastvq VectorQuantize"].ok is False and rows["fastvq VectorQuantize"].err == 0


# --- what a GPU run measures, on fakes: CUDA's code paths without a GPU ---


@pytest.fixture
def fake_cuda(monkeypatch):
    """measure's CUDA path on a fake caching allocator: yields alloc(bytes) (negative frees) and
    the list that empty_cache() appends its calls to."""
    allocated, peak, emptied = [0], [0], []

    def alloc(n):
        allocated[0] += n
        peak[0] = max(peak[0], allocated[0])

    monkeypatch.setattr(common, "DEVICE", "cuda")
    monkeypatch.setattr(common, "timeit", lambda fn, reps: (1.0, 1.0, 1.0))
    monkeypatch.setattr(common, "memory_limit", lambda: 2**40)
    monkeypatch.setattr(common, "device_name", lambda device=None: "fake")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: allocated[0])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: peak[0])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: peak.__setitem__(0, 0))
    yield alloc, emptied


def test_peak_memory_is_a_warm_calls(fake_cuda):
    """peak_gib: one call's own memory, not what the process allocates once on its first call
    (cuBLAS's workspace for whichever peer calls it first, autotuning's benchmark buffers)."""
    alloc, _ = fake_cuda
    calls, checked = [], []

    def fn():
        if not calls:
            alloc(2**30)  # a library's workspace, kept by the process
        calls.append(len(calls))
        alloc(2**29)  # the op's own temporary
        alloc(-(2**29))
        return len(calls)

    row = common.measure("p", {}, lambda: fn, check=lambda out: checked.append(out) or {})
    assert row.status == "ok" and row.peak_gib == 0.5
    assert checked == [1]  # the check sees the first call's output (a stateful peer's first step)


def test_a_failed_peer_leaves_nothing_for_empty_cache_to_miss(fake_cuda, monkeypatch):
    """When a peer fails (OOM in a call, an error in its check), nothing of it is referenced any
    more when measure empties the allocator's cache: the rows after it get the memory back."""
    import weakref

    refs, alive = [], []
    monkeypatch.setattr(
        torch.cuda, "empty_cache", lambda: alive.append([r() is not None for r in refs])
    )

    def oom():
        scores = torch.empty(1000)  # a local of the failing frame, held by the traceback
        refs.append(weakref.ref(scores))
        raise torch.OutOfMemoryError("CUDA out of memory.")

    def output():
        out = torch.empty(1000)
        refs.append(weakref.ref(out))
        return out

    assert common.measure("p", {}, lambda: oom).status == "OOM"
    row = common.measure("p", {}, lambda: output, check=lambda out: 1 / 0)
    assert row.status.startswith("error: ZeroDivisionError"), row
    assert alive == [[False], [False, False]]


def test_a_sticky_cuda_error_ends_the_module_with_its_row_saved(fake_cuda, monkeypatch):
    """After an illegal memory access every CUDA call fails, empty_cache too: the row that hit
    it is recorded as an error through the row hook (cli's saving), and the module stops."""

    def sticky():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "empty_cache", sticky)
    seen = []
    monkeypatch.setattr(common, "_ROW_HOOK", seen.append)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        common.measure("p", {}, lambda: lambda: 0)
    assert [r.status for r in seen] == [
        "error: RuntimeError: CUDA error: an illegal memory access was encountered"
    ]


def test_ema_steps_do_the_same_work_however_often_they_run(monkeypatch):
    """do_bench repeats a fast step thousands of times and a slow one a few: no code may die (and
    be replaced) part way, or fast and slow peers' medians would time different work."""
    import bench.bench_codebook as bench
    import fastvq

    dead = []
    reset, expire = fastvq.reset_dead_codes_, bench.expire_codes_

    def counting_reset(*args, **kwargs):
        dead.append(len(reset(*args, **kwargs)))

    def counting_expire(codebook, cluster_size, embed_sum, z):
        dead.append(int((cluster_size < bench.THRESHOLD).sum()))
        expire(codebook, cluster_size, embed_sum, z)

    monkeypatch.setattr(fastvq, "reset_dead_codes_", counting_reset)
    monkeypatch.setattr(bench, "expire_codes_", counting_expire)
    g = torch.Generator().manual_seed(0)
    z, idx = torch.randn(64, 4, generator=g), torch.randint(16, (64,), generator=g)
    peers = bench.ema_peers(z, idx, 32, 4)  # codes 16..31 get no row
    for name in ("fastvq ema torch", "torch index_add_"):
        step = peers[name]()
        for _ in range(600):
            step()
    assert len(dead) == 1200 and sum(dead) == 0


def test_scalar_copy_rows_move_the_quantizers_bytes(monkeypatch):
    """Issue 4's 70 % is of the copy bandwidth: each kind's last row copies on the device the
    bytes its fastvq row counts (half read, half written), under the name and shape targets.py
    reads."""
    import bench.bench_scalar as bench

    calls = []
    measure = bench.measure

    def spy(name, shape, setup, **kw):
        calls.append((name, shape, setup, kw.get("nbytes")))
        return measure(name, shape, setup, **kw)

    monkeypatch.setattr(bench, "measure", spy)
    rows = bench.run_quantize(32, 4, 1)
    for kind in ("fsq", "lfq", "bsq"):
        mine = [c for c in calls if c[1]["op"] == kind]
        (nbytes,) = [c[3] for c in mine if c[0] == f"fastvq {kind}"]
        name, shape, setup, copy_bytes = mine[-1]
        assert name == bench.COPY and shape == mine[0][1] and copy_bytes == nbytes
        copy = setup()
        dst, src = copy.func.__self__, copy.args[0]
        assert src.nbytes == dst.nbytes == nbytes // 2
    copies = [r for r in rows if r.name == bench.COPY]
    assert [r.shape["op"] for r in copies] == ["fsq", "lfq", "bsq"], rows
    assert all(r.status == "ok" and r.ms > 0 for r in copies), copies


def test_entropy_steps_make_no_host_sync_of_their_own():
    """A timed step returns tensors: a value read there would sync the host in the timed region
    (vector-quantize-pytorch's LFQ itself has none)."""
    import bench.bench_scalar as bench
    from fastvq.testing import count_syncs

    rows = bench.run_entropy(32, 4, 1)
    assert all(r.status == "ok" for r in rows if not r.name.startswith("vqp")), rows
    z = torch.randn(32, 4)
    for name, setup in bench.entropy_peers(z, "lfq").items():
        try:
            step = setup()
        except ImportError:
            continue
        step()
        with count_syncs() as syncs:
            step()
        assert syncs == [], (name, syncs)


def test_a_missing_peer_package_costs_only_its_rows(monkeypatch):
    """The residual-VQ rows start from the peer's state: without vector-quantize-pytorch (the GPU
    image lacks it) fastvq's row still runs, and the peer's is skipped instead of ending the
    module (and the VQGAN shapes after it)."""
    import sys

    import bench.bench_nn as bench

    monkeypatch.setitem(sys.modules, "vector_quantize_pytorch", None)
    rows = {r.name: r for r in bench.run_rvq_beam(1, 16, 32, 4, 1)}
    assert rows["fastvq ResidualVQ beam 4"].status == "ok", rows
    assert rows["fastvq ResidualVQ beam 4"].ok is True, rows
    assert rows["vqp ResidualVQ beam 4"].status == "skipped: vector_quantize_pytorch not installed"


def test_environment_reads_the_gpu_and_a_passed_revision(tmp_path, monkeypatch):
    """nvidia-smi's driver and clocks go into the record ({} where it is missing); a tree
    without .git (the device machine's copy) takes its commit from FASTVQ_GIT_REV."""
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text(
        "#!/bin/sh\necho '580.159.04, 1980 MHz, 1980 MHz, 2619 MHz, 41, 120.5 W, 700 W'\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    common.gpu_state.cache_clear()
    state = common.gpu_state()
    assert state["driver_version"] == "580.159.04" and state["clocks.sm"] == "1980 MHz", state
    assert state["power.limit"] == "700 W"
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi, no git
    common.gpu_state.cache_clear()
    assert common.gpu_state() == {}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FASTVQ_GIT_REV", "abc123")
    assert common.environment("cpu")["git"] == "abc123"
    common.gpu_state.cache_clear()


# Pretends a CUDA device exists while pytest collects, so that the cuda-* cases are generated.
FAKE_CUDA = """
import types
import torch
props = types.SimpleNamespace(major=9, minor=0, total_memory=80 * 2**30, name="fake",
                              multi_processor_count=132)
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
torch.cuda.current_device = lambda: 0
torch.cuda.get_device_properties = lambda *a: props
torch.cuda.get_device_capability = lambda *a: (9, 0)
torch.cuda.get_device_name = lambda *a: props.name
import fastvq.ops._backends
fastvq.ops._backends.HAS_CUDA_KERNELS = True
"""


def test_gpu_sh_runs_each_gpu_test_once(tmp_path):
    """gpu.sh's pytest steps, collected as on a GPU machine: no test in two steps (each costs
    seconds of a 540 s session), every gpu-marked test in one, and the Triton launcher tests
    that take CUDA tensors without a gpu marker (split-K, screening) too."""
    import re
    import shlex

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = open(os.path.join(root, "bench", "gpu.sh")).read().replace("\\\n", " ")
    steps = dict(re.findall(r"^\s*step (\S+) \d+ python3 -m pytest (.*)$", script, re.M))
    assert set(steps) == {"tests-gpu", "tests-cuda", "tests-topk", "tests-syncs"}, steps
    (tmp_path / "fake_cuda.py").write_text(FAKE_CUDA)
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")

    def collect(*args):
        cmd = [sys.executable, "-m", "pytest", "-p", "fake_cuda", "--collect-only", "-q", *args]
        out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True).stdout
        return {line for line in out.splitlines() if "::" in line}

    # one -q lists node ids (the steps' own -q would make it -qq: counts per file)
    chosen = {n: collect(*(a for a in shlex.split(args) if a != "-q")) for n, args in steps.items()}
    gpu, cuda, topk, syncs = (
        chosen[n] for n in ("tests-gpu", "tests-cuda", "tests-topk", "tests-syncs")
    )
    assert gpu and cuda and topk and syncs
    assert sum(map(len, chosen.values())) == len(gpu | cuda | topk | syncs)  # no test twice
    assert collect("-m", "gpu", "tests") <= gpu | cuda | topk | syncs
    marked = collect("-m", "gpu", "tests/ops/test_nearest_code_topk.py")
    assert any("[cuda-" in t for t in marked) and marked <= topk
    assert any("test_host_syncs.py" in t for t in syncs)
    launchers = {t for t in gpu | cuda | topk if "split_k" in t}
    assert any("topk" in t for t in launchers) and any("topk" not in t for t in launchers)


@pytest.mark.parametrize("installed", [False, True], ids=["fresh-machine", "warm-machine"])
def test_gpu_sh_second_call_installs_on_a_fresh_machine_and_reports_failure(tmp_path, installed):
    """GPU_SH_ONLY on a machine without fastvq (the warm one was given back) adds the wheels and
    build steps, which it skipped before so that every step failed; and the exit status is 1
    when a step fails (it was always 0: the device tool's rc said nothing). python3 and
    nvidia-smi are stubs here, which log their calls; nvidia-smi fails."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    fake, log = tmp_path / "bin", tmp_path / "calls.txt"
    fake.mkdir()
    import_rc = 0 if installed else 1
    (fake / "python3").write_text(
        f'#!/bin/bash\necho "python3 $*" >> {log}\n'
        f'[[ "$*" == "-c import fastvq.kernels" ]] && exit {import_rc}\nexit 0\n'
    )
    (fake / "nvidia-smi").write_text("#!/bin/bash\nexit 3\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}{os.pathsep}{os.environ['PATH']}", OUT=str(tmp_path / "o"))
    env |= {"GPU_SH_ONLY": "gpu backends", "FASTVQ_GIT_REV": "abc"}
    done = subprocess.run(["bash", "bench/gpu.sh"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    calls = log.read_text()
    assert done.returncode == 1, done.stdout + done.stderr
    assert "failed or timed out: gpu" in done.stdout
    built = "-m pip install -q --no-index --no-deps --no-build-isolation -e ." in calls
    assert built is not installed, calls
    assert ("adding the wheels and build steps" in done.stdout) is not installed
    assert "import fastvq; print(fastvq.backends())" in calls  # the steps asked for ran


def test_fsq_check_takes_either_neighbour_at_a_rounding_tie():
    """A bound within float32 rounding of k + 1/2 rounds either way (seed 0's 1,048,576 CUDA rows
    hold one, on which float32 and float64 disagree): either code passes there, nowhere else."""
    import bench.bench_scalar as bench
    from fastvq.reference import scalar as ref

    gen = torch.Generator().manual_seed(0)
    z, g = torch.randn(64, 6, generator=gen), torch.randn(64, 6, generator=gen)
    shift, half_l, offset, half_width, _ = ref._fsq_params(bench.LEVELS, torch.float64, "cpu")
    z[0, 0] = float(torch.atanh((1.5 + offset[0]) / half_l[0]) - shift[0])  # bound 1.5: 1 or 2
    check = bench.quantize_check("fsq", z, g)
    zz = z.clone().requires_grad_()
    codes, idx = ref.fsq(zz, bench.LEVELS)
    (dz,) = torch.autograd.grad(codes, zz, g)
    codes = codes.detach()
    assert check((codes, idx, dz))["ok"] is True

    def other_neighbour(row):
        r = int(torch.round(codes[row, 0] * half_width[0]))  # in -4..3
        step = 3 - 2 * r if row == 0 else 1 if r < 3 else -1  # row 0: 1 <-> 2
        moved, moved_idx = codes.clone(), idx.clone()
        moved[row, 0] += step / half_width[0]
        moved_idx[row] += step  # dimension 0 is the mixed radix's lowest digit
        return check((moved, moved_idx, dz))

    assert other_neighbour(0)["ok"] is True
    assert other_neighbour(1)["ok"] is False and other_neighbour(1)["agree"] == 63 / 64


def test_cli_takes_as_many_threads_as_the_machine_has(tmp_path):
    threads = torch.get_num_threads()
    try:
        argv = ["--threads", str(os.cpu_count()), "--quick", "--out", str(tmp_path)]
        common.cli(argv, "doc", "fake", lambda *a: [], {"quick": [1], "cpu": [1], "cuda": [1]})
        assert torch.get_num_threads() == os.cpu_count()
    finally:
        torch.set_num_threads(threads)

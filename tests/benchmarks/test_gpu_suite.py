"""benchmarks/gpu_suite.sh: its dry run (CPU, tiny sizes) writes every benchmark's table; failures, hangs and
bad options are handled as documented. The GPU run itself needs a lent GPU (docs/benchmarks.md)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"
BENCHMARKS = ("tokenizer_speed", "tokenizer_speed_large", "encoder_speed", "fedbone_aggregation", "fusion_speed")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def run_suite(*args: str, python: str = sys.executable, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": python, "OMP_NUM_THREADS": "1", "PLURIBUS_PROGRESS": "0"}
    return subprocess.run(["bash", str(SUITE), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def fake_python(tmp_path: Path, cases: str) -> str:
    """A PYTHON for the suite: the real interpreter, except for the benchmark scripts (its first argument) named in
    ``cases``."""
    path = tmp_path / "fakepy"
    path.write_text(f'#!/usr/bin/env bash\ncase "$1" in\n{cases}\nesac\nexec {sys.executable} "$@"\n')
    path.chmod(0o755)
    return str(path)


@pytest.mark.slow
def test_dry_run_writes_every_benchmark_table(tmp_path: Path) -> None:
    out = tmp_path / "gs"
    proc = run_suite("--dry-run", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True and summary["device"] == "cpu" and summary["ok"] is True
    assert [r["benchmark"] for r in summary["benchmarks"]] == list(BENCHMARKS)
    assert all(r["status"] == "ok" and "cpu" in r["device"] and "cuda" not in r["device"]
               for r in summary["benchmarks"])
    assert "| fusion_speed | ok |" in (out / "summary.md").read_text()
    docs = {name: json.loads((out / f"{name}.json").read_text()) for name in BENCHMARKS}
    for name, doc in docs.items():
        md = (out / f"{name}.md").read_text()
        assert doc["status"] == "ok" and doc["exit"] == 0 and "--device cpu" in doc["command"], name
        assert md.startswith(f"# {name}\n") and "status ok" in md, name
    for name in ("tokenizer_speed", "tokenizer_speed_large"):  # plain-text tables, and the JSON line it prints
        assert docs[name]["printed_json"][0]["device"] == "cpu"
        encode = docs[name]["printed_json"][0]["encode"]
        assert {"ours (plain RQ)", "ResidualVQ", "floor"} <= set(encode)
        assert all(v["seconds"] > 0 for v in encode.values())
        assert "device cpu" in (out / f"{name}.md").read_text()
    enc = docs["encoder_speed"]["tables"][0]["rows"]
    assert [r["measure"] for r in enc] == ["train step, s", "train peak extra MB", "encode users/s",
                                          "encode peak extra MB"]
    assert {r["device"] for r in enc} == {"cpu"} and float(enc[2]["ours"]) > 0
    fed = docs["fedbone_aggregation"]["tables"][0]["rows"]
    assert fed[0]["N"] == "4" and fed[0]["d"] == "10000" and fed[0]["device"] == "cpu"
    assert float(fed[0]["max_rel_diff_vs_torchjd"]) < 1e-4  # ours and torchjd computed the same PCGrad
    fusion = docs["fusion_speed"]
    assert fusion["tables"][0]["rows"][0]["device"] == "train cpu, fuse cpu"
    assert fusion["written_json"]["fusion_speed.raw.json"]["records"]  # the JSON it wrote, kept in ours
    assert not (out / "fusion_speed.raw.json").exists()


@pytest.mark.slow
def test_failed_and_hung_benchmarks_are_recorded_and_the_suite_goes_on(tmp_path: Path) -> None:
    python = fake_python(tmp_path, '\n'.join([
        '  */fedbone/speed.py) echo "error: boom in fedbone" >&2; exit 3 ;;',
        '  */fusion/speed.py) printf "| width | device |\\n|---|---|\\n| 16 | train cpu, fuse cpu |\\n"; exit 0 ;;',
        '  */tokenizer/speed.py) sleep 120; exit 0 ;;',
    ]))
    out = tmp_path / "gs"
    t0 = time.monotonic()
    proc = run_suite("--dry-run", "--out", str(out), "--limit-s", "3",
                     "--only", "fedbone_aggregation,tokenizer_speed,fusion_speed", python=python)
    assert time.monotonic() - t0 < 90  # the hung one was killed at its limit
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = {r["benchmark"]: r for r in json.loads((out / "summary.json").read_text())["benchmarks"]}
    assert list(rows) == ["fedbone_aggregation", "tokenizer_speed", "fusion_speed"]
    assert rows["fedbone_aggregation"]["status"] == "failed: exit 3: error: boom in fedbone"
    assert rows["tokenizer_speed"]["status"] == "timeout: killed after 3 s"
    assert rows["fusion_speed"]["status"] == "ok" and rows["fusion_speed"]["device"] == "train cpu, fuse cpu"
    assert json.loads((out / "fusion_speed.json").read_text())["tables"][0]["rows"] == [
        {"width": "16", "device": "train cpu, fuse cpu"}]
    assert "boom in fedbone" in (out / "fedbone_aggregation.log").read_text()
    assert "timeout" in (out / "tokenizer_speed.md").read_text()
    assert "| tokenizer_speed | timeout: killed after 3 s |" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_missing_modules_and_spent_budget_are_failures_with_reasons(tmp_path: Path) -> None:
    out = tmp_path / "gs"
    proc = run_suite("--dry-run", "--out", str(out), "--budget-s", "1", "--only", "fusion_speed")
    assert proc.returncode == 1, proc.stderr
    (row,) = json.loads((out / "summary.json").read_text())["benchmarks"]
    assert row["status"].startswith("skipped: suite budget spent")
    # a python that cannot see torchjd (hidden by a sitecustomize): the benchmark fails at once, naming it
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['torchjd'] = None\n")
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(hide)}
    proc = subprocess.run(["bash", str(SUITE), "--dry-run", "--out", str(out), "--only", "fedbone_aggregation"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    (row,) = json.loads((out / "summary.json").read_text())["benchmarks"]
    assert row["status"] == "failed: missing Python modules: torchjd (carry their wheels: --prepare)"
    assert json.loads((out / "fedbone_aggregation.json").read_text())["status"] == row["status"]


@pytest.mark.parametrize(("args", "message"), [
    (["--bogus"], "unknown option '--bogus'"),
    (["--device", "gpu"], "--device: 'gpu' is not one of cpu, cuda, auto"),
    (["--budget-s", "soon"], "--budget-s: 'soon' is not a positive whole number"),
    (["--limit-s", "0"], "--limit-s: '0' is not a positive whole number"),
    (["--only", "tokenizer_speed,nope"], "--only: unknown benchmark 'nope'"),
    (["--out"], "--out needs a folder"),
])
def test_bad_options_exit_2_with_one_error_line(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "gs"
    proc = run_suite(*args, "--out", str(out)) if args != ["--out"] else run_suite("--out")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_without_a_gpu_is_refused_before_anything_is_written(tmp_path: Path, capsys) -> None:
    out = tmp_path / "gs"
    proc = run_suite("--out", str(out))  # the default device of a real run is cuda
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --device cuda: torch")
    assert not out.exists()
    sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmarks' shared --device option
    try:
        from harness.devices import resolve_device
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert resolve_device("cpu") == "cpu" and resolve_device("auto") == "cpu"
    with pytest.raises(SystemExit) as err:
        resolve_device("cuda")
    assert err.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --device cuda: torch sees no CUDA GPU (torch.cuda.is_available() is False); use --device cpu or auto"]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="each command stops at its refusal of cuda only without a GPU")
def test_the_gpu_run_commands_parse() -> None:
    """Every command of the real (cuda) run, run here: each gets past its argument parsing to the cuda refusal."""
    proc = run_suite("--check-args")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == [f"{name}: arguments ok" for name in BENCHMARKS]

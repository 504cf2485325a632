"""The command line as a user meets it: help, data commands, clean errors, the demo."""

import json
import subprocess
import sys

import pytest

from pluribus.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "pluribus.cli", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_every_group():
    out = run_cli("--help")
    assert out.returncode == 0
    for group in ("data", "tokenize", "encoder", "fed", "fuse", "demo"):
        assert group in out.stdout


def test_data_info_movielens(capsys):
    assert main(["data", "info", "movielens-100k"]) == 0
    out = capsys.readouterr().out
    assert "943 users" in out and "items: 1682" in out
    for word in ("ratings", "activity", "knowledge", "gender", "future_drama", "F: 28.9%"):
        assert word in out


def test_bad_input_prints_one_line_and_exits_2(tmp_path):
    bad = tmp_path / "users.jsonl"
    bad.write_text('{"user_id": "u1", "sources": {}}\n{"user_id": \n')
    out_path = tmp_path / "converted.jsonl"
    result = run_cli("data", "convert", str(bad), str(out_path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{bad}:2" in result.stderr and "malformed JSON" in result.stderr
    assert not out_path.exists()


def test_synth_validate_convert(tmp_path, capsys):
    assert main(["data", "synth", str(tmp_path / "s.jsonl"), "--users", "40"]) == 0
    assert main(["data", "validate", str(tmp_path / "s.jsonl")]) == 0
    assert main(["data", "convert", str(tmp_path / "s.jsonl"), str(tmp_path / "folder")]) == 0
    assert main(["data", "info", str(tmp_path / "folder")]) == 0
    assert "40 users" in capsys.readouterr().out


def test_unknown_dataset_and_usage_errors(capsys):
    assert main(["data", "fetch", "imagenet"]) == 2
    assert main(["demo", "--steps", "nope"]) == 2
    assert main(["data", "info"]) != 0


@pytest.mark.slow
def test_demo_runs_and_resumes(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--data", "synthetic:150", "--out", str(out), "--quick", "--steps", "data,baseline"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["users"] == 150
    assert 0.5 < metrics["baseline"]["price_sensitive"]["auc_mean"] <= 1.0
    report = (out / "report.md").read_text()
    assert "## Baseline" in report and (out / "baseline_probe_auc.png").exists()
    capsys.readouterr()
    assert main(["demo", "--data", "synthetic:150", "--out", str(out), "--quick", "--steps", "data,baseline"]) == 0
    assert "done in an earlier run" in capsys.readouterr().err
    # another config in the same folder is refused rather than mixed in
    assert main(["demo", "--data", "synthetic:100", "--out", str(out), "--quick"]) == 2

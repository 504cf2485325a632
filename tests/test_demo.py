"""`pluribus demo`: the chain runs end to end (--quick), resumes, and a failing step names itself."""

import json
import math
import re

import pytest

from pluribus.cli import main
from pluribus.demo import STEP_NAMES


def test_missing_earlier_output_names_the_step_and_keeps_earlier_outputs(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--data", "synthetic:80", "--out", str(out), "--steps", "data"]) == 0
    before = (out / "sections" / "data.md").read_text()
    assert main(["demo", "--data", "synthetic:80", "--out", str(out), "--steps", "fuse"]) == 2
    err = capsys.readouterr().err
    assert "demo step 'fuse' failed" in err and "step 'encode'" in err
    assert (out / "sections" / "data.md").read_text() == before
    assert not (out / "steps" / "fuse.done").exists()


def test_unknown_engine_is_refused(tmp_path):
    assert main(["demo", "--data", "synthetic:80", "--out", str(tmp_path / "d"), "--engine", "grpc"]) == 2
    assert not (tmp_path / "d").exists()


@pytest.mark.slow
def test_quick_demo_runs_the_whole_chain_and_resumes(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["timings"]) == set(STEP_NAMES)
    report = (out / "report.md").read_text()
    for heading in ("## Data", "## Baseline", "## Step 1, U2QT", "## Step 2, GGSM", "## Step 3, FedBone",
                    "## Step 4, PrivFusion", "### Privacy report", "## Time per step"):
        assert heading in report
    assert "seeds: [0]." in report  # the header names the one seed quick mode runs, not the config's three
    assert report.count("Privacy report") == 1  # one heading, not the demo's and the report's own
    for plot in ("baseline_probe_auc", "tokenize_probe_auc", "encode_probe_auc", "encode_training",
                 "federate_auc", "fuse_auc"):
        assert (out / f"{plot}.png").read_bytes()[:4] == b"\x89PNG"
    tokens = metrics["tokenize"]
    assert tokens["collisions"]["users"] == 200 and 0.0 < tokens["min_usage"] <= 1.0
    assert set(tokens["recommendation"]) >= {"popularity", "item-kNN", "U2QT tokens"}  # MovieLens has a future
    warm, cold = tokens["churn"].values()
    assert 0.0 <= warm["codes"] <= 1.0 and 0.0 <= cold["codes"] <= 1.0
    assert "### Next-item recommendation" in report and "### Stable codes across refits" in report
    # the yardsticks at the tokens' own bytes per user, and a verdict against them
    assert set(tokens["equal_bytes"]) == {"PCA + int8", "RQ-KMeans"} and "### At equal bytes" in report
    assert all(y["bytes"] == tokens["bytes_per_user"]["codes"] for y in tokens["equal_bytes"].values())
    # the closing summary: a row per system, with a verdict and no spread invented from one seed
    summary = report.split("## Summary", 1)[1].split("## Time per step", 1)[0]
    for step in ("tokenize", "encode", "federate", "fuse"):
        assert f"| {step} |" in summary
    assert "± 0.000" not in summary and "not compared (one run)" in summary
    assert not re.search(r"\bnan\b", report, flags=re.I)  # quick mode shows no 'nan ± nan'
    # AUC is undefined (NaN) when a 10-user test split of the 200-user sample holds one class
    aucs = [v for runs in metrics["federate"]["per_method"].values() for r in runs for v in r.values()]
    assert len(aucs) == 16 and all(math.isnan(v) or 0.0 <= v <= 1.0 for v in aucs)
    assert metrics["fuse"]["epsilon"] == 4.0
    # FedBone's table and the summary show the same per-seed Δm
    fedbone_row = next(line for line in report.splitlines() if line.startswith("| FedBone (GPAggregation) |"))
    assert f"FedBone (GP) {fedbone_row.rstrip(' |').rsplit('| ', 1)[1]}" in summary
    # the time table lists the steps in the chain's order and closes with their total
    times = report.split("## Time per step", 1)[1]
    listed = [line.split("|")[1].strip() for line in times.splitlines() if line.startswith("| ")][1:]
    assert listed == [*STEP_NAMES, "**all steps**"]
    capsys.readouterr()
    assert main(["demo", "--quick", "--out", str(out)]) == 0  # a rerun resumes: every step is skipped
    assert capsys.readouterr().err.count("done in an earlier run") == len(STEP_NAMES)


def test_saved_output_for_other_users_is_refused(tmp_path, synthetic):
    import torch

    from pluribus.demo import DemoConfig, DemoContext
    from pluribus.errors import ConfigError
    from pluribus.runs import RunFolder

    run = RunFolder(tmp_path / "run", DemoConfig(data="synthetic"))
    DemoContext(DemoConfig(), run, synthetic).save_artifact("tokenize", {"codes": torch.zeros(2)}, {})
    other = DemoContext(DemoConfig(), run, synthetic.subset(synthetic.user_ids[:50]))
    with pytest.raises(ConfigError, match="other users than this run's data"):
        other.artifact("tokenize", needed_by="encode")
    tensors, _ = DemoContext(DemoConfig(), run, synthetic).artifact("tokenize", needed_by="encode")
    assert torch.equal(tensors["codes"], torch.zeros(2))


def _demo_args(data, out):
    return ["demo", "--data", data, "--out", str(out), "--steps", "data,baseline"]


@pytest.mark.slow
def test_demo_resumes_after_kill_9_with_identical_results(tmp_path, capsys):
    import os
    import signal
    import subprocess
    import sys
    import time

    data = "synthetic:200"
    reference = tmp_path / "reference"
    assert main(_demo_args(data, reference)) == 0
    run = tmp_path / "run"
    env = {**os.environ, "PLURIBUS_PROGRESS": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "pluribus.cli", *_demo_args(data, run)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not (run / "steps" / "data.done").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the demo ended before its first step"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)  # mid-way: the baseline step is running
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert (run / "INCOMPLETE").exists() and not (run / "steps" / "baseline.done").exists()
    capsys.readouterr()
    assert main(_demo_args(data, run)) == 0
    err = capsys.readouterr().err
    assert f"resumed from {run}" in err and "step data: done in an earlier run" in err
    assert not (run / "INCOMPLETE").exists()
    got, want = (json.loads((p / "metrics.json").read_text()) for p in (run, reference))
    assert got["baseline"] == want["baseline"] and got["data"] == want["data"]  # bit-identical
    assert (run / "sections" / "baseline.md").read_text() == (reference / "sections" / "baseline.md").read_text()


def test_demo_on_a_tiny_own_data_set_warns_and_shows_not_defined(tmp_path, capsys):
    records = []
    for i in range(10):
        records.append({"user_id": f"p{i}", "sources": {"shop": [{"timestamp": 1_700_000_000 + k, "text": f"item {k}"}
                                                                 for k in range(i % 3 + 1)]},
                        "profile": {"age": 20 + i, "visits": float(i % 4)},
                        "labels": {"churn": i % 2, "rare": int(i == 0)}})
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "demo"
    assert main(["demo", "--data", str(path), "--out", str(out), "--steps", "data,baseline"]) == 0
    report = (out / "report.md").read_text()
    assert "**Small data.**" in report
    assert "task 'rare': 10 labelled users in 2 class(es)" in report  # one user of a class: AUC not defined
    baseline = report.split("## Baseline", 1)[1]
    assert "| rare | not defined | not defined | not defined | 10 |" in baseline
    assert not re.search(r"\bnan\b", report, flags=re.I)


def test_mean_auc_skips_undefined_tasks_and_says_nan_when_none():
    from pluribus.demo.basic import defined_aucs, mean_auc

    results = {"a": {"auc_mean": 0.6}, "b": {"auc_mean": float("nan")}, "c": {"auc_mean": 0.8}}
    assert defined_aucs(results, ["a", "b"]) == [0.6]
    assert mean_auc(results) == pytest.approx(0.7) and mean_auc(results, ["a"]) == pytest.approx(0.6)
    assert math.isnan(mean_auc(results, ["b"]))

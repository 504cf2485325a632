"""`pluribus demo`: the chain runs end to end (--quick), resumes, and a failing step names itself."""

import json
import math

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
    for plot in ("baseline_probe_auc", "tokenize_probe_auc", "encode_probe_auc", "encode_training",
                 "federate_auc", "fuse_auc"):
        assert (out / f"{plot}.png").read_bytes()[:4] == b"\x89PNG"
    tokens = metrics["tokenize"]
    assert tokens["collisions"]["users"] == 200 and 0.0 < tokens["min_usage"] <= 1.0
    # AUC is undefined (NaN) when a 10-user test split of the 200-user sample holds one class
    aucs = [v for runs in metrics["federate"]["per_method"].values() for r in runs for v in r.values()]
    assert len(aucs) == 16 and all(math.isnan(v) or 0.0 <= v <= 1.0 for v in aucs)
    assert metrics["fuse"]["epsilon"] == 4.0
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

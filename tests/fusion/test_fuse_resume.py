"""`pluribus fuse run` killed with SIGKILL while it trains the parties: the rerun says "resumed from ...", trains
only the parties left, and ends with an uninterrupted run's results; a finished run is not recomputed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pluribus.cli import main

PARTIES = 3
CONFIG = f"""dataset = "digits"
hidden = [16]
parties = {PARTIES}
epochs = 60
calib_size = 100
[fusion]
epsilon = 2.0
noise_seed = 0
[adapter]
kind = "none"
"""


def _args(cfg: Path, out: Path) -> list[str]:
    return ["fuse", "run", "--config", str(cfg), "--out", str(out), "--threads", "1"]


@pytest.mark.slow
def test_kill_9_while_training_parties_then_rerun_resumes(kill_cli_when, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLURIBUS_PROGRESS", "0")
    torch.set_num_threads(1)
    cfg = tmp_path / "run.toml"
    cfg.write_text(CONFIG)
    assert main(_args(cfg, tmp_path / "reference")) == 0
    capsys.readouterr()
    reference = json.loads((tmp_path / "reference" / "metrics.json").read_text())["accuracy"]

    run = tmp_path / "killed"
    kill_cli_when(_args(cfg, run), (run / "checkpoints" / "party0.safetensors").exists)
    done = sorted(p.name for p in (run / "checkpoints").glob("party*.safetensors"))
    assert 1 <= len(done) < PARTIES, f"killed after {done}: nothing left to resume"
    assert not (run / "metrics.json").exists() or "accuracy" not in json.loads((run / "metrics.json").read_text())

    from pluribus.fusion.studies import experiment

    trained = []
    original = experiment.train_model

    def counted(*args, **kwargs):
        trained.append(kwargs.get("seed"))
        return original(*args, **kwargs)

    monkeypatch.setattr(experiment, "train_model", counted)
    assert main(_args(cfg, run)) == 0
    assert len(trained) == PARTIES - len(done)  # only the parties left were trained
    err = capsys.readouterr().err
    assert f"resumed from {run / 'checkpoints'}: {len(done)} of {PARTIES} party models already trained" in err
    assert json.loads((run / "metrics.json").read_text())["accuracy"] == reference

    trained.clear()
    assert main(_args(cfg, run)) == 0
    assert trained == [] and "nothing recomputed" in capsys.readouterr().err

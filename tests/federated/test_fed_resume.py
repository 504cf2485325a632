"""`pluribus fed run` killed with SIGKILL after its first checkpoint: the rerun says "resumed from ..." and
ends with the final metrics of an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pluribus.cli import main

STEPS = 120
CONFIG = f"""suite = "digits"
tasks = ["digit", "parity"]
steps = {STEPS}
batch_size = 8
max_train_per_client = 32
checkpoint_every = 1

[model]
dim = 16
heads = 2
depth = 1
adapter_hidden = 16
"""


def _args(cfg: Path, out: Path) -> list[str]:
    return ["fed", "run", "--config", str(cfg), "--out", str(out)]


def _step(run: Path) -> int:
    try:
        return int(json.loads((run / "checkpoints" / "latest.json").read_text())["next_step"])
    except (OSError, ValueError, KeyError):
        return 0  # not written yet, or caught mid-rename


def _final(capsys: pytest.CaptureFixture[str]) -> dict:
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):])["final"]


def kill_after_first_checkpoint(kill_cli_when, cfg: Path, run: Path, steps: int) -> int:  # noqa: ANN001
    """Start `fed run` on ``cfg`` into ``run``, SIGKILL it after its first checkpoint; the step it checkpointed."""
    kill_cli_when(_args(cfg, run), lambda: _step(run) >= 1, timeout_s=120)
    from pluribus.runs import RunFolder

    saved = RunFolder(run).load_checkpoint("latest")  # the step inside the checkpoint file, not its sidecar
    killed_at = int(saved[1]["next_step"]) if saved is not None else 0
    assert 1 <= killed_at < steps, f"the run was killed at step {killed_at} of {steps}: nothing left to resume"
    assert (run / "INCOMPLETE").exists() and not (run / "checkpoints" / "final.safetensors").exists()
    return killed_at


@pytest.mark.slow
def test_kill_9_then_rerun_resumes_to_the_same_metrics(kill_cli_when, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(1)
    cfg = tmp_path / "fed.toml"
    cfg.write_text(CONFIG)
    assert main(_args(cfg, tmp_path / "reference")) == 0
    reference = _final(capsys)

    run = tmp_path / "killed"
    killed_at = kill_after_first_checkpoint(kill_cli_when, cfg, run, STEPS)

    from pluribus.federated.studies.simulate import FedBoneSimulation

    exchanges = []
    original = FedBoneSimulation.exchange

    def counted(self: FedBoneSimulation) -> object:
        exchanges.append(self.next_step)
        return original(self)

    monkeypatch.setattr(FedBoneSimulation, "exchange", counted)
    assert main(_args(cfg, run)) == 0
    assert exchanges[0] == killed_at and len(exchanges) == STEPS - killed_at  # trained only the steps left
    err = capsys.readouterr().err
    assert f"resumed from {run / 'checkpoints' / 'latest'} at step {killed_at} of {STEPS}" in err
    assert not (run / "INCOMPLETE").exists()
    # the rerun printed its metrics to stdout; read the run folder's copy too
    result = json.loads((run / "metrics.json").read_text())["result"]
    assert result["final"] == reference
    assert result["steps_done"] == STEPS


def test_a_fresh_run_does_not_say_resumed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.set_num_threads(1)
    cfg = tmp_path / "fed.toml"
    cfg.write_text(CONFIG.replace(f"steps = {STEPS}", "steps = 2"))
    assert main(_args(cfg, tmp_path / "run")) == 0
    assert "resumed from" not in capsys.readouterr().err
    assert main(_args(cfg, tmp_path / "run")) == 0  # finished: the rerun starts from the last checkpoint
    assert "resumed from" in capsys.readouterr().err

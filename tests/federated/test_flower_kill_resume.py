"""`pluribus fed flower --engine inprocess` killed with SIGKILL after its first committed checkpoint: the rerun
says "resumed from ..." and ends bit-identical to an uninterrupted run (metrics, bytes, server state)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_fed_resume import CONFIG as FED_RUN_CONFIG
from test_fed_resume import STEPS as FED_RUN_STEPS

from pluribus.cli import main

STEPS = 12
CONFIG = FED_RUN_CONFIG.replace(f"steps = {FED_RUN_STEPS}", f"steps = {STEPS}")  # the `fed run` kill test's config


def _args(cfg: Path, out: Path) -> list[str]:
    return ["fed", "flower", "--config", str(cfg), "--engine", "inprocess", "--out", str(out)]


def _step(run: Path) -> int:
    try:
        return int(json.loads((run / "checkpoints" / "flower_server.json").read_text())["next_step"])
    except (OSError, ValueError, KeyError):
        return 0  # not written yet, or caught mid-rename


def _printed(capsys: pytest.CaptureFixture[str]) -> tuple[dict, str]:
    captured = capsys.readouterr()
    return json.loads(captured.out[captured.out.index("{"):]), captured.err


@pytest.mark.slow
def test_kill_9_then_rerun_resumes_bit_identical(kill_cli_when, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from pluribus.federated.flower.server_app import SERVER_CHECKPOINT, SERVER_STATE_FILE
    from pluribus.io import load_tensors
    from pluribus.runs import RunFolder

    torch.set_num_threads(1)
    cfg = tmp_path / "fed.toml"
    cfg.write_text(CONFIG)
    reference = tmp_path / "reference"
    assert main(_args(cfg, reference)) == 0
    ref, err = _printed(capsys)
    assert ref["resumed_from"] is None and "resumed from" not in err

    run = tmp_path / "killed"
    kill_cli_when(_args(cfg, run), lambda: _step(run) >= 1, timeout_s=120)
    saved = RunFolder(run).load_checkpoint(SERVER_CHECKPOINT)  # the step inside the checkpoint file itself
    killed_at = int(saved[1]["next_step"]) if saved is not None else 0
    assert 1 <= killed_at < STEPS, f"the run was killed at step {killed_at} of {STEPS}: nothing left to resume"
    assert (run / "INCOMPLETE").exists() and not (run / "flower_result.json").exists()

    assert main(_args(cfg, run)) == 0
    res, err = _printed(capsys)
    assert f"resumed from {run.resolve() / 'checkpoints' / SERVER_CHECKPOINT} at step {killed_at} of {STEPS}" in err
    assert res["resumed_from"] == killed_at and res["steps_done"] == STEPS
    assert not (run / "INCOMPLETE").exists()
    assert res["final"] == ref["final"] and res["bytes"] == ref["bytes"] and res["faults"] == ref["faults"] == 0
    mine, theirs = load_tensors(run / SERVER_STATE_FILE), load_tensors(reference / SERVER_STATE_FILE)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)  # bit-identical
    curve = json.loads((run / "metrics.json").read_text())["result"]["curve"]
    assert curve == json.loads((reference / "metrics.json").read_text())["result"]["curve"]

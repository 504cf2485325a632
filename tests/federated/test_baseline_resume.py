"""The baselines of `pluribus fed run` checkpoint and resume like FedBone: a run that crashes (an exception, or
kill -9 of the command) and is rerun ends with the result of an uninterrupted run, bit for bit."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_fed_resume import CONFIG as FED_RUN_CONFIG
from test_fed_resume import STEPS as FED_RUN_STEPS
from test_fed_resume import _args, _final, kill_after_first_checkpoint

from pluribus.cli import main
from pluribus.federated import FedBoneConfig, ModelConfig
from pluribus.federated.studies.baselines import _LocalLearner, run_baseline
from pluribus.io import load_tensors

TINY = ModelConfig(dim=16, depth=1, heads=2, patch=2, adapter_hidden=16)
BASE = FedBoneConfig(suite="digits", tasks=("digit", "parity"), steps=6, batch_size=8, max_train_per_client=32,
                     round_steps=2, fedrep_head_steps=1, local_steps=2, checkpoint_every=2, model=TINY)


def _crash_at(monkeypatch: pytest.MonkeyPatch, batches: int) -> None:
    """Raise in the ``batches``-th training mini-batch (counted over all clients)."""
    original, seen = _LocalLearner.train_batch, [0]

    def train_batch(self: _LocalLearner, *args: object, **kwargs: object) -> float:
        seen[0] += 1
        if seen[0] == batches:
            raise RuntimeError("simulated crash")
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(_LocalLearner, "train_batch", train_batch)


@pytest.mark.parametrize("algorithm", ["local", "fedavg", "fedprox", "fedper", "fedrep"])
def test_crash_then_rerun_is_exact(algorithm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(1)
    cfg = replace(BASE, algorithm=algorithm)
    full = run_baseline(cfg, run_dir=tmp_path / "full", progress=False)
    run = tmp_path / "crashed"
    with monkeypatch.context() as patch:
        # step 4 of 6, after the step-2 checkpoint: 2 clients x 2 local steps per step
        _crash_at(patch, 3 * 2 * 2 + 1)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_baseline(cfg, run_dir=run, progress=False)
    meta = json.loads((run / "checkpoints" / "latest.json").read_text())
    assert meta["next_step"] == 2 and not (run / "checkpoints" / "final.safetensors").exists()
    trained: list[int] = []
    original = _LocalLearner.train_batch
    monkeypatch.setattr(_LocalLearner, "train_batch",
                        lambda self, idx, **kw: trained.append(1) or original(self, idx, **kw))
    resumed = run_baseline(cfg, run_dir=run, progress=False)
    assert len(trained) == (cfg.steps - 2) * cfg.local_steps * cfg.num_clients  # only the steps left
    assert resumed.final == full.final and resumed.bytes == full.bytes
    mine, ref = load_tensors(run / "checkpoints" / "final.safetensors"), load_tensors(
        tmp_path / "full" / "checkpoints" / "final.safetensors")
    assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in mine)


def test_a_finished_baseline_run_trains_nothing_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = replace(BASE, algorithm="fedavg")
    first = run_baseline(cfg, run_dir=tmp_path / "run", progress=False)
    _crash_at(monkeypatch, 1)  # any training batch now fails
    again = run_baseline(cfg, run_dir=tmp_path / "run", progress=False)
    assert again.final == first.final and again.bytes == first.bytes


def test_no_checkpoints_without_checkpoint_every(tmp_path: Path) -> None:
    run_baseline(replace(BASE, algorithm="local", checkpoint_every=0), run_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints" / "latest.safetensors").exists()


STEPS = 60


@pytest.mark.slow
def test_kill_9_fedprox_then_rerun_resumes_to_the_same_metrics(kill_cli_when, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    torch.set_num_threads(1)
    cfg = tmp_path / "fedprox.toml"
    cfg.write_text(FED_RUN_CONFIG.replace(f"steps = {FED_RUN_STEPS}", f'steps = {STEPS}\nalgorithm = "fedprox"'))
    assert main(_args(cfg, tmp_path / "reference")) == 0
    reference = _final(capsys)

    run = tmp_path / "killed"
    killed_at = kill_after_first_checkpoint(kill_cli_when, cfg, run, STEPS)

    assert main(_args(cfg, run)) == 0
    captured = capsys.readouterr()
    assert f"resumed from {run / 'checkpoints' / 'latest'} at step {killed_at} of {STEPS}" in captured.err
    assert json.loads(captured.out[captured.out.index("{"):])["final"] == reference
    assert not (run / "INCOMPLETE").exists()
    mine, ref = (load_tensors(r / "checkpoints" / "final.safetensors") for r in (run, tmp_path / "reference"))
    assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in mine)  # bit-identical

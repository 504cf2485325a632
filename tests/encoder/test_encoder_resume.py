"""`pluribus encoder train` on a user's own JSONL file: the source and the future come from the data, kill -9
mid-way and a rerun resumes from the last checkpoint to the identical result; a finished run is not retrained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_backbone
from pluribus.cli import main
from pluribus.encoder.backbone import word_tokenizer

T0 = 1_700_000_000
STEPS = 5
SHOPS = ["bakery", "garage", "cinema", "florist", "library", "market", "pharmacy", "arcade"]


def write_own_data(path: Path, users: int = 20, events: int = 9) -> Path:
    """A newcomer's file: one source ('clicks', no held-out future), a profile and a label."""
    with path.open("w", encoding="utf-8") as out:
        for i in range(users):
            clicks = [{"timestamp": T0 + 600 * k + i, "text": f"visited {SHOPS[(i * (k + 1)) % len(SHOPS)]} {k % 3}"}
                      for k in range(events)]
            out.write(json.dumps({"user_id": f"user{i:02d}", "sources": {"clicks": clicks},
                                  "profile": {"age": 20 + i}, "labels": {"loyal": i % 2}}) + "\n")
    return path


@pytest.fixture(scope="module")
def own_data(tmp_path_factory):
    """(the JSONL file, a tiny decoder folder whose word vocabulary covers it)."""
    folder = tmp_path_factory.mktemp("own")
    data = write_own_data(folder / "mine.jsonl")
    words = ["Next:", *[f"{w};" for w in "012"], *"012", "visited", *SHOPS, *[f"{s};" for s in SHOPS]]
    tok = word_tokenizer(words)
    model = folder / "tiny"
    make_backbone(len(tok)).save_pretrained(model)
    tok.save_pretrained(model)
    return data, model


def _config(tmp_path: Path, model: Path) -> Path:
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(
        f'[encoder]\nmodel = "{model}"\nprojection = [8]\nmax_length = 48\n[encoder.lora]\nr = 2\n'
        '[schedule]\npolicy = "ggsm"\nwarmup_steps = 2\n'
        '[train]\nbatch_size = 8\nlr = 0.003\ncheckpoint_every = 1\n'
    )
    return cfg


def _args(data: Path, cfg: Path, out: Path) -> list[str]:
    # no --source and no future: the file's only source is chosen, each user's last 3 events become the future
    return ["encoder", "train", "--data", str(data), "--config", str(cfg), "--out", str(out), "--steps", str(STEPS)]


def _final(run: Path) -> tuple[list[float], dict[str, torch.Tensor]]:
    from pluribus.io import load_tensors

    losses = json.loads((run / "metrics.json").read_text())["train"]["losses"]
    return losses, load_tensors(run / "checkpoints" / "last.safetensors")


def _step(run: Path) -> int:
    meta = run / "checkpoints" / "last.json"
    try:
        return int(json.loads(meta.read_text())["step"])
    except (OSError, ValueError, KeyError):
        return 0  # not written yet, or caught mid-rename


@pytest.mark.slow
def test_kill_9_then_rerun_resumes_to_the_same_result(kill_cli_when, own_data, tmp_path, capsys):
    data, model = own_data
    cfg = _config(tmp_path, model)
    torch.set_num_threads(1)
    reference = tmp_path / "reference"
    assert main(_args(data, cfg, reference)) == 0
    saved = (reference / "config.toml").read_text()
    assert 'source = "clicks"' in saved and "future_last = 3" in saved
    assert "holding out each user's last 3 events" in capsys.readouterr().err

    run = tmp_path / "killed"
    kill_cli_when(_args(data, cfg, run), lambda: _step(run) >= 1, timeout_s=120)
    from pluribus.runs import RunFolder

    saved_ckpt = RunFolder(run).load_checkpoint("last")  # the step inside the checkpoint file, not its sidecar
    killed_at = int(saved_ckpt[1]["step"]) if saved_ckpt is not None else 0
    assert 1 <= killed_at < STEPS, f"the run was killed at step {killed_at} of {STEPS}: nothing left to resume"
    assert (run / "INCOMPLETE").exists()

    assert main(_args(data, cfg, run)) == 0
    err = capsys.readouterr().err
    assert f"resumed from {run / 'checkpoints' / 'last'} at step {killed_at}" in err
    assert json.loads((run / "metrics.json").read_text())["train"]["resumed_from"] == killed_at
    assert not (run / "INCOMPLETE").exists()
    losses, tensors = _final(run)
    ref_losses, ref_tensors = _final(reference)
    assert losses == ref_losses and len(losses) == STEPS
    assert tensors.keys() == ref_tensors.keys()
    assert all(torch.equal(tensors[k], ref_tensors[k]) for k in tensors)  # bit-identical

    before = (run / "checkpoints" / "last.safetensors").stat().st_mtime_ns
    assert main(_args(data, cfg, run)) == 0  # finished: not retrained
    assert "already finished: nothing retrained" in capsys.readouterr().err
    assert (run / "checkpoints" / "last.safetensors").stat().st_mtime_ns == before

    assert main(["encoder", "eval", "--run", str(run), "--tasks", "loyal"]) == 0  # the run's own future again
    done = json.loads((run / "metrics.json").read_text())
    assert done["retrieval"]["users"] == 4 and "loyal" in done["probe"]


def test_force_starts_a_finished_run_over(own_data, tmp_path, capsys):
    data, model = own_data
    cfg = _config(tmp_path, model)
    torch.set_num_threads(1)
    run = tmp_path / "run"
    args = ["encoder", "train", "--data", str(data), "--config", str(cfg), "--out", str(run), "--steps", "2",
            "--future-after", str(T0 + 600 * 6)]  # a cut-off time: the last 3 of 9 events are the future
    assert main(args) == 0
    assert main([*args[:-2], "--future-last", "2"]) == 2  # another config: refused without --force
    assert "--force" in capsys.readouterr().err
    assert main([*args[:-2], "--future-last", "2", "--force"]) == 0
    assert "resumed from" not in capsys.readouterr().err
    assert "future_last = 2" in (run / "config.toml").read_text()
    assert json.loads((run / "metrics.json").read_text())["train"]["resumed_from"] == 0

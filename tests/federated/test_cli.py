"""`pluribus fed` commands: init-config, run with a run folder and resume, clear errors."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from pluribus.cli import main
from pluribus.federated.cli import app

SMALL = ["--set", "steps=2", "--set", "batch_size=8", "--set", "max_train_per_client=32", "--set", "model.dim=16",
         "--set", "model.heads=2", "--set", "model.adapter_hidden=16", "--set", "model.depth=1",
         "--set", "checkpoint_every=1"]


def test_init_config_run_and_resume(tmp_path) -> None:
    runner = CliRunner()
    cfg = tmp_path / "fed.toml"
    res = runner.invoke(app, ["init-config", str(cfg), "--suite", "digits"])
    assert res.exit_code == 0 and cfg.exists()
    out = tmp_path / "run"
    res = runner.invoke(app, ["run", "--config", str(cfg), "--out", str(out), *SMALL])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.output[res.output.index("{"):])
    assert set(payload["final"]) == {"0:digit", "1:parity", "2:segmentation", "3:reconstruction"}
    assert (out / "metrics.json").exists() and (out / "checkpoints" / "latest.safetensors").exists()
    again = runner.invoke(app, ["run", "--config", str(cfg), "--out", str(out), *SMALL])
    assert again.exit_code == 0
    assert json.loads(again.output[again.output.index("{"):])["final"] == payload["final"]


def test_cli_errors_exit_2(tmp_path, capsys) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('suite = "digits"\ntasks = ["digit", "bogus"]\n')
    assert main(["fed", "run", "--config", str(cfg)]) == 2
    assert "unknown task 'bogus'" in capsys.readouterr().err
    empty = tmp_path / "empty.toml"
    empty.write_text('suite = "digits"\ntasks = []\n')
    assert main(["fed", "run", "--config", str(empty)]) == 2
    assert "at least one client" in capsys.readouterr().err
    assert main(["fed", "run", "--config", str(tmp_path / "missing.toml")]) == 2


def test_flower_inprocess_run_folder_and_resume(tmp_path) -> None:
    runner = CliRunner()
    cfg = tmp_path / "fed.toml"
    assert runner.invoke(app, ["init-config", str(cfg), "--suite", "digits"]).exit_code == 0
    out = tmp_path / "flower-run"
    args = ["flower", "--config", str(cfg), "--engine", "inprocess", "--out", str(out), *SMALL]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    payload = json.loads(res.output[res.output.index("{"):])
    assert payload["resumed_from"] is None and payload["steps_done"] == 2
    assert set(payload["final"]) == {"0:digit", "1:parity", "2:segmentation", "3:reconstruction"}
    assert (out / "flower_result.json").exists() and (out / "checkpoints" / "flower_server.json").exists()
    assert (out / "clients" / "partition-3" / "fedbone-client3-step0000002.safetensors").exists()
    again = runner.invoke(app, args)  # the finished run resumes at its last checkpoint: nothing left to train
    assert again.exit_code == 0, again.output
    second = json.loads(again.output[again.output.index("{"):])
    assert second["resumed_from"] == 2 and second["final"] == payload["final"]


def test_flower_cli_rejects_unknown_engine(tmp_path, capsys) -> None:
    cfg = tmp_path / "fed.toml"
    cfg.write_text('suite = "digits"\n')
    assert main(["fed", "flower", "--config", str(cfg), "--engine", "ray"]) == 2
    assert "--engine: unknown 'ray'" in capsys.readouterr().err


def test_run_with_another_config_names_force_and_force_starts_over(tmp_path, capsys) -> None:
    cfg = tmp_path / "fed.toml"
    assert CliRunner().invoke(app, ["init-config", str(cfg), "--suite", "digits"]).exit_code == 0
    out = tmp_path / "run"
    assert main(["fed", "run", "--config", str(cfg), "--out", str(out), *SMALL]) == 0
    (out / "stale.txt").write_text("from the first run")
    capsys.readouterr()
    other = [*SMALL, "--set", "seed=1"]
    assert main(["fed", "run", "--config", str(cfg), "--out", str(out), *other]) == 2
    err = capsys.readouterr().err
    assert "pass --force to start over" in err and "Traceback" not in err  # the option it names exists:
    assert main(["fed", "run", "--config", str(cfg), "--out", str(out), *other, "--force"]) == 0
    assert not (out / "stale.txt").exists() and "seed = 1" in (out / "config.toml").read_text()


def test_flower_force_starts_a_run_folder_over(tmp_path, capsys) -> None:
    cfg = tmp_path / "fed.toml"
    assert CliRunner().invoke(app, ["init-config", str(cfg), "--suite", "digits"]).exit_code == 0
    out = tmp_path / "run"
    args = ["fed", "flower", "--config", str(cfg), "--engine", "inprocess", "--out", str(out), *SMALL]
    assert main(args) == 0
    (out / "stale.txt").write_text("from the first run")
    capsys.readouterr()
    assert main([*args, "--set", "seed=1"]) == 2
    assert "pass --force to start over" in capsys.readouterr().err
    assert main([*args, "--set", "seed=1", "--force"]) == 0
    assert not (out / "stale.txt").exists() and "seed = 1" in (out / "config.toml").read_text()


def test_worker_lease_must_be_positive(tmp_path, capsys) -> None:
    assert main(["fed", "worker", "--state-dir", str(tmp_path / "w"), "--lease-s", "0"]) == 2
    assert "--lease-s must be > 0" in capsys.readouterr().err and not (tmp_path / "w").exists()

"""`pluribus fuse train-parties` and `pluribus fuse flower`: party files in, fused model and privacy report out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pluribus.cli import main
from pluribus.fusion.cli import app
from pluribus.fusion.core.models import MLP
from pluribus.fusion.flower.party_files import load_party_model, save_party_model


@pytest.fixture(scope="module")
def party_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuse-cli")
    cfg = root / "run.toml"
    cfg.write_text('dataset = "digits"\nhidden = [16]\nparties = 3\nepochs = 2\ncalib_size = 100\n')
    res = CliRunner().invoke(app, ["train-parties", "--config", str(cfg), "--out", str(root / "parties")],
                             env={"PLURIBUS_PROGRESS": "0"})
    assert res.exit_code == 0, res.output
    return root / "parties"


def test_train_parties_then_fuse_on_flower_inprocess(party_dir: Path, tmp_path: Path) -> None:
    assert sorted(p.name for p in party_dir.iterdir()) == ["calib.safetensors", "parties.toml", "party0", "party1",
                                                            "party2", "test.safetensors"]
    assert isinstance(load_party_model(party_dir / "party0" / "model.safetensors"), MLP)
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["flower", "--engine", "inprocess", "--parties-toml", str(party_dir / "parties.toml"),
                                   "--out", str(out), "--epsilon", "4", "--test", str(party_dir / "test.safetensors"),
                                   "--calib", str(party_dir / "calib.safetensors")], env={"PLURIBUS_PROGRESS": "0"})
    assert res.exit_code == 0, res.output
    assert "fused 3 parties: party0, party1, party2; left out: none" in res.output
    metrics = json.loads((out / "metrics.json").read_text())["flower"]
    assert 0.0 <= metrics["fused test accuracy"] <= 1.0 and metrics["excluded"] == []
    privacy = json.loads((out / "privacy.json").read_text())
    assert [p["party"] for p in privacy["parties"]] == ["party0", "party1", "party2"]
    assert "Privacy report" in (out / "report.md").read_text()
    assert not (out / "parties").exists() and not list(out.rglob("party*.safetensors"))
    fused = load_party_model(out / "fused.safetensors")
    for k in range(3):  # every party saved the same fused model
        # ... in its own state folder, beside its model: never in the hub's run folder
        own = load_party_model(party_dir / f"party{k}" / f"party{k}.state" / "fused.safetensors")
        assert all((a == b).all() for a, b in zip(own.state_dict().values(), fused.state_dict().values(), strict=True))


def test_party_flags_and_a_party_of_another_architecture(party_dir: Path, tmp_path: Path) -> None:
    odd = save_party_model(tmp_path / "odd.safetensors", MLP(64, (8,), 10))
    args = ["flower", "--party", f"a={party_dir / 'party0'}", "--party", f"b={party_dir / 'party1'}",
            "--party", f"odd={odd},{party_dir / 'party2' / 'data.safetensors'}", "--out", str(tmp_path / "run")]
    res = CliRunner().invoke(app, args, env={"PLURIBUS_PROGRESS": "0"})
    assert res.exit_code == 0, res.output
    assert "fused 2 parties: a, b; left out: odd at hello: architecture mlp(in_features=64, hidden=[8]" in res.output
    assert "odd" in (tmp_path / "run" / "report.md").read_text()


def test_bad_input_exits_2_with_one_clear_line(party_dir: Path, tmp_path: Path, capsys) -> None:
    out = ["--out", str(tmp_path / "run")]
    cases = [
        (["--party", "nameonly"], "--party 'nameonly': expected NAME=DIR or NAME=MODEL_FILE,DATA_FILE"),
        (["--party", f"a={party_dir / 'party0'}"], "give at least 2 parties"),
        (["--party", f"a={party_dir / 'party0'}", "--party", f"b={tmp_path / 'nowhere'}"],
         "party 'b': model file not found"),
        (["--engine", "ray", "--party", "a=x", "--party", "b=y"], "--engine: unknown 'ray'"),
        (["--parties-toml", str(tmp_path / "missing.toml")], "parties file not found"),
        (["--party", f"a={party_dir / 'party0'}", "--party", f"b={party_dir / 'party1'}", "--epsilon", "-1"],
         "epsilon must be > 0"),
    ]
    for extra, message in cases:
        assert main(["fuse", "flower", *extra, *out]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    bad = tmp_path / "bad.toml"
    bad.write_text('[parties.a]\nmodel = "m"\n')
    assert main(["fuse", "flower", "--parties-toml", str(bad), *out]) == 2
    assert "party 'a' needs string keys 'model' and 'data'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing written on bad input


def test_flower_force_starts_a_run_folder_over(party_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    args = ["fuse", "flower", "--party", f"a={party_dir / 'party0'}", "--party", f"b={party_dir / 'party1'}",
            "--out", str(out)]
    assert main([*args, "--epsilon", "4"]) == 0
    (out / "stale.txt").write_text("from the first run")
    capsys.readouterr()
    assert main([*args, "--epsilon", "2"]) == 2  # the folder holds a run: refused without --force
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--force" in err and "Traceback" not in err
    assert (out / "stale.txt").exists()
    assert main([*args, "--epsilon", "2", "--match-start", "forward", "--force"]) == 0
    assert not (out / "stale.txt").exists()  # cleared, then the new run written
    saved = (out / "config.toml").read_text()
    assert "epsilon = 2.0" in saved and 'match_start = "forward"' in saved
    assert json.loads((out / "privacy.json").read_text())["parties"][0]["per_scalar"]["epsilon"] == 2.0
    capsys.readouterr()
    assert main([*args, "--epsilon", "2", "--match-start", "sideways", "--force"]) == 2
    assert "fusion.match_start must be one of ['identity', 'forward']" in capsys.readouterr().err


def test_run_force_and_match_start_reach_the_run_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    from pluribus.fusion import cli as fuse_cli
    from pluribus.fusion.core.config import RunConfig
    from pluribus.runs import RunFolder

    class Stop(Exception):
        pass

    def stop(cfg, folder=None):  # noqa: ANN001, ANN202
        raise Stop(cfg.fusion.match_start)  # training is not what is tested: stop once the folder is open

    monkeypatch.setattr(fuse_cli, "_train_parties", stop)
    out = tmp_path / "run"
    RunFolder(out, RunConfig(parties=5))  # a folder holding another run
    (out / "stale.txt").write_text("old")
    assert main(["fuse", "run", "--out", str(out), "--parties", "2"]) == 2
    err = capsys.readouterr().err
    assert "holds a run with a different config" in err and "--force" in err
    res = CliRunner().invoke(app, ["run", "--out", str(out), "--parties", "2", "--match-start", "forward", "--force"])
    assert isinstance(res.exception, Stop) and str(res.exception) == "forward"
    assert not (out / "stale.txt").exists()
    saved = (out / "config.toml").read_text()
    assert "parties = 2" in saved and 'match_start = "forward"' in saved

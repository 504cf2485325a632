"""`pluribus fed prepare` on a user's own JSONL file, then `fed run` and `fed flower` on the config it writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pluribus.cli import main
from pluribus.data.store import load_user_data, save_jsonl
from pluribus.data.synthetic import make_synthetic_users
from pluribus.federated.cli import app
from pluribus.federated.studies.tasks import build_suite, institution_file, load_feature_suite


@pytest.fixture(scope="module")
def own_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_jsonl(make_synthetic_users(60), tmp_path_factory.mktemp("own") / "users.jsonl")


def _json(output: str) -> dict:
    return json.loads(output[output.index("{"):])


def test_prepare_then_run_and_flower(own_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runner = CliRunner()
    out = tmp_path / "prep"
    res = runner.invoke(app, ["prepare", str(own_file), "--out", str(out), "--tasks", "price_sensitive,segment",
                              "--institutions", "3", "--seed", "1", "--steps", "3"])
    assert res.exit_code == 0, res.output
    config = out / "fedbone.toml"
    here = f"--set features_path={(out / 'institutions').resolve()}"
    assert f"pluribus fed run --config {config} {here}" in res.output
    assert f"pluribus fed flower --config {config} {here}" in res.output
    text = config.read_text()
    # the server's config: no user data and no path to any (issue 22 §1 changed this: it named the one file)
    assert 'suite = "features"' in text and 'features_path = ""' in text and "safetensors" not in text
    rows = json.loads((out / "institutions.json").read_text())["institutions"]
    assert [r["task"] for r in rows] == ["price_sensitive", "segment", "price_sensitive"]
    assert sum(r["users"] for r in rows) == 60
    for k, row in enumerate(rows):  # one file per institution: its users and its own task's labels only
        suite = load_feature_suite(row["file"])
        assert suite.client == k and suite.tokens.shape[0] == row["users"] and list(suite.labels) == [row["task"]]
    assert not (out / "features.safetensors").exists()

    expected = {"0:price_sensitive", "1:segment", "2:price_sensitive"}
    local = ["--set", f"features_path={out / 'institutions'}"]
    # the server's config alone runs no institution in this process: one line, exit 2, no run folder
    assert main(["fed", "run", "--config", str(config), "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert "names no data" in err and len(err.splitlines()) == 1 and not (tmp_path / "none").exists()
    ran = runner.invoke(app, ["run", "--config", str(config), *local, "--out", str(tmp_path / "run")])
    assert ran.exit_code == 0, ran.output
    final = _json(ran.output)["final"]
    assert set(final) == expected and all(np.isfinite(m["loss"]) and "accuracy" in m for m in final.values())
    flown = runner.invoke(app, ["flower", "--config", str(config), *local, "--engine", "inprocess",
                                "--out", str(tmp_path / "flower")])
    assert flown.exit_code == 0, flown.output
    payload = _json(flown.output)
    assert payload["steps_done"] == 3 and set(payload["final"]) == expected
    assert payload["final"] == final  # the Flower apps and the in-process run train the same model


def test_institutions_from_a_column(own_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "prep"
    res = CliRunner().invoke(app, ["prepare", str(own_file), "--out", str(out), "--tasks", "price_sensitive",
                                   "--institution-column", "segment", "--steps", "2"])
    assert res.exit_code == 0, res.output
    ds = load_user_data(own_file)
    names = sorted(set(ds.labels["segment"].astype(str)))
    # each client holds exactly the users of its institution, not a seeded equal split
    segment = ds.labels["segment"].astype(str)
    for k, name in enumerate(names):
        suite = load_feature_suite(institution_file(out / "institutions", k))
        assert suite.client == k and suite.institution == name
        assert suite.tokens.shape[0] == int((segment == name).sum())
    clients = build_suite("features", ["price_sensitive"] * len(names), seed=0, features_path=out / "institutions")
    sizes = [len(c.y_train) + len(c.y_test) for c in clients]
    labelled = ds.labels["price_sensitive"].notna()
    assert sizes == [int(((segment == n) & labelled).sum()) for n in names]
    rows = json.loads((out / "institutions.json").read_text())["institutions"]
    assert [r["institution"] for r in rows] == names

"""`pluribus tokenize fit|encode|eval` on a synthetic data set (fake stage 1 embedder)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner
from u2qt_helpers import fake_embed

from pluribus.tokenizer import embed as embed_mod
from pluribus.tokenizer.cli import app


@pytest.mark.slow
def test_fit_encode_eval(tmp_path, monkeypatch):
    monkeypatch.setattr(embed_mod, "embed_texts", lambda t, c=None, **k: fake_embed(t))
    runner = CliRunner()
    run = tmp_path / "run"
    res = runner.invoke(app, ["fit", "synthetic:80", "--out", str(run), "--epochs", "3",
                              "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output
    for name in ("config.toml", "metrics.json", "report.md", "loss.png", "tokenizer/tokenizer.json"):
        assert (run / name).exists(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["heldout"]["collisions"]["users"] == 80  # usage and collisions over all users
    assert "ratings" not in metrics["heldout"]["reconstruction"]
    out = tmp_path / "codes.jsonl"
    res = runner.invoke(app, ["encode", "synthetic:80", "--tokenizer", str(run / "tokenizer"), "--out", str(out),
                              "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 80 and len(rows[0]["codes"]) == 4 and rows[0]["tokens"][0].startswith("<s0_l0_c")
    res = runner.invoke(app, ["eval", "synthetic:80", "--tokenizer", str(run / "tokenizer"),
                              "--out", str(tmp_path / "m.json"), "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "m.json").read_text())["collisions"]["users"] == 80


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    res = CliRunner().invoke(app, ["eval", "synthetic:20", "--tokenizer", str(tmp_path / "none")])
    assert res.exit_code != 0 and "file not found" in str(res.exception)


def test_fit_results_on_stdout_notes_on_stderr_and_force(tmp_path, monkeypatch, capsys):
    from pluribus.cli import main

    monkeypatch.setattr(embed_mod, "embed_texts", lambda t, c=None, **k: fake_embed(t))
    run = tmp_path / "run"
    args = ["tokenize", "fit", "synthetic:60", "--out", str(run), "--epochs", "2", "--cache-dir", str(tmp_path / "c")]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "reconstruction" in captured.out and "tokenizer saved" in captured.out
    assert "60 users" in captured.err and "reconstruction" not in captured.err
    assert main([*args[:-4], "--epochs", "3", "--cache-dir", str(tmp_path / "c")]) == 2  # another config
    assert "--force" in capsys.readouterr().err
    assert main([*args[:-4], "--epochs", "3", "--cache-dir", str(tmp_path / "c"), "--force"]) == 0
    assert json.loads((run / "metrics.json").read_text())["training"]["epochs"] == 3

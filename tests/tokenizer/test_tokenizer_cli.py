"""`pluribus tokenize fit|encode|eval` on a synthetic data set (fake stage 1 embedder)."""

from __future__ import annotations

import json

import numpy as np
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
    assert len(rows) == 80 and len(rows[0]["codes"]) == 4 and rows[0]["tokens"][0].startswith("<sh_l0_c")
    res = runner.invoke(app, ["eval", "synthetic:80", "--tokenizer", str(run / "tokenizer"),
                              "--out", str(tmp_path / "m.json"), "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["split"] == "recorded" and metrics["users"] == {"heldout": 16, "training": 64}
    assert metrics["heldout"]["collisions"]["users"] == 16 and metrics["training"]["collisions"]["users"] == 64
    assert "held-out users (never trained on): 16 users" in res.output and "training users: 64 users" in res.output
    source = next(iter(metrics["heldout"]["reconstruction"]))
    assert metrics["heldout"]["reconstruction"][source]["mse"] != metrics["training"]["reconstruction"][source]["mse"]


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


@pytest.fixture(scope="module")
def vector_run(tmp_path_factory, views):
    """A tokenizer fitted with `fit --vectors` on a vector folder that names its embedder."""
    from pluribus.cli import main
    from pluribus.tokenizer import SourceEmbeddings
    from pluribus.tokenizer.stream import write_vectors

    root = tmp_path_factory.mktemp("vectors")
    n = len(views["src0"])
    present = {k: (np.arange(n) % 7 != 0) if k == "src2" else np.ones(n, bool) for k in views}
    emb = SourceEmbeddings(np.array([f"u{i}" for i in range(n)], dtype=object), dict(views), present)
    write_vectors(root / "vec", [emb.subset(np.arange(0, 120)), emb.subset(np.arange(120, n))], embedder="model-A")
    assert main(["tokenize", "fit", str(root / "vec"), "--vectors", "--out", str(root / "run"), "--epochs", "3"]) == 0
    return root, emb


def test_vectors_tokenizer_encodes_decodes_and_evaluates_from_the_cli(vector_run, capsys):
    import dataclasses

    from pluribus.cli import main
    from pluribus.tokenizer import UserTokenizer
    from pluribus.tokenizer.stream import read_codes, read_sample

    root, emb = vector_run
    tok_dir = str(root / "run" / "tokenizer")
    assert main(["tokenize", "encode", str(root / "vec"), "--vectors", "--tokenizer", tok_dir,
                 "--out", str(root / "codes")]) == 0
    tok = UserTokenizer.load(tok_dir)
    ids, codes = read_codes(root / "codes", tok.source_names_)
    assert list(ids) == list(emb.user_ids) and np.array_equal(codes, tok.encode(emb))
    assert main(["tokenize", "decode", str(root / "codes"), "--tokenizer", tok_dir, "--out", str(root / "dec")]) == 0
    decoded = read_sample(root / "dec", tok.source_names_, 10_000)
    expected = tok.decode(codes)
    assert list(decoded.user_ids) == list(emb.user_ids)
    assert np.allclose(decoded.embeddings["src0"], expected.embeddings["src0"], atol=1e-6)
    assert np.array_equal(decoded.present["src2"], emb.present["src2"])
    capsys.readouterr()
    other = UserTokenizer(dataclasses.replace(tok.config, epochs=1, seed=7), progress=False).fit(root / "vec")
    assert main(["tokenize", "decode", str(root / "codes"), "--tokenizer", str(other.save(root / "other-tok")),
                 "--out", str(root / "dec-other")]) == 2
    err = capsys.readouterr().err
    assert "written by tokenizer" in err and "u2qt.tokenizer" in err and not (root / "dec-other").exists()
    assert main(["tokenize", "eval", str(root / "vec"), "--vectors", "--tokenizer", tok_dir]) == 0
    out = capsys.readouterr().out
    assert "training users: 240 users" in out and "held-out users (never trained on): 0 users: too few" in out
    # without --vectors the tokenizer has no stage 1 to run: one clear line
    assert main(["tokenize", "encode", "synthetic:20", "--tokenizer", tok_dir, "--out", str(root / "x.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "fitted on stage-1 vectors" in err and "--vectors" in err and "Traceback" not in err


def test_a_vector_folder_from_another_embedder_is_refused(vector_run, capsys):
    from pluribus.cli import main
    from pluribus.tokenizer.stream import write_vectors

    root, emb = vector_run
    write_vectors(root / "other", [emb], embedder="model-B")
    for command in (["encode", "--out", str(root / "codes-b")], ["eval"]):
        args = ["tokenize", command[0], str(root / "other"), "--vectors", "--tokenizer", str(root / "run" / "tokenizer"),
                *command[1:]]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "model-B" in err and "model-A" in err and len(err.strip().splitlines()) == 1
    assert not (root / "codes-b").exists()


def test_decode_jsonl_from_codes_or_tokens_and_refuse_another_tokenizers_codes(vector_run, views, small_config, capsys):
    import dataclasses

    from pluribus.cli import main
    from pluribus.tokenizer import UserTokenizer
    from pluribus.tokenizer.stream import read_sample

    root, emb = vector_run
    tok_dir = root / "run" / "tokenizer"
    tok = UserTokenizer.load(tok_dir)
    codes = tok.encode(emb)[:5]
    tokens = tok.tokens(codes)
    lines = [{"user_id": f"u{i}", "codes": codes[i].tolist(), "tokens": tokens[i], "tokenizer": tok.fingerprint_}
             for i in range(3)] + [{"user_id": f"u{i}", "tokens": tokens[i]} for i in range(3, 5)]
    path = root / "codes.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in lines) + "\n")
    assert main(["tokenize", "decode", str(path), "--tokenizer", str(tok_dir), "--out", str(root / "dec-jsonl")]) == 0
    decoded = read_sample(root / "dec-jsonl", tok.source_names_, 100)
    assert np.allclose(decoded.embeddings["src1"], tok.decode(codes).embeddings["src1"], atol=1e-6)

    other = UserTokenizer(dataclasses.replace(small_config, epochs=1, seed=9), progress=False).fit(views)
    other_dir = other.save(root / "other-tok")
    bad_cases = {
        "written by tokenizer": lines,  # the lines name the tokenizer that wrote them
        "shape [3, 2]": [{"user_id": "u0", "codes": [[1, 2], [1, 2], [1, 2]]}],
        "out of range": [{"user_id": "u0", "codes": [[1, 2, 40], [1, 2, 3], [1, 2, 3]]}],
        "not JSON": None,
    }
    for message, rows in bad_cases.items():
        text = "{oops\n" if rows is None else "\n".join(json.dumps(r) for r in rows) + "\n"
        path.write_text(text)
        target = root / "dec-bad"
        assert main(["tokenize", "decode", str(path), "--tokenizer", str(other_dir), "--out", str(target)]) == 2
        err = capsys.readouterr().err
        assert message in err and "codes.jsonl" in err and len(err.strip().splitlines()) == 1, err
        assert not target.exists()
    # a -1 must not wrap around to the empty code
    path.write_text(json.dumps({"user_id": "u0", "codes": [[-1, 2, 3], [1, 2, 3], [1, 2, 3]]}) + "\n")
    assert main(["tokenize", "decode", str(path), "--tokenizer", str(other_dir), "--out", str(root / "x")]) == 2
    assert "code -1 out of range" in capsys.readouterr().err


def test_absurd_epochs_are_refused_in_one_line(tmp_path, capsys):
    from pluribus.cli import main

    assert main(["tokenize", "fit", "synthetic:20", "--epochs", "1000000000000", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--epochs" in err and "100000" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()
    config = tmp_path / "run.toml"
    config.write_text("[tokenizer]\nepochs = 1000000000000\n")
    assert main(["tokenize", "fit", "synthetic:20", "--config", str(config), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "epochs" in err and "must be <=" in err and len(err.strip().splitlines()) == 1


def test_stable_refit_from_the_cli_keeps_every_code(vector_run, capsys):
    from pluribus.cli import main
    from pluribus.tokenizer import UserTokenizer

    root, emb = vector_run
    old_dir = root / "run" / "tokenizer"
    args = ["tokenize", "fit", str(root / "vec"), "--vectors", "--out", str(root / "stable"), "--epochs", "2",
            "--refit-from", str(old_dir), "--stable"]
    assert main(args) == 0
    old, new = UserTokenizer.load(old_dir), UserTokenizer.load(root / "stable" / "tokenizer")
    assert np.array_equal(new.encode(emb), old.encode(emb))
    capsys.readouterr()
    assert main(["tokenize", "fit", str(root / "vec"), "--vectors", "--out", str(root / "s2"), "--stable"]) == 2
    err = capsys.readouterr().err
    assert "refit_from" in err and len(err.strip().splitlines()) == 1 and not (root / "s2").exists()

"""The encoder CLI: a collapsed run exits 1 with one line, a backbone that cannot take the policy's mask and an
export target that holds another model exit 2 with one line, and nothing is half-written."""

from __future__ import annotations

import json

import pytest

from conftest import make_backbone
from pluribus.cli import main
from pluribus.encoder.backbone import word_tokenizer


@pytest.fixture(scope="module")
def vocabulary():
    from pluribus.data.synthetic import make_synthetic_users
    from pluribus.encoder.pairs import build_pairs, pairs_vocabulary

    ds = make_synthetic_users(24, seed=0)
    return pairs_vocabulary(build_pairs(ds, source="payments", positive="profile", max_events=6))


def model_dir(tmp_path_factory, vocabulary, family):
    tok = word_tokenizer(vocabulary)
    folder = tmp_path_factory.mktemp(f"tiny-{family}")
    make_backbone(len(tok), family=family).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, vocabulary):
    return model_dir(tmp_path_factory, vocabulary, "llama")


def train_args(model, out, *extra):
    return ["encoder", "train", "--model", str(model), "--data", "synthetic:40", "--source", "payments",
            "--steps", "2", "--batch-size", "8", "--max-length", "40", "--out", str(out), *extra]


def last_error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


def test_all_zero_embeddings_are_reported_as_collapse_and_exit_1(llama_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(llama_dir, run, "--lr", "1e12")) == 1
    line = last_error(capsys)
    # the weights blow up: every embedding is zero (tiny-random) or non-finite (this Llama), never "cosine 0.000"
    assert "encoder training collapsed: 32 of 32 embeddings" in line and "Traceback" not in line
    assert "have norm 0" in line or "hold NaN or inf" in line
    metrics = json.loads((run / "metrics.json").read_text())["train"]
    assert metrics["collapsed"] is True and "32 of 32 embeddings" in metrics["collapse"]
    assert "**Collapsed**" in (run / "report.md").read_text()


def test_a_hybrid_backbone_refuses_a_non_causal_policy_before_writing_anything(tmp_path_factory, vocabulary,
                                                                                tmp_path, capsys):
    lfm2 = model_dir(tmp_path_factory, vocabulary, "lfm2")
    run = tmp_path / "run"
    assert main(train_args(lfm2, run, "--policy", "ggsm")) == 2
    line = last_error(capsys)
    assert "Lfm2Model with attn_implementation='sdpa' has layers that cannot attend to later tokens" in line
    assert "conv" in line and not run.exists()
    cfg = tmp_path / "causal.toml"
    cfg.write_text('[encoder]\ninference_mask = "causal"\nprojection = [8]\n[encoder.lora]\nr = 2\n'
                   '[schedule]\npolicy = "ggsm"\n')
    assert main([*train_args(lfm2, run), "--config", str(cfg)]) == 2  # causal inference, but a ggsm policy
    assert "policy 'ggsm' gives later tokens weight" in last_error(capsys) and not run.exists()


def test_export_refuses_an_occupied_target_in_one_line_and_writes_nothing(llama_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(llama_dir, run)) == 0
    out, st = tmp_path / "exported", tmp_path / "st"
    assert main(["encoder", "export", str(run), str(out)]) == 0
    capsys.readouterr()
    assert main(["encoder", "export", str(run), str(out)]) == 2
    assert "already holds a saved pluribus encoder; refusing to overwrite" in last_error(capsys)
    other = tmp_path / "other"
    make_backbone(50, family="qwen2").save_pretrained(other)
    fresh = tmp_path / "fresh"
    assert main(["encoder", "export", str(run), str(fresh), "--sentence-transformers", str(other)]) == 2
    assert "already holds a transformers model" in last_error(capsys)
    assert not fresh.exists()  # nothing half-written: the first target was not written either
    assert main(["encoder", "export", str(run), str(out), "--sentence-transformers", str(st), "--force"]) == 0
    assert (st / "modules.json").exists() and (out / "pluribus_encoder.json").exists()

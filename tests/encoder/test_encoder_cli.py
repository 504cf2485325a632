from __future__ import annotations

import json

import pytest

from conftest import make_backbone
from pluribus.cli import main
from pluribus.data.synthetic import make_synthetic_users
from pluribus.encoder.backbone import word_tokenizer


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from pluribus.data.synthetic import make_synthetic_users
    from pluribus.encoder.pairs import build_pairs, pairs_vocabulary

    ds = make_synthetic_users(24, seed=0)
    tok = word_tokenizer(pairs_vocabulary(build_pairs(ds, source="payments", positive="profile", max_events=6)))
    folder = tmp_path_factory.mktemp("tiny-qwen3")
    make_backbone(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def again_schedule_step(folder):
    from pluribus.encoder.model import UserEncoder

    return UserEncoder.from_pretrained(folder).schedule.step


@pytest.mark.slow
def test_cli_train_resume_embed_eval(tiny_model_dir, tmp_path, capsys):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(
        '[pairs]\ndata = "synthetic:40"\nsource = "payments"\npositive = "profile"\nmax_events = 6\n'
        f'[encoder]\nmodel = "{tiny_model_dir}"\nprojection = [8]\nmax_length = 40\n[encoder.lora]\nr = 2\n'
        '[schedule]\npolicy = "ggsm"\nwarmup_steps = 1\n'
        '[train]\nbatch_size = 6\nlr = 0.002\ncheckpoint_every = 1\n'
    )
    run = tmp_path / "run"
    args = ["encoder", "train", "--config", str(cfg), "--out", str(run), "--steps", "2"]
    assert main(args) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 2 and (run / "loss.png").exists()
    assert main(args) == 0  # rerun resumes from the finished checkpoint
    assert json.loads((run / "metrics.json").read_text())["train"]["resumed_from"] == 2
    assert main(["encoder", "embed", "--run", str(run)]) == 0
    from pluribus.io import load_tensors

    emb = load_tensors(run / "embeddings.safetensors")["embeddings"]
    assert tuple(emb.shape) == (40, 8)
    assert main(["encoder", "eval", "--run", str(run), "--tasks", "price_sensitive,active_lifestyle"]) == 0
    done = json.loads((run / "metrics.json").read_text())
    assert "price_sensitive" in done["probe"]
    assert done["retrieval"]["users"] == 8 and 0 <= done["retrieval"]["recall@1"] <= done["retrieval"]["recall@10"]
    assert done["train"]["pairs"] == 32 and len(done["train"]["top1"]) == 2 and "collapsed" in done["train"]
    report = (run / "report.md").read_text()
    assert "Held-out retrieval" in report and "vs chance ln B" in report and "Mask self-check: passed for" in report
    assert main(["encoder", "export", str(run), str(tmp_path / "exported")]) == 0
    from pluribus.encoder.model import UserEncoder
    from pluribus.encoder.pairs import user_inputs

    _, users = user_inputs(make_synthetic_users(40, seed=0), source="payments", max_events=6)
    again = UserEncoder.from_pretrained(tmp_path / "exported").encode(users, progress=False)
    assert again.shape == (40, 8) and abs(again - emb.numpy()).max() < 1e-4  # same vectors as `encoder embed`
    assert again_schedule_step(tmp_path / "exported") == 2
    capsys.readouterr()
    assert main(["encoder", "export", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert "not an encoder run folder" in capsys.readouterr().err
    assert main(["encoder", "train", "--config", str(cfg), "--out", str(run), "--steps", "3"]) == 2
    assert "different config" in capsys.readouterr().err
    assert main(["encoder", "embed", "--run", str(tmp_path / "missing")]) == 2

"""The demo's GGSM step on the event-language vehicle (a tiny decoder, a few steps): its artifact, summary rows,
diagnostics, resumable per-seed checkpoints and the warm pretrained-decoder cache, on data without a future."""

import json

import pytest

from pluribus.cli import main


@pytest.fixture
def tiny_encode_step(monkeypatch, tmp_path):
    from pluribus.demo import encode

    monkeypatch.setenv("PLURIBUS_DATA_DIR", str(tmp_path / "data-home"))
    monkeypatch.setattr(encode, "QUICK_STEPS", (3, 4))
    monkeypatch.setattr(encode, "PRETRAIN_SHAPE", {"hidden": 16, "layers": 1, "heads": 2, "kv_heads": 1,
                                                  "intermediate": 32, "window": 32, "batch": 8})
    return tmp_path


def test_encode_step_on_own_data_trains_and_compares_with_the_untrained_copy(tiny_encode_step, capsys):
    import torch

    from pluribus.runs import RunFolder

    out = tiny_encode_step / "demo"
    assert main(["demo", "--quick", "--data", "synthetic:60", "--out", str(out), "--steps", "encode"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    enc = metrics["encode"]
    assert enc["source"] == "payments" and enc["steps"] == 4 and enc["pretrain_steps"] == 3
    assert not enc["pretrain_cached"] and enc["heldout_users"] == 12 and enc["train_pairs"] == 48
    (seed,) = enc["per_seed"]
    assert len(seed["losses"]) == 4 and set(seed["trained"]) >= {"recall@1", "recall@10", "mrr"}
    assert {"GGSM trained", "GGSM untrained", "simple features"} <= set(enc["probes"])
    rows = metrics["summary"]["encode"]
    assert rows[0]["measure"].startswith("held-out Recall@10 (12 users") and "untrained" in rows[0]["verdict"]
    assert "collapsed" in rows[0]["verdict"] and "simple features" in rows[1]["verdict"]
    assert "pretrain" in metrics["timing_notes"]["encode"]
    section = (out / "sections" / "encode.md").read_text()
    for text in ("## Step 2, GGSM", "mask self-check", "loss vs ln B", "U2QT codes feed FedBone",
                 "each user's last 10 events"):
        assert text in section
    for plot in ("encode_probe_auc", "encode_training"):
        assert (out / f"{plot}.png").read_bytes()[:4] == b"\x89PNG"
    tensors, meta = RunFolder(out).load_checkpoint("artifact-encode")
    emb = tensors["user_embeddings"]
    assert emb.shape == (60, 16) and meta["dim"] == 16 and torch.isfinite(emb).all()
    saved = RunFolder(out).load_checkpoint("last-seed0")  # the seed's own checkpoint: a killed demo resumes it
    assert saved is not None and saved[1]["step"] == 4
    # a second run folder on the same users reuses the pretrained decoder
    again = tiny_encode_step / "again"
    assert main(["demo", "--quick", "--data", "synthetic:60", "--out", str(again), "--steps", "encode"]) == 0
    second = json.loads((again / "metrics.json").read_text())["encode"]
    assert second["pretrain_cached"] and second["pretrain_folder"] == enc["pretrain_folder"]
    assert second["per_seed"][0]["losses"] == seed["losses"]  # same decoder, head seed and batches


def test_encode_step_refuses_too_few_users(tiny_encode_step, capsys):
    out = tiny_encode_step / "demo"
    assert main(["demo", "--quick", "--data", "synthetic:8", "--out", str(out), "--steps", "encode"]) == 2
    err = capsys.readouterr().err
    assert "demo step 'encode' failed" in err and "needs >= 10" in err

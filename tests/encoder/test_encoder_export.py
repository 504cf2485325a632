from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import make_backbone, make_tokenizer
from pluribus.encoder.config import EncoderConfig, LoraSettings, ScheduleConfig
from pluribus.encoder.model import UserEncoder
from pluribus.encoder.schedule import MaskSchedule
from pluribus.errors import ConfigError, DataError

USERS = ["w1 w2 w3 w4 w5 w6", "w7 <q_0> w8", "w9 w10 <q_1> w11 w12"]


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    """Tiny random base models saved as plain folders (what a hub id or local path resolves to)."""
    out = {}
    for family in ("llama", "stablelm"):
        folder = tmp_path_factory.mktemp(family)
        tok = make_tokenizer()
        make_backbone(len(tok), family=family).save_pretrained(folder)
        tok.save_pretrained(folder)
        out[family] = folder
    return out


def trained(folder, *, pooling="mean", lora=4, impl="sdpa"):
    cfg = EncoderConfig(model=str(folder), projection=(12, 8), lora=LoraSettings(r=lora), pooling=pooling,
                        attn_implementation=impl, max_length=32)
    enc = UserEncoder(cfg, extra_tokens=["<q_0>", "<q_1>"])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # stand-in for training: non-trivial LoRA, added-token rows and head
        for p in enc.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return enc.eval()


def schedule_after_warmup():
    sched = MaskSchedule(ScheduleConfig(policy="ggsm", total_steps=10, warmup_steps=2, norm="zscore"))
    sched.importance = torch.linspace(-1, 1, sched.config.capacity)
    for _ in range(3):
        sched.advance()
    return sched


def test_save_and_load_pretrained_give_the_same_encoder(base_dirs, tmp_path):
    enc = trained(base_dirs["llama"], pooling="user_token")
    expected = enc.encode(USERS, progress=False)
    sched = schedule_after_warmup()
    out = enc.save_pretrained(tmp_path / "enc", schedule=sched)
    files = {p.name for p in out.rglob("*")}
    assert {"adapter_config.json", "adapter_model.safetensors", "modules.safetensors", "pluribus_encoder.json",
            "schedule.safetensors", "tokenizer.json"} <= files
    assert not (out / "backbone").exists()  # adapter files only; the base model is referenced
    meta = json.loads((out / "pluribus_encoder.json").read_text())
    assert meta["encoder"]["pooling"] == "user_token" and meta["extra_tokens"] == ["<q_0>", "<q_1>"]
    again = UserEncoder.from_pretrained(out)
    assert np.allclose(again.encode(USERS, progress=False), expected, atol=1e-5)
    assert again.schedule is not None and again.schedule.step == 3
    assert torch.equal(again.schedule.w0, sched.w0)
    merged = enc.save_pretrained(tmp_path / "merged", merged=True)
    assert (merged / "backbone" / "config.json").exists() and not (merged / "adapter").exists()
    assert np.allclose(UserEncoder.from_pretrained(merged).encode(USERS, progress=False), expected, atol=1e-5)


def test_a_saved_encoder_loads_in_a_fresh_process(base_dirs, tmp_path):
    enc = trained(base_dirs["llama"])
    enc.save_pretrained(tmp_path / "enc")
    np.save(tmp_path / "expected.npy", enc.encode(USERS, progress=False))
    code = (
        "import sys, numpy as np, torch; torch.set_num_threads(1)\n"
        "from pluribus.encoder import UserEncoder\n"
        f"x = UserEncoder.from_pretrained(sys.argv[1]).encode({USERS!r}, progress=False)\n"
        "assert np.allclose(x, np.load(sys.argv[2]), atol=1e-5), abs(x - np.load(sys.argv[2])).max()\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "enc"), str(tmp_path / "expected.npy")],
                          capture_output=True, text=True, timeout=120, env={"OMP_NUM_THREADS": "1",
                                                                            "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]


def test_folders_from_elsewhere_are_clear_errors(base_dirs, tmp_path):
    enc = trained(base_dirs["llama"])
    out = enc.save_pretrained(tmp_path / "enc")
    meta = json.loads((out / "pluribus_encoder.json").read_text())
    meta["version"] = 99
    (out / "pluribus_encoder.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="version 99; this pluribus reads 'pluribus-ggsm-encoder' version 1"):
        UserEncoder.from_pretrained(out)
    with pytest.raises(DataError, match="not a saved encoder folder"):
        UserEncoder.from_pretrained(tmp_path)


def test_sentence_transformers_export_gives_the_same_embeddings(base_dirs, tmp_path):
    from sentence_transformers import SentenceTransformer

    from pluribus.encoder.export import export_sentence_transformers

    enc = trained(base_dirs["llama"])
    out = export_sentence_transformers(enc, tmp_path / "st")
    st = SentenceTransformer(str(out), device="cpu")
    texts = ["w1 w2 w3 w4 w5 w6", "w7 w8", "w9 w10 w11 w12 w13"]  # padded inside one batch
    assert np.allclose(st.encode(texts), enc.encode(texts, progress=False), atol=1e-4)
    assert st.encode(texts).shape == (3, 8)


def test_sentence_transformers_export_refuses_what_it_cannot_express(base_dirs, tmp_path):
    from pluribus.encoder.export import export_sentence_transformers

    # StableLM's sdpa layer ignores config.is_causal=False on an unpadded batch: measured, refused, nothing left
    with pytest.raises(ConfigError, match=r"StableLmModel with attn_implementation='sdpa'.*differ"):
        export_sentence_transformers(trained(base_dirs["stablelm"]), tmp_path / "st")
    assert not (tmp_path / "st").exists() and not list(tmp_path.glob(".st-*"))
    with pytest.raises(ConfigError, match="user_token"):
        export_sentence_transformers(trained(base_dirs["llama"], pooling="user_token"), tmp_path / "st2")

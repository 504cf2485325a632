"""Sentence-transformers exports read the encoder's tokens (truncation side, a first BOS, no chat template) and are
checked on inputs at and beyond max_length; targets holding another model are refused; collapse is detected."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import WORDS, make_backbone
from pluribus.encoder.backbone import word_tokenizer
from pluribus.encoder.config import EncoderConfig, LoraSettings
from pluribus.encoder.model import UserEncoder
from pluribus.errors import ConfigError

CHAT = "{% for m in messages %}<|user|> {{ m['content'] }} <|end|>{% endfor %}"


def instruct_tokenizer():
    """A word tokenizer that adds a first BOS (as Llama / SmolLM2 tokenizers do) and carries a chat template."""
    from tokenizers import processors

    tok = word_tokenizer(WORDS)
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 2)])
    tok.chat_template = CHAT
    return tok


def encoder(max_length: int = 12, family: str = "llama") -> UserEncoder:
    tok = instruct_tokenizer()
    cfg = EncoderConfig(model="x", projection=(12, 8), lora=LoraSettings(r=0), max_length=max_length)
    enc = UserEncoder(cfg, backbone=make_backbone(len(tok), family=family), tokenizer=tok)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in enc.head.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return enc.eval()


def words(n: int, start: int = 0) -> str:
    return " ".join(f"w{(start + k) % 40}" for k in range(n))


def test_long_inputs_keep_the_last_tokens_and_the_first_bos():
    enc = encoder(max_length=12)
    with pytest.warns(UserWarning, match="keeping the last 12 tokens"):
        batch = enc.tokenize([words(5), words(30)])
    assert batch.input_ids[0, :6].tolist() == [2, 4, 5, 6, 7, 8]  # [BOS] w0..w4
    assert batch.input_ids[1].tolist() == [2, *range(4 + 19, 4 + 30)]  # [BOS] then the last 11 words


def test_export_reads_the_encoders_tokens_and_gives_its_embeddings_on_long_inputs(tmp_path):
    from sentence_transformers import SentenceTransformer

    from pluribus.encoder.export import export_sentence_transformers, probe_texts

    enc = encoder(max_length=12)
    lengths = [len(enc.tokenizer(t)["input_ids"]) for t in probe_texts(enc)]
    assert max(lengths) > 12 and 12 in [min(n, 12) for n in lengths]  # the check itself reaches max_length
    out = export_sentence_transformers(enc, tmp_path / "st")
    st = SentenceTransformer(str(out), device="cpu")
    texts = [words(3), words(11), words(12, 5), words(13, 9), words(40, 2)]  # short, at and beyond max_length
    ours = enc.encode(texts, progress=False)
    assert np.abs(st.encode(texts) - ours).max() < 1e-4
    # the tokenizer's chat template is not applied: the exported model reads the plain text's tokens
    features = st.preprocess([words(3)])
    assert features["input_ids"][0].tolist() == enc.tokenize([words(3)]).input_ids[0].tolist() == [2, 4, 5, 6]


def test_an_export_that_reads_other_tokens_is_refused_naming_the_tokens(tmp_path):
    from pluribus.encoder.export import check_same_embeddings, export_sentence_transformers

    enc = encoder(max_length=12)
    out = export_sentence_transformers(enc, tmp_path / "st")
    config = out / "tokenizer_config.json"
    settings = json.loads(config.read_text())
    settings["truncation_side"] = "right"  # what the export wrote before: keeps the oldest tokens
    config.write_text(json.dumps(settings))
    with pytest.raises(ConfigError, match="reads other tokens.*truncation side"):
        check_same_embeddings(enc, out)


def test_a_target_holding_another_model_is_refused_and_left_untouched(tmp_path):
    from pluribus.encoder.export import export_sentence_transformers

    enc = encoder(max_length=12)
    other = tmp_path / "other"
    make_backbone(60, family="qwen2").save_pretrained(other)
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    with pytest.raises(ConfigError, match="already holds a transformers model; refusing to overwrite"):
        export_sentence_transformers(enc, other)
    with pytest.raises(ConfigError, match="already holds a transformers model"):
        enc.save_pretrained(other)
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before
    assert not list(tmp_path.glob(".other-*"))
    saved = enc.save_pretrained(tmp_path / "enc")
    enc.save_pretrained(saved)  # its own earlier save is replaced, as save_pretrained does
    export_sentence_transformers(enc, other, overwrite=True)  # asked for: written
    assert (other / "modules.json").exists()


def test_embedding_collapse_finds_zero_norm_non_finite_and_identical_embeddings():
    from pluribus.encoder.metrics import embedding_collapse

    rng = np.random.default_rng(0)
    healthy = rng.normal(size=(20, 8))
    assert embedding_collapse(healthy) is None
    assert "20 of 20 embeddings have norm 0" in embedding_collapse(np.zeros((20, 8)))
    one_dead = healthy.copy()
    one_dead[4] = 0.0
    assert "1 of 20 embeddings have norm 0" in embedding_collapse(one_dead)
    same = np.ones((20, 8)) + rng.normal(scale=1e-4, size=(20, 8))
    assert "near-identical" in embedding_collapse(same)
    nan = healthy.copy()
    nan[0, 0] = np.nan
    assert "NaN" in embedding_collapse(nan)

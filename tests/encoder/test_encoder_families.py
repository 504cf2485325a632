"""The mask is in effect on nine decoder families, sdpa and eager, through UserEncoder's own forward path."""

from __future__ import annotations

import functools

import pytest
import torch

from conftest import FAMILIES, make_backbone, make_tokenizer
from pluribus.encoder.config import EncoderConfig, LoraSettings
from pluribus.encoder.model import TokenBatch, UserEncoder
from pluribus.errors import ConfigError

CASES = [(f, i) for f in FAMILIES for i in ("sdpa", "eager")]
BASE = [5, 9, 13, 17, 21, 25]  # ordinary word ids of the test tokenizer
OTHER = [30, 31, 32, 33, 34, 35, 36, 37, 38]  # a longer user sharing the batch


@functools.cache
def encoder(family: str, impl: str) -> UserEncoder:
    tok = make_tokenizer()
    cfg = EncoderConfig(model=f"tiny-{family}", projection=(), lora=LoraSettings(r=0), attn_implementation=impl,
                        future_scope="user_span")
    return UserEncoder(cfg, backbone=make_backbone(len(tok) + 4, impl, family=family), tokenizer=tok)


def batch(rows, *, left=False, spans=None):
    length = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    span = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, r in enumerate(rows):
        cols = slice(length - len(r), length) if left else slice(0, len(r))
        ids[i, cols] = torch.tensor(r)
        mask[i, cols] = 1
        if spans is not None:
            span[i, cols] = torch.arange(len(r)) < spans[i]
    return TokenBatch(ids, mask, user_span=span if spans is not None else None)


def states(enc, b, w):
    with torch.no_grad():
        return enc.hidden_states(b, w)[0]


@pytest.mark.parametrize(("family", "impl"), CASES)
def test_causal_ignores_later_tokens_bidirectional_sees_them(family, impl):
    enc = encoder(family, impl)
    changed = [*BASE[:-1], 40]
    for w, moves in ((0.0, False), (1.0, True), (0.3, True)):
        h = states(enc, batch([BASE, changed]), w)
        delta = (h[0, :-1] - h[1, :-1]).abs().max().item()
        assert (delta > 1e-4) is moves, (family, impl, w, delta)
        if not moves:
            assert delta < 1e-6


@pytest.mark.parametrize(("family", "impl"), CASES)
@pytest.mark.parametrize("mask", ["causal", "bidirectional", "hybrid", "soft0.3"])
def test_padding_changes_nothing_alone_or_in_a_mixed_batch(family, impl, mask):
    enc = encoder(family, impl)
    w = {"causal": 0.0, "bidirectional": 1.0, "hybrid": 1.0, "soft0.3": 0.3}[mask]
    # hybrid (prefix-LM): the first 4 tokens are user data (bidirectional), the rest a query (causal)
    spans = [4, 5] if mask == "hybrid" else None
    alone = states(enc, batch([BASE], spans=spans[:1] if spans else None), w)[0]
    n = len(BASE)
    for left in (False, True):
        mixed = states(enc, batch([BASE, OTHER], left=left, spans=spans), w)[0]
        real = mixed[-n:] if left else mixed[:n]
        assert torch.allclose(alone, real, atol=1e-5), (family, impl, mask, left, (alone - real).abs().max())
    if mask == "hybrid":  # the query part stays causal: a later query token cannot move the data states
        h = states(enc, batch([BASE, [*BASE[:-1], 40]], spans=[4, 4]), w)
        assert (h[0, :5] - h[1, :5]).abs().max().item() < 1e-6
        assert (states(enc, batch([BASE, [*BASE[:3], 40, *BASE[4:]]], spans=[4, 4]), w)[:, :3].diff(dim=0)
                .abs().max().item() > 1e-4)


def _weighted_reference(enc, ids, weights):
    """The backbone run with a hand-written attention multiplying each future key's exp-score by w."""
    from transformers import AttentionInterface

    def weighted_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        groups = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(groups, dim=1)
        v = value.repeat_interleave(groups, dim=1)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        scores = (query @ k.transpose(-1, -2)) * scale
        e = torch.exp(scores - scores.amax(-1, keepdim=True)) * weights[:, None]
        probs = e / e.sum(-1, keepdim=True)
        return (probs @ v).transpose(1, 2).contiguous(), probs

    AttentionInterface.register("pluribus_test_weighted", weighted_attention)
    cfg = enc.backbone.config
    old = cfg._attn_implementation
    cfg._attn_implementation = "pluribus_test_weighted"
    try:
        from pluribus.encoder.masks import position_ids_from_mask

        with torch.no_grad():
            return enc.backbone(input_ids=ids, attention_mask=None,
                                position_ids=position_ids_from_mask(torch.ones_like(ids))).last_hidden_state
    finally:
        cfg._attn_implementation = old


@pytest.mark.parametrize(("family", "impl"), CASES)
def test_soft_weight_multiplies_future_attention_exactly(family, impl):
    enc = encoder(family, impl)
    ids = torch.tensor([BASE])
    L = ids.shape[1]
    future = torch.arange(L)[None, :] > torch.arange(L)[:, None]
    for w in (0.3, torch.tensor([1.0, 0.9, 0.1, 0.6, 0.3, 0.75])):  # a number, and GG-SM's per-key-position vector
        per_key = w if isinstance(w, torch.Tensor) else torch.full((L,), w)
        matrix = torch.where(future, per_key[None, :].expand(L, L), torch.ones(L, L))[None]
        ours = states(enc, batch([BASE]), w)
        ref = _weighted_reference(enc, ids, matrix)
        assert torch.allclose(ours, ref, atol=1e-5), (family, impl, (ours - ref).abs().max())


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_self_check_passes_and_reports_what_it_measured(impl):
    enc = encoder("stablelm", impl)
    found = enc.check_mask()
    assert found["future_w0"] < 1e-6 < 1e-3 < found["future_w1"]
    assert found["padding_w0"] < 1e-5 and found["padding_w1"] < 1e-5
    # the check at construction is kept, and reports state its verdict for this class and backend
    assert enc.mask_check_result is not None and enc.mask_check_result.keys() == found.keys()
    summary = enc.mask_check_summary()
    assert summary.startswith("passed for StableLm") and f"attn_implementation='{impl}'" in summary


def test_self_check_refuses_a_backbone_that_ignores_the_bias(monkeypatch):
    enc = encoder("llama", "sdpa")
    original = type(enc.backbone).forward

    def causal_anyway(self, *args, attention_mask=None, **kwargs):
        # StableLM's old failure: whatever the bias says, the layer also applies its own causal mask
        length = attention_mask.shape[-1]
        future = torch.ones(length, length, dtype=torch.bool).triu(1)
        forced = attention_mask.masked_fill(future, torch.finfo(attention_mask.dtype).min)
        return original(self, *args, attention_mask=forced, **kwargs)

    def no_mask(self, *args, attention_mask=None, **kwargs):
        return original(self, *args, attention_mask=None, **kwargs)

    monkeypatch.setattr(type(enc.backbone), "forward", causal_anyway)
    with pytest.raises(ConfigError, match=r"LlamaModel with attn_implementation='sdpa'.*did not move"):
        enc.check_mask()
    tok = make_tokenizer()
    cfg = EncoderConfig(model="x", projection=(), lora=LoraSettings(r=0))
    with pytest.raises(ConfigError, match="self-check failed"):  # on by default: building the encoder refuses
        UserEncoder(cfg, backbone=make_backbone(len(tok), family="llama"), tokenizer=tok)
    off = EncoderConfig(model="x", projection=(), lora=LoraSettings(r=0), mask_check=False)
    UserEncoder(off, backbone=make_backbone(len(tok), family="llama"), tokenizer=tok)  # turned off: builds
    monkeypatch.setattr(type(enc.backbone), "forward", no_mask)
    with pytest.raises(ConfigError, match="padding mask is not in effect"):
        enc.check_mask()


def test_self_check_refuses_a_backend_without_an_additive_bias():
    tok = make_tokenizer()
    model = make_backbone(len(tok), family="qwen2")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ConfigError, match=r"Qwen2Model with attn_implementation='flash_attention_2'.*sdpa"):
        UserEncoder(EncoderConfig(model="x", projection=(), lora=LoraSettings(r=0)), backbone=model, tokenizer=tok)

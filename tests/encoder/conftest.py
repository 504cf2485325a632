"""Tiny random Qwen3 backbones and a word tokenizer for fast encoder tests."""

from __future__ import annotations

import pytest
import torch

WORDS = [f"w{i}" for i in range(40)] + ["Query:", "Next", "user", "<c0>"]


def make_tokenizer():
    from pluribus.encoder.backbone import word_tokenizer

    return word_tokenizer(WORDS)


def make_backbone(vocab_size: int, impl: str = "sdpa", seed: int = 0, layers: int = 2, family: str = "qwen3"):
    """A tiny random decoder of a Llama-, Qwen2- or Qwen3-family architecture."""
    import transformers

    config_cls, model_cls = {
        "qwen3": ("Qwen3Config", "Qwen3Model"), "qwen2": ("Qwen2Config", "Qwen2Model"),
        "llama": ("LlamaConfig", "LlamaModel"),
    }[family]
    cfg = getattr(transformers, config_cls)(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
    )
    cfg._attn_implementation = impl
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(cfg).eval()


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture(params=["sdpa", "eager"])
def impl(request):
    return request.param

"""Tiny random decoders of nine families and a word tokenizer for fast encoder tests."""

from __future__ import annotations

import pytest
import torch

WORDS = [f"w{i}" for i in range(40)] + ["Query:", "Next", "user", "<c0>"]


def make_tokenizer():
    from pluribus.encoder.backbone import word_tokenizer

    return word_tokenizer(WORDS)


#: transformers (config class, base model class, extra config fields) of the decoder families the mask is tested on
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaModel", {}),
    "qwen2": ("Qwen2Config", "Qwen2Model", {}),
    "qwen3": ("Qwen3Config", "Qwen3Model", {"head_dim": 8}),
    "mistral": ("MistralConfig", "MistralModel", {"head_dim": 8}),
    # one sliding and one full layer: the window (16) caps the encoder's inputs, inside it both are exact
    "gemma3": ("Gemma3TextConfig", "Gemma3TextModel",
               {"head_dim": 8, "sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"]}),
    "phi3": ("Phi3Config", "Phi3Model", {}),
    "olmo2": ("Olmo2Config", "Olmo2Model", {}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXModel", {}),
    "stablelm": ("StableLmConfig", "StableLmModel", {}),
}


def make_backbone(vocab_size: int, impl: str = "sdpa", seed: int = 0, layers: int = 2, family: str = "qwen3"):
    """A tiny random decoder (hidden 32, 4 heads, 2 KV heads) of one of the ``FAMILIES``."""
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    fields = dict(extra)
    cfg = getattr(transformers, config_cls)(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=2, eos_token_id=3, **fields,
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

"""Tiny random decoders of many transformers families (configs built locally, nothing downloaded) and a word
tokenizer for fast encoder tests."""

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


_GQA = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 64}

#: families whose configs spell their sizes their own way, or mix attention with other layers: every field given
OTHER_FAMILIES = {
    "mpt": ("MptConfig", "MptModel", {"d_model": 32, "n_heads": 4, "n_layers": 2, "expansion_ratio": 2,
                                      "max_seq_len": 64}),
    "bloom": ("BloomConfig", "BloomModel", {"hidden_size": 32, "n_head": 4, "n_layer": 2}),
    "falcon": ("FalconConfig", "FalconModel", {"hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2}),
    "falcon_alibi": ("FalconConfig", "FalconModel", {"hidden_size": 32, "num_attention_heads": 4,
                                                     "num_hidden_layers": 2, "alibi": True}),
    "gpt_neo": ("GPTNeoConfig", "GPTNeoModel", {"hidden_size": 32, "num_heads": 4, "num_layers": 2, "window_size": 8,
                                                "attention_types": [[["global", "local"], 1]],
                                                "max_position_embeddings": 64}),
    "gpt2": ("GPT2Config", "GPT2Model", {"n_embd": 32, "n_head": 4, "n_layer": 2, "n_positions": 64}),
    "opt": ("OPTConfig", "OPTModel", {"hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2,
                                      "ffn_dim": 64, "word_embed_proj_dim": 32, "max_position_embeddings": 64}),
    "granite": ("GraniteConfig", "GraniteModel", _GQA),
    # every layer slides over 8 tokens: one windowed mask for all layers
    "mistral_window": ("MistralConfig", "MistralModel", {**_GQA, "head_dim": 8, "sliding_window": 8}),
    # windowed and full layers side by side: one mask per layer type
    "llama4": ("Llama4TextConfig", "Llama4TextModel", {**_GQA, "intermediate_size_mlp": 64, "num_hidden_layers": 4,
                                                       "head_dim": 8, "attention_chunk_size": 8,
                                                       "num_local_experts": 2}),
    "gpt_oss": ("GptOssConfig", "GptOssModel", {**_GQA, "intermediate_size": 32, "head_dim": 8, "num_local_experts": 2,
                                                "num_experts_per_tok": 1, "sliding_window": 8,
                                                "layer_types": ["sliding_attention", "full_attention"]}),
    "gemma2": ("Gemma2Config", "Gemma2Model", {**_GQA, "head_dim": 8, "sliding_window": 8}),
    "cohere2": ("Cohere2Config", "Cohere2Model", {**_GQA, "sliding_window": 8,
                                                  "layer_types": ["sliding_attention", "full_attention"]}),
    # attention beside convolutional, linear-attention, state-space and recurrent layers
    "lfm2": ("Lfm2Config", "Lfm2Model", {**_GQA, "layer_types": ["conv", "full_attention"]}),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextModel", {
        **_GQA, "head_dim": 8, "layer_types": ["linear_attention", "full_attention"], "linear_num_value_heads": 2,
        "linear_num_key_heads": 2, "linear_key_head_dim": 8, "linear_value_head_dim": 8, "num_experts": 2,
        "num_experts_per_tok": 1, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32}),
    "jamba": ("JambaConfig", "JambaModel", {**_GQA, "attn_layer_period": 2, "attn_layer_offset": 1,
                                            "expert_layer_period": 2, "expert_layer_offset": 1, "num_experts": 2,
                                            "mamba_d_state": 4, "mamba_expand": 2, "mamba_dt_rank": 4}),
    "bamba": ("BambaConfig", "BambaModel", {**_GQA, "attn_layer_indices": [1], "mamba_n_heads": 4, "mamba_d_head": 16,
                                            "mamba_d_state": 8, "mamba_n_groups": 1, "mamba_expand": 2}),
    "recurrent_gemma": ("RecurrentGemmaConfig", "RecurrentGemmaModel", {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 8, "lru_width": 32, "attention_window_size": 16,
        "block_types": ["recurrent", "attention"]}),
    "falcon_h1": ("FalconH1Config", "FalconH1Model", {
        **_GQA, "head_dim": 8, "mamba_d_ssm": 32, "mamba_n_heads": 4, "mamba_d_head": 8, "mamba_d_state": 8,
        "mamba_n_groups": 1, "mamba_expand": 1, "mamba_chunk_size": 16}),
}


def make_backbone(vocab_size: int, impl: str = "sdpa", seed: int = 0, layers: int = 2, family: str = "qwen3"):
    """A tiny random decoder (hidden 32, 4 heads, 2 KV heads) of one of the ``FAMILIES`` or ``OTHER_FAMILIES``."""
    import transformers

    if family in OTHER_FAMILIES:
        config_cls, model_cls, fields = OTHER_FAMILIES[family]
        cfg = getattr(transformers, config_cls)(vocab_size=vocab_size, pad_token_id=0, bos_token_id=2,
                                                eos_token_id=3, **fields)
    else:
        config_cls, model_cls, extra = FAMILIES[family]
        cfg = getattr(transformers, config_cls)(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            pad_token_id=0, bos_token_id=2, eos_token_id=3, **extra,
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

"""GGSM user encoder: a decoder-only LLM turned into a user encoder through soft attention masks.

Public API (transformers and peft are imported only when a model is built)::

    from pluribus.encoder import UserEncoder, EncoderConfig, ScheduleConfig, soft_attention_bias
"""

from __future__ import annotations

from typing import Any

from pluribus.encoder.config import (
    EncoderConfig,
    GGSMConfig,
    LoraSettings,
    PairsConfig,
    ScheduleConfig,
    TrainConfig,
)
from pluribus.encoder.loss import info_nce
from pluribus.encoder.masks import (
    bidirectional_bias,
    causal_bias,
    hybrid_bias,
    position_ids_from_mask,
    require_bias_backend,
    soft_attention_bias,
)
from pluribus.encoder.model import TokenBatch, UserEncoder, UserInput
from pluribus.encoder.schedule import MaskSchedule

_LAZY = {
    "build_pairs": "pluribus.encoder.pairs",
    "user_inputs": "pluribus.encoder.pairs",
    "PairSet": "pluribus.encoder.pairs",
    "train_encoder": "pluribus.encoder.train",
    "load_encoder_run": "pluribus.encoder.train",
    "load_backbone": "pluribus.encoder.backbone",
    "word_tokenizer": "pluribus.encoder.backbone",
}

__all__ = [
    "EncoderConfig", "GGSMConfig", "LoraSettings", "PairsConfig", "ScheduleConfig", "TrainConfig",
    "UserEncoder", "UserInput", "TokenBatch", "MaskSchedule", "info_nce",
    "soft_attention_bias", "causal_bias", "bidirectional_bias", "hybrid_bias", "position_ids_from_mask",
    "require_bias_backend", *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pluribus.encoder' has no attribute {name!r}")

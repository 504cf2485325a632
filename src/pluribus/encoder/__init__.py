"""GGSM user encoder: a decoder-only LLM turned into a user encoder through soft attention masks.

Public API (transformers and peft are imported only when a model is built):

    from pluribus.encoder import UserEncoder, EncoderConfig, ScheduleConfig, soft_attention_bias
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pluribus.lazy import lazy_getattr

if TYPE_CHECKING:
    from pluribus.encoder.backbone import load_backbone, word_tokenizer
    from pluribus.encoder.config import (
        EncoderConfig,
        GGSMConfig,
        LoraSettings,
        PairsConfig,
        ScheduleConfig,
        TrainConfig,
    )
    from pluribus.encoder.export import export_sentence_transformers
    from pluribus.encoder.loss import batch_diagnostics, info_nce
    from pluribus.encoder.masks import (
        bidirectional_bias,
        causal_bias,
        hybrid_bias,
        position_ids_from_mask,
        require_bias_backend,
        soft_attention_bias,
    )
    from pluribus.encoder.metrics import heldout_retrieval, retrieval_metrics
    from pluribus.encoder.model import TokenBatch, UserEncoder, UserInput
    from pluribus.encoder.pairs import PairSet, build_pairs, split_pairs, user_inputs
    from pluribus.encoder.schedule import MaskSchedule
    from pluribus.encoder.train import load_encoder_run, train_encoder

_EXPORTS = {
    "EncoderConfig": "config",
    "GGSMConfig": "config",
    "LoraSettings": "config",
    "PairsConfig": "config",
    "ScheduleConfig": "config",
    "TrainConfig": "config",
    "info_nce": "loss",
    "batch_diagnostics": "loss",
    "retrieval_metrics": "metrics",
    "heldout_retrieval": "metrics",
    "export_sentence_transformers": "export",
    "split_pairs": "pairs",
    "bidirectional_bias": "masks",
    "causal_bias": "masks",
    "hybrid_bias": "masks",
    "position_ids_from_mask": "masks",
    "require_bias_backend": "masks",
    "soft_attention_bias": "masks",
    "TokenBatch": "model",
    "UserEncoder": "model",
    "UserInput": "model",
    "MaskSchedule": "schedule",
    "PairSet": "pairs",
    "build_pairs": "pairs",
    "user_inputs": "pairs",
    "load_encoder_run": "train",
    "train_encoder": "train",
    "load_backbone": "backbone",
    "word_tokenizer": "backbone",
}

__getattr__ = lazy_getattr("pluribus.encoder", _EXPORTS)

__all__ = [
    "EncoderConfig", "GGSMConfig", "LoraSettings", "PairsConfig", "ScheduleConfig", "TrainConfig",
    "UserEncoder", "UserInput", "TokenBatch", "MaskSchedule", "info_nce",
    "soft_attention_bias", "causal_bias", "bidirectional_bias", "hybrid_bias", "position_ids_from_mask",
    "require_bias_backend", "build_pairs", "user_inputs", "PairSet", "train_encoder",
    "load_encoder_run", "load_backbone", "word_tokenizer", "batch_diagnostics", "retrieval_metrics",
    "heldout_retrieval", "export_sentence_transformers", "split_pairs",
]

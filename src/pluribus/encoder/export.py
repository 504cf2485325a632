"""Saving a UserEncoder as a self-contained folder, loading it back, and a sentence-transformers export.

Folder layout (``FORMAT`` version ``VERSION``)::

    pluribus_encoder.json   format, version, encoder config, added tokens, event_dim, backbone kind, schedule config
    tokenizer/              the tokenizer with every added token
    adapter/                peft adapter files (LoRA + added-token rows): adapter_config.json, adapter_model.safetensors
      or backbone/          the full backbone (LoRA merged, or full fine-tuning)
    modules.safetensors     projection head and event adapter
    schedule.safetensors    the mask schedule's state (GG-SM importance, W0, step), when given

With ``adapter/`` the base model is loaded from ``encoder.model`` (hub id, local folder or the SmolLM2 alias;
``from_pretrained(..., model=...)`` points elsewhere). Nothing refers to a pluribus run folder.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pluribus.errors import ConfigError, DataError

if TYPE_CHECKING:
    from pluribus.encoder.model import UserEncoder
    from pluribus.encoder.schedule import MaskSchedule

FORMAT = "pluribus-ggsm-encoder"
VERSION = 1
META = "pluribus_encoder.json"


def save_encoder(encoder: UserEncoder, path: str | Path, *, schedule: MaskSchedule | None = None,
                 merged: bool = False) -> Path:
    """Write ``encoder`` to folder ``path`` (replaced atomically); ``merged`` stores the full merged backbone."""
    from pluribus.config import config_to_dict
    from pluribus.encoder.model import EVENT_TOKEN, USER_TOKEN
    from pluribus.io import json_text, save_tensors

    target = Path(path)
    peft = hasattr(encoder.backbone, "merge_and_unload")
    merged = merged or not peft  # no adapter to write: LoRA already merged, or full fine-tuning
    cfg = encoder.config
    if merged:
        cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, r=0))
    meta = {
        "format": FORMAT, "version": VERSION, "encoder": config_to_dict(cfg),
        "extra_tokens": [t for t in encoder.extra_tokens if t not in (USER_TOKEN, EVENT_TOKEN)],
        "event_dim": encoder.event_dim, "backbone": "merged" if merged else "adapter",
        "model_class": encoder.model_class, "embedding_dim": encoder.embedding_dim,
        "schedule": config_to_dict(schedule.config) if schedule is not None else None,
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        encoder.tokenizer.save_pretrained(tmp / "tokenizer")
        if merged:
            backbone = copy.deepcopy(encoder.backbone).merge_and_unload() if peft else encoder.backbone
            backbone.save_pretrained(tmp / "backbone")
            encoder.tokenizer.save_pretrained(tmp / "backbone")  # a standalone transformers folder
        else:
            # the added rows are peft trainable tokens (saved in the adapter) and the original rows are unchanged,
            # so the resized embedding matrix itself need not be copied (113 MB for SmolLM2)
            encoder.backbone.save_pretrained(tmp / "adapter", save_embedding_layers=False)
        modules = {f"head.{k}": v for k, v in encoder.head.state_dict().items()}
        if encoder.event_adapter is not None:
            modules.update({f"event_adapter.{k}": v for k, v in encoder.event_adapter.state_dict().items()})
        save_tensors(tmp / "modules.safetensors", {k: v.detach().cpu().contiguous() for k, v in modules.items()})
        if schedule is not None:
            save_tensors(tmp / "schedule.safetensors", schedule.state_dict())
        (tmp / META).write_text(json_text(meta) + "\n", encoding="utf-8")
        tmp.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def read_meta(path: str | Path) -> dict[str, Any]:
    """The folder's metadata; DataError if it is no saved encoder, ConfigError if another format version wrote it."""
    from pluribus.io import read_json

    folder = Path(path)
    if not (folder / META).exists():
        raise DataError(f"not a saved encoder folder (no {META})", path=folder)
    meta = read_json(folder / META)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ConfigError(
            f"{folder} holds format {meta.get('format')!r} version {meta.get('version')!r}; this pluribus reads "
            f"{FORMAT!r} version {VERSION}. Re-export it with the pluribus version that trained it"
        )
    return dict(meta)


def load_encoder(path: str | Path, *, model: str | None = None, mask_check: bool = True,
                 ) -> tuple[UserEncoder, MaskSchedule | None]:
    """(encoder, schedule or None) from a folder written by ``save_encoder``; ``model`` overrides the base model."""
    from peft import set_peft_model_state_dict
    from transformers import AutoTokenizer

    from pluribus.config import config_from_dict
    from pluribus.encoder.backbone import load_backbone
    from pluribus.encoder.config import EncoderConfig, ScheduleConfig
    from pluribus.encoder.model import UserEncoder
    from pluribus.encoder.schedule import MaskSchedule
    from pluribus.io import load_tensors

    folder = Path(path)
    meta = read_meta(folder)
    cfg = config_from_dict(EncoderConfig, meta["encoder"], source=str(folder / META))
    base = str(folder / "backbone") if meta["backbone"] == "merged" else (model or cfg.model)
    cfg = dataclasses.replace(cfg, model=base, mask_check=mask_check)
    backbone, _ = load_backbone(base, attn_implementation=cfg.attn_implementation, dtype=cfg.dtype,
                                cache_dir=cfg.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    check = cfg.mask_check
    encoder = UserEncoder(dataclasses.replace(cfg, mask_check=False), backbone=backbone, tokenizer=tokenizer,
                          extra_tokens=meta["extra_tokens"], event_dim=meta["event_dim"])
    if meta["backbone"] == "adapter":
        adapter = load_tensors(folder / "adapter" / "adapter_model.safetensors")
        unexpected = list(getattr(set_peft_model_state_dict(encoder.backbone, adapter), "unexpected_keys", []))
        if unexpected:
            raise ConfigError(f"adapter tensors {unexpected[:3]} do not fit base model {base!r}")
    modules = load_tensors(folder / "modules.safetensors")
    encoder.head.load_state_dict({k[5:]: v for k, v in modules.items() if k.startswith("head.")})
    if encoder.event_adapter is not None:
        encoder.event_adapter.load_state_dict({k[14:]: v for k, v in modules.items() if k.startswith("event_adapter.")})
    encoder.config = dataclasses.replace(encoder.config, mask_check=check)
    if check:
        encoder.check_mask()
    schedule = None
    if meta.get("schedule") is not None:
        schedule = MaskSchedule(config_from_dict(ScheduleConfig, meta["schedule"], source=str(folder / META)))
        if (folder / "schedule.safetensors").exists():
            schedule.load_state_dict(load_tensors(folder / "schedule.safetensors"))
    return encoder.eval(), schedule


def export_sentence_transformers(encoder: UserEncoder, path: str | Path, *, atol: float = 1e-4) -> Path:
    """Write a sentence-transformers folder giving the encoder's embeddings, or refuse with ConfigError.

    Bidirectional attention is expressed natively by ``config.is_causal = False`` (transformers >= 5 builds a
    bidirectional mask from it); whether a backbone honours it is *measured*: the written folder is loaded back
    and must reproduce the encoder's embeddings (alone and padded in a batch) within ``atol``, else it is removed.
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer

    cfg = encoder.config
    where = f"{encoder.model_class} with attn_implementation={encoder.attn_implementation!r}"
    refuse = {
        cfg.pooling == "user_token": "pooling='user_token' appends a token sentence-transformers does not add",
        encoder.event_dim is not None: "event soft tokens need per-event vectors sentence-transformers cannot pass",
        cfg.chat_template: "chat_template=True wraps inputs in a template sentence-transformers does not apply",
        cfg.inference_mask == "schedule": "a soft (schedule) inference mask has no native transformers form",
        cfg.future_scope == "user_span": "a user-span (prefix-LM) mask has no native transformers form",
    }
    reasons = [why for bad, why in refuse.items() if bad]
    if reasons:
        raise ConfigError(f"cannot export {where} to sentence-transformers: {'; '.join(reasons)}")
    head = [m for m in encoder.head] if isinstance(encoder.head, torch.nn.Sequential) else []
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        peft = hasattr(encoder.backbone, "merge_and_unload")
        backbone = copy.deepcopy(encoder.backbone).merge_and_unload() if peft else copy.deepcopy(encoder.backbone)
        backbone.config.is_causal = cfg.inference_mask == "causal"
        backbone.save_pretrained(tmp / "hf")
        tokenizer = copy.deepcopy(encoder.tokenizer)
        tokenizer.padding_side, tokenizer.truncation_side = "right", "left"  # the encoder keeps the last tokens
        tokenizer.save_pretrained(tmp / "hf")
        modules: list[torch.nn.Module] = [
            Transformer(str(tmp / "hf"), max_seq_length=encoder.max_length,
                        model_kwargs={"attn_implementation": encoder.attn_implementation}),
            Pooling(encoder.hidden_size, pooling_mode="mean" if cfg.pooling == "mean" else "lasttoken"),
        ]
        linears = [m for m in head if isinstance(m, torch.nn.Linear)]
        for i, lin in enumerate(linears):
            act = torch.nn.GELU() if i < len(linears) - 1 else torch.nn.Identity()
            modules.append(Dense(lin.in_features, lin.out_features, activation_function=act,
                                 init_weight=lin.weight.detach().float().clone(),
                                 init_bias=lin.bias.detach().float().clone()))
        modules.append(Normalize())
        SentenceTransformer(modules=modules, device="cpu").save(str(tmp / "st"))
        _check_same_embeddings(encoder, tmp / "st", atol, where)
        if target.exists():
            shutil.rmtree(target)
        (tmp / "st").rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def _check_same_embeddings(encoder: UserEncoder, folder: Path, atol: float, where: str) -> None:
    from sentence_transformers import SentenceTransformer

    from pluribus.encoder.model import _probe_ids

    ids = _probe_ids(encoder.tokenizer, encoder.new_token_ids)
    texts = [encoder.tokenizer.decode(ids[:5]), encoder.tokenizer.decode(ids)]
    st = SentenceTransformer(str(folder), device="cpu")
    theirs = np.concatenate([st.encode(texts[:1]), st.encode(texts)])  # alone, then padded inside a batch
    ours = np.concatenate([encoder.encode(texts[:1], progress=False), encoder.encode(texts, progress=False)])
    gap = float(np.abs(theirs - ours).max())
    if not gap <= atol:
        raise ConfigError(
            f"cannot export {where} to sentence-transformers: with config.is_causal=False the exported model's "
            f"embeddings differ from the encoder's by up to {gap:.3g} (> {atol}); this backbone does not honour "
            "native bidirectional attention. Use save_pretrained (UserEncoder.from_pretrained applies the mask itself)"
        )

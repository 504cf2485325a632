"""A sentence-transformers export of a UserEncoder, checked to give the same embeddings."""

from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from pluribus.errors import ConfigError

if TYPE_CHECKING:
    from pluribus.encoder.model import UserEncoder


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

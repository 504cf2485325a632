"""A sentence-transformers export of a UserEncoder, checked to give the same embeddings where they could differ.

What the export keeps equal to the encoder, and how it is checked:

- the tokens: the exported tokenizer truncates on the left to the encoder's ``max_length``, keeping the special
  tokens it adds (a first BOS) as the encoder's tokenisation does, and pads on the right;
- the text: sentence-transformers 6 wraps inputs in the tokenizer's chat template whenever the tokenizer has one
  (its "message" modality); the export pins the plain text modality, so no template is applied that the encoder
  does not apply;
- the mask: ``config.is_causal = False`` asks transformers for bidirectional attention, which must equal the
  encoder's w = 1 bias.

The written folder is loaded back and must give the encoder's embeddings within ``atol`` on short inputs (alone
and padded in a batch) and on inputs at and beyond ``max_length``; a refusal names what differs (the tokens, or
the attention on the same tokens). Nothing is left behind on refusal, and a target that already holds files is
refused unless ``overwrite``.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pluribus.encoder.saving import refuse_occupied
from pluribus.errors import ConfigError

if TYPE_CHECKING:
    from pluribus.encoder.model import UserEncoder

#: sentence-transformers' modality config for plain text through the model's forward (no chat template)
TEXT_ONLY = {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}


def export_sentence_transformers(encoder: UserEncoder, path: str | Path, *, atol: float = 1e-4,
                                 overwrite: bool = False) -> Path:
    """Write a sentence-transformers folder giving the encoder's embeddings, or refuse with ConfigError.

    Bidirectional attention is expressed natively by ``config.is_causal = False`` (transformers >= 5 builds a
    bidirectional mask from it); the tokenizer truncates on the left and the plain text modality is pinned (no
    chat template). Whether the backbone honours all of it is *measured*: the written folder is loaded back and
    must reproduce the encoder's embeddings within ``atol`` on short and long inputs, else it is removed.

    Args:
        encoder: the trained encoder.
        path: the folder to write.
        atol: the largest difference allowed between the folder's and the encoder's embeddings.
        overwrite: replace an existing folder.

    Raises:
        ConfigError: the folder exists (without ``overwrite``), the encoder cannot be expressed as a
            sentence-transformers model, or the written folder does not reproduce its embeddings.
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer

    cfg = encoder.config
    where = f"{encoder.model_class} with attn_implementation={encoder.attn_implementation!r}"
    refuse = {
        cfg.pooling == "user_token": "pooling='user_token' appends a token sentence-transformers does not add",
        encoder.event_dim is not None: "event soft tokens need per-event vectors sentence-transformers cannot pass",
        cfg.chat_template: "chat_template=True wraps inputs in the chat template, which sentence-transformers would "
                           "apply to the text modality differently (the export pins plain text)",
        cfg.inference_mask == "schedule": "a soft (schedule) inference mask has no native transformers form",
        cfg.future_scope == "user_span": "a user-span (prefix-LM) mask has no native transformers form",
    }
    reasons = [why for bad, why in refuse.items() if bad]
    if reasons:
        raise ConfigError(f"cannot export {where} to sentence-transformers: {'; '.join(reasons)}")
    target = Path(path)
    refuse_occupied(target, "a sentence-transformers export", overwrite=overwrite)
    head = [m for m in encoder.head] if isinstance(encoder.head, torch.nn.Sequential) else []
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
                        model_kwargs={"attn_implementation": encoder.attn_implementation},
                        processor_kwargs={"truncation_side": "left", "padding_side": "right"},
                        modality_config=copy.deepcopy(TEXT_ONLY), module_output_name="token_embeddings"),
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
        check_same_embeddings(encoder, tmp / "st", atol=atol)
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        (tmp / "st").rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def probe_texts(encoder: UserEncoder) -> list[str]:
    """Texts the export check encodes: short ones (5 and 9 tokens) and long ones, at ``max_length`` tokens and
    beyond it (up to twice), so truncation and special tokens are exercised."""
    from pluribus.encoder.model import _probe_ids

    ids = _probe_ids(encoder.tokenizer, encoder.new_token_ids)
    decode = encoder.tokenizer.decode
    texts = [decode(ids[:5]), decode(ids)]
    for n in (encoder.max_length, encoder.max_length + 3, 2 * encoder.max_length):
        texts.append(decode([ids[(k * 5) % len(ids)] for k in range(n)]))
    return texts


def check_same_embeddings(encoder: UserEncoder, folder: str | Path, *, atol: float = 1e-4) -> float:
    """The largest gap between a sentence-transformers folder's embeddings and the encoder's on ``probe_texts``
    (each alone, then all in one padded batch); ConfigError naming the cause when it exceeds ``atol``."""
    from sentence_transformers import SentenceTransformer

    where = f"{encoder.model_class} with attn_implementation={encoder.attn_implementation!r}"
    texts = probe_texts(encoder)
    st = SentenceTransformer(str(folder), device="cpu")
    theirs = np.concatenate([*(st.encode([t]) for t in texts), st.encode(texts)])
    ours = np.concatenate([*(encoder.encode([t], progress=False) for t in texts), encoder.encode(texts, progress=False)])
    gaps = np.abs(theirs - ours).max(axis=1)
    gap = float(gaps.max())
    if gap <= atol:
        return gap
    worst = texts[int(gaps.argmax()) % len(texts)]
    cause = _token_difference(encoder, st, worst)
    if cause is None:
        cause = ("on the same tokens the exported model's attention differs from the encoder's mask: this backbone "
                 f"does not honour config.is_causal={encoder.config.inference_mask == 'causal'} natively")
    raise ConfigError(
        f"cannot export {where} to sentence-transformers: its embeddings differ from the encoder's by up to "
        f"{gap:.3g} (> {atol}): {cause}. Use save_pretrained (UserEncoder.from_pretrained applies the mask itself)"
    )


def _token_difference(encoder: UserEncoder, st: Any, text: str) -> str | None:
    """How the exported model's tokens for ``text`` differ from the encoder's (None when they are the same)."""
    ours = encoder.tokenize([text]).input_ids[0].tolist()
    features = st.preprocess([text]) if hasattr(st, "preprocess") else st.tokenize([text])
    theirs = features["input_ids"][0].tolist()
    if ours == theirs:
        return None
    return (f"the exported model reads other tokens ({len(theirs)} tokens starting {theirs[:6]}, the encoder "
            f"{len(ours)} starting {ours[:6]}; a chat template, truncation side or special tokens differ)")

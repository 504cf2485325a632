"""UserEncoder: a decoder-only LLM read through a soft attention mask, pooled into one user vector.

Inputs are rendered text (optionally with added vocabulary tokens such as U2QT codes) and, optionally,
per-event embeddings injected as soft tokens: each ``<event>`` placeholder token's input embedding is replaced
by an adapter (LayerNorm -> Linear -> GELU -> Linear) of the matching event vector.

Truncation rule: an input longer than ``max_length`` (capped at the model's context) keeps its *last*
tokens (the most recent behaviour and the query); events whose placeholders are cut are dropped too.
A warning is issued once per encoder.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from pluribus.encoder.config import EVENT_TOKEN, USER_TOKEN, EncoderConfig
from pluribus.encoder.masks import (
    BIAS_BACKENDS,
    position_ids_from_mask,
    require_bias_backend,
    soft_attention_bias,
)
from pluribus.encoder.saving import SavedEncoder
from pluribus.errors import ConfigError, DataError, ShapeError

if TYPE_CHECKING:
    from pluribus.encoder.schedule import MaskSchedule

QUERY_PREFIX = "\nQuery: "


@dataclass(frozen=True)
class UserInput:
    """One encoder input: the user's data as text, per-event vectors for each ``<event>`` placeholder (or None),
    and an optional natural-language query rendered after the data (``"\nQuery: ..."``), outside the user span."""

    text: str
    events: np.ndarray | None = None
    query: str | None = None

    def rendered(self) -> str:
        """The text the model reads: the data, then the query if any."""
        return self.text if self.query is None else f"{self.text}{QUERY_PREFIX}{self.query}"


@dataclass
class TokenBatch:
    """Padded token ids ``[B, L]``, their mask, and the event vectors of all kept placeholders ``[N, D]``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    events: torch.Tensor | None = None
    user_span: torch.Tensor | None = None  # [B, L] bool: tokens of the user data (not query, template or pads)

    def to(self, device: torch.device | str) -> TokenBatch:
        """This batch on ``device``."""
        return TokenBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            None if self.events is None else self.events.to(device),
            None if self.user_span is None else self.user_span.to(device),
        )


class UserEncoder(SavedEncoder, nn.Module):
    """Decoder-only LLM -> pooled, projected, L2-normalised user embedding (LoRA or full fine-tuning)."""

    def __init__(
        self,
        config: EncoderConfig | None = None,
        *,
        backbone: Any | None = None,
        tokenizer: Any | None = None,
        extra_tokens: Sequence[str] = (),
        extra_token_vectors: Mapping[str, np.ndarray] | None = None,
        event_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.config = config = config or EncoderConfig()
        if (backbone is None) != (tokenizer is None):
            raise ConfigError("give both backbone and tokenizer, or neither (then config.model is loaded)")
        if backbone is None:
            from pluribus.encoder.backbone import load_backbone

            backbone, tokenizer = load_backbone(
                config.model, attn_implementation=config.attn_implementation, dtype=config.dtype,
                cache_dir=config.cache_dir,
            )
        backbone = getattr(backbone, "base_model", backbone)  # a *ForCausalLM -> its decoder stack
        assert tokenizer is not None
        self.tokenizer: Any = tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        new_tokens = list(dict.fromkeys(extra_tokens))
        if config.pooling == "user_token":
            new_tokens.append(USER_TOKEN)
        if event_dim is not None:
            new_tokens.append(EVENT_TOKEN)
        if new_tokens:
            tokenizer.add_special_tokens({"additional_special_tokens": new_tokens}, replace_extra_special_tokens=False)
            old = backbone.get_input_embeddings().weight.shape[0]
            backbone.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            _init_new_rows(backbone.get_input_embeddings().weight, old)
            if extra_token_vectors:
                _init_rows_from_vectors(backbone.get_input_embeddings().weight, tokenizer, new_tokens, extra_token_vectors)
        self.extra_tokens = tuple(new_tokens)
        self.new_token_ids = [int(tokenizer.convert_tokens_to_ids(t)) for t in new_tokens]
        self.hidden_size = int(backbone.config.hidden_size)
        self.max_length = min(config.max_length, int(getattr(backbone.config, "max_position_embeddings", 10**9)),
                              _sliding_window(backbone.config) or 10**9)
        self.backbone = self._wrap_trainable(backbone)

        layers: list[nn.Module] = []
        width = self.hidden_size
        for i, size in enumerate(config.projection):
            if i:
                layers.append(nn.GELU())
            layers.append(nn.Linear(width, size))
            width = size
        self.head = nn.Sequential(*layers) if layers else nn.Identity()
        self.embedding_dim = width
        self.event_dim = event_dim
        self.event_adapter = (
            nn.Sequential(
                nn.LayerNorm(event_dim), nn.Linear(event_dim, self.hidden_size), nn.GELU(),
                nn.Linear(self.hidden_size, self.hidden_size),
            )
            if event_dim is not None
            else None
        )
        dtype = next(self.backbone.parameters()).dtype
        self.head.to(dtype)
        if self.event_adapter is not None:
            self.event_adapter.to(dtype)
        self._warned_truncation = False
        self.schedule: MaskSchedule | None = None  # set by from_pretrained when the folder holds one
        # the load-time self-check's measurements (None when turned off): reports show its verdict
        self.mask_check_result: dict[str, float] | None = self.check_mask() if config.mask_check else None

    # ---- construction ---------------------------------------------------------------------------
    def _wrap_trainable(self, backbone: Any) -> Any:
        lora = self.config.lora
        if lora.r <= 0:
            return backbone
        from peft import LoraConfig, get_peft_model

        names = {n.rsplit(".", 1)[-1] for n, _ in backbone.named_modules()}
        targets = [t for t in lora.target_modules if t in names]
        if not targets:
            raise ConfigError(
                f"none of the LoRA target modules {list(lora.target_modules)} exist in {type(backbone).__name__}"
            )
        kwargs: dict[str, Any] = {}
        if self.new_token_ids:
            embed_name = _embedding_module_name(backbone)
            kwargs["trainable_token_indices"] = {embed_name: list(self.new_token_ids)}
        peft_config = LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, **kwargs
        )
        return get_peft_model(backbone, peft_config)

    @property
    def attn_implementation(self) -> str:
        """The attention backend the backbone runs with."""
        return str(getattr(self.backbone.config, "_attn_implementation", None) or "eager")

    @property
    def device(self) -> torch.device:
        """Where the parameters live."""
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the backbone."""
        return next(self.backbone.parameters()).dtype

    @property
    def model_class(self) -> str:
        """Class name of the underlying transformers model (under any peft wrapper)."""
        inner = self.backbone.get_base_model() if hasattr(self.backbone, "get_base_model") else self.backbone
        return type(inner).__name__

    def check_mask(self) -> dict[str, float]:
        """Prove the attention mask is in effect on this backbone and backend, or raise ConfigError.

        Probe: perturb the last of a few tokens. Under w = 0 (causal) no earlier state may move, under w = 1
        (every non-causal policy goes through the same additive bias) they must; the same input alone, right-
        and left-padded inside a mixed batch must give the same states. Returns the measured relative changes.
        """
        impl = self.attn_implementation
        where = f"{self.model_class} with attn_implementation={impl!r}"
        if impl not in BIAS_BACKENDS and self.config.inference_mask != "causal":
            raise ConfigError(
                f"{where} cannot take an additive attention bias, so the {self.config.inference_mask!r} inference "
                "mask cannot run; load the model with attn_implementation='sdpa' or 'eager'"
            )
        low_precision = self.dtype in (torch.float16, torch.bfloat16)
        still, moved = (5e-2, 0.2) if low_precision else (1e-4, 1e-3)
        ids = _probe_ids(self.tokenizer, self.new_token_ids)
        base, other, longer = ids[:6], ids[6], ids[:8]
        found: dict[str, float] = {}
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                for weight in (0.0, 1.0) if impl in BIAS_BACKENDS else (0.0,):
                    name = "causal (w = 0)" if weight == 0.0 else "bidirectional (w = 1)"
                    right = self.hidden_states(_rows([base, [*base[:-1], other], longer], left=False), weight)[0]
                    left = self.hidden_states(_rows([base, longer], left=True), weight)[0]
                    alone = self.hidden_states(_rows([base], left=False), weight)[0][0]
                    change = _relative_change(right[0, :5], right[1, :5])
                    padding = max(_relative_change(alone, right[0, :6]), _relative_change(alone, left[0, -6:]))
                    found[f"future_w{weight:g}"], found[f"padding_w{weight:g}"] = change, padding
                    if weight == 0.0 and change > still:
                        raise ConfigError(
                            f"mask self-check failed for {where}: under the {name} mask a later token moved earlier "
                            f"hidden states (relative change {change:.3g}); the causal mask is not in effect"
                        )
                    if weight == 1.0 and change < moved:
                        raise ConfigError(
                            f"mask self-check failed for {where}: under the {name} mask a later token did not move "
                            f"earlier hidden states (relative change {change:.3g}); the model ignores the attention "
                            "bias (it runs causal). Try attn_implementation='eager' or another backbone"
                        )
                    if padding > still:
                        raise ConfigError(
                            f"mask self-check failed for {where}: under the {name} mask padding changed the states of "
                            f"real tokens (relative change {padding:.3g}); the padding mask is not in effect"
                        )
        finally:
            self.train(was_training)
        return found

    def mask_check_summary(self) -> str:
        """One line for reports: the load-time self-check's verdict for this model class and backend."""
        where = f"{self.model_class}, attn_implementation={self.attn_implementation!r}"
        found = self.mask_check_result
        if found is None:
            return f"not run (mask_check = false) for {where}"
        moved = f", a later token moves earlier states by {found['future_w1']:.3g} under w = 1" \
            if "future_w1" in found else ""
        return (f"passed for {where}: causal states unmoved by a later token ({found['future_w0']:.2g}){moved}; "
                f"padding changes real-token states by at most "
                f"{max(v for k, v in found.items() if k.startswith('padding')):.2g}")

    # ---- tokenisation ---------------------------------------------------------------------------
    def tokenize(self, inputs: Sequence[UserInput | str]) -> TokenBatch:
        """Tokenise, truncate (keep the last tokens), right-pad; empty inputs raise DataError."""
        items = [UserInput(x) if isinstance(x, str) else x for x in inputs]
        if not items:
            raise DataError("no users to encode (empty list)")
        texts = []
        for i, item in enumerate(items):
            if not item.text or not item.text.strip():
                raise DataError("empty user input: no behaviour text to encode", row=i, field="text")
            texts.append(self._template(item.rendered()))
        limit = self.max_length - (1 if self.config.pooling == "user_token" else 0)
        spans = self.config.future_scope == "user_span"
        if spans and not getattr(self.tokenizer, "is_fast", False):
            raise ConfigError("encoder.future_scope='user_span' needs a fast tokenizer (character offsets)")
        encoded = self.tokenizer(texts, add_special_tokens=not self.config.chat_template, return_offsets_mapping=spans)
        ids_list: list[list[int]] = encoded["input_ids"]
        span_list = [_span_flags(texts[i], items[i], encoded["offset_mapping"][i]) for i in range(len(items))] if spans \
            else None
        event_id = self.tokenizer.convert_tokens_to_ids(EVENT_TOKEN) if self.event_dim is not None else None
        rows: list[list[int]] = []
        event_rows: list[np.ndarray] = []
        for i, (ids, item) in enumerate(zip(ids_list, items, strict=True)):
            ids = list(ids)
            n_placeholders = ids.count(event_id) if event_id is not None else 0
            if len(ids) > limit:
                if not self._warned_truncation:
                    warnings.warn(
                        f"input {i} has {len(ids)} tokens, more than max_length={self.max_length}; keeping the last "
                        f"{limit} (most recent) tokens. Further truncations are not reported.",
                        stacklevel=3,
                    )
                    self._warned_truncation = True
                ids = ids[-limit:]
                if span_list is not None:
                    span_list[i] = span_list[i][-limit:]
            if self.config.pooling == "user_token":
                ids.append(int(self.tokenizer.convert_tokens_to_ids(USER_TOKEN)))
                if span_list is not None:
                    span_list[i] = [*span_list[i], False]
            if event_id is not None:
                events = _check_events(item.events, n_placeholders, self.event_dim or 0, i)
                kept = ids.count(event_id)
                event_rows.append(events[n_placeholders - kept :])
            elif item.events is not None:
                raise ConfigError(f"input {i} carries event vectors, but the encoder was built without event_dim")
            rows.append(ids)
        length = max(len(r) for r in rows)
        pad = int(self.tokenizer.pad_token_id)
        input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        user_span = torch.zeros((len(rows), length), dtype=torch.bool) if span_list is not None else None
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
            if user_span is not None and span_list is not None:
                user_span[i, : len(r)] = torch.tensor(span_list[i], dtype=torch.bool)
        events_t = None
        if event_id is not None:
            stacked = np.concatenate(event_rows, axis=0) if event_rows else np.zeros((0, self.event_dim or 0))
            events_t = torch.as_tensor(stacked, dtype=torch.float32)
        return TokenBatch(input_ids, mask, events_t, user_span)

    def _template(self, text: str) -> str:
        if not self.config.chat_template:
            return text
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(
                f"encoder.chat_template is on, but the tokenizer of {self.config.model!r} has no chat template; "
                "turn chat_template off (plain text is then encoded as is)"
            )
        out = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False)
        return str(out)

    # ---- forward --------------------------------------------------------------------------------
    def hidden_states(
        self, batch: TokenBatch, future_weight: float | torch.Tensor = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(last hidden states ``[B, L, H]``, position ids) under the given future-key weight."""
        batch = batch.to(self.device)
        positions = position_ids_from_mask(batch.attention_mask)
        embeds = self.backbone.get_input_embeddings()(batch.input_ids)
        if self.event_adapter is not None and batch.events is not None and batch.events.shape[0]:
            slots = batch.input_ids == self.tokenizer.convert_tokens_to_ids(EVENT_TOKEN)
            injected = self.event_adapter(batch.events.to(embeds.dtype))
            embeds = embeds.masked_scatter(slots[..., None], injected)
        plain = None if isinstance(future_weight, torch.Tensor) else float(future_weight)
        span = batch.user_span if self.config.future_scope == "user_span" else None
        if span is not None and plain == 1.0 and bool((span == batch.attention_mask.bool()).all()):
            span = None  # the span is the whole input: plain bidirectional
        if plain == 0.0 and self.attn_implementation not in BIAS_BACKENDS:
            # kernels without an additive bias (FlashAttention): the backbone's own causal + padding mask, the one
            # form they take; the load-time self-check proves it causal
            attention_mask = batch.attention_mask
        else:
            # always the explicit additive bias, never "no mask + is_causal=False": some decoder layers ignore that
            # flag (StableLM on sdpa ran causal), so only the bias is sure to mean what the policy says
            require_bias_backend(self.attn_implementation)
            attention_mask = soft_attention_bias(
                batch.attention_mask, future_weight, position_ids=positions, dtype=embeds.dtype, user_span=span
            )
        out = self.backbone(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions)
        return out.last_hidden_state, positions

    def pool(self, hidden: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
        """Pool ``[B, L, H]`` to ``[B, H]`` (mean over real tokens, last real token, or the user token)."""
        mask = batch.attention_mask.to(hidden.device)
        if self.config.pooling == "mean":
            m = mask.to(hidden.dtype)[..., None]
            return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        if self.config.pooling == "last":
            length = mask.shape[1]
            last = length - 1 - mask.flip(-1).argmax(-1)  # last real index, left- or right-padded
        else:
            uid = self.tokenizer.convert_tokens_to_ids(USER_TOKEN)
            hits = (batch.input_ids.to(hidden.device) == uid).long() * torch.arange(mask.shape[1], device=hidden.device)
            last = hits.argmax(-1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def embed(self, batch: TokenBatch, future_weight: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(L2-normalised embeddings ``[B, D]``, last hidden states) of a token batch."""
        hidden, _ = self.hidden_states(batch, future_weight)
        pooled = self.pool(hidden, batch)
        return nn.functional.normalize(self.head(pooled).float(), dim=-1), hidden

    def forward(self, batch: TokenBatch, future_weight: float | torch.Tensor = 1.0) -> torch.Tensor:
        """L2-normalised embeddings ``[B, D]``."""
        return self.embed(batch, future_weight)[0]

    def inference_weight(self, schedule_weight: float | torch.Tensor | None = None) -> float | torch.Tensor:
        """Future-key weight used by ``encode``: 1 (bidirectional), 0 (causal) or the schedule's."""
        mode = self.config.inference_mask
        if mode == "bidirectional":
            return 1.0
        if mode == "causal":
            return 0.0
        if schedule_weight is None:
            raise ConfigError("inference_mask='schedule' needs the schedule's weights (pass future_weight)")
        return schedule_weight

    @torch.inference_mode()
    def encode(
        self,
        users: Sequence[UserInput | str],
        *,
        batch_size: int | None = None,
        future_weight: float | torch.Tensor | None = None,
        progress: bool = True,
    ) -> np.ndarray:
        """Embeddings ``[N, D]`` (float32, L2-normalised) of users' inputs, in batches with a progress bar."""
        from pluribus.progress import track

        weight = self.inference_weight(future_weight) if future_weight is None else future_weight
        size = batch_size or self.config.batch_size
        was_training = self.training
        self.eval()
        # longest first, so each batch pads little (embeddings do not depend on batch composition)
        order = sorted(range(len(users)), key=lambda i: -len(_text(users[i])))
        starts = range(0, len(users), size)
        if progress and len(starts) > 1:
            starts = track(starts, total=len(starts), description="encoding users")  # type: ignore[assignment]
        out = np.zeros((len(users), self.embedding_dim), dtype=np.float32)
        try:
            for s in starts:
                idx = order[s : s + size]
                out[idx] = self(self.tokenize([users[i] for i in idx]), weight).float().cpu().numpy()
        finally:
            self.train(was_training)
        return out

    # ---- weights --------------------------------------------------------------------------------
    def merge_lora(self) -> UserEncoder:
        """Fold LoRA (and added-token) deltas into the backbone for faster inference; irreversible."""
        if hasattr(self.backbone, "merge_and_unload"):
            self.backbone = self.backbone.merge_and_unload()
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable tensors only (LoRA, added tokens, head, adapter; all of them under full fine-tuning)."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v.detach().cpu().clone() for k, v in self.state_dict().items() if k in names}

    def load_trainable_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load tensors saved by ``trainable_state_dict``; names and shapes must match."""
        own = self.state_dict()
        for k, v in tensors.items():
            if k not in own:
                raise ConfigError(f"checkpoint tensor {k!r} does not belong to this encoder (different config?)")
            if tuple(own[k].shape) != tuple(v.shape):
                raise ShapeError(f"checkpoint tensor {k!r}", tuple(v.shape), str(list(own[k].shape)))
        self.load_state_dict(tensors, strict=False)


def _sliding_window(config: Any) -> int | None:
    """The backbone's sliding attention window, if any layer uses one (inputs are capped at it: inside the
    window, sliding attention equals full attention, so the explicit full-length bias stays exact)."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    types = getattr(config, "layer_types", None)
    if types is not None and "sliding_attention" not in types:
        return None
    return int(window)


def _probe_ids(tokenizer: Any, added: Sequence[int]) -> list[int]:
    """Eight distinct ordinary token ids spread over the vocabulary (no special or added tokens)."""
    skip = set(getattr(tokenizer, "all_special_ids", [])) | set(added)
    pool = [i for i in range(len(tokenizer)) if i not in skip]
    if len(pool) < 8:
        raise ConfigError(f"the tokenizer has {len(pool)} ordinary tokens; the mask self-check needs 8")
    return [pool[(k * len(pool)) // 8] for k in range(8)]


def _rows(rows: Sequence[Sequence[int]], *, left: bool) -> TokenBatch:
    """A padded batch of token id rows (pad id 0: padded keys are blocked, so the id does not matter)."""
    length = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), length), dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(length - len(r), length) if left else slice(0, len(r))
        ids[i, cols] = torch.tensor(list(r), dtype=torch.long)
        mask[i, cols] = 1
    return TokenBatch(ids, mask)


def _relative_change(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest per-token ``|a - b| / |a|`` over tokens ``[L, H]`` (robust to a few huge activations)."""
    diff = (a.float() - b.float()).norm(dim=-1)
    return float((diff / a.float().norm(dim=-1).clamp_min(1e-12)).max())


def _text(item: UserInput | str) -> str:
    return item if isinstance(item, str) else item.text


def _init_new_rows(weight: torch.Tensor, old: int) -> None:
    """Deterministic init of added token rows (mean + seeded noise at the existing scale) for reproducible reloads."""
    if weight.shape[0] <= old:
        return
    with torch.no_grad():
        base = weight[:old].float()
        gen = torch.Generator().manual_seed(0)
        noise = torch.randn(weight.shape[0] - old, weight.shape[1], generator=gen)
        weight[old:] = (base.mean(0) + noise * base.std(0)).to(weight.dtype)


def _span_flags(text: str, item: UserInput, offsets: Sequence[Sequence[int]]) -> list[bool]:
    """Per token: does it cover characters of the user data (``item.text``) inside the final ``text``?"""
    start = text.find(item.rendered())
    if start < 0:
        raise ConfigError("cannot locate the user data inside the templated input (the chat template rewrote it)")
    end = start + len(item.text)
    return [a < end and b > start for a, b in offsets]


def _init_rows_from_vectors(
    weight: torch.Tensor, tokenizer: Any, added: Sequence[str], vectors: Mapping[str, np.ndarray]
) -> None:
    """Added token rows from external vectors (e.g. U2QT code vectors): mean + a fixed random projection.

    A seeded Gaussian projection to the model width keeps the vectors' geometry (nearby codes -> nearby rows);
    it is rescaled so the rows have the existing embeddings' per-dimension spread around their mean.
    """
    names = list(vectors)
    flat = [np.asarray(vectors[n], dtype=np.float32).reshape(-1) for n in names]
    if any(v.shape != flat[0].shape for v in flat):
        odd = next(n for n, v in zip(names, flat, strict=True) if v.shape != flat[0].shape)
        raise ShapeError(f"extra_token_vectors[{odd!r}]", tuple(np.shape(vectors[odd])), f"[{flat[0].shape[0]}]")
    matrix = np.stack(flat)
    if not np.isfinite(matrix).all():
        raise DataError("extra_token_vectors contain NaN or inf", field="extra_token_vectors")
    unknown = [n for n in names if n not in set(added)]
    if unknown:
        raise ConfigError(f"extra_token_vectors name tokens that were not added: {unknown[:3]}")
    ids = tokenizer.convert_tokens_to_ids(names)
    with torch.no_grad():
        base = weight[: min(tokenizer.convert_tokens_to_ids(list(added)))].float()  # the model's own tokens
        gen = torch.Generator().manual_seed(0)
        proj = torch.randn(matrix.shape[1], weight.shape[1], generator=gen) / matrix.shape[1] ** 0.5
        rows = torch.from_numpy(matrix) @ proj
        spread = rows.std(0).clamp_min(1e-8) if rows.shape[0] > 1 else rows.abs().mean().clamp_min(1e-8)
        weight[torch.tensor(ids)] = (base.mean(0) + rows / spread * base.std(0)).to(weight.dtype)


def _embedding_module_name(backbone: Any) -> str:
    emb = backbone.get_input_embeddings()
    for name, module in backbone.named_modules():
        if module is emb:
            return name.rsplit(".", 1)[-1]
    raise ConfigError("cannot find the input embedding module of the backbone")


def _check_events(events: np.ndarray | None, n_placeholders: int, dim: int, row: int) -> np.ndarray:
    if events is None:
        if n_placeholders:
            raise DataError(f"{n_placeholders} {EVENT_TOKEN} placeholders but no event vectors", row=row)
        return np.zeros((0, dim), dtype=np.float32)
    arr = np.asarray(events, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] != dim or arr.shape[0] != n_placeholders:
        raise ShapeError(f"event vectors of input {row}", arr.shape, f"[{n_placeholders}, {dim}] (one per placeholder)")
    return arr

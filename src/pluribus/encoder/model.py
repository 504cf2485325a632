"""UserEncoder: a decoder-only LLM read through a soft attention mask, pooled into one user vector.

Inputs are rendered text (optionally with added vocabulary tokens such as U2QT codes) and, optionally,
per-event embeddings injected as soft tokens: each ``<event>`` placeholder token's input embedding is replaced
by an adapter (LayerNorm -> Linear -> GELU -> Linear) of the matching event vector.

Truncation rule: an input longer than ``max_length`` (capped at the model's context) keeps its *last*
tokens (the most recent behaviour and the query) and the special tokens the tokenizer adds (a first BOS), as the
tokenizer's own left truncation does; events whose placeholders are cut are dropped too.
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
    LayerTypeMasks,
    position_ids_from_mask,
    require_bias_backend,
    soft_attention_bias,
)
from pluribus.encoder.saving import SavedEncoder
from pluribus.errors import ConfigError, DataError, PluribusError, ShapeError

if TYPE_CHECKING:
    from pluribus.encoder.backbone import BackboneLayout
    from pluribus.encoder.schedule import MaskSchedule

QUERY_PREFIX = "\nQuery: "


@dataclass(frozen=True)
class UserInput:
    """One encoder input: the user's data as text, per-event vectors for each ``<event>`` placeholder (or None),
    and an optional natural-language query rendered after the data (``"\\nQuery: ..."``), outside the user span.

    Attributes:
        text: the user's data as text (with one ``<event>`` placeholder per event vector, if any).
        events: ``[n_events, D]`` vectors for the placeholders, or None.
        query: a natural-language query rendered after the data, or None.
    """

    text: str
    events: np.ndarray | None = None
    query: str | None = None

    def rendered(self) -> str:
        """The text the model reads: the data, then the query if any."""
        return self.text if self.query is None else f"{self.text}{QUERY_PREFIX}{self.query}"


@dataclass
class TokenBatch:
    """Padded token ids ``[B, L]``, their mask, and the event vectors of all kept placeholders ``[N, D]``.

    Attributes:
        input_ids: ``[B, L]`` token ids, right-padded.
        attention_mask: ``[B, L]``, 1 for real tokens and 0 for padding.
        events: ``[N, D]`` event vectors of all kept placeholders, or None.
        user_span: ``[B, L]`` True on tokens of the user data (not the query, template or padding), or None.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    events: torch.Tensor | None = None
    user_span: torch.Tensor | None = None  # [B, L] bool: tokens of the user data (not query, template or pads)

    def to(self, device: torch.device | str) -> TokenBatch:
        """This batch on ``device``.

        Args:
            device: the target device.
        """
        return TokenBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            None if self.events is None else self.events.to(device),
            None if self.user_span is None else self.user_span.to(device),
        )


class UserEncoder(SavedEncoder, nn.Module):
    """Decoder-only LLM -> pooled, projected, L2-normalised user embedding (LoRA or full fine-tuning).

    Args:
        config: the encoder's settings (default: ``EncoderConfig()``).
        backbone: an already loaded decoder model (give ``tokenizer`` too), or None to load ``config.model``.
        tokenizer: the backbone's tokenizer, or None.
        extra_tokens: tokens added to the vocabulary (e.g. U2QT code tokens).
        extra_token_vectors: initial embedding vectors of some extra tokens (token -> vector).
        event_dim: the size of per-event vectors placed at ``<event>`` tokens, or None for text only.

    Raises:
        ConfigError: only one of backbone and tokenizer, a backbone or backend the soft masks cannot work with,
            or extra token vectors naming tokens not added.
        DataError: extra token vectors hold NaN or inf.
        ShapeError: extra token vectors of the wrong size.
    """

    layout: BackboneLayout  # the backbone's layer kinds, windows and mask interface

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
        try:
            self._build(config, backbone, tokenizer, extra_tokens, extra_token_vectors, event_dim)
        except PluribusError:
            raise
        except Exception as err:  # a backbone this code cannot drive: one clear line, not a traceback
            impl = getattr(backbone.config, "_attn_implementation", None) or config.attn_implementation
            raise ConfigError(
                f"cannot build an encoder on {type(backbone).__name__} with attn_implementation={impl!r}: "
                f"{type(err).__name__}: {err}"
            ) from None

    def _build(self, config: EncoderConfig, backbone: Any, tokenizer: Any, extra_tokens: Sequence[str],
               extra_token_vectors: Mapping[str, np.ndarray] | None, event_dim: int | None) -> None:
        from pluribus.encoder.backbone import backbone_layout

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
        self.layout = layout = backbone_layout(backbone)
        self.max_length = min(config.max_length, int(getattr(backbone.config, "max_position_embeddings", 10**9)))
        impl = str(getattr(backbone.config, "_attn_implementation", None) or "eager")
        where = f"{layout.model_class} with attn_implementation={impl!r}"
        window = layout.smallest_window
        if window is not None and not layout.takes_layer_masks and set(layout.windows) != {"full_attention"} \
                and self.max_length > window:
            raise ConfigError(
                f"{where} has windowed layers ({layout.describe_windows()}) and takes one mask for all layers, so an "
                f"input of max_length={self.max_length} tokens cannot get each layer's window; set "
                f"encoder.max_length <= {window}"
            )
        if layout.causal_only and config.inference_mask != "causal" and not config.allow_causal_layers:
            raise ConfigError(self._causal_layers_problem(where))
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
        # why later keys cannot be given weight on this backbone (the self-check found the mask not honoured for
        # w > 0 while only causal use was asked for): forwards with w > 0 are then refused with this reason
        self.future_refusal: str | None = None
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

        Probes, on a few ordinary tokens padded with a token whose embedding row is not zero: under w = 0 (causal)
        a later token may not move earlier states; under w = 1 and w = 0.5 it must, and w = 0.5 must differ from
        w = 1 (a backbone that turns the additive bias into a yes/no mask fails here); where the backbone returns
        attention probabilities, the first layer's under w = 0.5 must be the hand reweighting of those under
        w = 1; right padding (the encoder's) must change no real token's state, nor left padding on attention-only
        models; the encoder's causal mask must reproduce the model's own causal forward on an input longer than
        its narrowest window. The w > 0 probes refuse only where a non-causal inference mask is asked for; with a
        causal one their verdict is kept in ``future_refusal`` and forwards with w > 0 are refused. Any failure of
        the backbone under these probes is a ConfigError naming the model class and backend. Returns the measured
        relative changes.

        Raises:
            ConfigError: the backbone or backend does not honour the soft attention mask (see above).
        """
        impl = self.attn_implementation
        where = f"{self.model_class} with attn_implementation={impl!r}"
        if impl not in BIAS_BACKENDS and self.config.inference_mask != "causal":
            raise ConfigError(
                f"{where} cannot take an additive attention bias, so the {self.config.inference_mask!r} inference "
                "mask cannot run; load the model with attn_implementation='sdpa' or 'eager'"
            )
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return self._probe_mask(where)
        except PluribusError:
            raise
        except Exception as err:  # the backbone cannot run the probes (e.g. Bloom's ALiBi on a 4D mask)
            raise ConfigError(
                f"mask self-check failed for {where}: the model cannot run the encoder's attention mask "
                f"({type(err).__name__}: {err})"
            ) from None
        finally:
            self.train(was_training)

    def _probe_mask(self, where: str) -> dict[str, float]:
        impl = self.attn_implementation
        low_precision = self.dtype in (torch.float16, torch.bfloat16)
        still, moved = (5e-2, 0.2) if low_precision else (1e-4, 1e-3)
        ids = _probe_ids(self.tokenizer, self.new_token_ids, self.backbone.get_input_embeddings().weight)
        base, other, longer, pad = ids[:6], ids[6], ids[:8], ids[8]
        found: dict[str, float] = {}
        states: dict[float, torch.Tensor] = {}
        future_problems: list[str] = []
        self.future_refusal = None
        for weight in (0.0, 1.0, 0.5) if impl in BIAS_BACKENDS else (0.0,):
            name = {0.0: "causal (w = 0)", 1.0: "bidirectional (w = 1)", 0.5: "soft (w = 0.5)"}[weight]
            right = self._states(_rows([base, [*base[:-1], other], longer], left=False, pad=pad), weight)[0]
            left = self._states(_rows([base, longer], left=True, pad=pad), weight)[0]
            alone = self._states(_rows([base], left=False, pad=pad), weight)[0][0]
            states[weight] = alone
            change = _relative_change(right[0, :5], right[1, :5])
            padding, padding_left = _relative_change(alone, right[0, :6]), _relative_change(alone, left[0, -6:])
            found[f"future_w{weight:g}"], found[f"padding_w{weight:g}"] = change, padding
            found[f"padding_left_w{weight:g}"] = padding_left
            if weight == 0.0 and change > still:
                raise ConfigError(
                    f"mask self-check failed for {where}: under the {name} mask a later token moved earlier "
                    f"hidden states (relative change {change:.3g}); the causal mask is not in effect"
                )
            if weight > 0.0 and change < moved:
                future_problems.append(
                    f"under the {name} mask a later token did not move earlier hidden states (relative change "
                    f"{change:.3g}): the model ignores the attention bias (it runs causal)"
                )
            if weight == 0.5 and found["future_w1"] >= moved and _relative_change(states[1.0][:5], alone[:5]) < moved:
                future_problems.append(
                    "the soft (w = 0.5) mask gives the same states as w = 1: the model turns the additive bias into "
                    "a yes/no mask, so soft weights are silently binarised"
                )
            # padded keys are blocked whatever w is, so w = 0 and w = 1 prove the padding mask to ``still``; under
            # the fractional probe bf16 sdpa kernels differ by up to 0.12 between batch shapes (SmolLM2, with or
            # without padding), so there only a real leak (> ``moved``) is refused
            limit = still if weight in (0.0, 1.0) else moved
            if padding > limit or (padding_left > limit and not self.layout.causal_only):
                side = "right" if padding > limit else "left"
                raise ConfigError(
                    f"mask self-check failed for {where}: under the {name} mask {side} padding changed the states "
                    f"of real tokens (relative change {max(padding, padding_left):.3g}); the padding mask is not in "
                    "effect"
                )
        if impl in BIAS_BACKENDS and not future_problems:
            gap = self._attention_probability_gap(base)
            if gap is not None:
                found["attention_probs_w0.5"] = gap
                if gap > (5e-2 if low_precision else 1e-3):
                    future_problems.append(
                        f"the first layer's attention probabilities under w = 0.5 differ from the hand reweighting "
                        f"of those under w = 1 (largest log-ratio gap {gap:.3g}): the bias is not applied as given"
                    )
        if future_problems:
            reason = f"mask self-check failed for {where}: {'; '.join(future_problems)}"
            if self.config.inference_mask != "causal":
                raise ConfigError(f"{reason}. Try attn_implementation='eager' or another backbone, or use it only "
                                  "causally (inference_mask='causal' and a causal policy)")
            self.future_refusal = reason
        found["native_causal"] = self._native_causal_gap(ids[:8])
        if found["native_causal"] > still:
            windows = self.layout.describe_windows() or "none"
            raise ConfigError(
                f"mask self-check failed for {where}: the encoder's causal mask does not reproduce the model's own "
                f"causal forward (relative change {found['native_causal']:.3g}; layer kinds "
                f"{sorted(set(self.layout.layer_kinds))}, windows {windows})"
            )
        return found

    def _attention_probability_gap(self, ids: Sequence[int]) -> float | None:
        """Largest ``|log(P_half[i,j] / P_half[i,i]) - log(c_ij P_one[i,j] / P_one[i,i])|`` over the first layer's
        heads and real keys, ``c`` = 0.5 on later keys: the soft mask must reweight exactly what w = 1 attends
        (ratios to the query's own key, so attention sinks and renormalisation cancel). None where the backbone
        returns no attention probabilities (sdpa kernels do not)."""
        if self.attn_implementation != "eager":
            return None
        batch = _rows([ids], left=False, pad=ids[0]).to(self.device)
        positions = position_ids_from_mask(batch.attention_mask)
        embeds = self.backbone.get_input_embeddings()(batch.input_ids)
        probs = {}
        for weight in (1.0, 0.5):
            mask = self._attention_mask(batch, weight, positions, embeds.dtype, None)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = self.backbone(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                    output_attentions=True)
            attentions = getattr(out, "attentions", None)
            if not attentions or attentions[0] is None:
                return None
            probs[weight] = attentions[0].double()
        length = len(ids)
        later = torch.ones(length, length, dtype=torch.bool).triu(1).to(probs[1.0].device)
        diag = torch.arange(length, device=later.device)
        scale = torch.where(later, 0.5, 1.0).double()

        def ratios(p: torch.Tensor) -> torch.Tensor:
            return p.clamp_min(1e-300).log() - p[..., diag, diag].clamp_min(1e-300).log()[..., None]

        return float((ratios(probs[0.5]) - ratios(probs[1.0]) - scale.log()).abs().max())

    def _native_causal_gap(self, ids: Sequence[int]) -> float:
        """Relative change between the encoder's causal (w = 0) states and the backbone's own causal forward, on
        an input longer than the narrowest sliding window or chunk (capped at ``max_length``)."""
        window = self.layout.smallest_window
        length = max(8, min(self.max_length, (window or 4) + 4))
        row = [ids[k % len(ids)] for k in range(length)]
        ours = self._states(_rows([row], left=False, pad=row[0]), 0.0)[0][0]
        tokens = torch.tensor([row], dtype=torch.long, device=self.device)
        theirs = self.backbone(input_ids=tokens, attention_mask=torch.ones_like(tokens)).last_hidden_state[0]
        return _relative_change(theirs, ours)

    def _causal_layers_problem(self, where: str) -> str:
        return (
            f"{where} has layers that cannot attend to later tokens ({', '.join(self.layout.causal_only)}): they "
            f"stay causal whatever the mask says, so the {self.config.inference_mask!r} inference mask (or any "
            "non-causal policy) would not be what was asked. Use inference_mask='causal' with policy 'causal', or "
            "accept it with encoder.allow_causal_layers = true (reports then say so)"
        )

    def future_attention_problem(self) -> str | None:
        """Why this encoder cannot give later tokens weight (None when it can): layers that stay causal (not
        accepted by ``allow_causal_layers``), or the self-check's verdict on w > 0."""
        if self.layout.causal_only and not self.config.allow_causal_layers:
            return self._causal_layers_problem(f"{self.model_class} with attn_implementation={self.attn_implementation!r}")
        return self.future_refusal

    def mask_check_summary(self) -> str:
        """One line for reports: the load-time self-check's verdict for this model class and backend."""
        where = f"{self.model_class}, attn_implementation={self.attn_implementation!r}"
        found = self.mask_check_result
        notes = []
        if self.layout.windows:
            how = "a windowed bias per layer type" if self.layout.takes_layer_masks else "one windowed bias"
            notes.append(f"windowed layers ({self.layout.describe_windows()}) get {how}, inputs are not capped")
        if self.layout.causal_only:
            notes.append(f"layers {', '.join(self.layout.causal_only)} cannot attend to later tokens"
                         + (" (accepted by encoder.allow_causal_layers: they stay causal under every mask)"
                            if self.config.allow_causal_layers else " (causal use only)"))
        tail = "".join(f"; {n}" for n in notes)
        if found is None:
            return f"not run (mask_check = false) for {where}{tail}"
        if self.future_refusal is not None:
            return (f"passed for causal use only for {where}: causal states unmoved by a later token "
                    f"({found['future_w0']:.2g}), equal to the model's own causal forward "
                    f"({found['native_causal']:.2g}); w > 0 refused ({self.future_refusal}){tail}")
        moved = ""
        if "future_w1" in found:
            moved = (f", a later token moves earlier states by {found['future_w1']:.3g} under w = 1 and "
                     f"{found['future_w0.5']:.3g} under w = 0.5")
            moved += (f", first-layer attention under w = 0.5 equals the hand reweighting "
                      f"({found['attention_probs_w0.5']:.2g})" if "attention_probs_w0.5" in found
                      else " (attention probabilities not returned by this backend)")
        padding = max(v for k, v in found.items() if k.startswith("padding_w"))
        left = max(v for k, v in found.items() if k.startswith("padding_left"))
        left_note = f", left padding by {left:.2g} (the encoder pads right)" if left > padding else ""
        return (f"passed for {where}: causal states unmoved by a later token ({found['future_w0']:.2g}) and equal "
                f"to the model's own causal forward ({found['native_causal']:.2g}){moved}; right padding changes "
                f"real-token states by at most {padding:.2g}{left_note}{tail}")

    # ---- tokenisation ---------------------------------------------------------------------------
    def tokenize(self, inputs: Sequence[UserInput | str]) -> TokenBatch:
        """Tokenise, truncate (keep the last tokens and the tokenizer's special tokens), right-pad; empty inputs raise
        DataError.

        Args:
            inputs: one text or :class:`UserInput` per user.

        Raises:
            DataError: no inputs, or an empty one.
            ConfigError: event vectors without ``event_dim``, or a span-limited mask without a fast tokenizer.
        """
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
        specials = not self.config.chat_template
        encoded = self.tokenizer(texts, add_special_tokens=specials, return_offsets_mapping=spans)
        ids_list: list[list[int]] = [list(ids) for ids in encoded["input_ids"]]
        offsets = encoded["offset_mapping"] if spans else None
        full_lengths = [len(ids) for ids in ids_list]
        event_id = self.tokenizer.convert_tokens_to_ids(EVENT_TOKEN) if self.event_dim is not None else None
        placeholders = [ids.count(event_id) if event_id is not None else 0 for ids in ids_list]
        long = [i for i, n in enumerate(full_lengths) if n > limit]
        if long:
            # the tokenizer's own left truncation: it keeps the special tokens it adds (a first BOS) around the
            # last tokens, exactly as a sentence-transformers export of this encoder tokenises
            kept = self._truncated([texts[i] for i in long], limit, specials, spans)
            for k, i in enumerate(long):
                ids_list[i] = list(kept["input_ids"][k])
                if offsets is not None:
                    offsets[i] = kept["offset_mapping"][k]
            if not self._warned_truncation:
                warnings.warn(
                    f"input {long[0]} has {full_lengths[long[0]]} tokens, more than max_length={self.max_length}; "
                    f"keeping the last {limit} tokens (with the tokenizer's special tokens). Further truncations "
                    "are not reported.",
                    stacklevel=3,
                )
                self._warned_truncation = True
        span_list = [_span_flags(texts[i], items[i], offsets[i]) for i in range(len(items))] if offsets is not None \
            else None
        rows: list[list[int]] = []
        event_rows: list[np.ndarray] = []
        for i, (ids, item) in enumerate(zip(ids_list, items, strict=True)):
            n_placeholders = placeholders[i]
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

    def _truncated(self, texts: list[str], limit: int, specials: bool, offsets: bool) -> Any:
        """``texts`` tokenised and cut to their last ``limit`` tokens by the tokenizer (left truncation)."""
        side = self.tokenizer.truncation_side
        self.tokenizer.truncation_side = "left"
        try:
            return self.tokenizer(texts, add_special_tokens=specials, return_offsets_mapping=offsets, truncation=True,
                                  max_length=limit)
        finally:
            self.tokenizer.truncation_side = side

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
        """(last hidden states ``[B, L, H]``, position ids) under the given future-key weight; ConfigError for
        w > 0 where the encoder cannot give later tokens weight (``future_attention_problem``).

        Args:
            batch: the tokenized inputs.
            future_weight: the future keys' attention weight (a number or per-position weights).

        Raises:
            ConfigError: a weight above 0 on a backbone whose mask check refused it.
        """
        if self.future_refusal is not None or (self.layout.causal_only and not self.config.allow_causal_layers):
            opens = bool((future_weight > 0).any()) if isinstance(future_weight, torch.Tensor) else future_weight > 0
            problem = self.future_attention_problem() if opens else None
            if problem is not None:
                raise ConfigError(f"future weight > 0 refused: {problem}")
        return self._states(batch, future_weight)

    def _states(self, batch: TokenBatch, future_weight: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
        attention_mask = self._attention_mask(batch, future_weight, positions, embeds.dtype, span)
        out = self.backbone(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions)
        return out.last_hidden_state, positions

    def _attention_mask(self, batch: TokenBatch, future_weight: float | torch.Tensor, positions: torch.Tensor,
                        dtype: torch.dtype, span: torch.Tensor | None) -> Any:
        """What the backbone takes as ``attention_mask`` for this policy: the explicit additive bias (one per layer
        type where the model takes a dict of masks, so windowed layers keep their window), or the plain padding
        mask on kernels without an additive bias when the policy is causal."""
        if not isinstance(future_weight, torch.Tensor) and float(future_weight) == 0.0 \
                and self.attn_implementation not in BIAS_BACKENDS:
            # kernels without an additive bias (FlashAttention): the backbone's own causal + padding mask, the one
            # form they take; the load-time self-check proves it causal
            return batch.attention_mask
        # always the explicit additive bias, never "no mask + is_causal=False": some decoder layers ignore that
        # flag (StableLM on sdpa ran causal), so only the bias is sure to mean what the policy says
        require_bias_backend(self.attn_implementation)
        if self.layout.takes_layer_masks:
            return LayerTypeMasks(batch.attention_mask, future_weight, windows=self.layout.windows,
                                  position_ids=positions, dtype=dtype, user_span=span)
        shape, size = self.layout.windows.get("full_attention", ("full", 0))  # one window on every layer
        return soft_attention_bias(batch.attention_mask, future_weight, position_ids=positions, dtype=dtype,
                                   user_span=span, window=size if shape == "window" else None)

    def pool(self, hidden: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
        """Pool ``[B, L, H]`` to ``[B, H]`` (mean over real tokens, last real token, or the user token).

        Args:
            hidden: the last hidden states ``[B, L, H]``.
            batch: the tokenized inputs they came from.
        """
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
        """(L2-normalised embeddings ``[B, D]``, last hidden states) of a token batch.

        Args:
            batch: the tokenized inputs.
            future_weight: the future keys' attention weight.
        """
        hidden, _ = self.hidden_states(batch, future_weight)
        pooled = self.pool(hidden, batch)
        return nn.functional.normalize(self.head(pooled).float(), dim=-1), hidden

    def forward(self, batch: TokenBatch, future_weight: float | torch.Tensor = 1.0) -> torch.Tensor:
        """L2-normalised embeddings ``[B, D]``.

        Args:
            batch: the tokenized inputs.
            future_weight: the future keys' attention weight.
        """
        return self.embed(batch, future_weight)[0]

    def inference_weight(self, schedule_weight: float | torch.Tensor | None = None) -> float | torch.Tensor:
        """Future-key weight used by ``encode``: 1 (bidirectional), 0 (causal) or the schedule's.

        Args:
            schedule_weight: the schedule's final weights (needed for ``inference_mask='schedule'``).

        Raises:
            ConfigError: ``inference_mask='schedule'`` without ``schedule_weight``.
        """
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
        """Embeddings ``[N, D]`` (float32, L2-normalised) of users' inputs, in batches with a progress bar.

        Args:
            users: one text or :class:`UserInput` per user.
            batch_size: users per forward pass (default: the config's).
            future_weight: the future keys' weight (default: the config's inference mask).
            progress: show a progress bar.
        """
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
        """Load tensors saved by ``trainable_state_dict``; names and shapes must match.

        Args:
            tensors: name -> tensor, as saved from this encoder's trainable parameters.

        Raises:
            ConfigError: a tensor that does not belong to this encoder.
            ShapeError: a tensor of another shape than the parameter.
        """
        own = self.state_dict()
        for k, v in tensors.items():
            if k not in own:
                raise ConfigError(f"checkpoint tensor {k!r} does not belong to this encoder (different config?)")
            if tuple(own[k].shape) != tuple(v.shape):
                raise ShapeError(f"checkpoint tensor {k!r}", tuple(v.shape), str(list(own[k].shape)))
        self.load_state_dict(tensors, strict=False)


def _probe_ids(tokenizer: Any, added: Sequence[int], embeddings: torch.Tensor | None = None) -> list[int]:
    """Nine distinct ordinary token ids spread over the vocabulary (no special or added tokens), whose input
    embedding rows (when given) are not zero: the ninth pads the probes, so a leak through padding shows."""
    skip = set(getattr(tokenizer, "all_special_ids", [])) | set(added)
    pool = [i for i in range(len(tokenizer)) if i not in skip]
    if embeddings is not None:
        inside = [i for i in pool if i < embeddings.shape[0]]
        norms = embeddings.detach()[inside].float().norm(dim=-1).tolist()
        pool = [i for i, n in zip(inside, norms, strict=True) if n > 0]
    if len(pool) < 9:
        raise ConfigError(f"the tokenizer has {len(pool)} ordinary tokens with non-zero embeddings; the mask "
                          "self-check needs 9")
    return [pool[(k * len(pool)) // 9] for k in range(9)]


def _rows(rows: Sequence[Sequence[int]], *, left: bool, pad: int = 0) -> TokenBatch:
    """A padded batch of token id rows (padded keys are blocked; the probes pad with an ordinary token, so a
    padding mask that is not in effect changes real tokens' states)."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
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

"""Frozen configs of the GGSM user encoder: the model, the attention-mask schedule and training."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from pluribus.errors import ConfigError

MaskPolicy = Literal["causal", "hybrid", "bidirectional", "scheduler", "ggsm"]
Pooling = Literal["mean", "last", "user_token"]
InferenceMask = Literal["bidirectional", "schedule", "causal"]
ImportanceSignal = Literal["hidden", "mask_grad", "embedding_grad"]
IMPORTANCE_SIGNALS = ("hidden", "mask_grad", "embedding_grad")

#: Alias of the packaged SmolLM2-135M-Instruct GGUF (dequantised once, then cached as safetensors).
SMOLLM2_ALIAS = "smollm2-135m"
#: Alias of a tiny randomly initialised decoder (made locally, no weights downloaded): for trying the commands
#: and for fast tests; it has learned nothing.
TINY_RANDOM_ALIAS = "tiny-random"
USER_TOKEN = "<user_emb>"  # appended for pooling="user_token": its hidden state is the embedding
EVENT_TOKEN = "<event>"  # the slot an event soft token (a projected event vector) takes


@dataclass(frozen=True)
class ScheduleConfig:
    """How future-token attention weights evolve during training (see docs/results/encoder.md, "Schedules").

    ``policy``: ``causal`` (w = 0), ``hybrid`` (w = ``hybrid_weight``), ``bidirectional`` (w = 1),
    ``scheduler`` (w = ``scheduler_start`` during warm-up, then linear to 1) or ``ggsm``
    (w = sigmoid(logit(``warmup_start_weight``) + beta * normalised importance) during warm-up, frozen
    as W0, then linear to 1). Steps are optimizer steps.

    ``importance`` (GG-SM): the per-token signal the importance is made of. ``hidden`` (the paper's code): the
    norm of the loss gradient with respect to the anchor's last hidden state at each token; under mean pooling
    it is the same at every token of a user, under last-token pooling non-zero at one token. ``mask_grad``: minus
    the gradient of the loss with respect to each key's future weight (the soft mask weight in the additive
    bias, per user and key; positive where opening that key lowers the loss). ``embedding_grad``: the norm of
    the loss gradient with respect to each input embedding. The last two vary per token under any pooling.

    Attributes:
        policy: ``causal``, ``hybrid``, ``bidirectional``, ``scheduler`` or ``ggsm`` (see above).
        total_steps: the training's optimizer steps (the schedule reaches w = 1 at the end).
        warmup_steps: the warm-up's length T_w in steps; None: ``round(warmup_ratio * total_steps)``.
        warmup_ratio: the warm-up's share of the steps when ``warmup_steps`` is None.
        ema: rho of the importance's exponential moving average over the warm-up (0: the last step's).
        warmup_start_weight: GG-SM's weight before importance (sigma of the logit's offset; 0 = causal warm-up).
        scheduler_start: the ``scheduler`` policy's weight during warm-up (0: from causal; 0.5 isolates the gradient
            term of GG-SM).
        hybrid_weight: the ``hybrid`` policy's future weight.
        reduction: how the importance is reduced over a batch: ``mean`` (independent of batch size) or ``sum``.
        norm: how the importance is normalised before the sigmoid: ``none``, ``zscore`` or ``max``.
        beta: the temperature on the normalised importance.
        capacity: how many positions the importance vector tracks.
        importance: the per-token signal: ``hidden``, ``mask_grad`` or ``embedding_grad`` (see above).

    Raises:
        ConfigError: a value out of range (a step count below 1, a weight or ratio outside [0, 1], an unknown
            signal, a non-finite beta).
    """

    policy: MaskPolicy = "ggsm"
    total_steps: int = 1000
    warmup_steps: int | None = None  # absolute T_w; None -> round(warmup_ratio * total_steps)
    warmup_ratio: float = 0.1
    ema: float = 0.0  # rho of the importance EMA (demo config: 0.0)
    warmup_start_weight: float = 0.5  # sigma(0) = 0.5 as in the demo; 0.0 = causal warm-up
    scheduler_start: float = 0.0  # scheduler-only baseline: 0.0 (from causal) or 0.5 (isolates the gradient term)
    hybrid_weight: float = 0.5
    reduction: Literal["mean", "sum"] = "mean"  # mean: independent of batch size; sum: the demo's batch sum
    norm: Literal["none", "zscore", "max"] = "none"
    beta: float = 1.0  # temperature on the (normalised) importance
    capacity: int = 4096  # positions tracked by the importance vector
    importance: ImportanceSignal = "hidden"  # hidden (faithful) | mask_grad | embedding_grad

    def __post_init__(self) -> None:
        if self.importance not in IMPORTANCE_SIGNALS:
            raise ConfigError(
                f"schedule.importance must be one of {', '.join(IMPORTANCE_SIGNALS)}, got {self.importance!r}"
            )
        if not math.isfinite(self.beta):
            raise ConfigError(f"schedule.beta must be a finite number, got {self.beta}")
        if self.total_steps < 1:
            raise ConfigError(f"schedule.total_steps must be >= 1, got {self.total_steps}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ConfigError(f"schedule.warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps <= self.total_steps:
            raise ConfigError(
                f"schedule.warmup_steps must be in [0, total_steps={self.total_steps}], got {self.warmup_steps}"
            )
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"schedule.ema must be in [0, 1), got {self.ema}")
        for name in ("warmup_start_weight", "scheduler_start", "hybrid_weight"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"schedule.{name} must be in [0, 1], got {value}")
        if self.capacity < 1:
            raise ConfigError(f"schedule.capacity must be >= 1, got {self.capacity}")

    @property
    def warmup(self) -> int:
        """T_w in optimizer steps."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return int(round(self.warmup_ratio * self.total_steps))


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter settings (peft); ``r = 0`` means full fine-tuning of the backbone.

    Attributes:
        r: the LoRA rank (0: no adapter, the whole backbone is trained).
        alpha: the LoRA scaling numerator (scale = alpha / r).
        dropout: dropout on the adapter's input.
        target_modules: the backbone's module names that get adapters.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class EncoderConfig:
    """The user encoder: backbone, attention backend, pooling, projection head and text handling.

    Attributes:
        model: a hub id, a local folder, the packaged SmolLM2 alias (``smollm2-135m``) or ``tiny-random``.
        attn_implementation: ``sdpa`` or ``eager`` (flash attention cannot take a soft mask).
        dtype: the backbone's weights: ``float32``, ``bfloat16`` or ``float16``.
        pooling: ``mean`` over the user's tokens, the ``last`` token, or an appended ``user_token``.
        projection: the projection head's widths (hidden -> 512 -> GELU -> 128 by default; () = no head).
        lora: the LoRA settings.
        max_length: tokens per input; longer inputs keep their most recent (last) tokens.
        chat_template: wrap inputs with the tokenizer's chat template (an error if it has none).
        inference_mask: the mask used by ``encode``: ``bidirectional``, the training ``schedule``'s final weights,
            or ``causal``.
        future_scope: where future-key weights apply: ``all`` future keys, or only inside the ``user_span`` (a
            query's text stays causal: the prefix-LM form of the hybrid mask).
        batch_size: the batch size of ``encode``.
        cache_dir: where the dequantised GGUF copy is cached (default ``~/.cache/pluribus``).
        mask_check: probe the backbone when the encoder is built (see ``UserEncoder.check_mask``); a few tiny
            forward passes.
        allow_causal_layers: accept a non-causal mask on a backbone whose convolutional, recurrent or state-space
            layers cannot attend to later tokens (only its attention layers then see them); off: refused.

    Raises:
        ConfigError: a value out of range or an unknown choice.
    """

    model: str = SMOLLM2_ALIAS  # hub id, local folder, the packaged SmolLM2 alias or tiny-random
    attn_implementation: str = "sdpa"  # sdpa | eager (flash-attention cannot take a soft mask)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    pooling: Pooling = "mean"
    projection: tuple[int, ...] = (512, 128)  # hidden -> 512 -> GELU -> 128; () = no head
    lora: LoraSettings = field(default_factory=LoraSettings)
    max_length: int = 512  # tokens; longer inputs keep their most recent (last) tokens
    chat_template: bool = False  # wrap inputs with the tokenizer's chat template (error if it has none)
    inference_mask: InferenceMask = "bidirectional"
    # where future-key weights apply: "all" future keys, or only "user_span" (keys and queries inside the user
    # data; a UserInput's query text stays causal: the prefix-LM form of the hybrid mask)
    future_scope: Literal["all", "user_span"] = "all"
    batch_size: int = 16  # encode() batch size
    cache_dir: str | None = None  # where the dequantised GGUF copy is cached (default ~/.cache/pluribus)
    # probe the backbone when the encoder is built: a later token must move earlier states under w = 1 and w = 0.5
    # (differently), must not under w = 0, the first layer's attention under w = 0.5 must be the hand reweighting of
    # w = 1's, padding must change nothing, and causal states must equal the model's own causal forward (ConfigError
    # otherwise); a few tiny forward passes
    mask_check: bool = True
    # accept a non-causal mask on a backbone whose convolutional / recurrent / state-space layers cannot attend to
    # later tokens (only its attention layers then see them); off: such a backbone is refused for non-causal use.
    # Reports state when it is on
    allow_causal_layers: bool = False

    def __post_init__(self) -> None:
        if self.attn_implementation not in {"sdpa", "eager"} and not self.attn_implementation.startswith("flash"):
            raise ConfigError(
                f"encoder.attn_implementation must be 'sdpa' or 'eager', got {self.attn_implementation!r}"
            )
        if self.max_length < 2:
            raise ConfigError(f"encoder.max_length must be >= 2, got {self.max_length}")
        if self.future_scope not in ("all", "user_span"):
            raise ConfigError(f"encoder.future_scope must be 'all' or 'user_span', got {self.future_scope!r}")
        if self.batch_size < 1:
            raise ConfigError(f"encoder.batch_size must be >= 1, got {self.batch_size}")
        if any(d < 1 for d in self.projection):
            raise ConfigError(f"encoder.projection sizes must be >= 1, got {list(self.projection)}")


@dataclass(frozen=True)
class TrainConfig:
    """Contrastive training: InfoNCE with in-batch negatives, AdamW, accumulation, checkpoints.

    Attributes:
        steps: optimizer steps.
        batch_size: the micro-batch (in-batch negatives come from it).
        grad_accum: micro-batches per optimizer step.
        lr: AdamW's learning rate.
        weight_decay: AdamW's weight decay.
        clip: the gradient norm clip.
        temperature: InfoNCE's temperature.
        fn_margin: drop negatives scoring above the positive + margin; None keeps all.
        seed: the seed of batching and initialisation.
        checkpoint_every: steps between checkpoints.
        log_every: steps between metric rows.
        lr_warmup_ratio: the share of steps of the linear learning-rate warm-up.
        lr_schedule: after the warm-up, ``cosine`` decay to 0 or ``constant``.
        piece_size: inputs encoded at once inside a micro-batch (the gradient cache: the same gradients as one pass,
            one piece's activations in memory); None: the whole micro-batch in one pass.
        gradient_checkpointing: recompute each decoder layer in the backward pass (a third more compute, a fraction
            of the memory); None: on where the memory estimate without it does not fit the available memory.

    Raises:
        ConfigError: a value out of range (checked here, before any model is loaded).
    """

    steps: int = 200  # optimizer steps
    batch_size: int = 16  # micro-batch
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    clip: float = 1.0
    temperature: float = 0.02
    fn_margin: float | None = 0.1  # drop negatives scoring above the positive + margin; None = keep all
    seed: int = 0
    checkpoint_every: int = 50
    log_every: int = 1
    lr_warmup_ratio: float = 0.1  # linear LR warm-up over this fraction of the steps...
    lr_schedule: Literal["cosine", "constant"] = "cosine"  # ...then cosine decay to 0 (or constant)
    # inputs encoded at once inside a micro-batch (the gradient cache: every piece is embedded without autograd,
    # the loss and its embedding gradient are computed on the whole micro-batch, then each piece is re-run and
    # backpropagated); the same gradients as one pass (exact in-batch negatives) with one piece's activations in
    # memory. None: the whole micro-batch in one pass
    piece_size: int | None = None
    # recompute each decoder layer in the backward pass instead of keeping its activations (transformers'
    # activation checkpointing, proven in effect when training starts): a third more compute by FLOP count, a
    # fraction of the memory (SmolLM2-135M, 512 tokens: 0.21 instead of 1.37 MiB per token). None: on where the
    # memory estimate without it does not fit the available memory (SmolLM2 at the defaults), off where it does
    gradient_checkpointing: bool | None = None

    def __post_init__(self) -> None:
        # checked here, not where torch would trip over them minutes later (AdamW refuses lr < 0 only after the
        # model is loaded and the data encoded); NaN fails every comparison, so each check is written to catch it
        if not 0.0 <= self.lr_warmup_ratio < 1.0:
            raise ConfigError(f"train.lr_warmup_ratio must be in [0, 1), got {self.lr_warmup_ratio}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ConfigError(f"train.lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        if self.steps < 1:
            raise ConfigError(f"train.steps (--steps) must be >= 1, got {self.steps}")
        if self.batch_size < 2:
            raise ConfigError(f"train.batch_size (--batch-size) must be >= 2 (in-batch negatives), got {self.batch_size}")
        if self.grad_accum < 1:
            raise ConfigError(f"train.grad_accum (--grad-accum) must be >= 1, got {self.grad_accum}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"train.lr (--lr) must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"train.temperature must be a finite number > 0, got {self.temperature}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"train.weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not (math.isfinite(self.clip) and self.clip >= 0):
            raise ConfigError(f"train.clip must be a finite number >= 0 (0 = no clipping), got {self.clip}")
        if self.fn_margin is not None and not math.isfinite(self.fn_margin):
            raise ConfigError(f"train.fn_margin must be a finite number (or absent), got {self.fn_margin}")
        if self.checkpoint_every < 1:
            raise ConfigError(f"train.checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.log_every < 1:
            raise ConfigError(f"train.log_every must be >= 1, got {self.log_every}")
        if self.piece_size is not None and self.piece_size < 1:
            raise ConfigError(f"train.piece_size (--piece-size) must be >= 1 (or absent: one pass), got {self.piece_size}")


@dataclass(frozen=True)
class PairsConfig:
    """Which data and how it becomes contrastive pairs (text inputs; codes/events go through the Python API).

    Attributes:
        data: ``movielens-100k``, ``synthetic[:N]``, a data set folder or a ``.jsonl`` file.
        source: the behaviour source; None: chosen from the data (the only source with a held-out future, else
            the only source).
        positive: ``future_events`` (the next K held-out events, learnable from the history), ``future`` (a
            templated summary, near-identical across users) or ``profile`` (the profile row).
        future_events: K of the ``future_events`` positive.
        max_events: the most recent events kept per history.
        query: add a natural-language query after the user's data.
        heldout: the share of users kept out of training for retrieval metrics (0 = train on all).
        split_seed: the seed of the held-out users (independent of the training seed).
        future_last: in data without a held-out future, each user's last this many events are the future.
        future_after: in data without a held-out future, events at or after this time (seconds since the epoch or
            an ISO 8601 date) are the future. Both None: the data's own future, else the last ``future_events``.

    Raises:
        ConfigError: a value out of range, both ``future_last`` and ``future_after``, or an unreadable date.
    """

    data: str = "movielens-100k"  # movielens-100k, synthetic[:N], a data set folder or .jsonl
    # None: chosen from the data (the only source with a held-out future, else the only source)
    source: str | None = None
    # future_events: the next K held-out events, learnable from the history; future: a templated summary
    # (near-identical across users); profile: the profile row
    positive: Literal["future_events", "future", "profile"] = "future_events"
    future_events: int = 3  # K of the future_events positive
    max_events: int = 30
    query: bool = False
    heldout: float = 0.2  # fraction of users kept out of training for retrieval metrics (0 = train on all)
    split_seed: int = 0  # the held-out users depend on this only, not on the training seed
    # Where "the future" begins in data without a held-out future (a user's own file): each user's last
    # ``future_last`` events of the source, or the events at or after ``future_after`` (seconds since the epoch
    # or an ISO 8601 date). Both None: the data's own future, else the last ``future_events`` events.
    future_last: int | None = None
    future_after: str | None = None

    def __post_init__(self) -> None:
        if self.source is not None and not self.source.strip():
            raise ConfigError("pairs.source (--source) must be a source name, got an empty string")
        if self.future_last is not None and self.future_last < 1:
            raise ConfigError(f"pairs.future_last (--future-last) must be >= 1, got {self.future_last}")
        if self.future_last is not None and self.future_after is not None:
            raise ConfigError("give one of pairs.future_last (--future-last) and pairs.future_after (--future-after)")
        if self.future_after is not None:
            future_cutoff(self.future_after)
        if self.max_events < 1:
            raise ConfigError(f"pairs.max_events must be >= 1, got {self.max_events}")
        if self.future_events < 1:
            raise ConfigError(f"pairs.future_events must be >= 1, got {self.future_events}")
        if not 0.0 <= self.heldout < 1.0:
            raise ConfigError(f"pairs.heldout must be in [0, 1), got {self.heldout}")


def future_cutoff(value: str) -> int:
    """Seconds since the epoch of a ``future_after`` value (a number or an ISO 8601 date; no zone = UTC)."""
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            stamp = datetime.fromisoformat(text)
        except ValueError:
            raise ConfigError(f"pairs.future_after (--future-after) must be seconds since the epoch or an ISO 8601 "
                              f"date such as 2024-05-01T12:00:00, got {value!r}") from None
        seconds = (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp()
    if not math.isfinite(seconds):
        raise ConfigError(f"pairs.future_after (--future-after) must be a finite time, got {value!r}")
    return int(seconds)


@dataclass(frozen=True)
class GGSMConfig:
    """Everything a training run needs: data, encoder, schedule and training settings.

    Attributes:
        pairs: the data and how it becomes pairs.
        encoder: the encoder.
        schedule: the attention-mask schedule.
        train: the training settings.
    """

    pairs: PairsConfig = field(default_factory=PairsConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

"""Attention-mask policies as additive biases: pure functions returning ``[B, 1, L, L]`` float tensors.

Convention (transformers >= 5.2, eager and SDPA): a 4D float ``attention_mask`` is *added* to the attention
logits. A bias of 0 keeps a key, ``log w`` re-weights it by ``w`` (``softmax(s + log w)`` = ``w e^s / sum``),
and ``finfo(dtype).min`` blocks it. Never ``-inf``: a fully blocked row would give NaN.

Which key is "future" is decided by token *positions*, not by padded indices, so left and right padding
give the same attention pattern over real tokens. Padded keys are always blocked (unless ``block_padding``
is turned off for parity with the official demo). Past keys and the query's own position keep weight 1.

Windowed layers (sliding-window or chunked attention) get the same policy inside their window: ``window`` blocks
keys at distance ``>= window`` in either direction (the causal part equals transformers' sliding window), ``chunk``
blocks keys in another chunk of positions (transformers' chunked attention, opened to the chunk's later keys).
``LayerTypeMasks`` holds one bias per layer type, the form transformers' hybrid and windowed models accept.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from pluribus.errors import ConfigError, ShapeError, check_shape

#: Weights below this (but above 0) are clamped before the log, as in the reference recipe.
MIN_WEIGHT = 1e-8

BIAS_BACKENDS = ("sdpa", "eager")


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Token positions that ignore padding: 0 at each user's first real token (pads get 0 too).

    Args:
        attention_mask: ``[B, L]``, 1 for real tokens and 0 for padding.
    """
    check_shape("attention_mask", tuple(attention_mask.shape), (None, None))
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def soft_attention_bias(
    attention_mask: torch.Tensor,
    future_weight: float | torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    block_padding: bool = True,
    user_span: torch.Tensor | None = None,
    window: int | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Additive bias ``[B, 1, L, L]`` giving future keys weight ``w`` and past/own keys weight 1.

    ``attention_mask`` is ``[B, L]`` with 1 for real tokens and 0 for padding. ``future_weight`` is a number,
    a vector ``[P]`` indexed by the *key's position* (column-constant, as GG-SM's importance is), or a full
    matrix ``[L, L]`` / ``[B, L, L]`` over padded indices. Weights must lie in [0, 1]. ``user_span`` ``[B, L]``
    (True on user-data tokens) limits the weights to future keys *inside* the span seen from queries inside
    it: every other future key is blocked, so text outside the span (a query, an answer) stays causal.
    ``window`` / ``chunk`` (positions) restrict every query to the keys of its sliding window or chunk.

    Args:
        attention_mask: ``[B, L]``, 1 for real tokens and 0 for padding.
        future_weight: a number, ``[P]`` per key position, or ``[L, L]`` / ``[B, L, L]``, in [0, 1].
        position_ids: ``[B, L]`` positions indexing a ``[P]`` weight (default: from ``attention_mask``).
        dtype: the bias's dtype.
        block_padding: give padded keys weight 0.
        user_span: ``[B, L]``, True on user-data tokens, or None.
        window: a sliding-window length, or None.
        chunk: a chunk length, or None.

    Raises:
        ConfigError: a non-float ``dtype`` or a weight outside [0, 1].
        ShapeError: per-position weights shorter than the positions used.
    """
    check_shape("attention_mask", tuple(attention_mask.shape), (None, None))
    batch, length = attention_mask.shape
    device = attention_mask.device
    if not dtype.is_floating_point:
        raise ConfigError(f"mask dtype must be a floating type, got {dtype}")
    pos = position_ids_from_mask(attention_mask) if position_ids is None else position_ids.to(device)
    check_shape("position_ids", tuple(pos.shape), (batch, length))
    future = pos[:, None, :] > pos[:, :, None]  # [B, Lq, Lk]: key strictly after query
    w = _expand_weights(future_weight, pos, batch, length, device)
    if float(w.detach().min()) < 0.0 or float(w.detach().max()) > 1.0:
        raise ConfigError(f"future weights must lie in [0, 1], got range [{float(w.min()):.4g}, {float(w.max()):.4g}]")
    if user_span is not None:
        check_shape("user_span", tuple(user_span.shape), (batch, length))
        span = user_span.to(device=device, dtype=torch.bool)
        w = w * (span[:, :, None] & span[:, None, :])
    min_value = torch.finfo(dtype).min
    log_w = torch.log(w.clamp_min(MIN_WEIGHT))
    bias = torch.where(future, log_w, torch.zeros_like(log_w))
    blocked = future & (w <= 0.0)
    if block_padding:
        blocked = blocked | ~attention_mask.bool()[:, None, :]
    if window is not None:
        blocked = blocked | ((pos[:, None, :] - pos[:, :, None]).abs() >= window)
    if chunk is not None:
        blocked = blocked | (pos[:, None, :] // chunk != pos[:, :, None] // chunk)
    bias = bias.to(dtype).masked_fill(blocked, min_value)
    return bias[:, None, :, :]


def per_key_weights(future_weight: float | torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The future weight of each (user, key) as a fresh ``[B, L]`` float32 tensor, from a number or a vector
    ``[P]`` indexed by key position; ``w[:, None, :].expand(B, L, L)`` is then the same mask as ``future_weight``.

    Make it ``requires_grad_()`` to read the loss gradient with respect to every key's mask weight (GG-SM's
    ``importance="mask_grad"``): the bias is ``log w`` on future keys, differentiable wherever ``w > 0``.
    """
    check_shape("attention_mask", tuple(attention_mask.shape), (None, None))
    pos = position_ids_from_mask(attention_mask)
    if not isinstance(future_weight, torch.Tensor) or future_weight.ndim == 0:
        return torch.full(tuple(pos.shape), float(future_weight), device=pos.device)
    if future_weight.ndim != 1:
        raise ShapeError("future_weight (per key position)", tuple(future_weight.shape), "a number or [P]")
    needed = int(pos.max()) + 1 if pos.numel() else 0
    if future_weight.shape[0] < needed:
        raise ShapeError("future_weight (per key position)", tuple(future_weight.shape), f"[>= {needed}]")
    return future_weight.detach().to(device=pos.device, dtype=torch.float32)[pos].clone()


#: layer kinds that attend (a key named like this in a per-layer-type mask gets an attention bias)
ATTENTION_LAYER_KINDS = ("full_attention", "attention", "global", "sliding_attention", "local", "chunked_attention")


class LayerTypeMasks(dict[str, torch.Tensor | None]):
    """One mask per layer type, built on first use: what transformers models with ``config.layer_types`` take as
    ``attention_mask`` (a dict keyed by layer type) in place of building their own masks.

    Attention kinds get ``soft_attention_bias`` with their window (``windows[kind]`` = ``("window" | "chunk", n)``,
    absent = full attention); every other kind (convolution, linear attention, SSM) gets what transformers gives
    those layers: the ``[B, L]`` padding mask, or None when nothing is padded.
    """

    def __init__(self, attention_mask: torch.Tensor, future_weight: float | torch.Tensor, *,
                 windows: Mapping[str, tuple[str, int]], **bias_kwargs: object) -> None:
        super().__init__()
        self.attention_mask = attention_mask
        self.future_weight = future_weight
        self.windows = dict(windows)
        self.bias_kwargs = bias_kwargs

    def __missing__(self, kind: str) -> torch.Tensor | None:
        if kind in ATTENTION_LAYER_KINDS or kind in self.windows:
            shape, size = self.windows.get(kind, ("full", 0))
            value: torch.Tensor | None = soft_attention_bias(
                self.attention_mask, self.future_weight, window=size if shape == "window" else None,
                chunk=size if shape == "chunk" else None, **self.bias_kwargs,  # type: ignore[arg-type]
            )
        else:
            value = None if bool(self.attention_mask.bool().all()) else self.attention_mask
        self[kind] = value
        return value


def causal_bias(attention_mask: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Causal policy: future keys blocked (w = 0), padding blocked.

    Args:
        attention_mask: ``[B, L]``, 1 for real tokens and 0 for padding.
        dtype: the bias's dtype.
    """
    return soft_attention_bias(attention_mask, 0.0, dtype=dtype)


def bidirectional_bias(attention_mask: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Bidirectional policy: every real key visible (w = 1), padding blocked.

    Args:
        attention_mask: ``[B, L]``, 1 for real tokens and 0 for padding.
        dtype: the bias's dtype.
    """
    return soft_attention_bias(attention_mask, 1.0, dtype=dtype)


def hybrid_bias(
    attention_mask: torch.Tensor, weight: float | None = None, *, user_span: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Hybrid policy, padding blocked. With ``user_span`` ``[B, L]``: bidirectional over the user-data span
    (future keys inside it at ``weight``, default 1), causal over the text outside it (query, answer). Without:
    the fractional soft-future variant, every future key at ``weight`` (default 0.5).

    Args:
        attention_mask: ``[B, L]``, 1 for real tokens and 0 for padding.
        weight: the future keys' weight (default as above).
        user_span: ``[B, L]``, True on user-data tokens, or None.
        dtype: the bias's dtype.
    """
    if user_span is not None:
        return soft_attention_bias(attention_mask, 1.0 if weight is None else weight, dtype=dtype,
                                   user_span=user_span)
    return soft_attention_bias(attention_mask, 0.5 if weight is None else weight, dtype=dtype)


def require_bias_backend(attn_implementation: str) -> None:
    """Raise ConfigError unless the attention backend adds a 4D float bias (sdpa or eager).

    Args:
        attn_implementation: the transformers attention backend's name.

    Raises:
        ConfigError: the backend ignores an additive float bias (e.g. flash attention).
    """
    if attn_implementation not in BIAS_BACKENDS:
        hint = (
            " FlashAttention kernels take no arbitrary additive bias, so soft (log-weight) masks cannot run on "
            "them; load the model with attn_implementation='sdpa' (or 'eager')."
            if "flash" in attn_implementation
            else " Use 'sdpa' or 'eager'."
        )
        raise ConfigError(
            f"attention backend {attn_implementation!r} cannot apply a soft attention mask.{hint}"
        )


def _expand_weights(
    future_weight: float | torch.Tensor, pos: torch.Tensor, batch: int, length: int, device: torch.device
) -> torch.Tensor:
    if not isinstance(future_weight, torch.Tensor):
        return torch.full((batch, length, length), float(future_weight), device=device)
    w = future_weight.to(device=device, dtype=torch.float32)
    if w.ndim == 0:
        return w.expand(batch, length, length)
    if w.ndim == 1:
        needed = int(pos.max()) + 1 if pos.numel() else 0
        if w.shape[0] < needed:
            raise ShapeError("future_weight (per key position)", tuple(w.shape), f"[>= {needed}] (max position + 1)")
        return w[pos][:, None, :].expand(batch, length, length)
    if w.ndim == 2:
        check_shape("future_weight", tuple(w.shape), (length, length))
        return w.expand(batch, length, length)
    check_shape("future_weight", tuple(w.shape), (batch, length, length))
    return w

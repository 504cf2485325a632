"""Future-token weight schedules: fixed policies, scheduler-only and GG-SM (gradient-guided warm-up).

GG-SM keeps one importance value per *key position* (the paper's ``Delta_ij = g_j 1[j > i]`` is
column-constant, so a vector suffices; the ``1[j > i]`` part is applied by the mask builder). During warm-up
(``t < T_w``) it is updated after each backward pass from a per-token signal (``ScheduleConfig.importance``:
the gradient norms of the last hidden state, as in the paper's code; minus the gradient of each key's mask
weight; or the gradient norms of the input embeddings; the trainer reads them); at ``t = T_w`` the warm-up
weights are frozen as ``W0`` and then opened linearly to 1 at ``t = T``.
This module only computes weights; ``masks.soft_attention_bias`` turns them into a bias.
"""

from __future__ import annotations

import math

import torch

from pluribus.encoder.config import ScheduleConfig
from pluribus.errors import ConfigError, check_shape


def token_importance(
    grad_norms: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    capacity: int,
    *,
    reduction: str = "mean",
    loss_batch_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position importance ``g`` ``[capacity]`` and a mask of positions seen, from ``[B, L]`` per-token
    values (gradient norms, or signed mask-weight gradients).

    ``reduction="sum"`` is the demo's batch sum (it grows with the batch). ``"mean"`` first rescales the
    norms by ``loss_batch_size`` (a batch-mean loss gives each user a 1/B share of the gradient) and then
    averages over the users that have a real token at that position, so it does not scale with batch size.
    """
    check_shape("grad_norms", tuple(grad_norms.shape), (None, None))
    check_shape("attention_mask", tuple(attention_mask.shape), tuple(grad_norms.shape))
    check_shape("position_ids", tuple(position_ids.shape), tuple(grad_norms.shape))
    valid = attention_mask.bool() & (position_ids < capacity)
    norms = grad_norms.detach().float().cpu()
    valid = valid.cpu()
    pos = position_ids.cpu()[valid]
    vals = norms[valid]
    total = torch.zeros(capacity).index_add_(0, pos, vals)
    count = torch.zeros(capacity).index_add_(0, pos, torch.ones_like(vals))
    seen = count > 0
    if reduction == "sum":
        return total, seen
    if reduction != "mean":
        raise ConfigError(f"importance reduction must be 'mean' or 'sum', got {reduction!r}")
    scale = float(loss_batch_size if loss_batch_size is not None else grad_norms.shape[0])
    return torch.where(seen, total * scale / count.clamp_min(1.0), torch.zeros_like(total)), seen


def normalise_importance(g: torch.Tensor, seen: torch.Tensor, norm: str) -> torch.Tensor:
    """``none``, ``zscore`` (over seen positions) or ``max`` (divide by the largest) normalisation."""
    if norm == "none" or not bool(seen.any()):
        return g
    vals = g[seen]
    if norm == "zscore":
        std = vals.std(unbiased=False)
        # a spread at rounding level (e.g. every anchor of equal length, so every position the same
        # importance) is no signal: dividing by it would turn float noise into +-1 at every position
        flat = float(std) <= 1e-6 * max(float(vals.abs().max()), 1e-30)
        out = torch.zeros_like(g) if flat else (g - vals.mean()) / std
    elif norm == "max":
        top = vals.abs().max()
        out = g / top if float(top) > 0 else g
    else:
        raise ConfigError(f"importance norm must be 'none', 'zscore' or 'max', got {norm!r}")
    return torch.where(seen, out, torch.zeros_like(out))


def linear_opening(step: int, warmup: int, total: int, w0: torch.Tensor | float) -> torch.Tensor | float:
    """``(1 - a) W0 + a`` with ``a = (t - T_w) / (T - T_w)`` clipped to [0, 1]; 1 from ``t >= T``."""
    if step >= total:
        alpha = 1.0
    else:
        alpha = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
    return (1.0 - alpha) * w0 + alpha


class MaskSchedule:
    """The weight of future keys at each optimizer step, for one policy (state saved with ``state_dict``).

    Args:
        config: the schedule's settings.
    """

    def __init__(self, config: ScheduleConfig) -> None:
        self.config = config
        self.step = 0
        self.n_updates = 0
        self.importance = torch.zeros(config.capacity)
        self.w0: torch.Tensor | None = None

    # ---- weights --------------------------------------------------------------------------------
    @property
    def in_warmup(self) -> bool:
        """Whether the current step is before T_w."""
        return self.step < self.config.warmup

    def future_weights(self) -> torch.Tensor | float:
        """Weight of future keys now: a number, or a vector indexed by key position (GG-SM).

        Raises:
            ConfigError: an unknown mask policy.
        """
        c = self.config
        if c.policy == "causal":
            return 0.0
        if c.policy == "bidirectional":
            return 1.0
        if c.policy == "hybrid":
            return c.hybrid_weight
        if c.policy == "scheduler":
            return linear_opening(self.step, c.warmup, c.total_steps, c.scheduler_start)
        if c.policy != "ggsm":
            raise ConfigError(f"unknown mask policy {c.policy!r}")
        if self.in_warmup:
            return self.warmup_weights()
        w0 = self.w0 if self.w0 is not None else self.warmup_weights()
        return linear_opening(self.step, c.warmup, c.total_steps, w0)

    def warmup_weights(self) -> torch.Tensor:
        """``sigmoid(logit(start) + beta * I)`` per key position (start 0 stays causal, 1 stays open)."""
        start = self.config.warmup_start_weight
        if start <= 0.0:
            return torch.zeros(self.config.capacity)
        if start >= 1.0:
            return torch.ones(self.config.capacity)
        offset = math.log(start / (1.0 - start))
        return torch.sigmoid(offset + self.config.beta * self.importance)

    def mean_future_weight(self, length: int) -> float:
        """Average weight over all (query, future key) pairs of a sequence of ``length`` tokens.

        Args:
            length: how many positions to average over.
        """
        w = self.future_weights()
        if not isinstance(w, torch.Tensor):
            return float(w)
        n = min(length, w.shape[0])
        if n < 2:
            return float(w[0]) if n else 0.0
        # key position j has j earlier queries
        counts = torch.arange(n, dtype=torch.float32)
        return float((w[:n] * counts).sum() / counts.sum())

    # ---- updates --------------------------------------------------------------------------------
    def wants_gradients(self) -> bool:
        """Whether the trainer should capture the importance signal's gradients at this step."""
        return self.config.policy == "ggsm" and self.in_warmup and 0.0 < self.config.warmup_start_weight < 1.0

    def update_importance(
        self,
        grad_norms: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *,
        loss_batch_size: int | None = None,
    ) -> None:
        """EMA update ``I <- rho I + (1 - rho) norm(g)`` from per-token signal values ``[B, L]`` (warm-up only).

        Args:
            grad_norms: ``[B, L]`` per-token importance signal of this step.
            attention_mask: ``[B, L]``, 1 for real tokens.
            position_ids: ``[B, L]`` positions of the tokens.
            loss_batch_size: the batch size the loss was averaged over (for ``reduction="sum"``).
        """
        if not self.wants_gradients():
            return
        c = self.config
        g, seen = token_importance(
            grad_norms, attention_mask, position_ids, c.capacity, reduction=c.reduction,
            loss_batch_size=loss_batch_size,
        )
        g = normalise_importance(g, seen, c.norm)
        self.importance = c.ema * self.importance + (1.0 - c.ema) * g
        self.n_updates += 1

    def advance(self) -> None:
        """Count one optimizer step; freezes ``W0`` when warm-up ends."""
        self.step += 1
        if self.config.policy == "ggsm" and self.step == self.config.warmup and self.w0 is None:
            self.w0 = self.warmup_weights()

    # ---- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that restore this schedule exactly (safetensors-friendly)."""
        state = {
            "step": torch.tensor([self.step], dtype=torch.int64),
            "n_updates": torch.tensor([self.n_updates], dtype=torch.int64),
            "importance": self.importance.clone(),
        }
        if self.w0 is not None:
            state["w0"] = self.w0.clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from ``state_dict()``; the capacity must match the config.

        Args:
            state: what ``state_dict`` returned.

        Raises:
            ConfigError: a key is missing.
        """
        for key in ("step", "n_updates", "importance"):
            if key not in state:
                raise ConfigError(f"schedule state lacks {key!r}; keys: {sorted(state)}")
        check_shape("schedule importance", tuple(state["importance"].shape), (self.config.capacity,))
        self.step = int(state["step"][0])
        self.n_updates = int(state["n_updates"][0])
        self.importance = state["importance"].float().clone()
        self.w0 = state["w0"].float().clone() if "w0" in state else None

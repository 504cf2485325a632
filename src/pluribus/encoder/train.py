"""Contrastive training of a UserEncoder under a mask schedule: accumulation, checkpoints, exact resume.

Both towers (anchor and positive) are encoded by the same model under the same future-key weights; GG-SM
importance comes from the anchor tower's gradients during warm-up (``ScheduleConfig.importance``: at the last
hidden states, the faithful signal; at each key's mask weight; or at the input embeddings). Micro-batch order is a
function of (seed, epoch), so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from pluribus.encoder.config import ScheduleConfig, TrainConfig
from pluribus.encoder.distributed import (
    average_gradients,
    barrier,
    check_divisible,
    gather_padded,
    gather_with_grad,
    shard,
)
from pluribus.encoder.distributed import world as dist_world
from pluribus.encoder.gradcache import grad_cache_backward, pieces
from pluribus.encoder.loss import batch_diagnostics, info_nce
from pluribus.encoder.masks import per_key_weights
from pluribus.encoder.memory import MemoryEstimate, prepare_training_memory
from pluribus.encoder.model import TokenBatch, UserEncoder
from pluribus.encoder.pairs import PairSet
from pluribus.encoder.schedule import MaskSchedule
from pluribus.errors import ConfigError

CHECKPOINT = "last"


@dataclass
class TrainResult:
    """Per-step losses, diagnostics, learning rates and mean future weights; steps run, non-finite steps skipped.

    Diagnostics (means over the step's micro-batches): ``anchor_cosine`` / ``positive_cosine`` (mean pairwise
    cosine inside a batch; near 1 = collapse), ``advantage`` (positive minus mean negative similarity) and
    ``top1`` (in-batch accuracy). ``chance_loss`` is ln B, the loss of embeddings that tell users apart no better
    than chance; ``collapsed`` is set when the loss ends there while the cosines approach 1.
    """

    losses: list[float] = field(default_factory=list)
    future_weights: list[float] = field(default_factory=list)
    anchor_cosine: list[float] = field(default_factory=list)
    positive_cosine: list[float] = field(default_factory=list)
    advantage: list[float] = field(default_factory=list)
    top1: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    steps: int = 0
    nonfinite_steps: int = 0
    resumed_from: int = 0
    chance_loss: float = 0.0
    collapsed: bool = False
    memory: MemoryEstimate | None = None  # the estimate checked before training

    def diagnostics(self) -> dict[str, list[float]]:
        """The per-step series, by name (for metrics.json)."""
        return {"losses": self.losses, "mean_future_weight": self.future_weights, "anchor_cosine": self.anchor_cosine,
                "positive_cosine": self.positive_cosine, "advantage": self.advantage, "top1": self.top1,
                "lr": self.lrs}

    def tail(self, name: str, fraction: float = 0.1) -> float:
        """Mean of the last ``fraction`` of a per-step series (at least one step)."""
        values = getattr(self, name)
        n = max(1, int(round(fraction * len(values))))
        return float(sum(values[-n:]) / n) if values else float("nan")

    def summary(self) -> str:
        """One paragraph: final loss against chance, the end-of-training diagnostics, and a collapse verdict."""
        loss, chance = self.tail("losses"), self.chance_loss
        text = (
            f"Final loss (mean of the last 10% of steps) {loss:.4f} vs chance ln B = {chance:.4f}; anchor cosine "
            f"{self.tail('anchor_cosine'):.3f}, positive cosine {self.tail('positive_cosine'):.3f}, correct-pair "
            f"advantage {self.tail('advantage'):.4f}, in-batch top-1 {self.tail('top1'):.3f}."
        )
        if self.collapsed:
            return text + (" **Collapsed**: the loss sits at chance while all embeddings point the same way; this "
                           "run did not learn to tell users apart.")
        if loss > 0.95 * chance:
            return text + " The loss did not move clearly below chance: no evidence of learning."
        return text


#: Collapse: the loss within this fraction of ln B while both mean pairwise cosines are at least COLLAPSE_COSINE.
COLLAPSE_LOSS = 0.05
COLLAPSE_COSINE = 0.9


def lr_factor(step: int, config: TrainConfig) -> float:
    """LR multiplier at optimizer step ``step``: linear warm-up, then cosine decay to 0 (or constant)."""
    warm = int(round(config.lr_warmup_ratio * config.steps))
    if step < warm:
        return (step + 1) / (warm + 1)  # never 0: the first step already moves the weights
    if config.lr_schedule == "constant":
        return 1.0
    progress = (step - warm) / max(config.steps - warm, 1)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def micro_batches(n: int, batch_size: int, seed: int, start: int, count: int) -> list[list[int]]:
    """Index lists of micro-batches ``start .. start+count`` of a seeded per-epoch shuffle (last partial dropped)."""
    per_epoch = n // batch_size
    if per_epoch < 1:
        raise ConfigError(f"{n} pairs cannot fill one micro-batch of {batch_size}; lower train.batch_size")
    out: list[list[int]] = []
    cached: dict[int, torch.Tensor] = {}
    for k in range(start, start + count):
        epoch, slot = divmod(k, per_epoch)
        if epoch not in cached:
            gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
            cached[epoch] = torch.randperm(n, generator=gen)
        out.append(cached[epoch][slot * batch_size : (slot + 1) * batch_size].tolist())
    return out


def _refuse_cached_autocast() -> None:
    # autocast's weight-cast cache lives as long as the autocast context: around a whole training loop it keeps
    # serving the first step's low-precision copies of the weights, so the optimizer's updates never reach the
    # forward pass and the loss cannot move (silently)
    active = [d for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
    if active and torch.is_autocast_cache_enabled():
        raise ConfigError(
            f"train_encoder was called inside torch.autocast ({', '.join(active)}) with its weight cache on: the "
            "forward pass would keep using the first step's cast weights. Use torch.autocast(..., "
            "cache_enabled=False) around training"
        )


def embed_with_importance(
    encoder: UserEncoder, batch: TokenBatch, future_weight: float | torch.Tensor, signal: str
) -> tuple[torch.Tensor, Callable[[], torch.Tensor]]:
    """(embeddings ``[B, D]`` of ``batch`` under ``future_weight``, a function returning GG-SM's per-token
    importance ``[B, L]`` once the loss has been backpropagated), for ``ScheduleConfig.importance`` ``signal``.

    ``hidden``: the norm of the gradient at each last hidden state (the paper's code). ``mask_grad``: each key's
    future weight becomes a leaf tensor ``[B, L]`` in the additive bias, and the value is minus its gradient
    (positive: opening the key lowers the loss); the forward pass is the one ``future_weight`` gives.
    ``embedding_grad``: the norm of the gradient at each input embedding (made a leaf where the embeddings are
    frozen, retained where they train).
    """
    if signal == "hidden":
        u, hidden = encoder.embed(batch, future_weight)
        hidden.retain_grad()
        return u, lambda: _grad_of(hidden).norm(dim=-1)
    if signal == "mask_grad":
        keys = per_key_weights(future_weight, batch.attention_mask).requires_grad_(True)
        length = keys.shape[1]
        u, _ = encoder.embed(batch, keys[:, None, :].expand(-1, length, -1))
        return u, lambda: -_grad_of(keys)
    if signal == "embedding_grad":
        captured: list[torch.Tensor] = []

        def keep(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            out = output if output.requires_grad else output.detach().requires_grad_(True)
            out.retain_grad()
            captured.append(out)
            return out

        handle = encoder.backbone.get_input_embeddings().register_forward_hook(keep)
        try:
            u, _ = encoder.embed(batch, future_weight)
        finally:
            handle.remove()
        return u, lambda: _grad_of(captured[0]).norm(dim=-1)
    raise ConfigError(f"schedule.importance must be 'hidden', 'mask_grad' or 'embedding_grad', got {signal!r}")


def _grad_of(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.grad if tensor.grad is not None else torch.zeros_like(tensor)


def train_encoder(
    encoder: UserEncoder,
    pairs: PairSet,
    schedule_config: ScheduleConfig,
    config: TrainConfig,
    *,
    run: Any | None = None,
    progress: bool = True,
    checkpoint_name: str = CHECKPOINT,
    memory_available: int | None = None,
) -> tuple[TrainResult, MaskSchedule]:
    """Train ``encoder`` on ``pairs``; with a RunFolder ``run``, checkpoint and resume from its last checkpoint
    (``checkpoint_name``: several trainings in one run folder each keep their own).

    Inside an initialised process group (``torchrun``), ``config.batch_size`` is the *global* micro-batch: each
    rank encodes its slice, negatives are gathered from all ranks, and only rank 0 writes checkpoints. With
    ``config.piece_size``, each rank encodes its slice in pieces (the gradient cache, ``gradcache.py``). Before the
    first step, gradient checkpointing is set up as configured and the memory estimate is checked against
    ``memory_available`` bytes (default: MemAvailable, capped by ``$PLURIBUS_MEMORY_LIMIT``): ConfigError if it
    cannot fit.

    Args:
        encoder: the encoder to train (in place).
        pairs: the training pairs.
        schedule_config: the attention-mask schedule.
        config: the training settings.
        run: a RunFolder to checkpoint into and resume from, or None.
        progress: show a progress bar.
        checkpoint_name: the checkpoint's name in the run folder.
        memory_available: bytes the run may use (default: see above).

    Raises:
        ConfigError: too few pairs for one micro-batch, no trainable parameters, an unknown importance signal,
            or the memory estimate does not fit.
    """
    from pluribus.progress import track

    _refuse_cached_autocast()
    rank, size = dist_world()
    check_divisible(config.batch_size, size)
    torch.manual_seed(config.seed)
    if schedule_config.total_steps != config.steps and schedule_config.policy in ("scheduler", "ggsm"):
        warnings.warn(
            f"schedule.total_steps={schedule_config.total_steps} differs from train.steps={config.steps}: the mask "
            "will not end fully open when training ends (bidirectional inference then differs from training)",
            stacklevel=2,
        )
    schedule = MaskSchedule(schedule_config)
    params = [p for p in encoder.parameters() if p.requires_grad]
    names = [n for n, p in encoder.named_parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the encoder has no trainable parameters")
    estimate = prepare_training_memory(encoder, config, world_size=size, available=memory_available)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    result = TrainResult(chance_loss=math.log(config.batch_size), memory=estimate)
    if run is not None:
        saved = run.load_checkpoint(checkpoint_name)
        if saved is not None:
            _restore(saved, encoder, optimizer, schedule, names, result)
    encoder.train()
    steps = range(result.steps, config.steps)
    iterator = track(steps, total=len(steps), description="training encoder") if progress and rank == 0 else steps
    for step in iterator:
        batches = micro_batches(len(pairs), config.batch_size, config.seed, step * config.grad_accum, config.grad_accum)
        weight = schedule.future_weights()
        capture = schedule.wants_gradients()
        lr = config.lr * lr_factor(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        diags: list[dict[str, float]] = []
        for global_idx in batches:
            idx = shard(global_idx, rank, size)
            signal = schedule_config.importance if capture else None
            loss_value, diag, found = contrastive_backward(encoder, pairs, idx, weight, config, importance=signal)
            total += loss_value
            diags.append(diag)
            if found:
                # the gather's backward sums the W ranks' identical loss gradients: divide to get this rank's share
                values = gather_padded(_pad_cat([v.float() for v, _ in found]) / size)
                mask = gather_padded(_pad_cat([m for _, m in found]))
                positions = (mask.cumsum(-1) - 1).clamp_min(0)
                schedule.update_importance(values, mask, positions, loss_batch_size=len(global_idx) * config.grad_accum)
        average_gradients(params)
        if math.isfinite(total):
            if config.clip > 0:
                torch.nn.utils.clip_grad_norm_(params, config.clip)
            optimizer.step()
        else:
            result.nonfinite_steps += 1
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(total)
        for key in ("anchor_cosine", "positive_cosine", "advantage", "top1"):
            getattr(result, key).append(sum(d[key] for d in diags) / len(diags))
        result.lrs.append(lr)
        result.future_weights.append(schedule.mean_future_weight(64))
        schedule.advance()
        result.steps = step + 1
        if run is not None and rank == 0 and (result.steps % config.checkpoint_every == 0 or result.steps == config.steps):
            _save(run, encoder, optimizer, schedule, names, result, checkpoint_name)
    result.collapsed = _collapsed(result)
    if result.collapsed:
        warnings.warn(f"encoder training collapsed: {result.summary()}", stacklevel=2)
    barrier()
    return result, schedule


def contrastive_backward(
    encoder: UserEncoder, pairs: PairSet, idx: list[int], weight: float | torch.Tensor, config: TrainConfig,
    *, importance: str | None = None,
) -> tuple[float, dict[str, float], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Accumulate into ``.grad`` the InfoNCE gradient (divided by ``grad_accum``) of the pairs ``idx`` (this rank's
    slice of a micro-batch; negatives gathered from every rank), in one pass or, with ``config.piece_size``, in
    pieces through the gradient cache (the same gradients within float rounding). Returns (the loss, the batch
    diagnostics, and with an ``importance`` signal the anchor tower's per-token importance ``[b, L]`` with its
    attention mask, per piece)."""
    groups = pieces(idx, config.piece_size)
    towers = [[encoder.tokenize([texts[i] for i in group]) for group in groups]
              for texts in (pairs.anchors, pairs.positives)]
    found: list[tuple[torch.Tensor, torch.Tensor]] = []
    readers: list[Callable[[], torch.Tensor]] = []
    gathered: list[torch.Tensor] = []

    def loss_of(embeddings: list[torch.Tensor]) -> torch.Tensor:
        gathered[:] = [gather_with_grad(e) for e in embeddings]
        return info_nce(*gathered, temperature=config.temperature, fn_margin=config.fn_margin) / config.grad_accum

    def embed(tower: int, batch: TokenBatch) -> torch.Tensor:
        if importance is not None and tower == 0 and torch.is_grad_enabled():
            u, read = embed_with_importance(encoder, batch, weight, importance)
            readers[:] = [read]
            return u
        return encoder.embed(batch, weight)[0]

    def keep_importance(tower: int, k: int) -> None:
        if importance is not None and tower == 0:
            found.append((readers[0]().detach(), towers[0][k].attention_mask))

    if config.piece_size is None:
        (anchors,), (positives,) = towers
        loss = loss_of([embed(0, anchors), embed(1, positives)])
        loss.backward()
        keep_importance(0, 0)
    else:
        loss, _ = grad_cache_backward(towers, embed, loss_of, after_piece=keep_importance)
    return float(loss.detach()), batch_diagnostics(*gathered), found


def _pad_cat(rows: list[torch.Tensor]) -> torch.Tensor:
    """``[b_k, L_k]`` tensors right-padded with zeros to the longest L, stacked along the rows."""
    length = max(r.shape[1] for r in rows)
    return torch.cat([torch.nn.functional.pad(r, (0, length - r.shape[1])) for r in rows], dim=0)


def _collapsed(result: TrainResult) -> bool:
    if not result.losses:
        return False
    near_chance = abs(result.tail("losses") - result.chance_loss) <= COLLAPSE_LOSS * result.chance_loss
    same = min(result.tail("anchor_cosine"), result.tail("positive_cosine")) >= COLLAPSE_COSINE
    return near_chance and same


def _save(run: Any, encoder: UserEncoder, optimizer: torch.optim.Optimizer, schedule: MaskSchedule,
          names: list[str], result: TrainResult, name: str = CHECKPOINT) -> None:
    tensors = {f"model.{k}": v for k, v in encoder.trainable_state_dict().items()}
    tensors.update({f"schedule.{k}": v for k, v in schedule.state_dict().items()})
    for i, p in enumerate(optimizer.param_groups[0]["params"]):
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{names[i]}.{key}"] = value.reshape(value.shape or (1,))
    meta = {
        "step": result.steps, "losses": result.losses, "future_weights": result.future_weights,
        "nonfinite_steps": result.nonfinite_steps, "anchor_cosine": result.anchor_cosine,
        "positive_cosine": result.positive_cosine, "advantage": result.advantage, "top1": result.top1,
        "lrs": result.lrs,
    }
    run.save_checkpoint(name, tensors, meta)


def _restore(saved: tuple[dict[str, torch.Tensor], dict[str, Any]], encoder: UserEncoder,
             optimizer: torch.optim.Optimizer, schedule: MaskSchedule, names: list[str], result: TrainResult) -> None:
    tensors, meta = saved
    encoder.load_trainable_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    schedule.load_state_dict({k[9:]: v for k, v in tensors.items() if k.startswith("schedule.")})
    params = optimizer.param_groups[0]["params"]
    for i, p in enumerate(params):
        state = {}
        for key in ("step", "exp_avg", "exp_avg_sq"):
            t = tensors.get(f"optim.{names[i]}.{key}")
            if t is not None:
                state[key] = t.reshape(()) if key == "step" else t.to(p.device)
        if state:
            optimizer.state[p] = state
    result.steps = int(meta["step"])
    result.resumed_from = result.steps
    result.losses = list(meta.get("losses", []))
    result.future_weights = list(meta.get("future_weights", []))
    result.nonfinite_steps = int(meta.get("nonfinite_steps", 0))
    for key in ("anchor_cosine", "positive_cosine", "advantage", "top1", "lrs"):
        setattr(result, key, list(meta.get(key, [])))


def load_encoder_run(path: Any, *, merge: bool = True) -> tuple[UserEncoder, Any, MaskSchedule]:
    """(trained encoder, LoRA merged unless ``merge=False``, its GGSMConfig, its schedule) from a run folder.

    Args:
        path: the run folder.
        merge: merge LoRA weights into the backbone.

    Raises:
        DataError: not an encoder run folder, or no finished checkpoint.
    """
    from pathlib import Path

    from pluribus.config import load_config
    from pluribus.encoder.config import GGSMConfig
    from pluribus.errors import DataError
    from pluribus.runs import RunFolder

    folder = Path(path)
    if not (folder / "config.toml").exists():
        raise DataError("not an encoder run folder (no config.toml)", path=folder)
    cfg = load_config(GGSMConfig, folder / "config.toml")
    saved = RunFolder(folder).load_checkpoint(CHECKPOINT)
    if saved is None:
        raise DataError("run has no finished checkpoint", path=folder / "checkpoints", expected=f"{CHECKPOINT}.json")
    tensors, _ = saved
    encoder = UserEncoder(cfg.encoder)
    encoder.load_trainable_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    schedule = MaskSchedule(cfg.schedule)
    schedule.load_state_dict({k[9:]: v for k, v in tensors.items() if k.startswith("schedule.")})
    encoder.schedule = schedule
    if merge:
        encoder.merge_lora()
    return encoder.eval(), cfg, schedule

"""Training loop of the multi-view RQ-VAE: k-means init, AdamW, periodic dead-code respawn at all levels.

The loop reads its users through a ``TrainData`` (``InMemoryData`` for tensors; the Parquet stream of
``pluribus.tokenizer.stream`` for folders larger than memory), can start from a fitted model (``warm_start``),
and can hand its full state to a callback after every epoch and resume from it (``TrainState``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from pluribus.errors import DataError
from pluribus.progress import track
from pluribus.tokenizer.rqvae import MultiViewRQVAE

KMEANS_SAMPLE = 8192
RESPAWN_SAMPLE = 4096


class TrainData(Protocol):
    """Where training reads users from: ``x [S, B, D]`` and ``present [S, B]`` blocks."""

    @property
    def n_users(self) -> int:
        """Number of training users."""
        ...

    def standardizer_rows(self) -> tuple[Tensor, Tensor]:
        """The rows the input centring and scaling are fitted on."""
        ...

    def sample(self, cap: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """At most ``cap`` users drawn with ``generator`` (k-means init and dead-code respawn)."""
        ...

    def epoch_batches(self, batch: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        """One epoch of shuffled batches of at most ``batch`` users."""
        ...


@dataclass
class InMemoryData:
    """Training users held as tensors ``x [S, U, D]`` and ``present [S, U]``."""

    x: Tensor
    present: Tensor

    @property
    def n_users(self) -> int:
        """Number of training users."""
        return int(self.x.shape[1])

    def standardizer_rows(self) -> tuple[Tensor, Tensor]:
        """Every user."""
        return self.x, self.present

    def sample(self, cap: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """All users when there are at most ``cap``, else a random ``cap`` of them."""
        idx = _sample(self.n_users, cap, generator)
        return self.x[:, idx], self.present[:, idx]

    def epoch_batches(self, batch: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        """A random permutation of the users cut into batches."""
        order = torch.randperm(self.n_users, generator=generator)
        for start in range(0, self.n_users, batch):
            idx = order[start : start + batch]
            yield self.x[:, idx], self.present[:, idx]


@dataclass
class TrainState:
    """Everything needed to continue training after ``epoch`` finished epochs, bit for bit."""

    epoch: int
    step: int
    history: list[dict[str, float]]
    tensors: dict[str, Tensor] = field(default_factory=dict)

    def meta(self) -> dict[str, Any]:
        """The JSON part (epoch, step, history)."""
        return {"epoch": self.epoch, "step": self.step, "history": self.history}

    @classmethod
    def from_parts(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> TrainState:
        """Rebuild from a checkpoint's tensors and JSON metadata."""
        try:
            return cls(int(meta["epoch"]), int(meta["step"]), list(meta["history"]), dict(tensors))
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"tokenizer checkpoint metadata lacks {err}", expected="epoch, step and history") from None


def train_rqvae(
    model: MultiViewRQVAE,
    x: Tensor | None = None,
    present: Tensor | None = None,
    *,
    data: TrainData | None = None,
    progress: bool = True,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    warm_start: bool = False,
    anchor: MultiViewRQVAE | None = None,
    decoder_only: bool = False,
    validation: tuple[Tensor, Tensor] | None = None,
    resume: TrainState | None = None,
    checkpoint: Callable[[TrainState], None] | None = None,
) -> list[dict[str, float]]:
    """Fit ``model`` on raw inputs ``x [S, U, D]`` with mask ``present [S, U]`` (or on ``data``); per-epoch losses.

    ``warm_start``: the model already holds fitted weights (input scaling, codebooks): keep them, skip the
    k-means initialisation, and train from there. ``checkpoint`` receives the full state after every epoch;
    ``resume`` continues from such a state (same config and data), giving the same model as an uninterrupted run.
    ``anchor`` (a frozen earlier model) adds ``config.anchor_weight`` x the mean squared distance between the
    model's latents and the anchor's, which keeps codes stable across a warm refit.
    ``decoder_only`` (with ``warm_start``): the input scaling, encoder and codebooks stay as they are (no
    gradient, no EMA update, no respawn), so every input keeps its codes; only the decoder trains. With
    ``validation`` (held-out ``x`` and ``present``), the decoder kept at the end is the one, among the starting
    decoder and every epoch's, with the lowest reconstruction loss on it (``validation_recon`` in the history).
    """
    if data is None:
        if x is None or present is None:
            raise TypeError("train_rqvae needs x and present, or data")
        data = InMemoryData(x, present)
    cfg = model.config
    generator = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    n_users = data.n_users
    if decoder_only and not warm_start:
        raise ValueError("decoder_only trains the decoder of a fitted model: pass warm_start=True")
    if validation is not None and not decoder_only:
        raise ValueError("validation selects the best decoder of a decoder_only refit")
    if resume is None and not warm_start:
        model.fit_standardizer(*data.standardizer_rows())
        if cfg.kmeans_init:
            model.eval()
            xs, ps = data.sample(KMEANS_SAMPLE, generator)
            with torch.no_grad():
                z = model.encode_latent(xs)
            model.quantizer.init_kmeans(z, ps, iters=cfg.kmeans_iters, generator=generator)
    trained = model.decoder if decoder_only else model
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    batch = min(cfg.batch_size, n_users)
    steps_per_epoch = max(1, math.ceil(n_users / batch))
    total_steps = cfg.epochs * steps_per_epoch
    respawn_stop = int(cfg.respawn_until * total_steps)
    history: list[dict[str, float]] = []
    step = 0
    first_epoch = 0
    model.quantizer.reset_usage()
    best: dict[str, Tensor] = {}
    if validation is not None:
        best = {"loss": torch.tensor(_validation_recon(model, validation)), **_decoder_copy(model)}
    if resume is not None:
        _restore(resume, model, optimizer, generator)
        history, step, first_epoch = list(resume.history), resume.step, resume.epoch
        if validation is not None:
            best = {k.removeprefix("best."): v for k, v in resume.tensors.items() if k.startswith("best.")}
    epochs: Any = range(first_epoch, cfg.epochs)
    if progress:
        epochs = track(epochs, total=cfg.epochs - first_epoch, description="training tokenizer")
    for epoch in epochs:
        model.train()
        if decoder_only:  # eval mode: no EMA codebook update, no usage counts, no encoder dropout
            model.encoder.eval()
            model.quantizer.eval()
        sums = {"loss": 0.0, "recon": 0.0, "vq": 0.0}
        for xb, pb in data.epoch_batches(batch, generator):
            out = model(xb, pb, sinkhorn=cfg.sinkhorn_last_level)
            loss = out.loss
            if anchor is not None and cfg.anchor_weight > 0:
                with torch.no_grad():
                    z_old = anchor.encode_latent(xb)
                weight = pb.to(z_old.dtype)
                drift = (((out.latent - z_old) ** 2).mean(-1) * weight).sum() / weight.sum().clamp_min(1.0)
                loss = loss + cfg.anchor_weight * drift
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            sums["loss"] += loss.item()
            sums["recon"] += out.recon_loss.item()
            sums["vq"] += out.vq_loss.item()
            if step % cfg.respawn_every == 0 and not decoder_only:
                if step <= respawn_stop:
                    _respawn(model, data, generator)
                model.quantizer.reset_usage()
        record = {k: v / steps_per_epoch for k, v in sums.items()}
        if validation is not None:
            record["validation_recon"] = _validation_recon(model, validation)
            if record["validation_recon"] < float(best["loss"]):
                best = {"loss": torch.tensor(record["validation_recon"]), **_decoder_copy(model)}
        history.append(record)
        if on_epoch is not None:
            on_epoch(epoch, record)
        if checkpoint is not None:
            state = _capture(epoch + 1, step, history, model, optimizer, generator)
            state.tensors.update({f"best.{k}": v for k, v in best.items()})
            checkpoint(state)
    if validation is not None:
        model.decoder.load_state_dict({k.removeprefix("decoder."): v for k, v in best.items() if k != "loss"})
    model.eval()
    return history


def _decoder_copy(model: MultiViewRQVAE) -> dict[str, Tensor]:
    return {f"decoder.{k}": v.detach().clone() for k, v in model.decoder.state_dict().items()}


@torch.no_grad()
def _validation_recon(model: MultiViewRQVAE, validation: tuple[Tensor, Tensor]) -> float:
    """Reconstruction loss on held-out users (eval mode; the training mode is restored by the epoch loop)."""
    model.eval()
    return float(model(*validation).recon_loss)


def _capture(
    epoch: int, step: int, history: list[dict[str, float]], model: MultiViewRQVAE,
    optimizer: torch.optim.Optimizer, generator: torch.Generator,
) -> TrainState:
    tensors = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for spec in model.quantizer.levels:
        tensors[f"usage.{spec.index}"] = model.quantizer.usage(spec.index).clone()
    for i, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"optim.{i}.{key}"] = torch.as_tensor(value).clone()
    tensors["rng.generator"] = generator.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    return TrainState(epoch, step, [dict(h) for h in history], tensors)


def _restore(state: TrainState, model: MultiViewRQVAE, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> None:
    t = state.tensors
    model_state = {k.removeprefix("model."): v for k, v in t.items() if k.startswith("model.")}
    expected = model.state_dict()
    bad = sorted(set(expected) ^ set(model_state)) or [k for k in expected if expected[k].shape != model_state[k].shape]
    if bad:
        raise DataError(f"tokenizer checkpoint does not match this config (tensor {bad[0]!r})",
                        expected="a checkpoint written by the same config")
    model.load_state_dict(model_state)
    for spec in model.quantizer.levels:
        model.quantizer.usage(spec.index).copy_(t[f"usage.{spec.index}"])
    opt_state: dict[int, dict[str, Tensor]] = {}
    for key, value in t.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            opt_state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": optimizer.state_dict()["param_groups"]})
    generator.set_state(t["rng.generator"])
    torch.set_rng_state(t["rng.torch"])


@torch.no_grad()
def _respawn(model: MultiViewRQVAE, data: TrainData, generator: torch.Generator) -> dict[int, int]:
    xs, ps = data.sample(RESPAWN_SAMPLE, generator)
    model.eval()
    out = model(xs, ps, keep_residuals=True)
    model.train()
    return model.quantizer.respawn_dead(out.residuals, ps, generator=generator)


def _sample(n: int, cap: int, generator: torch.Generator) -> Tensor:
    if n <= cap:
        return torch.arange(n)
    return torch.randperm(n, generator=generator)[:cap]

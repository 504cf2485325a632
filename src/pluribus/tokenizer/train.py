"""Training loop of the multi-view RQ-VAE: k-means init, AdamW, periodic dead-code respawn at all levels."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from pluribus.progress import track
from pluribus.tokenizer.rqvae import MultiViewRQVAE


def train_rqvae(
    model: MultiViewRQVAE,
    x: Tensor,
    present: Tensor,
    *,
    progress: bool = True,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Fit ``model`` on raw inputs ``x [S, U, D]`` with mask ``present [S, U]``; returns per-epoch losses."""
    cfg = model.config
    generator = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    n_users = x.shape[1]
    model.fit_standardizer(x, present)
    if cfg.kmeans_init:
        model.eval()
        with torch.no_grad():
            sample = _sample(n_users, 8192, generator)
            z = model.encode_latent(x[:, sample])
        model.quantizer.init_kmeans(z, present[:, sample], iters=cfg.kmeans_iters, generator=generator)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    batch = min(cfg.batch_size, n_users)
    steps_per_epoch = max(1, math.ceil(n_users / batch))
    total_steps = cfg.epochs * steps_per_epoch
    respawn_stop = int(cfg.respawn_until * total_steps)
    history: list[dict[str, float]] = []
    step = 0
    epochs: Any = range(cfg.epochs)
    if progress:
        epochs = track(epochs, total=cfg.epochs, description="training tokenizer")
    model.quantizer.reset_usage()
    for epoch in epochs:
        model.train()
        order = torch.randperm(n_users, generator=generator)
        sums = {"loss": 0.0, "recon": 0.0, "vq": 0.0}
        for start in range(0, n_users, batch):
            idx = order[start : start + batch]
            out = model(x[:, idx], present[:, idx], sinkhorn=cfg.sinkhorn_last_level)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            step += 1
            sums["loss"] += out.loss.item()
            sums["recon"] += out.recon_loss.item()
            sums["vq"] += out.vq_loss.item()
            if step % cfg.respawn_every == 0:
                if step <= respawn_stop:
                    _respawn(model, x, present, generator)
                model.quantizer.reset_usage()
        record = {k: v / steps_per_epoch for k, v in sums.items()}
        history.append(record)
        if on_epoch is not None:
            on_epoch(epoch, record)
    model.eval()
    return history


@torch.no_grad()
def _respawn(model: MultiViewRQVAE, x: Tensor, present: Tensor, generator: torch.Generator) -> dict[int, int]:
    sample = _sample(x.shape[1], 4096, generator)
    model.eval()
    out = model(x[:, sample], present[:, sample], keep_residuals=True)
    model.train()
    return model.quantizer.respawn_dead(out.residuals, present[:, sample], generator=generator)


def _sample(n: int, cap: int, generator: torch.Generator) -> Tensor:
    if n <= cap:
        return torch.arange(n)
    return torch.randperm(n, generator=generator)[:cap]

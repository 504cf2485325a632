"""RQ-KMeans backend: residual k-means on the standardised inputs, behind the same codes, files and API as the RQ-VAE.

RQ-KMeans is the semantic-ID tokenizer most of the field uses: no learned encoder, each level a k-means of the
residual the previous levels leave. Here it is the multi-view quantiser of ``rqvae.py`` with an identity encoder
and decoder (the latent is the standardised input, zero-padded to the widest source), so every layout works
unchanged and the estimator, vocabulary, metrics, streaming and file format need nothing of their own:

- a **specific** level (``n_specific``; or ``n_shared=0`` for per-source RQ-KMeans) is a k-means of each source's
  own residuals;
- a **shared** level (``n_shared``) is one k-means of the pooled residuals of every source, so a shared code is one
  centroid (one token id) whichever source falls on it. This only makes sense where the sources live in one space
  (text embedded by one model); for sources of different kinds (a tabular profile beside text) use ``n_shared=0``.

``kmeans_balanced`` replaces the nearest-centroid step of Lloyd's iterations by a capacity-constrained assignment
(every code takes at most ``ceil(n / k)`` of the ``n`` training rows; ``balanced_assign``), the balanced k-means
semantic-ID tokenizers use against a few huge codes. Encoding always assigns the nearest code (it must not depend
on which users are encoded together), so code usage on new users is close to, not exactly, balanced.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from pluribus.progress import track
from pluribus.tokenizer.config import TokenizerConfig
from pluribus.tokenizer.rqvae import (
    MultiViewRQVAE,
    argmin_last,
    kmeans,
    lloyd_steps,
    nearest_code,
)

if TYPE_CHECKING:
    from pluribus.tokenizer.train import TrainData

#: Users the codebooks are fitted on (a random sample above this; streamed folders are read once for it).
FIT_SAMPLE = 65_536


class ResidualKMeans(MultiViewRQVAE):
    """The multi-view residual quantiser on standardised inputs: identity encoder and decoder, no trained weights.

    Its state is the input scaling and the codebooks (``[rows, widest input]`` per level); ``config`` is the
    tokenizer's with ``latent_dim`` set to the widest input.
    """

    def __init__(self, config: TokenizerConfig, in_dims: list[int]) -> None:
        inner = dataclasses.replace(config, latent_dim=max(in_dims), hidden_dims=(), dropout=0.0,
                                    codebook_update="loss")
        super().__init__(inner, in_dims)
        self.encoder = nn.Identity()  # type: ignore[assignment]  # the latent is the standardised input
        self.decoder = nn.Identity()  # type: ignore[assignment]
        for table in self.quantizer.codebooks:
            table.requires_grad_(False)


def balanced_assign(dist: Tensor) -> Tensor:
    """Capacity-constrained assignment of rows to codes for distances ``dist [n, k]``: each code takes at most
    ``ceil(n / k)`` rows. In rounds, every unassigned row proposes to its nearest code that still has room, and each
    code keeps its closest proposals up to its room (at most k + 1 rounds)."""
    n, k = dist.shape
    room = torch.full((k,), math.ceil(n / k), dtype=torch.long)
    assign = torch.full((n,), -1, dtype=torch.long)
    d = dist.clone()
    while True:
        waiting = (assign < 0).nonzero().squeeze(1)
        if waiting.numel() == 0:
            return assign
        d[:, room == 0] = float("inf")
        rows = d[waiting]
        choice = argmin_last(rows)
        value = rows.gather(1, choice[:, None]).squeeze(1)
        order = torch.argsort(value, stable=True)  # closest first, then grouped by code (stable)
        order = order[torch.argsort(choice[order], stable=True)]
        code = choice[order]
        first = torch.searchsorted(code, code, right=False)  # where each code's block of proposals starts
        rank = torch.arange(len(code)) - first
        accept = rank < room[code]
        assign[waiting[order[accept]]] = code[accept]
        room -= torch.bincount(code[accept], minlength=k)


def lloyd(x: Tensor, centres: Tensor, *, iters: int, balanced: bool, generator: torch.Generator) -> Tensor:
    """``iters`` Lloyd iterations from ``centres`` on rows ``x [n, d]`` (empty codes re-drawn from the rows)."""
    if x.shape[0] == 0:
        return centres
    return lloyd_steps(x, centres, iters=iters, assign=balanced_assign if balanced else argmin_last,
                       generator=generator)


@torch.no_grad()
def fit_residual_kmeans(
    model: ResidualKMeans, data: TrainData, *, warm_start: bool = False, progress: bool = True,
) -> list[dict[str, float]]:
    """Fit the input scaling, then every level's codebooks by k-means of the residual the earlier levels leave.

    ``warm_start``: the model holds a fitted tokenizer's scaling and codebooks; keep the scaling and start Lloyd's
    iterations from its codebooks (k-means++ otherwise). Returns one record per level: the mean squared residual per
    input dimension (standardised space) of the fitted users after that level (``loss`` = ``recon``; ``vq`` = 0).
    """
    cfg = model.config
    generator = torch.Generator().manual_seed(cfg.seed)
    if not warm_start:
        model.fit_standardizer(*data.standardizer_rows())
    x, present = data.sample(FIT_SAMPLE, generator)
    r = model.standardize(x)
    widths = torch.tensor(model.in_dims, dtype=r.dtype)[:, None]
    weight = present.to(r.dtype)
    quantizer = model.quantizer
    history: list[dict[str, float]] = []
    levels = quantizer.levels
    for spec in track(levels, total=len(levels), description="fitting RQ-KMeans") if progress else levels:
        table = quantizer.codebooks[spec.index]
        for group in spec.groups:
            pool = torch.cat([r[s][present[s]] for s in group.sources])
            start, stop = group.rows
            seeds = table.data[start:stop] if warm_start else kmeans(pool, stop - start, iters=0, generator=generator)
            table.data[start:stop] = lloyd(pool, seeds.clone(), iters=cfg.kmeans_iters, balanced=cfg.kmeans_balanced,
                                           generator=generator)
        code = nearest_code(r, quantizer.candidates(spec.index))
        rows = code if spec.kind == "shared" else quantizer.allowed(spec.index).gather(1, code)
        r = r - table.data[rows]
        mse = float((((r * r).sum(-1) / widths) * weight).sum() / weight.sum().clamp_min(1.0))
        history.append({"loss": mse, "recon": mse, "vq": 0.0, "level": float(spec.index)})
    model.eval()
    return history

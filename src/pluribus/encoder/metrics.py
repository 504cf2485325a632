"""Held-out retrieval (is each user's true positive the closest among all held-out users' positives?) and the
collapse check of a set of embeddings (zero-norm, non-finite or near-identical)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from pluribus.errors import ShapeError

if TYPE_CHECKING:
    import torch

    from pluribus.encoder.model import UserEncoder
    from pluribus.encoder.pairs import PairSet


def retrieval_metrics(anchors: np.ndarray, positives: np.ndarray, ks: Sequence[int] = (1, 10)) -> dict[str, float]:
    """Recall@k and MRR of row i's positive among all N positives, by cosine similarity of ``[N, D]`` arrays.

    Ties count against the true positive (its rank is 1 + the number of *other* positives scoring at least as
    high), so collapsed embeddings (all equal) score Recall@k = 0 instead of a perfect 1.

    Args:
        anchors: ``[N, D]``.
        positives: ``[N, D]``; row i is anchor i's positive.
        ks: the cut-offs of Recall@k.

    Raises:
        ShapeError: the two arrays do not match.
    """
    a = np.asarray(anchors, dtype=np.float64)
    p = np.asarray(positives, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 2:
        raise ShapeError("retrieval anchors", a.shape, "[N >= 2, D]")
    if p.shape != a.shape:
        raise ShapeError("retrieval positives", p.shape, f"{list(a.shape)} (same as anchors)")
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    p = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
    sim = a @ p.T
    true = np.diag(sim)[:, None]
    rank = 1 + (sim >= true).sum(axis=1) - 1  # minus the true positive itself
    out = {f"recall@{k}": float((rank <= k).mean()) for k in ks}
    out["mrr"] = float((1.0 / rank).mean())
    out["users"] = float(a.shape[0])
    return out


def heldout_retrieval(
    encoder: UserEncoder,
    pairs: PairSet,
    *,
    future_weight: float | torch.Tensor | None = None,
    batch_size: int | None = None,
    ks: Sequence[int] = (1, 10),
    progress: bool = False,
) -> dict[str, float]:
    """Encode the pairs' anchors and positives (the encoder's inference mask) and score ``retrieval_metrics``.

    Args:
        encoder: the encoder.
        pairs: the held-out pairs.
        future_weight: the future keys' weight (default: the encoder's inference mask).
        batch_size: the encoding batch size (default: the encoder's).
        ks: the cut-offs of Recall@k.
        progress: show a progress bar.
    """
    anchors = encoder.encode(pairs.anchors, batch_size=batch_size, future_weight=future_weight, progress=progress)
    positives = encoder.encode(pairs.positives, batch_size=batch_size, future_weight=future_weight, progress=progress)
    return retrieval_metrics(anchors, positives, ks)


#: an embedding whose norm is below this is "zero" (the encoder's outputs are unit vectors; F.normalize maps a
#: zero vector to zero, so a dead head or backbone shows as norm 0)
ZERO_NORM = 1e-6
#: users are "near-identical" when the mean pairwise cosine of their embeddings reaches this
IDENTICAL_COSINE = 0.999


def embedding_collapse(embeddings: np.ndarray) -> str | None:
    """Why a set of user embeddings ``[N, D]`` is collapsed, or None: non-finite values, zero-norm rows, or rows
    that are (nearly) all the same direction (mean pairwise cosine >= ``IDENTICAL_COSINE``)."""
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ShapeError("embeddings", x.shape, "[N >= 1, D]")
    n = x.shape[0]
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        return f"{int((~finite).sum())} of {n} embeddings hold NaN or inf"
    norms = np.linalg.norm(x, axis=1)
    zero = norms < ZERO_NORM
    if zero.any():
        return f"{int(zero.sum())} of {n} embeddings have norm 0 (the encoder outputs nothing for them)"
    if n < 2:
        return None
    unit = x / norms[:, None]
    total = unit.sum(axis=0)
    mean_cosine = float((total @ total - n) / (n * (n - 1)))  # mean over pairs i != j of cos(x_i, x_j)
    if mean_cosine >= IDENTICAL_COSINE:
        return f"the {n} embeddings are near-identical (mean pairwise cosine {mean_cosine:.4f})"
    return None

"""InfoNCE over in-batch negatives with temperature and false-negative masking by margin."""

from __future__ import annotations

import torch

from pluribus.errors import ShapeError, check_shape


def info_nce(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    *,
    temperature: float = 0.02,
    fn_margin: float | None = 0.1,
) -> torch.Tensor:
    """Mean InfoNCE of anchors ``[B, D]`` vs positives ``[B, D]`` (cosine similarity, in-batch negatives).

    A negative ``j`` of anchor ``i`` is dropped when ``s(i, j) > s(i, i) + fn_margin`` (a likely false
    negative, e.g. two users with the same future behaviour); ``fn_margin=None`` keeps every negative.

    Args:
        anchors: ``[B, D]`` embeddings.
        positives: ``[B, D]`` embeddings; row i is anchor i's positive.
        temperature: the softmax temperature.
        fn_margin: the false-negative margin, or None to keep every negative.

    Raises:
        ShapeError: the two are not matching ``[B, D]`` tensors.
    """
    check_shape("anchors", tuple(anchors.shape), (None, None))
    if tuple(positives.shape) != tuple(anchors.shape):
        raise ShapeError("positives", tuple(positives.shape), f"{list(anchors.shape)} (same as anchors)")
    a = torch.nn.functional.normalize(anchors.float(), dim=-1)
    p = torch.nn.functional.normalize(positives.float(), dim=-1)
    sim = a @ p.T
    logits = sim / temperature
    if fn_margin is not None:
        diag = sim.diagonal()[:, None]
        false_neg = (sim > diag + fn_margin) & ~torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
        logits = logits.masked_fill(false_neg, torch.finfo(logits.dtype).min)
    target = torch.arange(sim.shape[0], device=sim.device)
    return torch.nn.functional.cross_entropy(logits, target)


def batch_diagnostics(anchors: torch.Tensor, positives: torch.Tensor) -> dict[str, float]:
    """Collapse and learning signals of one batch ``[B, D]``: mean pairwise cosine of anchors and of positives
    (1 = every embedding the same vector), correct-pair advantage (positive similarity minus mean negative
    similarity) and in-batch top-1 accuracy (the anchor's most similar positive is its own).

    Args:
        anchors: ``[B, D]`` embeddings.
        positives: ``[B, D]`` embeddings; row i is anchor i's positive.

    Raises:
        ShapeError: the two are not matching ``[B, D]`` tensors.
    """
    check_shape("anchors", tuple(anchors.shape), (None, None))
    if tuple(positives.shape) != tuple(anchors.shape):
        raise ShapeError("positives", tuple(positives.shape), f"{list(anchors.shape)} (same as anchors)")
    with torch.no_grad():
        a = torch.nn.functional.normalize(anchors.detach().float(), dim=-1)
        p = torch.nn.functional.normalize(positives.detach().float(), dim=-1)
        n = a.shape[0]
        off = ~torch.eye(n, dtype=torch.bool, device=a.device)
        sim = a @ p.T
        return {
            "anchor_cosine": float((a @ a.T)[off].mean()),
            "positive_cosine": float((p @ p.T)[off].mean()),
            "advantage": float(sim.diagonal().mean() - sim[off].mean()),
            "top1": float((sim.argmax(dim=1) == torch.arange(n, device=a.device)).float().mean()),
        }

"""Contrastive steps at a large batch in small pieces with exact in-batch negatives: the gradient cache.

Gao et al. 2021 ("Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"): (1) embed every
piece of every tower without autograd, (2) compute the loss on the full batch of embeddings and its gradient with
respect to those embeddings, (3) re-run each piece with autograd and backpropagate its slice of that gradient. The
parameter gradients equal those of one step on the whole batch (up to float rounding), while only one piece's
activations are alive at a time. Each piece's random state is recorded in (1) and restored in (3), so dropout draws
the same masks both times.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

Piece = TypeVar("Piece")


def pieces(indices: Sequence[int], size: int | None) -> list[list[int]]:
    """``indices`` cut into consecutive pieces of at most ``size`` (``None``: one piece)."""
    items = list(indices)
    if size is None or size >= len(items):
        return [items]
    return [items[i : i + size] for i in range(0, len(items), size)]


def grad_cache_backward(
    towers: Sequence[Sequence[Piece]],
    embed: Callable[[int, Piece], torch.Tensor],
    loss_fn: Callable[[list[torch.Tensor]], torch.Tensor],
    *,
    after_piece: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Accumulate into ``.grad`` the gradient of ``loss_fn`` over whole towers, one piece at a time.

    ``towers[t]`` are the pieces of tower ``t`` (e.g. anchors, positives); ``embed(t, piece)`` returns the
    ``[rows, D]`` embeddings of a piece (it runs twice per piece: without and with autograd); ``loss_fn`` takes
    each tower's concatenated embeddings. ``after_piece(t, k)`` runs right after piece ``k`` of tower ``t`` is
    backpropagated (e.g. to read gradients retained on its intermediate tensors). Returns (the detached loss, each
    tower's detached embeddings).
    """
    states: list[list[tuple[torch.Tensor, list[torch.Tensor]]]] = []
    cached: list[torch.Tensor] = []
    with torch.no_grad():
        for t, tower in enumerate(towers):
            states.append([])
            parts = []
            for piece in tower:
                states[t].append(_rng_state())
                parts.append(embed(t, piece).detach())
            cached.append(torch.cat(parts, dim=0))
    leaves = [c.clone().requires_grad_(True) for c in cached]
    with torch.enable_grad():
        loss = loss_fn(leaves)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    for t, tower in enumerate(towers):
        grad = grads[t] if grads[t] is not None else torch.zeros_like(leaves[t])
        offset = 0
        for k, piece in enumerate(tower):
            resume = _rng_state()
            _set_rng_state(states[t][k])
            out = embed(t, piece)
            _set_rng_state(resume)
            rows = out.shape[0]
            out.backward(grad[offset : offset + rows].to(out.dtype))
            offset += rows
            if after_piece is not None:
                after_piece(t, k)
    return loss.detach(), cached


def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The CPU generator's state and, where CUDA is in use, every device's."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor]]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda:
        torch.cuda.set_rng_state_all(cuda)

"""Server-side aggregation of per-client general-model gradients: matrix [N, P] in, vector [P] out.

The core is GPAggregation (FedBone's "gradient projection" aggregation): each client gradient is rescaled by
attention to the previous aggregate, then every row is PCGrad-projected against the rows it conflicts with, and
the projected rows are combined.

Everything runs in *coefficient space*: one Gram matrix ``G = M Mᵀ`` ([N, N], one pass over P in float64-accumulated chunks) holds every
inner product PCGrad needs, because a projected row is always a linear combination ``c_i @ M`` of the original
rows. The projection then costs O(N³) scalar work on an N×N matrix (float64 NumPy on the CPU, as torchjd also
moves it), vectorised over the N rows (one array op per position of the random order), and the output is a
single matrix-vector product ``(a @ C ⊙ w) @ M``. No Python loop ever touches a P-sized vector.

Semantics match torchjd's ``PCGrad`` (random order per row, projection against the *original* rows, sum
combination) when ``combine="sum"``, ``attention="none"`` and the same permutations are used.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pluribus.errors import ConfigError, ShapeError
from pluribus.federated.core.config import AggregationConfig

AggregatorFn = Callable[[torch.Tensor], torch.Tensor]

_TORCHJD_METHODS = {"torchjd_pcgrad": "PCGrad", "mgda": "MGDA", "upgrad": "UPGrad", "cagrad": "CAGrad"}


@dataclass(frozen=True)
class AggregationStats:
    """What one aggregation did: conflicts seen, weights used, norms before and after.

    Attributes:
        num_clients: the clients aggregated.
        conflict_fraction: the share of client pairs whose gradients have a negative cosine.
        mean_cosine: the mean cosine over client pairs.
        attention_weights: the weight of each client's gradient.
        mean_norm_before: the mean of the client gradients' norms.
        norm_of_mean_before: the norm of their plain mean.
        norm_after: the aggregate's norm (after clipping).
        clipped: whether ``clip_norm`` clipped the aggregate.
        pair_cosines: the cosine of every client pair (i < j, row-major).
        client_norms: each client's gradient norm (before any balance or attention).
        change_vs_mean: ||aggregate - plain mean|| / ||plain mean||: how much attention, balance and projection
            moved the update.
        cosine_vs_mean: the cosine between the aggregate and the plain mean.
    """

    num_clients: int
    conflict_fraction: float
    mean_cosine: float
    attention_weights: tuple[float, ...]
    mean_norm_before: float
    norm_of_mean_before: float
    norm_after: float
    clipped: bool
    #: cosine of every client pair (i < j, row-major): the distribution, not just the share below zero
    pair_cosines: tuple[float, ...] = ()
    #: each client's gradient norm (before any balance or attention)
    client_norms: tuple[float, ...] = ()
    #: ‖aggregate − plain mean‖ / ‖plain mean‖: how much attention, balance and projection moved the update
    change_vs_mean: float = float("nan")
    #: cosine between the aggregate and the plain mean of the client gradients
    cosine_vs_mean: float = float("nan")

    def as_dict(self) -> dict[str, Any]:
        """Plain-dict view for metrics files."""
        return {
            "pair_cosines": list(self.pair_cosines),
            "client_norms": list(self.client_norms),
            "change_vs_mean": self.change_vs_mean,
            "cosine_vs_mean": self.cosine_vs_mean,
            "num_clients": self.num_clients,
            "conflict_fraction": self.conflict_fraction,
            "mean_cosine": self.mean_cosine,
            "attention_weights": list(self.attention_weights),
            "mean_norm_before": self.mean_norm_before,
            "norm_of_mean_before": self.norm_of_mean_before,
            "norm_after": self.norm_after,
            "clipped": self.clipped,
        }


def _check_matrix(matrix: torch.Tensor) -> None:
    if matrix.dim() != 2 or matrix.shape[0] == 0:
        raise ShapeError("gradient matrix", tuple(matrix.shape), "[N>=1, P]")


def random_orders(num_rows: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """One random permutation of range(N) per row, drawn like torchjd's PCGrad (one randperm per row)."""
    return torch.stack([torch.randperm(num_rows, generator=generator) for _ in range(num_rows)])


def fixed_orders(num_rows: int) -> torch.Tensor:
    """The identity order 0..N-1 for every row (the reimplementation's fixed order)."""
    return torch.arange(num_rows).expand(num_rows, num_rows).clone()


def _np64(t: torch.Tensor | np.ndarray) -> np.ndarray:
    # the N×N phase runs in float64 NumPy on the CPU (tiny arrays: far less per-op overhead than torch)
    return t.detach().to("cpu", torch.float64).numpy() if isinstance(t, torch.Tensor) else np.asarray(t, np.float64)


def _chunk_columns(num_rows: int) -> int:
    # about 4 MiB of float32 per chunk: the chunk's rows stay in cache for its small matmul
    return int(min(65_536, max(4_096, (1 << 20) // max(num_rows, 1))))


def gram_matrix(matrix: torch.Tensor, with_vector: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """``M Mᵀ`` (and ``M v`` when ``with_vector`` is given) in one pass over P, accumulated in float64.

    A single float32 matmul over millions of columns accumulates rounding error (measured here: with N=4 rows
    of P=10M its squared norms were off by 0.2%); summing float32 matmuls over column chunks of at most 64K
    into float64 keeps the error at the chunk level (1e-6 there) and is as fast or faster, because each chunk
    stays in cache. The optional vector rides along in the same pass (history attention needs ``M h``).
    """
    n, p = matrix.shape
    step = _chunk_columns(n)
    gram = torch.zeros(n, n, dtype=torch.float64, device=matrix.device)
    cross = None if with_vector is None else torch.zeros(n, dtype=torch.float64, device=matrix.device)
    for start in range(0, p, step):
        block = matrix[:, start:start + step]
        gram += block @ block.T
        if cross is not None and with_vector is not None:
            cross += block @ with_vector[start:start + step].to(matrix.dtype)
    return _np64(gram), None if cross is None else _np64(cross)


def _pcgrad_np(gram: np.ndarray, orders: np.ndarray, eps: float) -> np.ndarray:
    n = gram.shape[-1]
    coef = np.broadcast_to(np.eye(n), gram.shape).copy()
    rows = np.arange(n)
    diag = np.diagonal(gram, axis1=-2, axis2=-1)  # [..., N]
    safe = diag > eps
    inv_norm2 = np.where(safe, 1.0 / np.where(safe, diag, 1.0), 0.0)
    not_self = orders != rows[:, None]  # [N, N]: position p of row i is a real partner
    for position in range(n):
        partner = orders[:, position]  # [N]: the row each i projects against now
        inner = (gram[..., partner, :] * coef).sum(-1)  # [..., N]: <g_partner_i, g_i^PC>
        step = np.where((inner < 0) & not_self[:, position], inner * inv_norm2[..., partner], 0.0)
        coef[..., rows, partner] -= step
    return coef


def _pcgrad_modified_np(gram: np.ndarray, orders: np.ndarray, eps: float) -> np.ndarray:
    n = gram.shape[0]
    coef = np.eye(n)
    for i in range(n):
        for j in orders[i].tolist():
            if j == i:
                continue
            gcj = gram @ coef[j]
            inner = float(coef[i] @ gcj)
            norm2 = float(coef[j] @ gcj)
            if inner < 0 and norm2 > eps:
                coef[i] = coef[i] - (inner / norm2) * coef[j]
    return coef


def pcgrad_coefficients(gram: torch.Tensor, orders: torch.Tensor, *, eps: float = 0.0) -> torch.Tensor:
    """PCGrad against the original rows, in coefficient space: C [..., N, N] with projected g_i = C[i] @ M.

    ``gram`` is [..., N, N] (a batch of Gram matrices, e.g. one per layer); ``orders`` is [N, N], row i the order
    in which row i visits the others. All rows advance together, one position of their order per iteration.

    Args:
        gram: ``[..., N, N]`` Gram matrices of the client gradients.
        orders: ``[N, N]`` visiting orders.
        eps: squared norms at or below this are not projected on.
    """
    coef = _pcgrad_np(_np64(gram), orders.cpu().numpy(), eps)
    return torch.from_numpy(coef).to(device=gram.device, dtype=gram.dtype)


def pcgrad_coefficients_modified(gram: torch.Tensor, orders: torch.Tensor, *, eps: float = 1e-20) -> torch.Tensor:
    """PCGrad against the *already modified* rows (the third-party reimplementation's variant), coefficient space.

    Rows are processed in sequence because row i sees the rows projected before it; work is O(N³) on [N, N].
    """
    coef = _pcgrad_modified_np(_np64(gram), orders.cpu().numpy(), eps)
    return torch.from_numpy(coef).to(device=gram.device, dtype=gram.dtype)


def _attention_np(norms: np.ndarray, dots: np.ndarray, history_norm: float, temperature: float,
                  normalize: str) -> np.ndarray:
    if temperature <= 0:
        raise ConfigError(f"aggregation.temperature must be > 0, got {temperature}")
    cos = dots / np.maximum(norms * history_norm, 1e-12)
    z = cos / temperature
    w = np.exp(z - z.max())
    w = w / w.sum()
    return w * len(w) if normalize == "mean1" else w


def attention_weights(
    gram_row_norms: torch.Tensor, dots_with_history: torch.Tensor, history_norm: float, *, temperature: float,
    normalize: str = "mean1",
) -> torch.Tensor:
    """Weights ``w = N·softmax(cos(g_k, h)/T)`` (mean 1), or plain softmax (sum 1) when normalize="sum1".

    Args:
        gram_row_norms: ``[N]`` norms of the clients' gradients.
        dots_with_history: ``[N]`` dot products of each gradient with the history.
        history_norm: the history's norm.
        temperature: the softmax temperature T (> 0).
        normalize: ``mean1`` or ``sum1``.

    Raises:
        ConfigError: ``temperature`` is not positive.
    """
    w = _attention_np(_np64(gram_row_norms), _np64(dots_with_history), history_norm, temperature, normalize)
    return torch.from_numpy(w)


def _combine_vector(config: AggregationConfig, n: int, sizes: torch.Tensor | None) -> np.ndarray:
    if config.combine == "sum":
        return np.ones(n)
    if config.combine == "size_weighted":
        if sizes is None:
            raise ConfigError("aggregation.combine='size_weighted' needs client data sizes")
        s = _np64(sizes)
        return s / s.sum()
    return np.full(n, 1.0 / n)


def gp_aggregate(
    matrix: torch.Tensor,
    *,
    config: AggregationConfig | None = None,
    history: torch.Tensor | None = None,
    segments: Sequence[int] | None = None,
    sizes: torch.Tensor | None = None,
    orders: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, AggregationStats]:
    """GPAggregation: attention rescaling, PCGrad projection (whole model or per layer), combination.

    ``matrix`` is [N, P] (one flattened general-model gradient per client), ``history`` the previous aggregate
    [P] (None at the first step: all weights 1), ``segments`` the per-layer sizes summing to P (used when
    ``config.granularity == "layer"``), ``sizes`` client data sizes for ``combine="size_weighted"``,
    ``orders`` explicit [N, N] projection orders (else drawn from ``generator``).

    Args:
        matrix: ``[N, P]`` client gradients.
        config: the aggregation settings (method ``gp`` or ``mean``; default: ``AggregationConfig()``).
        history: ``[P]`` previous aggregate, or None.
        segments: per-layer sizes summing to P, or None.
        sizes: ``[N]`` client data sizes, or None.
        orders: ``[N, N]`` projection orders, or None.
        generator: the random source of the orders.

    Raises:
        ConfigError: a method other than ``gp``/``mean``, a non-positive temperature, or ``size_weighted``
            without ``sizes``.
        ShapeError: ``matrix``, ``history`` or ``segments`` do not fit together.
    """
    cfg = config or AggregationConfig()
    if cfg.method not in ("gp", "mean"):
        raise ConfigError(f"gp_aggregate handles methods 'gp' and 'mean', got {cfg.method!r} (use GPAggregator)")
    _check_matrix(matrix)
    n, p = matrix.shape
    layered = cfg.method == "gp" and cfg.granularity == "layer" and segments is not None and len(segments) > 1
    attend = cfg.attention == "softmax" and history is not None
    if attend and history is not None and tuple(history.shape) != (p,):
        raise ShapeError("aggregation history", tuple(history.shape), f"[{p}]")
    blocks: list[torch.Tensor] = []
    dots: np.ndarray | None = None
    if layered:
        assert segments is not None
        if sum(segments) != p:
            raise ShapeError("layer segments (sum)", (sum(segments),), f"[{p}]")
        blocks = list(torch.split(matrix, list(segments), dim=1))
        pieces = list(torch.split(history, list(segments))) if attend and history is not None else [None] * len(blocks)
        per_block = [gram_matrix(blk, piece) for blk, piece in zip(blocks, pieces, strict=True)]
        layer_grams = np.stack([g for g, _ in per_block])  # [L, N, N]
        gram = layer_grams.sum(0)  # the whole-model Gram matrix for free
        if attend:
            dots = np.sum([c for _, c in per_block if c is not None], axis=0)
    else:
        gram, dots = gram_matrix(matrix, history if attend else None)
    row_norms = np.sqrt(np.clip(np.diagonal(gram), 0, None))

    weights = np.ones(n)
    if cfg.balance == "norm":  # equal norms before attention and projection (the scales ride in the weights)
        weights = row_norms.mean() / np.maximum(row_norms, 1e-30)
    if attend and history is not None and dots is not None:
        h_norm = float(history.norm())
        if h_norm > 0:
            weights = weights * _attention_np(row_norms, dots, h_norm, cfg.temperature, cfg.attention_normalize)
    combine = _combine_vector(cfg, n, sizes)

    if cfg.method == "mean":
        row_weights = combine * weights
        out = _weighted_rows(row_weights, matrix)
        return _finish(out, gram, row_norms, weights, cfg, _quad_norm(row_weights, gram), ([row_weights], [gram]))
    if orders is None:
        orders = fixed_orders(n) if cfg.order == "fixed" else random_orders(n, generator)
    order_np = orders.cpu().numpy()
    pair_scale = np.outer(weights, weights)
    if layered:
        per_layer = (combine @ _project(layer_grams * pair_scale, order_np, cfg)) * weights  # [L, N]
        out = torch.cat([_weighted_rows(rw, blk) for rw, blk in zip(per_layer, blocks, strict=True)])
        norm = float(np.sqrt(sum(_quad_norm(rw, g) ** 2 for rw, g in zip(per_layer, layer_grams, strict=True))))
        combination = (list(per_layer), list(layer_grams))
    else:
        row_weights = (combine @ _project(gram * pair_scale, order_np, cfg)) * weights
        out = _weighted_rows(row_weights, matrix)
        norm = _quad_norm(row_weights, gram)
        combination = ([row_weights], [gram])
    return _finish(out, gram, row_norms, weights, cfg, norm, combination)


def _weighted_rows(row_weights: np.ndarray, matrix: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(row_weights).to(device=matrix.device, dtype=matrix.dtype) @ matrix


def _quad_norm(row_weights: np.ndarray, gram: np.ndarray) -> float:
    # ‖Σ_i w_i g_i‖ from the Gram matrix: no extra pass over P
    return float(np.sqrt(max(float(row_weights @ gram @ row_weights), 0.0)))


def _project(gram: np.ndarray, orders: np.ndarray, cfg: AggregationConfig) -> np.ndarray:
    if cfg.reference == "modified":
        if gram.ndim == 3:
            return np.stack([_pcgrad_modified_np(g, orders, 1e-20) for g in gram])
        return _pcgrad_modified_np(gram, orders, 1e-20)
    return _pcgrad_np(gram, orders, 0.0)


def _against_mean(combination: tuple[list[np.ndarray], list[np.ndarray]], n: int) -> tuple[float, float]:
    """(‖agg − mean‖ / ‖mean‖, cos(agg, mean)) in coefficient space, from the row weights of each block and the
    block's Gram matrix (the aggregate of block l is w_l · M_l, the plain mean 1/N · M_l): no pass over P."""
    uniform = np.full(n, 1.0 / n)
    diff2 = dot = mean2 = out2 = 0.0
    for w, g in zip(*combination, strict=True):
        d = w - uniform
        diff2 += float(d @ g @ d)
        dot += float(w @ g @ uniform)
        mean2 += float(uniform @ g @ uniform)
        out2 += float(w @ g @ w)
    if mean2 <= 0:
        return float("nan"), float("nan")
    change = float(np.sqrt(max(diff2, 0.0) / mean2))
    return change, dot / np.sqrt(mean2 * out2) if out2 > 0 else float("nan")


def _finish(
    out: torch.Tensor, gram: np.ndarray, row_norms: np.ndarray, weights: np.ndarray, cfg: AggregationConfig,
    norm_after: float | None = None, combination: tuple[list[np.ndarray], list[np.ndarray]] | None = None,
    matrix: torch.Tensor | None = None,
) -> tuple[torch.Tensor, AggregationStats]:
    """The aggregate (clipped if asked) and its stats; ``combination`` (row weights and Gram matrix per block)
    gives the comparison with the plain mean without touching P, else ``matrix`` (one pass over it)."""
    n = gram.shape[0]
    change, cos_mean = float("nan"), float("nan")
    if combination is not None:
        change, cos_mean = _against_mean(combination, n)
    elif matrix is not None:  # an aggregator whose combination is not ours (torchjd's)
        mean = matrix.mean(0)
        mean_norm = float(mean.norm())
        if mean_norm > 0:
            change = float((out - mean).norm()) / mean_norm
            out_norm = float(out.norm())
            cos_mean = float(out @ mean) / (out_norm * mean_norm) if out_norm > 0 else float("nan")
    cos = gram / np.maximum(np.outer(row_norms, row_norms), 1e-30)
    pairs = n * (n - 1)
    off = ~np.eye(n, dtype=bool)
    conflict = float((cos[off] < 0).mean()) if pairs else 0.0
    mean_cos = float(cos[off].mean()) if pairs else 1.0
    norm_after = float(out.norm()) if norm_after is None else norm_after
    clipped = False
    if cfg.clip_norm > 0 and norm_after > cfg.clip_norm:
        out = out * (cfg.clip_norm / norm_after)
        clipped = True
    stats = AggregationStats(
        num_clients=n,
        conflict_fraction=conflict,
        mean_cosine=mean_cos,
        attention_weights=tuple(float(w) for w in weights),
        mean_norm_before=float(row_norms.mean()),
        norm_of_mean_before=float(np.sqrt(max(float(gram.sum()), 0.0))) / n,  # ‖mean‖ from the Gram matrix
        norm_after=min(norm_after, cfg.clip_norm) if clipped else norm_after,
        clipped=clipped,
        pair_cosines=tuple(float(c) for c in cos[np.triu_indices(n, 1)]),
        client_norms=tuple(float(v) for v in row_norms),
        change_vs_mean=change,
        cosine_vs_mean=cos_mean,
    )
    return out, stats


def pcgrad_pairwise_loop(matrix: torch.Tensor, orders: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """Reference PCGrad as most MTL libraries write it: a Python loop over row pairs on P-sized vectors (sum).

    ``rows`` limits the work to the first rows (for timing extrapolation); the result is then a partial sum.
    """
    total = torch.zeros_like(matrix[0])
    for i in range(matrix.shape[0] if rows is None else rows):
        g = matrix[i].clone()
        for j in orders[i].tolist():
            if j == i:
                continue
            ref = matrix[j]
            d = torch.dot(g, ref)
            if d < 0:
                g -= d / torch.dot(ref, ref) * ref
        total += g
    return total


def torchjd_aggregator(method: str) -> AggregatorFn:
    """A torchjd aggregator by our method name (torchjd_pcgrad, mgda, upgrad, cagrad); clear error if absent."""
    if method not in _TORCHJD_METHODS:
        raise ConfigError(f"unknown torchjd aggregator {method!r}; known: {sorted(_TORCHJD_METHODS)}")
    try:
        from torchjd import aggregation as jd

        cls = getattr(jd, _TORCHJD_METHODS[method])
        agg = cls(c=0.4) if method == "cagrad" else cls()
    except ImportError as err:
        raise ConfigError(f"aggregator {method!r} needs an optional dependency: {err}") from None
    return agg


class GPAggregator:
    """Stateful wrapper of ``gp_aggregate``: keeps the history (last aggregate or EMA) between steps.

    Args:
        config: the aggregation settings (default: ``AggregationConfig()``).
        seed: the seed of the projection orders.
    """

    def __init__(self, config: AggregationConfig | None = None, *, seed: int = 0) -> None:
        self.config = config or AggregationConfig()
        self.seed = seed
        self.history: torch.Tensor | None = None
        self._peer: AggregatorFn | None = None
        if self.config.method in _TORCHJD_METHODS:
            self._peer = torchjd_aggregator(self.config.method)

    def __call__(
        self, matrix: torch.Tensor, *, step: int = 0, segments: Sequence[int] | None = None,
        sizes: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, AggregationStats]:
        """Aggregate [N, P] into [P]; deterministic given (seed, step); updates the history."""
        _check_matrix(matrix)
        if self._peer is not None:
            with torch.random.fork_rng(devices=[]):  # torchjd draws from the global generator: keep it untouched
                torch.manual_seed(self.seed * 1_000_003 + step)
                out = self._peer(matrix)
            gram, _ = gram_matrix(matrix)
            out, stats = _finish(out, gram, np.sqrt(np.clip(np.diagonal(gram), 0, None)), np.ones(matrix.shape[0]),
                                 self.config, matrix=matrix)
        else:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            out, stats = gp_aggregate(matrix, config=self.config, history=self.history, segments=segments,
                                      sizes=sizes, generator=gen)
        self._update_history(out)
        return out, stats

    def _update_history(self, out: torch.Tensor) -> None:
        cfg = self.config
        if self.history is None or cfg.history == "last":
            self.history = out.detach().clone()
        else:
            self.history = cfg.ema_beta * self.history + (1 - cfg.ema_beta) * out.detach()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """History as tensors for a checkpoint (empty before the first step)."""
        return {} if self.history is None else {"history": self.history}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore the history saved by ``state_tensors``.

        Args:
            tensors: what ``state_tensors`` returned.
        """
        self.history = tensors.get("history")


def cosine_matrix(matrix: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarities of the rows of [N, P] (from one Gram matrix)."""
    _check_matrix(matrix)
    gram = torch.from_numpy(gram_matrix(matrix)[0]).to(matrix.dtype)
    norms = gram.diagonal().clamp_min(0).sqrt()
    return gram / (norms[:, None] * norms[None, :]).clamp_min(1e-30)


def expected_pairs(n: int) -> int:
    """Number of ordered client pairs PCGrad inspects, N(N-1)."""
    return n * (n - 1) if n > 1 else 0


__all__ = [
    "AggregationStats",
    "GPAggregator",
    "attention_weights",
    "cosine_matrix",
    "expected_pairs",
    "fixed_orders",
    "gp_aggregate",
    "gram_matrix",
    "pcgrad_coefficients",
    "pcgrad_coefficients_modified",
    "pcgrad_pairwise_loop",
    "random_orders",
    "torchjd_aggregator",
]


"""Next-item recommendation: Recall@K / NDCG@K over all items, standard baselines, and one scorer for any user vector.

Items are integer indices ``0..n_items-1``; a user's items are an int array (``item_lists`` per user).

- Metrics (``recall_ndcg``): each user's items are ranked by score, items in ``exclude`` (the user's
  history) removed, ties broken by the lower item index. Recall@K = hits in the top K / number of relevant
  items (RecBole's definition); NDCG@K = DCG@K / the DCG of a perfect top K (``min(K, relevant)`` hits),
  with gain ``1 / log2(rank + 1)``, rank 1 = the top.
- Baselines: ``popularity_scores`` (interaction counts), ``item_knn_scores`` (item-item cosine on a
  binary user-item matrix, scored as the sum of similarities to the user's items), and ``SASRec``, a small
  causal self-attention model on item-id sequences trained with next-item cross-entropy (full or sampled softmax)
  (``train_sequential`` / ``sequential_scores``).
- Readouts of a user representation (tokens, embeddings, features: one vector per user), both reading every
  training interaction as item-kNN does (``NextItemSplit.readout`` keeps the one better on validation users):
  - ``user_knn_scores``: the most similar other users (cosine of their vectors) vote for their items;
  - ``fit_item_scorer``: a small multi-label model, standardised input -> MLP -> one logit per item,
    multinomial likelihood over the user's target items, the epoch chosen by NDCG@K on validation users.
    Trained on every user's training interactions (``targets="interactions"``) or, as an older readout that
    learns from far less, on the fitting users' futures only (``targets="future"``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import sparse
from torch import nn

from pluribus.data.schema import UserDataset
from pluribus.errors import ConfigError, DataError, ShapeError, check_shape

ItemLists = Sequence[np.ndarray] | Sequence[Sequence[int]]


def interaction_matrix(item_lists: ItemLists, n_items: int) -> sparse.csr_matrix:
    """Binary ``[n_users, n_items]`` CSR matrix of each user's items (duplicates count once)."""
    rows, cols = [], []
    for u, items in enumerate(item_lists):
        arr = np.asarray(items, dtype=np.int64).ravel()
        if arr.size and (arr.min() < 0 or arr.max() >= n_items):
            raise DataError(f"item index {int(arr.max() if arr.max() >= n_items else arr.min())} out of range",
                            row=u, expected=f"0 <= item < {n_items}")
        rows.append(np.full(arr.size, u, dtype=np.int64))
        cols.append(arr)
    r = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
    m = sparse.csr_matrix((np.ones(len(r), dtype=np.float64), (r, c)), shape=(len(item_lists), n_items))
    m.data[:] = 1.0  # duplicates were summed
    return m


def rank_items(scores: np.ndarray, k: int, exclude: ItemLists | None = None) -> np.ndarray:
    """The top ``k`` item indices per user ``[n_users, k]``, best first, without the ``exclude`` items."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ShapeError("scores", scores.shape, "[n_users, n_items]")
    if not 1 <= k <= scores.shape[1]:
        raise ConfigError(f"k={k}: need 1 <= k <= n_items ({scores.shape[1]})")
    masked = np.where(np.isnan(scores), -np.inf, scores)
    if exclude is not None:
        if len(exclude) != scores.shape[0]:
            raise ShapeError("exclude", (len(exclude),), f"one item list per user ({scores.shape[0]})")
        masked = masked.copy()
        ex = interaction_matrix(exclude, scores.shape[1]).tocoo()
        masked[ex.row, ex.col] = -np.inf
    # stable sort of the negated scores: equal scores keep the lower item index first
    return np.argsort(-masked, axis=1, kind="stable")[:, :k]


def recall_ndcg(scores: np.ndarray, relevant: ItemLists, *, k: int = 10, exclude: ItemLists | None = None) -> dict[str, np.ndarray]:
    """Per-user Recall@k and NDCG@k (``{"recall": [n_users], "ndcg": [n_users]}``); every user needs a relevant item."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or len(relevant) != scores.shape[0]:
        raise ShapeError("scores", scores.shape, f"[{len(relevant)} users (one per relevant list), n_items]")
    top = rank_items(scores, k, exclude)
    rel = interaction_matrix(relevant, scores.shape[1])
    n_rel = np.asarray(rel.sum(axis=1)).ravel()
    if (n_rel == 0).any():
        raise DataError("a user has no relevant item, so recall is not defined", row=int(np.argmin(n_rel)))
    hits = np.asarray(rel[np.arange(top.shape[0])[:, None], top].todense(), dtype=np.float64)
    gains = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = hits @ gains
    idcg = np.cumsum(gains)[np.minimum(n_rel, k).astype(int) - 1]
    return {"recall": hits.sum(axis=1) / n_rel, "ndcg": dcg / idcg}


def popularity_scores(train: sparse.spmatrix, n_users: int) -> np.ndarray:
    """Every user gets each item's interaction count in ``train`` ``[n_users, n_items]``."""
    counts = np.asarray(sparse.csr_matrix(train).sum(axis=0), dtype=np.float64).ravel()
    return np.broadcast_to(counts, (n_users, counts.size)).copy()


def keep_top_neighbours(sim: np.ndarray, neighbours: int | None) -> np.ndarray:
    """``sim`` with all but each row's ``neighbours`` largest entries set to 0 (ties: the lower column first);
    ``sim`` itself when ``neighbours`` is None or not below the number of columns.

    Raises:
        ConfigError: ``neighbours`` below 1.
    """
    if neighbours is None or neighbours >= sim.shape[1]:
        return sim
    if neighbours < 1:
        raise ConfigError(f"neighbours={neighbours}: need >= 1")
    keep = np.argsort(-sim, axis=1, kind="stable")[:, :neighbours]
    pruned = np.zeros_like(sim)
    rows = np.arange(sim.shape[0])[:, None]
    pruned[rows, keep] = sim[rows, keep]
    return pruned


def item_similarity(train: sparse.spmatrix, *, neighbours: int | None = None, shrink: float = 0.0) -> np.ndarray:
    """Item-item cosine ``[n_items, n_items]`` of a binary user-item matrix (dense; zero diagonal).

    ``shrink`` is added to the norm product (damps pairs seen by few users); with ``neighbours``, each row
    keeps only its ``neighbours`` most similar items (ties: lower index).
    """
    x = sparse.csr_matrix(train, dtype=np.float64, copy=True)
    x.data[:] = 1.0
    co = np.asarray((x.T @ x).todense(), dtype=np.float64)
    norms = np.sqrt(np.diag(co))
    sim = co / (np.outer(norms, norms) + shrink + 1e-12)
    np.fill_diagonal(sim, 0.0)
    sim = keep_top_neighbours(sim, neighbours)
    return sim


def item_knn_scores(train: sparse.spmatrix, history: ItemLists, *, neighbours: int | None = None,
                    shrink: float = 0.0) -> np.ndarray:
    """Item-kNN scores ``[len(history), n_items]``: sum of each item's similarity to the user's history items."""
    sim = item_similarity(train, neighbours=neighbours, shrink=shrink)
    h = interaction_matrix(history, sim.shape[0])
    return np.asarray(h @ sim, dtype=np.float64)


# ---- a small SASRec-style sequential model ------------------------------------------------------------


class SASRec(nn.Module):
    """Causal self-attention over item ids (0 = padding, item i is id i + 1); logits tied to the item embeddings."""

    def __init__(self, n_items: int, *, dim: int = 64, layers: int = 2, heads: int = 2, max_len: int = 50,
                 dropout: float = 0.2) -> None:
        super().__init__()
        if n_items < 1 or max_len < 1 or dim % heads:
            raise ConfigError(f"SASRec: need n_items >= 1, max_len >= 1 and dim ({dim}) divisible by heads ({heads})")
        self.n_items, self.max_len, self.heads = n_items, max_len, heads
        self.items = nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.positions = nn.Embedding(max_len, dim)
        self.dropout = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        # unit-norm-scale embeddings: with logits tied to them, N(0, 1) rows would start at logits of size ~dim
        nn.init.normal_(self.items.weight, std=dim ** -0.5)
        nn.init.normal_(self.positions.weight, std=dim ** -0.5)
        with torch.no_grad():
            self.items.weight[0].zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Next-item logits ``[B, L, n_items]`` at every position of left-padded id sequences ``[B, L]``."""
        return self.hidden(ids) @ self.items.weight[1:].T

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """Final hidden states ``[B, L, dim]`` (zero at padding positions)."""
        b, length = ids.shape
        if length > self.max_len:
            raise ShapeError("ids", ids.shape, f"[batch, <= {self.max_len}]")
        pos = torch.arange(length, device=ids.device) + (self.max_len - length)
        h = self.dropout(self.items(ids) + self.positions(pos))
        real = ids != 0
        causal = torch.ones(length, length, dtype=torch.bool, device=ids.device).tril()
        eye = torch.eye(length, dtype=torch.bool, device=ids.device)
        # attend to earlier real items and to itself (a padding row would otherwise see nothing: NaN)
        allowed = (causal & real[:, None, :]) | eye
        mask = torch.zeros(b, length, length, device=ids.device).masked_fill(~allowed, float("-inf"))
        h = self.norm(self.encoder(h, mask=mask.repeat_interleave(self.heads, dim=0)))
        return h * real[..., None]


def _windows(sequences: ItemLists, max_len: int) -> np.ndarray:
    """Training windows ``[n, max_len + 1]`` of ids (item + 1), left-padded, cut from each sequence's end."""
    out = []
    for seq in sequences:
        ids = np.asarray(seq, dtype=np.int64) + 1
        end = len(ids)
        while end >= 2:
            start = max(0, end - max_len - 1)
            window = ids[start:end]
            out.append(np.pad(window, (max_len + 1 - len(window), 0)))
            end = start + 1 if start > 0 else 0
    if not out:
        raise DataError("no sequence has two items to learn a next item from")
    return np.stack(out)


def _left_pad(sequences: ItemLists, max_len: int) -> torch.Tensor:
    rows = []
    for seq in sequences:
        ids = (np.asarray(seq, dtype=np.int64) + 1)[-max_len:]
        rows.append(np.pad(ids, (max_len - len(ids), 0)))
    return torch.from_numpy(np.stack(rows))


@dataclass(frozen=True)
class SequentialConfig:
    """SASRec-style model and training settings."""

    dim: int = 64
    layers: int = 2
    heads: int = 2
    max_len: int = 50
    dropout: float = 0.2
    epochs: int = 60
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    eval_every: int = 5
    #: sampled softmax: the target against this many uniformly drawn items shared by the batch (None: all items)
    negatives: int | None = None
    seed: int = 0


def _sampled_loss(model: SASRec, h: torch.Tensor, targets: torch.Tensor, negatives: int, gen: torch.Generator,
                  ) -> torch.Tensor:
    """Cross-entropy of each target against ``negatives`` shared random items (a sampled item equal to the
    target is masked out)."""
    neg = torch.randint(0, model.n_items, (negatives,), generator=gen)
    table = model.items.weight[1:]
    pos_logit = (h * table[targets]).sum(dim=1, keepdim=True)
    neg_logit = (h @ table[neg].T).masked_fill(neg[None, :] == targets[:, None], float("-inf"))
    logits = torch.cat([pos_logit, neg_logit], dim=1)
    return nn.functional.cross_entropy(logits, torch.zeros(len(targets), dtype=torch.long))


def train_sequential(sequences: ItemLists, n_items: int, config: SequentialConfig | None = None, *,
                     validate: Callable[[SASRec], float] | None = None) -> tuple[SASRec, list[dict[str, float]]]:
    """Train SASRec on item sequences (next-item cross-entropy at every position, full or sampled softmax).

    With ``validate`` (model -> score, higher is better), it is called every ``eval_every`` epochs and the
    best model is returned. Returns the model (in eval mode) and the per-epoch log.
    """
    cfg = config if config is not None else SequentialConfig()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    data = torch.from_numpy(_windows(sequences, cfg.max_len))
    if int(data.max()) > n_items:
        raise DataError(f"item index {int(data.max()) - 1} out of range", expected=f"0 <= item < {n_items}")
    model = SASRec(n_items, dim=cfg.dim, layers=cfg.layers, heads=cfg.heads, max_len=cfg.max_len, dropout=cfg.dropout)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    log: list[dict[str, float]] = []
    best, best_state = -np.inf, None
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        total, count = 0.0, 0
        for batch in torch.randperm(len(data), generator=gen).split(cfg.batch_size):
            seq = data[batch]
            inputs, targets = seq[:, :-1], seq[:, 1:]
            keep = (inputs != 0) & (targets != 0)
            h = model.hidden(inputs)[keep]
            if cfg.negatives is None:
                loss = nn.functional.cross_entropy(h @ model.items.weight[1:].T, targets[keep] - 1)
            else:
                loss = _sampled_loss(model, h, targets[keep] - 1, cfg.negatives, gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * int(keep.sum())
            count += int(keep.sum())
        entry = {"epoch": float(epoch), "loss": total / max(count, 1)}
        if validate is not None and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
            model.eval()
            entry["validation"] = float(validate(model))
            if entry["validation"] > best:
                best, best_state = entry["validation"], copy.deepcopy(model.state_dict())
        log.append(entry)
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval(), log


@torch.no_grad()
def sequential_scores(model: SASRec, histories: ItemLists, *, batch_size: int = 256) -> np.ndarray:
    """Next-item logits after each history ``[len(histories), n_items]`` (its newest ``max_len`` items)."""
    if any(len(h) == 0 for h in histories):
        raise DataError("a history is empty: the sequential model has nothing to continue",
                        row=next(i for i, h in enumerate(histories) if len(h) == 0))
    model.eval()
    ids = _left_pad(histories, model.max_len)
    return torch.cat([model(b)[:, -1] for b in ids.split(batch_size)]).double().numpy()


# ---- one scorer for any user representation ---------------------------------------------------------------


@dataclass(frozen=True)
class ScorerConfig:
    """The multi-label item scorer: ``hidden=0`` is a linear (softmax regression) model."""

    hidden: int = 256
    dropout: float = 0.5
    epochs: int = 300
    lr: float = 1e-3
    weight_decay: float = 1e-4
    k: int = 10
    eval_every: int = 5
    seed: int = 0


class ItemScorer(nn.Module):
    """User vector -> item logits, with the input standardised by the training users' mean and std."""

    def __init__(self, dim: int, n_items: int, mean: np.ndarray, std: np.ndarray, *, hidden: int, dropout: float) -> None:
        super().__init__()
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
        self.net: nn.Module = (nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, n_items)) if hidden == 0 else
                               nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout),
                                             nn.Linear(hidden, n_items)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Item logits ``[B, n_items]``."""
        return self.net((x - self.mean) / self.std)

    @torch.no_grad()
    def scores(self, x: np.ndarray) -> np.ndarray:
        """Item scores ``[n_users, n_items]`` (eval mode)."""
        self.eval()
        return self(torch.as_tensor(np.asarray(x), dtype=torch.float32)).double().numpy()


def fit_item_scorer(x_train: np.ndarray, targets: ItemLists, n_items: int, config: ScorerConfig | None = None, *,
                    x_val: np.ndarray, val_targets: ItemLists, val_exclude: ItemLists | None = None,
                    ) -> tuple[ItemScorer, list[dict[str, float]]]:
    """Train the scorer on (user vector, target items) with the multinomial likelihood; keep the epoch with the best
    validation NDCG@k (``val_exclude``: items not to rank for the validation users). Full-batch Adam."""
    cfg = config if config is not None else ScorerConfig()
    x_train, x_val = np.asarray(x_train, dtype=np.float64), np.asarray(x_val, dtype=np.float64)
    check_shape("x_train", x_train.shape, (len(targets), None))
    check_shape("x_val", x_val.shape, (len(val_targets), x_train.shape[1]))
    if not np.isfinite(x_train).all() or not np.isfinite(x_val).all():
        raise DataError("user vectors contain NaN or inf", field="x_train / x_val")
    torch.manual_seed(cfg.seed)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std = np.where(std > 1e-8, std, 1.0)
    model = ItemScorer(x_train.shape[1], n_items, mean, std, hidden=cfg.hidden, dropout=cfg.dropout)
    y = torch.as_tensor(interaction_matrix(targets, n_items).toarray(), dtype=torch.float32)
    y = y / y.sum(dim=1, keepdim=True).clamp_min(1.0)
    x = torch.as_tensor(x_train, dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    log: list[dict[str, float]] = []
    best, best_state = -np.inf, copy.deepcopy(model.state_dict())
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        loss = -(torch.log_softmax(model(x), dim=1) * y).sum(dim=1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        entry = {"epoch": float(epoch), "loss": float(loss.detach())}
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            entry["validation"] = float(recall_ndcg(model.scores(x_val), val_targets, k=cfg.k, exclude=val_exclude)
                                        ["ndcg"].mean())
            if entry["validation"] > best:
                best, best_state = entry["validation"], copy.deepcopy(model.state_dict())
        log.append(entry)
    model.load_state_dict(best_state)
    return model.eval(), log


# ---- user-kNN: a readout for any user representation that reads every training interaction ------------------


def user_similarity(x: np.ndarray, query: np.ndarray, *, shrink: float = 0.0, center: bool = False) -> np.ndarray:
    """Cosine ``[len(query), n_users]`` between the ``query`` rows of ``x`` and every row, ``shrink`` added to the norm
    product (damps users whose vector is short: few items in a multi-hot history); a user's similarity to itself is
    0, a zero vector is similar to no one. ``center`` subtracts the mean row of ``x`` first (no labels are read)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ShapeError("x", x.shape, "[n_users, dim]")
    if not np.isfinite(x).all():
        raise DataError("user vectors contain NaN or inf", field="x")
    if shrink < 0:
        raise ConfigError(f"shrink={shrink}: need >= 0")
    query = np.asarray(query, dtype=np.int64)
    if center:
        x = x - x.mean(axis=0)
    norms = np.linalg.norm(x, axis=1)
    sim = (x[query] @ x.T) / (np.outer(norms[query], norms) + shrink + 1e-12)
    sim[np.arange(len(query)), query] = 0.0  # never one's own neighbour
    return sim


def user_knn_scores(x: np.ndarray, interactions: sparse.spmatrix, query: np.ndarray, *, neighbours: int | None = None,
                    shrink: float = 0.0, center: bool = False) -> np.ndarray:
    """User-kNN item scores ``[len(query), n_items]`` from a user representation ``x`` (one row per user).

    Each query user's ``neighbours`` most similar other users (``user_similarity``; all with None; only positive
    similarities count) vote for the items they have in ``interactions`` (``[n_users, n_items]``, binary), each vote
    weighted by its similarity. Items no neighbour has keep a score below every vote, ordered by their count in
    ``interactions`` (popularity), which also ranks for a user whose vector is similar to no one; among voted items
    popularity adds less than half the smallest vote (a weak prior, not only a tie-break).
    """
    inter = sparse.csr_matrix(interactions, dtype=np.float64, copy=True)
    inter.data[:] = 1.0
    check_shape("x", np.shape(x), (inter.shape[0], None))
    sim = np.clip(user_similarity(x, query, shrink=shrink, center=center), 0.0, None)
    sim = keep_top_neighbours(sim, neighbours)
    votes = np.asarray((inter.T @ sim.T).T, dtype=np.float64)
    counts = np.asarray(inter.sum(axis=0), dtype=np.float64).ravel()
    # a popularity prior below the smallest vote any neighbour can cast: it orders the unvoted items (always below
    # every voted one) and, among voted items, can lift a popular item over a vote larger by less than half the
    # smallest vote. A pure tie-break (1e-6 of it) was measured slightly lower on MovieLens (NDCG@10 0.2089 vs
    # 0.2096 on the multi-hot history, 3 seeds), and the published tables were made with this one.
    smallest = sim[sim > 0].min() if (sim > 0).any() else 1.0
    return votes + 0.5 * smallest * counts / (counts.max() + 1.0)


# ---- the next-item protocol: one data set, one seed's user split, every arm on the same splits ---------------

#: item-kNN settings tried on the validation users: (neighbours, shrink)
KNN_GRID = tuple((n, s) for n in (20, 50, 100, None) for s in (0.0, 10.0))
#: user-kNN settings tried on the validation users: (neighbours, shrink, center)
USER_KNN_GRID = tuple((n, s, c) for n in (10, 20, 50, 100, 200, None) for s in (0.0, 10.0) for c in (False, True))


def user_item_lists(ds: UserDataset, source: str = "ratings", *, item_field: str | None = None,
                    ) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """Per user of ``ds`` (in ``ds.user_ids`` order): history item indices (oldest first), held-out future item
    indices (``ds.future[source]``), and the number of items.

    An item is the ``item_field`` column (default: ``item_id`` when the source has one, else its text field).
    """
    if source not in ds.source_specs:
        raise ConfigError(f"recommendation: source {source!r} is not in {ds.name!r}; sources: {ds.source_names}")
    future = ds.future.get(source) if ds.future else None
    if future is None or future.empty:
        raise ConfigError(f"recommendation needs held-out future events of {source!r}; {ds.name!r} has none")
    hist = ds.source(source)
    field_name = item_field or ("item_id" if "item_id" in hist.columns else ds.source_specs[source].text_field)
    if not field_name or field_name not in hist.columns or field_name not in future.columns:
        raise ConfigError(f"recommendation: source {source!r} has no item column {field_name!r}",)
    ids = sorted(set(hist[field_name].astype(str)) | set(future[field_name].astype(str)), key=lambda v: (len(v), v))
    index = {v: i for i, v in enumerate(ids)}

    def per_user(frame: pd.DataFrame) -> list[np.ndarray]:
        frame = frame.sort_values(["user_id", "timestamp", field_name], kind="stable")
        groups = {str(u): g[field_name].astype(str).map(index).to_numpy(np.int64) for u, g in frame.groupby("user_id")}
        return [groups.get(str(u), np.zeros(0, dtype=np.int64)) for u in ds.user_ids]

    return per_user(hist), per_user(future), len(ids)


@dataclass
class NextItemSplit:
    """One seed's split of users for next-item recommendation, shared by every arm.

    Users are split 80/20 (train/test, ``split_indices``); 10% of the training users are held aside for validation
    (epochs, item-kNN settings). Training data: every user's history plus the future of the fitting users (train
    minus validation). Every arm ranks all items for each test user, minus that user's history, and is scored on
    the user's future: Recall@k and NDCG@k averaged over test users. Users without a future are left out.

    Arms: ``popularity``, ``item_knn`` (item ids), and for a user representation ``readout`` (the better of
    ``user_knn`` and ``scorer(targets="interactions")`` on validation), each of which reads every training
    interaction; ``scorer(targets="future")`` learns from the fitting users' futures only.
    """

    hist: list[np.ndarray]
    fut: list[np.ndarray]
    n_items: int
    fit: np.ndarray
    val: np.ndarray
    test: np.ndarray
    k: int = 10

    @classmethod
    def make(cls, hist: list[np.ndarray], fut: list[np.ndarray], n_items: int, *, seed: int, k: int = 10,
             ) -> NextItemSplit:
        """The split of seed ``seed`` (the same users as ``split_indices(n_users, (0.8, 0.2), seed)``)."""
        from pluribus.data.split import split_indices

        train, test = split_indices(len(hist), (0.8, 0.2), seed=seed)
        fit_pos, val_pos = split_indices(len(train), (0.9, 0.1), seed=seed)
        has_future = np.array([len(f) > 0 for f in fut])
        fit, val = train[fit_pos], train[val_pos]
        fit, val, test = fit[has_future[fit]], val[has_future[val]], test[has_future[test]]
        if len(fit) < 2 or len(val) < 1 or len(test) < 1:
            raise DataError(f"recommendation: too few users with a future to split ({int(has_future.sum())})")
        return cls(hist, fut, n_items, fit, val, test, k)

    @property
    def train_lists(self) -> list[np.ndarray]:
        """Every user's history, plus the future of the fitting users."""
        is_fit = np.zeros(len(self.hist), dtype=bool)
        is_fit[self.fit] = True
        return [np.concatenate([h, f]) if is_fit[u] else h for u, (h, f) in enumerate(zip(self.hist, self.fut, strict=True))]

    def evaluate(self, scores: np.ndarray, users: np.ndarray | None = None) -> dict[str, float]:
        """Mean Recall@k / NDCG@k of ``scores`` (rows = ``users``, default the test users), history excluded."""
        users = self.test if users is None else users
        out = recall_ndcg(scores, [self.fut[u] for u in users], k=self.k, exclude=[self.hist[u] for u in users])
        return {"recall": float(out["recall"].mean()), "ndcg": float(out["ndcg"].mean())}

    def popularity(self, train: sparse.spmatrix | None = None) -> dict[str, float]:
        """Popularity (interaction counts of ``train``, default the training interactions) on the test users."""
        matrix = interaction_matrix(self.train_lists, self.n_items) if train is None else train
        return self.evaluate(popularity_scores(matrix, len(self.test)))

    def item_knn(self, train: sparse.spmatrix | None = None, grid: Sequence[tuple[int | None, float]] = KNN_GRID,
                 ) -> tuple[dict[str, float], tuple[int | None, float]]:
        """Item-kNN with the (neighbours, shrink) of ``grid`` best on validation NDCG; (test metrics, setting)."""
        matrix = interaction_matrix(self.train_lists, self.n_items) if train is None else train

        def scores(users: np.ndarray, setting: tuple[int | None, float]) -> np.ndarray:
            return item_knn_scores(matrix, [self.hist[u] for u in users], neighbours=setting[0], shrink=setting[1])

        best = max(grid, key=lambda s: self.evaluate(scores(self.val, s), self.val)["ndcg"])
        return self.evaluate(scores(self.test, best)), best

    def user_knn(self, x: np.ndarray, grid: Sequence[tuple[int | None, float, bool]] = USER_KNN_GRID,
                 ) -> tuple[dict[str, float], tuple[int | None, float, bool]]:
        """User-kNN over the representation ``x`` (one row per user; ``user_knn_scores``): the readout that reads
        every training interaction, as item-kNN does.

        Neighbours are all other users (cosine of their rows of ``x``); they vote with ``train_lists``, i.e. their
        histories, plus their futures for the fitting users. The validation and test users' futures are never
        votes. The (neighbours, shrink, center) of ``grid`` with the best validation NDCG@k is kept (chosen on the
        validation users' futures only); returns (test metrics, setting).
        """
        metrics, best, _ = self._user_knn(x, grid)
        return metrics, best

    def _user_knn(self, x: np.ndarray, grid: Sequence[tuple[int | None, float, bool]],
                  ) -> tuple[dict[str, float], tuple[int | None, float, bool], float]:
        check_shape("x", np.shape(x), (len(self.hist), None))
        matrix = interaction_matrix(self.train_lists, self.n_items)

        def scores(users: np.ndarray, setting: tuple[int | None, float, bool]) -> np.ndarray:
            return user_knn_scores(x, matrix, users, neighbours=setting[0], shrink=setting[1], center=setting[2])

        validation = {s: self.evaluate(scores(self.val, s), self.val)["ndcg"] for s in grid}
        best = max(grid, key=lambda s: validation[s])
        return self.evaluate(scores(self.test, best)), best, validation[best]

    def scorer(self, x: np.ndarray, config: ScorerConfig | None = None, *, targets: str = "future",
               ) -> tuple[dict[str, float], int]:
        """``fit_item_scorer`` on ``x`` (one row per user); (test metrics, best validation epoch).

        ``targets="future"``: trained on the fitting users' (vector, future items) only. ``targets="interactions"``:
        trained on every user's (vector, ``train_lists`` items), i.e. all histories plus the fitting users' futures,
        the data item-kNN reads (the test users' histories included, never their futures). Either way the epoch is
        chosen on the validation users' futures.
        """
        metrics, epoch, _ = self._scorer(x, config, targets)
        return metrics, epoch

    def _scorer(self, x: np.ndarray, config: ScorerConfig | None, targets: str) -> tuple[dict[str, float], int, float]:
        cfg = config if config is not None else ScorerConfig(k=self.k)
        check_shape("x", np.shape(x), (len(self.hist), None))
        if targets == "future":
            users, lists = self.fit, [self.fut[u] for u in self.fit]
        elif targets == "interactions":
            train_lists = self.train_lists
            users = np.array([u for u, items in enumerate(train_lists) if len(items)], dtype=np.int64)
            lists = [train_lists[u] for u in users]
        else:
            raise ConfigError(f"scorer targets {targets!r}: choose 'future' or 'interactions'")
        model, log = fit_item_scorer(x[users], lists, self.n_items, cfg,
                                     x_val=x[self.val], val_targets=[self.fut[u] for u in self.val],
                                     val_exclude=[self.hist[u] for u in self.val])
        best = max((e for e in log if "validation" in e), key=lambda e: e["validation"])
        return self.evaluate(model.scores(x[self.test])), int(best["epoch"]), float(best["validation"])

    def readout(self, x: np.ndarray, config: ScorerConfig | None = None,
                grid: Sequence[tuple[int | None, float, bool]] = USER_KNN_GRID) -> tuple[dict[str, float], dict[str, Any]]:
        """The readout of a representation ``x`` that reads every training interaction: ``user_knn`` and
        ``scorer(targets="interactions")`` are both fitted, and the one with the higher validation NDCG@k (the
        validation users' futures only) is scored on the test users. Returns (test metrics, {"readout": "user-kNN"
        or "scorer", "validation": {readout: NDCG@k}, "setting": the user-kNN setting, "epoch": the scorer's}).
        """
        knn, setting, knn_val = self._user_knn(x, grid)
        mlp, epoch, mlp_val = self._scorer(x, config, "interactions")
        chosen = "user-kNN" if knn_val >= mlp_val else "scorer"
        return (knn if chosen == "user-kNN" else mlp), {"readout": chosen, "validation": {"user-kNN": knn_val,
                                                        "scorer": mlp_val}, "setting": setting, "epoch": epoch}

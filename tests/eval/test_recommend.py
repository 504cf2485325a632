import math

import numpy as np
import pytest
import torch

from pluribus.errors import ConfigError, DataError, ShapeError
from pluribus.eval.recommend import (
    NextItemSplit,
    ScorerConfig,
    SequentialConfig,
    _windows,
    fit_item_scorer,
    interaction_matrix,
    item_knn_scores,
    item_similarity,
    popularity_scores,
    rank_items,
    recall_ndcg,
    sequential_scores,
    train_sequential,
    user_item_lists,
)


def test_recall_ndcg_hand_computed():
    # user 0: ranking 3, 1, 0, 2, 4; relevant {1, 2}; top 2 = [3, 1] -> 1 hit at rank 2
    # user 1: item 0 excluded; ranking 1, 2, 3, 4; relevant {1}; top 2 = [1, 2] -> hit at rank 1
    scores = np.array([[3.0, 4.0, 2.0, 5.0, 1.0],
                       [9.0, 4.0, 3.0, 2.0, 1.0]])
    out = recall_ndcg(scores, [[1, 2], [1]], k=2, exclude=[[], [0]])
    assert out["recall"] == pytest.approx([0.5, 1.0])
    idcg0 = 1.0 + 1.0 / math.log2(3)
    assert out["ndcg"] == pytest.approx([(1.0 / math.log2(3)) / idcg0, 1.0])


def test_recall_divides_by_all_relevant_and_ndcg_ideal_caps_at_k():
    # 3 relevant, k = 2, both top items relevant: recall 2/3, ndcg 1 (ideal has 2 hits)
    scores = np.array([[5.0, 4.0, 3.0, 0.0]])
    out = recall_ndcg(scores, [[0, 1, 2]], k=2)
    assert out["recall"][0] == pytest.approx(2 / 3)
    assert out["ndcg"][0] == pytest.approx(1.0)


def test_rank_items_ties_take_lower_index_and_exclusion_applies():
    scores = np.array([[1.0, 2.0, 2.0, 2.0]])
    assert rank_items(scores, 3).tolist() == [[1, 2, 3]]
    assert rank_items(scores, 3, exclude=[[2]]).tolist() == [[1, 3, 0]]


def test_bad_metric_input():
    with pytest.raises(DataError, match="no relevant item"):
        recall_ndcg(np.zeros((2, 3)), [[0], []], k=1)
    with pytest.raises(ConfigError, match="k=5"):
        rank_items(np.zeros((1, 3)), 5)
    with pytest.raises(ShapeError):
        recall_ndcg(np.zeros((2, 3)), [[0]], k=1)
    with pytest.raises(DataError, match="out of range"):
        interaction_matrix([[0, 7]], 3)


def test_popularity_counts_interactions():
    train = interaction_matrix([[0, 1], [1, 2], [1]], 4)
    scores = popularity_scores(train, 2)
    assert scores.tolist() == [[1, 3, 1, 0], [1, 3, 1, 0]]


def test_item_knn_on_a_toy_matrix():
    # items 0 and 1 always together; item 2 with 1 once; item 3 alone
    train = interaction_matrix([[0, 1], [0, 1], [1, 2], [3]], 4)
    sim = item_similarity(train)
    assert sim[0, 1] == pytest.approx(2 / math.sqrt(2 * 3))
    assert sim[1, 2] == pytest.approx(1 / math.sqrt(3 * 1))
    assert sim[0, 2] == 0.0 and sim[0, 3] == 0.0 and np.diag(sim).tolist() == [0, 0, 0, 0]
    scores = item_knn_scores(train, [[0], [0, 2]])
    assert scores[0] == pytest.approx([0.0, sim[0, 1], 0.0, 0.0])
    assert scores[1, 1] == pytest.approx(sim[0, 1] + sim[2, 1])
    # one neighbour per item: item 1's only neighbour is item 0 (its most similar)
    pruned = item_similarity(train, neighbours=1)
    assert (pruned > 0).sum(axis=1).tolist() == [1, 1, 1, 0]
    assert pruned[1, 0] == pytest.approx(sim[1, 0]) and pruned[1, 2] == 0.0
    assert rank_items(scores, 1, exclude=[[0], [0, 2]]).tolist() == [[1], [1]]


def test_sequential_model_overfits_a_deterministic_sequence_set():
    # two users, each a fixed cycle; the next item is a function of the last two items (a window's first
    # item alone is ambiguous: 1 of its 8 predictions, so the loss floor is about ln(2) / 8 = 0.087)
    seqs = [[0, 1, 2, 3, 4] * 6, [4, 3, 2, 1, 0] * 6]
    cfg = SequentialConfig(dim=32, layers=1, heads=2, max_len=8, dropout=0.0, epochs=60, batch_size=64, lr=1e-2)
    torch.set_num_threads(1)
    model, log = train_sequential(seqs, 5, cfg)
    assert log[-1]["loss"] < 0.15 < 1.0 < log[0]["loss"]
    # every training window (8 items, or a user's start left-padded as in training): its next item is the top one
    windows = _windows(seqs, 8)
    prefixes = [[i - 1 for i in w[:-1] if i] for w in windows]
    top = rank_items(sequential_scores(model, prefixes), 1)
    assert len(prefixes) == 8 and top[:, 0].tolist() == [int(w[-1]) - 1 for w in windows]


def test_sequential_sampled_softmax_learns_the_cycle():
    seqs = [[0, 1, 2, 3, 4, 5, 6, 7] * 4]
    cfg = SequentialConfig(dim=32, layers=1, max_len=8, dropout=0.0, epochs=60, lr=1e-2, negatives=3)
    model, log = train_sequential(seqs, 8, cfg)
    windows = _windows(seqs, 8)
    prefixes = [[i - 1 for i in w[:-1] if i] for w in windows]
    assert rank_items(sequential_scores(model, prefixes), 1)[:, 0].tolist() == [int(w[-1]) - 1 for w in windows]


def test_sequential_keeps_the_best_validated_epoch_and_rejects_empty_history():
    seqs = [[0, 1, 2, 0, 1, 2, 0, 1, 2]]
    calls = []

    def validate(model):
        calls.append(1)
        return -len(calls)  # the first validation is the best

    cfg = SequentialConfig(dim=16, layers=1, max_len=4, epochs=4, eval_every=2, dropout=0.0)
    model, log = train_sequential(seqs, 3, cfg, validate=validate)
    assert [e.get("validation") for e in log] == [None, -1.0, None, -2.0]
    with pytest.raises(DataError, match="empty"):
        sequential_scores(model, [[0], []])


def test_item_scorer_learns_a_feature_to_items_mapping():
    rng = np.random.default_rng(0)
    group = rng.integers(0, 3, 300)
    x = np.eye(3)[group] + rng.normal(0, 0.1, (300, 3))
    targets = [np.array([3 * g, 3 * g + 1]) for g in group]  # group g -> items 3g, 3g+1 of 9
    cfg = ScorerConfig(hidden=16, dropout=0.0, epochs=200, lr=1e-2, eval_every=10, k=2)
    model, log = fit_item_scorer(x[:200], targets[:200], 9, cfg, x_val=x[200:], val_targets=targets[200:])
    out = recall_ndcg(model.scores(x[200:]), targets[200:], k=2)
    assert out["recall"].mean() == pytest.approx(1.0) and max(e.get("validation", 0) for e in log) == pytest.approx(1.0)
    with pytest.raises(ShapeError):
        fit_item_scorer(x[:200], targets[:100], 9, cfg, x_val=x[200:], val_targets=targets[200:])


def _events_dataset(n_users=40, with_future=True, item_column=True):
    import pandas as pd

    from pluribus.data.schema import SourceSpec, UserDataset

    rng = np.random.default_rng(0)
    rows, future = [], []
    for u in range(n_users):
        for t in range(6):
            item = int(rng.integers(0, 12))
            row = {"user_id": f"u{u:02d}", "timestamp": 1_000 + t, "text": f"movie {item}"}
            if item_column:
                row["item_id"] = str(item)
            (future if t >= 4 else rows).append(row)
    spec = SourceSpec("ratings", "text", ())
    return UserDataset.build("toy", sources={"ratings": pd.DataFrame(rows)}, source_specs=[spec],
                             future={"ratings": pd.DataFrame(future)} if with_future else None)


def test_user_item_lists_index_items_per_user_oldest_first():
    ds = _events_dataset()
    hist, fut, n_items = user_item_lists(ds)
    assert len(hist) == len(fut) == ds.n_users and n_items == 12
    frame = ds.source("ratings")
    first = frame[frame["user_id"] == "u00"].sort_values("timestamp")["item_id"].tolist()
    names = sorted({str(i) for i in range(12)}, key=lambda v: (len(v), v))  # items are indexed in (length, text) order
    assert [names[i] for i in hist[0]] == first and all(len(f) == 2 for f in fut)
    # without an item_id column the text field is the item
    hist_text, _, n_text = user_item_lists(_events_dataset(item_column=False))
    assert n_text == 12 and [len(h) for h in hist_text] == [len(h) for h in hist]


def test_user_item_lists_refuses_data_without_a_future_or_source():
    with pytest.raises(ConfigError, match="held-out future"):
        user_item_lists(_events_dataset(with_future=False))
    with pytest.raises(ConfigError, match="not in"):
        user_item_lists(_events_dataset(), "clicks")


def test_next_item_split_shares_one_user_split_and_scores_every_arm():
    ds = _events_dataset(60)
    hist, fut, n_items = user_item_lists(ds)
    split = NextItemSplit.make(hist, fut, n_items, seed=3, k=5)
    parts = [set(split.fit), set(split.val), set(split.test)]
    assert sum(map(len, parts)) == ds.n_users and not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    again = NextItemSplit.make(hist, fut, n_items, seed=3, k=5)
    assert np.array_equal(again.test, split.test)  # the same users for every arm of a seed
    lists = split.train_lists
    fit_user, other = int(split.fit[0]), int(split.test[0])
    assert len(lists[fit_user]) == len(hist[fit_user]) + len(fut[fit_user]) and len(lists[other]) == len(hist[other])
    for metrics in (split.popularity(), split.item_knn(grid=[(5, 0.0), (None, 10.0)])[0],
                    split.scorer(np.random.default_rng(0).normal(size=(ds.n_users, 3)), ScorerConfig(epochs=5, k=5))[0]):
        assert set(metrics) == {"recall", "ndcg"} and 0.0 <= metrics["recall"] <= 1.0
    with pytest.raises(ShapeError):
        split.scorer(np.zeros((3, 2)))
    with pytest.raises(DataError, match="too few users"):
        NextItemSplit.make(hist[:3], fut[:3], n_items, seed=0)

"""The user-kNN readout (and the scorer on every training interaction): what it reads, what it must not read."""

import numpy as np
import pytest
import torch

from pluribus.errors import ConfigError, DataError, ShapeError
from pluribus.eval.recommend import (
    NextItemSplit,
    ScorerConfig,
    interaction_matrix,
    popularity_scores,
    rank_items,
    user_knn_scores,
    user_similarity,
)

torch.set_num_threads(1)

N_ITEMS = 12
A, B = np.array([1.0, 0.0]), np.array([0.0, 1.0])


def _split(roles, hist, fut, x_rows, k=1):
    """A split with hand-picked roles ('fit', 'val', 'test', or 'other': a training user without a future)."""
    idx = {r: np.array([u for u, role in enumerate(roles) if role == r], dtype=np.int64) for r in ("fit", "val", "test")}
    split = NextItemSplit([np.asarray(h, dtype=np.int64) for h in hist], [np.asarray(f, dtype=np.int64) for f in fut],
                          N_ITEMS, idx["fit"], idx["val"], idx["test"], k)
    return split, np.array(x_rows, dtype=np.float64)


def _world(test_future, *, fit_future=(5,), val_hist=(1,), n_test=3):
    """Cluster A: 4 fitting users (history 0, future ``fit_future``), 2 validation users (history ``val_hist``,
    future 3) and ``n_test`` test users (history 0, future ``test_future``); cluster B: 4 fitting users on items
    8 / 9."""
    roles = ["fit"] * 4 + ["val"] * 2 + ["test"] * n_test + ["fit"] * 4
    hist = [[0]] * 4 + [list(val_hist)] * 2 + [[0]] * n_test + [[8]] * 4
    fut = [list(fit_future)] * 4 + [[3]] * 2 + [list(test_future)] * n_test + [[9]] * 4
    return _split(roles, hist, fut, [A] * (6 + n_test) + [B] * 4)


GRID = [(None, 0.0, False)]


def test_the_readout_reads_the_fitting_users_futures():
    # item 5 is only ever a fitting user's future: a readout of histories alone could not rank it first
    split, x = _world(test_future=(5,))
    metrics, _ = split.user_knn(x, GRID)
    assert metrics["recall"] == 1.0


def test_the_readout_reads_histories_not_only_futures():
    # item 1 is only ever in the validation users' histories: a readout of futures alone could not rank it first
    split, x = _world(test_future=(1,), fit_future=(0,))
    metrics, _ = split.user_knn(x, GRID)
    assert metrics["recall"] == 1.0


def test_no_held_out_future_is_a_vote():
    # item 7 is only ever a test user's future and the test users are each other's nearest neighbours (5 of them,
    # against 4 fitting users voting for items in the history): a leak of the held-out futures into the votes would
    # rank it first
    split, x = _world(test_future=(7,), fit_future=(0,), n_test=6)
    assert split.user_knn(x, GRID)[0]["recall"] == 0.0
    split, x = _world(test_future=(7,))
    train = interaction_matrix(split.train_lists, N_ITEMS).toarray()
    assert train[:, 7].sum() == 0 and train[:, 3].sum() == 0  # neither test nor validation futures
    # the test users' scores do not move when their futures (or the validation futures) change
    other, _ = _world(test_future=(2,))
    other.fut[4] = np.array([6])
    before = user_knn_scores(x, interaction_matrix(split.train_lists, N_ITEMS), split.test)
    after = user_knn_scores(x, interaction_matrix(other.train_lists, N_ITEMS), other.test)
    assert np.array_equal(before, after)


def _selection_world(val_future):
    """Validation user at angle 0; its nearest neighbour (1 degree) has item 1; five farther ones (10-30 degrees)
    have item 2; test users far off. k=1 picks item 1, all neighbours item 2."""
    def at(deg):
        return [np.cos(np.radians(deg)), np.sin(np.radians(deg))]
    roles = ["val", "fit"] + ["fit"] * 5 + ["test"] * 2
    hist = [[0], [1]] + [[2]] * 5 + [[0], [0]]
    fut = [[val_future], [1]] + [[2]] * 5 + [[4], [4]]
    x = [at(0), at(1)] + [at(d) for d in (10, 15, 20, 25, 30)] + [at(80), at(85)]
    return _split(roles, hist, fut, x)


def test_settings_are_chosen_on_validation_users_only():
    grid = [(1, 0.0, False), (None, 0.0, False)]
    split, x = _selection_world(val_future=1)
    assert split.user_knn(x, grid)[1] == (1, 0.0, False)
    split, x = _selection_world(val_future=2)
    assert split.user_knn(x, grid)[1] == (None, 0.0, False)
    # the test users' futures never move the choice
    for future in (1, 2, 3):
        split, x = _selection_world(val_future=2)
        for u in split.test:
            split.fut[u] = np.array([future])
        assert split.user_knn(x, grid)[1] == (None, 0.0, False)


def test_a_user_is_never_its_own_neighbour_and_zero_vectors_are_similar_to_no_one():
    x = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 2.0]])
    sim = user_similarity(x, np.arange(4))
    assert np.allclose(np.diag(sim), 0.0) and np.allclose(sim[2], 0.0) and np.allclose(sim[:, 2], 0.0)
    assert sim[1, 3] == pytest.approx(1.0)
    # user 0 is alone in its direction: its own item 5 gets no vote, the ranking is popularity's
    inter = interaction_matrix([[5], [1], [2], [1, 3]], N_ITEMS)
    scores = user_knn_scores(x, inter, np.array([0, 2]))
    assert scores.shape == (2, N_ITEMS) and np.isfinite(scores).all()
    pop = popularity_scores(inter, 2)
    assert np.array_equal(rank_items(scores, N_ITEMS), rank_items(pop, N_ITEMS))


def test_all_zero_representation_ranks_by_popularity_and_empty_histories_work():
    rng = np.random.default_rng(0)
    n = 60
    hist = [rng.choice(N_ITEMS, size=rng.integers(0, 4), replace=False) for _ in range(n)]
    hist[0] = np.zeros(0, dtype=np.int64)  # users with an empty history
    hist[1] = np.zeros(0, dtype=np.int64)
    fut = [rng.choice(N_ITEMS, size=2, replace=False) for _ in range(n)]
    split = NextItemSplit.make(hist, fut, N_ITEMS, seed=0, k=3)
    zero, _ = split.user_knn(np.zeros((n, 4)))
    assert zero == pytest.approx(split.popularity())
    metrics, setting = split.user_knn(rng.normal(size=(n, 4)))
    assert 0.0 <= metrics["recall"] <= 1.0 and len(setting) == 3


def test_bad_input_is_refused():
    split, x = _world(test_future=(5,))
    with pytest.raises(ShapeError):
        split.user_knn(x[:3])
    with pytest.raises(DataError, match="NaN"):
        split.user_knn(np.full_like(x, np.nan))
    with pytest.raises(ConfigError, match="neighbours"):
        split.user_knn(x, [(0, 0.0, False)])
    with pytest.raises(ConfigError, match="shrink"):
        user_similarity(x, np.arange(2), shrink=-1.0)
    with pytest.raises(ConfigError, match="targets"):
        split.scorer(x, targets="everything")


def test_scorer_on_all_interactions_learns_items_only_histories_have():
    # cluster A's test users want item 1, which only the validation users' histories hold: the scorer trained on
    # the fitting users' futures never sees item 1 as a target; trained on every interaction it does
    split, x = _world(test_future=(1,), fit_future=(0,), val_hist=(1, 1))
    x = x + np.random.default_rng(0).normal(scale=0.01, size=x.shape)
    cfg = ScorerConfig(hidden=0, dropout=0.0, epochs=200, lr=0.05, k=1, eval_every=200)
    assert split.scorer(x, cfg, targets="interactions")[0]["recall"] == 1.0
    assert split.scorer(x, cfg, targets="future")[0]["recall"] == 0.0


def test_demo_recommendation_reads_every_representation_out_by_user_knn():
    from types import SimpleNamespace

    import pandas as pd

    from pluribus.data.schema import SourceSpec, UserDataset
    from pluribus.demo.tokenize import ITEM_HISTORY, _recommendation
    from pluribus.eval.recommend import user_item_lists

    rng = np.random.default_rng(0)
    rows, future = [], []
    for u in range(60):
        for t in range(8):
            row = {"user_id": f"u{u:02d}", "timestamp": t, "text": "x", "item_id": str(int(rng.integers(0, N_ITEMS)))}
            (future if t >= 6 else rows).append(row)
    ds = UserDataset.build("toy", sources={"ratings": pd.DataFrame(rows)}, source_specs=[SourceSpec("ratings", "text", ())],
                           future={"ratings": pd.DataFrame(future)})
    x = rng.normal(size=(60, 3))
    ctx = SimpleNamespace(data=ds, seeds=[0, 1], config=SimpleNamespace(quick=True))
    arms, text = _recommendation(ctx, {"tokens": x})
    assert list(arms) == ["popularity", "item-kNN", "tokens", ITEM_HISTORY] and all(len(r) == 2 for r in arms.values())
    hist, fut, n_items = user_item_lists(ds)
    expected, chosen = NextItemSplit.make(hist, fut, n_items, seed=1).readout(x, ScorerConfig(epochs=60, seed=1))
    assert arms["tokens"][1] == pytest.approx({**expected, "readout": chosen["readout"]})
    assert "user-kNN" in text and "| tokens |" in text


def test_readout_keeps_the_better_on_validation_and_scores_it():
    rng = np.random.default_rng(1)
    n = 80
    hist = [rng.choice(N_ITEMS, size=3, replace=False) for _ in range(n)]
    fut = [rng.choice(N_ITEMS, size=2, replace=False) for _ in range(n)]
    split = NextItemSplit.make(hist, fut, N_ITEMS, seed=0, k=3)
    x = interaction_matrix(hist, N_ITEMS).toarray() + rng.normal(scale=0.1, size=(n, N_ITEMS))
    cfg = ScorerConfig(hidden=0, epochs=20, k=3)
    metrics, chosen = split.readout(x, cfg)
    knn, setting = split.user_knn(x)
    mlp, epoch = split.scorer(x, cfg, targets="interactions")
    val = chosen["validation"]
    assert chosen["readout"] == ("user-kNN" if val["user-kNN"] >= val["scorer"] else "scorer")
    assert metrics == (knn if chosen["readout"] == "user-kNN" else mlp)
    assert chosen["setting"] == setting and chosen["epoch"] == epoch
    # the validation NDCG it compares is the validation users' own, recomputed from the kept user-kNN setting
    matrix = interaction_matrix(split.train_lists, N_ITEMS)
    own = split.evaluate(user_knn_scores(x, matrix, split.val, neighbours=setting[0], shrink=setting[1],
                                         center=setting[2]), split.val)["ndcg"]
    assert val["user-kNN"] == pytest.approx(own)

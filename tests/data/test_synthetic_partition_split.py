import numpy as np
import pytest

from pluribus.data.partition import dirichlet_partition, iid_partition, natural_id_partition, task_partition
from pluribus.data.split import split_by_time, split_indices, split_users
from pluribus.data.synthetic import make_synthetic_users
from pluribus.errors import ConfigError
from pluribus.eval.probes import linear_probe


def test_generator_is_deterministic_by_seed():
    a, b, c = make_synthetic_users(60, seed=3), make_synthetic_users(60, seed=3), make_synthetic_users(60, seed=4)
    assert a.sources["payments"].equals(b.sources["payments"])
    assert a.labels.equals(b.labels)
    assert not a.sources["payments"].equals(c.sources["payments"])


def test_generator_labels_are_recoverable_from_behaviour(synthetic):
    # share of each merchant group in the payments source predicts the trait-driven label
    pay = synthetic.source("payments")
    counts = pay.assign(thrift=pay["text"].str.contains("discount|second-hand|budget|coupon"))
    share = counts.groupby("user_id")["thrift"].mean().reindex(synthetic.user_ids).to_numpy()[:, None]
    _, y = synthetic.label_array("price_sensitive")
    assert linear_probe(share, y, seeds=(0,), folds=3).auc_mean > 0.75


def test_iid_partition_covers_everything_once():
    parts = iid_partition(103, 4, seed=1)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(103))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert [p.tolist() for p in parts] == [p.tolist() for p in iid_partition(103, 4, seed=1)]


def _label_skew(parts, y):
    # mean over partitions of the largest class share: 1/C for perfectly balanced, 1 for single-class
    return float(np.mean([np.bincount(y[p], minlength=10).max() / len(p) for p in parts]))


def test_dirichlet_alpha_controls_skew():
    y = np.random.default_rng(0).integers(0, 10, 3000)
    skewed = dirichlet_partition(y, 5, alpha=0.1, seed=0)
    mild = dirichlet_partition(y, 5, alpha=100.0, seed=0)
    assert sorted(np.concatenate(skewed).tolist()) == list(range(3000))
    assert _label_skew(skewed, y) > _label_skew(mild, y) + 0.2


def test_partition_errors():
    with pytest.raises(ConfigError):
        iid_partition(3, 5)
    with pytest.raises(ConfigError):
        iid_partition(10, 0)
    with pytest.raises(ConfigError, match="alpha"):
        dirichlet_partition(np.zeros(100, dtype=int), 2, alpha=0)
    with pytest.raises(ConfigError):
        task_partition(10, [])


def test_natural_id_and_task_partitions():
    parts = natural_id_partition(["b", "a", "b", "c"])
    assert {k: v.tolist() for k, v in parts.items()} == {"a": [1], "b": [0, 2], "c": [3]}
    shards = task_partition(40, ["digit", "parity"], clients_per_task=2)
    assert [t for t, _ in shards] == ["digit", "digit", "parity", "parity"]
    assert sorted(np.concatenate([s for _, s in shards]).tolist()) == list(range(40))


def test_splits_by_user_are_disjoint_and_deterministic(synthetic):
    train, val, test = split_users(synthetic, (0.6, 0.2, 0.2), seed=5)
    ids = [set(p.user_ids) for p in (train, val, test)]
    assert sum(map(len, ids)) == synthetic.n_users
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert set(train.source("payments")["user_id"]) <= ids[0]
    again = split_users(synthetic, (0.6, 0.2, 0.2), seed=5)[0]
    assert list(again.user_ids) == list(train.user_ids)
    with pytest.raises(ConfigError):
        split_indices(10, (0.5, 0.4))


def test_split_by_time(synthetic):
    cutoff = int(synthetic.source("payments")["timestamp"].median())
    before, after = split_by_time(synthetic, cutoff=cutoff)
    assert (before.source("payments")["timestamp"] < cutoff).all()
    assert (after.source("payments")["timestamp"] >= cutoff).all()
    assert len(before.source("payments")) + len(after.source("payments")) == len(synthetic.source("payments"))

import numpy as np
import pytest

from pluribus.errors import DataError, ShapeError
from pluribus.eval.multitask import delta_m
from pluribus.eval.probes import ks_statistic, linear_probe, probe_tasks, probe_train_test
from pluribus.eval.report import bar_plot, line_plot, markdown_table, mean_std


def test_separable_features_give_perfect_probe():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 50)
    x = np.c_[y * 4.0 + rng.normal(0, 0.3, 100), rng.normal(size=100)]
    result = linear_probe(x, y, seeds=(0, 1), folds=5)
    assert result.auc_mean == pytest.approx(1.0) and result.ks_mean == pytest.approx(1.0)
    assert len(result.folds) == 10 and result.n == 100


def test_noise_features_give_chance():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(1000, 3)), rng.integers(0, 2, 1000)
    assert abs(linear_probe(x, y, seeds=(0, 1, 2)).auc_mean - 0.5) < 0.05


def test_ks_statistic_known_value():
    # scores separate 3 of 4 positives from all negatives: KS = 0.75
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.4, 0.35, 0.8, 0.9, 0.95])
    assert ks_statistic(y, s) == pytest.approx(0.75)


def test_multiclass_probe_and_train_test():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 300)
    x = np.eye(3)[y] * 2 + rng.normal(0, 0.5, (300, 3))
    result = linear_probe(x, y, kind="multiclass", seeds=(0,))
    assert result.auc_mean > 0.9 and result.acc_mean > 0.8
    scores = probe_train_test(x[:200], y[:200], x[200:], y[200:], kind="multiclass")
    assert set(scores) == {"auc", "ks", "acc"} and scores["auc"] > 0.9


def test_probe_bad_inputs():
    x = np.zeros((10, 2))
    with pytest.raises(DataError, match="one class only"):
        linear_probe(x, np.ones(10))
    with pytest.raises(ShapeError, match=r"expected \[10\]"):
        linear_probe(x, np.ones(9))
    with pytest.raises(ShapeError):
        linear_probe(np.zeros(10), np.ones(10))
    bad = np.ones((10, 2))
    bad[3, 1] = np.nan
    with pytest.raises(DataError, match="NaN"):
        linear_probe(bad, np.arange(10) % 2)
    with pytest.raises(DataError, match="fewer than folds"):
        linear_probe(np.random.default_rng(0).normal(size=(10, 2)), np.array([0] * 8 + [1] * 2))
    with pytest.raises(ShapeError, match=r"\[\*, 2\]"):
        probe_train_test(np.ones((4, 2)), np.array([0, 1, 0, 1]), np.ones((4, 3)), np.array([0, 1, 0, 1]))


def test_probe_tasks_uses_dataset_labels(synthetic):
    x = synthetic.profile.to_numpy()
    results = probe_tasks(x, synthetic, ["price_sensitive", "segment"], seeds=(0,), folds=3)
    assert set(results) == {"price_sensitive", "segment"}
    assert results["price_sensitive"].auc_mean > 0.6  # age and tenure carry the thrift trait
    with pytest.raises(ShapeError, match="one row per user"):
        probe_tasks(x[:5], synthetic)


def test_delta_m():
    metrics = {"acc": 0.9, "rmse": 0.8}
    reference = {"acc": 0.8, "rmse": 1.0}
    # acc +12.5%, rmse lower is better: +20% -> mean 16.25%
    assert delta_m(metrics, reference, {"acc": False, "rmse": True}) == pytest.approx(16.25)
    with pytest.raises(DataError):
        delta_m(metrics, {"acc": 0.8}, {"acc": False, "rmse": True})


def test_report_helpers(tmp_path):
    assert mean_std([0.7, 0.72, 0.74]) == "0.720 ± 0.016"
    table = markdown_table([{"a": 1, "b": 0.5}, {"a": 2, "b": 0.25}])
    assert table.splitlines()[0] == "| a | b |" and "0.2500" in table
    png = line_plot(tmp_path / "l.png", {"x": ([1, 2], [3, 4])}, xlabel="x", ylabel="y", title="t")
    bars = bar_plot(tmp_path / "b.png", {"g": {"ours": (0.7, 0.01), "base": (0.6, 0.02)}}, ylabel="AUC", title="t")
    for path in (png, bars):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _saved_figure(monkeypatch):
    """Capture the figure a plot helper saves (the helpers close it after saving)."""
    import matplotlib.figure

    seen = {}
    real = matplotlib.figure.Figure.savefig

    def keep(self, *args, **kwargs):
        seen["fig"] = self
        return real(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    return seen


def test_auc_bars_show_chance_and_do_not_exaggerate_gaps_and_drop_undefined_groups(tmp_path, monkeypatch):
    seen = _saved_figure(monkeypatch)
    bar_plot(tmp_path / "b.png", {"task a": {"ours": (0.70, 0.01), "base": (0.68, 0.02)},
                                  "task b": {"ours": (float("nan"), 0.0), "base": (float("nan"), 0.0)}},
             ylabel="AUC", title="t", chance=0.5)
    ax = seen["fig"].axes[0]
    low, high = ax.get_ylim()
    assert low <= 0.45 and high >= 1.0  # the whole chance-to-perfect range, not a zoom on a 0.02 gap
    assert any(list(line.get_ydata()) == [0.5, 0.5] for line in ax.get_lines())  # the chance line
    assert [t.get_text() for t in ax.get_xticklabels()] == ["task a"]  # the all-undefined group is left out
    bar_plot(tmp_path / "c.png", {"a": (3.0, 0.1), "b": (2.9, 0.1)}, ylabel="loss", title="t")
    assert seen["fig"].axes[0].get_ylim()[0] == 0.0  # without a chance level, bars start at zero


def test_step_curves_get_integer_ticks(tmp_path, monkeypatch):
    seen = _saved_figure(monkeypatch)
    line_plot(tmp_path / "l.png", {"loss": ([1, 2, 3], [2.0, 1.5, 1.2])}, xlabel="step", ylabel="y", title="t")
    ticks = seen["fig"].axes[0].get_xticks()
    assert all(float(t).is_integer() for t in ticks)


def test_auc_curves_show_error_bars_chance_and_their_own_log_ticks(tmp_path, monkeypatch):
    seen = _saved_figure(monkeypatch)
    line_plot(tmp_path / "e.png", {"ours": ([1, 4, 16], [0.60, 0.69, 0.70], [0.05, 0.03, 0.02]),
                                   "alone": ([1, 4, 16], [0.65] * 3)},
              xlabel="ε", ylabel="AUC", title="t", logx=True, chance=0.5)
    ax = seen["fig"].axes[0]
    low, high = ax.get_ylim()
    assert low <= 0.45 and high >= 1.0  # chance-to-perfect, as the bar charts
    assert any(list(line.get_ydata()) == [0.5, 0.5] for line in ax.get_lines())
    assert len(ax.containers) == 1 and ax.containers[0].has_yerr  # error bars on the series that has spreads
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "4", "16"]  # the ε values, not 10^0, 10^1

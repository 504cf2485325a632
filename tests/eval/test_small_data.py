"""Small data: a degenerate number shows as 'not defined' (never 0.000 or nan ± nan) and the report warns."""

import math

import numpy as np

from pluribus.data.synthetic import make_synthetic_users
from pluribus.eval.probes import probe_tasks, probe_train_test
from pluribus.eval.report import markdown_table, mean_std, metric_text, split_warnings, warnings_markdown


def test_undefined_numbers_read_not_defined():
    assert mean_std([float("nan"), float("nan")]) == "not defined"
    assert mean_std([0.7, float("nan"), 0.9]) == "0.800 ± 0.100 (2 of 3 defined)"
    assert mean_std([0.7, 0.72, 0.74]) == "0.720 ± 0.016"
    assert mean_std([0.7]) == "0.700 (one run)"


def test_compare_word_reads_a_gap_within_the_spread_as_level():
    from pluribus.eval.report import compare_word

    assert compare_word([0.80, 0.82], [0.70, 0.72]) == "above"
    assert compare_word([0.70, 0.72], [0.80, 0.82]) == "below"
    assert compare_word([0.70, 0.76], [0.72, 0.74]) == "level with"  # gap 0.00 within a spread of 0.03
    assert compare_word([0.1, 0.1], [0.2, 0.2], higher_is_better=False) == "above"
    assert compare_word([0.8], [0.7]) == "not compared (one run) with"
    assert compare_word([float("nan")] * 2, [0.7, 0.7]) == "not defined"
    assert metric_text(float("inf")) == "not defined" and metric_text(0.5) == "0.500"
    table = markdown_table([{"task": "churn", "auc": float("nan")}])
    assert "not defined" in table and "nan" not in table


def test_one_class_test_split_gives_no_auc_instead_of_an_error_or_zero():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 2)), np.repeat([0, 1], 20)
    scores = probe_train_test(x, y, x[:5], np.zeros(5, dtype=int))
    assert math.isnan(scores["auc"]) and math.isnan(scores["ks"]) and 0.0 <= scores["acc"] <= 1.0
    multi = probe_train_test(x, np.arange(40) % 3, x[:4], np.zeros(4, dtype=int), kind="multiclass")
    assert math.isnan(multi["auc"])


def test_probe_tasks_on_a_tiny_data_set_warns_and_adapts():
    ds = make_synthetic_users(12, seed=3)
    x = ds.profile.to_numpy()
    results = probe_tasks(x, ds, seeds=(0,), folds=5)
    counts = {t: np.unique(ds.label_array(t)[1], return_counts=True)[1] for t in results}
    for task, result in results.items():
        smallest = int(counts[task].min()) if len(counts[task]) > 1 else 0
        if smallest < 2:
            assert not result.defined and "not defined" in result.warnings[0]
        elif smallest < 5:
            assert result.defined and f"uses {smallest} folds" in result.warnings[0]
            assert len(result.folds) == smallest
        else:
            assert result.warnings == ()
    assert any(r.warnings for r in results.values())  # 12 users: some class is rarer than 5


def test_split_warnings_name_the_split_and_the_missing_class():
    warnings = split_warnings("test", {"churn": [1, 1, 1], "plan": [0, 1, 2]}, classes={"plan": 3})
    assert warnings[0] == "the test split has 3 labelled users (fewer than 20): its numbers are noisy"
    assert "task 'churn': the test split holds 1 of its 2 classes, so its AUC is not defined" in warnings
    assert split_warnings("test", {"churn": [0, 1] * 15}) == []
    assert warnings_markdown(["a", "b"]) == "> **Warning:** a\n>\n> **Warning:** b\n\n" and warnings_markdown([]) == ""

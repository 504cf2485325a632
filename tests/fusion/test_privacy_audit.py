"""The small version of benchmarks/fusion/privacy_audit.py: an adversary's checks of every mechanism, in `make test`."""

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def audit():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "fusion" / "privacy_audit.py"
    spec = importlib.util.spec_from_file_location("privacy_audit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_small_audit_passes(audit):
    res = audit.run(20_000, [0.5, 2.0, 8.0], seeds_tried=100, attack_n=4_000)
    assert audit.check(res) == []
    tight = [row for row in res["mechanisms"] if row["mechanism"] in ("duchi", "hybrid") and row["epsilon"] == 2.0]
    assert all(row["threshold eps LB"] > 1.5 for row in tight)  # the audit is not vacuous


def test_audit_flags_an_under_noised_release(audit):
    import numpy as np

    rng = np.random.default_rng(0)
    # Laplace with half the scale its epsilon = 1 claims: the lower bound must exceed 1
    a, b = rng.laplace(-1.0, 1.0, 40_000), rng.laplace(1.0, 1.0, 40_000)
    thresholds = np.quantile(np.concatenate([a, b]), np.linspace(0.01, 0.99, 40))
    assert audit.threshold_lower_bound(a, b, thresholds, 0.05) > 1.0

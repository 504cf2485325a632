"""The shared / specific factor generator: factors are recoverable from the sources that carry them only."""

from __future__ import annotations

import numpy as np
import pytest

from pluribus.data.factors import factor_views
from pluribus.errors import ConfigError


def _r2(x: np.ndarray, y: np.ndarray) -> float:
    x1 = np.c_[x, np.ones(len(x))]
    coef, *_ = np.linalg.lstsq(x1, y, rcond=None)
    return float(1 - ((y - x1 @ coef) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())


def test_shared_factor_is_in_every_source_and_specific_only_in_its_own():
    data = factor_views(4000, n_sources=3, dim=32, shared_dim=2, specific_dim=2, noise=0.05, seed=1)
    assert sorted(data.views) == ["source0", "source1", "source2"] and data.views["source0"].dtype == np.float32
    for name, x in data.views.items():
        assert _r2(x, data.shared) > 0.6 and _r2(x, data.specific[name]) > 0.6
        for other in data.views:
            if other != name:
                assert _r2(x, data.specific[other]) < 0.02  # independent by construction


def test_mixing_is_fixed_by_mixing_seed_and_users_by_seed():
    a = factor_views(50, seed=0)
    b = factor_views(50, seed=1)
    same = factor_views(50, seed=0)
    assert np.array_equal(a.views["source1"], same.views["source1"])
    assert not np.allclose(a.shared, b.shared)
    # same mixing: a linear map fitted on chunk a predicts chunk b's source from its factors equally well
    lat_a, lat_b = (np.c_[d.shared, d.specific["source0"]] for d in (a, b))
    assert abs(_r2(lat_a, a.views["source0"]) - _r2(lat_b, b.views["source0"])) < 0.2


def test_bad_arguments():
    with pytest.raises(ConfigError, match="at least one factor"):
        factor_views(10, shared_dim=0, specific_dim=0)
    with pytest.raises(ConfigError, match="noise"):
        factor_views(10, noise=-1)

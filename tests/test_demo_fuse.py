"""The demo's PrivFusion step: institutions as Flower apps on their own files, an epsilon curve, one ledger."""

from types import SimpleNamespace

import numpy as np
import torch

from pluribus.demo import fuse as demo_fuse
from pluribus.fusion.flower.apps import PRIVACY_REPORT_FILE


def test_each_epsilon_is_fused_over_flower_from_the_parties_own_files(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(160, 6)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    ctx = SimpleNamespace(config=SimpleNamespace(quick=True, engine="inprocess"), run=SimpleNamespace(path=tmp_path))
    results, ledgers, spent, _ = demo_fuse._one_seed(x, y, 2, 0, ctx, "t", (1.0, 4.0))
    # the same model released at each ε: every institution's odometer holds the composed total, 1 + 4
    assert spent == {f"institution{k}": 5.0 for k in range(demo_fuse.PARTIES)}
    for eps in ("1", "4"):
        assert {f"PrivFusion ε={eps}, no adapter", f"PrivFusion ε={eps} + adapter"} <= set(results)
        # the hub's outputs of that ε: written by the Flower hub app, not by an in-process fusion
        assert (tmp_path / "fuse_parties" / "seed0" / f"eps{eps}" / PRIVACY_REPORT_FILE).exists()
    files = sorted(p.name for p in (tmp_path / "fuse_parties" / "seed0").glob("*.safetensors"))
    assert len(files) == 2 * demo_fuse.PARTIES  # each institution's own model and data file
    # the report's ledgers: every party's release at the shown ε, and the fuser's adapter (a public input)
    assert [led.party for led in ledgers] == [f"institution{k}" for k in range(demo_fuse.PARTIES)] + ["fuser"]
    assert all(led.private_noise for led in ledgers)
    assert results["logit ensemble (not private, upper bound)"]["auc"] > 0.8


def test_the_verdict_says_where_privfusion_stands_and_handles_undefined_auc():
    def rows(ours):
        return {"each institution alone (mean)": {"auc": [0.69, 0.71]}, "calibration set alone": {"auc": [0.74, 0.76]},
                "PrivFusion ε=1 + adapter": {"auc": ours}, "PrivFusion ε=4 + adapter": {"auc": [0.80, 0.80]}}

    text = demo_fuse._verdict(rows([0.60, 0.60]), (1.0, 4.0))
    assert "ε=1: 0.600 ± 0.000, below an institution alone, below the calibration set alone" in text
    assert "ε=4: 0.800 ± 0.000, above an institution alone, above the calibration set alone" in text
    # 0.705 vs 0.700 with a spread of 0.01 over seeds is level, not above
    assert "ε=1: 0.705 ± 0.025, level with an institution alone" in demo_fuse._verdict(rows([0.68, 0.73]), (1.0,))
    assert "not defined" in demo_fuse._verdict({**rows([0.6]), "calibration set alone": {"auc": [np.nan]}}, (1.0,))
    # one seed (--quick): no spread, so no verdict, and no '± 0.000'
    one = demo_fuse._verdict({**rows([0.6]), "each institution alone (mean)": {"auc": [0.7]}}, (1.0,))
    assert "ε=1: 0.600 (one run), not compared (one run) with an institution alone" in one

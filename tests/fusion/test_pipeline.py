import json
import math

import numpy as np
import pytest
import torch

from pluribus.errors import ConfigError, DataError, ShapeError
from pluribus.fusion.core.adapter import AdaptedModel, fit_adapter
from pluribus.fusion.core.config import AdapterConfig, FusionConfig
from pluribus.fusion.core.descriptors import clip_bounds, release_party
from pluribus.fusion.core.exchange import run_exchange
from pluribus.fusion.core.fuse import fuse_releases, privfusion
from pluribus.fusion.core.models import MLP, SmallCNN, accuracy, train_model
from pluribus.fusion.core.spec import spec_for
from pluribus.fusion.privacy.accounting import PrivacyLedger, Release, privacy_report_markdown


@pytest.fixture(scope="module")
def digits():
    from pluribus.data.images import load_digits_images

    x, y = load_digits_images()
    return torch.as_tensor(x[:600]).reshape(600, -1), torch.as_tensor(y[:600])


@pytest.fixture(scope="module")
def parties(digits):
    x, y = digits
    models = []
    for k in range(3):
        torch.manual_seed(k)
        m = MLP(64, (32, 32), 10)
        idx = torch.arange(k * 150, (k + 1) * 150)
        models.append(train_model(m, x[idx], y[idx], epochs=15, seed=k))
    return models


def test_release_clips_perturbs_and_omits_running_stats():
    torch.manual_seed(0)
    cnn = SmallCNN(1, (4, 6), 8, 3, 8)
    rel = release_party(cnn, spec_for(cnn), FusionConfig(epsilon=1.0), party="p")
    assert not any("running" in k or "num_batches" in k for k in rel.params)
    assert set(rel.params) == {k for k, _ in cnn.named_parameters()}
    bounds = clip_bounds(cnn, clip_mult=2.0, bn_clip=2.0)
    assert bounds["fc1.weight"] == pytest.approx(2.0 / math.sqrt(6 * 2 * 2))
    assert bounds["stem_bn.weight"] == 2.0
    for key, value in rel.params.items():
        assert not torch.allclose(value, cnn.state_dict()[key])


def test_ledger_per_scalar_and_totals(digits, parties):
    x, _ = digits
    cfg = FusionConfig(epsilon=2.0, use_act_stats=True, act_share=0.25)
    rel = release_party(parties[0], spec_for(parties[0]), cfg, party="p0", data=x[:100])
    ledger = rel.ledger
    assert [r.kind for r in ledger.releases] == ["weights", "activations"]
    assert ledger.releases[0].epsilon == pytest.approx(1.5)
    assert ledger.releases[1].epsilon == pytest.approx(0.5)
    # MLP 64-32-32-10: a first-layer weight can move its unit's statistic and all 32 of layer 2
    assert ledger.releases[0].dependent_stats == 33
    assert ledger.per_scalar() == (pytest.approx(1.5 + 33 * 0.5), 0.0)
    n_w = sum(p.numel() for p in parties[0].parameters())
    assert ledger.basic_total()[0] == pytest.approx(1.5 * n_w + 0.5 * 64)
    assert set(rel.acts) == {"h0", "h1"}
    report = json.loads(json.dumps(ledger.as_dict()))
    assert report["per_scalar"]["epsilon"] == pytest.approx(1.5 + 33 * 0.5)
    units = [g["unit"] for g in report["guarantees"]]
    assert units[0].startswith("one weight scalar") and units[1].startswith("one activation statistic")
    assert "Privacy report" in privacy_report_markdown([ledger])


def test_gaussian_releases_compose_with_dp_accounting():
    ledger = PrivacyLedger("p")
    ledger.record(Release("w", "weights", "gaussian", 1.0, 1e-6, 100, noise_multiplier=5.0))
    total = ledger.gaussian_total(1e-5)
    # 100 Gaussians of multiplier 5 = one of multiplier 0.5: far below basic composition's 100
    assert 1.0 < total["epsilon_rdp"] < 25.0
    assert ledger.basic_total()[0] == pytest.approx(100.0)


def test_fused_accuracy_ordering(digits, parties):
    x, y = digits
    xt, yt = x[450:], y[450:]
    clean = privfusion(parties, config=FusionConfig(epsilon=math.inf))
    noisy = privfusion(parties, config=FusionConfig(epsilon=0.5, noise_seed=0))
    assert accuracy(clean.model, xt, yt) > accuracy(noisy.model, xt, yt)
    assert clean.ledgers[0].releases == []


def test_adapter_starts_equal_and_learns(digits, parties):
    x, y = digits
    fused = privfusion(parties, config=FusionConfig(epsilon=2.0, noise_seed=0)).model
    with torch.no_grad():
        before = fused(x[:50]).clone()
        adapted = AdaptedModel(fused)
        assert torch.equal(adapted(x[:50]), before)  # zero-initialised output projections
    model, history, extra = fit_adapter(fused, x[300:450], y[300:450], AdapterConfig(epochs=15))
    assert extra is None
    assert history[-1] < history[0]
    assert all(not p.requires_grad for p in model.base.parameters())


@pytest.mark.slow
def test_private_adapter_records_dp_sgd_cost(digits, parties):
    x, y = digits
    fused = privfusion(parties, config=FusionConfig(epsilon=4.0, noise_seed=0)).model
    cfg = AdapterConfig(epochs=2, private=True, dp_epsilon=3.0, batch_size=32)
    model, history, extra = fit_adapter(fused, x[300:450], y[300:450], cfg)
    assert extra is not None and extra.kind == "adapter"
    assert 0 < extra.epsilon <= 3.0 + 0.1
    assert len(history) == 2


def test_bad_inputs_raise_clear_errors(digits, parties):
    x, y = digits
    with pytest.raises(ConfigError, match="party 1 is a SmallCNN"):
        privfusion([parties[0], SmallCNN(1, (4, 4), 8, 10, 8)])
    with pytest.raises(ShapeError, match="party 1 tensor 'layers.0.weight'"):
        privfusion([parties[0], MLP(64, (16, 32), 10)])
    broken = MLP(64, (32, 32), 10)
    broken.load_state_dict(parties[1].state_dict())
    with torch.no_grad():
        broken.layers[1].weight[3, 4] = float("inf")
    with pytest.raises(DataError, match="party 'party1' tensor 'layers.1.weight'"):
        privfusion([parties[0], broken], config=FusionConfig(epsilon=1.0))
    for eps in (0.0, -2.0):
        with pytest.raises(ConfigError, match="epsilon"):
            FusionConfig(epsilon=eps)
    with pytest.raises(ShapeError, match="adapter calibration inputs"):
        privfusion(parties, config=FusionConfig(epsilon=1.0), calib=(torch.zeros(10, 28, 28), y[:10]),
                   adapter=AdapterConfig(epochs=1))
    with pytest.raises(ConfigError, match="calibration data"):
        privfusion([SmallCNN(1, (4, 4), 8, 3, 8), SmallCNN(1, (4, 4), 8, 3, 8)], config=FusionConfig(epsilon=1.0))


def test_non_finite_release_from_a_party_is_rejected(parties):
    spec = spec_for(parties[0])
    rels = [release_party(m, spec, FusionConfig(epsilon=1.0), party=f"p{k}") for k, m in enumerate(parties)]
    rels[2].params["layers.2.bias"][0] = float("nan")
    with pytest.raises(DataError, match="party 'p2' tensor 'layers.2.bias'"):
        fuse_releases(rels, spec, FusionConfig(epsilon=1.0))


def _raw_values(models):
    return np.unique(np.concatenate([p.detach().reshape(-1).numpy() for m in models for p in m.state_dict().values()
                                     if p.is_floating_point()]))


@pytest.mark.parametrize("transport", ["inprocess", "flower"])
def test_exchange_messages_carry_no_raw_weight(parties, transport):
    cfg = FusionConfig(epsilon=1.0, noise_seed=0)
    result = run_exchange(parties, config=cfg, transport=transport)
    raw = _raw_values(parties)
    kinds = {m.kind for m in result.log}
    assert kinds == {"release", "relay_releases", "aligned", "relay_aligned"}
    assert len(result.log) == 4 * len(parties)
    for message in result.log:
        for name, array in message.arrays.items():
            leaked = np.intersect1d(raw, array.reshape(-1).numpy())
            assert leaked.size == 0, f"{message.src}->{message.dst} {message.kind} {name} holds raw values"
    fused = list(result.fused.values())
    assert all(torch.equal(fused[0][k], f[k]) for f in fused for k in f)
    # the exchange computes the same fused tensors as the in-process fuser on the same releases
    spec = spec_for(parties[0])
    rels = [release_party(m, spec, cfg, party=f"party{k}") for k, m in enumerate(parties)]
    direct = fuse_releases(rels, spec, cfg)
    assert all(torch.allclose(direct[k], fused[0][k]) for k in direct)


def test_exchange_leak_check_detects_raw_weights_without_dp(parties):
    with pytest.raises(ConfigError, match="raw weights"):
        run_exchange(parties, config=FusionConfig(epsilon=math.inf))
    result = run_exchange(parties, config=FusionConfig(epsilon=math.inf), allow_non_private=True)
    first = result.log[0]
    assert np.intersect1d(_raw_values(parties), first.arrays["params/layers.0.weight"].reshape(-1).numpy()).size > 0


@pytest.mark.slow
def test_cli_run_writes_report_and_privacy_json(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from pluribus.fusion.cli import app

    monkeypatch.setenv("PLURIBUS_PROGRESS", "0")
    cfg = tmp_path / "run.toml"
    cfg.write_text('dataset = "digits"\nhidden = [16]\nparties = 2\nepochs = 2\ncalib_size = 100\n'
                   '[fusion]\nepsilon = 2.0\n[adapter]\nepochs = 2\n')
    result = CliRunner().invoke(app, ["run", "--config", str(cfg), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Privacy report" in report and "reconstruction" in report
    privacy = json.loads((tmp_path / "run" / "privacy.json").read_text())
    assert privacy["parties"][0]["per_scalar"]["epsilon"] == pytest.approx(2.0)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {"party0", "ensemble (upper bound)", "fused", "fused + adapter"} <= set(metrics["accuracy"])


def test_activation_statistics_enter_matching_and_ledger(digits, parties):
    x, y = digits
    cfg = FusionConfig(epsilon=4.0, use_act_stats=True, multi="mean", noise_seed=0)
    result = privfusion(parties, config=cfg, party_data=[x[:150], x[150:300], x[300:450]])
    assert all(set(r.acts) == {"h0", "h1"} for r in result.releases)
    # a first-layer weight can move its own unit's statistic and all 32 of the second layer: 2 + 33 * 2
    assert all(led.per_scalar()[0] == pytest.approx(2.0 + 33 * 2.0) for led in result.ledgers)
    assert torch.isfinite(result.model(x[450:])).all()
    with pytest.raises(ConfigError, match="needs the party's data"):
        privfusion(parties, config=cfg)


def test_cnn_fusion_under_dp_reestimates_batchnorm(digits):
    x, y = digits
    imgs = x.reshape(-1, 1, 8, 8)
    models = []
    for k in range(2):
        torch.manual_seed(k)
        models.append(train_model(SmallCNN(1, (4, 6), 8, 10, 8), imgs[k * 100:(k + 1) * 100],
                                  y[k * 100:(k + 1) * 100], epochs=2, seed=k))
    result = privfusion(models, config=FusionConfig(epsilon=2.0, noise_seed=0),
                        calib=(imgs[400:500], y[400:500]))
    bn = result.model.stem_bn
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    assert torch.isfinite(result.model(imgs[:5])).all()


def test_adapter_validation_keeps_the_fused_model_when_training_diverges(digits, parties):
    x, y = digits
    fused = privfusion(parties, config=FusionConfig(epsilon=math.inf)).model
    with torch.no_grad():
        before = fused(x[:40]).clone()
    model, history, _ = fit_adapter(fused, x[300:450], y[300:450], AdapterConfig(lr=1e4, epochs=3, patience=2))
    with torch.no_grad():
        assert torch.allclose(model(x[:40]), before)  # epoch 0 (no correction) had the best validation loss
    with pytest.raises(ConfigError, match="val_fraction"):
        AdapterConfig(val_fraction=1.0)


def test_docs_quick_start_runs(capsys):
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "guides" / "fusion.md").read_text(encoding="utf-8")
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "docs/guides/fusion.md", "exec"), {})
    out = capsys.readouterr().out
    assert float(out.splitlines()[0]) > 0.3  # fused + adapter accuracy on digits
    assert "Privacy report" in out


def test_exchange_honours_the_matching_start(parties):
    spec = spec_for(parties[0])
    for start in ("identity", "forward"):
        cfg = FusionConfig(epsilon=1.0, noise_seed=0, match_start=start)
        fused = next(iter(run_exchange(parties, config=cfg).fused.values()))
        rels = [release_party(m, spec, cfg, party=f"party{k}") for k, m in enumerate(parties)]
        direct = fuse_releases(rels, spec, cfg)
        assert all(torch.allclose(direct[k], fused[k]) for k in direct), start

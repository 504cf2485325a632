import math

import pytest
import torch

from pluribus.fusion.core.config import AdapterConfig, FusionConfig
from pluribus.fusion.core.descriptors import activation_dependence, release_party
from pluribus.fusion.core.fuse import privfusion
from pluribus.fusion.core.models import MLP, SmallCNN, clone_model
from pluribus.fusion.core.spec import spec_for
from pluribus.fusion.privacy.accounting import PrivacyLedger, Release, privacy_report, privacy_report_markdown


def _stats(model, x):
    with torch.no_grad():
        return torch.cat([a.mean(0).reshape(-1) for a in model.hidden_activations(x)])


def _brute_force_counts(model, x, bump=0.5):
    """For every parameter element: how many activation statistics move when that element alone is changed."""
    base = _stats(model, x)
    counts = {}
    for name, param in model.named_parameters():
        c = torch.zeros(param.shape, dtype=torch.int64)
        flat = param.data.view(-1)
        for i in range(flat.numel()):
            old = float(flat[i])
            flat[i] = old + bump
            c.view(-1)[i] = int((_stats(model, x) - base).abs().gt(1e-7).sum())
            flat[i] = old
        counts[name] = c
    return counts


def _positive_probe(model):
    probe = clone_model(model).eval()
    with torch.no_grad():
        for p in probe.parameters():
            p.copy_(p.abs() + 0.1)
        for m in probe.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
    return probe


@pytest.mark.parametrize("make", [lambda: MLP(6, (5, 4), 3), lambda: SmallCNN(1, (2, 3), 4, 3, 4)])
def test_weight_dependence_equals_a_brute_force_count(make):
    torch.manual_seed(0)
    model = make().eval()
    counts = activation_dependence(model)
    x = 0.5 + torch.rand((8, *model.input_shape()), generator=torch.Generator().manual_seed(0))
    brute = _brute_force_counts(_positive_probe(model), x)
    for name in counts:
        assert bool((brute[name] <= counts[name]).all()), name
        if isinstance(model, MLP):
            assert torch.equal(counts[name], brute[name]), name
    if isinstance(model, SmallCNN):  # with every window position a path (average pooling), the counts are exact
        from torch.nn import functional as F

        saved = F.max_pool2d
        F.max_pool2d = lambda t, k, *a, **kw: F.avg_pool2d(t, k)
        try:
            averaged = _brute_force_counts(_positive_probe(model), x)
        finally:
            F.max_pool2d = saved
        assert all(torch.equal(counts[name], averaged[name]) for name in counts)
    # on the real weights and real-looking data some paths are dead, never more: the count is an upper bound
    real = _brute_force_counts(model, torch.randn((16, *model.input_shape()), generator=torch.Generator().manual_seed(1)))
    for name in counts:
        assert bool((real[name] <= counts[name]).all()), name
    if isinstance(model, SmallCNN):
        # the residual stream's statistic is taken after the block: the block's weights reach it too
        assert int(counts["block_conv1.weight"].min()) == 1 + 2 + 3 + 4  # its unit, stream, conv3, fc1


def test_per_weight_cost_counts_every_statistic_it_moves():
    torch.manual_seed(0)
    model = MLP(6, (5, 4), 3)
    cfg = FusionConfig(epsilon=2.0, use_act_stats=True, act_share=0.25, noise_seed=0)
    rel = release_party(model, spec_for(model), cfg, party="p", data=torch.randn(20, 6))
    # a first-layer weight moves its unit's statistic and the 4 of the next layer
    assert rel.ledger.releases[0].dependent_stats == 5
    assert rel.ledger.per_scalar()[0] == pytest.approx(1.5 + 5 * 0.5)
    assert rel.ledger.guarantees()[0]["epsilon"] == pytest.approx(4.0)


def test_units_are_never_added_and_public_inputs_are_listed():
    ledger = PrivacyLedger("p", noise="test", private_noise=True)
    ledger.record(Release("weights", "weights", "hybrid", 1.0, 0.0, 100))
    ledger.record(Release("adapter_dp_sgd", "adapter", "dp-sgd", 3.0, 1e-5, 1, unit="calibration example"))
    assert ledger.per_scalar() == (1.0, 0.0)
    assert ledger.basic_total() == (100.0, 0.0)
    units = [g["unit"] for g in ledger.guarantees()]
    assert "calibration example" in units and len(units) == 3


def test_fusion_report_lists_averaging_weights_batchnorm_and_adapter(tmp_path):
    torch.manual_seed(0)
    models = [SmallCNN(1, (2, 3), 4, 3, 4) for _ in range(2)]
    x = torch.randn(40, 1, 4, 4)
    y = torch.randint(0, 3, (40,))
    result = privfusion(models, config=FusionConfig(epsilon=2.0), calib=(x, y), weights=[10.0, 30.0],
                        adapter=AdapterConfig(epochs=1))
    for ledger in result.ledgers:
        assert [r.kind for r in ledger.releases] == ["weights", "public"]
        assert ledger.private_noise and "CSPRNG" in ledger.noise
    fuser = result.fuser_ledger
    assert fuser is not None and {r.name for r in fuser.releases} == {"BatchNorm running statistics", "filter adapter"}
    report = privacy_report(result.all_ledgers)
    assert report["private"] is True
    text = privacy_report_markdown(result.all_ledgers)
    assert text.count("## Privacy report") == 1 and "not protected" in text and "NOT PRIVATE" not in text
    with pytest.raises(Exception, match="BatchNorm"):
        privfusion(models, config=FusionConfig(epsilon=2.0), calib=(x, y),
                   adapter=AdapterConfig(epochs=1, private=True))


def test_seeded_noise_is_labelled_not_private():
    models = [MLP(6, (5,), 3) for _ in range(2)]
    result = privfusion(models, config=FusionConfig(epsilon=2.0, noise_seed=5))
    text = privacy_report_markdown(result.all_ledgers)
    from pluribus.fusion.privacy.noise import seed_fingerprint

    assert "NOT PRIVATE" in text and seed_fingerprint(5) in text
    assert "noise_seed=5" not in text and "seed 5" not in text  # only a fingerprint of the seed is reported
    assert privacy_report(result.all_ledgers)["private"] is False
    again = privfusion(models, config=FusionConfig(epsilon=2.0, noise_seed=5))
    assert all(torch.equal(result.fused[k], again.fused[k]) for k in result.fused)


def test_ledger_round_trips_through_json():
    import json

    torch.manual_seed(0)
    model = MLP(6, (5, 4), 3)
    rel = release_party(model, spec_for(model), FusionConfig(epsilon=1.0, use_act_stats=True), party="p",
                        data=torch.randn(10, 6))
    back = PrivacyLedger.from_dict(json.loads(json.dumps(rel.ledger.as_dict())))
    assert back.releases == rel.ledger.releases and back.noise == rel.ledger.noise
    assert math.isinf(PrivacyLedger.from_dict({"party": "q", "releases": [
        {"name": "n", "kind": "public", "mechanism": "none", "epsilon": "inf", "delta": 0, "count": 1}]}
    ).releases[0].epsilon)

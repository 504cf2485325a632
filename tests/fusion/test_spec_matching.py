import math

import pytest
import torch

from pluribus.errors import ConfigError, ShapeError
from pluribus.fusion.core.config import FusionConfig
from pluribus.fusion.core.fuse import privfusion
from pluribus.fusion.core.matching import align, graph_matching, match_many, ot_maps, weight_matching
from pluribus.fusion.core.models import MLP, SmallCNN, clone_model
from pluribus.fusion.core.spec import (
    apply_perms,
    apply_transport,
    invert_perm,
    random_perms,
    spec_for,
)


def _mlp(seed=0, hidden=(24, 16)):
    torch.manual_seed(seed)
    return MLP(20, hidden, 5).eval()


def _cnn(seed=0):
    torch.manual_seed(seed)
    model = SmallCNN(1, (6, 8), 12, 5, 8)
    for mod in model.modules():  # non-trivial BatchNorm state so a wrong permutation shows
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.normal_()
            mod.running_mean.normal_()
            mod.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _permuted_copy(model, seed):
    spec = spec_for(model)
    perms = random_perms(spec, generator=torch.Generator().manual_seed(seed))
    other = clone_model(model)
    other.load_state_dict(apply_perms(spec, model.state_dict(), perms))
    return other.eval(), perms


@pytest.mark.parametrize("make,x", [(_mlp, (7, 20)), (_cnn, (7, 1, 8, 8))])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_permutation_leaves_outputs_unchanged(make, x, seed):
    model = make()
    other, perms = _permuted_copy(model, seed)
    assert any(not torch.equal(p, torch.arange(p.numel())) for p in perms.values())
    inputs = torch.randn(*x, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert torch.allclose(model(inputs), other(inputs), atol=1e-5)
    assert not torch.equal(model.state_dict()["layers.0.weight" if isinstance(model, MLP) else "fc1.weight"],
                           other.state_dict()["layers.0.weight" if isinstance(model, MLP) else "fc1.weight"])


def test_wrong_spec_changes_outputs():
    """The invariance test above can fail: permuting without the next layer's columns breaks the model."""
    model = _mlp()
    sd = dict(model.state_dict())
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    sd["layers.0.weight"] = sd["layers.0.weight"][perm]
    sd["layers.0.bias"] = sd["layers.0.bias"][perm]
    broken = clone_model(model)
    broken.load_state_dict(sd)
    x = torch.randn(5, 20)
    assert not torch.allclose(model(x), broken(x), atol=1e-3)


@pytest.mark.parametrize("make", [_mlp, _cnn])
@pytest.mark.parametrize("solver", ["hungarian", "ot", "graph"])
def test_fusing_with_permuted_self_recovers_the_original(make, solver):
    model = make()
    other, _ = _permuted_copy(model, 5)
    result = privfusion([model, other], config=FusionConfig(epsilon=math.inf, solver=solver))
    for key, value in model.state_dict().items():
        assert torch.equal(result.fused[key], value), key


def test_plain_averaging_of_permuted_self_does_not_recover():
    model = _mlp()
    other, _ = _permuted_copy(model, 5)
    result = privfusion([model, other], config=FusionConfig(epsilon=math.inf, solver="identity"))
    assert not torch.allclose(result.fused["layers.0.weight"], model.state_dict()["layers.0.weight"])


@pytest.mark.parametrize("make", [_mlp, _cnn])
def test_matching_recovers_a_planted_permutation_under_small_noise(make):
    model = make()
    spec = spec_for(model)
    ref = model.state_dict()
    planted = random_perms(spec, generator=torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(3)
    other = {k: v + 0.01 * v.std() * torch.randn(v.shape, generator=g) if v.is_floating_point() and v.numel() > 1 else v
             for k, v in apply_perms(spec, ref, planted).items()}
    found = weight_matching(spec, ref, other)
    for name, perm in planted.items():
        assert torch.equal(found[name], invert_perm(perm)), name


def test_graph_matching_recovers_planted_permutation_and_limits_size():
    model = _mlp(hidden=(12, 10))
    spec = spec_for(model)
    planted = random_perms(spec, generator=torch.Generator().manual_seed(2))
    other = apply_perms(spec, model.state_dict(), planted)
    found = graph_matching(spec, model.state_dict(), other)
    assert all(torch.equal(found[k], invert_perm(planted[k])) for k in planted)
    with pytest.raises(ConfigError, match="dense"):
        graph_matching(spec, model.state_dict(), other, max_units=8)


def test_ot_maps_on_a_permuted_copy_are_permutation_matrices():
    model = _mlp()
    spec = spec_for(model)
    planted = random_perms(spec, generator=torch.Generator().manual_seed(4))
    other = apply_perms(spec, model.state_dict(), planted)
    maps = ot_maps(spec, model.state_dict(), other)
    for name, m in maps.items():
        assert torch.allclose(m, torch.eye(spec.sizes[name])[invert_perm(planted[name])].double())
    as_perm = apply_perms(spec, other, {k: invert_perm(p) for k, p in planted.items()})
    via_map = apply_transport(spec, other, maps)
    assert all(torch.allclose(as_perm[k], via_map[k], atol=1e-6) for k in as_perm)


def test_match_many_mean_mode_aligns_three_copies():
    model = _mlp()
    copies = [model] + [_permuted_copy(model, s)[0] for s in (1, 2)]
    spec = spec_for(model)
    aligned = match_many(spec, [m.state_dict() for m in copies], mode="mean")
    for params in aligned:
        assert all(torch.equal(params[k], v) for k, v in model.state_dict().items())


def test_spec_rejects_mismatched_shapes_and_unknown_solver():
    model, small = _mlp(), _mlp(hidden=(24, 8))
    spec = spec_for(model)
    with pytest.raises(ShapeError, match="layers.1.weight"):
        weight_matching(spec, model.state_dict(), small.state_dict())
    with pytest.raises(ConfigError, match="solver"):
        align(spec, model.state_dict(), model.state_dict(), solver="magic")
    with pytest.raises(ConfigError, match="no permutation spec"):
        spec_for(torch.nn.Linear(2, 2))

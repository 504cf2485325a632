"""Party-local releases: clipped, perturbed weights and per-unit activation statistics, plus the ledger.

Everything here runs at the party. What leaves the party is a :class:`PartyRelease`: the perturbed
parameters (BatchNorm running statistics are *not* released under DP: the fused model re-estimates them
on calibration data), the perturbed per-unit mean activations on the party's own data (optional), and the
ledger entries that describe them. With ``epsilon = inf`` the release is the raw model (no privacy).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from pluribus.errors import ConfigError
from pluribus.fusion.core.config import FusionConfig
from pluribus.fusion.core.models import check_inputs, clone_model
from pluribus.fusion.core.spec import PermutationSpec
from pluribus.fusion.privacy.accounting import PrivacyLedger, Release
from pluribus.fusion.privacy.ldp import GaussianMechanism, Mechanism, check_finite, make_mechanism
from pluribus.fusion.privacy.noise import NoiseSource, noise_source

RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class PartyRelease:
    """What one party sends: perturbed parameters, perturbed activation statistics, and its ledger.

    Attributes:
        party: the party's name.
        params: its clipped, perturbed parameters.
        acts: its clipped, perturbed activation statistics (empty without ``use_act_stats``).
        ledger: what the release cost, or None.
        private: whether the noise came from a private source (False: a seeded, reproducible one).
    """

    party: str
    params: dict[str, torch.Tensor]
    acts: dict[str, torch.Tensor] = field(default_factory=dict)
    ledger: PrivacyLedger | None = None
    private: bool = True

    def check(self) -> None:
        """Raise DataError if any released tensor holds non-finite values (names party and tensor)."""
        for key, value in {**self.params, **{f"acts.{k}": v for k, v in self.acts.items()}}.items():
            if torch.is_floating_point(value):
                check_finite(f"party {self.party!r} tensor {key!r}", value)


def clip_bounds(model: nn.Module, *, clip_mult: float, bn_clip: float) -> dict[str, float]:
    """Data-independent per-tensor clip bound ``c`` (values are clipped to ``[-c, c]``)."""
    bounds: dict[str, float] = {}
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
            for p_name, _ in module.named_parameters(recurse=False):
                bounds[prefix + p_name] = bn_clip
        elif isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d):
            fan_in = module.weight[0].numel()
            for p_name, _ in module.named_parameters(recurse=False):
                bounds[prefix + p_name] = clip_mult / math.sqrt(fan_in)
    missing = [n for n, _ in model.named_parameters() if n not in bounds]
    if missing:
        raise ConfigError(f"no clip rule for parameters {missing}; fusion supports Linear, Conv and BatchNorm")
    return bounds


@torch.no_grad()
def activation_stats(model: nn.Module, spec: PermutationSpec, x: torch.Tensor, *, batch_size: int = 512) -> dict[str, torch.Tensor]:
    """Per-unit mean post-ReLU activation of every permuted layer on ``x`` (keys: perm names)."""
    check_inputs(model, x, what="party data")
    model.eval()
    sums: list[torch.Tensor] | None = None
    for start in range(0, x.shape[0], batch_size):
        acts = model.hidden_activations(x[start : start + batch_size])  # type: ignore[operator]
        batch_sums = [a.sum(0) for a in acts]
        sums = batch_sums if sums is None else [s + b for s, b in zip(sums, batch_sums, strict=True)]
    assert sums is not None
    return {name: s / x.shape[0] for name, s in zip(spec.order, sums, strict=True)}


@contextmanager
def _max_pool_as_average() -> Iterator[None]:
    saved = F.max_pool2d

    def average(x: torch.Tensor, kernel_size: Any, stride: Any = None, padding: Any = 0, *args: Any, **kwargs: Any):
        return F.avg_pool2d(x, kernel_size, stride, padding)

    F.max_pool2d = average  # type: ignore[assignment]
    try:
        yield
    finally:
        F.max_pool2d = saved


def activation_dependence(model: nn.Module) -> dict[str, torch.Tensor]:
    """For every parameter element, how many released activation statistics it can change (structurally).

    The count is taken on a probe copy whose parameters are all positive (``|p| + 0.1``), whose BatchNorm
    statistics are neutral and whose inputs are positive, so that every ReLU passes and no gradient cancels:
    a statistic then has a non-zero gradient for exactly the parameters with a path to it, whatever the
    party's data or weights. Max-pooling is traced as average pooling over the same windows: a max can pick
    any position of its window for some data, so every position is a path (a superset, never fewer).
    """
    probe = clone_model(model).eval()
    with torch.no_grad():
        for param in probe.parameters():
            param.copy_(param.abs() + 0.1)
        for module in probe.modules():
            if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
                module.running_mean.zero_()  # type: ignore[union-attr]
                module.running_var.fill_(1.0)  # type: ignore[union-attr]
    shape = probe.input_shape()  # type: ignore[operator]
    x = 0.5 + torch.rand((8, *shape), generator=torch.Generator().manual_seed(0))
    with _max_pool_as_average():
        stats = torch.cat([a.mean(0).reshape(-1) for a in probe.hidden_activations(x)])  # type: ignore[operator]
    names, params = zip(*probe.named_parameters(), strict=True)
    counts = {name: torch.zeros(p.shape, dtype=torch.int64) for name, p in zip(names, params, strict=True)}
    for s in range(stats.numel()):
        grads = torch.autograd.grad(stats[s], params, retain_graph=True, allow_unused=True)
        for name, grad in zip(names, grads, strict=True):
            if grad is not None:
                counts[name] += (grad != 0).to(torch.int64)
    return counts


def release_party(
    model: nn.Module,
    spec: PermutationSpec,
    config: FusionConfig,
    *,
    party: str,
    data: torch.Tensor | None = None,
    noise: NoiseSource | None = None,
    before_noise: Callable[[PrivacyLedger], None] | None = None,
) -> PartyRelease:
    """Clip and perturb a party's model (and activation statistics on ``data``) for release.

    The noise comes from ``noise`` if given, else from the operating system's CSPRNG, or (not private) from
    ``config.noise_seed`` with the party name as stream. ``before_noise`` is called with the release's complete
    ledger before any noise is drawn (a party's odometer debits it there, and may refuse by raising).

    Args:
        model: the party's trained model.
        spec: its permutation spec.
        config: the fusion settings (mechanism, epsilon, clipping).
        party: the party's name (in the ledger; the stream of seeded noise).
        data: the party's own inputs for activation statistics (``config.use_act_stats``), or None.
        noise: the noise source, or None (see above).
        before_noise: called with the release's ledger before any noise is drawn, or None.

    Raises:
        ConfigError: a parameter without a clip rule, or activation statistics asked for without ``data``.
    """
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for key, value in state.items():
        if torch.is_floating_point(value):
            check_finite(f"party {party!r} tensor {key!r}", value)
    if config.use_act_stats and data is None:
        raise ConfigError(f"party {party!r}: use_act_stats needs the party's data")
    acts = activation_stats(model, spec, data) if (config.use_act_stats and data is not None) else {}
    if not config.private:
        return PartyRelease(party, state, acts, PrivacyLedger(party, noise="none: raw model (epsilon = inf)",
                                                              private_noise=False), private=False)
    noise = noise or noise_source(config.noise_seed, stream=party)
    ledger = PrivacyLedger(party, noise=noise.describe(), private_noise=noise.private)
    bounds = clip_bounds(model, clip_mult=config.clip_mult, bn_clip=config.bn_clip)
    dependence = activation_dependence(model) if acts else {}
    # every mechanism and the whole ledger first: ``before_noise`` sees the release's cost before any draw
    weight_mechs: dict[str, Mechanism] = {}
    n_weights, most_dependent = 0, 0
    for key, value in state.items():
        if key.rsplit(".", 1)[-1] in RUNNING_STATS:
            continue  # never released under DP; the fuser re-estimates them on calibration data
        c = bounds[key]
        weight_mechs[key] = make_mechanism(config.mechanism, config.weight_epsilon, lo=-c, hi=c, delta=config.delta)
        n_weights += value.numel()
        if key in dependence:
            most_dependent = max(most_dependent, int(dependence[key].max()))
    # the ledger states the worst tensor: the smallest Gaussian noise multiplier (the lattices differ slightly)
    mech_w = min(weight_mechs.values(), key=lambda m: _noise_multiplier(m) or 0.0)
    ledger.record(
        Release(
            "weights", "weights", config.mechanism, config.weight_epsilon, mech_w.delta, n_weights,
            unit="weight scalar", neighbouring="replace-one weight value within its clip range [-c, c]",
            noise_multiplier=_noise_multiplier(mech_w), dependent_stats=most_dependent,
            realised_epsilon=max(m.realised_epsilon for m in weight_mechs.values()),
        )
    )
    mech_a = None
    if acts:
        mech_a = make_mechanism(config.act_mechanism, config.act_epsilon, lo=0.0, hi=config.act_max, delta=config.delta)
        ledger.record(
            Release(
                "activation_means", "activations", config.act_mechanism, config.act_epsilon, mech_a.delta,
                sum(v.numel() for v in acts.values()), unit="per-unit mean activation",
                neighbouring=f"replace-one statistic value within [0, {config.act_max:g}] (covers any change of the party's data)",
                noise_multiplier=_noise_multiplier(mech_a), realised_epsilon=mech_a.realised_epsilon,
            )
        )
    if before_noise is not None:
        before_noise(ledger)
    released = {key: mech(state[key], noise=noise) for key, mech in weight_mechs.items()}
    released_acts = {name: mech_a(value, noise=noise) for name, value in acts.items()} if mech_a is not None else {}
    return PartyRelease(party, released, released_acts, ledger, private=True)


def _noise_multiplier(mech: Mechanism) -> float | None:
    return mech.noise_multiplier if isinstance(mech, GaussianMechanism) else None

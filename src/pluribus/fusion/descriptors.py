"""Party-local releases: clipped, perturbed weights and per-unit activation statistics, plus the ledger.

Everything here runs at the party. What leaves the party is a :class:`PartyRelease`: the perturbed
parameters (BatchNorm running statistics are *not* released under DP: the fused model re-estimates them
on calibration data), the perturbed per-unit mean activations on the party's own data (optional), and the
ledger entries that describe them. With ``epsilon = inf`` the release is the raw model (no privacy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from pluribus.errors import ConfigError
from pluribus.fusion.accounting import PrivacyLedger, Release
from pluribus.fusion.config import FusionConfig
from pluribus.fusion.ldp import GaussianMechanism, Mechanism, check_finite, make_mechanism
from pluribus.fusion.models import check_inputs
from pluribus.fusion.spec import PermutationSpec

RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class PartyRelease:
    """What one party sends: perturbed parameters, perturbed activation statistics, and its ledger."""

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


def _release_tensor(mech: Mechanism, value: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return mech(value, generator=generator)


def release_party(
    model: nn.Module,
    spec: PermutationSpec,
    config: FusionConfig,
    *,
    party: str,
    data: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> PartyRelease:
    """Clip and perturb a party's model (and activation statistics on ``data``) for release."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for key, value in state.items():
        if torch.is_floating_point(value):
            check_finite(f"party {party!r} tensor {key!r}", value)
    if config.use_act_stats and data is None:
        raise ConfigError(f"party {party!r}: use_act_stats needs the party's data")
    acts = activation_stats(model, spec, data) if (config.use_act_stats and data is not None) else {}
    ledger = PrivacyLedger(party)
    if not config.private:
        return PartyRelease(party, state, acts, ledger, private=False)
    if generator is None:
        generator = torch.Generator()
        generator.seed()  # fresh OS entropy per party and release (O10)
    bounds = clip_bounds(model, clip_mult=config.clip_mult, bn_clip=config.bn_clip)
    released: dict[str, torch.Tensor] = {}
    n_weights = 0
    mech_w: Mechanism | None = None
    for key, value in state.items():
        if key.rsplit(".", 1)[-1] in RUNNING_STATS:
            continue  # never released under DP; the fuser re-estimates them on calibration data
        c = bounds[key]
        mech_w = make_mechanism(config.mechanism, config.weight_epsilon, lo=-c, hi=c, delta=config.delta)
        released[key] = _release_tensor(mech_w, value, generator)
        n_weights += value.numel()
    assert mech_w is not None
    ledger.record(
        Release(
            "weights", "weights", config.mechanism, config.weight_epsilon, mech_w.delta, n_weights,
            unit="scalar", neighbouring="replace-one weight value within its clip range [-c, c]",
            noise_multiplier=_noise_multiplier(mech_w),
        )
    )
    released_acts: dict[str, torch.Tensor] = {}
    if acts:
        mech_a = make_mechanism(config.act_mechanism, config.act_epsilon, lo=0.0, hi=config.act_max, delta=config.delta)
        for name, value in acts.items():
            released_acts[name] = _release_tensor(mech_a, value, generator)
        ledger.record(
            Release(
                "activation_means", "activations", config.act_mechanism, config.act_epsilon, mech_a.delta,
                sum(v.numel() for v in acts.values()), unit="per-unit mean activation",
                neighbouring=f"replace-one statistic value within [0, {config.act_max:g}] (covers any change of the party's data)",
                noise_multiplier=_noise_multiplier(mech_a),
            )
        )
    return PartyRelease(party, released, released_acts, ledger, private=True)


def _noise_multiplier(mech: Mechanism) -> float | None:
    return mech.sigma / mech.sensitivity if isinstance(mech, GaussianMechanism) else None

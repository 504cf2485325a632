"""Fuse party releases: check them, align units (matching), average, rebuild a model, repair BatchNorm.

``privfusion`` is the whole pipeline in one process: each party releases (locally perturbed) tensors,
the fuser aligns and averages them, and an optional perturbation filter adapter is trained on
calibration data. The decentralized message exchange lives in :mod:`pluribus.fusion.core.exchange`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pluribus.errors import ConfigError, DataError, ShapeError
from pluribus.fusion.core.config import AdapterConfig, FusionConfig
from pluribus.fusion.core.descriptors import RUNNING_STATS, PartyRelease, release_party
from pluribus.fusion.core.matching import average, match_many
from pluribus.fusion.core.models import check_inputs, clone_model, recalibrate_batchnorm
from pluribus.fusion.core.spec import Params, PermutationSpec, spec_for
from pluribus.fusion.privacy.accounting import PrivacyLedger, public_input
from pluribus.fusion.privacy.odometer import DEFAULT_BUDGET, PrivacyOdometer, Spent, model_digest


def check_same_architecture(models: Sequence[nn.Module]) -> None:
    """Raise ConfigError/ShapeError naming the party and tensor where the models differ."""
    if len(models) < 2:
        raise ConfigError(f"fusion needs at least 2 party models, got {len(models)}")
    first = models[0]
    ref = first.state_dict()
    for k, model in enumerate(models[1:], start=1):
        if type(model) is not type(first):
            raise ConfigError(f"party {k} is a {type(model).__name__}, party 0 a {type(first).__name__}")
        sd = model.state_dict()
        if set(sd) != set(ref):
            diff = sorted(set(sd) ^ set(ref))
            raise ConfigError(f"party {k} has different tensors than party 0: {diff[:5]}")
        for key, value in sd.items():
            if value.shape != ref[key].shape:
                raise ShapeError(f"party {k} tensor {key!r}", value.shape, f"{list(ref[key].shape)} as in party 0")


def check_releases(releases: Sequence[PartyRelease]) -> None:
    """Raise if releases are non-finite or disagree in tensor names or shapes."""
    if len(releases) < 2:
        raise ConfigError(f"fusion needs at least 2 releases, got {len(releases)}")
    first = releases[0]
    for rel in releases:
        rel.check()
        if set(rel.params) != set(first.params):
            raise DataError(
                f"party {rel.party!r} released tensors {sorted(set(rel.params) ^ set(first.params))[:5]} "
                f"that party {first.party!r} did not (or vice versa)"
            )
        for key, value in rel.params.items():
            if value.shape != first.params[key].shape:
                raise ShapeError(f"party {rel.party!r} tensor {key!r}", value.shape, f"{list(first.params[key].shape)}")


def fuse_releases(
    releases: Sequence[PartyRelease],
    spec: PermutationSpec,
    config: FusionConfig,
    *,
    weights: Sequence[float] | None = None,
) -> Params:
    """Align every release (to party 0, or iteratively to the mean) and average: the fused tensors.

    Args:
        releases: the parties' releases (at least two, of one architecture).
        spec: the permutation spec of that architecture.
        config: the fusion settings (solver, multi-model mode).
        weights: the parties' averaging weights (public), or None for equal.
    """
    check_releases(releases)
    use_acts = all(r.acts for r in releases)
    aligned = match_many(
        spec,
        [r.params for r in releases],
        solver=config.solver,
        mode=config.multi,
        acts_list=[r.acts for r in releases] if use_acts else None,
        act_weight=config.act_weight,
        weights=weights,
        max_sweeps=config.max_sweeps,
        ot_reg=config.ot_reg,
        seed=config.seed,
        start=config.match_start, tol=config.match_tol,
    )
    return average(aligned, weights)


def load_fused(template: nn.Module, fused: Mapping[str, torch.Tensor], *, calib_x: torch.Tensor | None = None) -> nn.Module:
    """A model of ``template``'s architecture holding ``fused``; BatchNorm statistics re-estimated on ``calib_x``.

    Args:
        template: a model of the parties' architecture.
        fused: the fused tensors.
        calib_x: calibration inputs, needed when BatchNorm statistics were not released.

    Raises:
        ConfigError: tensors that do not fit the model, or BatchNorm without released statistics or ``calib_x``.
    """
    model = clone_model(template)
    missing, unexpected = model.load_state_dict(dict(fused), strict=False)
    if unexpected:
        raise ConfigError(f"fused tensors not in the model: {unexpected[:5]}")
    bad = [k for k in missing if k.rsplit(".", 1)[-1] not in RUNNING_STATS]
    if bad:
        raise ConfigError(f"fused tensors missing for {bad[:5]}")
    if missing:
        if calib_x is None:
            raise ConfigError(
                "the fused model has BatchNorm but no released running statistics (not released under DP); "
                "pass calibration data to re-estimate them"
            )
        check_inputs(model, calib_x, what="calibration inputs")
        recalibrate_batchnorm(model, calib_x)
    return model.eval()


@dataclass
class FusionResult:
    """The fused model (with adapter if trained), the plain fused tensors, every party's ledger, and the
    fuser's own ledger (what it used without noise: averaging weights, calibration data).

    Attributes:
        model: the fused model, with its adapter if one was trained.
        fused: the plain fused tensors.
        ledgers: each party's ledger.
        releases: what each party released.
        adapter_history: the adapter's loss per epoch (empty without adapter).
        fuser_ledger: what the fuser used without noise (weights, calibration data), or None.
    """

    model: nn.Module
    fused: Params
    ledgers: list[PrivacyLedger]
    releases: list[PartyRelease] = field(repr=False, default_factory=list)
    adapter_history: list[float] = field(default_factory=list)
    fuser_ledger: PrivacyLedger | None = None

    @property
    def all_ledgers(self) -> list[PrivacyLedger]:
        """The parties' ledgers followed by the fuser's: what a privacy report should list."""
        return self.ledgers + ([self.fuser_ledger] if self.fuser_ledger is not None else [])


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) for m in model.modules())


def fuser_ledger() -> PrivacyLedger:
    """The fuser's own ledger: it adds no noise; what it uses without noise is recorded as public inputs."""
    return PrivacyLedger("fuser", noise="none (the fuser adds no noise)", private_noise=True)


def repair_fused(model: nn.Module, calib: tuple[torch.Tensor, torch.Tensor] | None, adapter: AdapterConfig,
                 fuser: PrivacyLedger) -> tuple[nn.Module, list[float]]:
    """The fuser's repair of a fused model: the filter adapter on the calibration set (or only BatchNorm
    re-estimation), with what it used recorded in the fuser's ledger. Returns the model and the adapter's
    loss history."""
    history: list[float] = []
    if adapter.kind != "none":
        if calib is None:
            raise ConfigError("the perturbation filter adapter needs calibration data (calib=(x, y))")
        from pluribus.fusion.core.adapter import fit_adapter

        model, history, extra = fit_adapter(model, calib[0], calib[1], adapter)
        if extra is not None:
            # Opacus draws DP-SGD noise from torch's generator unless secure_mode, which needs torchcsprng
            # (not installable with this torch): the adapter's guarantee is not against a capable observer
            fuser.noise = "DP-SGD adapter noise from torch's default generator (Mersenne Twister), not a CSPRNG"
            fuser.private_noise = False
        fuser.record(extra if extra is not None else public_input(
            "filter adapter", int(calib[0].shape[0]), "calibration example",
            "trained on the calibration set without DP (it must be public or the fuser's own)"))
    elif calib is not None and adapter.recalibrate_bn:
        recalibrate_batchnorm(model, calib[0])
    return model, history


def _odometer_debit(model: nn.Module, state_dir: str | Path, party: str, budget: float | None
                    ) -> tuple[Callable[[PrivacyLedger], None], list[Spent], float]:
    """A ``before_noise`` hook debiting ``party``'s odometer for ``model``, the list it fills, and the budget."""
    odometer = PrivacyOdometer(state_dir, model_digest(model.state_dict()), party=party,
                               budget=DEFAULT_BUDGET if budget is None else budget)
    spent: list[Spent] = []
    return (lambda ledger: spent.append(odometer.debit(ledger, run="in-process"))), spent, odometer.budget


def privfusion(
    models: Sequence[nn.Module],
    *,
    config: FusionConfig | None = None,
    party_data: Sequence[torch.Tensor] | None = None,
    calib: tuple[torch.Tensor, torch.Tensor] | None = None,
    adapter: AdapterConfig | None = None,
    spec: PermutationSpec | None = None,
    weights: Sequence[float] | None = None,
    state_dirs: Sequence[str | Path] | None = None,
    budget: float | None = None,
) -> FusionResult:
    """Release (perturb) every party's model locally, match and average, then train the filter adapter.

    ``weights`` (e.g. training-set sizes) are public inputs: they are used without noise and the ledger says
    so. The calibration set is the fuser's own or public data unless ``adapter.private`` (DP-SGD).
    With ``state_dirs`` (one per party) each release is first debited from that party's privacy odometer for
    its model (``budget``: epsilon per weight scalar over all releases; default ``odometer.DEFAULT_BUDGET``):
    ``BudgetExhausted`` before any noise is drawn if one would go past it; the ledgers then carry the totals.

    Args:
        models: the parties' trained models (at least two, one architecture).
        config: the fusion settings (default: ``FusionConfig()``).
        party_data: each party's own inputs (for activation statistics), or None.
        calib: the fuser's ``(x, y)`` calibration data for the adapter, or None.
        adapter: the adapter's settings, or None for no adapter.
        spec: the permutation spec (default: ``spec_for(models[0])``).
        weights: the parties' averaging weights (public), or None for equal.
        state_dirs: one state folder per party (its odometer), or None.
        budget: each odometer's budget (see above).

    Raises:
        ConfigError: lists whose lengths do not match ``models``, models of different architectures, or an
            adapter without ``calib``.
        BudgetExhausted: a release would go past a party's budget.
    """
    config = config or FusionConfig()
    adapter = adapter or AdapterConfig(kind="none")
    check_same_architecture(models)
    spec = spec or spec_for(models[0])
    if party_data is not None and len(party_data) != len(models):
        raise ConfigError(f"party_data has {len(party_data)} entries for {len(models)} models")
    if weights is not None and len(weights) != len(models):
        raise ConfigError(f"weights has {len(weights)} entries for {len(models)} models")
    if adapter.kind != "none" and adapter.private and calib is not None and _has_batchnorm(models[0]) and config.private:
        raise ConfigError(
            "adapter.private trains on a private calibration set, but the fused model's BatchNorm statistics "
            "would be re-estimated on that same set without noise; use a model without BatchNorm, or a public "
            "calibration set with adapter.private = false"
        )
    if state_dirs is not None and len(state_dirs) != len(models):
        raise ConfigError(f"state_dirs has {len(state_dirs)} entries for {len(models)} models")
    releases = []
    for k, m in enumerate(models):
        debit = None if state_dirs is None or not config.private else _odometer_debit(m, state_dirs[k], f"party{k}", budget)
        releases.append(release_party(m, spec, config, party=f"party{k}",
                                      data=None if party_data is None else party_data[k],
                                      before_noise=None if debit is None else debit[0]))
        if debit is not None and releases[-1].ledger is not None:
            releases[-1].ledger.spent, releases[-1].ledger.budget = debit[1][0].as_dict(), debit[2]
    fused = fuse_releases(releases, spec, config, weights=weights)
    ledgers = [r.ledger or PrivacyLedger(r.party) for r in releases]
    fuser = fuser_ledger()
    if weights is not None:
        for ledger, w in zip(ledgers, weights, strict=True):
            ledger.record(public_input("averaging weight", 1, f"party weight {w:g} (e.g. training-set size)",
                                       "used without noise by the fuser; a public input"))
    calib_x = None if calib is None else calib[0]
    model = load_fused(models[0], fused, calib_x=calib_x)
    if calib_x is not None and _has_batchnorm(model):
        fuser.record(public_input("BatchNorm running statistics", int(calib_x.shape[0]), "calibration example",
                                  "re-estimated on the calibration set without noise (it must be public or the fuser's own)"))
    model, history = repair_fused(model, calib, adapter, fuser)
    return FusionResult(model, fused, ledgers, releases, history, fuser if fuser.releases else None)

"""Per-party privacy ledger: every item a party released, under which mechanism, epsilon and delta, and what
that guarantees for each *unit* of protection. Guarantees in different units are never added together.

Units and what their rows mean:

- **weight scalar** (replace-one weight value within its clip range): the weight's own release costs
  ``eps_w``; when activation statistics are released too, every statistic that the weight can influence
  (structurally: the unit it feeds and everything downstream, counted by ``activation_dependence``) is a
  further release about it, so its cost is ``eps_w + d * eps_a`` with ``d`` the largest such count over the
  party's weights (basic composition; deltas alike);
- **activation statistic** (replace-one statistic value within ``[0, act_max]``, which covers any change of
  the party's data that the statistic reflects): ``eps_a``;
- **whole release** (everything numeric one party sent): basic composition over all its released scalars,
  ``sum n_i eps_i`` (for Gaussian releases also RDP composition with ``dp-accounting``). This is the
  model-level guarantee, and it is weak by design;
- **calibration example** (add/remove one example of the calibration set): the DP-SGD adapter, if any;
- **public inputs**: items that travel or are used without noise (a party's training-set size used as an
  averaging weight, BatchNorm statistics re-estimated on the calibration set, architecture and clip
  bounds). They are listed with "not protected" so nobody mistakes them for private.

Post-processing of released items (matching, permuting, averaging) costs nothing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from pluribus.errors import ConfigError, DataError
from pluribus.eval.report import markdown_table

#: Release kinds whose units are scalars of the party's model or statistics (composable with each other).
SCALAR_KINDS = ("weights", "activations")
KINDS = (*SCALAR_KINDS, "adapter", "public")


@dataclass(frozen=True)
class Release:
    """One release: ``count`` items, each ``(epsilon, delta)``-DP under ``neighbouring`` (public: not protected).

    ``dependent_stats``: for weight releases, the largest number of released activation statistics that one
    of these scalars can change (0 when no statistics are released).

    Attributes:
        name: what was released.
        kind: ``weights``, ``activations``, ``adapter`` or ``public``.
        mechanism: the mechanism's name.
        epsilon: each item's epsilon (``inf`` for a public input).
        delta: each item's delta.
        count: how many items.
        unit: what one item is (``scalar`` by default).
        neighbouring: the neighbouring relation the guarantee is stated under.
        noise_multiplier: sigma / sensitivity (Gaussian releases only), or None.
        dependent_stats: see above.
        realised_epsilon: the epsilon the sampler actually realises (from the integers it uses), or None.

    Raises:
        ConfigError: an unknown kind, a public input with finite epsilon, a non-positive epsilon, or a negative count.
    """

    name: str
    kind: str  # "weights" | "activations" | "adapter" | "public"
    mechanism: str
    epsilon: float
    delta: float
    count: int
    unit: str = "scalar"
    neighbouring: str = "replace-one scalar value in its clip range"
    noise_multiplier: float | None = None  # sigma / sensitivity, Gaussian releases only
    dependent_stats: int = 0
    realised_epsilon: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"release {self.name!r}: kind must be one of {list(KINDS)}, got {self.kind!r}")
        if self.kind == "public":
            if self.epsilon != math.inf:
                raise ConfigError(f"release {self.name!r}: a public input has epsilon = inf (not protected)")
        elif not (self.epsilon > 0) or math.isnan(self.epsilon):
            raise ConfigError(f"release {self.name!r}: epsilon must be > 0, got {self.epsilon}")
        if self.count < 0 or self.dependent_stats < 0:
            raise ConfigError(f"release {self.name!r}: count and dependent_stats must be >= 0")


def public_input(name: str, count: int, unit: str, why: str) -> Release:
    """A ledger row for something used or sent without noise (listed as not protected)."""
    return Release(name, "public", "none (public input)", math.inf, 0.0, count, unit=unit, neighbouring=why)


@dataclass
class PrivacyLedger:
    """The releases of one party (or of the fuser), with the noise source they were drawn from.

    Attributes:
        party: the party's name (or the fuser's).
        releases: its releases.
        noise: where the noise came from (the OS CSPRNG, a labelled seed, or ``none``).
        private_noise: whether that source is private (False: seeded, reproducible).
        spent: the party's odometer after this release (what every release of this model has cost so far, per
            unit), or None where no odometer was kept.
        budget: the odometer's budget, or None.
        status: what became of the party in the run: ``fused``, ``released``, ``excluded after release at
            <step>: <reason>`` or ``refused: <code>``.
    """

    party: str
    releases: list[Release] = field(default_factory=list)
    noise: str = "none"
    private_noise: bool = True
    #: the party's odometer after this release: what every release of this model has cost so far, per unit
    #: (``odometer.Spent.as_dict``); None where no odometer was kept (an in-process experiment)
    spent: dict[str, Any] | None = None
    budget: float | None = None
    #: what became of this party in the run: "fused", "released" (in-process), "excluded after release at
    #: <step>: <reason>", "refused: <code>" (set by whoever writes the report)
    status: str = "released"

    def record(self, release: Release) -> None:
        """Add one release.

        Args:
            release: the release to add.
        """
        self.releases.append(release)

    def _of(self, *kinds: str) -> list[Release]:
        return [r for r in self.releases if r.kind in kinds and r.count > 0]

    def per_scalar(self) -> tuple[float, float]:
        """(epsilon, delta) protecting one weight scalar: its own release plus every statistic it can change."""
        weights, acts = self._of("weights"), self._of("activations")
        eps_a = max((r.epsilon for r in acts), default=0.0)
        delta_a = max((r.delta for r in acts), default=0.0)
        if not weights:
            return eps_a, delta_a
        eps = max(r.epsilon + r.dependent_stats * eps_a for r in weights)
        delta = max(r.delta + r.dependent_stats * delta_a for r in weights)
        return eps, min(delta, 1.0)

    def basic_total(self) -> tuple[float, float]:
        """(epsilon, delta) of every released model scalar and statistic, by basic composition."""
        scalars = self._of(*SCALAR_KINDS)
        eps = sum(r.epsilon * r.count for r in scalars)
        delta = sum(r.delta * r.count for r in scalars)
        return eps, min(delta, 1.0)

    def gaussian_total(self, target_delta: float = 1e-5) -> dict[str, float] | None:
        """Composed epsilon at ``target_delta`` of the Gaussian releases (RDP), or None if none.

        The releases sample a discrete Gaussian, which satisfies the same zero-concentrated DP as the continuous
        one (Canonne-Kamath-Steinke 2020, Thm 4), so the Gaussian RDP curve is a valid bound for it.

        Args:
            target_delta: the delta the epsilon is stated at.
        """
        gauss = [r for r in self._of(*SCALAR_KINDS) if r.noise_multiplier is not None]
        if not gauss:
            return None
        import dp_accounting as dpa
        from dp_accounting import rdp

        events = [dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(r.noise_multiplier), r.count) for r in gauss]
        rdp_acc = rdp.RdpAccountant()
        rdp_acc.compose(dpa.ComposedDpEvent(events))
        return {"delta": target_delta, "epsilon_rdp": float(rdp_acc.get_epsilon(target_delta))}

    def guarantees(self, target_delta: float = 1e-5) -> list[dict[str, Any]]:
        """One row per unit of protection: unit, epsilon, delta and how it was derived.

        Args:
            target_delta: the delta of composed Gaussian guarantees.
        """
        rows: list[dict[str, Any]] = []
        weights, acts = self._of("weights"), self._of("activations")
        if weights:
            eps, delta = self.per_scalar()
            d = max(r.dependent_stats for r in weights)
            how = "own release" + (f" + up to {d} activation statistics it can change" if d else "")
            rows.append({"unit": "one weight scalar (replace-one value in its clip range)", "epsilon": eps,
                         "delta": delta, "how": how})
        if acts:
            a = max(acts, key=lambda r: r.epsilon)
            rows.append({"unit": "one activation statistic (replace-one value in its range)", "epsilon": a.epsilon,
                         "delta": a.delta, "how": "own release"})
        if weights or acts:
            eps_t, delta_t = self.basic_total()
            gauss = self.gaussian_total(target_delta)
            rows.append({"unit": "the whole release of this party (all its scalars)", "epsilon": eps_t,
                         "delta": delta_t, "how": "basic composition over every released scalar"})
            if gauss is not None:
                rows.append({"unit": "the whole release of this party (all its scalars)",
                             "epsilon": gauss["epsilon_rdp"], "delta": target_delta,
                             "how": "RDP composition of the Gaussian releases"})
        for r in self._of("adapter"):
            rows.append({"unit": r.unit, "epsilon": r.epsilon, "delta": r.delta, "how": r.mechanism})
        return rows

    def as_dict(self, target_delta: float = 1e-5) -> dict[str, Any]:
        """A JSON-able summary (releases, noise source, guarantees per unit).

        Args:
            target_delta: the delta of composed Gaussian guarantees.
        """
        eps_s, delta_s = self.per_scalar()
        eps_t, delta_t = self.basic_total()
        return {
            "party": self.party,
            "noise": self.noise,
            "private_noise": self.private_noise,
            "releases": [_json_safe(asdict(r)) for r in self.releases],
            "per_scalar": {"epsilon": eps_s, "delta": delta_s},
            "whole_release_basic": {"epsilon": eps_t, "delta": delta_t},
            "whole_release_gaussian": self.gaussian_total(target_delta),
            "guarantees": self.guarantees(target_delta),
            "status": self.status,
            "spent_on_this_model": self.spent,
            "budget": self.budget,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrivacyLedger:
        """The ledger back from :meth:`as_dict`'s JSON (as a party sends it); DataError on a malformed one.

        Args:
            data: what :meth:`as_dict` returned.

        Raises:
            DataError: a malformed ledger.
        """
        try:
            known = {f.name for f in fields(Release)}
            releases = []
            for item in data.get("releases", []):
                values = {k: v for k, v in item.items() if k in known}
                if values.get("epsilon") in (None, "inf"):
                    values["epsilon"] = math.inf
                releases.append(Release(**values))
            spent = data.get("spent_on_this_model")
            if spent is not None:
                spent = {str(k): (None if v is None else float(v)) for k, v in dict(spent).items()}
            budget = data.get("budget")
            return cls(str(data["party"]), releases, str(data.get("noise", "none")),
                       bool(data.get("private_noise", True)), spent, None if budget is None else float(budget),
                       str(data.get("status", "released")))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DataError(f"malformed privacy ledger: {exc}", field="ledger") from None


def _json_safe(row: dict[str, Any]) -> dict[str, Any]:
    # JSON has no infinity: public inputs carry epsilon "inf"
    return {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in row.items()}


def privacy_report(ledgers: list[PrivacyLedger], *, target_delta: float = 1e-5) -> dict[str, Any]:
    """JSON-able privacy report over all parties (and the fuser's own use of calibration data).

    Args:
        ledgers: one ledger per party (and the fuser's).
        target_delta: the delta of composed Gaussian guarantees.
    """
    return {
        "private": all(led.private_noise for led in ledgers),
        "note": (
            "Guarantees are per unit (see 'guarantees'); units are never added together. per_scalar protects one "
            "weight value (its release plus the activation statistics it can change); whole_release composes "
            "every scalar a party sent. Public inputs are listed with epsilon 'inf' (not protected). These are the "
            "costs of THIS release; releasing the same model again costs again: 'spent_on_this_model' is what "
            "every release of that model has cost so far (basic composition per unit; RDP for Gaussian weights), "
            "from the party's own odometer, and 'budget' the limit it enforces."
        ),
        "parties": [ledger.as_dict(target_delta) for ledger in ledgers],
    }


def _fmt(value: float) -> str:
    return "not protected" if math.isinf(value) else f"{value:.4g}"


def privacy_report_markdown(ledgers: list[PrivacyLedger], *, target_delta: float = 1e-5,
                            heading: str = "## Privacy report") -> str:
    """The privacy report as one markdown section (under ``heading``): noise source, every released item,
    guarantees per unit.

    Args:
        ledgers: one ledger per party (and the fuser's).
        target_delta: the delta of composed Gaussian guarantees.
        heading: the section's heading.
    """
    not_private = [led.party for led in ledgers if not led.private_noise]
    lines = [heading, ""]
    if not_private:
        lines += [f"**NOT PRIVATE: the noise of {', '.join(not_private)} is not from a cryptographically secure "
                  "source (an explicit `noise_seed`, or a generator that is not a CSPRNG; see 'Noise source'), so an "
                  "observer who recovers the generator's state can remove it. Use this for experiments only.**", ""]
    lines += [
        "Every released value lies on a fixed lattice and its noise is sampled exactly from integer draws of the "
        "noise source below (docs/privacy.md, 'What is guaranteed'). Each guarantee holds for the unit named in "
        "its row; rows in different units are not added. Matching and averaging are post-processing.",
        "",
    ]
    sources = sorted({f"{led.party}: {led.noise}" for led in ledgers})
    lines += ["Noise source: " + "; ".join(sources), ""]
    rows = []
    for ledger in ledgers:
        for r in ledger.releases:
            rows.append({
                "party": ledger.party, "item": r.name, "kind": r.kind, "mechanism": r.mechanism,
                "eps per item": _fmt(r.epsilon), "delta per item": f"{r.delta:g}", "items": r.count,
                "unit": r.unit, "neighbouring / note": r.neighbouring,
            })
    lines += [markdown_table(rows) if rows else "(no releases: epsilon = inf, nothing is private)", ""]
    guarantee_rows = [
        {"party": ledger.party, "protects": g["unit"], "epsilon": f"{g['epsilon']:.4g}", "delta": f"{g['delta']:.3g}",
         "from": g["how"]}
        for ledger in ledgers for g in ledger.guarantees(target_delta)
    ]
    if guarantee_rows:
        lines += [markdown_table(guarantee_rows), ""]
    lines += spent_markdown(ledgers)
    return "\n".join(lines)


def spent_markdown(ledgers: list[PrivacyLedger]) -> list[str]:
    """Lines of the report's "this release and all releases of this model" section (one row per party)."""
    rows = []
    for led in ledgers:
        this = led.per_scalar()[0] if led.releases else None
        spent = led.spent or {}
        rdp = spent.get("per_scalar_epsilon_rdp")
        rows.append({
            "party": led.party, "status": led.status,
            "eps per weight scalar, this release": "none" if this is None else f"{this:.4g}",
            "releases of this model": "not tracked" if led.spent is None else f"{int(spent.get('releases') or 0)}",
            "eps per weight scalar, all releases": "not tracked" if led.spent is None
            else f"{float(spent.get('per_scalar_epsilon') or 0.0):.4g}" + ("" if rdp is None else f" (RDP {rdp:.4g})"),
            "eps per activation statistic, all releases": "not tracked" if led.spent is None
            else f"{float(spent.get('per_statistic_epsilon') or 0.0):.4g}",
            "eps whole release, all releases": "not tracked" if led.spent is None
            else f"{float(spent.get('whole_epsilon') or 0.0):.4g}",
            "budget": "none" if led.budget is None else f"{led.budget:g}",
        })
    if not rows:
        return []
    return ["### This release and every release of the same model", "",
            "Each party's epsilon above is what this release costs. A party that released the same model before "
            "has spent more: the totals below come from its own odometer (basic composition; for Gaussian weight "
            "releases also RDP at delta 1e-5). Nothing guarantees less than the total.", "",
            markdown_table(rows), ""]


def report_json(ledgers: list[PrivacyLedger], *, target_delta: float = 1e-5) -> str:
    """The privacy report as a JSON string."""
    return json.dumps(privacy_report(ledgers, target_delta=target_delta), indent=2, sort_keys=True)

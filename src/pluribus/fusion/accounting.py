"""Per-party privacy ledger: what each party released, under which mechanism, epsilon and delta.

Two guarantees are reported for every party, and they must not be confused:

- **per scalar**: each released scalar (one weight, one activation statistic) is ``epsilon``-LDP with
  respect to its own value (replace-one neighbours on the clip range). A scalar that feeds both releases
  (a unit's weights and its activation statistic describe the same private object) composes basically:
  ``eps_w + eps_a`` and ``delta_w + delta_a``.
- **whole release** (everything one party sent): basic composition over all scalars, ``sum n_i eps_i``
  (and ``sum n_i delta_i``); for Gaussian releases also a tighter composition with ``dp-accounting``
  (PLD and RDP) at a target delta. This is the guarantee for the whole model, and it is weak by design:
  per-scalar LDP of millions of weights is not a model-level guarantee.

Post-processing (matching, permuting, averaging, adapters trained on public data) costs nothing; an
adapter trained with DP-SGD on private data adds its own entry.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from pluribus.errors import ConfigError
from pluribus.eval.report import markdown_table


@dataclass(frozen=True)
class Release:
    """One release by one party: ``count`` units, each ``(epsilon, delta)``-DP under ``neighbouring``."""

    name: str
    kind: str  # "weights" | "activations" | "adapter"
    mechanism: str
    epsilon: float
    delta: float
    count: int
    unit: str = "scalar"
    neighbouring: str = "replace-one scalar value in its clip range"
    noise_multiplier: float | None = None  # sigma / sensitivity, Gaussian releases only

    def __post_init__(self) -> None:
        if not (self.epsilon > 0) or math.isnan(self.epsilon):
            raise ConfigError(f"release {self.name!r}: epsilon must be > 0, got {self.epsilon}")
        if self.count < 0:
            raise ConfigError(f"release {self.name!r}: count must be >= 0, got {self.count}")


@dataclass
class PrivacyLedger:
    """The releases of one party, with per-scalar and whole-release composition."""

    party: str
    releases: list[Release] = field(default_factory=list)

    def record(self, release: Release) -> None:
        """Add one release."""
        self.releases.append(release)

    def per_scalar(self) -> tuple[float, float]:
        """(epsilon, delta) for one scalar of each kind composed: sum over kinds of the largest per-unit cost."""
        best: dict[str, tuple[float, float]] = {}
        for r in self.releases:
            e, d = best.get(r.kind, (0.0, 0.0))
            best[r.kind] = (max(e, r.epsilon), max(d, r.delta))
        return sum(e for e, _ in best.values()), sum(d for _, d in best.values())

    def basic_total(self) -> tuple[float, float]:
        """(epsilon, delta) of everything released, by basic composition over all units."""
        eps = sum(r.epsilon * r.count for r in self.releases)
        delta = sum(r.delta * r.count for r in self.releases)
        return eps, min(delta, 1.0)

    def gaussian_total(self, target_delta: float = 1e-5) -> dict[str, float] | None:
        """Composed epsilon at ``target_delta`` of the Gaussian releases (PLD and RDP), or None if none."""
        gauss = [r for r in self.releases if r.noise_multiplier is not None and r.count > 0]
        if not gauss:
            return None
        import dp_accounting as dpa
        from dp_accounting import pld, rdp

        events = [dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(r.noise_multiplier), r.count) for r in gauss]
        event = dpa.ComposedDpEvent(events)
        pld_acc = pld.PLDAccountant()
        pld_acc.compose(event)
        rdp_acc = rdp.RdpAccountant()
        rdp_acc.compose(event)
        return {
            "delta": target_delta,
            "epsilon_pld": float(pld_acc.get_epsilon(target_delta)),
            "epsilon_rdp": float(rdp_acc.get_epsilon(target_delta)),
        }

    def as_dict(self, target_delta: float = 1e-5) -> dict[str, Any]:
        """A JSON-able summary."""
        eps_s, delta_s = self.per_scalar()
        eps_t, delta_t = self.basic_total()
        return {
            "party": self.party,
            "releases": [asdict(r) for r in self.releases],
            "per_scalar": {"epsilon": eps_s, "delta": delta_s},
            "whole_release_basic": {"epsilon": eps_t, "delta": delta_t},
            "whole_release_gaussian": self.gaussian_total(target_delta),
        }


def privacy_report(ledgers: list[PrivacyLedger], *, target_delta: float = 1e-5) -> dict[str, Any]:
    """JSON-able privacy report over all parties."""
    return {
        "note": (
            "per_scalar: each released scalar is epsilon-LDP w.r.t. its own value; whole_release: basic "
            "composition over every released scalar of the party (a model-level bound)."
        ),
        "parties": [ledger.as_dict(target_delta) for ledger in ledgers],
    }


def privacy_report_markdown(ledgers: list[PrivacyLedger], *, target_delta: float = 1e-5) -> str:
    """The privacy report as a markdown section with one table row per release."""
    rows = []
    for ledger in ledgers:
        for r in ledger.releases:
            rows.append(
                {
                    "party": ledger.party,
                    "release": r.name,
                    "kind": r.kind,
                    "mechanism": r.mechanism,
                    "eps per unit": f"{r.epsilon:g}",
                    "delta per unit": f"{r.delta:g}",
                    "units": r.count,
                    "unit": r.unit,
                    "neighbouring": r.neighbouring,
                }
            )
    totals = []
    for ledger in ledgers:
        eps_s, delta_s = ledger.per_scalar()
        eps_t, delta_t = ledger.basic_total()
        gauss = ledger.gaussian_total(target_delta)
        totals.append(
            {
                "party": ledger.party,
                "per-scalar eps (weights+acts)": f"{eps_s:g}",
                "per-scalar delta": f"{delta_s:g}",
                "whole-release eps (basic)": f"{eps_t:.4g}",
                "whole-release delta (basic)": f"{delta_t:.3g}",
                f"Gaussian eps (PLD, delta={target_delta:g})": "-" if gauss is None else f"{gauss['epsilon_pld']:.4g}",
            }
        )
    return (
        "## Privacy report\n\n"
        "Each released scalar is epsilon-LDP with respect to its own value (replace-one neighbours within its "
        "data-independent clip range). The whole-release epsilon composes every scalar a party sent (basic "
        "composition) and is the model-level guarantee; it is large by design. Matching, averaging and an "
        "adapter trained on public data are post-processing and cost nothing.\n\n"
        + (markdown_table(rows) if rows else "(no releases: epsilon = inf, nothing is private)\n")
        + "\n\n"
        + markdown_table(totals)
        + "\n"
    )


def report_json(ledgers: list[PrivacyLedger], *, target_delta: float = 1e-5) -> str:
    """The privacy report as a JSON string."""
    return json.dumps(privacy_report(ledgers, target_delta=target_delta), indent=2, sort_keys=True)

"""A party's privacy odometer: what it has spent releasing one model, kept on its own host, across runs.

A release's ledger (:mod:`pluribus.fusion.privacy.accounting`) says what *that* release costs. Releasing the
same model again costs again: an observer who averages k releases of a weight learns it k times better, and
under basic composition the guarantee for that weight is the sum of the k epsilons. The odometer is where a
party adds them up. It lives in the party's state folder (a file per model, keyed by a SHA-256 digest of the
model's tensors), is written atomically under a file lock before any noise is drawn (a crash after the debit
leaves the budget spent, never a release unaccounted: write-ahead), and never decreases.

Units are those of the ledger, each composed on its own and never added to another:

- **one weight scalar**: the sum of every release's per-scalar epsilon (its own release plus the activation
  statistics it can change), deltas likewise; for weight releases that are all Gaussian, also the RDP
  composition of their noise multipliers (``dp-accounting``), which is tighter for many releases;
- **one activation statistic**: the sum of the statistics' epsilons;
- **the whole release**: the sum of every release's whole-release basic total.

The **budget** is an epsilon for one weight scalar (the unit the hub's fused model is built from). A release
is allowed if the per-scalar total after it stays within the budget, by basic composition or, for
all-Gaussian releases, by the RDP total at ``RDP_DELTA``. A refused release draws no noise and sends nothing.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pluribus.errors import ConfigError, DataError, PluribusError
from pluribus.fusion.privacy.accounting import PrivacyLedger

FORMAT = "pluribus.privfusion.odometer/1"
#: The per-weight-scalar epsilon a party spends on one model when it is given no budget: four releases at
#: the default epsilon of 4 (FusionConfig), e.g. one run per month for a quarter.
DEFAULT_BUDGET = 16.0
#: The delta at which the RDP total of Gaussian releases is stated (and checked against the budget).
RDP_DELTA = 1e-5
_LOCK = ".odometer.lock"


class BudgetExhausted(PluribusError):
    """A release would take a party past its privacy budget for this model; nothing was released."""


def check_budget(budget: object, *, what: str = "budget") -> float:
    """The budget as a float; ConfigError unless it is a finite number > 0.

    Args:
        budget: the value given.
        what: its name in the error.

    Raises:
        ConfigError: not a finite number > 0.
    """
    try:
        value = float(budget)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number > 0 (epsilon per weight scalar), got {budget!r}") from None
    if isinstance(budget, bool) or not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{what} must be a finite number > 0 (epsilon per weight scalar), got {budget!r}")
    return value


def model_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over a model's tensors (names, dtypes, shapes, bytes, in name order): the odometer's key.

    Args:
        state: the model's state dict.
    """
    h = hashlib.sha256(b"pluribus-model-digest/1")
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Spent:
    """What one model's releases have cost so far, per unit (see the module docstring).

    Attributes:
        releases: how many releases were recorded.
        per_scalar_epsilon: the composed epsilon of one weight scalar (basic composition).
        per_scalar_delta: its delta.
        per_statistic_epsilon: the composed epsilon of one activation statistic.
        whole_epsilon: the composed epsilon of everything the party released of this model.
        whole_delta: its delta.
        per_scalar_epsilon_rdp: the RDP-composed per-scalar epsilon at ``RDP_DELTA`` when every weight release was
            Gaussian, else None.
    """

    releases: int = 0
    per_scalar_epsilon: float = 0.0
    per_scalar_delta: float = 0.0
    per_statistic_epsilon: float = 0.0
    whole_epsilon: float = 0.0
    whole_delta: float = 0.0
    per_scalar_epsilon_rdp: float | None = None  # all-Gaussian weight releases only, at RDP_DELTA

    @property
    def budget_epsilon(self) -> float:
        """The per-scalar epsilon the budget is checked against: the tighter of the two accountants."""
        rdp = self.per_scalar_epsilon_rdp
        return self.per_scalar_epsilon if rdp is None else min(self.per_scalar_epsilon, rdp)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able view (what a party reports with its release)."""
        return {**asdict(self), "budget_epsilon": self.budget_epsilon, "rdp_delta": RDP_DELTA}


def release_entry(ledger: PrivacyLedger, *, run: str) -> dict[str, Any]:
    """One odometer row for a release described by ``ledger`` (costs per unit; Gaussian noise multipliers).

    Args:
        ledger: the release's ledger.
        run: the run it belongs to (kept in the row).
    """
    eps_s, delta_s = ledger.per_scalar()
    eps_w, delta_w = ledger.basic_total()
    weights = [r for r in ledger.releases if r.kind == "weights" and r.count > 0]
    acts = [r for r in ledger.releases if r.kind == "activations" and r.count > 0]
    gaussian = [r.noise_multiplier for r in weights if r.noise_multiplier is not None]
    return {
        "time": time.time(), "run": run,
        "mechanisms": sorted({r.mechanism for r in weights + acts}),
        "per_scalar": [eps_s, delta_s],
        "per_statistic": [max((r.epsilon for r in acts), default=0.0), max((r.delta for r in acts), default=0.0)],
        "whole": [eps_w, delta_w],
        # a weight's own Gaussian release (RDP-composable) only if no statistic depends on it
        "gaussian_weight_multiplier": gaussian[0] if gaussian and len(gaussian) == len(weights) and not acts
        else None,
    }


def total(entries: Sequence[Mapping[str, Any]]) -> Spent:
    """The composed cost of a model's releases (basic composition per unit; RDP for all-Gaussian weights).

    Args:
        entries: the odometer's rows.
    """
    if not entries:
        return Spent()
    rdp = None
    multipliers = [e.get("gaussian_weight_multiplier") for e in entries]
    if all(m is not None for m in multipliers):
        import dp_accounting as dpa
        from dp_accounting import rdp as rdp_lib

        accountant = rdp_lib.RdpAccountant()
        accountant.compose(dpa.ComposedDpEvent([dpa.GaussianDpEvent(float(m)) for m in multipliers]))  # type: ignore[arg-type]
        rdp = float(accountant.get_epsilon(RDP_DELTA))
    return Spent(
        releases=len(entries),
        per_scalar_epsilon=sum(float(e["per_scalar"][0]) for e in entries),
        per_scalar_delta=min(1.0, sum(float(e["per_scalar"][1]) for e in entries)),
        per_statistic_epsilon=sum(float(e["per_statistic"][0]) for e in entries),
        whole_epsilon=sum(float(e["whole"][0]) for e in entries),
        whole_delta=min(1.0, sum(float(e["whole"][1]) for e in entries)),
        per_scalar_epsilon_rdp=rdp,
    )


class PrivacyOdometer:
    """The odometer of one party for one model, in the party's ``state_dir`` (see the module docstring).

    Args:
        state_dir: the party's state folder (the odometer file lives there).
        digest: the model's :func:`model_digest`.
        party: the party's name.
        budget: epsilon per weight scalar over every release of this model.

    Raises:
        ConfigError: ``budget`` is not a finite number > 0.
    """

    def __init__(self, state_dir: str | Path, digest: str, *, party: str, budget: float = DEFAULT_BUDGET) -> None:
        self.state_dir = Path(state_dir)
        self.digest = digest
        self.party = party
        self.budget = check_budget(budget)
        self.path = self.state_dir / f"privacy_odometer-{digest[:16]}.json"

    def entries(self) -> list[dict[str, Any]]:
        """The releases recorded so far (none if the file does not exist yet); DataError if it is unreadable
        or belongs to another model or party.

        Raises:
            DataError: the file is not an odometer, or belongs to another model or party, or its rows are malformed.
        """
        from pluribus.io import read_json

        if not self.path.exists():
            return []
        data = read_json(self.path)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise DataError(f"not a privacy odometer (format {data.get('format') if isinstance(data, dict) else data!r}"
                            f", expected {FORMAT!r})", path=self.path, field="format")
        for key, want in (("model", self.digest), ("party", self.party)):
            if data.get(key) != want:
                raise DataError(f"odometer of {key} {str(data.get(key))[:16]!r}, not {want[:16]!r}: it belongs to "
                                f"another {key}", path=self.path, field=key)
        rows = data.get("releases")
        if not isinstance(rows, list) or not all(_valid_entry(r) for r in rows):
            raise DataError("malformed release rows", path=self.path, field="releases")
        return rows

    def spent(self) -> Spent:
        """What this model's releases have cost so far."""
        return total(self.entries())

    def debit(self, ledger: PrivacyLedger, *, run: str) -> Spent:
        """Record one release (before its noise is drawn) and return the new totals; BudgetExhausted, with
        nothing recorded, if it would take the per-scalar total past the budget.

        Args:
            ledger: the release's ledger (complete, before any noise is drawn).
            run: the run it belongs to.

        Raises:
            BudgetExhausted: the release would go past the budget (nothing is recorded).
            DataError: the odometer file is unreadable (see :meth:`entries`).
        """
        from pluribus.io import write_json

        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._locked():
            rows = self.entries()
            entry = release_entry(ledger, run=run)
            after = total([*rows, entry])
            if after.budget_epsilon > self.budget * (1 + 1e-12):
                before = total(rows)
                raise BudgetExhausted(
                    f"party {self.party!r}: this release would spend epsilon {after.budget_epsilon:.4g} per weight "
                    f"scalar on this model (spent {before.budget_epsilon:.4g} in {before.releases} releases), past "
                    f"its budget of {self.budget:g}")
            rows.append(entry)
            write_json(self.path, {"format": FORMAT, "model": self.digest, "party": self.party,
                                   "budget": self.budget, "releases": rows})
        return after

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.state_dir / _LOCK, "a+") as fh:  # two processes of one party never interleave a debit
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def _valid_entry(row: object) -> bool:
    if not isinstance(row, dict):
        return False
    try:
        return all(len(row[k]) == 2 and all(math.isfinite(float(v)) and float(v) >= 0 for v in row[k])
                   for k in ("per_scalar", "per_statistic", "whole"))
    except (KeyError, TypeError, ValueError):
        return False

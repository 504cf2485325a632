"""Vectorised local-DP mechanisms on torch tensors, each with clipping, stated sensitivity and variance.

Every mechanism perturbs each scalar of a tensor independently. Inputs are first clipped into a
data-independent range ``[lo, hi]``; the neighbouring relation is *replace-one scalar* (any value in
``[lo, hi]`` may be swapped for any other), so the per-scalar sensitivity is ``hi - lo``. Each released
scalar is ``epsilon``-LDP (``(epsilon, delta)`` for the Gaussian); a whole tensor of ``n`` scalars is
``n * epsilon`` by basic composition (see :mod:`pluribus.fusion.accounting`).

All outputs are unbiased estimates of the clipped input and are *not* clamped back into ``[lo, hi]``
(clamping would bias averages; clamp only after fusion, as post-processing).

Randomness comes from a ``torch.Generator`` through inverse-CDF sampling in floating point. Such samplers
are known to leak through the floating-point grid (Mironov 2012): treat this module as research-grade,
not as a hardened DP library.

Hybrid mechanism (Wang et al., ICDE 2019, arXiv 1907.00782): with probability ``alpha`` apply the
Piecewise mechanism, otherwise Duchi's, with ``alpha = 1 - exp(-epsilon/2)`` when
``epsilon > epsilon* ~= 0.61`` and ``alpha = 0`` otherwise. We could not read the paper's text; this
rule matches two independent public implementations that cite the paper's pseudocode, and
``alpha = 1 - exp(-epsilon/2)`` is exactly the value that makes the mixture's worst-case variance
independent of the input (our derivation, checked in the tests).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from scipy.special import log_ndtr

from pluribus.errors import ConfigError, DataError

MECHANISMS = ("laplace", "gaussian", "duchi", "piecewise", "hybrid")

#: Threshold below which the hybrid mechanism is pure Duchi (Wang et al. 2019), ~0.610.
HYBRID_EPS_STAR = math.log(
    (-5 + 2 * (6353 - 405 * math.sqrt(241)) ** (1 / 3) + 2 * (6353 + 405 * math.sqrt(241)) ** (1 / 3)) / 27
)


def check_epsilon(epsilon: float, *, what: str = "epsilon") -> float:
    """Return ``epsilon`` as float if it is a finite positive number; raise ConfigError otherwise."""
    try:
        value = float(epsilon)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number, got {epsilon!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{what} must be a finite number > 0, got {epsilon!r} (use no mechanism for eps=inf)")
    return value


def check_finite(what: str, x: torch.Tensor) -> None:
    """Raise DataError if ``x`` holds NaN or infinite values."""
    if not torch.is_floating_point(x):
        raise DataError(f"{what} must be a floating-point tensor, got {x.dtype}", field=what)
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        first = [int(i) for i in torch.nonzero(bad)[0].tolist()]
        raise DataError(
            f"{int(bad.sum())} non-finite value(s), first at index {first}", field=what, expected="finite values"
        )


@dataclass(frozen=True)
class Mechanism(ABC):
    """A per-scalar LDP mechanism on inputs clipped to ``[lo, hi]`` (replace-one neighbours)."""

    epsilon: float
    lo: float = -1.0
    hi: float = 1.0

    def __post_init__(self) -> None:
        check_epsilon(self.epsilon)
        if not (math.isfinite(self.lo) and math.isfinite(self.hi) and self.hi > self.lo):
            raise ConfigError(f"clip range must satisfy lo < hi (finite), got lo={self.lo}, hi={self.hi}")

    name = "mechanism"

    @property
    def delta(self) -> float:
        """The delta of the per-scalar guarantee (0 for pure-epsilon mechanisms)."""
        return 0.0

    @property
    def sensitivity(self) -> float:
        """Per-scalar sensitivity under replace-one neighbours: ``hi - lo``."""
        return self.hi - self.lo

    def clip(self, x: torch.Tensor) -> torch.Tensor:
        """Clip into ``[lo, hi]`` after checking the values are finite."""
        check_finite("mechanism input", x)
        return x.clamp(self.lo, self.hi)

    def __call__(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Clip ``x`` and return an independently perturbed, unbiased copy (same shape and dtype)."""
        xc = self.clip(x).to(torch.float64)
        out = self._perturb(xc, generator)
        return out.to(x.dtype)

    @abstractmethod
    def _perturb(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor: ...

    @abstractmethod
    def variance(self, x: torch.Tensor) -> torch.Tensor:
        """Output variance per scalar, as a function of the (clipped) input."""

    def describe(self) -> dict[str, float | str]:
        """A JSON-able description (name, epsilon, delta, clip range, sensitivity)."""
        return {
            "mechanism": self.name,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "lo": self.lo,
            "hi": self.hi,
            "sensitivity": self.sensitivity,
        }

    # helpers for the mechanisms that work on t in [-1, 1]
    def _to_unit(self, x: torch.Tensor) -> torch.Tensor:
        return (2 * x - (self.hi + self.lo)) / (self.hi - self.lo)

    def _from_unit(self, t: torch.Tensor) -> torch.Tensor:
        return t * (self.hi - self.lo) / 2 + (self.hi + self.lo) / 2


def _uniform(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(x.shape, generator=generator, dtype=torch.float64, device=x.device)


@dataclass(frozen=True)
class LaplaceMechanism(Mechanism):
    """Laplace noise with scale ``b = (hi - lo) / epsilon`` (L1 sensitivity of one scalar)."""

    name = "laplace"

    @property
    def scale(self) -> float:
        """The Laplace scale b."""
        return self.sensitivity / self.epsilon

    def _perturb(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        u = _uniform(x, generator) - 0.5
        # inverse CDF; 1 - 2|u| lies in (0, 1] because rand draws from [0, 1)
        noise = -self.scale * torch.sign(u) * torch.log1p(-2 * u.abs())
        return x + noise

    def variance(self, x: torch.Tensor) -> torch.Tensor:
        """``2 b^2`` regardless of the input."""
        return torch.full_like(x, 2 * self.scale**2, dtype=torch.float64)


def analytic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """Smallest sigma making the Gaussian mechanism (epsilon, delta)-DP (Balle & Wang 2018, Thm 8).

    The exact privacy profile of N(0, sigma^2) at L2 sensitivity D is
    ``delta(eps) = Phi(D/(2 s) - eps s/D) - e^eps Phi(-D/(2 s) - eps s/D)``, decreasing in s; we bisect on s.
    """
    check_epsilon(epsilon)
    if not (0 < delta < 1):
        raise ConfigError(f"delta must lie in (0, 1), got {delta}")
    if not (sensitivity > 0 and math.isfinite(sensitivity)):
        raise ConfigError(f"sensitivity must be finite and > 0, got {sensitivity}")

    def profile(sigma: float) -> float:
        a = sensitivity / (2 * sigma)
        b = epsilon * sigma / sensitivity
        return math.exp(log_ndtr(a - b)) - math.exp(epsilon + log_ndtr(-a - b))

    lo, hi = 1e-6 * sensitivity, sensitivity
    while profile(hi) > delta:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if profile(mid) > delta:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * hi:
            break
    return hi


@dataclass(frozen=True)
class GaussianMechanism(Mechanism):
    """Gaussian noise with the analytic calibration of Balle & Wang (2018); (epsilon, delta)-DP per scalar.

    ``l2_sensitivity`` overrides the per-scalar ``hi - lo`` for vector releases (e.g. L2-clipped rows of
    norm C under replace-one neighbours: 2C); clipping a row to its L2 norm is the caller's job then.
    """

    delta_: float = 1e-5
    l2_sensitivity: float | None = None

    name = "gaussian"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (0 < self.delta_ < 1):
            raise ConfigError(f"delta must lie in (0, 1), got {self.delta_}")

    @property
    def delta(self) -> float:
        """The delta of the guarantee."""
        return self.delta_

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity: ``l2_sensitivity`` when given, else ``hi - lo``."""
        return self.l2_sensitivity if self.l2_sensitivity is not None else self.hi - self.lo

    @property
    def sigma(self) -> float:
        """Noise standard deviation from the analytic calibration."""
        return analytic_gaussian_sigma(self.epsilon, self.delta_, self.sensitivity)

    def _perturb(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float64, device=x.device)
        return x + self.sigma * noise

    def variance(self, x: torch.Tensor) -> torch.Tensor:
        """``sigma^2`` regardless of the input."""
        return torch.full_like(x, self.sigma**2, dtype=torch.float64)


@dataclass(frozen=True)
class DuchiMechanism(Mechanism):
    """Duchi et al.'s 1-D mechanism: output ``+-B``, ``B = (e^eps + 1)/(e^eps - 1)`` on the [-1, 1] scale."""

    name = "duchi"

    @property
    def bound(self) -> float:
        """B, the magnitude of every output on the [-1, 1] scale."""
        e = math.exp(self.epsilon)
        return (e + 1) / (e - 1)

    def _perturb(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        t = self._to_unit(x)
        e = math.exp(self.epsilon)
        p_plus = 0.5 + t * (e - 1) / (2 * (e + 1))
        sign = torch.where(_uniform(x, generator) < p_plus, 1.0, -1.0).to(torch.float64)
        return self._from_unit(sign * self.bound)

    def variance(self, x: torch.Tensor) -> torch.Tensor:
        """``(B^2 - t^2) * ((hi - lo)/2)^2``."""
        t = self._to_unit(x.to(torch.float64))
        return (self.bound**2 - t**2) * ((self.hi - self.lo) / 2) ** 2


@dataclass(frozen=True)
class PiecewiseMechanism(Mechanism):
    """Wang et al.'s Piecewise mechanism: a high-density band [L(t), R(t)] inside [-C, C]."""

    name = "piecewise"

    @property
    def bound(self) -> float:
        """C = (e^{eps/2} + 1)/(e^{eps/2} - 1), the output range on the [-1, 1] scale."""
        z = math.exp(self.epsilon / 2)
        return (z + 1) / (z - 1)

    def _perturb(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        t = self._to_unit(x)
        z = math.exp(self.epsilon / 2)
        c = self.bound
        left = (c + 1) / 2 * t - (c - 1) / 2
        right = left + c - 1
        in_band = _uniform(x, generator) < z / (z + 1)
        u = _uniform(x, generator)
        band = left + u * (c - 1)
        # the two outer pieces have total length (L + C) + (C - R) = C + 1; walk along them
        s = u * (c + 1)
        outside = torch.where(s < left + c, -c + s, right + (s - (left + c)))
        return self._from_unit(torch.where(in_band, band, outside))

    def variance(self, x: torch.Tensor) -> torch.Tensor:
        """``(t^2/(z-1) + (z+3)/(3(z-1)^2)) * ((hi - lo)/2)^2`` with ``z = e^{eps/2}``."""
        t = self._to_unit(x.to(torch.float64))
        z = math.exp(self.epsilon / 2)
        return (t**2 / (z - 1) + (z + 3) / (3 * (z - 1) ** 2)) * ((self.hi - self.lo) / 2) ** 2


def hybrid_alpha(epsilon: float) -> float:
    """Probability of using the Piecewise branch in the Hybrid mechanism (0 below eps* ~ 0.61)."""
    return 1 - math.exp(-epsilon / 2) if epsilon > HYBRID_EPS_STAR else 0.0


@dataclass(frozen=True)
class HybridMechanism(Mechanism):
    """Wang et al.'s Hybrid mechanism: Piecewise with probability alpha(eps), Duchi otherwise."""

    name = "hybrid"

    @property
    def alpha(self) -> float:
        """Probability of the Piecewise branch."""
        return hybrid_alpha(self.epsilon)

    def _parts(self) -> tuple[PiecewiseMechanism, DuchiMechanism]:
        return (
            PiecewiseMechanism(self.epsilon, self.lo, self.hi),
            DuchiMechanism(self.epsilon, self.lo, self.hi),
        )

    def _perturb(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        pm, duchi = self._parts()
        use_pm = _uniform(x, generator) < self.alpha
        return torch.where(use_pm, pm._perturb(x, generator), duchi._perturb(x, generator))

    def variance(self, x: torch.Tensor) -> torch.Tensor:
        """``alpha Var_PM + (1 - alpha) Var_Duchi`` (both branches are unbiased)."""
        pm, duchi = self._parts()
        return self.alpha * pm.variance(x) + (1 - self.alpha) * duchi.variance(x)


def make_mechanism(
    name: str, epsilon: float, *, lo: float = -1.0, hi: float = 1.0, delta: float = 1e-5
) -> Mechanism:
    """Build a mechanism by name: laplace, gaussian, duchi, piecewise or hybrid."""
    if name == "laplace":
        return LaplaceMechanism(epsilon, lo, hi)
    if name == "gaussian":
        return GaussianMechanism(epsilon, lo, hi, delta_=delta)
    if name == "duchi":
        return DuchiMechanism(epsilon, lo, hi)
    if name == "piecewise":
        return PiecewiseMechanism(epsilon, lo, hi)
    if name == "hybrid":
        return HybridMechanism(epsilon, lo, hi)
    raise ConfigError(f"unknown mechanism {name!r}; choose one of {list(MECHANISMS)}")

"""Local-DP mechanisms on torch tensors whose outputs lie on a fixed lattice and whose sampling is exact.

Every mechanism perturbs each scalar independently. Neighbouring relation: *replace-one scalar* (any value
in the data-independent clip range ``[lo, hi]`` may be swapped for any other); each released scalar is
``epsilon``-LDP (``(epsilon, delta)`` for the Gaussian).

How a scalar is released, and why the guarantee survives floating point:

1. the input is cast to float64 **before** it is clipped into ``[lo, hi]`` (clipping in float16/bfloat16
   overshoots the bound);
2. it is rounded to one of the ``M + 1`` points ``lo + k (hi - lo) / M`` *at random* (up with probability
   equal to the fractional part): unbiased, and it costs no privacy because, for every pair of lattice
   points, the mechanism's output distributions already satisfy the epsilon bound, and a mixture of
   distributions each within ``e^epsilon`` of every other is within ``e^epsilon`` of every such mixture;
3. the integer ``k`` is perturbed by an integer-valued mechanism whose probabilities are realised exactly
   from 64-bit words of the noise source (:mod:`pluribus.fusion.privacy.noise`; no floating-point logarithm, no
   inverse CDF): Duchi (two outputs), a discrete Piecewise mechanism (``M + m`` output cells), a discrete
   Laplace (Canonne-Kamath-Steinke sampler), a discrete Gaussian (same paper, Algorithm 3), and the hybrid
   mixture of Piecewise and Duchi;
4. the output is a fixed function of the output integer (a lattice point), the same set for every input,
   so its bit pattern carries nothing beyond the integer.

The epsilon each sampler realises (``realised_epsilon``) is computed from the integers it actually uses and
is never above the requested epsilon (Laplace: the requested epsilon rounded *down* to a multiple of 2^-20;
Duchi and Piecewise: probabilities rounded towards the privacy-safe side). The Gaussian's delta is computed
exactly for the discrete distribution it samples. Outputs are unbiased estimates of the clipped input and
are not clamped (clamping would bias averages; clamp after fusion if needed, as post-processing).

Hybrid mechanism (Wang et al., ICDE 2019, arXiv 1907.00782): with probability ``alpha`` apply the
Piecewise mechanism, otherwise Duchi's, ``alpha = 1 - exp(-epsilon/2)`` when ``epsilon > epsilon* ~= 0.61``
and 0 otherwise (the value that makes the mixture's worst-case variance independent of the input; our
derivation, checked in the tests).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
import torch
from scipy.special import log_ndtr, logsumexp

from pluribus.errors import ConfigError, DataError
from pluribus.fusion.privacy.noise import NoiseSource, SystemNoise

MECHANISMS = ("laplace", "gaussian", "duchi", "piecewise", "hybrid")

#: Threshold below which the hybrid mechanism is pure Duchi (Wang et al. 2019), ~0.610.
HYBRID_EPS_STAR = math.log(
    (-5 + 2 * (6353 - 405 * math.sqrt(241)) ** (1 / 3) + 2 * (6353 + 405 * math.sqrt(241)) ** (1 / 3)) / 27
)
#: Below this epsilon the lattice samplers cannot represent the noise scale; above the maximum a release is
#: noise-free in all but name (use epsilon = inf, which is labelled as not private).
MIN_EPSILON = 1e-6
MAX_EPSILON = 10_000.0
#: Lattice resolution of the input (and of Laplace's output): steps across the clip range.
RESOLUTION = 2**16
_TWO64 = 2**64
_FRAC_BITS = 20  # Laplace's epsilon is rounded down to a multiple of 2^-20


def check_epsilon(epsilon: float, *, what: str = "epsilon") -> float:
    """Return ``epsilon`` as float if it is finite and within [MIN_EPSILON, MAX_EPSILON]; raise ConfigError."""
    try:
        value = float(epsilon)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number, got {epsilon!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{what} must be a finite number > 0, got {epsilon!r} (use no mechanism for eps=inf)")
    if value < MIN_EPSILON:
        raise ConfigError(f"{what} = {value:g} is below the smallest supported value {MIN_EPSILON:g}")
    if value > MAX_EPSILON:
        raise ConfigError(f"{what} = {value:g} is absurdly large (above {MAX_EPSILON:g}): it gives no privacy; "
                          "use epsilon = inf to release without noise, which the report labels as not private")
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


def _expit_neg(z: float) -> float:
    """``1 / (1 + e^z)`` without overflow."""
    if z > 0:
        e = math.exp(-z)
        return e / (1 + e)
    return 1 / (1 + math.exp(z))


def _count_at_least(p: float) -> int:
    """An integer count ``c`` with ``c / 2^64 >= p`` (a safety margin covers the float error of ``p``)."""
    return min(_TWO64 - 1, int(math.ceil(p * (1 + 1e-9) * _TWO64)) + 1)


def _cast(values: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """float64 ``values`` rounded to ``dtype`` as a release is (torch's round-to-nearest), back in float64."""
    return torch.from_numpy(np.asarray(values, dtype=np.float64)).to(dtype).to(torch.float64).numpy()


#: Tail cut of the unbounded noises, in units of the noise scale: exp(-45) < 2^-64 for Laplace, a 12-sigma
#: Gaussian tail is below 2^-100.
_LAPLACE_TAIL, _GAUSSIAN_TAIL = 45, 12


@dataclass(frozen=True)
class Mechanism(ABC):
    """A per-scalar LDP mechanism on inputs clipped to ``[lo, hi]`` (replace-one neighbours).

    Attributes:
        epsilon: the per-scalar privacy parameter (finite, in [``MIN_EPSILON``, ``MAX_EPSILON``]).
        lo: the clip range's lower end.
        hi: the clip range's upper end.

    Raises:
        ConfigError: an epsilon outside that range, or not ``lo < hi`` (both finite).
    """

    epsilon: float
    lo: float = -1.0
    hi: float = 1.0

    name = "mechanism"

    def __post_init__(self) -> None:
        check_epsilon(self.epsilon)
        if not (math.isfinite(self.lo) and math.isfinite(self.hi) and self.hi > self.lo):
            raise ConfigError(f"clip range must satisfy lo < hi (finite), got lo={self.lo}, hi={self.hi}")

    @property
    def delta(self) -> float:
        """The delta of the per-scalar guarantee (0 for pure-epsilon mechanisms)."""
        return 0.0

    @property
    def sensitivity(self) -> float:
        """Per-scalar sensitivity under replace-one neighbours: ``hi - lo``."""
        return self.hi - self.lo

    @property
    def resolution(self) -> int:
        """M: the input lattice has M steps across ``[lo, hi]``."""
        return RESOLUTION

    @property
    def step(self) -> float:
        """Distance between neighbouring input lattice points."""
        return (self.hi - self.lo) / self.resolution

    @property
    @abstractmethod
    def realised_epsilon(self) -> float:
        """The epsilon of the sampler as implemented (from its integers); never above ``epsilon``."""

    def clip(self, x: torch.Tensor) -> torch.Tensor:
        """Cast to float64, then clip into ``[lo, hi]``, after checking the values are finite.

        Args:
            x: the values.

        Raises:
            DataError: a non-finite value.
        """
        check_finite("mechanism input", x)
        return x.detach().to(torch.float64).clamp(self.lo, self.hi)

    def __call__(self, x: torch.Tensor, *, noise: NoiseSource | None = None) -> torch.Tensor:
        """Clip ``x`` and return an independently perturbed, unbiased copy (same shape and dtype)."""
        noise = noise or SystemNoise()
        xc = self.clip(x).cpu().numpy().reshape(-1)
        k = self._round_to_lattice(xc, noise)
        out = self._release_indices(k, noise)
        return torch.from_numpy(out).reshape(x.shape).to(dtype=x.dtype, device=x.device)

    def _round_to_lattice(self, xc: np.ndarray, noise: NoiseSource) -> np.ndarray:
        scaled = (xc - self.lo) / (self.hi - self.lo) * self.resolution
        base = np.minimum(np.floor(scaled), self.resolution - 1)
        frac = np.clip(scaled - base, 0.0, 1.0)
        # up with probability frac (53-bit resolution: the probability only affects bias, never privacy)
        up = (noise.words(xc.size) >> np.uint64(11)) < np.floor(frac * 2.0**53).astype(np.uint64)
        return base.astype(np.int64) + up

    @abstractmethod
    def _release_indices(self, k: np.ndarray, noise: NoiseSource) -> np.ndarray:
        """Released float64 values for lattice inputs ``k`` (integers in [0, M])."""

    @abstractmethod
    def _index_variance(self, k: np.ndarray) -> np.ndarray:
        """Output variance given the lattice input ``k`` (float array; real units)."""

    def variance(self, x: torch.Tensor) -> torch.Tensor:
        """Exact output variance per scalar, as a function of the (clipped) input: lattice rounding included.

        Args:
            x: the inputs.
        """
        xc = x.detach().to(torch.float64).clamp(self.lo, self.hi).cpu().numpy()
        scaled = (xc - self.lo) / (self.hi - self.lo) * self.resolution
        base = np.minimum(np.floor(scaled), self.resolution - 1)
        p = np.clip(scaled - base, 0.0, 1.0)
        var = (1 - p) * self._index_variance(base) + p * self._index_variance(base + 1)
        var = var + self.step**2 * p * (1 - p)
        return torch.from_numpy(np.asarray(var, dtype=np.float64))

    def could_output(self, released: torch.Tensor) -> torch.Tensor:
        """For each released value, whether this mechanism could have produced it (at the tensor's dtype).

        What the hub checks before it fuses: a value off the mechanism's output set (off the lattice, past
        the output bound, scaled, another dtype's rounding) was not made by this mechanism. The output set
        is public: it depends on the mechanism, epsilon and the clip range only. Unbounded noise (Laplace,
        Gaussian) is cut at a tail the mechanism exceeds with probability below 2^-60 per value.

        Args:
            released: released values.
        """
        if not torch.is_floating_point(released):
            return torch.zeros(released.shape, dtype=torch.bool)
        values = released.detach().cpu().to(torch.float64).numpy().reshape(-1)
        finite = np.isfinite(values)
        ok = finite & self._could_output(np.where(finite, values, 0.0), released.dtype)
        return torch.from_numpy(ok).reshape(released.shape)

    @abstractmethod
    def _could_output(self, values: np.ndarray, dtype: torch.dtype) -> np.ndarray:
        """Boolean mask of finite ``values`` (float64 copies of ``dtype`` values) in the output set."""

    def _on_lattice(self, values: np.ndarray, dtype: torch.dtype, low: int, high: int) -> np.ndarray:
        """``values`` equal to ``lo + j * step`` cast to ``dtype`` for an integer ``j`` in ``[low, high]``."""
        j = np.rint((values - self.lo) / self.step)
        ok = np.zeros(values.shape, dtype=bool)
        for cand in (j - 1, j, j + 1):  # the cast may round a neighbour onto the same float
            inside = (cand >= low) & (cand <= high)
            back = _cast(self.lo + np.clip(cand, low, high) * self.step, dtype)
            ok |= inside & (back == values)
        return ok

    def _is_one_of(self, values: np.ndarray, dtype: torch.dtype, outputs: np.ndarray) -> np.ndarray:
        return np.isin(values, _cast(self._from_unit(outputs), dtype))

    def describe(self) -> dict[str, float | str]:
        """A JSON-able description (name, epsilon, realised epsilon, delta, clip range, lattice)."""
        return {
            "mechanism": self.name,
            "epsilon": self.epsilon,
            "realised_epsilon": self.realised_epsilon,
            "delta": self.delta,
            "lo": self.lo,
            "hi": self.hi,
            "sensitivity": self.sensitivity,
            "resolution": self.resolution,
        }

    # [-1, 1] coordinates, for the mechanisms defined there
    def _unit(self, k: np.ndarray) -> np.ndarray:
        return 2 * np.asarray(k, dtype=np.float64) / self.resolution - 1

    def _from_unit(self, t: np.ndarray) -> np.ndarray:
        return t * (self.hi - self.lo) / 2 + (self.hi + self.lo) / 2


@dataclass(frozen=True)
class LaplaceMechanism(Mechanism):
    """Discrete Laplace on the input lattice: ``P(z) ~ exp(-epsilon' |z| / M)``, ``epsilon'`` = epsilon rounded down.

    Fields and checks: as ``Mechanism`` (``epsilon``, ``lo``, ``hi``).
    """

    name = "laplace"

    @cached_property
    def _ratio(self) -> tuple[int, int]:
        # noise scale s/u lattice steps, s = M 2^F, u = floor(eps 2^F): the sensitivity of M steps costs u/2^F
        return self.resolution << _FRAC_BITS, int(math.floor(self.epsilon * 2**_FRAC_BITS))

    @property
    def realised_epsilon(self) -> float:
        """``floor(epsilon 2^20) / 2^20``."""
        return self._ratio[1] / 2**_FRAC_BITS

    @property
    def scale(self) -> float:
        """The Laplace scale b in real units."""
        s, u = self._ratio
        return s / u * self.step

    def _release_indices(self, k: np.ndarray, noise: NoiseSource) -> np.ndarray:
        s, u = self._ratio
        return self.lo + (k + noise.discrete_laplace(s, u, k.size)) * self.step

    def _could_output(self, values: np.ndarray, dtype: torch.dtype) -> np.ndarray:
        s, u = self._ratio
        tail = math.ceil(_LAPLACE_TAIL * s / u)  # lattice steps
        return self._on_lattice(values, dtype, -tail, self.resolution + tail)

    def _index_variance(self, k: np.ndarray) -> np.ndarray:
        s, u = self._ratio
        q = math.exp(-u / s)
        return np.full(np.shape(k), 2 * q / (1 - q) ** 2 * self.step**2)


def analytic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """Smallest sigma making the continuous Gaussian mechanism (epsilon, delta)-DP (Balle & Wang 2018, Thm 8).

    The exact privacy profile of N(0, sigma^2) at L2 sensitivity D is
    ``delta(eps) = Phi(D/(2 s) - eps s/D) - e^eps Phi(-D/(2 s) - eps s/D)``, decreasing in s; we bisect on s.

    Args:
        epsilon: the privacy parameter (> 0, finite).
        delta: in (0, 1).
        sensitivity: the L2 sensitivity (> 0, finite).

    Raises:
        ConfigError: a parameter out of range.
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

    lo, hi = 1e-12 * sensitivity, sensitivity
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


def discrete_gaussian_delta(epsilon: float, sigma2: float, shift: int) -> tuple[float, float]:
    """Exact ``delta(epsilon)`` of ``k + Y``, Y discrete Gaussian with parameter ``sigma2``, at integer ``shift``;
    and Y's variance. (For this symmetric log-concave noise the largest shift is the worst neighbour pair.)"""
    sigma = math.sqrt(sigma2)
    reach = int(math.ceil(14 * sigma)) + shift + 2
    y = np.arange(-reach, reach + 1, dtype=np.float64)
    logw = -(y * y) / (2 * sigma2)
    logp = logw - logsumexp(logw)
    p = np.exp(logp)
    # sum_y max(0, p(y) - e^eps p(y - shift)), computed in log space (e^eps may overflow)
    diff = epsilon + logp[:-shift] - logp[shift:] if shift > 0 else np.full(len(y), epsilon)
    terms = p[shift:] * -np.expm1(np.minimum(diff, 0.0))
    return float(terms.sum()), float((p * y * y).sum())


@dataclass(frozen=True)
class GaussianMechanism(Mechanism):
    """Discrete Gaussian on a lattice fine enough for the noise; delta computed exactly for what is sampled.

    Attributes:
        epsilon: the per-scalar privacy parameter (finite, in [``MIN_EPSILON``, ``MAX_EPSILON``]).
        lo: the clip range's lower end.
        hi: the clip range's upper end.
        delta_: the delta of the guarantee, in (0, 1) (the property ``delta``).

    Raises:
        ConfigError: an epsilon outside that range, not ``lo < hi`` (both finite), or a delta outside (0, 1).
    """

    delta_: float = 1e-5

    name = "gaussian"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (0 < self.delta_ < 1):
            raise ConfigError(f"delta must lie in (0, 1), got {self.delta_}")

    @property
    def delta(self) -> float:
        """The delta of the guarantee."""
        return self.delta_

    @cached_property
    def _calibrated(self) -> tuple[int, int, int, float, float]:
        """(M, t, h, realised delta, lattice variance): sigma^2 = t*h lattice steps^2 with delta <= delta_."""
        sigma_c = analytic_gaussian_sigma(self.epsilon, self.delta_, self.sensitivity)
        # ~4096 lattice steps per sigma: rounding adds a 1/(4*4096^2) share of variance, and sums stay small
        m = int(2 ** round(math.log2(max(4096 * self.sensitivity / sigma_c, 1.0))))
        m = min(max(m, 16), RESOLUTION)
        sigma_l = sigma_c * m / self.sensitivity
        t = int(math.floor(sigma_l)) + 1
        h = max(1, int(math.ceil(sigma_l * sigma_l / t)))
        for _ in range(200):
            realised, var = discrete_gaussian_delta(self.epsilon, t * h, m)
            if realised <= self.delta_:
                return m, t, h, realised, var
            h = int(math.ceil(h * 1.001)) + 1
        raise ConfigError(f"gaussian: could not calibrate a discrete Gaussian for epsilon={self.epsilon}, "
                          f"delta={self.delta_}")

    @property
    def resolution(self) -> int:
        """M, chosen so that sigma spans about 4096 lattice steps (at most 2^16)."""
        return self._calibrated[0]

    @property
    def realised_epsilon(self) -> float:
        """The requested epsilon (delta is what the calibration guarantees: ``realised_delta``)."""
        return self.epsilon

    @property
    def realised_delta(self) -> float:
        """Exact delta of the sampled discrete Gaussian at ``epsilon`` (at most ``delta``)."""
        return self._calibrated[3]

    @property
    def sigma(self) -> float:
        """Noise standard deviation parameter in real units."""
        _, t, h, _, _ = self._calibrated
        return math.sqrt(t * h) * self.step

    @property
    def noise_multiplier(self) -> float:
        """sigma / sensitivity: the discrete Gaussian is (1/2)(1/nm)^2-zCDP like the continuous (CKS Thm 4)."""
        return self.sigma / self.sensitivity

    def _could_output(self, values: np.ndarray, dtype: torch.dtype) -> np.ndarray:
        _, t, h, _, _ = self._calibrated
        tail = math.ceil(_GAUSSIAN_TAIL * math.sqrt(t * h))  # lattice steps
        return self._on_lattice(values, dtype, -tail, self.resolution + tail)

    def _release_indices(self, k: np.ndarray, noise: NoiseSource) -> np.ndarray:
        _, t, h, _, _ = self._calibrated
        return self.lo + (k + noise.discrete_gaussian(t, h, k.size)) * self.step

    def _index_variance(self, k: np.ndarray) -> np.ndarray:
        return np.full(np.shape(k), self._calibrated[4] * self.step**2)


@lru_cache(maxsize=64)
def _duchi_thresholds(low: int, m: int) -> np.ndarray:
    """P(+B | k) as counts out of 2^64, linear in k from ``low`` to ``2^64 - low`` (exact integer rounding)."""
    span = _TWO64 - 2 * low
    return np.array([low + (span * k + m // 2) // m for k in range(m + 1)], dtype=np.uint64)


@dataclass(frozen=True)
class DuchiMechanism(Mechanism):
    """Duchi et al.'s 1-D mechanism: two outputs ``+-B`` on the [-1, 1] scale, ``B ~ (e^eps + 1)/(e^eps - 1)``.

    Fields and checks: as ``Mechanism`` (``epsilon``, ``lo``, ``hi``).
    """

    name = "duchi"

    @cached_property
    def _low_count(self) -> int:
        # P(+B | t = -1) = 1/(e^eps + 1), rounded up: the realised ratio (2^64 - c)/c stays <= e^eps
        return _count_at_least(_expit_neg(self.epsilon))

    @property
    def _thresholds(self) -> np.ndarray:
        return _duchi_thresholds(self._low_count, self.resolution)

    @property
    def realised_epsilon(self) -> float:
        """``log((2^64 - c) / c)`` for the realised probability ``c / 2^64`` of the unlikely output."""
        c = self._low_count
        return math.log(_TWO64 - c) - math.log(c)

    @property
    def bound(self) -> float:
        """B, the magnitude of every output on the [-1, 1] scale (debiased for the realised probabilities)."""
        return _TWO64 / (_TWO64 - 2 * self._low_count)

    def _could_output(self, values: np.ndarray, dtype: torch.dtype) -> np.ndarray:
        return self._is_one_of(values, dtype, np.array([-self.bound, self.bound]))

    def _release_indices(self, k: np.ndarray, noise: NoiseSource) -> np.ndarray:
        plus = noise.bernoulli(self._thresholds[k])
        return self._from_unit(np.where(plus, self.bound, -self.bound))

    def _index_variance(self, k: np.ndarray) -> np.ndarray:
        t = self._unit(k)
        return (self.bound**2 - t**2) * ((self.hi - self.lo) / 2) ** 2


@dataclass(frozen=True)
class PiecewiseMechanism(Mechanism):
    """A discrete Piecewise mechanism (Wang et al. 2019): a band of m high-probability cells moves with the input.

    Output cells ``0 .. M+m-1``; for lattice input ``k`` the band is cells ``k .. k+m-1`` with
    ``m ~ M e^{-eps/2}`` (the continuous band's share), each band cell ``e^eps`` times as likely as any other.
    Cell ``i`` is released as ``a (i + 1/2) + b`` with ``a, b`` making the output unbiased; as M grows this
    tends to the continuous mechanism with range ``[-C, C]``, ``C = (e^{eps/2} + 1)/(e^{eps/2} - 1)``.

    Fields and checks: as ``Mechanism`` (``epsilon``, ``lo``, ``hi``).
    """

    name = "piecewise"

    @cached_property
    def _cells(self) -> tuple[int, int, int]:
        """(band cells m, band count T, outside count c): band chosen with probability T/2^64, T + c = 2^64."""
        m_total = self.resolution
        band = max(1, round(m_total * math.exp(-self.epsilon / 2)))
        # P(outside) = M/(m e^eps + M), rounded up: the realised cell ratio stays <= e^eps
        outside = _count_at_least(_expit_neg(self.epsilon + math.log(band / m_total)))
        return band, _TWO64 - outside, outside

    @cached_property
    def _affine(self) -> tuple[float, float, float, float]:
        """(a, b, p_hi, p_lo): cell -> [-1, 1] value, and the realised per-cell probabilities."""
        band, t_band, outside = self._cells
        m_total = self.resolution
        n = m_total + band
        p_hi = t_band / _TWO64 / band
        p_lo = outside / _TWO64 / m_total
        slope = (p_hi - p_lo) * band  # E[cell | k] = intercept + slope * k
        intercept = p_lo * n * n / 2 + (p_hi - p_lo) * band * band / 2
        a = (2 / m_total) / slope
        return a, -1 - a * intercept, p_hi, p_lo

    @property
    def realised_epsilon(self) -> float:
        """``log(p_hi / p_lo)`` of the realised cell probabilities."""
        band, t_band, outside = self._cells
        return math.log(t_band) + math.log(self.resolution) - math.log(outside) - math.log(band)

    @property
    def bound(self) -> float:
        """Largest output magnitude on the [-1, 1] scale."""
        a, b, _, _ = self._affine
        n = self.resolution + self._cells[0]
        return max(abs(a * 0.5 + b), abs(a * (n - 0.5) + b))

    def _could_output(self, values: np.ndarray, dtype: torch.dtype) -> np.ndarray:
        a, b, _, _ = self._affine
        n = self.resolution + self._cells[0]
        unit = (values - (self.hi + self.lo) / 2) / ((self.hi - self.lo) / 2)
        cell = np.rint((unit - b) / a - 0.5)
        ok = np.zeros(values.shape, dtype=bool)
        for cand in (cell - 1, cell, cell + 1):
            inside = (cand >= 0) & (cand <= n - 1)
            back = _cast(self._from_unit(a * (np.clip(cand, 0, n - 1) + 0.5) + b), dtype)
            ok |= inside & (back == values)
        return ok

    def _release_indices(self, k: np.ndarray, noise: NoiseSource) -> np.ndarray:
        band, t_band, _ = self._cells
        in_band = noise.bernoulli(np.full(k.size, t_band, dtype=np.uint64))
        j_band = noise.uniform_below(band, k.size)
        j_out = noise.uniform_below(self.resolution, k.size)
        cell = np.where(in_band, k + j_band, np.where(j_out < k, j_out, j_out + band))
        a, b, _, _ = self._affine
        return self._from_unit(a * (cell + 0.5) + b)

    def _index_variance(self, k: np.ndarray) -> np.ndarray:
        band = self._cells[0]
        a, _, p_hi, p_lo = self._affine
        n = self.resolution + band
        k = np.asarray(k, dtype=np.float64)

        def sq(stop: np.ndarray | float) -> np.ndarray:  # sum_{i < stop} (i + 1/2)^2
            stop = np.asarray(stop, dtype=np.float64)
            return stop**3 / 3 - stop / 12

        mean = p_lo * n * n / 2 + (p_hi - p_lo) * band * (k + band / 2)
        second = p_lo * sq(n) + (p_hi - p_lo) * (sq(k + band) - sq(k))
        return a * a * (second - mean * mean) * ((self.hi - self.lo) / 2) ** 2


def hybrid_alpha(epsilon: float) -> float:
    """Probability of using the Piecewise branch in the Hybrid mechanism (0 below eps* ~ 0.61)."""
    return -math.expm1(-epsilon / 2) if epsilon > HYBRID_EPS_STAR else 0.0


@dataclass(frozen=True)
class HybridMechanism(Mechanism):
    """Wang et al.'s Hybrid mechanism: Piecewise with probability alpha(eps), Duchi otherwise.

    Fields and checks: as ``Mechanism`` (``epsilon``, ``lo``, ``hi``).
    """

    name = "hybrid"

    @property
    def alpha(self) -> float:
        """Probability of the Piecewise branch as realised (a multiple of 2^-64)."""
        return self._alpha_count / _TWO64

    @cached_property
    def _alpha_count(self) -> int:
        return min(_TWO64 - 1, int(hybrid_alpha(self.epsilon) * _TWO64))

    @cached_property
    def _parts(self) -> tuple[PiecewiseMechanism, DuchiMechanism]:
        return PiecewiseMechanism(self.epsilon, self.lo, self.hi), DuchiMechanism(self.epsilon, self.lo, self.hi)

    @property
    def realised_epsilon(self) -> float:
        """The larger of the two branches' realised epsilons (the branch choice ignores the input)."""
        return max(p.realised_epsilon for p in self._parts)

    def _could_output(self, values: np.ndarray, dtype: torch.dtype) -> np.ndarray:
        pm, duchi = self._parts
        return duchi._could_output(values, dtype) | pm._could_output(values, dtype)

    def _release_indices(self, k: np.ndarray, noise: NoiseSource) -> np.ndarray:
        pm, duchi = self._parts
        use_pm = noise.bernoulli(np.full(k.size, self._alpha_count, dtype=np.uint64))
        return np.where(use_pm, pm._release_indices(k, noise), duchi._release_indices(k, noise))

    def _index_variance(self, k: np.ndarray) -> np.ndarray:
        pm, duchi = self._parts
        return self.alpha * pm._index_variance(k) + (1 - self.alpha) * duchi._index_variance(k)


def make_mechanism(
    name: str, epsilon: float, *, lo: float = -1.0, hi: float = 1.0, delta: float = 1e-5
) -> Mechanism:
    """Build a mechanism by name: laplace, gaussian, duchi, piecewise or hybrid.

    Args:
        name: ``laplace``, ``gaussian``, ``duchi``, ``piecewise`` or ``hybrid``.
        epsilon: the privacy parameter per scalar.
        lo: the clipping range's lower end.
        hi: the clipping range's upper end.
        delta: the Gaussian mechanism's delta.

    Raises:
        ConfigError: an unknown name, or parameters the mechanism refuses.
    """
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

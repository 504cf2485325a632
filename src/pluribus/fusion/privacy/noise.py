"""Where release noise comes from, and exact integer samplers built on it.

Every random choice a mechanism makes is drawn from 64-bit words of a :class:`NoiseSource`:

- :class:`SystemNoise` (the default) reads the operating system's CSPRNG (``os.urandom``: getrandom(2) on
  Linux). Nothing an observer sees can be used to reproduce it: there is no seed.
- :class:`SeededNoise` derives the words from an explicit seed (numpy's Philox counter generator keyed by a
  SHA-256 of the seed and the party name). It exists for reproducible experiments and tests only; a release
  made with it is **not private** (anyone who learns or guesses the seed recomputes the noise), and the
  privacy report says so.

On top of the words, the samplers below use integer arithmetic only, so the probabilities they realise are
exact (``bernoulli``: ``threshold / 2**64``; ``uniform_below``: exactly uniform by rejection;
``bernoulli_exp`` and ``discrete_laplace`` / ``discrete_gaussian``: the exact algorithms of Canonne, Kamath
and Steinke, "The Discrete Gaussian for Differential Privacy", NeurIPS 2020, Algorithms 1-3). No sample
passes through a floating-point logarithm, so the floating-point attacks on textbook Laplace samplers
(Mironov, CCS 2012) have nothing to work on.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod

import numpy as np

from pluribus.errors import ConfigError

_MAX_U64 = np.uint64(0xFFFF_FFFF_FFFF_FFFF)


class NoiseSource(ABC):
    """A stream of uniformly random 64-bit words."""

    #: whether a release made from this source can be called private
    private: bool = True

    @abstractmethod
    def words(self, n: int) -> np.ndarray:
        """``n`` independent uniform uint64 words."""

    @abstractmethod
    def describe(self) -> str:
        """One line for the privacy report: what the noise came from."""

    def uniform_below(self, m: np.ndarray | int, n: int | None = None) -> np.ndarray:
        """Exactly uniform integers in ``[0, m)`` (``m`` >= 1, scalar or one per draw), by rejection."""
        m_arr = np.asarray(m, dtype=np.uint64)
        size = int(m_arr.size if n is None else n)
        m_arr = np.broadcast_to(m_arr, (size,)).copy()
        if size and int(m_arr.min()) < 1:
            raise ConfigError("uniform_below needs m >= 1")
        # accept w < 2^64 - (2^64 mod m): every residue then has the same number of preimages
        rem = (np.uint64(0) - m_arr) % m_arr
        limit = _MAX_U64 - rem
        out = np.empty(size, dtype=np.uint64)
        todo = np.arange(size)
        while todo.size:
            w = self.words(todo.size)
            ok = w <= limit[todo]
            out[todo[ok]] = w[ok] % m_arr[todo[ok]]
            todo = todo[~ok]
        return out.astype(np.int64)

    def bernoulli(self, thresholds: np.ndarray) -> np.ndarray:
        """True with probability exactly ``threshold / 2**64`` (uint64 thresholds)."""
        return self.words(int(np.asarray(thresholds).size)) < np.asarray(thresholds, dtype=np.uint64)

    def coin(self, n: int) -> np.ndarray:
        """``n`` fair coins."""
        return (self.words(n) >> np.uint64(63)).astype(bool)

    def bernoulli_fraction(self, num: np.ndarray, den: np.ndarray | int) -> np.ndarray:
        """True with probability exactly ``num / den`` (0 <= num <= den, integers)."""
        num = np.asarray(num, dtype=np.int64)
        return self.uniform_below(den, num.size) < num

    def bernoulli_exp(self, num: np.ndarray, den: np.ndarray | int) -> np.ndarray:
        """True with probability exactly ``exp(-num/den)`` (num >= 0, den >= 1 integers; CKS Algorithm 1)."""
        num = np.asarray(num, dtype=np.int64).reshape(-1)
        den_arr = np.broadcast_to(np.asarray(den, dtype=np.int64), num.shape)
        whole, frac = num // den_arr, num % den_arr
        result = self._bernoulli_exp_unit(frac, den_arr)
        # exp(-a - f) = exp(-1)^a * exp(-f): every one of the a factors must come up true
        alive = np.flatnonzero(result & (whole > 0))
        step = 0
        while alive.size:
            ok = self._bernoulli_exp_unit(np.ones(alive.size, np.int64), np.ones(alive.size, np.int64))
            result[alive[~ok]] = False
            step += 1
            alive = alive[ok & (whole[alive] > step)]
        return result

    def _bernoulli_exp_unit(self, num: np.ndarray, den: np.ndarray) -> np.ndarray:
        # exp(-g) for g = num/den in [0, 1]: draw A_k ~ Bernoulli(g/k) for k = 1, 2, ... until one is false;
        # the first false index K is odd with probability exactly exp(-g)
        n = num.size
        first_false = np.zeros(n, dtype=np.int64)
        alive = np.arange(n)
        k = 1
        while alive.size:
            a = self.uniform_below(den[alive] * k) < num[alive]
            first_false[alive[~a]] = k
            alive = alive[a]
            k += 1
        return (first_false % 2) == 1

    def geometric_exp(self, n: int) -> np.ndarray:
        """Number of successes before the first failure of Bernoulli(exp(-1)) trials (``n`` draws)."""
        count = np.zeros(n, dtype=np.int64)
        alive = np.arange(n)
        while alive.size:
            ok = self._bernoulli_exp_unit(np.ones(alive.size, np.int64), np.ones(alive.size, np.int64))
            count[alive[ok]] += 1
            alive = alive[ok]
        return count

    def discrete_laplace(self, s: int, u: int, n: int) -> np.ndarray:
        """``n`` draws with P(z) proportional to exp(-|z| u / s) (CKS Algorithm 2; s, u >= 1 integers)."""
        if s < 1 or u < 1:
            raise ConfigError(f"discrete Laplace needs integer s, u >= 1, got s={s}, u={u}")
        out = np.zeros(n, dtype=np.int64)
        todo = np.arange(n)
        while todo.size:
            m = todo.size
            uu = self.uniform_below(s, m)
            keep = np.flatnonzero(self.bernoulli_exp(uu, s))
            v = self.geometric_exp(keep.size)
            y = (uu[keep] + s * v) // u
            negative = self.coin(keep.size)
            ok = ~(negative & (y == 0))
            done = keep[ok]
            out[todo[done]] = np.where(negative[ok], -y[ok], y[ok])
            accepted = np.zeros(m, dtype=bool)
            accepted[done] = True
            todo = todo[~accepted]
        return out

    def discrete_gaussian(self, t: int, h: int, n: int) -> np.ndarray:
        """``n`` draws of the discrete Gaussian with variance parameter ``sigma^2 = t*h`` (CKS Algorithm 3).

        ``t`` is the Laplace proposal's integer scale (CKS take ``floor(sigma) + 1``); writing
        ``sigma^2 = t*h`` with integer ``h`` keeps every rejection probability a small-integer fraction.
        """
        if t < 1 or h < 1:
            raise ConfigError(f"discrete Gaussian needs integers t, h >= 1, got t={t}, h={h}")
        out = np.zeros(n, dtype=np.int64)
        todo = np.arange(n)
        while todo.size:
            y = self.discrete_laplace(t, 1, todo.size)
            # accept with probability exp(-(|y| - sigma^2/t)^2 / (2 sigma^2)) = exp(-(|y| - h)^2 / (2 t h))
            dev = np.abs(y) - h
            ok = self.bernoulli_exp(dev * dev, 2 * t * h)
            out[todo[ok]] = y[ok]
            todo = todo[~ok]
        return out


class SystemNoise(NoiseSource):
    """Words from the operating system's CSPRNG; the only source whose releases are private."""

    private = True

    def words(self, n: int) -> np.ndarray:
        """``n`` uint64 words from ``os.urandom``."""
        return np.frombuffer(os.urandom(8 * int(n)), dtype=np.uint64).copy()

    def describe(self) -> str:
        """What the report says about this source."""
        return "operating-system CSPRNG (os.urandom); no seed exists"


class SeededNoise(NoiseSource):
    """Reproducible words from ``seed`` (and a stream name): for experiments and tests, **not private**."""

    private = False

    def __init__(self, seed: int, stream: str = "") -> None:
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
            raise ConfigError(f"noise seed must be an integer, got {seed!r}")
        self.seed = int(seed)
        self.stream = stream
        key = hashlib.sha256(f"pluribus-noise:{self.seed}:{stream}".encode()).digest()
        self._bits = np.random.Philox(key=np.frombuffer(key[:16], dtype=np.uint64))

    def words(self, n: int) -> np.ndarray:
        """``n`` uint64 words from the keyed Philox stream."""
        return np.asarray(self._bits.random_raw(int(n)), dtype=np.uint64).reshape(-1)

    def describe(self) -> str:
        """What the report says about this source: a fingerprint of the seed, never the seed itself."""
        return (f"SEEDED (seed fingerprint {seed_fingerprint(self.seed)}, stream {self.stream!r}): reproducible "
                "by anyone who knows or guesses the seed; this release is NOT PRIVATE")


def seed_fingerprint(seed: int) -> str:
    """A short digest naming a noise seed in reports (which seed a reproducible run used) without sending it.

    It hides nothing from a determined observer: a small seed can be found by trying seeds against it, or
    against the released values themselves. Seeded releases are not private either way.
    """
    return hashlib.sha256(f"pluribus-noise-seed:{int(seed)}".encode()).hexdigest()[:12]


def noise_source(seed: int | None, stream: str = "") -> NoiseSource:
    """The CSPRNG when ``seed`` is None, else a reproducible (not private) stream for ``(seed, stream)``."""
    return SystemNoise() if seed is None else SeededNoise(seed, stream)

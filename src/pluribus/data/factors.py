"""Multi-source vectors with known latent factors: one shared by every source, one specific to each.

Each user draws a shared factor ``s`` (``shared_dim``) and, per source ``k``, a specific factor ``u_k``
(``specific_dim``), all standard normal and independent. Source ``k``'s vector is
``tanh([s, u_k] @ A_k) + noise * e`` with a fixed random mixing ``A_k`` (drawn from ``mixing_seed``, so
several chunks of users drawn with other ``seed`` values share the same sources). What every source holds
in common is ``s``; what only source ``k`` holds is ``u_k``: a tokenizer's codes can then be probed for each
factor separately (the controlled test of shared vs specific codebooks), and ``shared_weight`` sets how much
of each source's variance the shared factor drives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pluribus.errors import ConfigError


@dataclass
class FactorViews:
    """Per-source vectors and the factors that made them."""

    views: dict[str, np.ndarray]  # source -> float32 [U, dim]
    shared: np.ndarray  # [U, shared_dim]
    specific: dict[str, np.ndarray]  # source -> [U, specific_dim]


def factor_views(
    n_users: int,
    *,
    n_sources: int = 3,
    dim: int = 32,
    shared_dim: int = 4,
    specific_dim: int = 4,
    shared_weight: float = 1.0,
    noise: float = 0.1,
    seed: int = 0,
    mixing_seed: int = 0,
) -> FactorViews:
    """Draw ``n_users`` users (``seed``) of ``n_sources`` sources whose mixing is fixed by ``mixing_seed``."""
    if n_users < 1 or n_sources < 1 or dim < 1 or shared_dim < 0 or specific_dim < 0 or shared_dim + specific_dim == 0:
        raise ConfigError(
            f"factor_views: n_users={n_users}, n_sources={n_sources}, dim={dim}, shared_dim={shared_dim}, "
            f"specific_dim={specific_dim}: need positive counts and at least one factor dimension"
        )
    if noise < 0 or shared_weight < 0:
        raise ConfigError(f"factor_views: noise={noise} and shared_weight={shared_weight} must be >= 0")
    mix = np.random.default_rng(mixing_seed)
    mixing = [mix.normal(size=(shared_dim + specific_dim, dim)) / np.sqrt(shared_dim + specific_dim)
              for _ in range(n_sources)]
    rng = np.random.default_rng([seed, mixing_seed])
    shared = rng.normal(size=(n_users, shared_dim))
    views, specific = {}, {}
    for k in range(n_sources):
        own = rng.normal(size=(n_users, specific_dim))
        latent = np.concatenate([shared_weight * shared, own], axis=1)
        x = np.tanh(latent @ mixing[k]) + noise * rng.normal(size=(n_users, dim))
        views[f"source{k}"] = x.astype(np.float32)
        specific[f"source{k}"] = own
    return FactorViews(views, shared, specific)

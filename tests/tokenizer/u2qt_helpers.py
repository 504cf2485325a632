"""Helpers of the tokenizer tests: correlated multi-source embeddings and a fast fake stage 1 embedder."""

from __future__ import annotations

import hashlib

import numpy as np


def make_views(n_users: int = 240, dims: tuple[int, ...] = (24, 24, 16), *, seed: int = 0) -> dict[str, np.ndarray]:
    """Sources that share a user factor plus source-specific structure and noise."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=(n_users, 4))
    out = {}
    for i, d in enumerate(dims):
        own = rng.normal(size=(n_users, 2))
        x = shared @ rng.normal(size=(4, d)) + own @ rng.normal(size=(2, d)) + 0.1 * rng.normal(size=(n_users, d))
        out[f"src{i}"] = x.astype(np.float32)
    return out


def fake_embed(texts, config=None, *, progress=False):
    """A deterministic 12-d text 'embedding' from a hash, so stage 1 tests need no model."""
    out = np.zeros((len(texts), 12), dtype=np.float32)
    for i, t in enumerate(texts):
        digest = hashlib.sha256(t.encode()).digest()
        out[i] = np.frombuffer(digest[:12], dtype=np.uint8) / 255.0
    return out

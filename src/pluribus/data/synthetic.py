"""A synthetic multi-source user generator: latent traits drive behaviour and labels; fast and seeded.

Each user has three latent traits (thrift, tech affinity, sportiness) drawn from a standard normal.
They shape the three sources (payments with merchant text and amounts, app sessions, free-text
searches), the tabular profile, and the labels, so that a model that reads the behaviour can recover
the labels, while noise keeps the task non-trivial.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from pluribus.data.schema import SourceSpec, TaskSpec, UserDataset

_MERCHANTS = {
    "thrift": ("discount grocery", "second-hand shop", "budget airline", "coupon store"),
    "tech": ("electronics store", "app store", "cloud subscription", "gaming shop"),
    "sport": ("gym membership", "running shoes shop", "bike repair", "sports nutrition"),
    "neutral": ("supermarket", "pharmacy", "coffee shop", "bookstore"),
}
_APPS = {
    "thrift": ("price tracker", "cashback wallet"),
    "tech": ("code editor", "podcast player", "smart home"),
    "sport": ("fitness tracker", "cycling maps"),
    "neutral": ("messenger", "news", "weather"),
}
_SEARCHES = {
    "thrift": ("cheapest flights", "free shipping coupons", "how to save money"),
    "tech": ("best laptop 2026", "python tutorial", "new phone review"),
    "sport": ("marathon training plan", "protein recipes", "bike trails near me"),
    "neutral": ("weather tomorrow", "pasta recipe", "movie times"),
}
_TRAITS = ("thrift", "tech", "sport")
_T0 = 1_700_000_000  # a fixed epoch so data sets are identical across runs


def make_synthetic_users(n_users: int = 300, *, seed: int = 0, events_per_user: int = 20) -> UserDataset:
    """A deterministic multi-source data set of ``n_users`` users (sources payments, apps, searches)."""
    rng = np.random.default_rng(seed)
    traits = rng.standard_normal((n_users, len(_TRAITS)))
    user_ids = [f"u{i:05d}" for i in range(n_users)]
    sources = {
        "payments": _events(rng, user_ids, traits, _MERCHANTS, events_per_user, amount=True),
        "apps": _events(rng, user_ids, traits, _APPS, events_per_user // 2, amount=False),
        "searches": _events(rng, user_ids, traits, _SEARCHES, events_per_user // 2, amount=False),
    }
    profile = pd.DataFrame(
        {
            "age": np.clip(35 + 8 * traits[:, 0] - 6 * traits[:, 1] + 5 * rng.standard_normal(n_users), 18, 80),
            "tenure_years": np.abs(3 + traits[:, 0] + rng.standard_normal(n_users)),
            "devices": np.maximum(1, np.round(2 + traits[:, 1] + 0.5 * rng.standard_normal(n_users))),
        },
        index=pd.Index(user_ids, name="user_id"),
    )
    noisy = traits + 0.7 * rng.standard_normal(traits.shape)
    labels = pd.DataFrame(
        {
            "price_sensitive": (noisy[:, 0] > 0).astype(int),
            "early_adopter": (noisy[:, 1] > 0.3).astype(int),
            "active_lifestyle": (noisy[:, 2] > -0.2).astype(int),
            "segment": np.array(_TRAITS)[np.argmax(noisy, axis=1)],
        },
        index=pd.Index(user_ids, name="user_id"),
    )
    tasks = [
        TaskSpec("price_sensitive", "binary", (), "driven by the thrift trait"),
        TaskSpec("early_adopter", "binary", (), "driven by the tech trait"),
        TaskSpec("active_lifestyle", "binary", (), "driven by the sport trait"),
        TaskSpec("segment", "multiclass", _TRAITS, "the dominant trait"),
    ]
    specs = [
        SourceSpec("payments", "text", ("amount",), "card payments: merchant and amount"),
        SourceSpec("apps", "text", ("minutes",), "app sessions: app and minutes"),
        SourceSpec("searches", "text", (), "search queries"),
    ]
    return UserDataset.build(
        f"synthetic-{n_users}-seed{seed}", sources=sources, source_specs=specs, labels=labels, tasks=tasks,
        profile=profile, user_ids=user_ids, meta={"seed": seed},
    )


def _events(
    rng: np.random.Generator,
    user_ids: list[str],
    traits: np.ndarray,
    vocab: Mapping[str, tuple[str, ...]],
    per_user: int,
    *,
    amount: bool,
) -> pd.DataFrame:
    groups = (*_TRAITS, "neutral")
    logits = np.concatenate([1.5 * traits, np.zeros((len(user_ids), 1))], axis=1)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    counts = np.maximum(1, rng.poisson(per_user, size=len(user_ids)))
    rows_user, rows_group = [], []
    for u, n in enumerate(counts):
        rows_user.append(np.full(n, u))
        rows_group.append(rng.choice(len(groups), size=n, p=probs[u]))
    users = np.concatenate(rows_user)
    group_idx = np.concatenate(rows_group)
    items = np.array([vocab[groups[g]][rng.integers(len(vocab[groups[g]]))] for g in group_idx], dtype=object)
    timestamps = _T0 + np.sort(rng.integers(0, 90 * 86400, size=len(users)))
    frame = pd.DataFrame({"user_id": np.array(user_ids, dtype=object)[users], "timestamp": timestamps})
    if amount:
        base = np.where(group_idx == 0, 12.0, np.where(group_idx == 1, 80.0, 35.0))
        frame["amount"] = np.round(base * rng.lognormal(0.0, 0.5, size=len(users)), 2)
        frame["text"] = [f"paid {a:.2f} at {m}" for a, m in zip(frame["amount"], items, strict=True)]
    else:
        minutes = np.round(rng.gamma(2.0, 5.0, size=len(users)), 1)
        if vocab is _APPS:
            frame["minutes"] = minutes
            frame["text"] = [f"used {m} for {t} min" for m, t in zip(items, minutes, strict=True)]
        else:
            frame["text"] = items
    return frame.sort_values(["user_id", "timestamp"], kind="stable").reset_index(drop=True)

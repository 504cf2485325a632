"""Contrastive pairs from a UserDataset (MovieLens-100K by default).

Anchor: the user's history (+ an optional natural-language query), as rendered text, as U2QT code tokens
(added vocabulary), or as per-event vectors injected as soft tokens. Positive: a templated description of
the user's held-out *future* behaviour (``ds.future``), or a profile answer. Demographic labels are never
put in the input.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import pandas as pd

from pluribus.data.schema import UserDataset
from pluribus.encoder.config import future_cutoff
from pluribus.encoder.model import EVENT_TOKEN, UserInput
from pluribus.errors import ConfigError, DataError, ShapeError

QUERIES = (
    "Which kinds of movies will this user watch next?",
    "What genres does this user prefer?",
    "How will this user rate the next movies?",
    "Describe this user's taste in movies.",
)


@dataclass
class PairSet:
    """Anchors and positives (aligned), their user ids, and tokens the encoder must add to its vocabulary.

    Attributes:
        user_ids: the users, one per pair.
        anchors: each user's input (the history).
        positives: each user's positive (aligned with ``anchors``).
        extra_tokens: tokens the encoder must add to its vocabulary (e.g. U2QT codes).
        skipped: users left out for lack of history or positive.
    """

    user_ids: list[str]
    anchors: list[UserInput]
    positives: list[UserInput]
    extra_tokens: tuple[str, ...] = ()
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.user_ids)

    def subset(self, indices: Sequence[int] | np.ndarray) -> PairSet:
        """The pairs at ``indices`` (same added tokens).

        Args:
            indices: the pairs to keep, in order.
        """
        idx = [int(i) for i in indices]
        return PairSet([self.user_ids[i] for i in idx], [self.anchors[i] for i in idx],
                       [self.positives[i] for i in idx], self.extra_tokens)


def split_pairs(pairs: PairSet, heldout: float, *, seed: int = 0) -> tuple[PairSet, PairSet | None]:
    """(training pairs, held-out pairs or None) by user; held-out users depend on ``seed`` only.

    Args:
        pairs: the pairs.
        heldout: the held-out share of users (0 for none).
        seed: the shuffle's seed.

    Raises:
        DataError: too few users to leave at least two on each side.
    """
    from pluribus.data.split import split_indices

    if heldout <= 0.0:
        return pairs, None
    train_idx, held_idx = split_indices(len(pairs), (1.0 - heldout, heldout), seed=seed)
    if len(held_idx) < 2 or len(train_idx) < 2:
        raise DataError(f"{len(pairs)} users cannot be split {1 - heldout:.0%}/{heldout:.0%} with >= 2 on each side")
    return pairs.subset(train_idx), pairs.subset(held_idx)


def render_history(events: pd.DataFrame, text_field: str, max_events: int) -> str:
    """The most recent ``max_events`` event texts, oldest first, joined by '; '."""
    texts = [str(t) for t in events[text_field].tolist()[-max_events:] if str(t).strip()]
    return "; ".join(texts)


def describe_future(events: pd.DataFrame, text_field: str, *, top_genres: int = 3, examples: int = 2) -> str:
    """Templated description of future events: top genres, mean rating and example titles when present."""
    parts = [f"Next, the user has {len(events)} more events."]
    if "genres" in events.columns:
        counts = Counter(g for gs in events["genres"].astype(str) for g in gs.split("|") if g and g != "nan")
        if counts:
            total = sum(counts.values())
            tops = ", ".join(f"{g} ({100 * n / total:.0f}%)" for g, n in counts.most_common(top_genres))
            parts.append(f"Mostly {tops}.")
    if "rating" in events.columns:
        parts.append(f"Average rating {float(events['rating'].mean()):.1f}/5.")
    if "title" in events.columns:
        parts.append("For example: " + "; ".join(events["title"].astype(str).tolist()[:examples]) + ".")
    elif text_field in events.columns:
        parts.append("For example: " + "; ".join(events[text_field].astype(str).tolist()[:examples]) + ".")
    return " ".join(parts)


def describe_profile(row: pd.Series) -> str:
    """A profile answer: each profile field as 'name: value' (numbers to two decimals, texts as they are)."""
    return "User profile: " + ", ".join(
        f"{k.replace('_', ' ')}: {v if isinstance(v, str) else f'{float(v):.2f}'}" for k, v in row.items()) + "."


def build_pairs(
    ds: UserDataset,
    *,
    source: str = "ratings",
    inputs: Literal["text", "codes", "events"] = "text",
    positive: Literal["future", "future_events", "profile"] = "future_events",
    max_events: int = 50,
    future_events: int = 3,
    query: bool = False,
    missing: Literal["skip", "error"] = "skip",
    codes: np.ndarray | None = None,
    code_vocab: Sequence[str] | None = None,
    event_vectors: Mapping[str, np.ndarray] | None = None,
    seed: int = 0,
) -> PairSet:
    """Anchor/positive pairs for every user with history and a positive; users without are skipped (warned).

    Positives: ``future_events`` (default) is "Next: " and the first ``future_events`` held-out events
    rendered like the history (learnable from the input), ``future`` a templated summary of the held-out
    future (genres, ratings; near-identical across users), ``profile`` the user's profile row.
    ``missing="error"`` raises DataError naming the first user without history or positive instead of skipping.

    Args:
        ds: the data set.
        source: the behaviour source the history comes from.
        inputs: what the anchors hold: ``text``, U2QT ``codes`` or ``events`` (per-event vectors).
        positive: ``future_events``, ``future`` or ``profile`` (see above).
        max_events: the most recent events kept per history.
        future_events: how many held-out events a ``future_events`` positive shows.
        query: add a natural-language query after the user's data.
        missing: ``skip`` (warned) or ``error`` for users without history or positive.
        codes: ``[users, ...]`` token indices (``inputs="codes"``).
        code_vocab: the token strings those indices name.
        event_vectors: user id -> ``[n_events, D]`` chronological vectors (``inputs="events"``).
        seed: the seed of any sampling.

    Raises:
        ConfigError: an unknown source, input kind or positive, or what that choice needs is missing.
        DataError: ``missing="error"`` and a user lacks history or positive, or fewer than two usable users.
        ShapeError: ``codes`` without one row per user.
    """
    if source not in ds.sources:
        raise ConfigError(f"source {source!r} is not in data set {ds.name!r}; sources: {ds.source_names}")
    if max_events < 1:
        raise ConfigError(f"max_events must be >= 1, got {max_events}")
    spec = ds.source_specs[source]
    text_field = spec.text_field or ""
    history = ds.events_by_user(source)
    future = _future_by_user(ds, source) if positive in ("future", "future_events") else {}
    if positive == "profile" and ds.profile is None:
        raise ConfigError(f"positive='profile' needs a profile table; data set {ds.name!r} has none")
    if positive not in ("future", "future_events", "profile"):
        raise ConfigError(f"positive must be 'future', 'future_events' or 'profile', got {positive!r}")
    if positive == "future_events" and (future_events < 1 or not text_field):
        raise ConfigError("positive='future_events' needs future_events >= 1 and a source with a text field")
    extra: tuple[str, ...] = ()
    if inputs == "codes":
        codes, extra = _check_codes(codes, code_vocab, ds.n_users)
    elif inputs == "events":
        if event_vectors is None:
            raise ConfigError("inputs='events' needs event_vectors: user_id -> [n_events, D] array (chronological)")
    elif inputs == "text":
        if not text_field:
            raise ConfigError(f"source {source!r} has no text field; use inputs='codes' or 'events'")
    else:
        raise ConfigError(f"inputs must be 'text', 'codes' or 'events', got {inputs!r}")
    rng = np.random.default_rng(seed)
    out = PairSet([], [], [], extra_tokens=extra)
    for row, uid in enumerate(ds.user_ids.tolist()):
        uid = str(uid)
        events = history.get(uid)
        if positive in ("future", "future_events"):
            fut = future.get(uid)
            if fut is None or not len(fut):
                answer = ""
            elif positive == "future":
                answer = describe_future(fut, text_field)
            else:
                answer = "Next: " + "; ".join(fut[text_field].astype(str).tolist()[:future_events])
        else:
            answer = describe_profile(ds.profile.loc[uid]) if uid in ds.profile.index else ""  # type: ignore[union-attr]
        anchor = _anchor(inputs, events, text_field, max_events, uid, row, codes, code_vocab, event_vectors)
        if anchor is None or not answer:
            if missing == "error":
                what = "history events" if anchor is None else f"held-out events for the {positive!r} positive"
                raise DataError(f"user {uid} has no {what}", row=row, field=source)
            out.skipped.append(uid)
            continue
        if query:
            anchor = UserInput(anchor.text, anchor.events, query=QUERIES[int(rng.integers(len(QUERIES)))])
        out.user_ids.append(uid)
        out.anchors.append(anchor)
        out.positives.append(UserInput(answer))
    if out.skipped:
        warnings.warn(
            f"{len(out.skipped)} users without history or positive were skipped (e.g. {out.skipped[:3]})",
            stacklevel=2,
        )
    if len(out) < 2:
        raise DataError(f"only {len(out)} usable users in {ds.name!r}; contrastive training needs >= 2")
    return out


def user_inputs(
    ds: UserDataset,
    *,
    source: str = "ratings",
    max_events: int = 50,
    empty: Literal["error", "placeholder"] = "placeholder",
) -> tuple[list[str], list[UserInput]]:
    """History text of every user (for ``encode``); users with no events get '(no history)' or raise.

    Args:
        ds: the data set.
        source: the behaviour source.
        max_events: the most recent events kept per user.
        empty: for a user without events: ``placeholder`` ('(no history)') or ``error``.

    Raises:
        DataError: ``empty="error"`` and a user has no events.
    """
    spec = ds.source_specs[source]
    history = ds.events_by_user(source)
    ids, items = [], []
    for row, uid in enumerate(ds.user_ids.tolist()):
        ev = history.get(str(uid))
        text = render_history(ev, spec.text_field or "", max_events) if ev is not None and len(ev) else ""
        if not text:
            if empty == "error":
                raise DataError("user has no history events", row=row, field=f"{source} of user {uid}")
            text = "(no history)"
        ids.append(str(uid))
        items.append(UserInput(text))
    return ids, items


def _future_by_user(ds: UserDataset, source: str) -> dict[str, pd.DataFrame]:
    frame = ds.future.get(source) if ds.future else None
    if frame is None or frame.empty:
        raise ConfigError(f"data set {ds.name!r} has no held-out future events for {source!r}; use positive='profile'")
    return {str(u): g.sort_values("timestamp") for u, g in frame.groupby("user_id", sort=False)}


def _check_codes(
    codes: np.ndarray | None, vocab: Sequence[str] | None, n_users: int
) -> tuple[np.ndarray, tuple[str, ...]]:
    if codes is None or vocab is None:
        raise ConfigError("inputs='codes' needs codes (an int array, one row per user) and code_vocab (token strings)")
    arr = np.asarray(codes)
    if arr.shape[0] != n_users or arr.ndim < 2:
        raise ShapeError("codes", arr.shape, f"[{n_users}, ...] (one row per user)")
    if not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() >= len(vocab):
        raise DataError(f"codes must be integers in [0, {len(vocab)}) (indices into code_vocab)", field="codes")
    return arr.reshape(n_users, -1), tuple(vocab)


def _anchor(
    inputs: str,
    events: pd.DataFrame | None,
    text_field: str,
    max_events: int,
    uid: str,
    row: int,
    codes: np.ndarray | None,
    vocab: Sequence[str] | None,
    event_vectors: Mapping[str, np.ndarray] | None,
) -> UserInput | None:
    if inputs == "codes":
        assert codes is not None and vocab is not None
        return UserInput(" ".join(vocab[int(c)] for c in codes[row]))
    if events is None or not len(events):
        return None
    if inputs == "text":
        text = render_history(events, text_field, max_events)
        return UserInput(text) if text else None
    assert event_vectors is not None
    vecs = event_vectors.get(uid)
    if vecs is None or len(vecs) == 0:
        return None
    vecs = np.asarray(vecs, dtype=np.float32)[-max_events:]
    return UserInput(" ".join([EVENT_TOKEN] * len(vecs)), vecs)


def pairs_vocabulary(pairs: PairSet) -> list[str]:
    """Every whitespace-separated word of the anchors and positives, in first-seen order (for word tokenizers)."""
    words: dict[str, None] = {}
    for item in [*pairs.anchors, *pairs.positives]:
        for w in item.rendered().split():
            words.setdefault(w, None)
    return list(words)


def hold_out_future(ds: UserDataset, source: str, last: int | None, after: str | None) -> UserDataset:
    """``ds`` with the source's future (each user's last ``last`` events, or those from ``after`` on) moved from
    its history to ``ds.future``: the history never contains the positive it is trained to predict."""
    # a stable sort: events with equal times keep their file order, so "last" is well defined
    frame = ds.sources[source].sort_values(["user_id", "timestamp"], kind="stable").reset_index(drop=True)
    if after is not None:
        is_future = frame["timestamp"] >= future_cutoff(after)
    else:
        assert last is not None
        is_future = frame.groupby("user_id", sort=False).cumcount(ascending=False) < last
    history, future = frame[~is_future].reset_index(drop=True), frame[is_future].reset_index(drop=True)
    if future.empty:
        raise ConfigError(f"--future-after {after!r} holds out no {source!r} events of data set {ds.name!r}")
    if history.empty:
        what = f"--future-after {after!r}" if after is not None else f"--future-last {last}"
        raise ConfigError(f"{what} leaves no {source!r} history in data set {ds.name!r}")
    return replace(ds, sources={**ds.sources, source: history}, future={**ds.future, source: future})

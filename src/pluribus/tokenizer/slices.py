"""Stage 1 over the whole history: cut each user's events into slices, embed every slice, combine them.

As the paper describes, a source is embedded slice by slice rather than as one text that the embedder
truncates to its newest events. Slices are cut by time (``EmbedConfig.slice_days``: consecutive windows
from the user's first event) and/or by a token budget (``slice_tokens``: events are packed, oldest first,
while the slice's text stays within the budget, counted with the embedder's own tokenizer). Every event
of the configured window lands in exactly one slice; what the embedder still truncates (a time slice
longer than its limit) is counted and reported, never silent.

Numeric event fields (``numeric_in_text``) are rendered into each event's text as ``name=value``.
Slice texts are embedded in shards of ``shard_size`` slices; each shard is cached on its own, so an
interrupted stage 1 resumes at the first missing shard. Progress prints one line per shard to stderr,
which also shows in a log file or a non-terminal. The per-source vector is the mean of the user's slice
vectors, or a recency-weighted mean (weight ``0.5 ** (age / recency_half_life)``, age 0 = newest slice);
``combine="sequence"`` keeps the slice vectors themselves (``SliceEmbeddings``).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from pluribus.config import config_to_dict
from pluribus.errors import ConfigError, DataError
from pluribus.io import load_tensors, save_tensors
from pluribus.progress import progress_enabled
from pluribus.tokenizer.config import EmbedConfig, default_model_path

if TYPE_CHECKING:
    from pluribus.data.schema import UserDataset

_CACHE_VERSION = 1
TokenCounter = Callable[[Sequence[str]], list[int]]


@dataclass
class SliceTexts:
    """The slices of one source: text, owning user (row of the data set) and position in that user's slices."""

    source: str
    texts: list[str]
    user: np.ndarray  # int [n_slices]
    index: np.ndarray  # int [n_slices], 0 = the user's oldest slice
    n_users: int
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class SliceEmbeddings:
    """Slice vectors ``[n_slices, dim]`` with their user row and position (``combine="sequence"``)."""

    source: str
    vectors: np.ndarray
    user: np.ndarray
    index: np.ndarray
    n_users: int
    report: dict[str, Any] = field(default_factory=dict)

    def combine(self, how: str, *, half_life: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
        """Per-user vector ``[n_users, dim]`` and present mask: ``mean`` or ``recency``-weighted mean of its slices."""
        if how not in ("mean", "recency"):
            raise ConfigError(f"combine={how!r}: expected 'mean' or 'recency' for one vector per user")
        dim = self.vectors.shape[1]
        counts = np.bincount(self.user, minlength=self.n_users)
        if how == "mean":
            weight = np.ones(len(self.user))
        else:
            newest = np.zeros(self.n_users, dtype=np.int64)
            np.maximum.at(newest, self.user, self.index)
            age = newest[self.user] - self.index
            weight = 0.5 ** (age / half_life)
        total = np.bincount(self.user, weights=weight, minlength=self.n_users)
        out = np.zeros((self.n_users, dim), dtype=np.float64)
        np.add.at(out, self.user, self.vectors * weight[:, None])
        present = counts > 0
        out[present] /= total[present, None]
        return out.astype(np.float32), present


def render_event_strings(ds: UserDataset, source: str, config: EmbedConfig, *, last: int | None = None) -> pd.DataFrame:
    """Events of ``source`` in the window (only each user's ``last`` newest when given), oldest first per user,
    with their rendered text (``_rendered``)."""
    spec = ds.source_specs.get(source)
    if spec is None:
        raise DataError(f"unknown source {source!r}", path=ds.name, expected=f"one of {ds.source_names}")
    frame = ds.source(source)
    if len(frame) == 0:
        return frame.assign(_rendered=pd.Series(dtype=str))
    frame = frame.sort_values(["user_id", "timestamp"], kind="stable")
    if config.window_days is not None:
        newest = frame.groupby("user_id")["timestamp"].transform("max")
        frame = frame[frame["timestamp"] >= newest - int(config.window_days * 86400)]
    if last is not None:
        frame = frame.groupby("user_id", sort=False).tail(last)
    frame = frame.assign(date=pd.to_datetime(frame["timestamp"], unit="s").dt.strftime("%Y-%m-%d"), source=source)
    if spec.text_field and spec.text_field != "text" and "text" not in frame.columns:
        frame = frame.assign(text=frame[spec.text_field])
    template = config.event_template
    if config.numeric_in_text:
        extra = [f for f in spec.numeric_fields if "{" + f not in template]
        if extra:
            template += " (" + ", ".join(f"{f}={{{f}:g}}" for f in extra) + ")"
    columns = list(frame.columns)
    try:
        rendered = [template.format(**dict(zip(columns, row, strict=True))) for row in frame.itertuples(index=False)]
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(
            f"event_template {template!r} cannot be filled for source {source!r}: {err!r}; fields available: {columns}"
        ) from None
    return frame.assign(_rendered=rendered)


def slice_source(
    ds: UserDataset, source: str, config: EmbedConfig, *, count_tokens: TokenCounter | None = None,
    token_limit: int | None = None,
) -> SliceTexts:
    """Cut every user's events of ``source`` into slices (see the module docstring); nothing in the window dropped.

    ``count_tokens`` counts the embedder's tokens of each string (needed with ``slice_tokens`` and for the
    truncation report); ``token_limit`` is the embedder's own limit, against which slices are checked.
    """
    if config.slice_days is None and config.slice_tokens is None:
        raise ConfigError("slicing needs EmbedConfig.slice_days and/or slice_tokens")
    frame = render_event_strings(ds, source, config)
    n_all = len(ds.source(source))
    position = {u: i for i, u in enumerate(ds.user_ids)}
    texts: list[str] = []
    users: list[int] = []
    indices: list[int] = []
    budget = config.slice_tokens
    sep_cost = header_cost = 0
    if budget is not None:
        if count_tokens is None:
            raise ConfigError("slice_tokens needs a token counter (the embedder's tokenizer)")
        sep_cost = count_tokens([config.separator.strip()])[0] if config.separator.strip() else 0
        header_cost = count_tokens([config.header.format(source=source, n_events=999)])[0]  # the widest count
    for user, group in frame.groupby("user_id", sort=False):
        row = position.get(str(user))
        if row is None:
            continue
        events = list(group["_rendered"])
        stamps = group["timestamp"].to_numpy()
        windows = (
            ((stamps - stamps[0]) // int(config.slice_days * 86400)).astype(int)
            if config.slice_days is not None else np.zeros(len(events), dtype=int)
        )
        costs = count_tokens(events) if budget is not None and count_tokens is not None else None
        chunks: list[list[str]] = []
        for w in np.unique(windows):
            members = np.flatnonzero(windows == w)
            if budget is None or costs is None:
                chunks.append([events[i] for i in members])
                continue
            current: list[str] = []
            used = 0
            for i in members:
                need = costs[i] + (sep_cost if current else 0)
                if header_cost + costs[i] > budget:
                    raise ConfigError(
                        f"slice_tokens={budget} is smaller than one event: source {source!r}, user {user!r}, event "
                        f"{events[i][:60]!r} needs {header_cost + costs[i]} tokens with the header"
                    )
                if current and header_cost + used + need > budget:
                    chunks.append(current)
                    current, used, need = [], 0, costs[i]
                current.append(events[i])
                used += need
            if current:
                chunks.append(current)
        for k, chunk in enumerate(chunks):
            ordered = chunk[::-1] if config.newest_first else chunk
            texts.append(config.header.format(source=source, n_events=len(chunk)) + config.separator.join(ordered))
            users.append(row)
            indices.append(k)
    if not texts:
        raise DataError(f"every slice of source {source!r} is empty (no event in the window for any user)",
                        path=ds.name, field=source, expected="at least one event")
    report: dict[str, Any] = {
        "source": source, "slices": len(texts), "users": len(set(users)), "events": int(len(frame)),
        "events_outside_window": int(n_all - len(frame)),
        "slices_per_user_max": int(max(indices) + 1),
    }
    if count_tokens is not None and token_limit is not None:
        lengths = np.asarray(count_tokens(texts))
        over = lengths > token_limit
        report.update({"token_limit": int(token_limit), "slices_truncated": int(over.sum()),
                       "tokens_truncated": int((lengths[over] - token_limit).sum()),
                       "tokens_mean": float(lengths.mean())})
    return SliceTexts(source, texts, np.asarray(users), np.asarray(indices), ds.n_users, report)


def slices_cache_key(slices: SliceTexts, config: EmbedConfig) -> str:
    """Hash of the slice texts and the model settings (not the batch or shard size: they do not change vectors)."""
    h = hashlib.sha256()
    settings = config_to_dict(config)
    for unused in ("batch_size", "device", "shard_size", "combine", "recency_half_life"):
        settings.pop(unused, None)
    settings["model"] = config.model or "packaged:all-MiniLM-L6-v2"
    h.update(json.dumps({"v": _CACHE_VERSION, "settings": settings}, sort_keys=True).encode())
    for text, u in zip(slices.texts, slices.user.tolist(), strict=True):
        h.update(f"{u}\x1f{text}\x1e".encode())
    return h.hexdigest()[:24]


def embed_slices(
    slices: SliceTexts,
    config: EmbedConfig,
    *,
    embed: Callable[[list[str]], np.ndarray],
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> SliceEmbeddings:
    """Embed every slice in shards of ``config.shard_size`` (each cached on its own, so a rerun resumes)."""
    size = config.shard_size
    n = len(slices.texts)
    folder = None
    if cache_dir is not None:
        folder = Path(cache_dir) / f"{slices.source}-slices-{slices_cache_key(slices, config)}"
    parts = []
    start_time = time.time()
    done_now = 0
    shards = range(0, n, size)
    resumed = 0
    for k, start in enumerate(shards):
        path = None if folder is None else folder / f"shard-{k:05d}.safetensors"
        if path is not None and path.exists():
            parts.append(load_tensors(path)["embeddings"].numpy())
            resumed += 1
            continue
        vecs = np.asarray(embed(slices.texts[start : start + size]), dtype=np.float32)
        if path is not None:
            save_tensors(path, {"embeddings": torch.from_numpy(vecs)}, metadata={"source": slices.source})
        parts.append(vecs)
        done_now += len(vecs)
        if progress and progress_enabled():
            elapsed = time.time() - start_time
            left = n - start - len(vecs)
            rate = done_now / elapsed if elapsed > 0 else float("nan")
            print(f"embedding {slices.source}: {start + len(vecs)}/{n} slices, shard {k + 1}/{len(shards)}, "
                  f"{rate:.1f} slices/s, eta {left / rate if rate > 0 else float('nan'):.0f}s"
                  + (f" ({resumed} shards from the cache)" if resumed else ""), file=sys.stderr, flush=True)
    report = dict(slices.report, shards=len(shards), shards_cached=resumed)
    return SliceEmbeddings(slices.source, np.concatenate(parts), slices.user, slices.index, slices.n_users, report)


def embedder_tokens(config: EmbedConfig) -> tuple[TokenCounter, int]:
    """The embedder's tokenizer as a counter (tokens without special tokens) and its per-text limit (usable tokens)."""
    from transformers import AutoTokenizer

    path = config.model or default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    if config.kind == "sentence-transformers":
        limit = _sentence_transformers_limit(path, tok)
    else:
        limit = config.max_length
    special = len(tok("")["input_ids"])  # [CLS] [SEP] or BOS/EOS the model adds to every text

    def count(texts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in tok(list(texts), add_special_tokens=False)["input_ids"]]

    return count, limit - special


def _sentence_transformers_limit(path: str, tok: Any) -> int:
    config_file = Path(path) / "sentence_bert_config.json"
    if config_file.exists():
        value = json.loads(config_file.read_text()).get("max_seq_length")
        if value:
            return int(value)
    return int(min(getattr(tok, "model_max_length", 512), 100_000))

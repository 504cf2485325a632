"""The event language: users' histories as short words, and a small decoder pretrained on them.

A large pretrained LLM reads rendered event text slowly on a CPU, and with a few dozen CPU steps it does not
learn to tell users apart (docs/results/encoder.md). The event language is the cheap vehicle that does learn: each event
of one source becomes a few words,

* one word for the event's identity: ``i<item>`` from an item column (``item_id``) when the source's frame has
  one, else ``i<k>`` for the k-th most frequent value of the source's text field; values beyond a vocabulary
  cap (the rarest) all map to one unknown word ``i?``;
* one word per numeric field: its value (``r5``) when the field has few distinct values, else its quantile bin
  (``hq3``) with edges fitted on the history. The prefix is the field's first letter when that is unique, else
  the field's name and ``=`` (``n_actors=2``).

MovieLens-100K ratings render as ``i50 r5 i172 r4 ...``, exactly the language of ``benchmarks/encoder/masks.py``.
``pretrain`` trains a 4-layer Qwen3 (hidden 128) by next-token prediction on the users' history sequences and
caches it in a folder keyed by the data and the settings; ``event_pairs`` builds history -> future pairs in the
same language (the ``future_events`` positive), and ``vehicle`` puts it together for ``train_encoder``:

    v = vehicle(ds, data_home() / "encoder", pretrain_steps=300)
    encoder = UserEncoder(v.config)
    train_encoder(encoder, v.train, ScheduleConfig(total_steps=300), TrainConfig(steps=300, batch_size=32, lr=3e-4))
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from pluribus.data.schema import UserDataset
from pluribus.encoder.pairs import PairSet, split_pairs
from pluribus.errors import ConfigError, DataError

#: Item columns tried, in order, for the event's identity word (else the source's text field).
ITEM_COLUMNS = ("item_id", "item")
#: The identity word's prefix and the unknown word (rare identity values beyond the vocabulary cap).
IDENTITY_PREFIX = "i"
UNKNOWN = IDENTITY_PREFIX + "?"
#: The input of a user without history events (the tokenizer's unknown token: the encoder refuses empty text).
NO_HISTORY = "[UNK]"
#: Bump when the pretraining procedure changes, so that old cached decoders are not reused.
PRETRAIN_VERSION = 1
MIN_USERS = 10


@dataclass(frozen=True)
class NumericWords:
    """How one numeric field becomes a word: its value (few distinct values) or its quantile bin."""

    field: str
    prefix: str
    values: tuple[float, ...] = ()  # the distinct values, when the field has few
    edges: tuple[float, ...] = ()  # interior quantile edges, when it has many

    def words(self) -> list[str]:
        """Every word of this field, in vocabulary order."""
        if self.values:
            return [self.prefix + _number(v) for v in self.values]
        return [f"{self.prefix}q{b}" for b in range(len(self.edges) + 1)]

    def render(self, column: pd.Series) -> np.ndarray:
        """One word per value (missing values: the prefix and '?')."""
        x = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        if self.values:
            out = np.array([self.prefix + _number(v) for v in x], dtype=object)
        else:
            bins = np.searchsorted(np.asarray(self.edges, dtype=np.float64), x, side="right")
            out = np.array([f"{self.prefix}q{b}" for b in bins], dtype=object)
        out[~np.isfinite(x)] = self.prefix + "?"
        return out


@dataclass(frozen=True)
class EventLanguage:
    """The words of one source's events (see the module docstring); ``fit_language`` builds one from data."""

    source: str
    identity: str | None  # the column the identity word comes from (None: numeric words only)
    identity_kind: Literal["item", "text", "none"]
    items: tuple[str, ...] = ()  # identity values kept, in vocabulary order
    numeric: tuple[NumericWords, ...] = ()
    unknown: bool = False  # whether rare values were dropped (then the unknown word is in the vocabulary)
    _lookup: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.identity_kind == "item":
            words = [IDENTITY_PREFIX + v for v in self.items]
        else:
            words = [f"{IDENTITY_PREFIX}{k}" for k in range(len(self.items))]
        self._lookup.update(zip(self.items, words, strict=True))

    def words(self) -> list[str]:
        """The vocabulary: numeric words (field by field), identity words, then the unknown word if needed."""
        out = [w for n in self.numeric for w in n.words()]
        out += [self._lookup[v] for v in self.items]
        return out + ([UNKNOWN] if self.unknown else [])

    def event_words(self, frame: pd.DataFrame) -> np.ndarray:
        """One string per event (row of ``frame``): its words joined by spaces."""
        parts: list[np.ndarray] = []
        if self.identity is not None:
            values = frame[self.identity].astype(str).to_numpy()
            parts.append(np.array([self._lookup.get(v, UNKNOWN) for v in values], dtype=object))
        parts += [n.render(frame[n.field]) for n in self.numeric]
        if not parts:
            return np.array([], dtype=object)
        out = parts[0]
        for p in parts[1:]:
            out = out + " " + p
        return out

    def render(self, frame: pd.DataFrame | None, limit: int | None = None, *, first: bool = False) -> str:
        """The words of the last (``first``: the first) ``limit`` events of a user's chronological frame."""
        if frame is None or not len(frame):
            return ""
        if limit is not None:
            frame = frame.iloc[:limit] if first else frame.iloc[-limit:]
        return " ".join(self.event_words(frame).tolist())

    def to_json(self) -> dict[str, Any]:
        """A JSON-able description (``from_json`` reads it back)."""
        out = asdict(self)
        out.pop("_lookup")
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EventLanguage:
        """The language ``to_json`` described."""
        numeric = tuple(NumericWords(n["field"], n["prefix"], tuple(n["values"]), tuple(n["edges"]))
                        for n in data["numeric"])
        return cls(data["source"], data["identity"], data["identity_kind"], tuple(data["items"]), numeric,
                   bool(data["unknown"]))


def _number(v: float) -> str:
    if not np.isfinite(v):
        return "?"
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def choose_source(ds: UserDataset, source: str | None = None) -> str:
    """``source`` if given (checked), else ``ratings`` if present, else the first source with events."""
    if source is not None:
        if source not in ds.sources:
            raise ConfigError(f"source {source!r} is not a source of data set {ds.name!r}; sources: {ds.source_names}")
        if ds.sources[source].empty:
            raise ConfigError(f"source {source!r} of data set {ds.name!r} has no events; the event language needs "
                              "a source of events")
        return source
    names = ["ratings", *ds.source_names] if "ratings" in ds.sources else list(ds.source_names)
    for name in names:
        if name in ds.sources and not ds.sources[name].empty:
            return name
    raise ConfigError(f"data set {ds.name!r} has no source with events; the event language needs a source of events")


def fit_language(ds: UserDataset, source: str | None = None, *, vocabulary: int = 20_000, few_values: int = 10,
                 bins: int = 8) -> EventLanguage:
    """The event language of ``source`` fitted on ``ds`` (history and held-out future for the identity words,
    the history for the numeric words); at most ``vocabulary`` identity words, the most frequent."""
    if vocabulary < 1 or few_values < 1 or bins < 1:
        raise ConfigError(f"vocabulary, few_values and bins must be >= 1, got {vocabulary}, {few_values}, {bins}")
    source = choose_source(ds, source)
    history = ds.sources[source]
    spec = ds.source_specs.get(source)
    frames = [history] + ([ds.future[source]] if source in ds.future and not ds.future[source].empty else [])
    item_col = next((c for c in ITEM_COLUMNS if c in history.columns), None)
    identity: str | None
    kind: Literal["item", "text", "none"]
    if item_col is not None:
        identity, kind = item_col, "item"
    elif spec is not None and spec.text_field and spec.text_field in history.columns:
        identity, kind = spec.text_field, "text"
    else:
        identity, kind = None, "none"
    items: tuple[str, ...] = ()
    unknown = False
    if identity is not None:
        values = pd.concat([f[identity] for f in frames if identity in f.columns]).dropna().astype(str)
        counts = values.value_counts(sort=False)
        if kind == "item" and values.str.contains(r"\s").any():
            kind = "text"  # a word cannot hold whitespace: number the values instead
        # the most frequent values (ties: by value), then in vocabulary order: numbers by value, else by frequency
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], _sort_key(kv[0])))
        kept = [v for v, _ in ranked[:vocabulary]]
        unknown = len(ranked) > vocabulary
        if kind == "item" and all(_is_int(v) for v in kept):
            kept.sort(key=int)
        items = tuple(kept)
    numeric = []
    fields = spec.numeric_fields if spec is not None else ()
    taken = {IDENTITY_PREFIX}
    firsts = [f[:1].lower() for f in fields]
    for name, first in zip(fields, firsts, strict=True):
        prefix = first if first and first not in taken and firsts.count(first) == 1 else name.replace(" ", "_") + "="
        taken.add(prefix)
        x = pd.to_numeric(history[name], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        x = x[np.isfinite(x)]
        distinct = np.unique(x)
        if len(distinct) <= few_values:
            numeric.append(NumericWords(name, prefix, values=tuple(float(v) for v in distinct)))
        else:
            edges = np.unique(np.quantile(x, np.linspace(0, 1, bins + 1)[1:-1]))
            numeric.append(NumericWords(name, prefix, edges=tuple(float(e) for e in edges)))
    if identity is None and not numeric:
        raise ConfigError(f"source {source!r} of data set {ds.name!r} has no item column, text field or numeric "
                          "field: its events have nothing to render")
    return EventLanguage(source, identity, kind, items, tuple(numeric), unknown)


def _is_int(v: str) -> bool:
    return v.isdigit() and (v == "0" or not v.startswith("0"))


def _sort_key(v: str) -> tuple[int, int, str]:
    return (0, int(v), v) if _is_int(v) else (1, 0, v)


def with_future(ds: UserDataset, source: str, future_events: int) -> UserDataset:
    """``ds`` itself when it holds out a future of ``source``, else ``ds`` with each user's last
    ``future_events`` events moved from the history to the future (``pluribus encoder train --future-last``)."""
    if future_events < 1:
        raise ConfigError(f"future_events must be >= 1, got {future_events}: the positive would be empty")
    if source in ds.future and not ds.future[source].empty:
        return ds
    from pluribus.encoder.pairs import hold_out_future

    return hold_out_future(ds, source, future_events, None)


def history_texts(ds: UserDataset, language: EventLanguage) -> dict[str, str]:
    """user id -> the whole history in the language (users with events only, in user id order)."""
    hist = ds.sources[language.source].sort_values(["user_id", "timestamp"], kind="stable")
    words = language.event_words(hist)
    users = hist["user_id"].astype(str).to_numpy()
    out: dict[str, str] = {}
    if not len(users):
        return out
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    ends = np.r_[starts[1:], len(users)]
    for s, e in zip(starts, ends, strict=True):
        out[str(users[s])] = " ".join(words[s:e].tolist())
    return out


def event_pairs(ds: UserDataset, language: EventLanguage, *, history_events: int = 48, future_events: int = 10,
                future_window: Literal["next", "last"] = "next") -> tuple[PairSet, list[str], list[str]]:
    """(pairs history -> future, one history input per user of ``ds`` in order, the user ids of those inputs).

    The anchor is the user's last ``history_events`` events, the positive the first (``next``) or last
    (``last``) ``future_events`` events of the held-out future, both in the language; users without history or
    future are left out of the pairs (their input is ``NO_HISTORY`` when they have no history).
    """
    from pluribus.encoder.model import UserInput

    if history_events < 1:
        raise ConfigError(f"history_events must be >= 1, got {history_events}")
    if future_events < 1:
        raise ConfigError(f"future_events must be >= 1, got {future_events}: the positive would be empty")
    source = language.source
    frame = ds.future.get(source)
    if frame is None or frame.empty:
        raise DataError(f"data set {ds.name!r} holds out no future events of source {source!r}: the future_events "
                        "positive would be empty (hold out the last events with with_future())", field=source)
    hist = ds.events_by_user(source)
    fut = {str(u): g.sort_values("timestamp", kind="stable") for u, g in frame.groupby("user_id", sort=False)}
    pairs = PairSet([], [], [])
    inputs: list[str] = []
    ids: list[str] = []
    for uid in (str(u) for u in ds.user_ids.tolist()):
        text = language.render(hist.get(uid), history_events)
        ids.append(uid)
        inputs.append(text or NO_HISTORY)
        positive = language.render(fut.get(uid), future_events, first=future_window == "next")
        if text and positive:
            pairs.user_ids.append(uid)
            pairs.anchors.append(UserInput(text))
            pairs.positives.append(UserInput(positive))
        else:
            pairs.skipped.append(uid)
    if not len(pairs):
        raise DataError(f"no user of data set {ds.name!r} has both history and held-out future events of source "
                        f"{source!r}: the future_events positive is empty for everyone", field=source)
    return pairs, inputs, ids


@dataclass(frozen=True)
class PretrainSettings:
    """The small decoder and its causal pretraining (every field is part of the cache key)."""

    steps: int = 300
    seed: int = 0
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256
    window: int = 128  # tokens per training sequence (sequences overlap by half)
    batch: int = 32
    lr: float = 3e-3
    min_tokens: int = 8

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1 or self.window < 2 or self.hidden % self.heads:
            raise ConfigError(f"pretrain settings: steps, batch >= 1, window >= 2 and hidden divisible by heads "
                              f"(got steps {self.steps}, batch {self.batch}, window {self.window}, hidden "
                              f"{self.hidden}, heads {self.heads})")


def pretrain_key(language: EventLanguage, texts: Sequence[str], settings: PretrainSettings) -> str:
    """The cache key of a pretrained decoder: its language, the history sequences and the settings."""
    h = hashlib.sha256()
    h.update(json.dumps({"version": PRETRAIN_VERSION, "language": language.to_json(), "settings": asdict(settings)},
                        sort_keys=True).encode())
    for t in texts:
        h.update(t.encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def pretrain(ds: UserDataset, language: EventLanguage, cache: str | Path, settings: PretrainSettings | None = None,
             *, progress: bool = True, log: list[float] | None = None, texts: Sequence[str] | None = None) -> Path:
    """The folder of a small Qwen3 decoder pretrained by next-token prediction on ``ds``'s history sequences in
    ``language`` (model, tokenizer, ``language.json``, ``pretrain.json`` with the losses and seconds).

    The folder is ``<cache>/<key>`` (``pretrain_key``): an existing finished folder is reused; a new one is
    written beside it and renamed into place only when complete, so a killed run never leaves a half-written
    decoder that a later one would use. ``log`` receives the pretraining losses (also when cached); ``texts``
    (``history_texts(ds, language)``'s values) saves rendering them again."""
    from pluribus.io import read_json, write_json

    settings = settings or PretrainSettings()
    texts = list(history_texts(ds, language).values()) if texts is None else list(texts)
    key = pretrain_key(language, texts, settings)
    root = Path(cache)
    folder = root / key
    if (folder / "pretrain.json").exists():
        if log is not None:
            log.extend(read_json(folder / "pretrain.json")["losses"])
        return folder
    import torch  # only when training: a warm call loads nothing heavy
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from pluribus.encoder.backbone import word_tokenizer
    from pluribus.progress import track

    start = time.time()
    tok = word_tokenizer(language.words())
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=settings.hidden, intermediate_size=settings.intermediate,
                      num_hidden_layers=settings.layers, num_attention_heads=settings.heads,
                      num_key_value_heads=settings.kv_heads, head_dim=settings.hidden // settings.heads,
                      max_position_embeddings=max(256, 2 * settings.window), tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(settings.seed)
    model = Qwen3ForCausalLM(cfg)
    window, half = settings.window, settings.window // 2
    seqs = []
    for text in texts:
        ids = tok(text)["input_ids"]
        seqs += [ids[s : s + window] for s in range(0, max(len(ids) - half, 1), half)]
    seqs = [s for s in seqs if len(s) >= settings.min_tokens]
    if len(seqs) < 2:
        raise DataError(f"too few events to pretrain on: {len(seqs)} history sequence(s) of >= {settings.min_tokens} "
                        f"words in source {language.source!r} of data set {ds.name!r}", field=language.source)
    batch_size = min(settings.batch, len(seqs))
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr, total_steps=settings.steps, pct_start=0.1)
    rng = np.random.default_rng(settings.seed)
    losses: list[float] = []
    model.train()
    steps = range(settings.steps)
    for _ in track(steps, total=len(steps), description="pretraining the event-language decoder") if progress \
            else steps:
        batch = [seqs[i] for i in rng.choice(len(seqs), size=batch_size, replace=False)]
        length = max(len(s) for s in batch)
        ids_t = torch.full((batch_size, length), tok.pad_token_id)
        mask = torch.zeros((batch_size, length), dtype=torch.long)
        for i, s in enumerate(batch):
            ids_t[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        labels = ids_t.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids_t, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    write_json(tmp / "language.json", language.to_json())
    write_json(tmp / "pretrain.json", {"losses": losses, "seconds": time.time() - start, "settings": asdict(settings),
                                       "sequences": len(seqs), "users": len(texts), "data": ds.name})
    if folder.exists() and not (folder / "pretrain.json").exists():
        shutil.rmtree(folder)  # not written by pretrain (its folders appear whole): never used, replaced
    try:
        os.rename(tmp, folder)
    except OSError:  # another process finished the same decoder first: keep its folder
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "pretrain.json").exists():
            raise
    if log is not None:
        log.extend(losses)
    return folder


@dataclass
class Vehicle:
    """What ``vehicle`` builds: the encoder config over the pretrained decoder, pairs split into training and
    held-out users, one history input per user of the data (``user_ids``), and how the decoder was obtained."""

    config: Any  # EncoderConfig
    train: PairSet
    held: PairSet
    inputs: list[Any]  # UserInput, one per user of the data set, in order
    user_ids: list[str]
    language: EventLanguage
    folder: Path
    pretrain_seconds: float  # this call's (0-ish when cached)
    cached: bool
    pretrain_losses: list[float]


def vehicle(ds: UserDataset, cache: str | Path, *, source: str | None = None, settings: PretrainSettings | None = None,
            history_events: int = 48, future_events: int = 10, heldout: float = 0.2,
            future_window: Literal["next", "last"] = "next", vocabulary: int = 20_000,
            progress: bool = True) -> Vehicle:
    """The event-language vehicle of ``ds``: fit the language, hold out a future if the data has none (the last
    ``future_events`` events), pretrain (or reuse) the decoder, build the pairs and split off ``heldout`` of the
    users (split seed 0). Fewer than ``MIN_USERS`` users with pairs raise DataError."""
    from pluribus.encoder.config import EncoderConfig, LoraSettings
    from pluribus.encoder.model import UserInput

    source = choose_source(ds, source)
    ds = with_future(ds, source, future_events)
    language = fit_language(ds, source, vocabulary=vocabulary)
    settings = settings or PretrainSettings()
    losses: list[float] = []
    texts = list(history_texts(ds, language).values())
    folder = Path(cache) / pretrain_key(language, texts, settings)
    cached = (folder / "pretrain.json").exists()
    pairs, inputs, ids = event_pairs(ds, language, history_events=history_events, future_events=future_events,
                                     future_window=future_window)
    if len(pairs) < MIN_USERS:
        raise DataError(f"only {len(pairs)} users of data set {ds.name!r} have both history and future events of "
                        f"source {source!r}; the event-language encoder needs >= {MIN_USERS}", field=source)
    start = time.time()
    folder = pretrain(ds, language, cache, settings, progress=progress, log=losses, texts=texts)
    seconds = time.time() - start
    train, held = split_pairs(pairs, heldout, seed=0)
    if held is None or len(held) < 2 or len(train) < 2:
        raise DataError(f"{len(pairs)} users with pairs split into {len(train)} training and "
                        f"{0 if held is None else len(held)} held-out users; both need >= 2", field=source)
    config = EncoderConfig(model=str(folder), projection=(settings.hidden,), lora=LoraSettings(r=0),
                           max_length=settings.window, batch_size=64)
    return Vehicle(config, train, held, [UserInput(t) for t in inputs], ids, language, folder, seconds, cached,
                   losses)

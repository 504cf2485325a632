"""Stage 1 of U2QT: render each source of each user as text and embed it; cache the result on disk.

Models:

- ``kind="sentence-transformers"``: any sentence-transformers model by local path or id; the default
  (``model=""``) is the packaged all-MiniLM-L6-v2 (384-d, mean pooling).
  ``EmbedConfig.backend`` runs its transformer in ONNX Runtime (``onnx``, ``onnx-int8``) or OpenVINO
  (``openvino``, ``openvino-bf16``) instead of torch (``pluribus.tokenizer.backends``); the backend is part of
  the cache key and of ``embedder_name``, so vectors of different backends never mix.
- ``kind="qwen3"``: Qwen3-Embedding (or any causal LM checkpoint) by local path or id, used as its model
  card prescribes: the query is ``"Instruct: {instruction}\\nQuery:{text}"``, the tokenizer pads on the
  left, the last token's final hidden state is the embedding (EOS appended when the tokenizer does not
  add it), then L2-normalised.

The tabular profile becomes its own source, ``profile`` (standardised numeric columns); the tokenizer's
per-source encoder is the small MLP branch that maps it into the shared latent space.

sentence-transformers and transformers are imported inside the functions that need them.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pluribus.config import config_to_dict
from pluribus.errors import ConfigError, DataError
from pluribus.io import load_tensors, save_tensors
from pluribus.tokenizer.config import EmbedConfig, default_model_path
from pluribus.tokenizer.inputs import SourceEmbeddings

if TYPE_CHECKING:
    from pluribus.data.schema import UserDataset

PROFILE_SOURCE = "profile"
#: Batches per progress step of the sentence-transformers embedder.
EMBED_CHUNK_BATCHES = 16
#: 2: max_length below the model's own limit is in effect (version 1 truncated at the model's limit regardless).
_CACHE_VERSION = 2
_SLICE_SETTINGS = ("numeric_in_text", "slice_days", "slice_tokens", "combine", "recency_half_life", "shard_size")


def render_source_texts(ds: UserDataset, source: str, config: EmbedConfig) -> tuple[list[str], np.ndarray]:
    """One text per user of ``ds`` for ``source`` (empty string and present=False for users without events)."""
    from pluribus.tokenizer.slices import render_event_strings

    texts = [""] * ds.n_users
    present = np.zeros(ds.n_users, dtype=bool)
    position = {u: i for i, u in enumerate(ds.user_ids)}
    frame = render_event_strings(ds, source, config, last=config.max_events)
    if len(frame) == 0:
        return texts, present
    for user, group in frame.groupby("user_id", sort=False):
        i = position.get(str(user))
        if i is None:
            continue
        events = list(group["_rendered"])
        if config.newest_first:
            events.reverse()
        header = config.header.format(source=source, n_events=len(events))
        texts[i] = header + config.separator.join(events)
        present[i] = True
    return texts, present


def embed_texts(texts: Sequence[str], config: EmbedConfig | None = None, *, progress: bool = False) -> np.ndarray:
    """Embed texts with the configured model: float32 ``[len(texts), dim]``.

    Args:
        texts: the texts, one row of the result each.
        config: the model and its settings (``kind``, ``model``, ``backend``, ``max_length``, ``batch_size``,
            ``normalize``, ``device``, ``instruction``); None: ``EmbedConfig()``, the packaged all-MiniLM-L6-v2.
        progress: show progress over the batches.

    Returns:
        The embeddings, float32 ``[len(texts), dim]`` (L2-normalised with ``config.normalize``).

    Raises:
        DataError: ``texts`` is empty.
        ConfigError: the model cannot be run as configured: sentence-transformers (or, for ``kind="qwen3"``,
            transformers) is not installed; the default model's package is missing; ``kind="qwen3"`` without
            ``model``; ``backend``'s package is missing or the backend is not in effect as asked (see
            ``pluribus.tokenizer.backends``); the model did not take ``max_length``.
    """
    cfg = config if config is not None else EmbedConfig()
    if len(texts) == 0:
        raise DataError("no texts to embed")
    if cfg.kind == "qwen3":
        return _embed_qwen3(list(texts), cfg, progress=progress)
    return _embed_sentence_transformers(list(texts), cfg, progress=progress)


def _embed_sentence_transformers(texts: list[str], cfg: EmbedConfig, *, progress: bool) -> np.ndarray:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ConfigError("sentence-transformers is not installed (pip install 'pluribus[embed]')") from None
    from pluribus.progress import quiet_library_bars, track

    quiet_library_bars()
    path = cfg.model or default_model_path()
    encode: Callable[[list[str]], Any]
    if cfg.backend is None:
        model = _sentence_transformer(SentenceTransformer, path, cfg.device)
        truncate_at(model, cfg.max_length)

        def encode(batch: list[str]) -> Any:
            return model.encode(batch, batch_size=cfg.batch_size, normalize_embeddings=cfg.normalize,
                                convert_to_numpy=True, show_progress_bar=False)
    else:
        runtime = load_backend(cfg)
        truncate_at(runtime.model, cfg.max_length)

        def encode(batch: list[str]) -> Any:
            return runtime.encode(batch, batch_size=cfg.batch_size, normalize=cfg.normalize)
    # our own progress (bar in a terminal, lines elsewhere, off with PLURIBUS_PROGRESS=0) over chunks of texts:
    # the library's tqdm bar would write carriage returns into a log
    chunk = cfg.batch_size * EMBED_CHUNK_BATCHES
    starts: Any = range(0, len(texts), chunk)
    if progress:
        starts = track(starts, description="embedding")
    vecs = [encode(texts[i : i + chunk]) for i in starts]
    return np.concatenate([np.asarray(v, dtype=np.float32) for v in vecs])


def truncate_at(model: Any, max_length: int) -> int:
    """Make ``max_length`` word pieces the truncation the loaded sentence-transformers model applies, capped at the
    model's own limit (its ``max_seq_length`` as loaded: the length it was trained for); the length now in effect.

    Set on every call: the loaded model is cached and shared by calls with other settings. Without this a
    ``max_length`` below the model's limit was silently ignored (the model truncated at its own 256)."""
    if not hasattr(model, "_pluribus_limit"):
        model._pluribus_limit = model.max_seq_length  # None: the model sets no limit of its own, nothing to cap
    limit = model._pluribus_limit
    want = int(max_length) if limit is None else min(int(max_length), int(limit))
    model.max_seq_length = want
    if model.max_seq_length != want:  # a model class that ignores the setting
        raise ConfigError(f"max_length={max_length}: the embedder did not take the truncation length")
    return want


@functools.lru_cache(maxsize=2)
def _sentence_transformer(cls: Any, path: str, device: str) -> Any:
    """One loaded model per path and device: per-shard stage 1 calls the embedder many times."""
    return cls(path, device=device)


def load_backend(config: EmbedConfig) -> Any:
    """The loaded runtime of ``config.backend`` (a ``backends.RuntimeEncoder``; exported on first use), checked to
    be in effect; ConfigError naming the backend and the extra to install when its package is missing."""
    from pluribus.tokenizer.backends import require_backend, runtime_encoder

    if config.backend is None:
        raise ConfigError("load_backend: the torch backend is sentence-transformers itself")
    require_backend(config.backend)
    return runtime_encoder(config.model or default_model_path(), config.backend, max(1, torch.get_num_threads()))


def embedder_name(config: EmbedConfig) -> str:
    """What identifies stage 1's vectors: model kind, model, backend and the settings that change the vectors (a
    vector folder records it, a tokenizer compares it). The torch backend adds nothing, as before backends existed."""
    model = config.model or "packaged:all-MiniLM-L6-v2"
    name = f"{config.kind}:{model}:max_length={config.max_length}:normalize={config.normalize}"
    name += f":instruction={config.instruction}" if config.kind == "qwen3" else ""
    return name + (f":backend={config.backend}" if config.backend is not None else "")


def qwen3_query(text: str, instruction: str) -> str:
    """The Qwen3-Embedding query format: ``Instruct: {task}\\nQuery:{text}``."""
    return f"Instruct: {instruction}\nQuery:{text}"


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The hidden state of each sequence's last real token (works for left or right padding)."""
    if bool((attention_mask[:, -1] == 1).all()):
        return hidden[:, -1]
    lengths = attention_mask.sum(dim=1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths]


def _embed_qwen3(texts: list[str], cfg: EmbedConfig, *, progress: bool) -> np.ndarray:
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        raise ConfigError("transformers is not installed (pip install 'pluribus[llm]')") from None
    if not cfg.model:
        raise ConfigError("kind='qwen3' needs EmbedConfig.model: a local path or id such as Qwen/Qwen3-Embedding-0.6B")
    from pluribus.progress import quiet_library_bars

    quiet_library_bars()
    tokenizer = AutoTokenizer.from_pretrained(cfg.model, padding_side="left")
    model = AutoModel.from_pretrained(cfg.model, dtype=torch.float32).to(cfg.device).eval()
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    queries = [qwen3_query(t, cfg.instruction) if cfg.instruction else t for t in texts]
    out = []
    batches: Any = range(0, len(queries), cfg.batch_size)
    if progress:
        from pluribus.progress import track

        batches = track(batches, description="embedding (qwen3)")
    for start in batches:
        encoded = tokenizer(queries[start : start + cfg.batch_size], truncation=True, max_length=cfg.max_length - 1)
        ids = [list(seq) for seq in encoded["input_ids"]]
        if eos is not None:
            ids = [seq if seq and seq[-1] == eos else seq + [eos] for seq in ids]
        width = max(len(seq) for seq in ids)
        input_ids = torch.tensor([[pad] * (width - len(seq)) + seq for seq in ids], device=cfg.device)
        mask = torch.tensor([[0] * (width - len(seq)) + [1] * len(seq) for seq in ids], device=cfg.device)
        with torch.no_grad():
            hidden = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        pooled = last_token_pool(hidden, mask)
        if cfg.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        out.append(pooled.float().cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def profile_embeddings(ds: UserDataset) -> tuple[np.ndarray, np.ndarray]:
    """The profile as a source: its numeric columns ``[U, n_cols]`` (unscaled) and a present mask.

    The tokenizer standardises each profile column itself (from its training users). A missing value
    is filled with the column mean over ``ds``; a user with no profile value at all is absent.
    """
    profile = ds.numeric_profile()
    if profile is None:
        raise DataError("the data set has no numeric profile", path=ds.name, field="profile")
    values = profile.reindex(ds.user_ids).to_numpy(dtype=np.float64, copy=True)
    values[~np.isfinite(values)] = np.nan
    present = ~np.isnan(values).all(axis=1)
    with np.errstate(all="ignore"):
        mean = np.nanmean(np.where(present[:, None], values, np.nan), axis=0) if present.any() else None
    fill = np.where(np.isfinite(mean), mean, 0.0) if mean is not None else np.zeros(values.shape[1])
    out = np.where(np.isnan(values), fill, values) * present[:, None]
    return out.astype(np.float32), present


def cache_key(texts: Sequence[str], present: np.ndarray, config: EmbedConfig) -> str:
    """Hash of the rendered texts and everything about the model that changes the vectors (the backend too:
    ``config_to_dict`` drops the torch backend's None, so torch keys are those of earlier releases)."""
    h = hashlib.sha256()
    settings = config_to_dict(config)
    # slicing settings do not reach the one-text path (numeric_in_text changes the texts, which are hashed)
    for unused in ("batch_size", "device", *_SLICE_SETTINGS):
        settings.pop(unused, None)
    settings["model"] = config.model or "packaged:all-MiniLM-L6-v2"
    h.update(json.dumps({"v": _CACHE_VERSION, "settings": settings}, sort_keys=True).encode())
    for text, p in zip(texts, present, strict=True):
        h.update(b"\x01" if p else b"\x00")
        h.update(text.encode("utf-8"))
        h.update(b"\x1e")
    return h.hexdigest()[:24]


def embed_dataset(
    ds: UserDataset,
    config: EmbedConfig | None = None,
    *,
    sources: Sequence[str] | None = None,
    include_profile: bool = True,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    reports: dict[str, dict[str, Any]] | None = None,
) -> SourceEmbeddings:
    """Stage 1 for a whole data set: one embedding per user and text source (+ the profile source).

    With ``cache_dir``, each source's embeddings are stored as ``<source>-<key>.safetensors`` where the
    key hashes the rendered texts and the model settings, so a re-run with the same data skips the model.
    With a sliced config (``slice_days`` / ``slice_tokens``) every slice is embedded (cached per shard) and
    the slices are combined per user; ``reports`` then receives each source's slicing and truncation report.

    Args:
        ds: the data set; its users, in order, are the rows of the result.
        config: stage 1 settings (texts, model, slicing); None: ``EmbedConfig()``.
        sources: the sources to embed; None: every source with a text field.
        include_profile: add the numeric profile as the ``profile`` source (when ``ds`` has one).
        cache_dir: a folder for the embedding cache; None: no cache, the model always runs.
        progress: show progress and, with slices, print each source's slicing report to stderr.
        reports: a dict that receives each source's slicing report (sliced configs only).

    Returns:
        One embedding per user and source, with a mask of the users each source has.

    Raises:
        ConfigError: a sliced config with ``combine="sequence"`` (several vectors per user: use
            ``pluribus.tokenizer.slices``); an ``event_template`` the events cannot fill; ``slice_tokens``
            smaller than one event; or the model cannot be run (see ``embed_texts``).
        DataError: an unknown source, a source in which no user has events (in the window), or a cache file that
            cannot be read or written.
    """
    cfg = config if config is not None else EmbedConfig()
    names = list(sources) if sources is not None else [s for s in ds.source_names if ds.source_specs[s].text_field]
    embeddings: dict[str, np.ndarray] = {}
    present: dict[str, np.ndarray] = {}
    if cfg.sliced and cfg.combine == "sequence":
        raise ConfigError("combine='sequence' gives several vectors per user and source: use "
                          "pluribus.tokenizer.slices (slice_source + embed_slices), or combine='mean' / 'recency'")
    tokens = None
    for name in names:
        if cfg.sliced:
            from pluribus.tokenizer import slices as slices_mod

            if tokens is None:
                tokens = slices_mod.embedder_tokens(cfg)
            cut = slices_mod.slice_source(ds, name, cfg, count_tokens=tokens[0], token_limit=tokens[1])
            sliced = slices_mod.embed_slices(
                cut, cfg, embed=lambda t: embed_texts(t, cfg), cache_dir=cache_dir, progress=progress
            )
            embeddings[name], present[name] = sliced.combine(cfg.combine, half_life=cfg.recency_half_life)
            if reports is not None:
                reports[name] = sliced.report
            if progress:
                _print_slice_report(sliced.report)
            continue
        texts, mask = render_source_texts(ds, name, cfg)
        if not mask.any():
            raise DataError(f"no user has events in source {name!r}", path=ds.name, field=name)
        key = cache_key(texts, mask, cfg)
        cached = None if cache_dir is None else Path(cache_dir) / f"{name}-{key}.safetensors"
        if cached is not None and cached.exists():
            vecs = load_tensors(cached)["embeddings"].numpy()
        else:
            chosen = [t for t, p in zip(texts, mask, strict=True) if p]
            vecs_present = embed_texts(chosen, cfg, progress=progress)
            vecs = np.zeros((ds.n_users, vecs_present.shape[1]), dtype=np.float32)
            vecs[mask] = vecs_present
            if cached is not None:
                save_tensors(cached, {"embeddings": torch.from_numpy(vecs)}, metadata={"source": name, "key": key})
        embeddings[name] = vecs
        present[name] = mask
    if include_profile and ds.numeric_profile() is not None:
        embeddings[PROFILE_SOURCE], present[PROFILE_SOURCE] = profile_embeddings(ds)
    return SourceEmbeddings(np.asarray(ds.user_ids, dtype=object), embeddings, present)


def _print_slice_report(report: dict[str, Any]) -> None:
    import sys

    line = (f"stage 1 {report['source']}: {report['events']} events in {report['slices']} slices of "
            f"{report['users']} users, {report['events_outside_window']} outside window_days")
    if "slices_truncated" in report:
        line += (f", {report['slices_truncated']} slice(s) over the embedder's {report['token_limit']} tokens "
                 f"({report['tokens_truncated']} tokens truncated)")
    print(line, file=sys.stderr, flush=True)

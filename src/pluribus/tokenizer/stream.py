"""Stage-1 vectors in Parquet folders: write them, train on them in batches, encode them in batches.

Vector folder format: ``*.parquet`` files with a ``user_id`` column and one column per source holding
``fixed_size_list<float32>[dim]``; a null entry means the user lacks that source (it gets ``EMPTY_CODE``).
Codes folder format (what ``encode_parquet`` writes): ``user_id`` and one ``fixed_size_list<uint16>[levels]``
column per source. A vector folder may name the stage-1 embedder that made it (schema metadata
``u2qt.embedder``, written by ``write_vectors(..., embedder=embed.embedder_name(config))``): a tokenizer then
refuses to encode, evaluate or warm-start refit on vectors of another embedder. A codes folder names the tokenizer that wrote it (``u2qt.tokenizer``, its
fingerprint), so decoding it with another tokenizer is refused. The collision suffix is not written: it needs every earlier user's tuple, which is the
unbounded state streaming avoids (compute it from the codes folder afterwards if needed).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import Tensor

from pluribus.data.stream import (
    ParquetFolderWriter,
    count_rows,
    folder_schema,
    iter_batches,
    parquet_files,
    prefetch,
)
from pluribus.errors import DataError
from pluribus.tokenizer.inputs import SourceEmbeddings, as_source_embeddings, user_id_hashes

if TYPE_CHECKING:
    import pyarrow as pa


class FittedTokenizer(Protocol):
    """What a streamed encode needs of a fitted ``UserTokenizer`` (named here so this module, which the
    estimator imports, does not import the estimator back)."""

    @property
    def source_names_(self) -> list[str]: ...  # noqa: D102 - the estimator's fitted attributes

    @property
    def in_dims_(self) -> list[int]: ...  # noqa: D102

    @property
    def level_sizes_(self) -> tuple[int, ...]: ...  # noqa: D102

    @property
    def fingerprint_(self) -> str: ...  # noqa: D102

    def embedder(self) -> str | None:
        """The stage-1 embedder the tokenizer expects, when known."""
        ...

    def encode_tensors(self, x: torch.Tensor, pres: torch.Tensor, *, batch_size: int = 8192) -> np.ndarray:
        """Codes of stacked inputs ``x [S, U, D]`` with mask ``pres [S, U]``."""
        ...

USER_ID = "user_id"
EMBEDDER_KEY = b"u2qt.embedder"
TOKENIZER_KEY = b"u2qt.tokenizer"


def folder_embedder(files: Sequence[Path]) -> str | None:
    """The embedder a vector folder's files declare (None if none does); files that disagree are refused."""
    import pyarrow.parquet as pq

    found: dict[str | None, Path] = {}
    for path in files:
        meta = pq.read_schema(path).metadata or {}
        value = meta.get(EMBEDDER_KEY)
        found.setdefault(None if value is None else value.decode("utf-8"), path)
    if len(found) > 1:
        (a, first), (b, other) = list(found.items())[:2]
        raise DataError(f"declares embedder {b!r} but {first.name} declares {a!r}", path=other,
                        field=EMBEDDER_KEY.decode(), expected="one stage-1 embedder for every file of a vector folder")
    return next(iter(found)) if found else None


def check_embedder(files: Sequence[Path], expected: str | None) -> None:
    """Refuse a vector folder that declares another embedder than ``expected`` (nothing to check if either is unknown)."""
    declared = folder_embedder(files)
    if declared is not None and expected is not None and declared != expected:
        raise DataError(f"vectors from embedder {declared!r}", path=files[0], field=EMBEDDER_KEY.decode(),
                        expected=f"vectors from {expected!r}, the embedder this tokenizer was fitted on")


def vectors_table(emb: SourceEmbeddings) -> pa.Table:
    """One Arrow table of ``emb`` in the vector folder format."""
    import pyarrow as pa

    columns: dict[str, Any] = {USER_ID: pa.array([str(u) for u in emb.user_ids], type=pa.string())}
    for name in emb.source_names:
        x = np.ascontiguousarray(emb.embeddings[name], dtype=np.float32)
        values = pa.array(x.reshape(-1), type=pa.float32())
        mask = pa.array(~emb.present[name])
        columns[name] = pa.FixedSizeListArray.from_arrays(values, x.shape[1], mask=mask)
    return pa.table(columns)


def write_vectors(folder: str | Path, parts: Iterator[SourceEmbeddings] | Sequence[SourceEmbeddings], *,
                  embedder: str | None = None) -> Path:
    """Write each ``SourceEmbeddings`` of ``parts`` as one file of a vector folder (all or nothing); ``embedder``
    (e.g. ``embed.embedder_name(config)``) is recorded in every file's schema metadata.

    Float vectors barely compress (Snappy saves ~3%) and rarely repeat, so the vector columns are written
    plain and uncompressed, without dictionaries: reading them back costs ~20% less CPU than Parquet's
    defaults (dictionary + Snappy), which ``encode_parquet`` and ``fit`` still read as well.
    """
    with ParquetFolderWriter(folder, use_dictionary=False) as writer:
        for part in parts:
            table = vectors_table(as_source_embeddings(part))
            if embedder is not None:
                table = table.replace_schema_metadata({EMBEDDER_KEY: embedder.encode("utf-8")})
            writer.write(table, compression={name: "snappy" if name == USER_ID else "none" for name in table.column_names})
    return Path(folder)


def vector_folder(folder: str | Path, sources: Sequence[str] | None = None) -> tuple[list[Path], dict[str, int]]:
    """The folder's files and each source's width, checked in every file's footer before any row is read."""
    import pyarrow as pa

    files = parquet_files(folder)
    schema = folder_schema(files)
    if USER_ID not in schema.names:
        raise DataError(f"no {USER_ID!r} column", path=files[0], field=USER_ID, expected="a string user id column")
    names = [n for n in schema.names if n != USER_ID] if sources is None else list(sources)
    dims: dict[str, int] = {}
    for name in names:
        if name not in schema.names:
            raise DataError(f"source {name!r} missing", path=files[0], field=name,
                            expected=f"columns {[USER_ID, *names]}")
        kind = schema.field(name).type
        if not pa.types.is_fixed_size_list(kind) or kind.value_type != pa.float32():
            raise DataError(f"column type {kind}", path=files[0], field=name, expected="fixed_size_list<float32>[dim]")
        dims[name] = int(kind.list_size)
    if not dims:
        raise DataError("no source columns", path=files[0], expected=f"{USER_ID} plus one vector column per source")
    return files, dims


def _block(table: pa.Table | pa.RecordBatch, sources: Sequence[str], dims: Sequence[int], where: Path) -> tuple[Tensor, Tensor]:
    """``x [S, B, max dim]`` and ``present [S, B]`` of one batch; NaN in a present row is refused."""
    n, width = table.num_rows, max(dims)
    x = torch.empty(len(sources), n, width)  # every slot is written below: no zero-fill pass over the batch
    present = torch.empty(len(sources), n, dtype=torch.bool)
    for s, (name, dim) in enumerate(zip(sources, dims, strict=True)):
        if dim < width:
            x[s, :, dim:] = 0.0  # the padding of a narrower source
        column = table.column(name)
        if hasattr(column, "combine_chunks"):
            column = column.combine_chunks()
        # .values keeps the slots of null entries (flatten() would drop them), so rows stay aligned
        values = column.values.slice(column.offset * dim, n * dim)
        if values.null_count:  # null floats (e.g. inside a missing source's slot): zeros, checked below
            values = values.fill_null(0.0)
        # a zero-copy view of the float32 buffer: Array.to_numpy imports pandas (~1 s on first use)
        arr = np.frombuffer(values.buffers()[1], dtype=np.float32, count=n * dim, offset=values.offset * 4)
        arr = arr.reshape(n, dim)
        if column.null_count == 0:  # the common case skips Arrow's boolean -> NumPy conversion
            mask = np.ones(n, dtype=bool)
        else:
            mask = ~np.asarray(column.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        if not mask.all():
            arr = np.where(mask[:, None], arr, np.float32(0.0))
        # one vectorised pass in the common case; the rows are located only when something is wrong
        bad = np.zeros(0, dtype=np.int64) if np.isfinite(arr.sum()) else np.flatnonzero(mask & ~np.isfinite(arr).all(axis=1))
        if len(bad):
            raise DataError(f"NaN or inf in a present vector ({len(bad)} row(s) in this batch)", path=where,
                            field=name, expected="finite values (a null entry marks a missing source)")
        x[s, :, :dim].numpy()[...] = arr  # one copy out of Arrow's read-only buffer, straight into the batch
        present[s] = torch.from_numpy(mask)
    return x, present


class ParquetTrainData:
    """Training users streamed from a vector folder (implements ``train.TrainData``).

    A fixed random sample of ``sample_rows`` users (drawn once, in one pass) serves the input scaling,
    k-means initialisation and dead-code respawn; an epoch visits the row groups of every file in a random
    order and shuffles the users inside each row group, so memory holds one row group plus the sample.
    """

    def __init__(self, folder: str | Path, sources: Sequence[str], dims: Sequence[int], *, sample_rows: int = 16384,
                 seed: int = 0) -> None:
        self.files, found = vector_folder(folder, sources)
        for name, dim in zip(sources, dims, strict=True):
            if found[name] != dim:
                raise DataError(f"vectors of width {found[name]}", path=self.files[0], field=name,
                                expected=f"width {dim} as fitted")
        self.sources, self.dims = list(sources), list(dims)
        self._n = count_rows(self.files)
        if self._n < 2:
            raise DataError(f"{self._n} user(s)", path=folder, expected="at least 2 users to fit a tokenizer")
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(self._n, size=min(sample_rows, self._n), replace=False))
        xs, ps, hashes, offset = [], [], [], 0
        for path, batch in iter_batches(self.files, 65536, columns=[USER_ID, *self.sources]):
            hashes.append(user_id_hashes(batch.column(USER_ID).to_pylist()))
            local = keep[(keep >= offset) & (keep < offset + batch.num_rows)] - offset
            if len(local):
                x, p = _block(batch.take(local), self.sources, self.dims, path)
                xs.append(x)
                ps.append(p)
            offset += batch.num_rows
        self._sample_x, self._sample_present = torch.cat(xs, 1), torch.cat(ps, 1)
        self.user_hashes = np.unique(np.concatenate(hashes))  # the training users, for held-out metrics
        for s, name in enumerate(self.sources):
            if not self._sample_present[s].any():
                raise DataError(f"no sampled user has source {name!r}", path=folder, field=name,
                                expected="at least one present row")

    @property
    def n_users(self) -> int:
        """Number of training users (rows of the folder)."""
        return self._n

    def standardizer_rows(self) -> tuple[Tensor, Tensor]:
        """The fixed sample."""
        return self._sample_x, self._sample_present

    def sample(self, cap: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """At most ``cap`` users of the fixed sample."""
        n = self._sample_x.shape[1]
        idx = torch.arange(n) if n <= cap else torch.randperm(n, generator=generator)[:cap]
        return self._sample_x[:, idx], self._sample_present[:, idx]

    def epoch_batches(self, batch: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        """Row groups in random order, users shuffled inside each; batches never span two row groups."""
        import pyarrow.parquet as pq

        groups = [(f, g) for f in self.files for g in range(pq.ParquetFile(f).num_row_groups)]
        for i in torch.randperm(len(groups), generator=generator).tolist():
            path, g = groups[i]
            table = pq.ParquetFile(path).read_row_group(g, columns=[USER_ID, *self.sources])
            x, p = _block(table, self.sources, self.dims, path)
            order = torch.randperm(x.shape[1], generator=generator)
            for start in range(0, x.shape[1], batch):
                idx = order[start : start + batch]
                yield x[:, idx], p[:, idx]


#: Users per streamed encode batch. Measured (docs/results/tokenizer.md "Scale", 1M users, 3 runs each): peak RSS
#: ~420 MiB at 8k rows and ~510 MiB at 32k, flat from 100k to 1M users in both (within 0-2.5%), but 8k rows
#: took ~0.1-0.3 CPU s more per million users (4x the batches), so 32k is the default.
ENCODE_BATCH_ROWS = 32768
#: Users per part file of the codes folder (each batch is one row group of the part), so a million users make
#: about 16 files, not one per batch.
PART_ROWS = 65536


def encode_parquet(tok: FittedTokenizer, folder: str | Path, out: str | Path, *,
                   batch_rows: int = ENCODE_BATCH_ROWS, part_rows: int = PART_ROWS) -> dict[str, Any]:
    """Encode a vector folder into a codes folder batch by batch; returns users, parts and seconds.

    Every input file's schema is checked before anything is written, and the output folder appears only
    when every batch is encoded: a bad file or row mid-way leaves no codes behind. A background thread reads
    and decodes the next batch (Parquet releases the GIL) while this one is converted, encoded and written;
    each batch's codes are one row group, appended to the current part file until it holds at least
    ``part_rows`` users (the last part may hold fewer).
    """
    import time

    if part_rows < 1:
        raise DataError(f"part_rows={part_rows}", expected="at least 1")
    files, found = vector_folder(folder, tok.source_names_)
    for name, dim in zip(tok.source_names_, tok.in_dims_, strict=True):
        if found[name] != dim:
            raise DataError(f"vectors of width {found[name]}", path=files[0], field=name, expected=f"width {dim} as fitted")
    check_embedder(files, tok.embedder())
    sources, dims = tok.source_names_, tok.in_dims_
    n_levels = len(tok.level_sizes_)

    def inputs(item: tuple[Path, pa.RecordBatch]) -> tuple[pa.Array, Tensor, Tensor]:
        path, batch = item
        return (batch.column(USER_ID), *_block(batch, sources, dims, path))

    t0 = time.perf_counter()
    _grow_heap_threshold()
    batches = iter_batches(files, batch_rows, columns=[USER_ID, *sources], use_threads=False)
    with ParquetFolderWriter(out, use_dictionary=False) as writer:  # unique ids and small codes: no dictionaries
        # conversion here, not in the reader: a converted batch waiting in the reader thread would add one more
        # batch of tensors to the peak (measured: 1M-user peaks 4-7% above 100k's instead of 0-5%)
        for ids, x, present in map(inputs, prefetch(batches)):
            codes = tok.encode_tensors(x, present)  # [B, S, L] uint16
            del x, present
            table = _codes_table(ids, codes, sources, n_levels)
            table = table.replace_schema_metadata({TOKENIZER_KEY: tok.fingerprint_.encode()})
            writer.append(table, part_rows=part_rows)
        writer.end_part()
        users, parts = writer.rows, writer.parts
    return {"users": users, "parts": parts, "seconds": time.perf_counter() - t0, "out": str(out)}


def _codes_table(ids: pa.Array, codes: np.ndarray, sources: Sequence[str], n_levels: int) -> pa.Table:
    """One codes-folder table; ``ids`` pass through untouched (never turned into Python objects)."""
    import pyarrow as pa

    columns: dict[str, Any] = {USER_ID: ids}
    for s, name in enumerate(sources):
        flat = np.ascontiguousarray(codes[:, s, :]).reshape(-1)
        # Array.from_buffers wraps the NumPy buffer as is; pa.array(ndarray) would import pandas (~0.4 s)
        values = pa.Array.from_buffers(pa.uint16(), len(flat), [None, pa.py_buffer(flat)])
        columns[name] = pa.FixedSizeListArray.from_arrays(values, n_levels)
    return pa.table(columns)


def _grow_heap_threshold() -> None:
    """Allocate and free one 30 MiB block so glibc's malloc keeps per-batch buffers on its heap.

    glibc serves blocks above its mmap threshold (128 KiB at start) with a fresh mmap, and hands heap memory
    above its trim threshold back to the kernel on free; freeing an mmap'd block raises both thresholds to
    that block's size (mallopt(3), "M_MMAP_THRESHOLD", up to 32 MiB). A process that has not yet freed a
    large block therefore returns and page-faults back in every batch's tensors (~140k page faults for 1M
    users, ~0.4 s); the in-memory encode never sees this, as loading the users frees large blocks first.
    Other allocators ignore this; the 30 MiB is freed at once.
    """
    block = torch.empty(30 << 20, dtype=torch.uint8)
    del block


def codes_fingerprint(folder: str | Path) -> str | None:
    """The fingerprint of the tokenizer that wrote a codes folder (None if its files do not name one)."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(parquet_files(folder)[0]).metadata or {}
    value = meta.get(TOKENIZER_KEY)
    return None if value is None else value.decode("utf-8")


def read_codes(folder: str | Path, source_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """User ids and uint16 codes ``[users, sources, levels]`` of a whole codes folder (small folders, tests)."""
    import pyarrow as pa

    files = parquet_files(folder)
    schema = folder_schema(files)
    for name in source_names:
        if name not in schema.names or not pa.types.is_fixed_size_list(schema.field(name).type):
            raise DataError(f"no codes column for source {name!r}", path=files[0], field=name,
                            expected=f"columns {[USER_ID, *source_names]} (fixed_size_list<uint16>[levels])")
    ids, blocks = [], []
    for _, batch in iter_batches(files, 65536):
        ids.extend(batch.column(USER_ID).to_pylist())
        per_source = []
        for name in source_names:
            col = batch.column(name)
            per_source.append(np.asarray(col.flatten().to_numpy(), dtype=np.uint16).reshape(batch.num_rows, -1))
        blocks.append(np.stack(per_source, axis=1))
    return np.asarray(ids, dtype=object), np.concatenate(blocks) if blocks else np.zeros((0, 0, 0), np.uint16)



def read_sample(folder: str | Path, sources: Sequence[str], max_rows: int) -> SourceEmbeddings:
    """The first ``max_rows`` users of a vector folder as ``SourceEmbeddings`` (metrics on a bounded sample)."""
    files, dims = vector_folder(folder, sources)
    ids, xs, ps, rows = [], [], [], 0
    for path, batch in iter_batches(files, min(max_rows, 65536), columns=[USER_ID, *sources]):
        batch = batch.slice(0, max_rows - rows)
        x, p = _block(batch, sources, [dims[s] for s in sources], path)
        ids.append(np.asarray(batch.column(USER_ID).to_pylist(), dtype=object))
        xs.append(x)
        ps.append(p)
        rows += batch.num_rows
        if rows >= max_rows:
            break
    x, p = torch.cat(xs, 1), torch.cat(ps, 1)
    return SourceEmbeddings(
        np.concatenate(ids), {s: x[k, :, : dims[s]].numpy() for k, s in enumerate(sources)},
        {s: p[k].numpy() for k, s in enumerate(sources)},
    )

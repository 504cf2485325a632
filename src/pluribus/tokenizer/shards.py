"""Stage 1 over a folder of Parquet shards of slice texts, spread over worker processes or a Ray cluster.

Input: a folder of ``*.parquet`` shards, one row per slice, every shard with the same schema:

- ``user_id`` (string): whose slice it is; all of a user's slices must be in one shard (checked up front),
  since each shard becomes one file of per-user vectors;
- ``text`` (string): the slice's text, as ``pluribus.tokenizer.slices`` renders it (``write_slice_shards``
  writes such shards from a data set); a blank text is no slice (a user with only blank ones gets nulls), and a
  shard whose texts are all blank is refused;
- ``source`` (string, optional): the slice's source; without the column every row belongs to one source
  (``ShardColumns.default_source``);
- ``slice`` (integer, optional): the slice's position in the user's history, 0 = oldest (the recency weights
  use it); without the column the row order within the shard is the order.

Output: a vector folder, as ``pluribus.tokenizer.stream`` reads it (``tokenize fit --vectors``): one file per
input shard, of the same name, with ``user_id`` and one ``fixed_size_list<float32>[dim]`` column per source
(the ``mean`` or ``recency``-weighted mean of the user's slice vectors, ``EmbedConfig.combine``; null where the
user has no slice of that source); every file names the embedder in its schema metadata.

Each worker embeds whole shards: it reads the shard's bytes once, checks them against the fingerprint and
schema the run started from (a shard changed mid-run is refused before its output is written), embeds every
slice, combines them per user and writes the output file atomically (temporary file + rename). Only the
driver writes the manifest (``stage1.json``: embedder, input schema, columns, sources, combine, and per
shard its SHA-256 and counts), after each shard, atomically; a rerun skips the shards it lists with an
unchanged input and an output present, so a run killed at any moment resumes where it stopped. A lock
(``flock`` on ``OUT/.stage1.lock``, released by the kernel even after ``kill -9``) keeps two runs out of
one folder.

Engines: ``local`` (this process, one worker), ``pool`` (spawned worker processes, each loading the embedder
once) and ``ray`` (Ray Data ``map_batches`` over the shards with a fixed pool of actors, each loading the
embedder once; on a cluster the folders must be on storage every node sees).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pluribus.errors import ConfigError, DataError, PluribusError
from pluribus.tokenizer.config import EmbedConfig

if TYPE_CHECKING:
    import pyarrow as pa

    from pluribus.data.schema import UserDataset

ENGINES = ("local", "pool", "ray")
MANIFEST = "stage1.json"
LOCK = ".stage1.lock"
FORMAT = "pluribus.stage1-shards/1"


@dataclass(frozen=True)
class ShardColumns:
    """Column names of the input shards (``source`` and ``slice`` may be absent from the files)."""

    user: str = "user_id"
    text: str = "text"
    source: str = "source"
    slice: str = "slice"
    default_source: str = "text"  # the source of every row when the shards have no source column


@dataclass(frozen=True)
class ShardTask:
    """One shard for a worker: where to read and write, and what the run expects to find there."""

    input: str
    output: str
    sha256: str
    sources: tuple[str, ...]
    embedder: str
    columns: ShardColumns = field(default_factory=ShardColumns)

    def to_json(self) -> str:
        """The task as JSON (how it travels through Ray Data)."""
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> ShardTask:
        """The task back from ``to_json``."""
        raw = json.loads(text)
        return ShardTask(raw["input"], raw["output"], raw["sha256"], tuple(raw["sources"]), raw["embedder"],
                         ShardColumns(**raw["columns"]))


# ---- one shard (what every engine's worker runs) ---------------------------------------------------
def embed_shard(task: ShardTask, config: EmbedConfig) -> dict[str, Any]:
    """Embed one shard into its output file; returns its manifest entry (``{"error": ...}`` on bad input)."""
    try:
        return _embed_shard(task, config)
    except PluribusError as err:  # travels back as data: engines wrap exceptions each in their own way
        return {"input": Path(task.input).name, "error": str(err), "config_error": isinstance(err, ConfigError)}


def _embed_shard(task: ShardTask, config: EmbedConfig) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pluribus.io import atomic_path
    from pluribus.tokenizer.embed import embed_texts
    from pluribus.tokenizer.inputs import SourceEmbeddings
    from pluribus.tokenizer.slices import SliceEmbeddings
    from pluribus.tokenizer.stream import EMBEDDER_KEY, USER_ID, vectors_table

    start = time.perf_counter()
    path = Path(task.input)
    data = _read_bytes(path)
    if hashlib.sha256(data).hexdigest() != task.sha256:
        raise DataError("changed since the run started (its SHA-256 differs)", path=path,
                        expected="shards that stay unchanged while they are embedded; rerun to pick up the new content")
    # the same bytes as the scan checked: their schema and sources are the run's
    table = pq.read_table(pa.BufferReader(data))
    cols = task.columns
    users = _strings(table, cols.user, path)
    texts = _strings(table, cols.text, path)
    sources = _strings(table, cols.source, path) if cols.source in table.column_names else [cols.default_source] * len(users)
    order = dict.fromkeys(users)  # users in order of first appearance
    row_of = {u: i for i, u in enumerate(order)}
    user_row = np.asarray([row_of[u] for u in users], dtype=np.int64)
    position = _positions(table, cols, users, sources, path)
    source_array = np.asarray(sources, dtype=object)
    # an empty text is no slice, as a user without events is on a data set: "" would still embed to a vector and
    # pull the user's mean towards it; a user whose slices are all empty gets nulls
    kept = np.flatnonzero(np.asarray([bool(t.strip()) for t in texts], dtype=bool))
    if texts and not len(kept):
        raise DataError("every slice text is empty", path=path, field=cols.text,
                        expected="some text to embed (leave the rows of users without text out)")
    texts = [texts[i] for i in kept]
    user_row, position, source_array = user_row[kept], position[kept], source_array[kept]
    entry: dict[str, Any] = {"input": path.name, "sha256": task.sha256, "slices": len(texts), "users": len(order)}
    if not texts:
        return {**entry, "output": None, "seconds": time.perf_counter() - start}
    vectors = np.asarray(embed_texts(texts, config), dtype=np.float32)
    embeddings, present = {}, {}
    for name in task.sources:
        mask = source_array == name
        if mask.any():
            sliced = SliceEmbeddings(name, vectors[mask], user_row[mask], position[mask], len(order))
            embeddings[name], present[name] = sliced.combine(config.combine, half_life=config.recency_half_life)
        else:
            embeddings[name] = np.zeros((len(order), vectors.shape[1]), dtype=np.float32)
            present[name] = np.zeros(len(order), dtype=bool)
    out_table = vectors_table(SourceEmbeddings(np.asarray(list(order), dtype=object), embeddings, present))
    out_table = out_table.replace_schema_metadata({EMBEDDER_KEY: task.embedder.encode("utf-8")})
    with atomic_path(task.output) as tmp:  # write_vectors' layout: plain float columns, no dictionaries
        pq.write_table(out_table, tmp, use_dictionary=False,
                       compression={n: "snappy" if n == USER_ID else "none" for n in out_table.column_names})
    return {**entry, "output": Path(task.output).name, "dim": int(vectors.shape[1]),
            "seconds": time.perf_counter() - start}


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot be read ({err.strerror})", path=path) from None


def _strings(table: pa.Table, name: str, path: Path) -> list[str]:
    """A string column as Python strings; a null is refused, naming its row."""
    column = table.column(name)
    if column.null_count:
        row = int(np.flatnonzero(np.asarray(column.is_null().to_numpy(zero_copy_only=False)))[0])
        raise DataError("null value", path=path, row=row, field=name, expected="a string in every row")
    return [str(v) for v in column.to_pylist()]


def _positions(table: pa.Table, cols: ShardColumns, users: list[str], sources: list[str], path: Path) -> np.ndarray:
    """Each slice's position in its user's history of its source (the slice column, or the row order)."""
    if cols.slice in table.column_names:
        column = table.column(cols.slice)
        if column.null_count:
            row = int(np.flatnonzero(np.asarray(column.is_null().to_numpy(zero_copy_only=False)))[0])
            raise DataError("null value", path=path, row=row, field=cols.slice, expected="an integer in every row")
        return np.asarray(column.to_pylist(), dtype=np.int64)
    seen: dict[tuple[str, str], int] = {}
    out = np.empty(len(users), dtype=np.int64)
    for i, key in enumerate(zip(users, sources, strict=True)):
        out[i] = seen.get(key, 0)
        seen[key] = out[i] + 1
    return out


def _schema_fields(schema: pa.Schema) -> tuple[tuple[str, str], ...]:
    return tuple((f.name, str(f.type)) for f in schema)


# ---- the driver --------------------------------------------------------------------------------------
@dataclass
class _Scan:
    files: list[Path]
    sha256: dict[str, str]
    schema: tuple[tuple[str, str], ...]
    sources: list[str]
    slices: dict[str, int]


def embed_shards(
    folder: str | Path,
    out: str | Path,
    config: EmbedConfig | None = None,
    *,
    workers: int = 1,
    engine: str | None = None,
    threads: int = 1,
    columns: ShardColumns | None = None,
    address: str | None = None,
    gpus_per_worker: float = 0.0,
    force: bool = False,
    progress: bool = True,
    note: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Embed every shard of ``folder`` into the vector folder ``out``, resuming a run that stopped (see the module).

    ``engine``: ``local`` (default with one worker), ``pool`` (default with more) or ``ray`` (``address``: an
    existing Ray cluster, e.g. ``auto``; else a local Ray with ``workers * threads`` CPUs). ``threads``: torch
    threads per worker. ``force`` starts ``out`` over. Returns shards, shards_done_before, slices and users
    embedded now, seconds and slices_per_s (of this run's embedding, start-up included).
    """
    cfg = config if config is not None else EmbedConfig()
    cols = columns if columns is not None else ShardColumns()
    say = note if note is not None else _stderr
    engine = engine or ("local" if workers == 1 else "pool")
    _check_options(cfg, engine, workers, threads, gpus_per_worker)
    _check_installed(cfg, engine)
    from pluribus.data.stream import parquet_files
    from pluribus.tokenizer.embed import embedder_name

    files = parquet_files(folder)
    target = Path(out)
    if target.exists() and not target.is_dir():
        raise DataError("a file is in the way", path=target, expected="a folder for the vectors")
    if target.resolve() == Path(folder).resolve():
        raise DataError("is the input folder", path=target, expected="another folder for the vectors")
    name = embedder_name(cfg)
    scan = _scan(files, cols)
    identity = {"format": FORMAT, "embedder": name, "input_schema": [list(f) for f in scan.schema],
                "columns": asdict(cols), "sources": scan.sources, "combine": cfg.combine,
                "recency_half_life": cfg.recency_half_life if cfg.combine == "recency" else None}
    from pluribus.io import ensure_folder, remove_empty_folders

    created = ensure_folder(target)
    try:
        with _locked(target):
            if force:
                _clear(target)
            manifest = _read_manifest(target)
            _check_output(target, manifest, identity, list(scan.sha256))
            _remove_stale_temporaries(target)
            done_before = manifest.get("shards", {}) if manifest else {}
            done = {f.name: done_before[f.name] for f in scan.files
                    if f.name in done_before and done_before[f.name].get("sha256") == scan.sha256[f.name]
                    and (done_before[f.name].get("output") is None or (target / done_before[f.name]["output"]).is_file())}
            gone = sorted(set(done_before) - set(scan.sha256))
            if gone:
                raise DataError(f"holds the outputs of shard(s) no longer in {folder}: {', '.join(gone[:5])}", path=target,
                                expected="the same input shards (new ones may be added), or --force to start over")
            redo = sorted(set(done_before) - set(done))
            pending = [f for f in scan.files if f.name not in done]
            if not pending:
                say(f"all {len(done)} shards are embedded already: nothing to do")
            elif done:
                say(f"resuming: {len(done)} of {len(scan.files)} shards done, {len(pending)} to embed")
            if redo:
                say(f"re-embedding {len(redo)} shard(s) changed or missing since the last run: {', '.join(redo[:5])}"
                    + (" ..." if len(redo) > 5 else ""))
            previous, manifest = manifest, {**identity, "shards": dict(done)}
            if manifest != previous:  # a finished run run again leaves the folder as it was
                _write_manifest(target, manifest)
            tasks = [ShardTask(str(f), str(target / f.name), scan.sha256[f.name], tuple(scan.sources), name, cols)
                     for f in pending]
            start = time.perf_counter()
            slices = users = 0
            running = _run(tasks, cfg, engine=engine, workers=workers, threads=threads, address=address,
                           gpus_per_worker=gpus_per_worker)
            results: Iterator[dict[str, Any]] = running
            if progress and tasks:
                from pluribus.progress import track

                results = track(running, total=len(tasks), description=f"embedding shards ({engine}, {workers} worker(s))")
            try:
                for result in results:
                    if "error" in result:
                        raise (ConfigError if result.get("config_error") else DataError)(result["error"])
                    manifest["shards"][result["input"]] = result
                    _write_manifest(target, manifest)
                    slices += result["slices"]
                    users += result["users"]
            finally:  # stop the workers now, not when the generator is collected
                close = getattr(running, "close", None)
                if close is not None:
                    close()
            seconds = time.perf_counter() - start
    except BaseException:  # a run that created OUT and finished no shard leaves no folder behind
        if created and not any(p.suffix == ".parquet" for p in target.iterdir()):
            for leftover in (MANIFEST, LOCK):
                (target / leftover).unlink(missing_ok=True)
            remove_empty_folders(created)
        raise
    return {"out": str(target), "shards": len(scan.files), "shards_done_before": len(done), "shards_embedded": len(tasks),
            "slices": slices, "users": users, "seconds": seconds,
            "slices_per_s": slices / seconds if slices and seconds > 0 else None, "embedder": name, "engine": engine,
            "workers": workers}


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _check_options(cfg: EmbedConfig, engine: str, workers: int, threads: int, gpus: float) -> None:
    if engine not in ENGINES:
        raise ConfigError(f"engine {engine!r}: expected one of {list(ENGINES)}")
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= 4096:
        raise ConfigError(f"workers={workers!r}: need a whole number within [1, 4096]")
    if engine == "local" and workers != 1:
        raise ConfigError(f"engine 'local' runs one worker in this process, not {workers}: use --engine pool or ray")
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= 1024:
        raise ConfigError(f"threads={threads!r}: need a whole number of torch threads per worker within [1, 1024]")
    if gpus < 0 or (gpus and engine != "ray"):
        raise ConfigError(f"gpus_per_worker={gpus}: a non-negative share of a GPU, with engine 'ray' only")
    if cfg.combine not in ("mean", "recency"):
        raise ConfigError(f"combine={cfg.combine!r}: a vector folder holds one vector per user and source; "
                          "use 'mean' or 'recency'")


def _check_installed(cfg: EmbedConfig, engine: str) -> None:
    """Refuse a missing embedder backend or engine before any shard is read or any worker started."""
    import importlib.util

    needed = [("transformers", "pip install 'pluribus[llm]'")] if cfg.kind == "qwen3" else [
        ("sentence_transformers", "pip install 'pluribus[embed]'")]
    if engine == "ray":
        needed.append(("ray", "pip install 'ray[data]==2.55.1' (the Ray that Flower pins)"))
    if cfg.backend is not None:  # ONNX Runtime / OpenVINO: their packages, named with what to install
        from pluribus.tokenizer.backends import require_backend

        require_backend(cfg.backend)
    for module, hint in needed:
        try:
            found = importlib.util.find_spec(module) is not None
            if found and module == "ray":
                import ray.data  # noqa: F401 - Ray Data needs more than ray itself (pandas, fsspec)
        except (ImportError, ValueError):
            found = False
        if not found:
            what = "engine 'ray'" if module == "ray" else f"embedder kind {cfg.kind!r}"
            raise ConfigError(f"{what} needs {module.replace('_', '-')}, which is not installed ({hint})")


def _scan(files: list[Path], cols: ShardColumns) -> _Scan:
    """Every shard's footer schema, fingerprint, users and sources, checked before anything is written."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pluribus.data.stream import folder_schema

    file_schema = folder_schema(files)  # one schema for all, from the footers; else the first file and field that differ
    _check_columns(files[0], file_schema, cols)
    sha: dict[str, str] = {}
    counts: dict[str, int] = {}
    sources: dict[str, None] = {}
    owner: dict[str, str] = {}
    for path in files:
        data = _read_bytes(path)
        sha[path.name] = hashlib.sha256(data).hexdigest()
        wanted = [cols.user] + ([cols.source] if cols.source in file_schema.names else [])
        table = pq.read_table(pa.BufferReader(data), columns=wanted)
        counts[path.name] = table.num_rows
        user_column = table.column(cols.user)
        if user_column.null_count:
            _strings(table, cols.user, path)  # raises, naming the row
        for user in pc.unique(user_column).to_pylist():
            other = owner.setdefault(user, path.name)
            if other != path.name:
                raise DataError(f"user {user!r} has slices in {other} too", path=path, field=cols.user,
                                expected="all of a user's slices in one shard (each shard becomes one file of user vectors)")
        if cols.source in file_schema.names:
            source_column = table.column(cols.source)
            if source_column.null_count:
                _strings(table, cols.source, path)
            sources.update(dict.fromkeys(sorted(pc.unique(source_column).to_pylist())))
        else:
            sources[cols.default_source] = None
    return _Scan(files, sha, _schema_fields(file_schema), list(sources), counts)


def _check_columns(path: Path, schema: pa.Schema, cols: ShardColumns) -> None:
    import pyarrow as pa

    def kind(name: str) -> Any:
        return schema.field(name).type

    for name, what in ((cols.user, "user id"), (cols.text, "slice text")):
        if name not in schema.names:
            raise DataError(f"no {name!r} column (columns: {', '.join(schema.names)})", path=path, field=name,
                            expected=f"a string column with the {what}; name another with --{'user' if what == 'user id' else 'text'}-column")
    for name in (cols.user, cols.text, *([cols.source] if cols.source in schema.names else [])):
        if not (pa.types.is_string(kind(name)) or pa.types.is_large_string(kind(name))):
            raise DataError(f"column type {kind(name)}", path=path, field=name, expected="string")
    if cols.slice in schema.names and not pa.types.is_integer(kind(cols.slice)):
        raise DataError(f"column type {kind(cols.slice)}", path=path, field=cols.slice,
                        expected="an integer position (0 = the user's oldest slice)")


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold ``folder/.stage1.lock`` (flock: released by the kernel if the process dies)."""
    import fcntl

    with open(folder / LOCK, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError("another run is writing this folder", path=folder,
                            expected="one `tokenize embed` per output folder at a time") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    from pluribus.io import read_json

    path = folder / MANIFEST
    if not path.exists():
        return None
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError("not a stage-1 shard manifest", path=path, field="format", expected=FORMAT)
    return manifest


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    from pluribus.io import write_json

    write_json(folder / MANIFEST, manifest)


_IDENTITY_WHAT = {
    "embedder": "vectors of embedder", "input_schema": "shards with the schema", "columns": "the columns",
    "sources": "the sources", "combine": "slices combined by", "recency_half_life": "a recency half-life of",
}


def _check_output(folder: Path, manifest: dict[str, Any] | None, identity: dict[str, Any], inputs: Sequence[str]) -> None:
    """Refuse to add to a folder that holds vectors of another embedder or of other inputs."""
    from pluribus.tokenizer.stream import folder_embedder

    hint = "a new output folder, or --force to start this one over"
    files = sorted(p for p in folder.iterdir() if p.suffix == ".parquet" and p.is_file())
    if manifest is None:
        if not files:
            return
        declared = folder_embedder(files)
        if declared is not None and declared != identity["embedder"]:
            raise DataError(f"holds vectors of embedder {declared!r}; this run embeds with {identity['embedder']!r}: "
                            "refusing to mix them", path=folder, field="u2qt.embedder", expected=hint)
        raise DataError(f"holds {len(files)} Parquet file(s) but no {MANIFEST} (not written by `tokenize embed`)",
                        path=folder, expected=hint)
    for key, what in _IDENTITY_WHAT.items():
        if manifest.get(key) != identity[key]:
            if key == "input_schema":  # a shard with another schema than the finished ones
                raise DataError(f"the input shards' schema {_fields_text(identity[key])} differs from the shards "
                                f"already embedded here ({_fields_text(manifest.get(key))})", path=folder / MANIFEST,
                                field=key, expected=f"shards with the same columns, or {hint}")
            raise DataError(f"holds {what} {manifest.get(key)!r}; this run has {identity[key]!r}: refusing to mix them",
                            path=folder / MANIFEST, field=key, expected=hint)
    # an output named after an input shard but not in the manifest was being written when a run stopped (or by a
    # worker that outlived a killed driver): complete (atomic) but unrecorded, so it is embedded again
    known = set(inputs) | {e.get("output") for e in manifest.get("shards", {}).values()}
    strays = [p.name for p in files if p.name not in known]
    if strays:
        raise DataError(f"holds Parquet file(s) no shard of this run wrote: {', '.join(strays[:5])}", path=folder,
                        expected=f"only the outputs listed in {MANIFEST}, or {hint}")


def _fields_text(fields: Any) -> str:
    return "[" + ", ".join(f"{n}: {t}" for n, t in (fields or [])) + "]"


def _clear(folder: Path) -> None:
    """--force: remove the manifest and the Parquet files (nothing else) of the output folder."""
    for path in folder.iterdir():
        if path.is_file() and (path.suffix == ".parquet" or path.name == MANIFEST):
            path.unlink()


def _remove_stale_temporaries(folder: Path) -> None:
    """Temporary files of a run killed mid-write (``io.atomic_path``'s ``.<name>.<random>.tmp``); the lock is held."""
    for path in folder.iterdir():
        if path.is_file() and path.name.startswith(".") and path.suffix == ".tmp":
            path.unlink()


# ---- engines -------------------------------------------------------------------------------------------
def _run(tasks: list[ShardTask], cfg: EmbedConfig, *, engine: str, workers: int, threads: int, address: str | None,
         gpus_per_worker: float) -> Iterator[dict[str, Any]]:
    if not tasks:
        return iter(())
    if engine == "local":
        return _run_local(tasks, cfg, threads)
    if engine == "pool":
        return _run_pool(tasks, cfg, min(workers, len(tasks)), threads)
    return _run_ray(tasks, cfg, min(workers, len(tasks)), threads, address, gpus_per_worker)


def _run_local(tasks: list[ShardTask], cfg: EmbedConfig, threads: int) -> Iterator[dict[str, Any]]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for task in tasks:
            yield embed_shard(task, cfg)
    finally:
        torch.set_num_threads(before)


def _init_worker(threads: int) -> None:
    """Start of a worker process: its torch threads, and no library progress bars (they would interleave)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _die_with_parent()
    from pluribus.config import set_threads
    from pluribus.progress import quiet_library_bars

    set_threads(threads)
    quiet_library_bars()


def _die_with_parent() -> None:
    """Linux: have the kernel kill this worker when the process that started it dies (e.g. ``kill -9`` of the
    driver), rather than finish its shard unrecorded; elsewhere a worker ends when its shard is done."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _pool_task(item: tuple[ShardTask, EmbedConfig]) -> dict[str, Any]:
    return embed_shard(*item)


def _run_pool(tasks: list[ShardTask], cfg: EmbedConfig, workers: int, threads: int) -> Iterator[dict[str, Any]]:
    """Spawned processes (not forked: a fork of a process with torch's threads running can deadlock); each keeps
    its embedder loaded across shards (``embed``'s per-process model cache). Leaving early terminates them."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(threads,)) as pool:  # leaving it terminates them
        yield from pool.imap_unordered(_pool_task, [(t, cfg) for t in tasks])
        # done: let the workers exit on their own, so their libraries' finalizers run (a terminated worker leaves
        # e.g. joblib's semaphore registered, and the resource tracker warns about it at exit)
        pool.close()
        pool.join()


class RayShardEmbedder:
    """A Ray Data actor: loads the embedder once (on its first shard) and embeds the shards it is given."""

    def __init__(self, config: EmbedConfig, threads: int) -> None:
        _init_worker(threads)
        self.config = config

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``batch["task"]``: tasks as JSON; returns ``batch["result"]``: manifest entries as JSON."""
        results = [json.dumps(embed_shard(ShardTask.from_json(str(t)), self.config)) for t in batch["task"]]
        return {"result": np.asarray(results, dtype=object)}


def _run_ray(tasks: list[ShardTask], cfg: EmbedConfig, workers: int, threads: int, address: str | None,
             gpus_per_worker: float) -> Iterator[dict[str, Any]]:
    import logging

    import ray
    import ray.data

    from pluribus.progress import library_bars_allowed

    # Ray 2.55 warns that it will stop hiding the GPUs from actors that reserve none; opt in to that now
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    started = not ray.is_initialized()
    if started:
        options: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                                   "log_to_driver": library_bars_allowed()}
        if address:
            ray.init(address=address, **options)
        else:  # a local Ray of exactly the CPUs asked for, so other work on the machine keeps its cores
            ray.init(num_cpus=workers * threads, num_gpus=int(np.ceil(workers * gpus_per_worker)), **options)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = library_bars_allowed()
        context.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # its tuning tips are not the user's concern
        # one block per shard, one shard per call: the actor pool takes shards as actors free up
        items = ray.data.from_items([{"task": t.to_json()} for t in tasks], override_num_blocks=len(tasks))
        resources: dict[str, Any] = {"num_cpus": threads, **({"num_gpus": gpus_per_worker} if gpus_per_worker else {})}
        # one shard in flight per actor: shards are long, and a queue behind a busy actor would idle a free one;
        # no actor restarts: a worker that dies fails the run, and the rerun resumes from the manifest
        pool = ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1)
        mapped = items.map_batches(RayShardEmbedder, fn_constructor_kwargs={"config": cfg, "threads": threads},
                                   batch_size=1, compute=pool, max_restarts=0, **resources)
        for row in mapped.iter_rows():
            yield json.loads(row["result"])
    finally:
        if started:
            ray.shutdown()


# ---- writing slice shards from a data set ----------------------------------------------------------------
def write_slice_shards(
    ds: UserDataset,
    out: str | Path,
    config: EmbedConfig | None = None,
    *,
    sources: Sequence[str] | None = None,
    shards: int = 8,
    columns: ShardColumns | None = None,
) -> dict[str, Any]:
    """Cut every text source of ``ds`` into slices (``pluribus.tokenizer.slices``, as ``embed_dataset`` does) and
    write them as ``shards`` Parquet files of ``user_id, source, slice, text``, each user's slices in one file
    (users in contiguous blocks of the data set's order); all or nothing. Returns slices, users (those with a slice),
    users_without_slices (not in the shards) and the report."""
    import pyarrow as pa

    from pluribus.data.stream import ParquetFolderWriter
    from pluribus.tokenizer import slices as slices_mod

    cfg = config if config is not None else EmbedConfig(slice_tokens=254, numeric_in_text=True)
    cols = columns if columns is not None else ShardColumns()
    if not cfg.sliced:
        raise ConfigError("slice shards need a sliced stage 1: set slice_days and/or slice_tokens")
    if not 1 <= shards <= 1_000_000:
        raise ConfigError(f"shards={shards}: need a whole number within [1, 1000000]")
    names = list(sources) if sources is not None else [s for s in ds.source_names if ds.source_specs[s].text_field]
    tokens = slices_mod.embedder_tokens(cfg) if cfg.slice_tokens is not None else (None, None)
    parts, reports = [], {}
    for name in names:
        cut = slices_mod.slice_source(ds, name, cfg, count_tokens=tokens[0], token_limit=tokens[1])
        parts.append((name, cut))
        reports[name] = cut.report
    block = int(np.ceil(ds.n_users / shards))
    user_ids = np.asarray([str(u) for u in ds.user_ids], dtype=object)
    n_slices = n_users = 0
    with ParquetFolderWriter(out) as writer:
        for k in range(shards):
            rows = [(name, np.flatnonzero((cut.user >= k * block) & (cut.user < (k + 1) * block)), cut)
                    for name, cut in parts]
            table = pa.table({
                cols.user: pa.array([user_ids[cut.user[i]] for name, idx, cut in rows for i in idx], type=pa.string()),
                cols.source: pa.array([name for name, idx, _ in rows for _ in idx], type=pa.string()),
                cols.slice: pa.array([int(cut.index[i]) for _, idx, cut in rows for i in idx], type=pa.int32()),
                cols.text: pa.array([cut.texts[i] for _, idx, cut in rows for i in idx], type=pa.string()),
            })
            writer.write(table)
            n_slices += table.num_rows
            n_users += len(set(table.column(cols.user).to_pylist()))
    # a user without events has no slice, so no row here and no vector after `tokenize embed`
    return {"out": str(out), "shards": shards, "slices": n_slices, "users": n_users,
            "users_without_slices": int(ds.n_users) - n_users, "reports": reports}

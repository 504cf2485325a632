"""Batched reading and writing of Parquet folders larger than memory.

A folder of ``*.parquet`` files (read in name order) is one table: every file must carry the same schema,
checked from the file footers before a row is read, so a schema change between files is reported up front
(naming the file and the field) rather than after half the output is written. Rows are read in batches of
``batch_rows`` through ``pyarrow.parquet.ParquetFile.iter_batches``, so memory is bounded by the batch and
one row group, not by the folder. ``ParquetFolderWriter`` writes part files into a temporary folder that
replaces the destination only when every part is written.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from pluribus.errors import DataError

if TYPE_CHECKING:
    import pyarrow as pa

T = TypeVar("T")


def parquet_files(folder: str | Path) -> list[Path]:
    """The folder's ``*.parquet`` files in name order; a DataError if it is not a folder or holds none."""
    path = Path(folder)
    if not path.is_dir():
        raise DataError("not a folder", path=path, expected="a folder of .parquet files")
    files = sorted(p for p in path.iterdir() if p.suffix == ".parquet" and p.is_file())
    if not files:
        raise DataError("no .parquet files", path=path, expected="at least one <name>.parquet file")
    return files


def folder_schema(files: Sequence[Path]) -> pa.Schema:
    """The schema shared by every file; a DataError naming the first file and field that differ."""
    import pyarrow.parquet as pq

    schema = None
    for path in files:
        try:
            this = pq.read_schema(path)
        except Exception as err:  # pyarrow raises several types for a damaged footer
            raise DataError(f"not a readable Parquet file ({err})", path=path) from None
        if schema is None:
            schema = this
            continue
        if not this.equals(schema):
            raise DataError(f"schema differs from {files[0].name}'s", path=path, field=_first_difference(schema, this),
                            expected=f"the same columns and types in every file of {path.parent}")
    assert schema is not None
    return schema


def _first_difference(a: pa.Schema, b: pa.Schema) -> str:
    for name in dict.fromkeys([*a.names, *b.names]):
        if name not in a.names or name not in b.names or a.field(name).type != b.field(name).type:
            return name
    return "(column order)"


def count_rows(files: Sequence[Path]) -> int:
    """Total rows, from the footers only."""
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(p).metadata.num_rows for p in files)


def iter_batches(
    files: Sequence[Path], batch_rows: int, *, columns: Sequence[str] | None = None, memory_map: bool = True,
    use_threads: bool = True,
) -> Iterator[tuple[Path, pa.RecordBatch]]:
    """``(file, batch)`` pairs of at most ``batch_rows`` rows, file after file.

    ``memory_map``: pages are read from the page cache, not copied into Arrow's pool. ``use_threads``: Arrow
    decodes the columns of a batch on its own thread pool; a caller that already reads in a background thread
    (``prefetch``) can turn it off, so the decoding does not compete with its own work for the cores.
    """
    import pyarrow.parquet as pq

    if batch_rows < 1:
        raise DataError(f"batch_rows={batch_rows}", expected="at least 1")
    for path in files:
        reader = pq.ParquetFile(path, memory_map=memory_map)
        for batch in reader.iter_batches(batch_size=batch_rows, columns=None if columns is None else list(columns),
                                         use_threads=use_threads):
            yield path, batch


def prefetch(items: Iterator[T], depth: int = 1) -> Iterator[T]:
    """Yield ``items`` while a background thread already reads the next ``depth`` of them.

    Parquet decoding releases the GIL, so reading batch k+1 overlaps the caller's work on batch k; memory
    holds at most ``depth + 1`` batches. An exception in the reader is raised here, at the item it failed on.
    """
    from concurrent.futures import ThreadPoolExecutor

    sentinel = object()

    def pull() -> Any:
        return next(items, sentinel)

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = [pool.submit(pull) for _ in range(max(1, depth))]
        while True:
            item = pending.pop(0).result()
            if item is sentinel:
                return
            pending.append(pool.submit(pull))
            yield item


def iter_row_groups(path: Path, *, columns: Sequence[str] | None = None) -> Iterator[pa.Table]:
    """The row groups of one file as tables (the unit a shuffled streaming reader can pick in any order)."""
    import pyarrow.parquet as pq

    reader = pq.ParquetFile(path)
    for i in range(reader.num_row_groups):
        yield reader.read_row_group(i, columns=None if columns is None else list(columns))


class ParquetFolderWriter:
    """Write ``part-00000.parquet``, ``part-00001.parquet``... into ``folder``, all or nothing.

    Parts go to a hidden temporary folder beside ``folder``; ``close()`` (or leaving the ``with`` block
    without an exception) moves it into place, replacing an earlier output; an exception removes it, so a
    failure never leaves a half-written output behind.
    """

    def __init__(self, folder: str | Path, *, row_group_rows: int = 65536, **write_options: Any) -> None:
        self.folder = Path(folder)
        # small row groups keep a batched reader's memory at a batch or two (a reader holds one row group)
        self.row_group_rows = row_group_rows
        self.write_options = write_options  # passed on to pyarrow.parquet.write_table (e.g. use_dictionary)
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.folder.parent / f".{self.folder.name}.tmp-{os.getpid()}"
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp.mkdir()
        self.parts = 0
        self.rows = 0
        self._open: Any = None  # the pyarrow ParquetWriter of a part that ``append`` is filling
        self._open_rows = 0

    def write(self, table: pa.Table | pa.RecordBatch, **write_options: Any) -> None:
        """Write one part file (``write_options`` add to or override the writer's)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.end_part()
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        pq.write_table(table, self._tmp / f"part-{self.parts:05d}.parquet", row_group_size=self.row_group_rows,
                       **{**self.write_options, **write_options})
        self.parts += 1
        self.rows += table.num_rows

    def append(self, table: pa.Table | pa.RecordBatch, *, part_rows: int) -> None:
        """Add ``table`` as the next row group(s) of the current part, which ends once it holds ``part_rows`` rows.

        Nothing of ``table`` is kept afterwards, so a stream of small batches makes few part files without
        holding batches in memory.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        if self._open is None:
            self._open = pq.ParquetWriter(self._tmp / f"part-{self.parts:05d}.parquet", table.schema, **self.write_options)
            self.parts += 1
        self._open.write_table(table, row_group_size=self.row_group_rows)
        self._open_rows += table.num_rows
        self.rows += table.num_rows
        if self._open_rows >= part_rows:
            self.end_part()

    def end_part(self) -> None:
        """Finish the part ``append`` is filling, if any (``close`` does this too)."""
        if self._open is not None:
            writer, self._open, self._open_rows = self._open, None, 0
            writer.close()

    def close(self) -> Path:
        """Move the finished parts into place."""
        self.end_part()
        if self.folder.exists():
            old = self.folder.parent / f".{self.folder.name}.old-{os.getpid()}"
            self.folder.rename(old)
            self._tmp.rename(self.folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self._tmp.rename(self.folder)
        return self.folder

    def abort(self) -> None:
        """Remove the parts written so far."""
        try:
            self.end_part()
        except Exception:  # noqa: BLE001 - the parts are being thrown away; the original error matters
            pass
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> ParquetFolderWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

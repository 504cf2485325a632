"""Parquet folders read in batches: schema checks up front, batch sizes, all-or-nothing writes."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pluribus.data.stream import ParquetFolderWriter, count_rows, folder_schema, iter_batches, parquet_files
from pluribus.errors import DataError


def _table(n: int, start: int = 0, kind: pa.DataType = pa.int64()) -> pa.Table:
    return pa.table({"user_id": [str(i) for i in range(start, start + n)], "x": pa.array(range(n), type=kind)})


def test_batches_cover_every_row_in_order(tmp_path):
    pq.write_table(_table(7), tmp_path / "a.parquet")
    pq.write_table(_table(5, 7), tmp_path / "b.parquet")
    files = parquet_files(tmp_path)
    assert [f.name for f in files] == ["a.parquet", "b.parquet"] and count_rows(files) == 12
    sizes, ids = [], []
    for _, batch in iter_batches(files, 3):
        sizes.append(batch.num_rows)
        ids.extend(batch.column("user_id").to_pylist())
    assert max(sizes) <= 3 and ids == [str(i) for i in range(12)]


def test_a_schema_change_between_files_is_named_before_reading(tmp_path):
    pq.write_table(_table(4), tmp_path / "a.parquet")
    pq.write_table(_table(4, kind=pa.float32()), tmp_path / "b.parquet")
    with pytest.raises(DataError, match=r"b\.parquet.*field 'x'.*schema differs"):
        folder_schema(parquet_files(tmp_path))


def test_not_a_folder_or_no_files(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        parquet_files(tmp_path / "missing")
    with pytest.raises(DataError, match="no .parquet files"):
        parquet_files(tmp_path)


def test_writer_is_all_or_nothing(tmp_path):
    out = tmp_path / "out"
    with ParquetFolderWriter(out) as w:
        w.write(_table(3))
        w.write(_table(2))
    assert sorted(p.name for p in out.iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    with pytest.raises(RuntimeError), ParquetFolderWriter(out) as w:
        w.write(_table(9))
        raise RuntimeError("fails mid-way")
    assert count_rows(parquet_files(out)) == 5  # the earlier output is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind


def test_append_fills_parts_row_group_by_row_group_and_aborts_cleanly(tmp_path):
    out = tmp_path / "out"
    with ParquetFolderWriter(out, row_group_rows=4) as w:
        for n in (3, 3, 2, 5, 1):  # parts of >= 6 rows: 3+3 | 2+5 | 1
            w.append(_table(n, start=w.rows), part_rows=6)
        w.write(_table(2, start=w.rows))  # a whole part of its own ends the open one first
    files = parquet_files(out)
    metas = [pq.ParquetFile(p).metadata for p in files]
    assert [m.num_rows for m in metas] == [6, 7, 1, 2] and [m.num_row_groups for m in metas] == [2, 3, 1, 1]
    assert [b.column("user_id").to_pylist() for _, b in iter_batches(files, 100)] == [
        [str(i) for i in range(a, b)] for a, b in ((0, 6), (6, 13), (13, 14), (14, 16))]
    with pytest.raises(RuntimeError), ParquetFolderWriter(out) as w:
        w.append(_table(4), part_rows=10)  # a part still open when the failure comes
        raise RuntimeError("fails mid-part")
    assert count_rows(parquet_files(out)) == 16 and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_prefetch_keeps_order_and_raises_where_the_reader_failed():
    from pluribus.data.stream import prefetch

    def reader():
        yield from range(5)
        raise ValueError("bad file")

    got = []
    with pytest.raises(ValueError, match="bad file"):
        for item in prefetch(reader(), depth=2):
            got.append(item)
    assert got == [0, 1, 2, 3, 4]

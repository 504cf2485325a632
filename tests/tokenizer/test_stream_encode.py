"""The streamed encode's batch conversion and output format (speed-related changes must not change results)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pluribus.errors import DataError
from pluribus.tokenizer import EMPTY_CODE, SourceEmbeddings
from pluribus.tokenizer.stream import _block, read_codes, vectors_table, write_vectors


def _emb(n: int = 300) -> SourceEmbeddings:
    rng = np.random.default_rng(3)
    views = {"wide": rng.normal(size=(n, 12)).astype(np.float32), "narrow": rng.normal(size=(n, 5)).astype(np.float32)}
    present = {"wide": np.ones(n, bool), "narrow": np.arange(n) % 3 != 0}
    return SourceEmbeddings(np.array([f"u{i}" for i in range(n)], dtype=object), views, present)


def test_block_zeroes_padding_and_missing_rows_even_on_reused_memory():
    emb = _emb()
    table = vectors_table(emb)
    for _ in range(3):  # freed NaN blocks of the batch's size, which the allocator may hand back to _block
        poison = torch.full((2, emb.n_users, 12), float("nan"))
        del poison
        x, present = _block(table, ["wide", "narrow"], [12, 5], Path("t.parquet"))
        assert x.shape == (2, emb.n_users, 12) and bool(torch.isfinite(x).all())
        assert np.array_equal(x[0].numpy(), emb.embeddings["wide"])
        assert np.array_equal(x[1, :, :5].numpy()[emb.present["narrow"]], emb.embeddings["narrow"][emb.present["narrow"]])
        assert not x[1, :, 5:].any() and not x[1][~torch.from_numpy(emb.present["narrow"])].any()
        assert np.array_equal(present.numpy(), np.stack([emb.present["wide"], emb.present["narrow"]]))


def test_streamed_codes_folder_format_and_codes(fitted, views, tmp_path):
    tok, present = fitted
    n = len(views["src0"])
    full = SourceEmbeddings(np.array([f"id-{i}" for i in range(n)], dtype=object), dict(views),
                            {k: present.get(k, np.ones(n, bool)) for k in views})
    write_vectors(tmp_path / "vec", [full.subset(np.arange(0, 100)), full.subset(np.arange(100, n))])
    # batches of 64, 36 | 64, 64, 12 (files of 100 and 140 users), gathered into parts of >= 100 users
    info = tok.encode_parquet(tmp_path / "vec", tmp_path / "codes", batch_rows=64, part_rows=100)
    parts = sorted((tmp_path / "codes").glob("*.parquet"))
    assert info["users"] == n and info["parts"] == 3 and [pq.ParquetFile(p).metadata.num_rows for p in parts] == [100, 128, 12]
    schema = pq.read_schema(parts[0])
    assert schema.field("user_id").type == pa.string()
    for name in tok.source_names_:
        assert schema.field(name).type == pa.list_(pa.uint16(), len(tok.level_sizes_))
    ids, codes = read_codes(tmp_path / "codes", tok.source_names_)
    assert list(ids) == list(full.user_ids)
    assert np.array_equal(codes, tok.encode(full)) and (codes[~present["src2"], 2] == EMPTY_CODE).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes", "vec"]  # no temporary folder left behind


def test_part_rows_is_checked(fitted, views, tmp_path):
    tok, _ = fitted
    two = SourceEmbeddings(np.array(["a", "b"], dtype=object), {k: v[:2] for k, v in views.items()},
                           {k: np.ones(2, bool) for k in views})
    write_vectors(tmp_path / "vec", [two])
    with pytest.raises(DataError, match="part_rows=0"):
        tok.encode_parquet(tmp_path / "vec", tmp_path / "codes", part_rows=0)
    assert not (tmp_path / "codes").exists()


def test_vector_folders_written_plain_or_with_parquet_defaults_encode_alike(fitted, views, tmp_path):
    tok, present = fitted
    n = len(views["src0"])
    full = SourceEmbeddings(np.array([f"u{i}" for i in range(n)], dtype=object), dict(views),
                            {k: present.get(k, np.ones(n, bool)) for k in views})
    parts = [full.subset(np.arange(0, 120)), full.subset(np.arange(120, n))]
    write_vectors(tmp_path / "plain", parts)
    meta = pq.ParquetFile(tmp_path / "plain" / "part-00000.parquet").metadata.row_group(0)
    kinds = {meta.column(i).path_in_schema.split(".")[0]: (meta.column(i).compression, meta.column(i).encodings)
             for i in range(meta.num_columns)}
    assert kinds["user_id"][0] == "SNAPPY" and all(kinds[s] == ("UNCOMPRESSED", ("RLE", "PLAIN")) for s in views)
    (tmp_path / "defaults").mkdir()
    for i, part in enumerate(parts):  # what another tool would write: dictionary pages and Snappy everywhere
        pq.write_table(vectors_table(part), tmp_path / "defaults" / f"{i}.parquet")
    for name in ("plain", "defaults"):
        tok.encode_parquet(tmp_path / name, tmp_path / f"codes-{name}", batch_rows=70)
        ids, codes = read_codes(tmp_path / f"codes-{name}", tok.source_names_)
        assert list(ids) == list(full.user_ids) and np.array_equal(codes, tok.encode(full)), name

"""Parquet streaming (fit and encode in batches), exact resume from a training checkpoint, CLI resume."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pluribus.errors import DataError
from pluribus.tokenizer import EMPTY_CODE, SourceEmbeddings, UserTokenizer
from pluribus.tokenizer.stream import read_codes, write_vectors
from pluribus.tokenizer.train import TrainState


def _parts(views, present, n_parts=3):
    n = len(next(iter(views.values())))
    ids = np.array([f"u{i}" for i in range(n)], dtype=object)
    full = SourceEmbeddings(ids, dict(views), {k: present.get(k, np.ones(n, bool)) for k in views})
    return [full.subset(idx) for idx in np.array_split(np.arange(n), n_parts)], full


def test_encode_parquet_matches_in_memory_encode(fitted, views, tmp_path):
    tok, present = fitted
    parts, full = _parts(views, present)
    write_vectors(tmp_path / "vec", parts)
    info = tok.encode_parquet(tmp_path / "vec", tmp_path / "codes", batch_rows=50, part_rows=1)
    ids, codes = read_codes(tmp_path / "codes", tok.source_names_)
    assert info["users"] == 240 and info["parts"] == 6  # 3 files of 80 rows, batches of <= 50, one part each
    assert list(ids) == list(full.user_ids)
    assert np.array_equal(codes, tok.encode(full)) and (codes[~present["src2"], 2] == EMPTY_CODE).all()
    with pytest.raises(DataError, match="batch_rows=0"):  # refused, not silently replaced by the default
        tok.encode_parquet(tmp_path / "vec", tmp_path / "codes0", batch_rows=0)
    assert not (tmp_path / "codes0").exists()


def test_bad_input_mid_stream_leaves_no_codes(fitted, views, tmp_path):
    tok, present = fitted
    parts, _ = _parts(views, present)
    bad = parts[2].embeddings["src0"].copy()
    bad[5, 0] = np.nan
    parts[2] = SourceEmbeddings(parts[2].user_ids, dict(parts[2].embeddings, src0=bad), parts[2].present)
    folder = tmp_path / "vec"
    with pytest.raises(DataError):  # write_vectors itself refuses the NaN: write the files by hand
        write_vectors(folder, parts)
    from pluribus.tokenizer.stream import vectors_table

    folder.mkdir()
    for i, part in enumerate(parts[:2]):
        pq.write_table(vectors_table(part), folder / f"{i}.parquet")
    table = vectors_table(parts[1])
    arr = np.asarray(table.column("src0").combine_chunks().values).reshape(80, -1).copy()
    arr[5, 0] = np.nan
    table = table.set_column(1, "src0", pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), arr.shape[1]))
    pq.write_table(table, folder / "2.parquet")
    with pytest.raises(DataError, match=r"2\.parquet.*field 'src0'.*NaN"):
        tok.encode_parquet(folder, tmp_path / "codes", batch_rows=50)
    assert not (tmp_path / "codes").exists() and [p.name for p in tmp_path.iterdir()] == ["vec"]
    pq.write_table(pa.table({"user_id": ["x"], "src0": [1.0]}), folder / "2.parquet")  # a schema change
    with pytest.raises(DataError, match=r"2\.parquet.*schema differs"):
        tok.encode_parquet(folder, tmp_path / "codes")
    assert not (tmp_path / "codes").exists()


def test_fit_on_a_parquet_folder_streams_and_checks_widths(views, small_config, tmp_path):
    parts, full = _parts(views, {})
    write_vectors(tmp_path / "vec", parts)
    cfg = dataclasses.replace(small_config, epochs=5)
    tok = UserTokenizer(cfg, progress=False).fit(tmp_path / "vec")
    assert tok.source_names_ == ["src0", "src1", "src2"] and tok.in_dims_ == [24, 24, 16]
    assert len(tok.history_) == 5 and tok.history_[-1]["recon"] < tok.history_[0]["recon"]
    other = {k: v[:, :8] for k, v in views.items()}
    write_vectors(tmp_path / "narrow", [other])
    with pytest.raises(DataError, match="width 8.*width 24 as fitted"):
        tok.encode_parquet(tmp_path / "narrow", tmp_path / "codes")


def test_resume_from_a_checkpoint_gives_the_uninterrupted_model(views, small_config):
    cfg = dataclasses.replace(small_config, epochs=6, respawn_every=7)  # respawn counters span epochs
    states: list[TrainState] = []
    whole = UserTokenizer(cfg, progress=False).fit(views, checkpoint=states.append)
    assert [s.epoch for s in states] == list(range(1, 7))
    resumed = UserTokenizer(cfg, progress=False).fit(views, resume=states[2])
    assert resumed.history_ == whole.history_
    assert np.array_equal(resumed.encode(views), whole.encode(views))
    for k, v in whole.model_.state_dict().items():
        assert np.array_equal(v.numpy(), resumed.model_.state_dict()[k].numpy()), k


def _cli(*args):
    return [sys.executable, "-m", "pluribus.cli", "tokenize", "fit", *map(str, args)]


@pytest.mark.slow
def test_cli_fit_resumes_after_kill_9_and_skips_a_finished_run(views, tmp_path):
    parts, _ = _parts(views, {})
    write_vectors(tmp_path / "vec", parts)
    cfg = tmp_path / "run.toml"
    cfg.write_text("[tokenizer]\nn_shared = 1\nn_specific = 1\nshared_size = 8\nspecific_size = 4\nlatent_dim = 4\n"
                   "hidden_dims = [16]\nepochs = 150\nbatch_size = 120\n")
    env = dict(os.environ, PLURIBUS_PROGRESS="0", OMP_NUM_THREADS="1")
    run = tmp_path / "run"
    cmd = _cli(tmp_path / "vec", "--vectors", "--config", cfg, "--out", run, "--checkpoint-every", 1)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    meta = run / "checkpoints" / "tokenizer-train.json"
    deadline = time.time() + 60
    while time.time() < deadline and not (meta.exists() and json.loads(meta.read_text())["epoch"] >= 3):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    # the checkpoint file's own metadata is what a resume reads; the .json copy beside it can lag one save
    # behind when the kill lands between the two writes
    from pluribus.runs import RunFolder

    saved = RunFolder(run).load_checkpoint("tokenizer-train")
    killed_at = int(saved[1]["epoch"]) if saved is not None else 0
    assert 3 <= killed_at < 150, "the run must be killed mid-training"
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "resumed from" in res.stderr and f"(epoch {killed_at} of 150)" in res.stderr
    assert json.loads(meta.read_text())["epoch"] == 150 and (run / "tokenizer" / "tokenizer.json").exists()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "not retrained" in again.stderr

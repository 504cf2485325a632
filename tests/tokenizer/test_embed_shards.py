"""Stage 1 over Parquet shards (`pluribus tokenize embed`): output format, engines, resumption, bad input.

The logic tests use a hash 'embedder' in this process (fast); the engine tests use the packaged MiniLM in
spawned worker processes (pool, default suite) and Ray actors (``-m ray``), each under a hard timeout that kills
the whole process group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from u2qt_helpers import fake_embed

from pluribus.cli import main
from pluribus.errors import ConfigError, DataError
from pluribus.tokenizer import embed as embed_mod
from pluribus.tokenizer.config import EmbedConfig
from pluribus.tokenizer.shards import MANIFEST, ShardColumns, embed_shards, write_slice_shards
from pluribus.tokenizer.slices import SliceEmbeddings
from pluribus.tokenizer.stream import EMBEDDER_KEY, vector_folder

ROOT = Path(__file__).resolve().parents[2]


def write_shards(folder: Path, n_shards: int = 4, users_per_shard: int = 3, *, schema_extra: bool = False) -> None:
    """Shards of slices: users with 1-3 slices of 'ratings' and, every other user, 'reviews'."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n_shards):
        rows = []
        for j in range(users_per_shard):
            user = f"u{k}-{j}"
            for i in range(1 + j % 3):
                rows.append((user, "ratings", i, f"ratings ({i + 1} events): film {k * 31 + j * 7 + i} rated {1 + i % 5}/5"))
            if j % 2 == 0:
                rows.append((user, "reviews", 0, f"reviews (1 events): wrote about film {k + j}"))
        table = {"user_id": [r[0] for r in rows], "source": [r[1] for r in rows],
                 "slice": pa.array([r[2] for r in rows], pa.int32()), "text": [r[3] for r in rows]}
        if schema_extra:
            table["lang"] = ["en"] * len(rows)
        pq.write_table(pa.table(table), folder / f"part-{k:05d}.parquet")


def read_vectors(folder: Path) -> dict[tuple[str, str], np.ndarray | None]:
    """(user, source) -> vector (None where the user lacks the source), over every file of a vector folder."""
    files, dims = vector_folder(folder)
    out = {}
    for path in files:
        table = pq.read_table(path)
        for source in dims:
            for user, value in zip(table.column("user_id").to_pylist(), table.column(source).to_pylist(), strict=True):
                out[user, source] = None if value is None else np.asarray(value, dtype=np.float32)
    return out


def expected_vectors(folder: Path, embed, combine: str = "mean", half_life: float = 2.0):
    """What stage 1 must give, computed directly: each user's slices embedded and combined in memory."""
    table = pa.concat_tables([pq.read_table(p) for p in sorted(folder.glob("*.parquet"))]).to_pylist()
    out = {}
    for user in dict.fromkeys(r["user_id"] for r in table):
        for source in ("ratings", "reviews"):
            rows = [r for r in table if r["user_id"] == user and r["source"] == source]
            if not rows:
                out[user, source] = None
                continue
            vecs = embed([r["text"] for r in rows])
            sliced = SliceEmbeddings(source, vecs, np.zeros(len(rows), dtype=int), np.asarray([r["slice"] for r in rows]), 1)
            out[user, source] = sliced.combine(combine, half_life=half_life)[0][0]
    return out


def assert_same_vectors(got, want, atol=0.0):
    assert set(got) == set(want)
    for key, value in want.items():
        if value is None:
            assert got[key] is None, key
        else:
            np.testing.assert_allclose(got[key], value, atol=atol, rtol=0, err_msg=str(key))


@pytest.fixture
def fake(monkeypatch):
    """The hash embedder in place of the model; records the texts of each call (one call per shard)."""
    calls: list[list[str]] = []

    def embed(texts, config=None, **_):
        calls.append(list(texts))
        return fake_embed(texts)

    monkeypatch.setattr(embed_mod, "embed_texts", embed)
    return calls


def quiet(_: str) -> None:
    pass


# ---- format and combination ---------------------------------------------------------------------------------
@pytest.mark.parametrize("combine", ["mean", "recency"])
def test_output_is_a_vector_folder_of_combined_slices(tmp_path, fake, combine):
    write_shards(tmp_path / "in")
    cfg = EmbedConfig(combine=combine, recency_half_life=1.5)
    report = embed_shards(tmp_path / "in", tmp_path / "out", cfg, progress=False, note=quiet)
    assert report["shards"] == report["shards_embedded"] == 4 and report["users"] == 12 and len(fake) == 4
    files, dims = vector_folder(tmp_path / "out")
    assert [f.name for f in files] == [f"part-{k:05d}.parquet" for k in range(4)] and dims == {"ratings": 12, "reviews": 12}
    assert pq.read_schema(files[0]).metadata[EMBEDDER_KEY].decode() == embed_mod.embedder_name(cfg)
    assert_same_vectors(read_vectors(tmp_path / "out"), expected_vectors(tmp_path / "in", fake_embed, combine, 1.5),
                        atol=1e-6)


def test_shards_without_source_and_slice_columns_use_one_source_and_row_order(tmp_path, fake):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"uid": ["a", "a", "b"], "body": ["x one", "x two", "y"]}), tmp_path / "in" / "s.parquet")
    cols = ShardColumns(user="uid", text="body", default_source="history")
    embed_shards(tmp_path / "in", tmp_path / "out", EmbedConfig(combine="recency", recency_half_life=1.0),
                 columns=cols, progress=False, note=quiet)
    got = read_vectors(tmp_path / "out")
    want_a = (fake_embed(["x one"])[0] * 0.5 + fake_embed(["x two"])[0]) / 1.5  # the later row is the newer slice
    np.testing.assert_allclose(got["a", "history"], want_a, atol=1e-6)
    np.testing.assert_allclose(got["b", "history"], fake_embed(["y"])[0], atol=1e-6)


def test_slice_shards_from_a_data_set_embed_and_fit(tmp_path, fake):
    """`tokenize slices` -> `tokenize embed` -> `tokenize fit --vectors` on the CLI, each exit 0."""
    assert main(["tokenize", "slices", "synthetic:40", str(tmp_path / "slices"), "--shards", "3",
                 "--config", str(_embed_toml(tmp_path))]) == 0
    files = sorted((tmp_path / "slices").glob("*.parquet"))
    assert len(files) == 3 and pq.read_schema(files[0]).names == ["user_id", "source", "slice", "text"]
    assert main(["tokenize", "embed", str(tmp_path / "slices"), str(tmp_path / "vectors"),
                 "--config", str(_embed_toml(tmp_path))]) == 0
    _, dims = vector_folder(tmp_path / "vectors")
    assert sorted(dims) == ["apps", "payments", "searches"]
    tok_toml = tmp_path / "tok.toml"
    tok_toml.write_text("[tokenizer]\nn_shared = 1\nn_specific = 1\nshared_size = 4\nspecific_size = 4\n"
                        "latent_dim = 4\nhidden_dims = [16]\nepochs = 2\nbatch_size = 16\n")
    assert main(["tokenize", "fit", str(tmp_path / "vectors"), "--vectors", "--config", str(tok_toml),
                 "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").exists()


def _embed_toml(tmp_path: Path) -> Path:
    path = tmp_path / "embed.toml"
    path.write_text("[embed]\nslice_days = 7.0\n")  # time slices: no tokenizer to load
    return path


def test_write_slice_shards_keeps_each_user_in_one_shard(tmp_path):
    from pluribus.data.store import load_user_data

    ds = load_user_data("synthetic:25")
    result = write_slice_shards(ds, tmp_path / "s", EmbedConfig(slice_days=3.0), shards=4)
    owners: dict[str, str] = {}
    rows = 0
    for path in sorted((tmp_path / "s").glob("*.parquet")):
        users = set(pq.read_table(path).column("user_id").to_pylist())
        rows += pq.read_metadata(path).num_rows
        for user in users:
            assert owners.setdefault(user, path.name) == path.name
    assert len(owners) == 25 and rows == result["slices"]


# ---- resumption ------------------------------------------------------------------------------------------------
def test_resume_after_a_crash_embeds_only_the_unfinished_shards(tmp_path, fake, monkeypatch):
    write_shards(tmp_path / "in")

    def crash_on_third(texts, config=None, **_):
        if len(fake) == 2:
            raise RuntimeError("worker died")
        fake.append(list(texts))
        return fake_embed(texts)

    monkeypatch.setattr(embed_mod, "embed_texts", crash_on_third)
    with pytest.raises(RuntimeError, match="worker died"):
        embed_shards(tmp_path / "in", tmp_path / "out", progress=False, note=quiet)
    assert len(vector_folder(tmp_path / "out")[0]) == 2  # the finished shards stay a valid vector folder
    fake.clear()
    monkeypatch.setattr(embed_mod, "embed_texts", lambda t, c=None, **k: (fake.append(list(t)), fake_embed(t))[1])
    notes: list[str] = []
    report = embed_shards(tmp_path / "in", tmp_path / "out", progress=False, note=notes.append)
    assert notes == ["resuming: 2 of 4 shards done, 2 to embed"]
    assert report["shards_done_before"] == 2 and report["shards_embedded"] == 2 and len(fake) == 2
    assert_same_vectors(read_vectors(tmp_path / "out"), expected_vectors(tmp_path / "in", fake_embed), atol=1e-6)


def test_kill_9_mid_run_then_rerun_resumes(tmp_path):
    """A real SIGKILL (no cleanup at all) while the third shard is embedded; the rerun skips the two done."""
    write_shards(tmp_path / "in")
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT / 'tests' / 'tokenizer')!r})
        from u2qt_helpers import fake_embed
        from pluribus.tokenizer import embed as embed_mod
        from pluribus.tokenizer.shards import embed_shards
        calls = []
        def embed(texts, config=None, **_):
            calls.append(1)
            if len(calls) == 3:
                open({str(tmp_path / 'out' / '.part-00002.parquet.x1.tmp')!r}, 'w').write('half')  # as if mid-write
                os.kill(os.getpid(), signal.SIGKILL)
            return fake_embed(texts)
        embed_mod.embed_texts = embed
        embed_shards({str(tmp_path / 'in')!r}, {str(tmp_path / 'out')!r}, progress=False)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    calls: list[int] = []
    embed_mod_embed = embed_mod.embed_texts
    try:
        embed_mod.embed_texts = lambda t, c=None, **k: (calls.append(1), fake_embed(t))[1]
        notes: list[str] = []
        report = embed_shards(tmp_path / "in", tmp_path / "out", progress=False, note=notes.append)
    finally:
        embed_mod.embed_texts = embed_mod_embed
    assert notes == ["resuming: 2 of 4 shards done, 2 to embed"] and len(calls) == 2 and report["shards"] == 4
    assert not list((tmp_path / "out").glob(".*.tmp"))  # the dead run's temporary file is gone
    assert_same_vectors(read_vectors(tmp_path / "out"), expected_vectors(tmp_path / "in", fake_embed), atol=1e-6)


def test_a_changed_shard_is_embedded_again_and_a_finished_run_does_nothing(tmp_path, fake):
    write_shards(tmp_path / "in")
    embed_shards(tmp_path / "in", tmp_path / "out", progress=False, note=quiet)
    fake.clear()
    notes: list[str] = []
    assert embed_shards(tmp_path / "in", tmp_path / "out", progress=False, note=notes.append)["shards_embedded"] == 0
    assert fake == [] and notes == ["all 4 shards are embedded already: nothing to do"]
    table = pq.read_table(tmp_path / "in" / "part-00001.parquet")
    texts = [t + " (edited)" for t in table.column("text").to_pylist()]
    pq.write_table(table.set_column(3, "text", pa.array(texts)), tmp_path / "in" / "part-00001.parquet")
    notes.clear()
    embed_shards(tmp_path / "in", tmp_path / "out", progress=False, note=notes.append)
    assert len(fake) == 1 and any("re-embedding 1 shard" in n for n in notes)
    assert_same_vectors(read_vectors(tmp_path / "out"), expected_vectors(tmp_path / "in", fake_embed), atol=1e-6)


def test_an_output_written_but_not_recorded_is_embedded_again_and_a_foreign_file_refused(tmp_path, fake):
    """A worker that finished its shard after the driver died leaves a complete output the manifest lacks."""
    import json

    write_shards(tmp_path / "in")
    embed_shards(tmp_path / "in", tmp_path / "out", progress=False, note=quiet)
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    del manifest["shards"]["part-00003.parquet"]
    (tmp_path / "out" / MANIFEST).write_text(json.dumps(manifest))
    fake.clear()
    notes: list[str] = []
    embed_shards(tmp_path / "in", tmp_path / "out", progress=False, note=notes.append)
    assert notes == ["resuming: 3 of 4 shards done, 1 to embed"] and len(fake) == 1
    pq.write_table(pa.table({"user_id": ["z"]}), tmp_path / "out" / "theirs.parquet")
    with pytest.raises(DataError, match="no shard of this run wrote: theirs.parquet"):
        embed_shards(tmp_path / "in", tmp_path / "out", progress=False, note=quiet)


# ---- bad input: one line, exit 2, nothing half-written --------------------------------------------------------
def run_main(capsys, *args: str) -> tuple[int, str]:
    code = main(["tokenize", "embed", *args])
    err = capsys.readouterr().err.strip()
    return code, err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_shard_with_another_schema_is_refused_and_finished_shards_stay(tmp_path, fake, capsys):
    write_shards(tmp_path / "in", n_shards=3)
    embed_shards(tmp_path / "in", tmp_path / "out", progress=False, note=quiet)
    before = snapshot(tmp_path / "out")
    write_shards(tmp_path / "new", n_shards=1, schema_extra=True)
    (tmp_path / "new" / "part-00000.parquet").rename(tmp_path / "in" / "part-00009.parquet")
    code, err = run_main(capsys, str(tmp_path / "in"), str(tmp_path / "out"))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "part-00009.parquet" in err and "'lang'" in err and "schema differs" in err
    assert snapshot(tmp_path / "out") == before


def test_a_shard_that_changes_schema_while_the_run_is_going_is_refused_before_its_output(tmp_path, fake, monkeypatch):
    write_shards(tmp_path / "in", n_shards=3)

    def embed_then_change_a_pending_shard(texts, config=None, **_):
        fake.append(list(texts))
        if len(fake) == 1:  # another process rewrites shard 2 with another schema while shard 0 is embedded
            write_shards(tmp_path / "other", n_shards=3, schema_extra=True)
            os.replace(tmp_path / "other" / "part-00002.parquet", tmp_path / "in" / "part-00002.parquet")
        return fake_embed(texts)

    monkeypatch.setattr(embed_mod, "embed_texts", embed_then_change_a_pending_shard)
    with pytest.raises(DataError, match=r"part-00002\.parquet: changed since the run started"):
        embed_shards(tmp_path / "in", tmp_path / "out", progress=False, note=quiet)
    assert not (tmp_path / "out" / "part-00002.parquet").exists() and len(fake) == 2
    files, _ = vector_folder(tmp_path / "out")
    assert [f.name for f in files] == ["part-00000.parquet", "part-00001.parquet"]


def test_vectors_of_another_embedder_are_not_mixed_in(tmp_path, fake, capsys):
    write_shards(tmp_path / "in", n_shards=2)
    embed_shards(tmp_path / "in", tmp_path / "out", EmbedConfig(max_length=128), progress=False, note=quiet)
    before = snapshot(tmp_path / "out")
    code, err = run_main(capsys, str(tmp_path / "in"), str(tmp_path / "out"))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "max_length=128" in err and "refusing to mix" in err and "--force" in err
    assert snapshot(tmp_path / "out") == before
    # a vector folder of another embedder written by another tool (no manifest) is refused the same way
    from pluribus.tokenizer.inputs import SourceEmbeddings
    from pluribus.tokenizer.stream import write_vectors

    emb = SourceEmbeddings(np.asarray(["a", "b"], dtype=object), {"ratings": np.ones((2, 3), np.float32)},
                           {"ratings": np.ones(2, bool)})
    write_vectors(tmp_path / "theirs", [emb], embedder="qwen3:someone-else")
    code, err = run_main(capsys, str(tmp_path / "in"), str(tmp_path / "theirs"))
    assert code == 2 and "qwen3:someone-else" in err and "refusing to mix" in err
    assert main(["tokenize", "embed", str(tmp_path / "in"), str(tmp_path / "out"), "--force"]) == 0
    assert pq.read_schema(tmp_path / "out" / "part-00000.parquet").metadata[EMBEDDER_KEY].decode() == \
        embed_mod.embedder_name(EmbedConfig())


def test_the_embed_backend_is_part_of_the_embedder_and_not_mixed(tmp_path, fake, capsys):
    pytest.importorskip("onnxruntime")
    write_shards(tmp_path / "in", n_shards=2)
    assert main(["tokenize", "embed", str(tmp_path / "in"), str(tmp_path / "out"), "--embed-backend", "onnx-int8"]) == 0
    declared = pq.read_schema(tmp_path / "out" / "part-00000.parquet").metadata[EMBEDDER_KEY].decode()
    assert declared.endswith(":backend=onnx-int8")
    code, err = run_main(capsys, str(tmp_path / "in"), str(tmp_path / "out"))  # torch, the default
    assert code == 2 and "backend=onnx-int8" in err and "refusing to mix" in err


def test_a_missing_text_column_and_an_empty_folder_are_one_line_errors(tmp_path, fake, capsys):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"user_id": ["a"], "body": ["x"]}), tmp_path / "in" / "s.parquet")
    code, err = run_main(capsys, str(tmp_path / "in"), str(tmp_path / "out"))
    assert code == 2 and len(err.splitlines()) == 1 and "no 'text' column" in err and "--text-column" in err, err
    assert not (tmp_path / "out").exists()
    assert main(["tokenize", "embed", str(tmp_path / "in"), str(tmp_path / "out"), "--text-column", "body"]) == 0
    (tmp_path / "empty").mkdir()
    code, err = run_main(capsys, str(tmp_path / "empty"), str(tmp_path / "out2"))
    assert code == 2 and "no .parquet files" in err and not (tmp_path / "out2").exists()


def test_a_user_split_over_two_shards_is_refused_before_any_work(tmp_path, fake, capsys):
    write_shards(tmp_path / "in", n_shards=2)
    table = pq.read_table(tmp_path / "in" / "part-00001.parquet")
    users = table.column("user_id").to_pylist()
    pq.write_table(table.set_column(0, "user_id", pa.array(["u0-0"] + users[1:])), tmp_path / "in" / "part-00001.parquet")
    code, err = run_main(capsys, str(tmp_path / "in"), str(tmp_path / "out"))
    assert code == 2 and "'u0-0' has slices in part-00000.parquet too" in err and fake == []


def test_an_engine_or_backend_that_is_not_installed_is_refused(tmp_path, fake, capsys, monkeypatch):
    import importlib.util

    write_shards(tmp_path / "in", n_shards=1)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("ray", "transformers") else real(name, *a))
    code, err = run_main(capsys, str(tmp_path / "in"), str(tmp_path / "out"), "--engine", "ray", "--workers", "2")
    assert code == 2 and "engine 'ray' needs ray, which is not installed" in err and not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="embedder kind 'qwen3' needs transformers"):
        embed_shards(tmp_path / "in", tmp_path / "out", EmbedConfig(kind="qwen3", model="x"), note=quiet)
    code, err = run_main(capsys, str(tmp_path / "in"), str(tmp_path / "out"), "--engine", "spark")
    assert code == 2 and "engine 'spark'" in err
    code, err = run_main(capsys, str(tmp_path / "in"), str(tmp_path / "out"), "--engine", "local", "--workers", "2")
    assert code == 2 and "engine 'local' runs one worker" in err


def test_a_backend_missing_inside_the_worker_is_one_line_and_leaves_no_folder(tmp_path, monkeypatch, capsys):
    """An embedder backend that fails only when the worker loads it (e.g. an ONNX runtime not installed)."""
    write_shards(tmp_path / "in", n_shards=2)

    def missing_backend(texts, config=None, **_):
        raise ConfigError("backend 'onnx-int8' needs onnxruntime, which is not installed")

    monkeypatch.setattr(embed_mod, "embed_texts", missing_backend)
    code, err = run_main(capsys, str(tmp_path / "in"), str(tmp_path / "new" / "out"))
    assert code == 2 and len(err.splitlines()) == 1 and "onnxruntime" in err, err
    assert not (tmp_path / "new").exists()


# ---- engines on the real embedder ---------------------------------------------------------------------------
def run_cli_hard_timeout(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """`pluribus ...` in its own process group, killed whole (workers included) if it overruns."""
    proc = subprocess.Popen([sys.executable, "-m", "pluribus.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=ROOT,
                            env={**os.environ, "PLURIBUS_PROGRESS": "0"})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"`pluribus {' '.join(args)}` ran past {timeout} s; its process group was killed")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def minilm(texts):
    return embed_mod.embed_texts(texts, EmbedConfig())


@pytest.mark.slow
def test_one_and_two_pool_workers_give_the_in_process_vectors(tmp_path):
    """The packaged MiniLM: 2 spawned workers, 1 worker in this process, and embed_texts itself agree."""
    import torch

    torch.set_num_threads(1)
    write_shards(tmp_path / "in", n_shards=3, users_per_shard=2)
    proc = run_cli_hard_timeout(["tokenize", "embed", str(tmp_path / "in"), str(tmp_path / "two"), "--workers", "2",
                                 "--engine", "pool"], timeout=400)
    assert proc.returncode == 0, proc.stderr
    embed_shards(tmp_path / "in", tmp_path / "one", progress=False, note=quiet)
    want = expected_vectors(tmp_path / "in", minilm)
    assert_same_vectors(read_vectors(tmp_path / "one"), want, atol=1e-5)
    assert_same_vectors(read_vectors(tmp_path / "two"), want, atol=1e-5)
    assert "2 pool worker(s)" in proc.stdout


@pytest.mark.ray
def test_ray_actor_pool_gives_the_same_vectors(tmp_path):
    write_shards(tmp_path / "in", n_shards=3, users_per_shard=2)
    proc = run_cli_hard_timeout(["tokenize", "embed", str(tmp_path / "in"), str(tmp_path / "ray"), "--workers", "2",
                                 "--engine", "ray"], timeout=500)
    assert proc.returncode == 0, proc.stderr
    assert_same_vectors(read_vectors(tmp_path / "ray"), expected_vectors(tmp_path / "in", minilm), atol=1e-5)
    assert (tmp_path / "ray" / MANIFEST).exists()


# ---- review: a finished rerun, empty texts, bad inputs named in the module docstring ---------------------------
def test_a_finished_run_run_again_says_so_and_changes_nothing(tmp_path, fake):
    write_shards(tmp_path / "in")
    embed_shards(tmp_path / "in", tmp_path / "out", progress=False, note=quiet)
    stamps = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "out").iterdir()}
    fake.clear()
    notes: list[str] = []
    report = embed_shards(tmp_path / "in", tmp_path / "out", progress=False, note=notes.append)
    assert notes == ["all 4 shards are embedded already: nothing to do"] and fake == []
    assert report["shards_embedded"] == 0 and report["shards_done_before"] == 4
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "out").iterdir()} == stamps


def test_an_empty_text_is_no_slice_and_a_user_with_only_empty_slices_gets_nulls(tmp_path, fake):
    """As stage 1 on a data set: an empty text is not embedded (an empty string would still give a vector)."""
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"user_id": ["a", "a", "b", "c"], "text": ["film 1", "  ", "", "film 2"]}),
                   tmp_path / "in" / "s.parquet")
    report = embed_shards(tmp_path / "in", tmp_path / "out", progress=False, note=quiet)
    assert fake == [["film 1", "film 2"]] and report["slices"] == 2 and report["users"] == 3
    got = read_vectors(tmp_path / "out")
    assert got["b", "text"] is None
    np.testing.assert_allclose(got["a", "text"], fake_embed(["film 1"])[0], atol=1e-6)
    np.testing.assert_allclose(got["c", "text"], fake_embed(["film 2"])[0], atol=1e-6)


def test_a_shard_of_only_empty_texts_is_refused_naming_it(tmp_path, fake, capsys):
    """No text to embed means no vector width for its users' null rows: one line, not a silently smaller folder."""
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"user_id": ["a"], "text": ["film 1"]}), tmp_path / "in" / "s0.parquet")
    pq.write_table(pa.table({"user_id": ["b"], "text": [""]}), tmp_path / "in" / "s1.parquet")
    code, err = run_main(capsys, str(tmp_path / "in"), str(tmp_path / "out"))
    assert code == 2 and len(err.splitlines()) == 1 and "s1.parquet" in err and "empty" in err, err


def _null_user(folder: Path) -> None:
    pq.write_table(pa.table({"user_id": ["a", None], "text": ["x", "y"]}), folder / "s.parquet")


def _null_text(folder: Path) -> None:
    pq.write_table(pa.table({"user_id": ["a", "b"], "text": ["x", None]}), folder / "s.parquet")


def _null_slice(folder: Path) -> None:
    pq.write_table(pa.table({"user_id": ["a", "b"], "text": ["x", "y"], "slice": pa.array([0, None], pa.int32())}),
                   folder / "s.parquet")


def _int_user(folder: Path) -> None:
    pq.write_table(pa.table({"user_id": [1, 2], "text": ["x", "y"]}), folder / "s.parquet")


def _float_slice(folder: Path) -> None:
    pq.write_table(pa.table({"user_id": ["a"], "text": ["x"], "slice": [0.5]}), folder / "s.parquet")


def _damaged(folder: Path) -> None:
    (folder / "s.parquet").write_bytes(b"not parquet at all")


@pytest.mark.parametrize(("make", "message"), [
    (_null_user, "row 1, field 'user_id': null value"), (_null_text, "row 1, field 'text': null value"),
    (_null_slice, "row 1, field 'slice': null value"), (_int_user, "field 'user_id': column type int64"),
    (_float_slice, "column type double"), (_damaged, "not a readable Parquet file"),
])
def test_bad_shards_are_one_line_errors_and_leave_no_folder(tmp_path, fake, capsys, make, message):
    (tmp_path / "in").mkdir()
    make(tmp_path / "in")
    code, err = run_main(capsys, str(tmp_path / "in"), str(tmp_path / "out"))
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_bad_output_folders_are_one_line_errors(tmp_path, fake, capsys):
    write_shards(tmp_path / "in", n_shards=2)
    (tmp_path / "file").write_text("x")
    assert run_main(capsys, str(tmp_path / "in"), str(tmp_path / "file"))[1].count("a file is in the way") == 1
    code, err = run_main(capsys, str(tmp_path / "in"), str(tmp_path / "in"))
    assert code == 2 and "is the input folder" in err
    assert main(["tokenize", "embed", str(tmp_path / "in"), str(tmp_path / "out")]) == 0
    before = snapshot(tmp_path / "out")
    (tmp_path / "in" / "part-00001.parquet").unlink()
    code, err = run_main(capsys, str(tmp_path / "in"), str(tmp_path / "out"))
    assert code == 2 and "no longer in" in err and "part-00001.parquet" in err and snapshot(tmp_path / "out") == before
    (tmp_path / "out" / MANIFEST).write_text('{"format": "something else"}')
    code, err = run_main(capsys, str(tmp_path / "in"), str(tmp_path / "out"))
    assert code == 2 and "not a stage-1 shard manifest" in err


def test_a_second_run_on_the_same_folder_at_once_is_refused(tmp_path, fake):
    import fcntl

    write_shards(tmp_path / "in", n_shards=1)
    (tmp_path / "out").mkdir()
    with open(tmp_path / "out" / ".stage1.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(DataError, match="another run is writing this folder"):
            embed_shards(tmp_path / "in", tmp_path / "out", progress=False, note=quiet)
    assert fake == []


def test_slice_shards_count_the_users_they_hold_not_those_without_slices(tmp_path, fake, capsys):
    """A user without events has no slice, so no row in the shards nor in the vectors: the count says so."""
    import dataclasses

    from pluribus.data.store import load_user_data

    ds = load_user_data("synthetic:12")
    gone = str(ds.user_ids[0])
    ds = dataclasses.replace(ds, sources={n: f[f["user_id"].astype(str) != gone] for n, f in ds.sources.items()})
    result = write_slice_shards(ds, tmp_path / "s", EmbedConfig(slice_days=3.0), shards=3)
    assert result["users"] == 11 and result["users_without_slices"] == 1
    report = embed_shards(tmp_path / "s", tmp_path / "v", EmbedConfig(slice_days=3.0), progress=False, note=quiet)
    assert report["users"] == 11 and all(user != gone for user, _ in read_vectors(tmp_path / "v"))


def test_a_shard_task_travels_through_json_unchanged():
    """How a task reaches a Ray actor (the Ray test itself is opt-in)."""
    from pluribus.tokenizer.shards import ShardTask

    task = ShardTask("in/a.parquet", "out/a.parquet", "0" * 64, ("ratings", "reviews"), "minilm", ShardColumns(user="uid"))
    assert ShardTask.from_json(task.to_json()) == task

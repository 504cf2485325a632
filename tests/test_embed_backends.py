"""Stage-1 backends (ONNX Runtime, OpenVINO): each loads and is in effect, matches torch, keys and names differ per
backend, a missing package and a mixed backend are one-line errors (exit 2)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "tokenizer"))  # the tokenizer tests' fake stage-1 embedder
from u2qt_helpers import fake_embed  # noqa: E402

from pluribus.errors import ConfigError, DataError  # noqa: E402
from pluribus.tokenizer import backends  # noqa: E402
from pluribus.tokenizer import embed as embed_mod  # noqa: E402
from pluribus.tokenizer.config import EMBED_BACKENDS, EmbedConfig  # noqa: E402

RUNTIMES = [b for b in EMBED_BACKENDS if b != "torch"]
TEXTS = [
    "ratings (3 events): 1997-12-04: Toy Story (1995) (rating=5); 1997-12-05: Heat (1995) (rating=3)",
    "knowledge (2 events): Star Wars (1977): Action, Adventure, Romance, Sci-Fi, War",
    "activity (1 events): hour 22, weekday 0",
    "short",
    " ".join(["1998-01-02: Fargo (1996) (rating=4);"] * 60),  # past the 256 word pieces: truncated alike
]


def _installed(backend: str) -> bool:
    return all(importlib.util.find_spec(p) is not None for p in backends.PACKAGES[backend])


@pytest.fixture(scope="module")
def export_home(tmp_path_factory):
    """One export folder for the module (exports take seconds each); the process-wide data dir is restored after."""
    home = tmp_path_factory.mktemp("pluribus-data")
    before = os.environ.get("PLURIBUS_DATA_DIR")
    os.environ["PLURIBUS_DATA_DIR"] = str(home)
    backends.runtime_encoder.cache_clear()
    yield home
    backends.runtime_encoder.cache_clear()
    if before is None:
        os.environ.pop("PLURIBUS_DATA_DIR", None)
    else:
        os.environ["PLURIBUS_DATA_DIR"] = before


@pytest.fixture(scope="module")
def torch_vectors():
    return embed_mod.embed_texts(TEXTS, EmbedConfig(batch_size=2))


@pytest.mark.slow
@pytest.mark.parametrize("backend", RUNTIMES)
def test_backend_loads_is_in_effect_and_matches_torch(backend, export_home, torch_vectors):
    if not _installed(backend):
        pytest.skip(f"{backend}: {backends.PACKAGES[backend]} not installed")
    cfg = EmbedConfig(backend=backend, batch_size=2)  # batches of 2: padding inside a batch is exercised
    try:
        runtime = embed_mod.load_backend(cfg)
    except ConfigError as err:  # the only accepted refusal: a CPU without bf16, said so
        assert backend == "openvino-bf16" and "no bf16" in str(err)
        return
    assert str(runtime.path).startswith(str(export_home / "models"))
    if backend.startswith("onnx"):
        assert "CPUExecutionProvider" in runtime.in_effect
        int8 = int(runtime.in_effect.split(": ")[1].split(" int8")[0])
        assert (int8 > 0) == (backend == "onnx-int8"), runtime.in_effect
        if backend == "onnx":
            assert " 0 fused attention" not in runtime.in_effect  # the BERT fusions applied
    else:
        want = "bf16" if backend == "openvino-bf16" else "f32"
        assert runtime.in_effect.endswith(f"inference precision {want}"), runtime.in_effect
    vecs = embed_mod.embed_texts(TEXTS, cfg)
    assert vecs.shape == torch_vectors.shape and vecs.dtype == np.float32
    cos = (vecs * torch_vectors).sum(axis=1) / np.linalg.norm(vecs, axis=1) / np.linalg.norm(torch_vectors, axis=1)
    assert cos.min() >= 0.99, cos
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    # the order of the texts is kept (batches are sorted by length inside)
    again = embed_mod.embed_texts(TEXTS[::-1], cfg)
    assert np.allclose(again[::-1], vecs, atol=2e-3)


def test_export_writes_nothing_half_done(tmp_path):
    def broken(tmp: Path) -> None:
        (tmp / "model.onnx").write_text("half")
        raise RuntimeError("killed mid-export")

    with pytest.raises(RuntimeError):
        backends._artifact(tmp_path, "onnx-int8", broken)
    assert list(tmp_path.iterdir()) == []  # no target, no temporary folder
    calls = []

    def build(tmp: Path) -> None:
        calls.append(1)
        (tmp / "model.onnx").write_text("whole")

    for _ in range(2):  # the second call finds it done
        target = backends._artifact(tmp_path, "onnx-int8", build)
    assert (target / "model.onnx").read_text() == "whole" and calls == [1]


def test_keys_and_names_differ_per_backend_and_torch_keeps_the_old_ones():
    from pluribus.config import config_to_dict
    from pluribus.tokenizer.slices import SliceTexts, slices_cache_key

    present = np.ones(len(TEXTS), dtype=bool)
    configs = [EmbedConfig(backend=b) for b in EMBED_BACKENDS]
    keys = {embed_mod.cache_key(TEXTS, present, c) for c in configs}
    names = {embed_mod.embedder_name(c) for c in configs}
    cut = SliceTexts("ratings", TEXTS, np.arange(len(TEXTS)), np.zeros(len(TEXTS), dtype=int), len(TEXTS))
    slice_keys = {slices_cache_key(cut, dataclass_with(c)) for c in configs}
    assert len(keys) == len(names) == len(slice_keys) == len(EMBED_BACKENDS)
    # "torch" is the default and is stored as None: no new key in the cache, the names of earlier releases
    assert EmbedConfig(backend="torch").backend is None and "backend" not in config_to_dict(EmbedConfig())
    assert embed_mod.embedder_name(EmbedConfig()) == "sentence-transformers:packaged:all-MiniLM-L6-v2:max_length=512:normalize=True"
    assert embed_mod.embedder_name(EmbedConfig(backend="onnx-int8")).endswith(":backend=onnx-int8")


def dataclass_with(cfg: EmbedConfig) -> EmbedConfig:
    import dataclasses

    return dataclasses.replace(cfg, slice_tokens=254)


def test_bad_backend_settings_are_config_errors():
    with pytest.raises(ConfigError, match="not one of"):
        EmbedConfig(backend="tensorrt")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="kind='qwen3'"):
        EmbedConfig(kind="qwen3", model="x", backend="onnx")
    with pytest.raises(ConfigError, match="device='cuda'"):
        EmbedConfig(device="cuda", backend="openvino")


def _hide(monkeypatch, package: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))


def test_missing_package_is_one_line_config_error(monkeypatch, tmp_path, capsys):
    from pluribus.cli import main

    _hide(monkeypatch, "openvino")
    assert not backends.backend_available("openvino-bf16") and backends.backend_available("torch")
    with pytest.raises(ConfigError, match=r"'openvino-bf16' needs openvino, which is not installed: pip install 'pluribus\[embed\]'"):
        embed_mod.embed_texts(["a text"], EmbedConfig(backend="openvino-bf16"))
    run = tmp_path / "run"
    code = main(["tokenize", "fit", "synthetic:30", "--out", str(run), "--embed-backend", "openvino",
                 "--cache-dir", str(tmp_path / "cache")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "'openvino'" in lines[0] and "pluribus[embed]" in lines[0], lines
    assert not run.exists()  # refused before the run folder was written
    code = main(["tokenize", "fit", "synthetic:30", "--out", str(run), "--embed-backend", "tensorrt"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "tensorrt" in lines[0], lines


def test_a_tokenizer_refuses_vectors_of_another_backend(monkeypatch, tmp_path, capsys):
    from pluribus.cli import main
    from pluribus.tokenizer.estimator import UserTokenizer
    from pluribus.tokenizer.inputs import SourceEmbeddings
    from pluribus.tokenizer.stream import check_embedder, vector_folder, write_vectors

    monkeypatch.setattr(embed_mod, "embed_texts", lambda t, c=None, **k: fake_embed(t))  # no model: the names matter
    run, cache = tmp_path / "run", str(tmp_path / "cache")
    args = ["--epochs", "2", "--cache-dir", cache, "--holdout", "0.2"]
    assert main(["tokenize", "fit", "synthetic:40", "--out", str(run), "--embed-backend", "onnx-int8", *args]) == 0
    tok = UserTokenizer.load(run / "tokenizer")
    assert tok.embed_config.backend == "onnx-int8" and tok.embedder().endswith(":backend=onnx-int8")
    capsys.readouterr()
    out = tmp_path / "codes.jsonl"
    base = ["tokenize", "encode", "synthetic:40", "--tokenizer", str(run / "tokenizer"), "--cache-dir", cache]
    for other in ("torch", "openvino"):
        code = main([*base, "--out", str(out), "--embed-backend", other])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and "backend=onnx-int8" in lines[0], lines
        assert not out.exists()
    assert main([*base, "--out", str(out), "--embed-backend", "onnx-int8"]) == 0 and out.exists()
    # a vector folder written by another backend is refused as well
    emb = SourceEmbeddings(np.array(["u1", "u2"], dtype=object), {"a": np.ones((2, 12), np.float32)},
                           {"a": np.ones(2, bool)})
    folder = write_vectors(tmp_path / "vectors", [emb], embedder=embed_mod.embedder_name(EmbedConfig()))
    files, _ = vector_folder(folder, ["a"])
    with pytest.raises(DataError, match="backend=onnx-int8"):
        check_embedder(files, tok.embedder())


def test_export_root_differs_for_another_copy_or_a_rewrite_of_the_same_model(tmp_path, monkeypatch):
    """Two fine-tunes of one model share its name, config and weight size: their exports must not be shared (the
    second reused the first's export: cosine 0.28 to its own torch vectors), nor survive a rewrite in place."""
    monkeypatch.setenv("PLURIBUS_DATA_DIR", str(tmp_path / "data"))
    roots = []
    for folder, weights in (("a", b"\x01" * 64), ("b", b"\x02" * 64)):
        model = tmp_path / folder / "model"
        model.mkdir(parents=True)
        (model / "config.json").write_text('{"hidden_size": 8}')
        (model / "model.safetensors").write_bytes(weights)
        os.utime(model / "model.safetensors", ns=(10**18, 10**18))
        roots.append(backends.export_root(model))
    assert roots[0] != roots[1] and roots[0].name.startswith("model-")
    assert backends.export_root(tmp_path / "a" / "model") == roots[0]  # stable for the same files
    rewritten = tmp_path / "a" / "model" / "model.safetensors"
    rewritten.write_bytes(b"\x03" * 64)  # a fine-tune saved over the model: same size
    os.utime(rewritten, ns=(10**18 + 1, 10**18 + 1))
    assert backends.export_root(tmp_path / "a" / "model") != roots[0]


def _legacy_layout(folder: Path) -> Path:
    """The packaged MiniLM in the older sentence-transformers layout: the transformer in ``0_Transformer/``."""
    packaged = Path(embed_mod.default_model_path())
    (folder / "0_Transformer").mkdir(parents=True)
    for f in packaged.iterdir():
        if f.is_file() and f.name not in ("modules.json", "README.md"):
            (folder / "0_Transformer" / f.name).symlink_to(f)
    (folder / "1_Pooling").symlink_to(packaged / "1_Pooling")
    (folder / "modules.json").write_text(
        '[{"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},'
        ' {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]')
    return folder


@pytest.mark.slow
def test_a_legacy_layout_model_exports_what_sentence_transformers_loaded(export_home, tmp_path):
    """The export is of the loaded transformer, not a reload by path (which failed with a raw ValueError on a
    ``0_Transformer/`` layout); the vectors are torch's."""
    if not _installed("openvino"):
        pytest.skip("openvino not installed")
    model = str(_legacy_layout(tmp_path / "legacy"))
    ref = embed_mod.embed_texts(TEXTS, EmbedConfig(model=model, batch_size=2))
    vecs = embed_mod.embed_texts(TEXTS, EmbedConfig(model=model, batch_size=2, backend="openvino"))
    cos = (vecs * ref).sum(axis=1) / np.linalg.norm(vecs, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.9999, cos


def test_a_model_without_a_transformer_is_refused_by_a_runtime_backend(tmp_path):
    from sentence_transformers import SentenceTransformer, models
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(embed_mod.default_model_path()) / "tokenizer.json"))
    static = SentenceTransformer(modules=[models.StaticEmbedding(tok, embedding_dim=8)], device="cpu")
    with pytest.raises(ConfigError, match="starts with StaticEmbedding: use backend='torch'"):
        backends.RuntimeEncoder(static, "static-model", "onnx", 1)


@pytest.mark.slow
def test_a_model_with_a_default_prompt_gets_it_on_a_runtime_backend(export_home, tmp_path):
    """sentence-transformers' encode prepends the model's default prompt (and pools without it when the pooling says
    include_prompt=false); the runtime tokenised without it, so its vectors were of other texts."""
    if not _installed("openvino"):
        pytest.skip("openvino not installed")
    packaged = Path(embed_mod.default_model_path())
    model = tmp_path / "prompted"
    (model / "1_Pooling").mkdir(parents=True)
    for f in packaged.iterdir():
        if f.is_file() and f.name != "config_sentence_transformers.json":
            (model / f.name).symlink_to(f)
    (model / "config_sentence_transformers.json").write_text(
        '{"prompts": {"query": "query about a user: "}, "default_prompt_name": "query"}')
    (model / "1_Pooling" / "config.json").write_text(
        '{"word_embedding_dimension": 384, "pooling_mode_mean_tokens": true, "include_prompt": false}')
    ref = embed_mod.embed_texts(TEXTS, EmbedConfig(model=str(model), batch_size=2))
    plain = embed_mod.embed_texts(TEXTS, EmbedConfig(batch_size=2))
    assert (ref * plain).sum(axis=1).min() < 0.99  # the prompt (and its exclusion from pooling) changes the vectors
    vecs = embed_mod.embed_texts(TEXTS, EmbedConfig(model=str(model), batch_size=2, backend="openvino"))
    cos = (vecs * ref).sum(axis=1) / np.linalg.norm(vecs, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.9999, cos


def test_an_export_finished_first_by_another_process_is_kept(tmp_path):
    """Two processes exporting at once (e.g. shard workers on a cold cache): the one that renames second keeps the
    first's copy and leaves no temporary folder."""

    def build(tmp: Path) -> None:
        (tmp / "model.onnx").write_text("ours")
        other = tmp_path / "onnx-export"  # the other process renames its finished copy into place meanwhile
        other.mkdir()
        (other / "model.onnx").write_text("theirs")

    target = backends._artifact(tmp_path, "onnx-export", build)
    assert (target / "model.onnx").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["onnx-export"]

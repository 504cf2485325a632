"""UserTokenizer: fit/encode/decode, empty sources, bad input, save/load, vocabulary and collision suffix."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from pluribus.config import load_config, save_config
from pluribus.errors import ConfigError, DataError, ShapeError
from pluribus.tokenizer import EMPTY_CODE, SourceEmbeddings, TokenizerConfig, UserTokenizer, collision_suffix
from pluribus.tokenizer.metrics import reconstruction


def test_encode_gives_uint16_codes_within_level_sizes(fitted, views):
    tok, present = fitted
    codes = tok.encode(views, present=present)
    assert codes.dtype == np.uint16 and codes.shape == (240, 3, 3)
    assert tok.level_sizes_ == (16, 16, 8)
    for lvl, size in enumerate(tok.level_sizes_):
        valid = codes[:, :2, lvl]
        assert valid.max() < size


def test_missing_source_gets_the_empty_code_on_every_level(fitted, views):
    tok, present = fitted
    codes = tok.encode(views, present=present)
    absent = ~present["src2"]
    assert (codes[absent, 2, :] == EMPTY_CODE).all() and (codes[~absent, 2, 2] < 8).all()
    decoded = tok.decode(codes)
    assert not decoded.present["src2"][absent].any() and (decoded.embeddings["src2"][absent] == 0).all()
    assert "<s2_empty>" in tok.tokens(codes[absent][:1])[0]


def test_reconstruction_beats_predicting_the_mean(fitted, views):
    tok, present = fitted
    recon = reconstruction(tok, SourceEmbeddings(np.arange(240).astype(str).astype(object), views, {
        "src0": np.ones(240, bool), "src1": np.ones(240, bool), "src2": present["src2"]}))
    assert all(r["relative_mse"] < 0.6 and r["cosine"] > 0.6 for r in recon.values())


def test_fit_is_deterministic_for_a_seed(views, small_config):
    cfg = dataclasses.replace(small_config, epochs=3)
    a = UserTokenizer(cfg, progress=False).fit(views).encode(views)
    b = UserTokenizer(cfg, progress=False).fit(views).encode(views)
    assert np.array_equal(a, b)


def test_nan_or_inf_embeddings_are_rejected_with_the_row(views, small_config):
    bad = {k: v.copy() for k, v in views.items()}
    bad["src1"][7, 3] = np.nan
    with pytest.raises(DataError, match=r"row 7.*src1.*NaN or inf"):
        UserTokenizer(small_config, progress=False).fit(bad)
    bad["src1"][7, 3] = np.inf
    with pytest.raises(DataError, match="NaN or inf"):
        UserTokenizer(small_config, progress=False).fit(bad)


def test_nan_in_an_absent_row_is_fine(fitted, views):
    tok, present = fitted
    data = {k: v.copy() for k, v in views.items()}
    data["src2"][~present["src2"]] = np.nan
    codes = tok.encode(data, present=present)
    assert (codes[~present["src2"], 2] == EMPTY_CODE).all()


def test_out_of_range_or_partially_empty_codes_are_rejected(fitted, views):
    tok, present = fitted
    codes = tok.encode(views, present=present)
    bad = codes.copy()
    bad[3, 1, 2] = 8  # level 2 (specific) has 8 codes
    with pytest.raises(DataError, match=r"code 8 out of range at user row 3, source 'src1', level 2"):
        tok.decode(bad)
    partial = codes[~present["src2"]][:2].copy()
    partial[0, 2, 0] = 1
    with pytest.raises(DataError, match="empty on some levels only"):
        tok.decode(partial)
    with pytest.raises(ShapeError, match=r"codes has shape \[240, 3\]"):
        tok.decode(codes[:, :, 0])


def test_wrong_sources_or_widths_at_encode(fitted, views):
    tok, _ = fitted
    with pytest.raises(DataError, match="src2"):
        tok.encode({"src0": views["src0"], "src1": views["src1"]})
    wrong = dict(views, src0=views["src0"][:, :5])
    with pytest.raises(ShapeError, match="src0"):
        tok.encode(wrong)
    with pytest.raises(DataError, match="not fitted"):
        UserTokenizer().encode(views)


def test_save_load_round_trip(fitted, views, tmp_path):
    tok, present = fitted
    tok.save(tmp_path / "tok")
    meta = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    assert meta["version"] == 2 and meta["level_sizes"] == [16, 16, 8]
    loaded = UserTokenizer.load(tmp_path / "tok")
    codes = tok.encode(views, present=present)
    assert np.array_equal(loaded.encode(views, present=present), codes)
    assert np.allclose(loaded.decode(codes).embeddings["src0"], tok.decode(codes).embeddings["src0"], atol=1e-6)


def test_load_rejects_another_version_or_shape(fitted, tmp_path):
    tok, _ = fitted
    folder = tok.save(tmp_path / "tok")
    meta_path = folder / "tokenizer.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(dict(meta, version=99)))
    with pytest.raises(DataError, match="version 99"):
        UserTokenizer.load(folder)
    meta["config"]["shared_size"] = 32
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ShapeError, match="codebooks.0"):
        UserTokenizer.load(folder)
    meta_path.write_text(json.dumps(dict(meta, format="something-else")))
    with pytest.raises(DataError, match="not a pluribus tokenizer"):
        UserTokenizer.load(folder)


@pytest.mark.parametrize("field", ["source_names", "in_dims", "level_sizes"])
def test_load_names_a_missing_metadata_field(fitted, tmp_path, field):
    tok, _ = fitted
    folder = tok.save(tmp_path / "tok")
    meta_path = folder / "tokenizer.json"
    meta = json.loads(meta_path.read_text())
    del meta[field]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match=field):
        UserTokenizer.load(folder)


@pytest.mark.parametrize("method", ["suffix", "tokens", "token_ids"])
def test_an_unfitted_tokenizer_says_so(method):
    codes = np.zeros((2, 1, 2), dtype=np.uint16)
    with pytest.raises(DataError, match="not fitted"):
        getattr(UserTokenizer(TokenizerConfig()), method)(codes)


def test_collision_suffix_counts_earlier_duplicates():
    codes = np.array([[[1, 2]], [[3, 4]], [[1, 2]], [[1, 2]], [[3, 4]], [[5, 6]]], dtype=np.uint16)
    assert collision_suffix(codes).tolist() == [0, 0, 1, 2, 1, 0]


def test_suffix_switch_and_tokens(fitted, views):
    tok, present = fitted
    codes = tok.encode(views, present=present)[:3]
    dup = np.concatenate([codes, codes[:1]])
    assert tok.suffix(dup).tolist() == [0, 0, 0, 1]
    assert tok.tokens(dup)[3][-1] == "<dup1>" and tok.tokens(dup)[0][0].startswith("<sh_l0_c")
    off = UserTokenizer(dataclasses.replace(tok.config, collision_suffix=False))
    off.__dict__.update({k: v for k, v in tok.__dict__.items() if k.endswith("_")})
    assert off.suffix(dup).tolist() == [0, 0, 0, 0] and "<dup1>" not in off.tokens(dup)[3]


def test_vocabulary_ids_are_contiguous_and_match_strings(fitted, views):
    tok, present = fitted
    vocab = tok.vocabulary_
    table = vocab.tokens()
    assert len(table) == len(vocab) == len(set(table))
    codes = tok.encode(views, present=present)
    ids = tok.token_ids(codes)
    strings = tok.tokens(codes)
    assert all(table[i] == s for row_i, row_s in zip(ids, strings, strict=True) for i, s in zip(row_i, row_s, strict=True))
    assert f"<s1_l2_c{int(codes[0, 1, 2])}>" in strings[0]


@pytest.mark.parametrize("kwargs", [
    {"layout": "mixed"}, {"n_shared": 0, "n_specific": 0}, {"shared_size": 70000}, {"ema_decay": 1.0},
    {"standardize": "zscore"},
])
def test_bad_config_values(kwargs):
    with pytest.raises(ConfigError):
        TokenizerConfig(**kwargs)


def test_config_toml_round_trip(tmp_path):
    cfg = TokenizerConfig(layout="union", hidden_dims=(128, 64), first_level_beta=0.5)
    save_config(cfg, tmp_path / "t.toml")
    assert load_config(TokenizerConfig, tmp_path / "t.toml") == cfg


def test_union_layout_and_ema_fit_end_to_end(views, small_config):
    cfg = dataclasses.replace(small_config, layout="union", codebook_update="ema", gradient="rotation",
                              sinkhorn_last_level=True, epochs=8)
    tok = UserTokenizer(cfg, progress=False).fit(views)
    codes = tok.encode(views)
    assert tok.level_sizes_ == (24, 24, 24) and codes.max() < 24


@pytest.mark.slow
def test_public_api_imports_without_the_heavy_embedders():
    import subprocess
    import sys

    code = ("import sys, pluribus.tokenizer as t; "
            "assert t.UserTokenizer and t.TokenizerConfig and t.embed_dataset; "
            "print([m for m in ('sentence_transformers', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_token_vectors_are_the_codebook_rows_behind_each_token(fitted, views):
    tok, present = fitted
    vectors = tok.token_vectors()
    vocab = tok.vocabulary_
    code_tokens = [t for t in vocab.tokens() if "_l" in t]
    assert sorted(vectors) == sorted(code_tokens)
    codes = tok.encode(views, present=present)
    summed = tok.code_vectors(codes)  # [users, sources, d]: the sum of the chosen codes' vectors
    u, s = 0, 0
    expected = sum(vectors[vocab.token(s, lvl, int(codes[u, s, lvl]))] for lvl in range(vocab.n_levels))
    assert np.allclose(expected, summed[u, s], atol=1e-5)

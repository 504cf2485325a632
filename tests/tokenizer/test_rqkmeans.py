"""The RQ-KMeans backend: the same estimator API, vocabulary and files as the RQ-VAE; balanced k-means; CLI --backend."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from pluribus.errors import ConfigError
from pluribus.tokenizer import EMPTY_CODE, TokenizerConfig, TokenVocabulary, UserTokenizer
from pluribus.tokenizer.metrics import reconstruction
from pluribus.tokenizer.rqkmeans import balanced_assign


@pytest.fixture(scope="module")
def rq_config(small_config):
    return dataclasses.replace(small_config, backend="rq-kmeans")


@pytest.fixture(scope="module")
def rq_fitted(views, rq_config):
    present = {"src2": np.arange(len(views["src2"])) % 5 != 0}
    return UserTokenizer(rq_config, progress=False).fit(views, present=present), present


def test_same_codes_tokens_and_vocabulary_shape_as_the_rqvae(rq_fitted, fitted, views):
    tok, present = rq_fitted
    rqvae, _ = fitted
    codes = tok.encode(views, present=present)
    assert codes.dtype == np.uint16 and codes.shape == rqvae.encode(views, present=present).shape == (240, 3, 3)
    assert tok.level_sizes_ == rqvae.level_sizes_ and tok.vocabulary_ == rqvae.vocabulary_
    absent = ~present["src2"]
    assert (codes[absent, 2, :] == EMPTY_CODE).all() and (codes[~absent] != EMPTY_CODE).all()
    assert tok.tokens(codes)[0][0].startswith("<sh_l0_c")  # shared levels: one token id whichever source chose it
    assert tok.codes_from_tokens(tok.tokens(codes)).tolist() == codes.tolist()
    assert tok.codes_from_tokens(tok.token_ids(codes)).tolist() == codes.tolist()
    decoded = tok.decode(codes)
    assert not decoded.present["src2"][absent].any() and (decoded.embeddings["src2"][absent] == 0).all()
    vectors = tok.code_vectors(codes)
    assert vectors.shape == (240, 3, 24)  # the latent of rq-kmeans is the (standardised, padded) input
    assert set(tok.token_vectors()) == {t for t in tok.vocabulary_.tokens() if "_c" in t}


def test_each_level_lowers_the_residual_and_reconstruction_beats_the_mean(rq_fitted, views):
    tok, present = rq_fitted
    residual = [h["recon"] for h in tok.history_]
    assert len(residual) == 3 and residual[0] > residual[1] > residual[2]
    emb = {"src0": views["src0"], "src1": views["src1"]}
    two = UserTokenizer(dataclasses.replace(tok.config, n_shared=0, n_specific=2), progress=False).fit(emb)
    assert all(r["relative_mse"] < 0.6 for r in reconstruction(two, emb).values())


def test_save_load_round_trip_keeps_codes_and_backend(rq_fitted, views, tmp_path):
    tok, present = rq_fitted
    tok.save(tmp_path / "tok")
    meta = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    assert meta["config"]["backend"] == "rq-kmeans"
    again = UserTokenizer.load(tmp_path / "tok", progress=False)
    assert again.config == tok.config and again.fingerprint_ == tok.fingerprint_
    codes = tok.encode(views, present=present)
    assert np.array_equal(again.encode(views, present=present), codes)
    assert np.allclose(again.decode(codes).embeddings["src1"], tok.decode(codes).embeddings["src1"])
    assert TokenVocabulary.load(tok.vocabulary_.save(tmp_path / "vocab.json")) == tok.vocabulary_


def test_a_file_written_before_the_backend_existed_loads_as_an_rqvae(fitted, views, tmp_path):
    tok, present = fitted
    folder = tok.save(tmp_path / "old")
    meta = json.loads((folder / "tokenizer.json").read_text())
    for key in ("backend", "kmeans_balanced"):
        del meta["config"][key]
    (folder / "tokenizer.json").write_text(json.dumps(meta))
    old = UserTokenizer.load(folder, progress=False)
    assert old.config.backend == "rqvae"
    assert np.array_equal(old.encode(views, present=present), tok.encode(views, present=present))


def test_unknown_backend_is_one_line_naming_the_option_and_the_choices():
    with pytest.raises(ConfigError) as err:
        TokenizerConfig(backend="kmeans")
    text = str(err.value)
    assert "\n" not in text and "backend" in text and "'kmeans'" in text and "['rqvae', 'rq-kmeans']" in text


def test_balanced_assign_respects_capacity_and_keeps_near_rows_together():
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(90, 2, generator=gen) * 0.1, torch.randn(10, 2, generator=gen) * 0.1 + 5.0])
    centres = torch.tensor([[0.0, 0.0], [5.0, 5.0], [0.5, 0.5], [-0.5, -0.5]])
    dist = torch.cdist(x, centres) ** 2
    assign = balanced_assign(dist)
    counts = torch.bincount(assign, minlength=4)
    assert (assign >= 0).all() and int(counts.max()) <= math.ceil(100 / 4) and int(counts.sum()) == 100
    assert torch.bincount(dist.argmin(1), minlength=4).max() > 25  # the plain assignment would overfill a code
    assert (assign[90:] == 1).all()  # the far cluster keeps its own code


def test_balanced_kmeans_spreads_a_skewed_data_set_over_the_codes():
    rng = np.random.default_rng(0)
    dense = rng.normal(size=(900, 4)) * 0.05  # 90% of the users in one tight blob
    spread = rng.normal(size=(100, 4)) * 3.0
    x = {"a": np.concatenate([dense, spread]).astype(np.float32)}
    cfg = TokenizerConfig(backend="rq-kmeans", n_shared=0, n_specific=1, specific_size=8, kmeans_iters=30)
    largest = {}
    for balanced in (False, True):
        tok = UserTokenizer(dataclasses.replace(cfg, kmeans_balanced=balanced), progress=False).fit(x)
        largest[balanced] = int(np.bincount(tok.encode(x)[:, 0, 0], minlength=8).max())
    # training balances exactly (ceil(1000 / 8) = 125 per code); encoding takes the nearest code, so the blob's
    # codes fill past that, but far less than plain k-means lets them (measured: 383 vs 913 users)
    assert largest[True] < largest[False] / 2


def test_warm_and_stable_refits(rq_fitted, views, fitted):
    tok, present = rq_fitted
    codes = tok.encode(views, present=present)
    stable = UserTokenizer(tok.config, progress=False).fit(views, present=present, warm_start=tok, stable=True)
    assert np.array_equal(stable.encode(views, present=present), codes)
    warm = UserTokenizer(tok.config, progress=False).fit(views, present=present, warm_start=tok)
    assert (warm.encode(views, present=present) == codes).mean() > 0.8
    rqvae, _ = fitted
    with pytest.raises(ConfigError, match="backend"):
        UserTokenizer(tok.config, progress=False).fit(views, present=present, warm_start=rqvae)


def test_cli_fit_with_backend_and_bad_backend(tmp_path, views, capsys):
    from pluribus.cli import main
    from pluribus.tokenizer import SourceEmbeddings
    from pluribus.tokenizer.stream import write_vectors

    n = len(views["src0"])
    emb = SourceEmbeddings(np.array([f"u{i}" for i in range(n)], dtype=object), dict(views),
                           {k: np.ones(n, bool) for k in views})
    write_vectors(tmp_path / "vec", [emb], embedder="model-A")
    run = tmp_path / "run"
    assert main(["tokenize", "fit", str(tmp_path / "vec"), "--vectors", "--out", str(run), "--backend", "rq-kmeans",
                 "--balanced"]) == 0
    saved = UserTokenizer.load(run / "tokenizer", progress=False)
    assert saved.config.backend == "rq-kmeans" and saved.config.kmeans_balanced
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["training"]["levels"] == len(saved.level_sizes_)
    assert "Backend `rq-kmeans` (balanced k-means)" in (run / "report.md").read_text()
    assert main(["tokenize", "encode", str(tmp_path / "vec"), "--vectors", "--tokenizer", str(run / "tokenizer"),
                 "--out", str(tmp_path / "codes")]) == 0
    capsys.readouterr()
    assert main(["tokenize", "fit", str(tmp_path / "vec"), "--vectors", "--out", str(tmp_path / "bad"),
                 "--backend", "faiss"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "backend" in err and "rq-kmeans" in err
    assert not (tmp_path / "bad").exists()


def test_codes_never_depend_on_the_batch_even_with_the_rqvae_s_sinkhorn_settings():
    # rq-kmeans ignores the RQ-VAE's training settings: Sinkhorn balancing at encode would make a user's last code
    # depend on which users are encoded with it (and on codebooks not fitted for it)
    x = {"a": np.random.default_rng(0).normal(size=(400, 6)).astype(np.float32)}
    cfg = TokenizerConfig(backend="rq-kmeans", n_shared=0, n_specific=2, specific_size=16, kmeans_iters=5,
                          sinkhorn_last_level=True, sinkhorn_at_encode=True)
    tok = UserTokenizer(cfg, progress=False).fit(x)
    assert np.array_equal(tok.encode({"a": x["a"][:50]}), tok.encode(x)[:50])
    assert np.array_equal(tok.encode(x, batch_size=64), tok.encode(x))

"""Tokenizer metrics: usage split shared vs per source, collisions, bytes per user, features, residuals."""

from __future__ import annotations

import numpy as np

from pluribus.tokenizer.config import EMPTY_CODE
from pluribus.tokenizer.metrics import (
    bytes_per_user,
    codebook_usage,
    collisions,
    residual_norms,
    token_features,
    tokenizer_report,
)


def test_usage_rows_split_shared_and_each_source(fitted, views):
    tok, present = fitted
    codes = tok.encode(views, present=present)
    rows = codebook_usage(tok, codes)
    assert [(r["level"], r["part"]) for r in rows] == [
        (0, "shared"), (1, "shared"), (2, "src0"), (2, "src1"), (2, "src2")]
    assert rows[0]["assignments"] == 240 + 240 + int(present["src2"].sum())
    assert rows[4]["assignments"] == int(present["src2"].sum())
    for r in rows:
        assert 0 < r["usage"] <= 1 and 1 <= r["perplexity"] <= r["size"]
        assert r["dead"] == round(r["size"] * (1 - r["usage"]))


def test_usage_counts_by_hand():
    class Fake:  # only what codebook_usage reads
        pass
    from pluribus.tokenizer import TokenizerConfig
    from pluribus.tokenizer.rqvae import MultiViewRQVAE

    tok = Fake()
    cfg = TokenizerConfig(n_shared=1, n_specific=0, shared_size=4, specific_size=2, latent_dim=2, hidden_dims=(4,))
    tok.model_ = MultiViewRQVAE(cfg, [3, 3])
    tok.source_names_, tok.level_sizes_ = ["a", "b"], (4,)
    from pluribus.tokenizer.estimator import UserTokenizer

    tok._check_codes = lambda c: UserTokenizer._check_codes(tok, c)  # type: ignore[attr-defined]
    codes = np.array([[[0], [0]], [[1], [EMPTY_CODE]], [[0], [1]]], dtype=np.uint16)
    (row,) = codebook_usage(tok, codes)
    assert row["usage"] == 0.5 and row["dead"] == 2 and row["assignments"] == 5
    p = np.array([3, 2]) / 5
    assert np.isclose(row["perplexity"], np.exp(-(p * np.log(p)).sum()))


def test_collisions():
    codes = np.array([[[1, 2]], [[1, 2]], [[1, 2]], [[3, 4]]], dtype=np.uint16)
    c = collisions(codes)
    assert c["collision_rate"] == 0.5 and c["largest_bucket"] == 3 and c["unique"] == 2


def test_bytes_per_user(fitted):
    tok, _ = fitted
    b = bytes_per_user(tok)
    assert b["codes"] == 2 * 3 * 3 + 2 and b["float32"] == 4 * (24 + 24 + 16)
    assert np.isclose(b["ratio_float32"], 256 / 20) and np.isclose(b["ratio_float16"], 128 / 20)


def test_token_features_and_residuals(fitted, views):
    tok, present = fitted
    codes = tok.encode(views, present=present)
    onehot = token_features(tok, codes, kind="onehot")
    assert onehot.shape == (240, 3 * (16 + 16 + 8))
    assert np.array_equal(onehot.sum(1), 6 + 3 * present["src2"].astype(float))
    vectors = token_features(tok, codes)
    assert vectors.shape == (240, 3 * 8)
    norms = residual_norms(tok, {**views})
    assert len(norms) == 4 and norms[-1] < norms[0]  # quantisation removes most of the latent
    report = tokenizer_report(tok, views)
    assert report["collisions"]["collision_rate"] < 0.05 and report["min_usage"] > 0.5

"""Yardsticks at equal bytes: PCA + int8 and product quantisation spend exactly the budget, or refuse it in one line."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from u2qt_helpers import make_views

from pluribus.errors import ConfigError, DataError, ShapeError
from pluribus.tokenizer.inputs import SourceEmbeddings
from pluribus.tokenizer.yardsticks import PCAInt8, ProductQuantiser, reconstruction_stats, split_budget


@pytest.mark.parametrize("budget", [3, 7, 12, 36, 64])
def test_pca_int8_spends_exactly_the_budget(views, budget):
    pca = PCAInt8(budget).fit(views)
    codes = pca.encode(views)
    assert codes.dtype == np.int8 and codes.shape == (240, budget)
    assert codes.nbytes / codes.shape[0] == budget and sum(pca.per_source_) == budget
    assert pca.per_source_ == split_budget(budget, [24, 24, 16])
    assert all(1 <= share <= width for share, width in zip(pca.per_source_, (24, 24, 16), strict=True))
    assert pca.features(codes).shape == (240, budget)


@pytest.mark.parametrize("budget", [3, 12, 24])
def test_product_quantisation_spends_exactly_the_budget(budget):
    pytest.importorskip("faiss")
    views = make_views(300)  # 8-bit codes: FAISS needs at least 256 training rows
    pq = ProductQuantiser(budget).fit(views)
    codes = pq.encode(views)
    assert codes.dtype == np.uint8 and codes.shape == (300, budget) and codes.nbytes / 300 == budget
    decoded = pq.decode(codes)
    assert [decoded.embeddings[s].shape for s in views] == [v.shape for v in views.values()]
    assert pq.features(codes).shape == (300, sum(v.shape[1] for v in views.values()))


def test_pq_with_fewer_training_users_than_codes_is_refused(views):
    pytest.importorskip("faiss")
    with pytest.raises(DataError, match="at least 256 training users"):
        ProductQuantiser(12).fit(views)


def test_split_is_even_and_passes_a_narrow_source_s_excess_on():
    assert split_budget(7, [24, 24, 16]) == [3, 2, 2]
    assert split_budget(60, [24, 24, 16]) == [22, 22, 16]
    assert split_budget(64, [24, 24, 16]) == [24, 24, 16]
    assert sum(split_budget(65, [24, 24, 16])) == 64  # over every limit: short of the budget, so refused


def test_more_bytes_reconstruct_better_and_full_rank_pca_is_nearly_exact(views):
    def rel_mse(method):
        decoded = method.decode(method.encode(views))
        return np.mean([reconstruction_stats(views[s], decoded.embeddings[s])["relative_mse"] for s in views])

    small, full = rel_mse(PCAInt8(6).fit(views)), rel_mse(PCAInt8(64).fit(views))
    assert full < small and full < 1e-3  # 24 + 24 + 16 components: only the int8 rounding is lost


def test_pca_features_are_the_dequantised_coefficients(views):
    pca = PCAInt8(9).fit(views)
    codes = pca.encode(views)
    first = views["src0"].astype(np.float64) - pca.mean_[0]
    coef = first @ pca.components_[0].T
    assert np.abs(pca.features(codes)[:, :3] - coef).max() <= pca.scale_[0].max() / 2 + 1e-9


@pytest.mark.parametrize("budget", [0, 2, 65, -4])
def test_a_budget_no_split_can_meet_is_one_line(views, budget):
    with pytest.raises(ConfigError) as err:
        PCAInt8(budget).fit(views)
    text = str(err.value)
    assert "\n" not in text and f"bytes_per_user={budget}" in text and "[3, 64]" in text


def test_pq_needs_a_share_that_divides_each_width(views):
    with pytest.raises(ConfigError, match="divide its width") as err:
        ProductQuantiser(15).fit(views)  # 5 per source: 24 % 5 != 0
    assert "\n" not in str(err.value)


def test_pq_without_faiss_is_a_config_error(views, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ConfigError, match="faiss-cpu"):
        ProductQuantiser(12).fit(views)


def test_unfitted_or_mismatched_input(views):
    with pytest.raises(DataError, match="not fitted"):
        PCAInt8(6).encode(views)
    pca = PCAInt8(6).fit(views)
    with pytest.raises(DataError, match="sources"):
        pca.encode({"src0": views["src0"]})
    with pytest.raises(ShapeError):
        pca.decode(np.zeros((4, 5), dtype=np.int8))


def test_codes_of_another_kind_are_refused_not_misread(views):
    pca = PCAInt8(6).fit(views)
    codes = pca.encode(views)
    as_uint8 = codes.view(np.uint8)  # e.g. product-quantisation codes: same shape, 0..255 instead of -127..127
    for method in (pca.features, pca.decode):
        with pytest.raises(ShapeError, match="int8 codes") as err:
            method(as_uint8)
        assert "\n" not in str(err.value)
    assert np.array_equal(pca.features(codes), pca.features(codes.copy()))


def test_a_source_no_training_user_has_is_named(views):
    ids = np.array([str(i) for i in range(240)], dtype=object)
    present = {s: np.ones(240, bool) for s in views}
    present["src2"][:] = False
    with pytest.raises(DataError, match="no training user has source 'src2'") as err:
        PCAInt8(6).fit(SourceEmbeddings(ids, dict(views), present))
    assert "\n" not in str(err.value)
    # a source some users lack is fine: encoded as zeros (the mean) for them
    present["src2"][::2] = True
    emb = SourceEmbeddings(ids, dict(views), present)
    codes = PCAInt8(6).fit(emb).encode(emb)
    assert (codes[1::2, -2:] == 0).all() and (codes[::2, -2:] != 0).any()

"""Warm-start refits and code churn: stable codes across refits, clear errors for another shape."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pluribus.errors import ConfigError, DataError, ShapeError
from pluribus.tokenizer import EMPTY_CODE, UserTokenizer
from pluribus.tokenizer.metrics import code_churn


@pytest.fixture(scope="module")
def old_tokenizer(views, small_config):
    first = {k: v[:160] for k, v in views.items()}
    return UserTokenizer(small_config, progress=False).fit(first)


def test_code_churn_counts_users_levels_and_prefixes():
    old = np.array([[[1, 2], [3, 4]], [[1, 2], [3, 4]], [[5, 6], [EMPTY_CODE, EMPTY_CODE]]], dtype=np.uint16)
    new = old.copy()
    new[0, 1, 1] = 9  # user 0: source 1, level 1
    new[2, 0, 0] = 7  # user 2: source 0, level 0
    churn = code_churn(old, new, ["a", "b"])
    assert churn["users"] == pytest.approx(2 / 3)
    assert churn["per_level"] == pytest.approx([1 / 3, 1 / 3])
    assert churn["prefix"] == pytest.approx([1 / 3, 2 / 3])
    assert churn["per_source_level"]["a"] == pytest.approx([1 / 3, 0.0])
    assert churn["per_source_level"]["b"] == pytest.approx([0.0, 0.5])  # user 2 lacks b in both: not counted
    assert code_churn(old, old)["users"] == 0.0
    with pytest.raises(ShapeError, match="new codes"):
        code_churn(old, new[:2])


def test_warm_refit_on_more_users_keeps_most_codes_unlike_a_cold_refit(old_tokenizer, views, small_config):
    refit_cfg = dataclasses.replace(small_config, epochs=10, seed=1)
    before = old_tokenizer.encode(views)
    warm = UserTokenizer(refit_cfg, progress=False).fit(views, warm_start=old_tokenizer)
    cold = UserTokenizer(dataclasses.replace(small_config, seed=1), progress=False).fit(views)
    warm_churn = code_churn(before, warm.encode(views))
    cold_churn = code_churn(before, cold.encode(views))
    assert cold_churn["per_level"][0] > 0.8  # a cold refit renumbers the codes
    assert warm_churn["per_level"][0] < 0.45 and warm_churn["codes"] < 0.4 * cold_churn["codes"]
    assert np.array_equal(old_tokenizer.encode(views), before)  # the previous tokenizer is left as it was
    free = UserTokenizer(dataclasses.replace(refit_cfg, anchor_weight=0.0), progress=False).fit(
        views, warm_start=old_tokenizer)
    tight = UserTokenizer(dataclasses.replace(refit_cfg, anchor_weight=10.0), progress=False).fit(
        views, warm_start=old_tokenizer)
    free_churn, tight_churn = (code_churn(before, t.encode(views))["codes"] for t in (free, tight))
    assert tight_churn < warm_churn["codes"] < free_churn  # the latent anchor is what holds the codes


def test_warm_start_from_another_shape_is_refused(old_tokenizer, views, small_config):
    with pytest.raises(ConfigError, match=r"shared_size=16 but this config has shared_size=32"):
        UserTokenizer(dataclasses.replace(small_config, shared_size=32), progress=False).fit(
            views, warm_start=old_tokenizer)
    with pytest.raises(DataError, match=r"sources \['src0', 'src1', 'src2'\]"):
        UserTokenizer(small_config, progress=False).fit(
            {"src0": views["src0"], "src1": views["src1"]}, warm_start=old_tokenizer)
    with pytest.raises(ShapeError, match="input widths"):
        UserTokenizer(small_config, progress=False).fit(dict(views, src2=views["src2"][:, :10]),
                                                        warm_start=old_tokenizer)
    with pytest.raises(DataError, match="not fitted"):
        UserTokenizer(small_config, progress=False).fit(views, warm_start=UserTokenizer(small_config))


def test_stable_refit_keeps_every_code_of_unchanged_inputs_and_learns_a_new_decoder(old_tokenizer, views, small_config):
    from pluribus.tokenizer.metrics import reconstruction, refit_churn

    rng = np.random.default_rng(4)
    changed = np.zeros(len(views["src0"]), dtype=bool)
    changed[rng.choice(len(changed), 60, replace=False)] = True
    today = {k: np.where(changed[:, None], v + rng.normal(scale=1.0, size=v.shape).astype(np.float32), v)
             for k, v in views.items()}
    before = old_tokenizer.encode(views)
    stable = UserTokenizer(dataclasses.replace(small_config, epochs=15, seed=3), progress=False).fit(
        today, warm_start=old_tokenizer, stable=True)
    after = stable.encode(today)
    churn = refit_churn(before, after, changed)
    assert churn["unchanged"]["codes"] == 0.0 and churn["users"] == {"unchanged": 180, "changed": 60}
    assert churn["changed"]["codes"] > 0.3  # changed inputs fall on other codes
    assert np.array_equal(after, old_tokenizer.encode(today))  # encoding is the old tokenizer's, exactly
    old_state, new_state = old_tokenizer.model_.state_dict(), stable.model_.state_dict()
    assert all(torch.equal(old_state[k], new_state[k]) for k in old_state if not k.startswith("decoder."))
    assert any(not torch.equal(old_state[k], new_state[k]) for k in old_state if k.startswith("decoder."))
    # the decoder learnt today's data: it reconstructs today's inputs better than the old one did
    old_mse = np.mean([r["mse"] for r in reconstruction(old_tokenizer, today).values()])
    new_mse = np.mean([r["mse"] for r in reconstruction(stable, today).values()])
    assert new_mse < old_mse
    assert np.array_equal(old_tokenizer.encode(views), before)  # the old tokenizer is untouched


def test_refit_churn_reports_unchanged_and_changed_users_apart():
    from pluribus.tokenizer.metrics import refit_churn

    old = np.zeros((4, 1, 2), dtype=np.uint16)
    new = old.copy()
    new[0, 0, 0] = 1  # an unchanged user's code moved
    new[3, 0, :] = 2  # a changed user's codes moved
    out = refit_churn(old, new, np.array([False, False, False, True]))
    assert out["unchanged"]["users"] == pytest.approx(1 / 3) and out["unchanged"]["codes"] == pytest.approx(1 / 6)
    assert out["changed"]["codes"] == 1.0
    assert refit_churn(old, old, np.zeros(4, bool))["changed"] is None
    with pytest.raises(ShapeError, match="changed"):
        refit_churn(old, new, np.zeros(3, bool))


def test_stable_refit_keeps_the_decoder_that_reconstructs_held_out_users_best(old_tokenizer, views, small_config):
    """With nothing new to learn, more decoder epochs can only overfit: the refit keeps whichever decoder (the old
    one or an epoch's) reconstructs a held-out tenth of its users best."""
    from pluribus.tokenizer.estimator import STABLE_MIN_USERS
    from pluribus.tokenizer.inputs import as_source_embeddings, stack_sources

    first = {k: v[:160] for k, v in views.items()}  # the old tokenizer's own training data
    cfg = dataclasses.replace(small_config, epochs=12, seed=2, lr=0.3)  # a harmful lr: every epoch gets worse
    stable = UserTokenizer(cfg, progress=False).fit(first, warm_start=old_tokenizer, stable=True)
    scores = [h["validation_recon"] for h in stable.history_]
    assert len(scores) == 12 and len(first["src0"]) >= STABLE_MIN_USERS
    x, present = stack_sources(as_source_embeddings(first), stable.source_names_, stable.in_dims_)
    held = torch.randperm(160, generator=torch.Generator().manual_seed(2))[:16]
    with torch.no_grad():
        kept = float(stable.model_(x[:, held], present[:, held]).recon_loss)
        before = float(old_tokenizer.model_(x[:, held], present[:, held]).recon_loss)
    assert min(scores) > before  # so the old decoder must be the one kept
    assert kept == pytest.approx(before, rel=1e-6)
    old_state, new_state = old_tokenizer.model_.state_dict(), stable.model_.state_dict()
    assert all(torch.equal(old_state[k], new_state[k]) for k in old_state)

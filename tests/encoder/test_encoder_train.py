from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_backbone
from pluribus.encoder.backbone import word_tokenizer
from pluribus.encoder.config import EncoderConfig, LoraSettings, ScheduleConfig, TrainConfig
from pluribus.encoder.model import EVENT_TOKEN, UserEncoder
from pluribus.encoder.pairs import build_pairs, describe_future, pairs_vocabulary
from pluribus.encoder.train import micro_batches, train_encoder
from pluribus.errors import ConfigError, DataError, ShapeError
from pluribus.runs import RunFolder


@pytest.fixture(scope="module")
def small_pairs():
    from pluribus.data.synthetic import make_synthetic_users

    ds = make_synthetic_users(24, seed=0)
    return build_pairs(ds, source="payments", positive="profile", max_events=8)


def _encoder(pairs, seed=0):
    tok = word_tokenizer(pairs_vocabulary(pairs))
    cfg = EncoderConfig(model="tiny", projection=(16,), lora=LoraSettings(r=4), max_length=48)
    return UserEncoder(cfg, backbone=make_backbone(len(tok), seed=seed), tokenizer=tok)


def test_pairs_from_synthetic_profile(small_pairs):
    assert len(small_pairs) == 24
    assert small_pairs.anchors[0].text.startswith("paid")
    assert small_pairs.positives[0].text.startswith("User profile:")


def test_micro_batches_are_deterministic_and_cover_epochs():
    a = micro_batches(10, 4, seed=1, start=0, count=4)
    assert a[2:] == micro_batches(10, 4, seed=1, start=2, count=2)
    assert sorted(a[0] + a[1]) != sorted(a[2] + a[3]) or a[0] != a[2]
    with pytest.raises(ConfigError, match="micro-batch"):
        micro_batches(3, 4, seed=0, start=0, count=1)


def test_ggsm_training_checkpoint_and_exact_resume(small_pairs, tmp_path):
    sched = ScheduleConfig(policy="ggsm", total_steps=4, warmup_steps=2, norm="zscore")
    # a shorter run stands in for an interrupted one: constant LR, so both configs give the same first 2 steps
    full_cfg = TrainConfig(steps=4, batch_size=4, grad_accum=2, lr=5e-3, checkpoint_every=2, lr_schedule="constant",
                           lr_warmup_ratio=0.0)
    enc_a = _encoder(small_pairs)
    res_a, sched_a = train_encoder(enc_a, small_pairs, sched, full_cfg, run=RunFolder(tmp_path / "a"), progress=False)
    assert res_a.steps == 4 and len(res_a.losses) == 4 and all(np.isfinite(res_a.losses))
    assert sched_a.n_updates == 2 * 2  # two warm-up steps x two micro-batches
    assert sched_a.w0 is not None and float(sched_a.w0.std()) > 0  # gradient-shaped W0
    assert res_a.future_weights[-1] > res_a.future_weights[0]

    enc_b = _encoder(small_pairs)
    half = TrainConfig(steps=2, batch_size=4, grad_accum=2, lr=5e-3, checkpoint_every=2, lr_schedule="constant",
                       lr_warmup_ratio=0.0)
    train_encoder(enc_b, small_pairs, sched, half, run=RunFolder(tmp_path / "b"), progress=False)
    enc_c = _encoder(small_pairs)
    res_c, _ = train_encoder(enc_c, small_pairs, sched, full_cfg, run=RunFolder(tmp_path / "b"), progress=False)
    assert res_c.resumed_from == 2
    assert res_c.losses == pytest.approx(res_a.losses, rel=1e-4)
    assert res_c.top1 == pytest.approx(res_a.top1) and res_c.anchor_cosine == pytest.approx(res_a.anchor_cosine)
    sa, sc = enc_a.trainable_state_dict(), enc_c.trainable_state_dict()
    assert all(torch.allclose(sa[k], sc[k], atol=1e-6) for k in sa)

    # a second training in the same run folder under its own checkpoint name starts fresh, not from "last"
    enc_d = _encoder(small_pairs)
    res_d, _ = train_encoder(enc_d, small_pairs, sched, half, run=RunFolder(tmp_path / "b"), progress=False,
                             checkpoint_name="last-seed1")
    assert res_d.resumed_from == 0 and res_d.steps == 2
    assert RunFolder(tmp_path / "b").load_checkpoint("last-seed1") is not None


def test_training_reduces_loss(small_pairs):
    enc = _encoder(small_pairs)
    sched = ScheduleConfig(policy="bidirectional", total_steps=12)
    res, _ = train_encoder(enc, small_pairs, sched, TrainConfig(steps=12, batch_size=8, lr=2e-3, temperature=0.1),
                           progress=False)
    assert np.mean(res.losses[-3:]) < np.mean(res.losses[:3])


def test_pairs_inputs_codes_events_and_errors(small_pairs):
    from pluribus.data.synthetic import make_synthetic_users

    ds = make_synthetic_users(6, seed=1)
    codes = np.arange(12).reshape(6, 2) % 4
    vocab = [f"<u2qt_{i}>" for i in range(4)]
    p = build_pairs(ds, source="payments", positive="profile", inputs="codes", codes=codes, code_vocab=vocab,
                    query=True)
    assert p.extra_tokens == tuple(vocab)
    assert p.anchors[1].text == "<u2qt_2> <u2qt_3>" and p.anchors[1].query
    assert p.anchors[1].rendered().startswith("<u2qt_2> <u2qt_3>\nQuery:")
    with pytest.raises(DataError, match="codes"):
        build_pairs(ds, source="payments", positive="profile", inputs="codes", codes=codes + 4, code_vocab=vocab)
    with pytest.raises(ShapeError, match="codes"):
        build_pairs(ds, source="payments", positive="profile", inputs="codes", codes=codes[:3], code_vocab=vocab)
    vecs = {str(u): np.ones((5, 3)) for u in ds.user_ids}
    e = build_pairs(ds, source="payments", positive="profile", inputs="events", event_vectors=vecs, max_events=3)
    assert e.anchors[0].text.split() == [EVENT_TOKEN] * 3 and e.anchors[0].events.shape == (3, 3)
    with pytest.raises(ConfigError, match="future"):
        build_pairs(ds, source="payments", positive="future")
    with pytest.raises(ConfigError, match="source"):
        build_pairs(ds, source="nope")


def test_describe_future_movielens_style():
    import pandas as pd

    fut = pd.DataFrame({"genres": ["Drama|Comedy", "Drama"], "rating": [4.0, 3.0], "title": ["A", "B"],
                        "text": ["x", "y"]})
    text = describe_future(fut, "text")
    assert "Drama (67%)" in text and "Average rating 3.5/5." in text and "A; B" in text


def test_training_inside_a_caching_autocast_is_refused(small_pairs):
    # the weight-cast cache would keep serving the first step's weights: the loss could never move
    sched = ScheduleConfig(policy="causal", total_steps=1)
    cfg = TrainConfig(steps=1, batch_size=4, lr=1e-3)
    enc = _encoder(small_pairs)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ConfigError, match="cache_enabled=False"):
        train_encoder(enc, small_pairs, sched, cfg, progress=False)
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        res, _ = train_encoder(enc, small_pairs, sched, cfg, progress=False)
    assert res.steps == 1


def test_future_events_positive_is_the_next_held_out_events(movielens):
    pairs = build_pairs(movielens, source="ratings", positive="future_events", max_events=2, future_events=2)
    uid = pairs.user_ids[0]
    fut = movielens.future["ratings"]
    nxt = fut[fut.user_id == uid].sort_values("timestamp")["text"].astype(str).tolist()[:2]
    assert pairs.positives[0].text == "Next: " + "; ".join(nxt)
    with pytest.raises(ConfigError, match="future_events"):
        build_pairs(movielens, source="ratings", positive="future_events", future_events=0)


def test_batch_diagnostics_on_known_embeddings():
    from pluribus.encoder.loss import batch_diagnostics

    eye = torch.eye(4)
    d = batch_diagnostics(eye, eye)  # orthogonal, each anchor on its positive
    assert d == pytest.approx({"anchor_cosine": 0.0, "positive_cosine": 0.0, "advantage": 1.0, "top1": 1.0})
    same = torch.ones(4, 3)
    d = batch_diagnostics(same, same)  # collapse: every embedding the same vector
    assert d["anchor_cosine"] == pytest.approx(1.0) and d["advantage"] == pytest.approx(0.0)
    shifted = batch_diagnostics(eye, eye.roll(1, dims=0))  # every anchor nearest a wrong positive
    assert shifted["top1"] == 0.0 and shifted["advantage"] < 0
    with pytest.raises(ShapeError):
        batch_diagnostics(eye, eye[:2])


def test_lr_warms_up_then_decays_by_cosine():
    from pluribus.encoder.train import lr_factor

    cfg = TrainConfig(steps=20, lr_warmup_ratio=0.1)
    f = [lr_factor(t, cfg) for t in range(20)]
    assert f[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])  # 2 warm-up steps
    assert all(a >= b for a, b in zip(f[2:], f[3:], strict=False)) and 0 < f[-1] < 0.01
    assert f[11] == pytest.approx(0.5 * (1 + np.cos(np.pi * 9 / 18)))
    flat = TrainConfig(steps=20, lr_warmup_ratio=0.0, lr_schedule="constant")
    assert {lr_factor(t, flat) for t in range(20)} == {1.0}
    with pytest.raises(ConfigError, match="lr_schedule"):
        TrainConfig(lr_schedule="linear")


def test_training_logs_diagnostics_and_is_not_called_collapsed(small_pairs):
    import warnings

    enc = _encoder(small_pairs)
    cfg = TrainConfig(steps=6, batch_size=8, lr=2e-3, temperature=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        res, _ = train_encoder(enc, small_pairs, ScheduleConfig(policy="bidirectional", total_steps=6), cfg,
                               progress=False)
    assert len(res.top1) == len(res.anchor_cosine) == len(res.advantage) == len(res.lrs) == 6
    assert res.lrs[0] < res.lrs[1] and res.chance_loss == pytest.approx(np.log(8))
    assert not res.collapsed and "Collapsed" not in res.summary()


def test_collapse_is_warned_and_reported(small_pairs):
    # a head that maps every user to the same vector: loss exactly ln B, cosines 1
    enc = _encoder(small_pairs)
    with torch.no_grad():
        enc.head[0].weight.zero_()
        enc.head[0].bias.fill_(1.0)
    cfg = TrainConfig(steps=2, batch_size=8, lr=1e-9)
    with pytest.warns(UserWarning, match="collapsed"):
        res, _ = train_encoder(enc, small_pairs, ScheduleConfig(policy="causal", total_steps=2), cfg, progress=False)
    assert res.collapsed and res.losses[-1] == pytest.approx(np.log(8), abs=1e-4)
    assert "**Collapsed**" in res.summary() and res.anchor_cosine[-1] == pytest.approx(1.0)


def test_retrieval_metrics_ranks_ties_against_the_true_positive():
    from pluribus.encoder.metrics import retrieval_metrics

    x = np.eye(12)
    assert retrieval_metrics(x, x) == pytest.approx({"recall@1": 1.0, "recall@10": 1.0, "mrr": 1.0, "users": 12})
    collapsed = retrieval_metrics(np.ones((12, 3)), np.ones((12, 3)))
    assert collapsed["recall@1"] == 0.0 and collapsed["recall@10"] == 0.0 and collapsed["mrr"] == pytest.approx(1 / 12)
    # anchor i is closest to positive i+1, then to its own: every true positive ranks 2nd
    pos = np.eye(12)
    anc = np.roll(np.eye(12), -1, axis=0) * 1.0 + 0.5 * np.eye(12)
    r = retrieval_metrics(anc, pos)
    assert r["recall@1"] == 0.0 and r["recall@10"] == 1.0 and r["mrr"] == pytest.approx(0.5)
    with pytest.raises(ShapeError):
        retrieval_metrics(x, x[:3])


def test_heldout_split_and_retrieval_of_an_encoder(small_pairs):
    from pluribus.encoder.metrics import heldout_retrieval
    from pluribus.encoder.pairs import split_pairs

    train, held = split_pairs(small_pairs, 0.25, seed=3)
    assert held is not None and len(train) == 18 and len(held) == 6
    assert not set(train.user_ids) & set(held.user_ids)
    assert split_pairs(small_pairs, 0.25, seed=3)[1].user_ids == held.user_ids  # depends on the seed only
    assert split_pairs(small_pairs, 0.0) == (small_pairs, None)
    r = heldout_retrieval(_encoder(small_pairs), held)
    assert r["users"] == 6 and 0.0 <= r["recall@1"] <= r["recall@10"] == 1.0 and 1 / 6 <= r["mrr"] <= 1.0
    with pytest.raises(DataError, match="cannot be split"):
        split_pairs(small_pairs.subset(range(3)), 0.2)


def test_future_events_is_the_default_positive_and_missing_events_can_be_an_error(movielens):
    import dataclasses

    from pluribus.encoder.config import PairsConfig

    assert PairsConfig().positive == "future_events"
    few = movielens.subset(movielens.user_ids[:5])
    fut = few.future["ratings"]
    first = str(few.user_ids[0])
    few = dataclasses.replace(few, future={**few.future, "ratings": fut[fut.user_id.astype(str) != first]})
    with pytest.warns(UserWarning, match="skipped"):
        assert first not in build_pairs(few, source="ratings").user_ids
    with pytest.raises(DataError, match=f"user {first} has no held-out events for the 'future_events' positive"):
        build_pairs(few, source="ratings", missing="error")

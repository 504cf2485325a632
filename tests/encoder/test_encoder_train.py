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
    full_cfg = TrainConfig(steps=4, batch_size=4, grad_accum=2, lr=5e-3, checkpoint_every=2)
    enc_a = _encoder(small_pairs)
    res_a, sched_a = train_encoder(enc_a, small_pairs, sched, full_cfg, run=RunFolder(tmp_path / "a"), progress=False)
    assert res_a.steps == 4 and len(res_a.losses) == 4 and all(np.isfinite(res_a.losses))
    assert sched_a.n_updates == 2 * 2  # two warm-up steps x two micro-batches
    assert sched_a.w0 is not None and float(sched_a.w0.std()) > 0  # gradient-shaped W0
    assert res_a.future_weights[-1] > res_a.future_weights[0]

    enc_b = _encoder(small_pairs)
    half = TrainConfig(steps=2, batch_size=4, grad_accum=2, lr=5e-3, checkpoint_every=2)
    train_encoder(enc_b, small_pairs, sched, half, run=RunFolder(tmp_path / "b"), progress=False)
    enc_c = _encoder(small_pairs)
    res_c, _ = train_encoder(enc_c, small_pairs, sched, full_cfg, run=RunFolder(tmp_path / "b"), progress=False)
    assert res_c.resumed_from == 2
    assert res_c.losses == pytest.approx(res_a.losses, rel=1e-4)
    sa, sc = enc_a.trainable_state_dict(), enc_c.trainable_state_dict()
    assert all(torch.allclose(sa[k], sc[k], atol=1e-6) for k in sa)


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

"""Whole-history stage 1: slicing by time and token budget, numeric fields, combine, sharded resumable cache."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
from test_embed import tiny_dataset
from u2qt_helpers import fake_embed

from pluribus.data.schema import SourceSpec, UserDataset
from pluribus.errors import ConfigError, DataError
from pluribus.tokenizer import EmbedConfig, embed_dataset
from pluribus.tokenizer import slices as slices_mod
from pluribus.tokenizer.slices import SliceEmbeddings, embed_slices, slice_source


def words(texts):
    return [len(t.split()) for t in texts]


def test_time_slices_keep_every_event_and_render_numeric_fields():
    cfg = EmbedConfig(event_template="{text}", header="", slice_days=7, numeric_in_text=True, newest_first=False)
    cut = slice_source(tiny_dataset(), "pay", cfg, count_tokens=words, token_limit=3)
    # user a: days 0, 10, 20 -> three 7-day windows; user b: one event
    assert cut.texts == ["bought tea (amount=1)", "bought milk (amount=2)", "bought bread (amount=3)",
                         "bought coffee (amount=4)"]
    assert cut.user.tolist() == [0, 0, 0, 1] and cut.index.tolist() == [0, 1, 2, 0]
    assert cut.report["events"] == 4 and cut.report["events_outside_window"] == 0
    assert cut.report["slices_truncated"] == 0  # 3 words each, within the limit of 3
    long = dataclasses.replace(cfg, slice_days=100)
    one = slice_source(tiny_dataset(), "pay", long, count_tokens=words, token_limit=3)
    assert one.texts[0] == "bought tea (amount=1); bought milk (amount=2); bought bread (amount=3)"
    assert one.report["slices_truncated"] == 1 and one.report["tokens_truncated"] == 6  # reported, not silent


def test_token_budget_packs_events_and_refuses_a_budget_below_one_event():
    cfg = EmbedConfig(event_template="{text}", header="", slice_tokens=4, separator="; ", newest_first=False)
    cut = slice_source(tiny_dataset(), "pay", cfg, count_tokens=words, token_limit=100)
    # each event is 2 words, the separator ';' 1: two events fit in 4 + 1 > 4? 2 + 1 + 2 = 5 > 4 -> one per slice
    assert cut.texts[:3] == ["bought tea", "bought milk", "bought bread"]
    wide = slice_source(tiny_dataset(), "pay", dataclasses.replace(cfg, slice_tokens=5), count_tokens=words,
                        token_limit=100)
    assert wide.texts[:2] == ["bought tea; bought milk", "bought bread"] and wide.index.tolist()[:2] == [0, 1]
    with pytest.raises(ConfigError, match=r"slice_tokens=1 is smaller than one event.*'pay'.*needs 2 tokens"):
        slice_source(tiny_dataset(), "pay", dataclasses.replace(cfg, slice_tokens=1), count_tokens=words)


def test_a_source_whose_every_slice_is_empty_is_an_error():
    ds = UserDataset.build(
        "empty", sources={"pay": pd.DataFrame({"user_id": pd.Series([], dtype=str), "timestamp": pd.Series([], dtype=int),
                                               "text": pd.Series([], dtype=str)})},
        source_specs=[SourceSpec("pay", "text")], user_ids=["a"],
    )
    with pytest.raises(DataError, match="every slice of source 'pay' is empty"):
        slice_source(ds, "pay", EmbedConfig(slice_days=1), count_tokens=words)


def test_mean_and_recency_combine():
    se = SliceEmbeddings("s", np.array([[1.0, 0.0], [0.0, 1.0], [4.0, 4.0]], np.float32),
                         np.array([0, 0, 2]), np.array([0, 1, 0]), 3)
    mean, present = se.combine("mean")
    assert present.tolist() == [True, False, True] and np.allclose(mean[0], [0.5, 0.5]) and np.allclose(mean[2], 4)
    recent, _ = se.combine("recency", half_life=1.0)  # newest weight 1, the one before 0.5
    assert np.allclose(recent[0], [0.5 / 1.5, 1 / 1.5]) and np.allclose(recent[1], 0)


def test_sharded_cache_resumes_after_an_interruption(tmp_path):
    cfg = EmbedConfig(event_template="{text}", header="", slice_days=1, shard_size=2)
    cut = slice_source(tiny_dataset(), "pay", cfg, count_tokens=words, token_limit=50)
    calls = []

    def flaky(texts):
        calls.append(len(texts))
        if len(calls) == 2:
            raise KeyboardInterrupt  # stage 1 stopped during the second shard
        return fake_embed(texts)

    with pytest.raises(KeyboardInterrupt):
        embed_slices(cut, cfg, embed=flaky, cache_dir=tmp_path, progress=False)
    calls.clear()
    done = embed_slices(cut, cfg, embed=lambda t: calls.append(len(t)) or fake_embed(t), cache_dir=tmp_path,
                        progress=True)
    assert calls == [2] and done.report["shards_cached"] == 1  # only the missing shard is embedded
    assert np.allclose(done.vectors, fake_embed(cut.texts))


def test_embed_dataset_with_slices_prints_progress_and_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(slices_mod, "embedder_tokens", lambda cfg: (words, 50))
    monkeypatch.setenv("PLURIBUS_PROGRESS", "1")
    from pluribus.tokenizer import embed as embed_mod

    monkeypatch.setattr(embed_mod, "embed_texts", lambda t, c=None, **k: fake_embed(t))
    reports: dict = {}
    cfg = EmbedConfig(slice_days=7, combine="recency", numeric_in_text=True, shard_size=1)
    emb = embed_dataset(tiny_dataset(), cfg, cache_dir=tmp_path, include_profile=False, reports=reports)
    assert emb.present["pay"].tolist() == [True, True, False] and reports["pay"]["slices"] == 4
    err = capsys.readouterr().err  # plain lines: they show in a log file as well as in a terminal
    assert "embedding pay: 4/4 slices" in err and "stage 1 pay: 4 events in 4 slices" in err
    with pytest.raises(ConfigError, match="sequence"):
        embed_dataset(tiny_dataset(), dataclasses.replace(cfg, combine="sequence"), include_profile=False)

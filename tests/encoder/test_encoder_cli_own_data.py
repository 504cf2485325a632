"""The encoder CLI's own-data rules: the source is chosen from the data, the future is held out of the history."""

from __future__ import annotations

import pytest
from test_encoder_resume import T0, write_own_data

from pluribus.encoder.cli import _choose_source, _prepared
from pluribus.encoder.config import GGSMConfig, PairsConfig
from pluribus.encoder.pairs import hold_out_future
from pluribus.errors import ConfigError


def test_last_k_and_cut_off_move_the_future_out_of_the_history(tmp_path):
    from pluribus.data.store import load_jsonl

    ds = load_jsonl(write_own_data(tmp_path / "mine.jsonl", users=5, events=7))
    assert _choose_source(ds, None) == "clicks"
    held = hold_out_future(ds, "clicks", 2, None)
    for uid, fut in held.future["clicks"].groupby("user_id"):
        hist = held.sources["clicks"][held.sources["clicks"]["user_id"] == uid]
        assert len(fut) == 2 and len(hist) == 5 and hist["timestamp"].max() < fut["timestamp"].min()
    assert len(ds.sources["clicks"]) == 35  # the loaded data set is not changed
    cut = hold_out_future(ds, "clicks", None, str(T0 + 600 * 5))
    assert (cut.future["clicks"]["timestamp"] >= T0 + 3000).all() and len(cut.future["clicks"]) == 10
    assert (cut.sources["clicks"]["timestamp"] < T0 + 3000).all()


def test_the_future_defaults_to_the_last_future_events_and_is_recorded(tmp_path):
    path = write_own_data(tmp_path / "mine.jsonl", users=5, events=7)
    cfg, ds = _prepared(GGSMConfig(pairs=PairsConfig(data=str(path), future_events=4)), strict=True)
    assert cfg.pairs.source == "clicks" and cfg.pairs.future_last == 4
    assert len(ds.future["clicks"]) == 20
    profile, ds2 = _prepared(GGSMConfig(pairs=PairsConfig(data=str(path), positive="profile")))
    assert profile.pairs.future_last is None and not ds2.future  # a profile positive needs no future


def test_several_sources_need_a_choice():
    from pluribus.data.synthetic import make_synthetic_users

    ds = make_synthetic_users(10, seed=0)
    with pytest.raises(ConfigError, match="several sources.*--source"):
        _choose_source(ds, None)
    assert _choose_source(ds, "apps") == "apps"

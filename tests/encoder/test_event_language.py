"""The event language (rendering, vocabulary cap, future hold-out), the cached pretrained decoder, and errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pluribus.data.schema import SourceSpec, TaskSpec, UserDataset
from pluribus.encoder.event_language import (
    NO_HISTORY,
    UNKNOWN,
    PretrainSettings,
    event_pairs,
    fit_language,
    history_texts,
    pretrain,
    vehicle,
    with_future,
)
from pluribus.errors import ConfigError, DataError

TINY = PretrainSettings(steps=3, hidden=16, layers=1, heads=2, kv_heads=1, intermediate=32, window=16, batch=4,
                        min_tokens=4)


def movielens_like(users: int = 12, events: int = 8, future: int = 3, seed: int = 0) -> UserDataset:
    """A small frame shaped like MovieLens ratings: text, rating (float, 1-5), item_id (str), held-out future."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        for k in range(events + future):
            item = int(rng.integers(1, 30))
            rows.append({"user_id": f"u{u}", "timestamp": 1000 + k, "text": f"movie {item}",
                         "rating": float(rng.integers(1, 6)), "item_id": str(item)})
    frame = pd.DataFrame(rows)
    last = frame.groupby("user_id").cumcount(ascending=False) < future
    labels = pd.DataFrame({"likes": [u % 2 for u in range(users)]}, index=[f"u{u}" for u in range(users)])
    return UserDataset.build("ml-like", sources={"ratings": frame[~last]},
                             source_specs=[SourceSpec("ratings", "text", ("rating",))],
                             labels=labels, tasks=[TaskSpec("likes")], future={"ratings": frame[last]})


def test_movielens_ratings_render_as_item_and_rating_words():
    ds = movielens_like()
    lang = fit_language(ds)
    assert lang.source == "ratings" and lang.identity == "item_id" and lang.identity_kind == "item"
    words = lang.words()
    items = sorted({int(x) for x in ds.sources["ratings"]["item_id"]} | {int(x) for x in ds.future["ratings"]["item_id"]})
    assert words == [f"r{r}" for r in range(1, 6)] + [f"i{i}" for i in items]  # numbers by value, not as strings
    frame = ds.events_by_user("ratings")["u0"]
    want = " ".join(f"i{i} r{int(r)}" for i, r in zip(frame["item_id"], frame["rating"], strict=True))
    assert lang.render(frame) == want
    assert lang.render(frame, 2) == " ".join(want.split()[-4:])
    assert lang.render(frame, 2, first=True) == " ".join(want.split()[:4])
    assert history_texts(ds, lang)["u0"] == want
    assert UNKNOWN not in words


def test_vocabulary_cap_maps_rare_values_to_one_unknown_word():
    ds = movielens_like()
    counts = pd.concat([ds.sources["ratings"]["item_id"], ds.future["ratings"]["item_id"]]).value_counts()
    lang = fit_language(ds, vocabulary=3)
    assert len(lang.items) == 3 and lang.unknown and lang.words()[-1] == UNKNOWN
    assert set(lang.items) <= set(counts.index[counts >= counts.iloc[2]])  # the most frequent kept
    rendered = lang.render(ds.sources["ratings"]).split()[::2]
    assert set(rendered) <= {f"i{v}" for v in lang.items} | {UNKNOWN} and UNKNOWN in rendered


def test_text_identity_and_binned_numbers_on_synthetic(synthetic):
    lang = fit_language(synthetic, "payments", bins=4)
    assert lang.identity == "text" and lang.identity_kind == "text"
    (amount,) = lang.numeric
    assert amount.prefix == "a" and not amount.values and 1 <= len(amount.edges) <= 3  # many values: binned
    text = lang.render(synthetic.events_by_user("payments")[str(synthetic.user_ids[0])], 3).split()
    assert len(text) == 6 and all(w.startswith("i") for w in text[::2]) and all(w.startswith("aq") for w in text[1::2])
    # the most frequent text value is word i0; every word is in the vocabulary
    top = synthetic.sources["payments"]["text"].value_counts().index[0]
    assert lang.items[0] == top
    assert set(lang.render(synthetic.sources["payments"]).split()) <= set(lang.words())
    # a field with few values renders its value; a shared first letter falls back to the field's name
    searches = fit_language(synthetic, "searches")
    assert searches.numeric == () and searches.render(synthetic.sources["searches"].iloc[:1]).startswith("i")


def test_prefix_collision_uses_field_names():
    frame = pd.DataFrame({"user_id": ["a", "a", "b"], "timestamp": [1, 2, 3], "n_x": [1.0, 2.0, 1.0],
                          "n_y": [0.0, 1.0, 1.0], "item_id": ["7", "8", "7"]})
    ds = UserDataset.build("two-n", sources={"s": frame}, source_specs=[SourceSpec("s", None, ("n_x", "n_y"))])
    lang = fit_language(ds)
    assert lang.render(frame.iloc[:1]) == "i7 n_x=1 n_y=0"


def test_language_round_trips_through_json(synthetic):
    lang = fit_language(synthetic, "apps", vocabulary=5)
    again = type(lang).from_json(lang.to_json())
    assert again == lang and again.words() == lang.words()
    frame = synthetic.sources["apps"]
    assert again.render(frame) == lang.render(frame)


def test_history_without_future_holds_out_the_last_events(synthetic):
    ds = with_future(synthetic, "payments", 4)
    assert len(ds.future["payments"]) == 4 * synthetic.n_users
    assert len(ds.sources["payments"]) + len(ds.future["payments"]) == len(synthetic.sources["payments"])
    lang = fit_language(ds, "payments")
    pairs, inputs, ids = event_pairs(ds, lang, history_events=5, future_events=4)
    assert len(inputs) == len(ids) == synthetic.n_users and ids == [str(u) for u in synthetic.user_ids]
    assert len(pairs) == synthetic.n_users
    assert all(len(p.text.split()) == 8 for p in pairs.positives) and all(len(a.text.split()) == 10 for a in pairs.anchors)
    full = synthetic.events_by_user("payments")[pairs.user_ids[0]]
    assert pairs.positives[0].text == lang.render(full, 4)  # the last 4 events, moved out of the history
    assert ds is with_future(ds, "payments", 4)  # a data set with a future keeps it


def test_users_without_history_get_a_placeholder_and_no_pair():
    ds = movielens_like()
    hist = ds.sources["ratings"]
    ds.sources["ratings"] = hist[hist["user_id"] != "u3"].reset_index(drop=True)
    pairs, inputs, ids = event_pairs(ds, fit_language(ds))
    assert inputs[ids.index("u3")] == NO_HISTORY and "u3" not in pairs.user_ids and "u3" in pairs.skipped


def test_clear_errors_for_bad_sources_futures_and_too_few_users(tmp_path, synthetic):
    with pytest.raises(ConfigError, match="'nope' is not a source"):
        fit_language(synthetic, "nope")
    empty = synthetic.subset(synthetic.user_ids.tolist())
    empty.sources["payments"] = empty.sources["payments"].iloc[:0]
    with pytest.raises(ConfigError, match="'payments' .* has no events"):
        fit_language(empty, "payments")
    with pytest.raises(DataError, match="holds out no future events of source 'payments'"):
        event_pairs(synthetic, fit_language(synthetic, "payments"))
    with pytest.raises(ConfigError, match="future_events must be >= 1"):
        with_future(synthetic, "payments", 0)
    ds = movielens_like()
    hist, fut = ds.sources["ratings"], ds.future["ratings"]
    ds.sources["ratings"], ds.future["ratings"] = hist[hist["user_id"] == "u0"], fut[fut["user_id"] != "u0"]
    with pytest.raises(DataError, match="positive is empty for everyone"):
        event_pairs(ds, fit_language(ds))
    with pytest.raises(DataError, match="needs >= 10"):
        vehicle(movielens_like(users=6), tmp_path / "cache", settings=TINY, progress=False)
    assert not (tmp_path / "cache").exists()  # refused before any pretraining


def test_pretrain_is_cached_by_data_and_settings_and_never_uses_a_half_written_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PLURIBUS_PROGRESS", "1")
    ds = movielens_like()
    lang = fit_language(ds)
    losses: list[float] = []
    folder = pretrain(ds, lang, tmp_path, TINY, log=losses)
    assert "pretraining the event-language decoder" in capsys.readouterr().err  # a progress line outside a terminal
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert {"config.json", "language.json", "pretrain.json"} <= {p.name for p in folder.iterdir()}
    stamp = (folder / "pretrain.json").stat().st_mtime_ns
    again: list[float] = []
    assert pretrain(ds, lang, tmp_path, TINY, progress=False, log=again) == folder  # warm: reused as is
    assert again == losses and (folder / "pretrain.json").stat().st_mtime_ns == stamp
    other = pretrain(ds, lang, tmp_path, PretrainSettings(**{**TINY.__dict__, "seed": 1}), progress=False)
    assert other != folder  # other settings, other folder
    fewer = pretrain(ds.subset(ds.user_ids[:11]), fit_language(ds), tmp_path, TINY, progress=False)
    assert fewer not in (folder, other)  # other data, other folder
    # a folder without its closing pretrain.json (half-written by hand or a crash) is replaced, not used
    (folder / "pretrain.json").unlink()
    (folder / "config.json").write_text("{broken")
    rebuilt = pretrain(ds, lang, tmp_path, TINY, progress=False)
    assert rebuilt == folder and (folder / "pretrain.json").exists() and (folder / "config.json").read_text() != "{broken"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_vehicle_builds_an_encoder_over_the_pretrained_decoder(tmp_path):
    from pluribus.encoder import UserEncoder

    ds = movielens_like(users=15)
    v = vehicle(ds, tmp_path, settings=TINY, history_events=4, future_events=3, progress=False)
    assert not v.cached and len(v.train) + len(v.held) == 15 and len(v.held) == 3
    assert set(v.train.user_ids).isdisjoint(v.held.user_ids)
    assert len(v.inputs) == 15 and v.user_ids == [str(u) for u in ds.user_ids]
    encoder = UserEncoder(v.config)
    x = encoder.encode(v.inputs, progress=False)
    assert x.shape == (15, TINY.hidden) and np.isfinite(x).all()
    assert vehicle(ds, tmp_path, settings=TINY, history_events=4, future_events=3, progress=False).cached


@pytest.mark.slow
def test_a_few_training_steps_beat_an_untrained_copy_on_held_out_users(tmp_path, movielens):
    import torch

    from pluribus.encoder import ScheduleConfig, TrainConfig, UserEncoder
    from pluribus.encoder.metrics import heldout_retrieval
    from pluribus.encoder.train import train_encoder

    ds = movielens.subset(movielens.user_ids[:300].tolist())
    settings = PretrainSettings(steps=60, hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128)
    v = vehicle(ds, tmp_path, settings=settings, progress=False)
    torch.manual_seed(0)
    untrained = heldout_retrieval(UserEncoder(v.config), v.held)
    torch.manual_seed(0)
    encoder = UserEncoder(v.config)
    train_encoder(encoder, v.train, ScheduleConfig(total_steps=60), TrainConfig(steps=60, batch_size=32, lr=1e-3),
                  progress=False)
    trained = heldout_retrieval(encoder, v.held)
    print("held-out Recall@10: trained", trained["recall@10"], "untrained", untrained["recall@10"])
    assert trained["recall@10"] > untrained["recall@10"] + 0.05, (trained, untrained)

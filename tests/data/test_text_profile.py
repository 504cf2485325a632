"""A profile column may hold texts (a category such as a user's institution): kept, stored and named, never fed
to a model as a number; institutions can be named by it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_bad_input.userdata import good_records, write_records  # tests/ is on the path (rootdir layout)
from pluribus.cli import main
from pluribus.data.features import simple_features
from pluribus.data.store import load_user_data, save_dataset
from pluribus.errors import DataError


def _records() -> list[dict]:
    records = good_records()
    for i, r in enumerate(records):
        r["profile"]["hospital"] = ("north", "south", "east")[(i // 2) % 3]
    return records


def test_a_text_profile_column_loads_round_trips_and_is_no_feature(tmp_path: Path) -> None:
    ds = load_user_data(write_records(tmp_path / "users.jsonl", _records()))
    assert list(ds.profile.columns) == ["age", "tenure", "hospital"]
    assert ds.profile.loc["u02", "hospital"] == "south"
    assert list(ds.numeric_profile().columns) == ["age", "tenure"]
    assert simple_features(ds).shape == (24, 2)  # the institution's name is not a number to learn from
    save_dataset(ds, tmp_path / "folder")
    again = load_user_data(str(tmp_path / "folder"))
    assert again.profile["hospital"].tolist() == ds.profile["hospital"].tolist()


def test_a_column_mixing_texts_and_numbers_is_refused_naming_the_line(tmp_path: Path) -> None:
    records = _records()
    records[4]["profile"]["hospital"] = 7
    with pytest.raises(DataError, match=r"users.jsonl:5, field .profile\.hospital.: value 7 \(expected a text"):
        load_user_data(write_records(tmp_path / "users.jsonl", records))


def test_institutions_named_by_a_text_profile_column(tmp_path: Path, capsys) -> None:
    data = write_records(tmp_path / "users.jsonl", _records())
    out = tmp_path / "fed"
    assert main(["fed", "prepare", str(data), "--out", str(out), "--tasks", "churn,plan",
                 "--institution-column", "hospital", "--steps", "2"]) == 0
    plan = json.loads((out / "institutions.json").read_text())
    assert [i["institution"] for i in plan["institutions"]] == ["east", "north", "south"]
    assert [i["users"] for i in plan["institutions"]] == [8, 8, 8]
    assert "institution 'north'" in capsys.readouterr().out

"""Every bad input gets a DataError naming the file, the line and the field."""

import json

import pandas as pd
import pytest

from pluribus.data.store import load_dataset_folder, load_jsonl, load_user_data, save_dataset, save_jsonl
from pluribus.errors import DataError


def _user(uid, **overrides):
    record = {
        "user_id": uid,
        "sources": {"payments": [{"timestamp": 1700000000 + i, "text": f"paid at shop {i}", "amount": 10.0 + i}
                                 for i in range(3)]},
        "profile": {"age": 30},
        "labels": {"churn": int(uid[-1]) % 2},
    }
    record.update(overrides)
    return record


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_roundtrip_jsonl_and_folder(tmp_path, synthetic):
    path = save_jsonl(synthetic, tmp_path / "users.jsonl")
    back = load_jsonl(path)
    assert back.n_users == synthetic.n_users
    assert back.source_specs == synthetic.source_specs
    assert back.labels.astype(str).equals(synthetic.labels.astype(str))
    folder = save_dataset(synthetic, tmp_path / "folder")
    again = load_dataset_folder(folder)
    pd.testing.assert_frame_equal(again.source("payments"), synthetic.source("payments"))
    assert again.summary()["labels"] == synthetic.summary()["labels"]


def test_schema_is_inferred_without_sidecar(tmp_path):
    path = _write(tmp_path / "u.jsonl", [_user("u1"), _user("u2")])
    ds = load_jsonl(path)
    spec = ds.source_specs["payments"]
    assert spec.text_field == "text" and spec.numeric_fields == ("amount",)
    assert ds.tasks["churn"].kind == "binary"


def test_malformed_json_line(tmp_path):
    path = _write(tmp_path / "u.jsonl", [_user("u1"), '{"user_id": "u2", "sources": ', _user("u3")])
    with pytest.raises(DataError) as err:
        load_jsonl(path)
    assert err.value.line == 2 and str(path) in str(err.value) and "malformed JSON" in str(err.value)


def test_wrong_type_names_line_and_field(tmp_path):
    bad = _user("u2")
    bad["sources"]["payments"][1]["amount"] = "ten"
    path = _write(tmp_path / "u.jsonl", [_user("u1"), bad])
    with pytest.raises(DataError) as err:
        load_jsonl(path)
    assert err.value.line == 2
    assert err.value.field == "sources.payments[1].amount"
    assert "expected a finite number" in str(err.value)


def test_missing_field_names_line_and_field(tmp_path):
    bad = _user("u2")
    del bad["sources"]["payments"][0]["timestamp"]
    path = _write(tmp_path / "u.jsonl", [_user("u1"), bad])
    with pytest.raises(DataError) as err:
        load_jsonl(path)
    assert (err.value.line, err.value.field) == (2, "sources.payments[0].timestamp")


def test_missing_user_id_and_duplicates(tmp_path):
    no_id = _user("u2")
    del no_id["user_id"]
    with pytest.raises(DataError, match="missing user id") as err:
        load_jsonl(_write(tmp_path / "a.jsonl", [_user("u1"), no_id]))
    assert err.value.line == 2
    with pytest.raises(DataError, match="duplicate user 'u1' \\(first on line 1\\)"):
        load_jsonl(_write(tmp_path / "b.jsonl", [_user("u1"), _user("u1")]))


def test_unknown_source_name_against_schema(tmp_path, synthetic):
    path = save_jsonl(synthetic.subset(synthetic.user_ids[:10]), tmp_path / "u.jsonl")
    lines = path.read_text().splitlines()
    record = json.loads(lines[4])
    record["sources"]["paymnets"] = record["sources"].pop("payments")
    lines[4] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        load_jsonl(path)
    assert err.value.line == 5 and err.value.field == "sources.paymnets"
    assert "unknown source 'paymnets'" in str(err.value) and "payments" in str(err.value)


def test_label_with_one_class(tmp_path):
    records = [_user(f"u{i}", labels={"churn": 1}) for i in range(4)]
    with pytest.raises(DataError) as err:
        load_jsonl(_write(tmp_path / "u.jsonl", records))
    assert err.value.field == "labels.churn"
    assert "one class only" in str(err.value) and "u.jsonl" in str(err.value)


def test_label_type_changes_midway(tmp_path):
    records = [_user("u1"), _user("u2", labels={"churn": "yes"})]
    with pytest.raises(DataError) as err:
        load_jsonl(_write(tmp_path / "u.jsonl", records))
    assert (err.value.line, err.value.field) == (2, "labels.churn")


def test_missing_column_in_folder(tmp_path, synthetic):
    folder = save_dataset(synthetic, tmp_path / "folder")
    frame = pd.read_parquet(folder / "sources" / "payments.parquet").drop(columns=["amount"])
    frame.to_parquet(folder / "sources" / "payments.parquet", index=False)
    with pytest.raises(DataError) as err:
        load_dataset_folder(folder)
    assert err.value.field == "amount" and "payments.parquet" in str(err.value)


def test_unknown_source_file_in_folder(tmp_path, synthetic):
    folder = save_dataset(synthetic, tmp_path / "folder")
    (folder / "sources" / "payments.parquet").rename(folder / "sources" / "paymnets.parquet")
    with pytest.raises(DataError, match="unknown source 'paymnets'"):
        load_dataset_folder(folder)


def test_wrong_type_in_folder_names_row(tmp_path, synthetic):
    folder = save_dataset(synthetic, tmp_path / "folder")
    frame = pd.read_parquet(folder / "sources" / "payments.parquet")
    frame["amount"] = frame["amount"].astype(str)
    frame.loc[7, "amount"] = "n/a"
    frame.to_parquet(folder / "sources" / "payments.parquet", index=False)
    with pytest.raises(DataError) as err:
        load_dataset_folder(folder)
    assert err.value.field == "payments.amount" and err.value.row == 7


def test_failed_save_leaves_nothing(tmp_path, synthetic, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", boom)
    with pytest.raises(OSError):
        save_dataset(synthetic, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_unknown_path_and_format(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        load_user_data(tmp_path / "missing.parquet")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown data format"):
        load_user_data(tmp_path / "x.csv")

import numpy as np
import pandas as pd
import pytest

from pluribus.data.movielens import GENRES, load_movielens, movielens_tables
from pluribus.errors import DataError


def test_real_files_load_as_multi_source_users(movielens):
    ds = movielens
    assert ds.n_users == 943
    assert ds.source_names == ["ratings", "activity", "knowledge"]
    total = len(ds.source("ratings")) + len(ds.future["ratings"])
    assert total == 100_000
    assert ds.meta["items"] == 1682
    # every user keeps history and has a held-out future of about 20%
    hist = ds.source("ratings").groupby("user_id").size()
    fut = ds.future["ratings"].groupby("user_id").size()
    assert (hist >= 15).all() and (fut >= 4).all()
    share = fut / (hist + fut)
    assert share.between(0.2, 0.26).all()


def test_future_events_come_after_history(movielens):
    hist_last = movielens.source("ratings").groupby("user_id")["timestamp"].max()
    fut_first = movielens.future["ratings"].groupby("user_id")["timestamp"].min()
    assert (hist_last <= fut_first.reindex(hist_last.index)).all()


def test_demographics_are_labels_never_inputs(movielens):
    for name in movielens.source_names:
        columns = set(movielens.source(name).columns)
        assert not columns & {"age", "gender", "occupation", "zip_code"}
    assert not set(movielens.profile.columns) & {"age", "gender", "occupation"}
    tables = movielens_tables()
    users = tables["user"].set_index("user_id")
    female = (users["gender"] == "F").reindex(movielens.user_ids)
    mask, y = movielens.label_array("gender")
    assert mask.all() and np.array_equal(y == 1, female.to_numpy())
    mask, y = movielens.label_array("age_35plus")
    assert np.array_equal(y == 1, (users["age"].astype(int) >= 35).reindex(movielens.user_ids).to_numpy())


def test_tasks_have_both_classes(movielens):
    summary = movielens.summary()
    assert set(summary["labels"]) >= {"gender", "age_35plus", "occupation_student", "occupation_group",
                                      "future_drama", "future_comedy", "future_action", "future_high_rating"}
    for lab in summary["labels"].values():
        assert len(lab["balance"]) >= 2
        assert max(lab["balance"].values()) < 0.85


def test_rating_text_and_profile(movielens):
    row = movielens.source("ratings").iloc[0]
    assert row["text"].endswith(f"rated {int(row['rating'])}/5")
    assert "[" in row["text"]
    assert set(row["genres"].split("|")) <= set(GENRES)
    profile = movielens.profile
    assert profile.shape == (943, 28)
    np.testing.assert_allclose(profile.filter(like="share_rating_").sum(axis=1), 1.0, atol=1e-9)


def _write_grouplens(folder):
    """Six users, eight movies, genres cycling Action/Drama/Comedy, in GroupLens's original layout."""
    folder.mkdir()
    rows = []
    for u in range(1, 7):
        for k in range(5):
            item = (u + k) % 8 + 1
            rows.append(f"{u}\t{item}\t{(u + item) % 5 + 1}\t{880000000 + 1000 * (10 * u + k)}\n")
    (folder / "u.data").write_text("".join(rows))
    genre_column = {0: 1, 1: 8, 2: 5}  # Action, Drama, Comedy among the 19 GroupLens flags
    items = []
    for i in range(1, 9):
        flags = ["0"] * 19
        flags[genre_column[i % 3]] = "1"
        items.append(f"{i}|Movie {i} (199{i})|01-Jan-199{i}||http://x|{'|'.join(flags)}\n")
    (folder / "u.item").write_text("".join(items), encoding="latin-1")
    (folder / "u.user").write_text(
        "1|24|M|student|1\n2|53|F|other|2\n3|33|M|engineer|3\n4|40|F|writer|4\n5|19|F|student|5\n6|61|M|retired|6\n"
    )


def test_grouplens_layout_reads_the_same_way(tmp_path):
    folder = tmp_path / "ml-100k"
    _write_grouplens(folder)
    ds = load_movielens(folder)
    assert ds.n_users == 6 and len(ds.future["ratings"]) == 6  # one held-out rating of five per user
    assert "knowledge" not in ds.source_names  # no KG files in the GroupLens layout
    first = ds.source("ratings").iloc[0]
    assert (first["title"], first["year"], first["genres"]) == ("Movie 2", "1992", "Comedy")
    assert first["text"] == f"Movie 2 (1992) [Comedy] rated {int(first['rating'])}/5"


def test_missing_folder_names_the_fix(tmp_path):
    with pytest.raises(DataError, match="no MovieLens-100K files here"):
        load_movielens(tmp_path)


def test_corrupt_atomic_file_names_file_line_and_field(tmp_path):
    from pluribus.data.movielens import movielens_dir

    src = movielens_dir()
    for kind in ("inter", "item", "user"):
        lines = (src / f"ml-100k.{kind}").read_text(encoding="utf-8").splitlines()
        if kind == "inter":
            lines[3] = "196\t242\tfive\t881250949"
        (tmp_path / f"ml-100k.{kind}").write_text("\n".join(lines[:200]) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_movielens(tmp_path)
    assert "ml-100k.inter:4" in str(err.value) and "'rating'" in str(err.value)


def test_bad_future_fraction():
    with pytest.raises(DataError, match="future_fraction"):
        load_movielens(future_fraction=1.5)


def test_tables_are_clean():
    tables = movielens_tables()
    assert list(tables["inter"].columns) == ["user_id", "item_id", "rating", "timestamp"]
    assert pd.api.types.is_integer_dtype(tables["inter"]["timestamp"])
    assert {"kg", "link"} <= set(tables)

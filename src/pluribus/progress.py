"""Progress on stderr for long work: a bar with rate and ETA in a terminal, plain lines elsewhere.

In a pipe or a log file a bar cannot redraw, so progress prints lines instead, and never stays silent for
longer than ``PLURIBUS_PROGRESS_INTERVAL`` seconds (default 30): a background timer prints "still working"
while one slow item (or an un-metered stretch inside ``heartbeat``) runs. PLURIBUS_PROGRESS=0 turns it off.

The libraries pluribus calls draw their own tqdm bars (transformers' "Loading weights", huggingface_hub's
downloads, sentence-transformers' batches); ``quiet_library_bars`` turns them off unless progress is on and
stderr is a terminal, so PLURIBUS_PROGRESS=0 silences every bar and a log file never gets carriage returns.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
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
_lock = threading.Lock()
_last_line = [time.monotonic()]  # when progress last printed a line (any thread)


def progress_enabled() -> bool:
    """True unless the environment turned progress off (PLURIBUS_PROGRESS=0)."""
    return os.environ.get("PLURIBUS_PROGRESS", "1") not in {"0", "false", "no"}


def library_bars_allowed() -> bool:
    """Whether a library may draw its own (carriage-return) bar: progress is on and stderr is a terminal."""
    return progress_enabled() and _console.is_terminal


def quiet_library_bars() -> None:
    """Turn off the tqdm bars of transformers, huggingface_hub and tqdm itself unless ``library_bars_allowed()``.

    Call it after importing the library and before the call that would draw (e.g. loading a model); the
    environment variables also reach libraries imported later and child processes.
    """
    if library_bars_allowed():
        return
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TQDM_DISABLE"] = "1"  # read by tqdm when it is first imported
    for module, switch in (("transformers.utils.logging", "disable_progress_bar"),
                           ("huggingface_hub.utils", "disable_progress_bars")):
        loaded = sys.modules.get(module)
        if loaded is not None and hasattr(loaded, switch):
            getattr(loaded, switch)()


def line_interval() -> float:
    """Longest silence, in seconds, outside a terminal (PLURIBUS_PROGRESS_INTERVAL, default 30)."""
    try:
        value = float(os.environ.get("PLURIBUS_PROGRESS_INTERVAL", "30"))
    except ValueError:
        return 30.0
    return value if value > 0 else 30.0


def _say(text: str) -> None:
    with _lock:
        _console.print(text, markup=False, highlight=False, soft_wrap=True)
        _last_line[0] = time.monotonic()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


@contextmanager
def _timer(status: Callable[[], str]) -> Iterator[None]:
    """Print ``status()`` whenever no progress line has been printed for the interval, until the block ends."""
    interval = line_interval()
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(min(interval, 1.0)):
            if time.monotonic() - _last_line[0] >= interval:
                _say(status())

    thread = threading.Thread(target=beat, name="pluribus-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextmanager
def heartbeat(description: str) -> Iterator[None]:
    """Outside a terminal, print '<description>: still working (elapsed)' at least every interval in the block."""
    if not progress_enabled() or _console.is_terminal:
        yield
        return
    start = time.monotonic()
    with _timer(lambda: f"{description}: still working, {_clock(time.monotonic() - start)} elapsed"):
        yield


def track(iterable: Iterable[T], *, total: int | None = None, description: str = "working") -> Iterator[T]:
    """Iterate with progress on stderr: a bar with count, rate and ETA in a terminal, timed lines elsewhere."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if not progress_enabled():
        yield from iterable
        return
    if not _console.is_terminal:
        yield from _track_lines(iterable, total, description)
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


def _track_lines(iterable: Iterable[T], total: int | None, description: str) -> Iterator[T]:
    start = time.monotonic()
    done = [0]

    def status() -> str:
        elapsed = time.monotonic() - start
        count = f"{done[0]}/{total}" if total else str(done[0])
        text = f"{description}: {count}"
        if total:
            text += f" ({done[0] / total:.0%})"
        text += f", {_clock(elapsed)} elapsed"
        if done[0] and elapsed > 0:
            text += f", {done[0] / elapsed:.2f}/s"
            if total:
                text += f", eta {_clock((total - done[0]) * elapsed / done[0])}"
        return text

    _say(status())
    with _timer(status):
        for item in iterable:
            yield item
            done[0] += 1
    _say(status())

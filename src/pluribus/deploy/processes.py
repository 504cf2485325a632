"""Start a Flower binary in its own session with a log file, wait for a line in that log, keep it in the
foreground until stopped. Every process is stopped by its PID (its session), every wait has a deadline."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType

from pluribus.errors import PluribusError
from pluribus.flower_engines import child_env, stop_processes, tail


def flower_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a Flower process: this venv first, one thread, its own FLWR_HOME (where Flower keeps
    installed apps: never the user's ~/.flwr).

    Args:
        home: the process's FLWR_HOME.
        extra: further environment variables.
    """
    home.mkdir(parents=True, exist_ok=True)
    return {**child_env(), "FLWR_HOME": str(home), **(extra or {})}


def start_logged(args: Sequence[str], log: Path, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """Start ``args`` in a new session, stdout and stderr appended to ``log``.

    Args:
        args: the command line.
        log: the log file (appended to).
        env: the environment.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        return subprocess.Popen(list(args), stdout=fh, stderr=subprocess.STDOUT, env=dict(env),
                                start_new_session=True)


def wait_for(proc: subprocess.Popen[bytes], ready: Callable[[], bool], timeout_s: float, *,
             on_exit: Callable[[int], str], on_timeout: str) -> None:
    """Poll ``ready()`` until it holds; PluribusError with ``on_exit(returncode)`` if ``proc`` ends first or
    ``on_timeout`` after ``timeout_s`` (the process is then stopped).

    Args:
        proc: the process waited for.
        ready: returns True once it is ready.
        timeout_s: how long to wait.
        on_exit: the error message for an exit code.
        on_timeout: the error message for a timeout.

    Raises:
        PluribusError: the process ended first or was not ready in time.
    """
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None:
            raise PluribusError(on_exit(int(proc.returncode)))
        if time.monotonic() > deadline:
            stop_processes([proc])
            raise PluribusError(on_timeout)
        time.sleep(0.2)


def log_has(log: Path, text: str, start: int = 0) -> bool:
    """Whether ``log`` (from byte ``start``) contains ``text``.

    Args:
        log: the log file.
        text: the text looked for.
        start: the byte offset to search from.
    """
    try:
        with open(log, "rb") as fh:
            fh.seek(start)
            return text.encode() in fh.read()
    except OSError:
        return False


def log_size(log: Path) -> int:
    """The size of ``log`` now (0 if absent): where a fresh start's lines begin.

    Args:
        log: the log file.
    """
    try:
        return log.stat().st_size
    except OSError:
        return 0


class _Stop(Exception):
    pass


def serve_until_stopped(procs: list[subprocess.Popen[bytes]], *, what: str, log: Path,
                        max_s: float | None = None) -> None:
    """Keep ``procs`` running until SIGINT/SIGTERM (or ``max_s`` seconds), then stop them by PID. If one ends
    by itself, PluribusError naming ``what`` and its exit code (the log tail is in ``log``).

    Args:
        procs: the processes kept running.
        what: what they are (named in messages).
        log: their log file.
        max_s: stop after this many seconds (None: only on a signal).

    Raises:
        PluribusError: a process ended by itself.
    """
    def stop(signum: int, frame: FrameType | None) -> None:
        raise _Stop

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    deadline = None if max_s is None else time.monotonic() + max_s
    try:
        while deadline is None or time.monotonic() < deadline:
            for p in procs:
                if p.poll() is not None:
                    last = " ".join(tail(log, 400).split())
                    raise PluribusError(f"{what} stopped by itself (exit {p.returncode}); see {log}: ...{last[-200:]}")
            time.sleep(0.5)
    except _Stop:
        pass
    finally:
        for s in previous:  # a second Ctrl-C must not cut the stopping short
            signal.signal(s, signal.SIG_IGN)
        stop_processes(procs)
        for s, handler in previous.items():
            signal.signal(s, handler)


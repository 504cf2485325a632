"""Every bad input, across every command group: exit status 2, one line naming where and what, no traceback,
and nothing left behind (the case's folder is byte-for-byte as it was)."""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

import pytest

from cli_bad_input.cases import ALL, Case, file_content
from cli_bad_input.userdata import good_records, write_records
from pluribus.cli import main

READ_ONLY = "/sys"  # not writable even by root
# A bad input is refused at once; a case that runs longer was accepted and started real work.
CASE_SECONDS = float(os.environ.get("PLURIBUS_BAD_INPUT_SECONDS", "60"))


class CaseTookTooLong(BaseException):
    """Raised by the alarm (a BaseException, so no `except Exception` in the command swallows it)."""


def _alarm(signum, frame):
    raise CaseTookTooLong(f"still running after {CASE_SECONDS:g} s: the bad input was accepted")


def _prepare(case: Case, folder: Path) -> None:
    records = good_records()
    write_records(folder / "good.jsonl", records)
    if case.bad is not None:
        write_records(folder / case.name, case.bad(records))
    for name, value in case.files.items():
        content = file_content(value)
        target = folder / name
        if content is None:
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
    if case.setup is not None:
        case.setup(folder)


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` with a digest of its bytes (folders as '/')."""
    return {
        str(p.relative_to(folder)): "/" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
    }


def test_the_table_is_large_and_ids_are_unique():
    ids = [c.id for c in ALL]
    assert len(ids) >= 100 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("case", ALL, ids=[c.id for c in ALL])
def test_bad_input(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    folder = tmp_path / "case"
    folder.mkdir()
    _prepare(case, folder)
    monkeypatch.chdir(folder)  # default output folders (runs/...) land here, where the snapshot sees them
    before = snapshot(folder)
    argv = [a.format(d=folder, sys=READ_ONLY) for a in case.argv]
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    try:
        code = main(argv)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, f"exit {code}; stderr: {captured.err!r}; stdout: {captured.out[-500:]!r}"
    assert "Traceback" not in captured.err
    assert len(lines) == 1, f"expected one line, got: {captured.err!r}"
    message = lines[0]
    assert message.startswith("error: "), message
    for word in case.expect:
        assert word.format(d=folder) in message, f"{word!r} not in {message!r}"
    assert snapshot(folder) == before, "the command left output behind"
    for arg in argv:
        if arg.startswith(READ_ONLY + "/"):
            assert not Path(arg).exists()

"""Output hygiene: results on stdout, progress on stderr (a line at least every interval outside a terminal),
files with the user's umask, help that lists the choices and prints as written, docs linking inside the repo."""

import json
import os
import re
import stat
import time
from pathlib import Path

import pytest

from pluribus.cli import main
from pluribus.data.store import save_dataset
from pluribus.demo import STEP_NAMES
from pluribus.io import write_json, write_text
from pluribus.progress import heartbeat, track

ROOT = Path(__file__).resolve().parents[1]


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_files_are_written_with_the_users_umask(tmp_path, umask, synthetic):
    old = os.umask(umask)
    try:
        text = write_text(tmp_path / "a" / "x.txt", "hi")
        js = write_json(tmp_path / "m.json", {"a": 1})
        folder = save_dataset(synthetic.subset(synthetic.user_ids[:20]), tmp_path / "ds")
    finally:
        os.umask(old)
    assert _mode(text) == _mode(js) == 0o666 & ~umask
    assert _mode(folder / "dataset.json") == 0o666 & ~umask
    assert _mode(folder) == 0o777 & ~umask


def test_rewriting_a_file_keeps_its_mode(tmp_path):
    target = write_text(tmp_path / "x.txt", "one")
    target.chmod(0o640)
    write_text(target, "two")
    assert _mode(target) == 0o640 and target.read_text() == "two"


def test_progress_outside_a_terminal_prints_lines_during_a_slow_item(monkeypatch, capsys):
    monkeypatch.setenv("PLURIBUS_PROGRESS", "1")
    monkeypatch.setenv("PLURIBUS_PROGRESS_INTERVAL", "0.2")
    for _ in track(range(2), description="slow work"):
        time.sleep(0.7)  # one item longer than the interval: the timer still speaks
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("slow work:")]
    assert captured.out == ""
    assert lines[0].startswith("slow work: 0/2") and lines[-1].startswith("slow work: 2/2 (100%)")
    assert len(lines) >= 4  # start, end, and at least one line inside each 0.7 s item


def test_heartbeat_speaks_and_is_quiet_when_turned_off(monkeypatch, capsys):
    monkeypatch.setenv("PLURIBUS_PROGRESS", "1")
    monkeypatch.setenv("PLURIBUS_PROGRESS_INTERVAL", "0.2")
    with heartbeat("demo step probe"):
        time.sleep(0.7)
    assert "demo step probe: still working" in capsys.readouterr().err
    monkeypatch.setenv("PLURIBUS_PROGRESS", "0")
    with heartbeat("quiet"):
        time.sleep(0.3)
    assert capsys.readouterr().err == ""


def test_results_go_to_stdout_and_logs_to_stderr(tmp_path, capsys):
    assert main(["data", "info", "synthetic:40"]) == 0
    captured = capsys.readouterr()
    assert "40 users" in captured.out and captured.err == ""
    out = tmp_path / "demo"
    assert main(["demo", "--data", "synthetic:60", "--out", str(out), "--steps", "data"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out / "report.md")  # the result: where the report is
    assert "step data done" in captured.err


def test_text_from_the_data_is_printed_verbatim(tmp_path, capsys):
    record = {"user_id": "[bold]u1[/bold]", "sources": {"[red]pay": [{"timestamp": 1, "text": "x", "[i]amt": 2.0}]},
              "labels": {"[b]churn": 1}}
    other = {**record, "user_id": "u2", "labels": {"[b]churn": 0}}
    path = tmp_path / "u.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps(other) + "\n")
    assert main(["data", "info", str(path)]) == 0
    out = capsys.readouterr().out
    for text in ("[red]pay", "[i]amt", "[b]churn"):
        assert text in out


def test_help_lists_the_choices_and_prints_as_written(capsys):
    assert main(["demo", "--help"]) == 0
    flat = " ".join(capsys.readouterr().out.replace("│", " ").split())  # panels wrap lines
    assert ", ".join(STEP_NAMES) in flat and "synthetic:N" in flat and "--force" in flat
    assert main(["tokenize", "fit", "--help"]) == 0
    assert "[tokenizer]" in capsys.readouterr().out  # square brackets in help are text, not console markup


def test_docs_link_only_to_files_inside_the_repository():
    bad = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        text = doc.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                bad += [f"{doc.name}: {target}"] if not target.startswith(("#", "mailto:")) else []
                continue
            path = (doc.parent / target.split("#", 1)[0]).resolve()
            if not path.is_relative_to(ROOT) or not path.exists():
                bad.append(f"{doc.name}: {target}")
        bad += [f"{doc.name}: {p}" for p in re.findall(r"(?<![\w.])/work/\S+", text)]
    assert bad == []

"""Run folders after a failed command: removed when nothing was written, else marked INCOMPLETE and reusable;
--force starts over; library use writes no marker."""

from dataclasses import dataclass

import pytest
import torch

from pluribus.cli import main
from pluribus.errors import ConfigError, DataError
from pluribus.runs import INCOMPLETE, RunFolder, command_session


@dataclass(frozen=True)
class Cfg:
    steps: int = 3


def _fail_inside(path, config, work=None):
    with pytest.raises(DataError), command_session():
        run = RunFolder(path, config)
        if work is not None:
            work(run)
        raise DataError("bad input found after the run folder was opened")


def test_a_failed_command_removes_the_run_folder_it_created(tmp_path):
    _fail_inside(tmp_path / "a" / "b" / "run", Cfg())
    assert list(tmp_path.iterdir()) == []  # the folder and the parents it created are gone


def test_a_failed_command_leaves_a_users_existing_folder_as_it_was(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    _fail_inside(tmp_path, Cfg())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_failure_after_work_marks_the_folder_incomplete_and_the_same_command_resumes(tmp_path):
    out = tmp_path / "run"
    _fail_inside(out, Cfg(), lambda run: run.save_checkpoint("model", {"w": torch.ones(2)}, {"step": 1}))
    assert (out / INCOMPLETE).exists() and "last failure: bad input found" in (out / INCOMPLETE).read_text()
    with pytest.raises(ConfigError, match="--force"):  # progress exists: another config must not mix in
        RunFolder(out, Cfg(steps=4))
    with command_session():
        run = RunFolder(out, Cfg())  # the same config resumes
        assert run.is_incomplete() and run.load_checkpoint("model") is not None
    assert not (out / INCOMPLETE).exists()


def test_a_failed_start_is_taken_over_by_the_corrected_command(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.toml").write_text("steps = -1\n")  # a command killed right after opening its folder
    (out / INCOMPLETE).write_text("This run has not finished.\n")
    with command_session():
        RunFolder(out, Cfg(steps=5))
    assert (out / "config.toml").read_text() == "steps = 5\n" and not (out / INCOMPLETE).exists()


def test_force_starts_a_run_over_and_resume_false_refuses(tmp_path):
    out = tmp_path / "run"
    run = RunFolder(out, Cfg())
    run.mark_done("train")
    run.log_metrics("train", {"loss": 1.0})
    with pytest.raises(ConfigError, match="already holds a run"):
        RunFolder(out, Cfg(), resume=False)
    with pytest.raises(ConfigError, match="different config"):
        RunFolder(out, Cfg(steps=9))
    again = RunFolder(out, Cfg(steps=9), force=True)
    assert not again.is_done("train") and again.metrics() == {}
    assert (out / "config.toml").read_text() == "steps = 9\n"


def test_a_finished_run_reopened_by_a_failing_command_stays_finished(tmp_path):
    out = tmp_path / "run"
    with command_session():
        RunFolder(out, Cfg()).mark_done("train")
    _fail_inside(out, Cfg())
    assert not (out / INCOMPLETE).exists() and RunFolder(out, Cfg()).is_done("train")


def test_library_use_writes_no_marker_and_reading_creates_nothing(tmp_path):
    RunFolder(tmp_path / "lib", Cfg())
    assert not (tmp_path / "lib" / INCOMPLETE).exists()
    assert RunFolder(tmp_path / "nothing").load_checkpoint("model") is None
    assert not (tmp_path / "nothing").exists()


def test_run_folder_under_a_file_names_the_path(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match="afile.*a file is in the way"):
        RunFolder(tmp_path / "afile" / "run", Cfg())
    with pytest.raises(ConfigError, match="a file is in the way"):
        RunFolder(tmp_path / "afile", Cfg())


def test_demo_force_reuses_a_folder_of_another_run(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--data", "synthetic:60", "--out", str(out), "--steps", "data"]) == 0
    assert main(["demo", "--data", "synthetic:70", "--out", str(out), "--steps", "data"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["demo", "--data", "synthetic:70", "--out", str(out), "--steps", "data", "--force"]) == 0
    assert "synthetic:70" in (out / "config.toml").read_text() and not (out / INCOMPLETE).exists()

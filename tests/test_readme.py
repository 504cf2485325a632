"""The README's Python examples run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})
    assert "price_sensitive" not in capsys.readouterr().err


def test_readme_opens_with_the_two_commands():
    head = README.read_text(encoding="utf-8").splitlines()[:5]
    assert any(line.startswith("make demo") for line in head)
    assert any(line.startswith("make test") for line in head)


def test_readme_own_data_commands_run_on_a_generated_file(tmp_path, monkeypatch, capsys):
    import shlex

    from cli_bad_input.userdata import good_records, write_records  # tests/ is on the path (rootdir layout)
    from pluribus.cli import main

    section = README.read_text(encoding="utf-8").split("## Your own data", 1)[1].split("\n## ", 1)[0]
    commands = [line for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)
                for line in block.splitlines() if line.startswith("pluribus ")]
    assert len(commands) >= 3
    monkeypatch.chdir(tmp_path)
    write_records(tmp_path / "users.jsonl", good_records())
    for command in commands:
        assert main(shlex.split(command)[1:]) == 0, command
    out = capsys.readouterr().out
    assert "24 users" in out and (tmp_path / "runs" / "mine" / "report.md").exists()

"""The README's Python examples run as written."""

import json
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
GETTING_STARTED = README.parent / "docs" / "getting-started.md"  # the own-data commands moved there from the README


def test_readme_python_blocks_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})
    assert "price_sensitive" not in capsys.readouterr().err


def test_readme_links_each_system_to_its_guide():
    text = README.read_text(encoding="utf-8")
    for guide in ("docs/guides/encoder.md", "docs/guides/fedbone.md", "docs/guides/fusion.md"):
        assert f"]({guide})" in text, guide


def test_readme_opens_with_the_two_commands():
    head = README.read_text(encoding="utf-8").splitlines()[:5]
    assert any(line.startswith("make demo") for line in head)
    assert any(line.startswith("make test") for line in head)


@pytest.mark.slow
def test_own_data_commands_run_on_a_generated_file(tmp_path, monkeypatch, capsys):
    """Every command of the "Your own data" section of docs/getting-started.md, as written there, on a generated 24-user file:
    data, demo, tokenize, encoder, fed and fuse (small local models: MiniLM, tiny-random; no download)."""
    import shlex

    from cli_bad_input.userdata import good_records, write_records  # tests/ is on the path (rootdir layout)
    from pluribus.cli import main

    section = GETTING_STARTED.read_text(encoding="utf-8").split("## Your own data", 1)[1].split("\n## ", 1)[0]
    commands = [line for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)
                for line in block.splitlines() if line.startswith("pluribus ")]
    groups = {shlex.split(c)[1] for c in commands}
    assert {"data", "demo", "tokenize", "encoder", "fed", "fuse"} <= groups, groups
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PLURIBUS_DATA_DIR", str(tmp_path / "data-home"))  # the embedding cache, as a new user's
    monkeypatch.setenv("PLURIBUS_CACHE", str(tmp_path / "cache"))  # tiny-random is made here on first use
    write_records(tmp_path / "users.jsonl", good_records())
    for command in commands:
        assert main(shlex.split(command)[1:]) == 0, command
    out = capsys.readouterr().out
    assert "24 users" in out and (tmp_path / "runs" / "mine" / "report.md").exists()
    assert (tmp_path / "runs" / "tok-mine" / "tokenizer" / "tokenizer.json").exists() and "tokenizer saved" in out
    assert "trained 2 steps" in out and (tmp_path / "cache" / "tiny-random-qwen3" / "config.json").exists()
    encoder = json.loads((tmp_path / "runs" / "enc-mine" / "metrics.json").read_text())["train"]
    assert encoder["steps"] == 2 and 'source = "payments"' in (tmp_path / "runs" / "enc-mine" / "config.toml").read_text()
    assert (tmp_path / "runs" / "fed-mine" / "report.md").exists()
    assert "fused 2 parties: party0, party1" in out and "fused test accuracy" in out
    fused = json.loads((tmp_path / "runs" / "fuse-mine" / "metrics.json").read_text())["flower"]
    assert 0.0 <= fused["fused test accuracy"] <= 1.0

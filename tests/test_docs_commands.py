"""The docs' commands still run: every benchmark script a page names exists and accepts the options the page
gives it, every ``pluribus.*`` module or object a page names can be imported, and the code blocks of the home
page, Getting started and the guides run as written (python blocks executed in order, bash blocks' ``pluribus``
commands through the CLI, on tiny data), except blocks marked ``<!-- not-run: reason -->``, which are counted."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SCRIPT = re.compile(r"benchmarks/[a-z_]+/[a-z_]+\.py")
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
DOTTED = re.compile(r"(?<![\w./-])pluribus(?:\.[A-Za-z_]\w*)+")


def code_texts(page: Path) -> list[str]:
    """The page's code: each line of a fenced block (backslash continuations joined) and each inline span."""
    text = page.read_text(encoding="utf-8")
    out: list[str] = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        out += block.replace("\\\n", " ").splitlines()
    prose = re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.S)
    out += re.findall(r"`([^`\n]+)`", prose)
    return out


def documented_commands() -> dict[str, set[str]]:
    """Benchmark script -> the options the docs pass to it (each command cut at ; && || |)."""
    found: dict[str, set[str]] = {}
    for page in PAGES:
        for code in code_texts(page):
            for command in re.split(r";|&&|\|\|?", code):
                match = SCRIPT.search(command)
                if match:
                    found.setdefault(match.group(0), set()).update(OPTION.findall(command[match.end():]))
    return found


def test_the_docs_name_benchmarks_that_exist() -> None:
    named = {m for page in PAGES for m in SCRIPT.findall(page.read_text(encoding="utf-8"))}
    assert named, "no page names a benchmark"
    assert sorted(p for p in named if not (ROOT / p).is_file()) == []


@pytest.mark.slow
def test_every_documented_benchmark_command_parses() -> None:
    """Each script's --help lists every option a documented command gives it (the scripts import torch and
    their system at the top, so this also proves each one loads)."""
    commands = documented_commands()
    assert len(commands) >= 15, sorted(commands)

    def help_text(script: str) -> tuple[str, int, str]:
        proc = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True,
                              timeout=300, cwd=ROOT)
        return script, proc.returncode, proc.stdout + proc.stderr

    with ThreadPoolExecutor(max_workers=2) as pool:
        helps = list(pool.map(help_text, sorted(commands)))
    failed = [f"{script}: exit {rc}: {out[-300:]}" for script, rc, out in helps if rc != 0]
    assert failed == []
    unknown = sorted(f"{script} {opt}" for script, _, out in helps for opt in commands[script] - {"--help"}
                     if not re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", out))
    assert unknown == []


def resolve(dotted: str) -> object:
    """The module or object a dotted name refers to (the longest importable module, then attributes)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_every_documented_module_and_object_imports() -> None:
    names = sorted({n.rstrip(".") for page in PAGES for n in DOTTED.findall(page.read_text(encoding="utf-8"))})
    assert len(names) > 10
    broken = []
    for name in names:
        try:
            resolve(name)
        except (ImportError, AttributeError) as err:
            broken.append(f"{name}: {type(err).__name__}: {err}")
    assert broken == []


# --- the pages a reader learns from: their code blocks run -------------------------------------------------------

RUN_PAGES = [ROOT / "docs" / "index.md", ROOT / "docs" / "getting-started.md",
             *sorted((ROOT / "docs" / "guides").glob("*.md"))]
BLOCK = re.compile(r"(?:<!--\s*not-run:(?P<reason>[^>]*?)-->\s*\n)?```(?P<lang>[a-z]*)\n(?P<body>.*?)```", re.S)
RUNNABLE = ("python", "bash")  # text, json and toml blocks show formats and output: nothing to run


def page_blocks(page: Path) -> list[tuple[str, str, str | None]]:
    """(language, code, the not-run reason or None) of every fenced block of a page, in order."""
    return [(m["lang"], m["body"], None if m["reason"] is None else m["reason"].strip())
            for m in BLOCK.finditer(page.read_text(encoding="utf-8"))]


def shell_commands(body: str) -> list[list[str]]:
    """The argument lists of a bash block (continuations joined, comments dropped); each must be ``pluribus``."""
    import shlex

    commands = []
    for line in body.replace("\\\n", " ").splitlines():
        args = shlex.split(line, comments=True)
        if args:
            assert args[0] == "pluribus", f"not a pluribus command (mark the block <!-- not-run: why -->): {line}"
            commands.append(args[1:])
    return commands


def test_every_guide_block_runs_or_says_why_not() -> None:
    """Each reader's page has blocks that run; a block that cannot run here names why, and they are counted."""
    assert {p.name for p in RUN_PAGES} >= {"index.md", "getting-started.md", "encoder.md", "fedbone.md", "fusion.md"}
    ran = skipped = 0
    for page in RUN_PAGES:
        blocks = [b for b in page_blocks(page) if b[0] in RUNNABLE]
        assert any(reason is None for _, _, reason in blocks), f"{page.name}: no block runs"
        for lang, body, reason in blocks:
            if reason is None:
                ran += 1
                if lang == "bash":
                    assert shell_commands(body), f"{page.name}: an empty bash block"
            else:
                skipped += 1
                assert len(reason) >= 10, f"{page.name}: a not-run marker must say why: {reason!r}"
    print(f"docs blocks: {ran} run, {skipped} marked not-run")
    assert skipped <= ran, (ran, skipped)


@pytest.mark.slow
@pytest.mark.parametrize("page", RUN_PAGES, ids=lambda p: p.relative_to(ROOT / "docs").as_posix())
def test_page_code_blocks_run_as_written(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Every block not marked not-run, in page order, in a fresh folder: python blocks share one namespace per
    page (as a reader pastes them), and each ``pluribus`` command of a bash block must exit 0."""
    import torch

    from pluribus.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PLURIBUS_DATA_DIR", str(tmp_path / "data-home"))  # embedding cache, as a new user's
    monkeypatch.setenv("PLURIBUS_CACHE", str(tmp_path / "cache"))  # tiny-random is made here on first use
    monkeypatch.setenv("PLURIBUS_PROGRESS", "0")
    torch.set_num_threads(1)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    ran = 0
    for lang, body, reason in page_blocks(page):
        if reason is not None or lang not in RUNNABLE:
            continue
        if lang == "python":
            exec(compile(body, str(page), "exec"), namespace)
        else:
            for args in shell_commands(body):
                assert main(args) == 0, f"{page.name}: pluribus {' '.join(args)}"
        ran += 1
    assert ran, page.name
    assert "Traceback" not in capsys.readouterr().err

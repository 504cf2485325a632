"""The docs' commands still run: every benchmark script a page names exists and accepts the options the page
gives it, and every ``pluribus.*`` module or object a page names can be imported."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
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

"""The built docs site renders in a real browser (opt-in: ``pytest tests/test_docs_site.py -m browser``).

Builds the site from mkdocs.yml into a temporary folder, then runs scripts/check_docs_site.py on it: the home
page, a guide, an API page and a results page each have a title, the navigation sidebar with every top-level section, a main
content and only loaded images. Skipped when Debian's chromium (``apt-get install chromium``) or playwright is
absent. ``make test`` builds the same site with ``--strict`` (links, pages, docstrings) without a browser.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check_docs_site.py"


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.browser
@pytest.mark.slow
def test_site_renders_in_headless_chromium(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    if not re.search(r"(?<!not )\bbrowser\b", request.config.getoption("-m") or ""):
        pytest.skip("opt-in: run with -m browser")
    if chromium() is None or importlib.util.find_spec("playwright") is None:
        pytest.skip("needs Debian's chromium (apt-get install chromium) and the playwright package")
    site, shots = tmp_path / "site", tmp_path / "shots"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--quiet", "--site-dir", str(site)],
                           cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert build.returncode == 0, build.stderr[-3000:]
    check = subprocess.run([sys.executable, str(SCRIPT), "--site", str(site), "--out", str(shots),
                            "--timeout", "150"], cwd=ROOT, capture_output=True, text=True, timeout=200)
    assert check.returncode == 0, check.stdout + check.stderr
    lines = [line for line in check.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
    assert len(lines) == 4 and all(line.startswith("ok") for line in lines), check.stdout
    assert (shots / "docs_home.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

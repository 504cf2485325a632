"""Open the built docs site in headless Chromium and check that its pages render.

Usage (after ``make docs``; Debian's browser: ``apt-get install chromium``)::

    python scripts/check_docs_site.py --site site [--out DIR] [--chromium /usr/bin/chromium] [--timeout 120]

Serves ``site/`` with Python's http.server on a free loopback port (a child process, stopped by its PID), opens
the home page and the first guide, API page and results page the home page's navigation links to (by default
``guides/``, ``api/encoder/``, ``results/demo/``), and checks on each:
a title, the navigation sidebar with every top-level section of mkdocs.yml's ``nav``, a main content with a
heading and text, every ``<img>`` loaded (``naturalWidth > 0``; at least one image over the pages checked), no
same-site request answered 4xx/5xx, and on the API page at least one rendered docstring. Saves a screenshot of
the home page into ``--out`` (a new temporary folder unless given). Prints one line per page and exits 0 when every check holds, 1 when one fails, 2 when the
site or the browser is missing. The whole run is bounded by ``--timeout`` seconds.

Playwright drives the system Chromium through ``executable_path``; no browser is downloaded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_NAMES = ("chromium", "chromium-browser")


@dataclass
class PageCheck:
    """What one page showed and which checks failed."""

    url: str
    title: str = ""
    images: int = 0
    problems: list[str] = field(default_factory=list)


def find_chromium(given: str | None) -> str | None:
    """The Chromium executable: ``given``, else the first of ``chromium``/``chromium-browser`` on PATH."""
    if given:
        return given if Path(given).is_file() else None
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def nav_sections(mkdocs_yml: Path) -> list[str]:
    """The top-level titles of mkdocs.yml's ``nav`` (what the sidebar must show)."""
    import yaml  # PyYAML comes with mkdocs

    class Loader(yaml.SafeLoader):
        """SafeLoader that ignores mkdocs' ``!ENV``/``!relative`` style tags."""

    Loader.add_multi_constructor("", lambda loader, suffix, node: None)
    config = yaml.load(mkdocs_yml.read_text(encoding="utf-8"), Loader=Loader)
    titles: list[str] = []
    for entry in config.get("nav") or []:
        if isinstance(entry, dict):
            titles.extend(str(k) for k in entry)
    return titles


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(site: Path, port: int) -> subprocess.Popen[bytes]:
    """``python -m http.server`` on ``127.0.0.1:port`` serving ``site``, in its own process group."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(site)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"http.server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc
        except OSError:
            time.sleep(0.1)
    stop_server(proc)
    raise RuntimeError(f"http.server did not listen on port {port} within 15 s")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server by its PID: SIGTERM, then SIGKILL after 5 s."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


PAGE_STATE_JS = """() => {
  const nav = document.querySelector('nav.md-nav--primary');
  const main = document.querySelector('article.md-content__inner');
  return {
    title: document.title,
    navText: nav ? nav.innerText : null,
    navLinks: nav ? Array.from(nav.querySelectorAll('a.md-nav__link[href]')).map(a => [a.innerText.trim(), a.href]) : [],
    h1: main && main.querySelector('h1') ? main.querySelector('h1').innerText : null,
    mainChars: main ? main.innerText.length : 0,
    docHeadings: document.querySelectorAll('.doc-heading').length,
    images: Array.from(document.images).map(img => ({src: img.currentSrc || img.src, ok: img.complete && img.naturalWidth > 0})),
  };
}"""


def check_page(page: Any, url: str, sections: list[str], *, api: bool, bad_responses: list[str]) -> tuple[PageCheck, dict[str, Any]]:
    """Load ``url`` in ``page`` and check title, sidebar, main content and images (and docstrings if ``api``)."""
    result = PageCheck(url)
    bad_responses.clear()
    page.goto(url, wait_until="load")
    # images below the fold may load lazily: scroll them into view, then wait for each to settle
    page.evaluate("() => Array.from(document.images).forEach(img => { img.loading = 'eager'; })")
    page.wait_for_function("() => Array.from(document.images).every(img => img.complete)", timeout=20_000)
    state: dict[str, Any] = page.evaluate(PAGE_STATE_JS)
    result.title = state["title"]
    result.images = len(state["images"])
    if not state["title"].strip():
        result.problems.append("empty <title>")
    if state["navText"] is None:
        result.problems.append("no navigation sidebar (nav.md-nav--primary)")
    else:
        missing = [s for s in sections if s not in state["navText"]]
        if missing:
            result.problems.append(f"sidebar lacks {missing}")
    if not state["h1"]:
        result.problems.append("main content has no <h1>")
    if state["mainChars"] < 200:
        result.problems.append(f"main content has only {state['mainChars']} characters")
    broken = [img["src"] for img in state["images"] if not img["ok"]]
    if broken:
        result.problems.append(f"images not loaded: {broken}")
    if api and state["docHeadings"] == 0:
        result.problems.append("API page shows no rendered docstring (.doc-heading)")
    if bad_responses:
        result.problems.append(f"failed requests: {sorted(set(bad_responses))}")
    return result, state


def first_link(links: list[list[str]], prefix: str, base: str) -> str | None:
    """The first sidebar link under ``base + prefix`` that is not a section's own index (``api/`` itself)."""
    section = base + prefix.split("/")[0]
    for _, href in links:
        if href.startswith(base + prefix) and href.rstrip("/") != section:
            return href
    return None


def run(site: Path, out: Path, chromium: str, timeout_s: float, pages: list[tuple[str, bool]]) -> list[PageCheck]:
    """Serve ``site``, check the home page and the first page under each ``(prefix, is_api)`` of ``pages``;
    screenshot the home page into ``out``."""
    from playwright.sync_api import sync_playwright

    sections = nav_sections(ROOT / "mkdocs.yml")
    port = free_port()
    base = f"http://127.0.0.1:{port}/"
    server = start_server(site, port)
    checks: list[PageCheck] = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                         args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.set_default_timeout(timeout_s * 1000 / 4)
                bad: list[str] = []
                page.on("response", lambda r: bad.append(f"{r.status} {r.url}")
                        if r.url.startswith(base) and r.status >= 400 else None)
                page.on("requestfailed", lambda r: bad.append(f"failed {r.url}") if r.url.startswith(base) else None)

                home, state = check_page(page, base, sections, api=False, bad_responses=bad)
                checks.append(home)
                out.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(out / "docs_home.png"), full_page=False)

                for prefix, is_api in pages:
                    url = first_link(state["navLinks"], prefix, base)
                    if url is None:
                        checks.append(PageCheck(base + prefix, problems=[f"the home page's sidebar links to no page under {prefix}"]))
                        continue
                    checks.append(check_page(page, url, sections, api=is_api, bad_responses=bad)[0])
            finally:
                browser.close()
    finally:
        stop_server(server)
    return checks


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: parse options, run the checks under a hard deadline, print one line per page."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--site", type=Path, default=ROOT / "site", help="the built site (make docs)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the screenshot (default: a new temp dir)")
    parser.add_argument("--chromium", default=None, help="Chromium executable (default: chromium on PATH)")
    parser.add_argument("--timeout", type=float, default=120.0, help="hard limit for the whole run, seconds")
    parser.add_argument("--guide", default="guides/", help="the guide checked: the first sidebar page under it")
    parser.add_argument("--api", default="api/encoder/", help="the API page checked: the first sidebar page under it")
    parser.add_argument("--results", default="results/demo/",
                        help="a page with figures checked: the first sidebar page under it ('' to skip)")
    args = parser.parse_args(argv)

    if not (args.site / "index.html").is_file():
        print(f"no built site at {args.site} (run `make docs`)", file=sys.stderr)
        return 2
    chromium = find_chromium(args.chromium)
    if chromium is None:
        print("no chromium found (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    out = args.out or Path(tempfile.mkdtemp(prefix="pluribus-docs-"))

    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"docs site check ran past {args.timeout:.0f} s")

    signal.signal(signal.SIGALRM, expired)
    signal.alarm(max(1, int(args.timeout)))
    try:
        pages = [(args.guide, False), (args.api, True)] + ([(args.results, False)] if args.results else [])
        checks = run(args.site.resolve(), out, chromium, args.timeout, pages)
    finally:
        signal.alarm(0)
    for check in checks:
        status = "ok  " if not check.problems else "FAIL"
        print(f"{status} {check.url}  title={check.title!r} images={check.images}"
              + ("" if not check.problems else "  " + "; ".join(check.problems)))
    print(f"screenshot: {out / 'docs_home.png'}")
    if args.results and sum(c.images for c in checks) == 0:
        print("FAIL no page checked shows an image: the image check tested nothing")
        return 1
    return 0 if checks and all(not c.problems for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())

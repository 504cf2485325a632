"""docs/deploy.md, run as written on one machine: every command block in order, the example host
(fl.coordinator.example) as 127.0.0.1 and port 9093 as a free port. Blocks under "runs until stopped" are
services: each runs in its own process (separate processes that connect by address, TLS and SuperNode
authentication on, certificates from the helper) until the page restarts it or the test ends; each is stopped
as the page says (SIGTERM to the pluribus process), and must stop Flower's processes it started. A node key
serves one node at a time: a node started with a key that a running node holds replaces that node (the page
says to stop it first), and the SuperLink started again replaces the whole federation.

`make test` runs every section but the FedBone one (one PrivFusion run over TLS is most of the time: each
Flower message starts a fresh `flwr-clientapp` process that imports torch, so it is marked slow); the whole
page, FedBone included, runs opt-in (PLURIBUS_FLOWER_DEPLOYMENT=1, `-m ray`)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pluribus.flower_engines import free_port

DOC = Path(__file__).resolve().parents[2] / "docs" / "deploy.md"
EXAMPLE_HOST, EXAMPLE_PORT = "fl.coordinator.example", "9093"
SERVICE = "runs until stopped"
READY = "stop with Ctrl-C or kill"

pytestmark = pytest.mark.slow


OPT_IN_SECTION = "FedBone"  # the section `make test` leaves to the opt-in run


@dataclass
class Block:
    section: str
    service: bool
    commands: list[str]


def doc_blocks(text: str) -> list[Block]:
    """The page's bash blocks in order, with their section; a block is a service when the paragraph before it
    says so."""
    blocks = []
    for part in re.split(r"\n(?=## )", text):
        section = part.splitlines()[0]
        for before, body in re.findall(r"([^\n]*)\n\n```bash\n(.*?)```", part, flags=re.S):
            commands = [line for line in body.splitlines() if line.strip() and not line.startswith("#")]
            blocks.append(Block(section, before.startswith(SERVICE), commands))
    return blocks


def _option(command: str, name: str) -> str | None:
    words = shlex.split(command)
    return words[words.index(name) + 1] if name in words else None


def test_the_page_names_what_it_runs() -> None:
    blocks = doc_blocks(DOC.read_text(encoding="utf-8"))
    commands = [shlex.split(c)[:3] for b in blocks for c in b.commands]
    assert all(c[0] == "pluribus" for c in commands), commands
    assert ["pluribus", "federation", "certs"] in commands and ["pluribus", "fuse", "flower"] in commands
    services = [shlex.split(c)[2] for b in blocks if b.service for c in b.commands]
    assert services == ["host", "join", "join", "join", "join", "host", "join"], services
    assert [b.section for b in blocks if OPT_IN_SECTION in b.section] == ["## 7. FedBone: each institution's own data file"] * 4


def _stop(proc: subprocess.Popen[bytes], log: Path) -> int:
    """SIGTERM the pluribus process (as `kill PID` would); it must stop Flower's process it started."""
    child = int(re.search(r"flower-super\w+ pid (\d+)", log.read_text())[1])  # type: ignore[index]
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=40)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return code
        time.sleep(0.2)
    raise AssertionError(f"flower process {child} still runs after its pluribus process stopped")


def test_every_command_of_the_page_runs(tmp_path: Path) -> None:
    _run_page(tmp_path, skip_section=OPT_IN_SECTION)


@pytest.mark.ray
@pytest.mark.skipif(os.environ.get("PLURIBUS_FLOWER_DEPLOYMENT") != "1",
                    reason="the whole page (FedBone too) is opt-in: set PLURIBUS_FLOWER_DEPLOYMENT=1")
def test_every_command_of_the_page_runs_fedbone_too(tmp_path: Path) -> None:
    outputs = _run_page(tmp_path, skip_section=None)
    import json

    fedbone = json.loads(next(o for o in outputs if '"run_dir"' in o))
    assert fedbone["faults"] == 0 and fedbone["steps_done"] == 2 and fedbone["engine"].startswith("deployment")
    assert (tmp_path / "runs" / "fedbone" / "report.md").is_file()
    assert (tmp_path / "hospital-b" / "fedbone-state" / "supernode.log").is_file()


def _run_page(tmp_path: Path, *, skip_section: str | None) -> list[str]:
    """Run the page's blocks (less those of ``skip_section``), check where its outputs land; stdout of each
    command that returned."""
    port = str(free_port())
    text = DOC.read_text(encoding="utf-8").replace(f"{EXAMPLE_HOST}:{EXAMPLE_PORT}", f"127.0.0.1:{port}")
    text = text.replace(EXAMPLE_HOST, "127.0.0.1")
    pluribus = str(Path(sys.executable).parent / "pluribus")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PLURIBUS_PROGRESS": "0", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    services: list[tuple[str, subprocess.Popen[bytes], Path]] = []
    outputs: list[str] = []
    started = 0
    try:
        for block in doc_blocks(text):
            if skip_section is not None and skip_section in block.section:
                continue
            for command in block.commands:
                argv = [pluribus, *shlex.split(command)[1:]]
                if not block.service:
                    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                                          check=False)
                    assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-2000:])
                    outputs.append(done.stdout)
                    continue
                if any(command == c for c, _, _ in services):  # the page restarts the federation: stop it first
                    for _, proc, log in reversed(services):
                        assert _stop(proc, log) == 0
                    services.clear()
                key = _option(command, "--key")
                for held in [s for s in services if key is not None and _option(s[0], "--key") == key]:
                    assert _stop(held[1], held[2]) == 0  # the institution stops its node before starting another
                    services.remove(held)
                started += 1
                log = tmp_path / f"service{started}.log"
                with open(log, "wb") as fh:
                    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=fh, stderr=subprocess.STDOUT)
                services.append((command, proc, log))
                deadline = time.monotonic() + 120
                while READY not in log.read_text(errors="replace"):
                    assert proc.poll() is None, (command, log.read_text()[-2000:])
                    assert time.monotonic() < deadline, (command, log.read_text()[-2000:])
                    time.sleep(0.3)
        # what the page says lands where
        fused = tmp_path / "runs" / "fused"
        for name in ("fused.safetensors", "privacy.md", "privacy.json", "report.md", "metrics.json"):
            assert (fused / name).is_file(), name
        assert "hospital-a" in (fused / "privacy.md").read_text() and "hospital-b" in (fused / "privacy.md").read_text()
        assert any("fused 2 parties: hospital-a, hospital-b; left out: none" in o for o in outputs), outputs
        assert any("fused test accuracy" in o for o in outputs)
        for k in "ab":
            state = tmp_path / f"hospital-{k}" / "state"
            assert (state / "fused.safetensors").is_file() and (state / "supernode.log").is_file()
        # the certificates folder says what it is; node keys stayed private to their folder
        assert "NOT FOR PRODUCTION" in (tmp_path / "fed-certs" / "NOT-FOR-PRODUCTION.md").read_text()
        assert oct((tmp_path / "hospital-a" / "keys" / "node-hospital-a.key").stat().st_mode)[-3:] == "600"
        return outputs
    finally:
        for _, proc, log in reversed(services):
            if proc.poll() is None:
                try:
                    _stop(proc, log)
                except (AssertionError, subprocess.TimeoutExpired, TypeError):
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)

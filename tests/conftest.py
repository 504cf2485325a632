"""Shared test set-up: quiet progress bars, offline hubs, one CPU thread, shared data fixtures."""

from __future__ import annotations

import os

os.environ.setdefault("PLURIBUS_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Small models and probes run faster on one thread than on two oversubscribed ones (BLAS, OpenMP, torch).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def movielens():
    """MovieLens-100K as a UserDataset (the files come from `make data` / `pluribus data fetch`)."""
    from pluribus.data.movielens import load_movielens

    return load_movielens()


@pytest.fixture(scope="session")
def synthetic():
    """A small deterministic synthetic multi-source data set."""
    from pluribus.data.synthetic import make_synthetic_users

    return make_synthetic_users(120, seed=0)


@pytest.fixture
def kill_cli_when():
    """Run ``pluribus ARGS`` in a child process (one thread) and SIGKILL it as soon as ``ready()`` holds (or the
    child ends, or ``timeout_s`` passes): the crash a kill -9 resume test needs."""
    import signal
    import subprocess
    import sys
    import time

    def run(args: list[str], ready, timeout_s: float = 180.0) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PLURIBUS_PROGRESS": "0"}
        code = "import sys, torch; torch.set_num_threads(1); from pluribus.cli import main; sys.exit(main(sys.argv[1:]))"
        proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + timeout_s
            while not ready() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(timeout=30)

    return run

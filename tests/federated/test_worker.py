"""The long-lived client worker: a thin ClientApp forwarding over a Unix socket gives the in-process results.

Workers run in threads of this process here (fast); one test starts a real worker process with worker="auto" and
stops it by PID. State directories live under a short /tmp path (Unix socket addresses hold ~104 bytes).
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from pluribus.config import flatten_config
from pluribus.federated import FedBoneConfig, ModelConfig
from pluribus.federated.core.protocol import MESSAGE_TYPES as PROTOCOL_TYPES
from pluribus.federated.core.protocol import MSG_EMBED
from pluribus.federated.flower import worker as wk
from pluribus.federated.flower import worker_socket as ws
from pluribus.federated.flower.client_app import CKPT_SAVE, HELLO, MESSAGE_TYPES, make_client_app
from pluribus.federated.flower.server_app import make_server_app, run_flower_inprocess
from pluribus.flower_engines import InProcessGrid, in_process_node_id, run_server_app_inprocess

TINY = ModelConfig(dim=16, depth=1, heads=2, patch=2, adapter_hidden=16)
CFG = FedBoneConfig(suite="digits", tasks=("digit", "parity"), steps=4, batch_size=8, max_train_per_client=48,
                    model=TINY, checkpoint_every=2, eval_every=2)


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pw-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Workers:
    """One worker thread per client state directory."""

    def __init__(self, root: Path, n: int) -> None:
        self.dirs = [root / "clients" / f"partition-{k}" for k in range(n)]
        self.stops = [threading.Event() for _ in range(n)]
        self.threads: list[threading.Thread] = []
        for d, stop in zip(self.dirs, self.stops, strict=True):
            ready = threading.Event()
            t = threading.Thread(target=wk.serve, args=(d,), kwargs={"stop": stop, "ready": ready}, daemon=True)
            t.start()
            assert ready.wait(30)
            self.threads.append(t)

    def stop(self, k: int) -> None:
        self.stops[k].set()
        self.threads[k].join(10)
        assert not self.threads[k].is_alive()

    def close(self) -> None:
        for k in range(len(self.threads)):
            self.stop(k)


def worker_grid(cfg: FedBoneConfig, root: Path, *, run_id: int = 1, mode: object = True, **kw: object) -> InProcessGrid:
    grid = InProcessGrid(make_client_app(), cfg.num_clients, state_root=root / "clients", run_id=run_id,
                         node_configs=[{"worker": mode}] * cfg.num_clients, **kw)  # type: ignore[arg-type]
    for context in grid.contexts.values():
        context.run_config = dict(flatten_config(cfg))  # what the deployment engine's Flower App carries
    return grid


def run_on(grid: InProcessGrid, cfg: FedBoneConfig, run_dir: Path | None) -> dict:
    results: list[dict] = []
    run_server_app_inprocess(make_server_app(cfg, on_result=results.append, run_dir=run_dir, poll_s=0), grid)
    return results[0]


def assert_same(res: dict, ref: dict) -> None:
    assert res["final"] == ref["final"] and res["curve"] == ref["curve"] and res["bytes"] == ref["bytes"]
    assert res["server_state"].keys() == ref["server_state"].keys()
    for k, v in res["server_state"].items():
        assert torch.equal(v, ref["server_state"][k]), k


def message(message_type: str, context: Context, content: RecordDict | None = None) -> Message:
    from pluribus.federated.core.protocol import Payload, encode_payload

    msg = Message(content if content is not None else encode_payload(Payload()), 2, message_type)
    msg.metadata.__dict__["_message_id"] = "m" + str(time.monotonic_ns())
    return msg


def node_context(state_dir: Path, cfg: FedBoneConfig, *, mode: object = True, run_id: int = 1) -> Context:
    return Context(run_id=run_id, node_id=2, node_config={"partition-id": 0, "state-dir": str(state_dir),
                                                          "worker": mode},
                   state=RecordDict(), run_config=dict(flatten_config(cfg)))


def test_thin_clientapp_imports_neither_torch_nor_model_code() -> None:
    code = ("import sys, pluribus.federated.flower.client_app, pluribus.federated.flower.worker_socket; "
            "print(sorted(m for m in ('torch', 'pluribus.federated.core.runtime', 'pluribus.federated.studies.tasks', "
            "'pluribus.federated.core.protocol', 'pluribus.federated.core.split') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
    assert MESSAGE_TYPES == PROTOCOL_TYPES


def test_worker_path_is_bit_identical_and_resumes_exactly(root: Path) -> None:
    ref = run_flower_inprocess(CFG, run_dir=root / "ref", client_state_root=root / "ref-clients")
    workers = Workers(root, CFG.num_clients)
    try:
        assert_same(run_on(worker_grid(CFG, root), CFG, root / "server"), ref)
        # a crash after the step-2 checkpoint, then a new run (new run id, fresh Contexts) resumes through the
        # same, still running workers: they take the new run over and restore from their checkpoint files
        seen = {"save": False}

        def crash(node: int, mtype: str) -> bool:
            if mtype == CKPT_SAVE:
                seen["save"] = True
            elif seen["save"] and mtype == MSG_EMBED:
                raise RuntimeError("simulated crash")
            return False

        shutil.rmtree(root / "server")
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_on(worker_grid(CFG, root, run_id=2, drop=crash), CFG, root / "server")
        res = run_on(worker_grid(CFG, root, run_id=3), CFG, root / "server")
        assert res["resumed_from"] == 2
        assert_same(res, ref)
    finally:
        workers.close()


def test_dead_worker_is_a_recorded_fault_and_the_server_goes_on(root: Path) -> None:
    cfg = replace(CFG, checkpoint_every=0, eval_every=0)
    workers = Workers(root, cfg.num_clients)
    embeds = {"n": 0}

    def kill_client1_worker(node: int, mtype: str) -> bool:
        if node == in_process_node_id(1) and mtype == MSG_EMBED:
            embeds["n"] += 1
            if embeds["n"] == 3:
                workers.stop(1)
        return False

    try:
        res = run_on(worker_grid(cfg, root, drop=kill_client1_worker), cfg, None)
    finally:
        workers.stop(0)
    bad = [r for r in res["fault_log"] if r["client"] == 1]
    assert bad and all("worker not running" in r["reason"] and "worker.sock" in r["reason"] for r in bad)
    assert bad[0]["step"] == 2 and not [r for r in res["fault_log"] if r["client"] == 0]
    assert all(torch.isfinite(v).all() for v in res["server_state"].values())
    # the server model is what it would be had client 1 gone silent at the same point: nothing half-applied
    silent = {"n": 0}

    def drop_client1(node: int, mtype: str) -> bool:
        if node == in_process_node_id(1) and mtype == MSG_EMBED:
            silent["n"] += 1
        return node == in_process_node_id(1) and silent["n"] >= 3

    ref = run_flower_inprocess(cfg, drop=drop_client1)
    for k, v in res["server_state"].items():
        assert torch.equal(v, ref["server_state"][k]), k


def test_absent_worker_other_run_and_lost_state_are_error_replies(root: Path) -> None:
    app = make_client_app()
    state = root / "c0"
    reply = app(message(HELLO, ctx := node_context(state, CFG)), ctx)
    assert reply.has_error() and "worker not running" in reply.error.reason
    assert str(state / "worker.sock") in reply.error.reason and "pluribus fed worker --state-dir" in reply.error.reason
    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(target=wk.serve, args=(state,), kwargs={"stop": stop, "ready": ready}, daemon=True)
    thread.start()
    try:
        assert ready.wait(30)
        assert stat.S_IMODE(os.stat(state / "worker.sock").st_mode) == 0o600
        with pytest.raises(ws.WorkerUnavailable, match="already serves"):
            wk.serve(state)  # one worker per client: the lock refuses a second
        ok = app(message(HELLO, ctx), ctx)
        assert not ok.has_error() and ok.content.config_records["info"]["task"] == "digit"
        other = node_context(state, replace(CFG, client_lr=0.5), run_id=7)
        refused = app(message(HELLO, other), other)
        assert refused.has_error() and "another run_config" in refused.error.reason
        lost = node_context(state, CFG)
        lost.state.config_records[ws.WORKER_KEY] = ConfigRecord({"instance": "4242-gone"})
        refused = app(message(HELLO, lost), lost)
        assert refused.has_error() and "4242-gone" in refused.error.reason and "state is gone" in refused.error.reason
        bad = node_context(state, CFG, mode="sometimes")
        with pytest.raises(Exception, match="'worker'"):
            app(message(HELLO, bad), bad)
    finally:
        stop.set()
        thread.join(10)
    assert not (state / "worker.sock").exists() and not (state / "worker.pid").exists()


def test_auto_started_worker_process_and_its_death(root: Path) -> None:
    app = make_client_app()
    state = root / "c0"
    ctx = node_context(state, CFG, mode="auto")
    pids: list[int] = []
    try:
        reply = app(message(HELLO, ctx), ctx)  # starts `python -m pluribus.federated.flower.worker` in its own session
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        pid = ws.running_pid(state)
        assert pid is not None and pid != os.getpid()
        pids.append(pid)
        os.kill(pid, signal.SIGKILL)  # the worker dies; the next message starts a fresh one, which refuses
        os.waitpid(pid, 0)  # it is this process's child here (a ClientApp process exits and init reaps it)
        reply = app(message(HELLO, ctx), ctx)
        assert reply.has_error() and "died or was restarted" in reply.error.reason
        new = ws.running_pid(state)
        assert new is not None and new != pid
        pids.append(new)
    finally:
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass

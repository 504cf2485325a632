"""Resume after a SuperNode died: the first attempt's faults stay on record (the fault journal; those after the last
committed checkpoint come back as ``interrupted_fault_log``) and the resumed run equals an uninterrupted one,
tensor for tensor. The in-process check is fast; the deployment-engine one (kill a SuperNode by PID after a
committed checkpoint, stop the run, resume with every SuperNode alive) is opt-in and takes minutes:

PLURIBUS_FLOWER_DEPLOYMENT=1 .venv/bin/pytest tests/federated/test_deployment_resume.py -m ray
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from flwr.app import Message

from pluribus.federated import FedBoneConfig, ModelConfig
from pluribus.federated.core.protocol import MSG_EMBED
from pluribus.federated.flower.client_app import CKPT_SAVE
from pluribus.federated.flower.server_app import FAULT_JOURNAL, RESULT_FILE, run_flower_inprocess
from pluribus.flower_engines import in_process_node_id

TINY = ModelConfig(dim=16, depth=1, heads=2, patch=2, adapter_hidden=16)
CFG = FedBoneConfig(suite="digits", tasks=("digit", "segmentation"), steps=4, batch_size=8,
                    max_train_per_client=32, checkpoint_every=1, model=TINY)
HARD_LIMIT_S = 900


class Crash(RuntimeError):
    pass


def test_faults_after_the_last_commit_survive_an_interrupted_attempt(tmp_path: Path) -> None:
    from pluribus.io import read_json

    dead = in_process_node_id(1)

    def first_attempt(m: Message) -> bool:
        # client 1 is gone from step 2 on (its step-2 checkpoint and training); the server dies at the next save
        if m.metadata.message_type == CKPT_SAVE and m.metadata.group_id == "3":
            raise Crash("simulated server crash")
        return m.metadata.dst_node_id == dead and m.metadata.group_id in {"2", "3"}

    run_dir, clients = tmp_path / "run", tmp_path / "clients"
    with pytest.raises(Crash):
        run_flower_inprocess(CFG, unavailable=first_attempt, run_dir=run_dir, client_state_root=clients)
    seen = read_json(run_dir / FAULT_JOURNAL)
    assert {(r["step"], r["client"], r["message_type"], r["kind"]) for r in seen} == {
        (2, 1, CKPT_SAVE, "unavailable"), (2, 1, MSG_EMBED, "unavailable")}
    ref = run_flower_inprocess(CFG)  # uninterrupted, no faults: what the resumed run (all clients back) must equal
    resumed = run_flower_inprocess(CFG, run_dir=run_dir, client_state_root=clients)
    assert resumed["resumed_from"] == 1  # the step-2 checkpoint was skipped: client 1 never confirmed it
    assert resumed["fault_log"] == ref["fault_log"] == []
    assert resumed["interrupted_fault_log"] == seen  # the first attempt's faults, none lost
    assert read_json(run_dir / RESULT_FILE)["interrupted_fault_log"] == seen
    assert read_json(run_dir / "metrics.json")["result"]["interrupted_fault_log"] == seen  # in metrics.json too
    from pluribus.federated.flower.run import flower_run_result

    assert flower_run_result(CFG, resumed, 0.0, None).interrupted_fault_log == seen  # and in run_fedbone_flower's result
    assert resumed["final"] == ref["final"]
    for k, v in ref["server_state"].items():
        assert torch.equal(v, resumed["server_state"][k]), k


def _children(match: str) -> list[int]:
    """PIDs of this test process's descendants whose command line contains ``match``."""
    import psutil

    out = []
    for child in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if match in " ".join(child.cmdline()) + " ":
                out.append(int(child.pid))
        except psutil.Error:
            continue
    return out


def _descendants() -> dict[int, object]:
    """This test process's descendants now, as psutil processes (they remember their start time)."""
    import psutil

    return {int(c.pid): c for c in psutil.Process(os.getpid()).children(recursive=True)}


def _alive(proc: object) -> bool:
    """Whether ``proc`` (a psutil process) still runs, a zombie not counted."""
    import psutil

    assert isinstance(proc, psutil.Process)
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _stop(procs: dict[int, object]) -> None:
    """SIGKILL each of ``procs`` that still runs (``is_running`` compares start times: no reused PID is hit)."""
    import psutil

    for proc in procs.values():
        assert isinstance(proc, psutil.Process)
        try:
            if proc.is_running():
                proc.kill()
        except psutil.Error:
            continue


def _killpg(pid: int) -> None:
    """SIGKILL the session ``pid`` leads (the engine starts each Flower process in its own session)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PLURIBUS_FLOWER_DEPLOYMENT") != "1",
                    reason="deployment engine test is opt-in: set PLURIBUS_FLOWER_DEPLOYMENT=1")
def test_deployment_resume_after_a_killed_supernode_is_exact() -> None:
    from pluribus.federated.flower.run import run_fedbone_flower
    from pluribus.io import read_json

    # timeout_s above the SuperLink's heartbeat patience (2 x 30 s), so its "unavailable" reply comes first
    cfg = replace(CFG, timeout_s=150.0)
    work = Path(tempfile.mkdtemp(prefix="pdr-", dir="/tmp"))  # short paths: Unix socket limits
    run_dir, clients = work / "run", work / "c"
    outcome: dict = {}

    def first() -> None:
        try:
            outcome["result"] = run_fedbone_flower(cfg, engine="deployment", run_dir=run_dir,
                                                   client_state_root=clients, timeout_s=HARD_LIMIT_S - 60,
                                                   progress=False)
        except BaseException as err:  # noqa: BLE001 - the main thread expects the stopped run to fail
            outcome["error"] = err

    thread = threading.Thread(target=first, daemon=True)
    thread.start()
    deadline = time.monotonic() + HARD_LIMIT_S
    ckpt, journal = run_dir / "checkpoints" / "flower_server.safetensors", run_dir / FAULT_JOURNAL
    killed: list[int] = []
    seen_procs: dict[int, object] = {}  # every descendant we saw: an orphan of a killed SuperLink is stopped too
    try:
        while thread.is_alive() and time.monotonic() < deadline:
            seen_procs.update(_descendants())
            if not killed and ckpt.exists():  # step 1 committed by both clients: now client 1's SuperNode dies
                killed = [p for p in _children("flower-supernode") if p in _children("partition-id=1 ")]
                for pid in killed:
                    _killpg(pid)
            if killed and journal.exists():  # its fault is on record: stop the whole run (its SuperLink)
                for pid in _children("flower-superlink"):
                    _killpg(pid)
            time.sleep(0.5)
        thread.join(max(1.0, deadline - time.monotonic()))
    finally:
        for pid in _children("flower-"):
            _killpg(pid)
        _stop(seen_procs)
    assert killed, outcome.get("error")
    assert not thread.is_alive(), "the first deployment attempt did not stop within the hard limit"
    assert "error" in outcome and "result" not in outcome  # interrupted, not finished
    seen = read_json(journal)
    assert seen and all(r["client"] == 1 and r["kind"] == "unavailable" and "Node Unavailable" in r["reason"]
                        for r in seen), seen
    last_commit = int(read_json(run_dir / "checkpoints" / "flower_server.json")["next_step"])
    assert last_commit == 1  # the kill came before client 1 could confirm the step-2 checkpoint

    # every SuperNode alive again: the same call resumes from the last committed checkpoint
    time.sleep(2.0)
    assert not [p for p in seen_procs.values() if _alive(p)], "a process of the first attempt survived"
    res = run_fedbone_flower(cfg, engine="deployment", run_dir=run_dir, client_state_root=clients,
                             timeout_s=HARD_LIMIT_S - 60, progress=False)
    flower = read_json(run_dir / RESULT_FILE)
    assert res.resumed_from == last_commit and flower["resumed_from"] == last_commit
    assert flower["interrupted_fault_log"] == seen  # every fault of the first attempt stays on record
    assert res.fault_log == [] and flower["checkpoints_skipped"] == []
    ref = run_flower_inprocess(cfg)  # uninterrupted, every client present (what the resumed steps had)
    assert flower["final"] == ref["final"]
    state = res.general_model.state_dict()
    from pluribus.federated.core.runtime import FedBoneServer

    ref_server = FedBoneServer(cfg)
    ref_server.load_state_tensors(ref["server_state"])
    for k, v in ref_server.model.state_dict().items():
        assert torch.equal(v, state[k]), k
    from pluribus.io import load_tensors

    got = load_tensors(run_dir / "server_state.safetensors")
    for k, v in ref["server_state"].items():
        assert torch.equal(v, got[k]), k
    import shutil

    shutil.rmtree(work, ignore_errors=True)

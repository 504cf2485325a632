"""Faults keep their true reason: the SuperLink's "node unavailable" replies are transient faults (like a timeout,
never a client error that aborts a checkpoint), every fault is logged with client, step, message type and reason
(metrics.json and the ServerApp log), and resume after such faults stays exact."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, RecordDict

from pluribus.federated import FedBoneConfig, ModelConfig
from pluribus.federated.core.protocol import MSG_EMBED, MSG_HEAD, Fault, Payload
from pluribus.federated.flower.client_app import CKPT_SAVE, make_client_app
from pluribus.federated.flower.server_app import GridTransport, classify_reply, run_flower_inprocess
from pluribus.flower_engines import (
    InProcessGrid,
    ensure_task_identity,
    in_process_node_id,
    superlink_unavailable_reply,
)

TINY = ModelConfig(dim=16, depth=1, heads=2, patch=2, adapter_hidden=16)
CFG = FedBoneConfig(suite="digits", tasks=("digit", "parity"), steps=4, batch_size=8, max_train_per_client=48,
                    model=TINY)
NODE = 7_301_221_404  # a SuperNode id as a SuperLink hands them out


def request(node: int = NODE, message_type: str = MSG_HEAD) -> Message:
    ensure_task_identity()
    msg = Message(RecordDict({"scalars": ConfigRecord({"step": 3})}), node, message_type, group_id="3")
    msg.metadata.__dict__["_message_id"] = "m" * 64  # as a pushed message has one
    return msg


def test_superlink_unavailable_replies_are_transient_with_their_true_reason() -> None:
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

    msg = request()
    dead = superlink_unavailable_reply(msg)
    # what flwr's SuperLink sends: its own node id as sender, pointing at our request
    assert dead.metadata.src_node_id == SUPERLINK_NODE_ID and dead.metadata.reply_to_message_id == "m" * 64
    fault = classify_reply(dead, NODE)
    assert fault is not None and fault.kind == "unavailable" and fault.transient
    assert fault.reason.startswith("node unavailable") and "heartbeat" in fault.reason
    expired = classify_reply(create_message_error_unavailable_res_message(msg.metadata, "msg_unavail"), NODE)
    assert expired is not None and expired.kind == "unavailable" and "reply message unavailable" in expired.reason
    # the client's own error reply (a reply takes the request's destination as its sender): not transient
    client_error = Message(Error(code=2, reason="ShapeError: bad"), reply_to=msg)
    got = classify_reply(client_error, NODE)
    assert got is not None and got.kind == "error" and not got.transient and "ShapeError" in got.reason
    ok = Message(RecordDict(), reply_to=msg)
    assert ok.metadata.src_node_id == NODE
    assert classify_reply(ok, NODE) is None
    ok.metadata.__dict__["_src_node_id"] = NODE + 1  # someone else's answer is never used
    stray = classify_reply(ok, NODE)
    assert stray is not None and stray.kind == "error" and "expected node" in stray.reason


def test_grid_transport_matches_superlink_replies_to_the_dead_client() -> None:
    dead = in_process_node_id(1)
    grid = InProcessGrid(make_client_app(CFG), 2, unavailable=lambda m: m.metadata.dst_node_id == dead)
    transport = GridTransport(grid, {c: in_process_node_id(c) for c in range(2)}, timeout_s=5.0)
    out = transport.call(MSG_EMBED, {0: Payload(scalars={"step": 0}), 1: Payload(scalars={"step": 0})}, step=0)
    assert isinstance(out[0], Payload)
    assert isinstance(out[1], Fault) and out[1].kind == "unavailable" and not out[1].reason.startswith("timeout")


def unavailable_at(client: int, steps: set[int]):  # noqa: ANN201
    """SuperLink-style unavailable replies for every message to ``client`` in these steps (group id = step)."""
    node = in_process_node_id(client)
    return lambda m: m.metadata.dst_node_id == node and m.metadata.group_id in {str(s) for s in steps}


class Crash(RuntimeError):
    pass


def test_unavailable_node_skips_checkpoint_is_logged_and_resume_is_exact(tmp_path: Path) -> None:
    from pluribus.io import read_json

    cfg = replace(CFG, checkpoint_every=2)
    hook = unavailable_at(1, {1, 2})  # client 1's SuperNode is gone for steps 1-2, incl. the step-2 checkpoint
    handler = logging.Handler()
    lines: list[str] = []
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("flwr").addHandler(handler)
    try:
        full = run_flower_inprocess(cfg, unavailable=hook, run_dir=tmp_path / "full")
    finally:
        logging.getLogger("flwr").removeHandler(handler)
    assert full["checkpoints_skipped"] == [2]  # skipped, not aborted as a client error would
    log = full["fault_log"]
    assert {(r["step"], r["client"], r["message_type"], r["kind"]) for r in log} == {
        (1, 1, MSG_EMBED, "unavailable"), (2, 1, MSG_EMBED, "unavailable"), (2, 1, CKPT_SAVE, "unavailable")}
    assert all("Node Unavailable" in r["reason"] for r in log)
    from pluribus.federated.flower.run import flower_run_result

    assert flower_run_result(cfg, full, 0.0, None).fault_log == log  # what run_fedbone_flower returns carries it too
    metrics = read_json(tmp_path / "full" / "metrics.json")["result"]
    assert metrics["fault_log"] == log and metrics["faults"] == 2
    assert sum("FedBone fault: step 2, client 1, query.checkpoint_save, unavailable" in s for s in lines) == 1

    # checkpoints every step: those after steps 0 and 1 (group ids 1, 2) are skipped, the one after step 2 is
    # committed; the server crashes in step 3 and resumes there, with the same faults as an uninterrupted run
    every = replace(cfg, checkpoint_every=1)

    def crash_then(m: Message) -> bool:
        if m.metadata.message_type == MSG_EMBED and m.metadata.group_id == "3":
            raise Crash("simulated server crash")
        return hook(m)

    run_dir, clients = tmp_path / "run", tmp_path / "clients"
    with pytest.raises(Crash):
        run_flower_inprocess(every, unavailable=crash_then, run_dir=run_dir, client_state_root=clients)
    ref = run_flower_inprocess(every, unavailable=hook, run_dir=tmp_path / "ref")
    resumed = run_flower_inprocess(every, unavailable=hook, run_dir=run_dir, client_state_root=clients)
    assert resumed["resumed_from"] == 3 and ref["checkpoints_skipped"] == [1, 2]
    assert resumed["final"] == ref["final"]
    for k, v in ref["server_state"].items():
        assert torch.equal(v, resumed["server_state"][k]), k
    assert resumed["fault_log"] == ref["fault_log"]


def test_client_error_at_checkpoint_still_stops_the_run(tmp_path: Path) -> None:
    from pluribus.errors import PluribusError

    cfg = replace(CFG, steps=2, checkpoint_every=1)
    with pytest.raises(PluribusError, match="client checkpoints at step 1 failed"):
        # no state directory for the clients: their checkpoint_save raises ConfigError -> an error reply
        grid = InProcessGrid(make_client_app(cfg), 2)
        run_flower_inprocess(cfg, run_dir=tmp_path / "run", grid=grid)


def test_the_client_worker_needs_the_deployment_engine() -> None:
    from pluribus.errors import ConfigError
    from pluribus.federated.flower.run import run_fedbone_flower

    with pytest.raises(ConfigError, match="worker.*deployment"):
        run_fedbone_flower(CFG, engine="inprocess", worker=True)

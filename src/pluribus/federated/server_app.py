"""FedBone's Flower ServerApp: a custom main loop over the Message API (no Strategy, no FedAvg).

The loop is ``runtime.train_step`` / ``runtime.evaluate_clients`` with a ``GridTransport``: each exchange is one
``grid.send_and_receive`` with a timeout; a client that does not answer in time, or answers with an error, is
left out of that step and logged. ``InProcessGrid`` runs the same ServerApp and ClientApp in one process with no
SuperLink (for tests and for measuring the Flower path's overhead against direct calls).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run

from pluribus.errors import PluribusError
from pluribus.federated.client_app import HELLO, config_from_context
from pluribus.federated.config import FedBoneConfig
from pluribus.federated.protocol import (
    ByteMeter,
    Fault,
    Payload,
    decode_payload,
    encode_payload,
    record_bytes,
)
from pluribus.federated.runtime import FedBoneServer, evaluate_clients, train_step

ResultSink = Callable[[dict[str, Any]], None]
RESULT_FILE = "flower_result.json"
SERVER_STATE_FILE = "server_state.safetensors"


class GridTransport:
    """FedBone messages over a Flower Grid: one send_and_receive per exchange, with a timeout."""

    def __init__(self, grid: Grid, node_of: dict[int, int], timeout_s: float) -> None:
        self.grid, self.node_of, self.timeout_s = grid, node_of, timeout_s
        self.client_of = {n: c for c, n in node_of.items()}
        self.record_bytes = 0

    def call(self, message_type: str, requests: dict[int, Payload], step: int) -> dict[int, Payload | Fault]:
        """Send each client its request; collect replies until all arrive or the timeout passes."""
        messages = []
        for client, payload in requests.items():
            content = encode_payload(payload)
            self.record_bytes += record_bytes(content)
            messages.append(Message(content, self.node_of[client], message_type, group_id=str(step)))
        replies = self.grid.send_and_receive(messages, timeout=self.timeout_s) if messages else []
        out: dict[int, Payload | Fault] = {c: Fault(f"timeout after {self.timeout_s} s") for c in requests}
        for reply in replies:
            sender = self.client_of.get(reply.metadata.src_node_id)
            if sender is None or sender not in requests:
                continue
            if reply.has_error():
                out[sender] = Fault(f"client error: {reply.error.reason}")
                continue
            self.record_bytes += record_bytes(reply.content)
            try:
                out[sender] = decode_payload(reply.content)
            except PluribusError as err:
                out[sender] = Fault(str(err))
        return out


def discover_clients(grid: Grid, num_clients: int, timeout_s: float) -> tuple[dict[int, int], dict[int, int]]:
    """(client index -> node id, client index -> training-set size), by asking every node (waits for them)."""
    deadline = time.monotonic() + timeout_s
    nodes: list[int] = []
    while time.monotonic() < deadline:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= num_clients:
            break
        time.sleep(0.2)
    if len(nodes) < num_clients:
        raise PluribusError(f"only {len(nodes)} of {num_clients} client nodes connected within {timeout_s} s")
    from flwr.app import ConfigRecord

    hello = [Message(RecordDict({"info": ConfigRecord({})}), n, HELLO) for n in nodes]
    node_of: dict[int, int] = {}
    sizes: dict[int, int] = {}
    for reply in grid.send_and_receive(hello, timeout=timeout_s):
        if reply.has_error():
            raise PluribusError(f"node {reply.metadata.src_node_id} failed the hello: {reply.error.reason}")
        index = int(reply.content.config_records["info"]["index"])  # type: ignore[arg-type]
        if index in node_of:
            raise PluribusError(f"two nodes claim client index {index}; give each SuperNode its own partition-id")
        node_of[index] = reply.metadata.src_node_id
        sizes[index] = int(reply.content.config_records["info"]["num_train"])  # type: ignore[arg-type]
    missing = sorted(set(range(num_clients)) - set(node_of))
    if missing:
        raise PluribusError(f"no node answered for client index(es) {missing}")
    return node_of, sizes


def run_server(grid: Grid, config: FedBoneConfig) -> dict[str, Any]:
    """FedBone's server loop over a Grid; returns final metrics, bytes and per-step times."""
    node_of, sizes = discover_clients(grid, config.num_clients, max(config.timeout_s, 10.0))
    transport = GridTransport(grid, node_of, config.timeout_s)
    server = FedBoneServer(config)
    meter = ByteMeter()
    pending: dict = {}
    clients = list(range(config.num_clients))
    faults = quarantined = 0
    step_times = []
    conflicts: list[float] = []
    for step in range(config.steps):
        t0 = time.perf_counter()
        log = train_step(server, transport, clients, step, pending, meter, sizes)
        step_times.append(time.perf_counter() - t0)
        faults += len(log.faults)
        quarantined += len(log.quarantined)
        if log.stats is not None:
            conflicts.append(log.stats.conflict_fraction)
    final = evaluate_clients(server, transport, clients, pending, meter, config.steps)
    return {
        "final": {f"{c}:{config.tasks[c]}": v for c, v in final.items()},
        "bytes": {**meter.as_dict(), "per_step_train": meter.total("train") / max(config.steps, 1)},
        "record_bytes": transport.record_bytes,
        "step_times": step_times,
        "faults": faults,
        "quarantined": quarantined,
        "mean_conflict_fraction": sum(conflicts) / len(conflicts) if conflicts else float("nan"),
        "server_state": server.state_tensors(),
    }


def write_flower_app(folder: str | Path, config: FedBoneConfig, *, run_dir: str | Path | None = None) -> Path:
    """Write a Flower App folder (pyproject.toml) that runs FedBone with ``config`` under ``flwr run``.

    The components point at this package's apps; the config travels as the app's flattened run_config, and
    the ServerApp writes ``flower_result.json`` into ``run_dir`` when given.
    """
    import tomli_w

    from pluribus.config import flatten_config
    from pluribus.io import write_text

    if config.features_path:  # the ClientApp processes may start in another directory
        from dataclasses import replace

        config = replace(config, features_path=str(Path(config.features_path).resolve()))
    run_config: dict[str, Any] = dict(flatten_config(config))
    if run_dir is not None:
        run_config["run-dir"] = str(Path(run_dir).resolve())
    doc = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "pluribus-fedbone", "version": "1.0.0", "description": "FedBone on Flower",
                    "license": "Apache-2.0", "dependencies": []},
        "tool": {"hatch": {"build": {"targets": {"wheel": {"packages": ["."]}}}},
                 "flwr": {"app": {"publisher": "pluribus",
                                  "components": {"serverapp": "pluribus.federated.server_app:app",
                                                 "clientapp": "pluribus.federated.client_app:app"},
                                  "config": run_config}}},
    }
    path = Path(folder) / "pyproject.toml"
    write_text(path, tomli_w.dumps(doc))
    return path


def make_server_app(config: FedBoneConfig | None = None, on_result: ResultSink | None = None) -> ServerApp:
    """A ServerApp running FedBone; ``config`` None reads it from the run_config; results go to ``on_result``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = config if config is not None else config_from_context(context)
        result = run_server(grid, cfg)
        run_dir = context.run_config.get("run-dir")
        if run_dir:
            from pluribus.io import save_tensors, write_json

            save_tensors(f"{run_dir}/{SERVER_STATE_FILE}", result["server_state"])
            write_json(f"{run_dir}/{RESULT_FILE}", {k: v for k, v in result.items() if k != "server_state"})
        if on_result is not None:
            on_result(result)

    return app


app = make_server_app()


class InProcessGrid(Grid):
    """A Grid that delivers messages to ClientApps in this process (one Context per node; no SuperLink).

    ``drop(node_id, message_type)`` returning True makes that node not answer (a timeout, as far as the server
    can tell). A ClientApp exception becomes an error reply, as in Flower's runtimes.
    """

    def __init__(self, client_app: ClientApp, num_nodes: int, *, drop: Callable[[int, str], bool] | None = None,
                 run_id: int = 1) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        for attr, value in (("run_id", run_id), ("node_id", 0), ("task_id", 1)):
            if getattr(TaskIdentity, f"_{attr}") is None:
                setattr(TaskIdentity, attr, value)
        self.client_app, self.drop = client_app, drop
        self._run = Run.create_empty(run_id=run_id)
        self.contexts = {n + 1: Context(run_id=run_id, node_id=n + 1,
                                        node_config={"partition-id": n, "num-partitions": num_nodes},
                                        state=RecordDict(), run_config={}) for n in range(num_nodes)}
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        """Set the run."""
        self._run = run

    @property
    def run(self) -> Run:
        """The run."""
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        """A new message (deprecated in Flower; kept for the abstract interface)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """All in-process nodes."""
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message at once and keep the reply for pull_messages."""
        ids = []
        for msg in messages:
            msg_id = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = msg_id
            ids.append(msg_id)
            node = msg.metadata.dst_node_id
            if self.drop is not None and self.drop(node, msg.metadata.message_type):
                continue
            try:
                reply = self.client_app(msg, self.contexts[node])
            except Exception as err:  # a ClientApp failure is an error reply, not a server crash
                reply = Message(Error(code=2, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            self._replies[msg_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Replies that arrived for these messages."""
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push and pull at once (delivery is synchronous; a dropped message simply has no reply)."""
        return self.pull_messages(self.push_messages(messages))


def run_flower_inprocess(config: FedBoneConfig, *, drop: Callable[[int, str], bool] | None = None) -> dict[str, Any]:
    """Run FedBone's ServerApp and ClientApps over ``InProcessGrid``; returns the server's result."""
    from pluribus.federated.client_app import make_client_app

    results: list[dict[str, Any]] = []
    server_app = make_server_app(config, on_result=results.append)
    grid = InProcessGrid(make_client_app(config), config.num_clients, drop=drop)
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    return results[0]

"""FedBone's Flower ServerApp: a custom main loop over the Message API (no Strategy, no FedAvg).

The loop is ``runtime.train_step`` / ``runtime.evaluate_clients`` with a ``GridTransport``: each exchange is one
``flower_engines.exchange_messages`` round trip with a timeout; a client that does not answer in time, answers
with an error, or is reported unavailable by the SuperLink, is left out of that step and logged. The Grid
plumbing (``InProcessGrid``, which runs the same ServerApp and ClientApp in one process with no SuperLink, node
discovery, the App folder's pyproject, the in-process runner) is :mod:`pluribus.flower_engines`, shared with
PrivFusion.

With a run folder (``run_dir``, or the run_config key ``run-dir``) the server checkpoints *its own* state
every ``config.checkpoint_every`` steps: general model, optimizer, aggregation history, the embedding gradients
it still owes, byte meter, counters and the step (``checkpoints/flower_server.*``). Just before, it asks every
client to checkpoint its own state (``query.checkpoint_save``) to the client's state directory, which the
server never reads; the server commits its checkpoint only when every client confirmed. A rerun on the same
folder loads the server checkpoint and sends ``query.checkpoint_restore`` with that step: a client that cannot
restore it makes the server stop with a ``PluribusError`` naming the client, never train on mismatched state.
Every fault is also journaled as it happens (``fault_journal.json``): the faults an interrupted attempt met
after its last committed checkpoint are not in that checkpoint, and a resumed run reports them as
``interrupted_fault_log`` (its ``fault_log`` is the resumed run's own history, as an uninterrupted run's).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.common.logger import log as log_flower
from flwr.serverapp import Grid, ServerApp

from pluribus.errors import PluribusError
from pluribus.federated.core.config import FedBoneConfig
from pluribus.federated.core.protocol import (
    RUN_KEY,
    STEP_KEY,
    ByteMeter,
    Fault,
    Payload,
    Scalar,
    decode_payload,
    encode_payload,
    record_bytes,
)
from pluribus.federated.core.runtime import (
    FedBoneServer,
    LoopTally,
    Owed,
    evaluate_clients,
    fault_record,
    load_server_checkpoint_tensors,
    server_checkpoint_tensors,
    train_exchange,
)
from pluribus.federated.flower.client_app import CKPT_RESTORE, CKPT_SAVE, HELLO, config_from_context
from pluribus.flower_engines import (
    InProcessGrid,
    exchange_messages,
    reply_problem,
    run_server_app_inprocess,
    wait_for_nodes,
    write_app_pyproject,
)

ResultSink = Callable[[dict[str, Any]], None]
ClientInfo = dict[int, dict[str, Any]]  # client index -> its hello (client_app.HELLO_FIELDS)
RESULT_FILE = "flower_result.json"
SERVER_STATE_FILE = "server_state.safetensors"
SERVER_CHECKPOINT = "flower_server"
FAULT_JOURNAL = "fault_journal.json"
DEFAULT_POLL_S = 0.1


def classify_reply(reply: Message, node: int) -> Fault | None:
    """The fault a reply stands for (None: a usable reply from ``node``, the request's destination).

    The SuperLink's own error reply for a node that stopped sending heartbeats, or for a message or reply that
    expired, is a transient "unavailable" fault (like a timeout: the client was absent, not broken); an error
    reply from the client itself is an "error" fault; a reply from any other node is not this client's answer
    ("error" too, never used). The judging is :func:`pluribus.flower_engines.reply_problem`, PrivFusion's too.
    """
    problem = reply_problem(reply, node)
    return None if problem is None else Fault(problem[1], kind=problem[0])


class GridTransport:
    """FedBone messages over a Flower Grid: one exchange = push all requests, pull replies until all arrived or
    ``timeout_s`` passed, polling every ``poll_s`` seconds (None: every 3 s, as Flower's ``send_and_receive``).
    A Grid with ``synchronous = True`` (``InProcessGrid``) answers inside the push: one pull, no waiting.

    Replies are matched to requests by ``reply_to_message_id`` (not by sender), so the SuperLink's own error
    replies for a dead node reach the right client as an "unavailable" fault with their true reason; a reply that
    comes after the timeout answers a message id nobody waits for any more and is never used. Every request is
    tagged with its ``step`` (unless it has one) and, when set, the server's ``run`` token, which the client
    echoes (``runtime.check_echo`` judges the echo). Every request lives ``timeout_s`` (its Flower ``ttl``): the
    SuperLink drops a request nobody waits for any more instead of keeping it for Flower's default 12 hours, and
    refuses a reply made after it expired.
    """

    def __init__(self, grid: Grid, node_of: dict[int, int], timeout_s: float, *,
                 poll_s: float | None = DEFAULT_POLL_S, run: str = "") -> None:
        self.grid, self.node_of, self.timeout_s, self.poll_s, self.run = grid, node_of, timeout_s, poll_s, run
        self.client_of = {n: c for c, n in node_of.items()}
        self.record_bytes = 0

    def call(self, message_type: str, requests: dict[int, Payload], step: int) -> dict[int, Payload | Fault]:
        """Send each client its request; collect replies until all arrive or the timeout passes."""
        clients, messages = list(requests), []
        tags: dict[str, Scalar] = {STEP_KEY: step, **({RUN_KEY: self.run} if self.run else {})}
        for client in clients:
            request = requests[client]
            content = encode_payload(Payload(request.tensors, {**tags, **request.scalars}))
            self.record_bytes += record_bytes(content)
            messages.append(Message(content, self.node_of[client], message_type, ttl=self.timeout_s,
                                    group_id=str(step)))
        out: dict[int, Payload | Fault] = {
            c: Fault(f"timeout after {self.timeout_s} s", kind="timeout") for c in requests}
        if not messages:
            return out
        replies = exchange_messages(self.grid, messages, self.timeout_s, poll_s=self.poll_s)
        for client, reply in zip(clients, replies.values(), strict=True):
            if reply is None:
                continue
            fault = classify_reply(reply, self.node_of[client])
            if fault is not None:
                out[client] = fault
                continue
            self.record_bytes += record_bytes(reply.content)
            try:
                out[client] = decode_payload(reply.content)
            except PluribusError as err:
                out[client] = Fault(str(err))
        return out


def discover_clients(grid: Grid, num_clients: int, timeout_s: float, *, poll_s: float | None = DEFAULT_POLL_S,
                     tasks: Sequence[str] | None = None) -> tuple[dict[int, int], dict[int, int], ClientInfo]:
    """(client index -> node id, client index -> training-set size, client index -> what its hello said), by
    asking every node (waits for them; each hello lives ``timeout_s``).

    The hello is all the server learns of a client's data (``client_app.HELLO_FIELDS``: task name, kind, input kind,
    output size, train and test counts, primary metric); it opens no data file. With ``tasks`` (the config's, one
    per client) a client whose data hold another task stops the run here, before any step: PluribusError naming
    the client, its node and both tasks.
    """
    from flwr.app import ConfigRecord

    try:
        nodes = wait_for_nodes(grid, num_clients, timeout_s)
    except PluribusError as err:
        raise PluribusError(f"client nodes: {err}") from None
    hello = [Message(RecordDict({"info": ConfigRecord({})}), n, HELLO, ttl=timeout_s) for n in nodes]
    node_of: dict[int, int] = {}
    sizes: dict[int, int] = {}
    info: ClientInfo = {}
    for msg, reply in zip(hello, exchange_messages(grid, hello, timeout_s, poll_s=poll_s).values(), strict=True):
        node = msg.metadata.dst_node_id
        if reply is None:
            continue  # reported below as a client index nobody answered for
        fault = classify_reply(reply, node)
        if fault is not None:
            raise PluribusError(f"node {node} failed the hello: {fault.reason}")
        index = int(reply.content.config_records["info"]["index"])  # type: ignore[arg-type]
        if index in node_of:
            raise PluribusError(f"two nodes claim client index {index}; give each SuperNode its own partition-id")
        said = dict(reply.content.config_records["info"])
        if tasks is not None and 0 <= index < len(tasks) and said.get("task", tasks[index]) != tasks[index]:
            raise PluribusError(f"client {index} (node {node}) holds data of task {said['task']!r}; the server's "
                                f"config gives client {index} task {tasks[index]!r}")
        node_of[index] = node
        sizes[index] = int(said["num_train"])  # type: ignore[arg-type]
        info[index] = said
    missing = sorted(set(range(num_clients)) - set(node_of))
    if missing:
        raise PluribusError(f"no node answered for client index(es) {missing}")
    return node_of, sizes, info


def _all_confirmed(replies: dict[int, Payload | Fault], what: str) -> tuple[bool, list[str]]:
    """(every client replied, the absent clients' reasons); an error reply raises PluribusError, while a transient
    fault (timeout, a node the SuperLink reports unavailable) only makes it False."""
    errors = [f"client {c}: {r.reason}" for c, r in sorted(replies.items())
              if isinstance(r, Fault) and not r.transient]
    if errors:
        raise PluribusError(f"{what} failed: " + "; ".join(errors))
    missing = [f"client {c}: {r.reason}" for c, r in sorted(replies.items()) if isinstance(r, Fault)]
    return not missing, missing


def run_server(grid: Grid, config: FedBoneConfig, *, run_dir: str | Path | None = None, resume: bool = True,
               progress: bool = False, poll_s: float | None = DEFAULT_POLL_S) -> dict[str, Any]:
    """FedBone's server loop over a Grid; returns final metrics, bytes and per-step times.

    With ``run_dir`` it writes a run folder (config, metrics, report, result) and checkpoints/resumes as the
    module docstring describes (``config.checkpoint_every`` steps apart; 0 = no checkpoints).
    """
    from pluribus.runs import RunFolder

    # the clients first: one that cannot serve this run (no data of its own, another institution's, another task)
    # stops it before anything is written
    node_of, sizes, clients_said = discover_clients(grid, config.num_clients, max(config.timeout_s, 10.0),
                                                    poll_s=poll_s, tasks=config.tasks)
    folder = RunFolder(run_dir, config, resume=resume) if run_dir is not None else None
    transport = GridTransport(grid, node_of, config.timeout_s, poll_s=poll_s)
    server = FedBoneServer(config)
    meter = ByteMeter()
    pending: Owed = {}
    clients = list(range(config.num_clients))
    tally = LoopTally()
    token = uuid.uuid4().hex[:16]  # names this run's client checkpoints; kept across resumes
    resumed_from: int | None = None
    ckpt = folder.load_checkpoint(SERVER_CHECKPOINT) if folder is not None else None
    if ckpt is not None:
        tensors, meta = ckpt
        tally = LoopTally.from_checkpoint_meta(meta, meter)
        pending = load_server_checkpoint_tensors(server, tensors)
        token = str(meta["token"])
        resumed_from = tally.next_step
        transport.run = token
        request = Payload(scalars={"step": resumed_from, "token": token})
        replies = transport.call(CKPT_RESTORE, {c: request for c in clients}, resumed_from)
        ok, missing = _all_confirmed(replies, f"resuming {run_dir} at step {resumed_from}")
        if not ok:
            raise PluribusError(f"resuming {run_dir} at step {resumed_from}: no answer from " + "; ".join(missing))
    transport.run = token  # every request carries it: a client answers only the run it serves
    committed = resumed_from if resumed_from is not None else -1
    journal = _FaultJournal(folder.path / FAULT_JOURNAL if folder is not None else None)
    interrupted = journal.not_in(tally.fault_log)  # faults of earlier attempts in steps this run redoes
    skipped: list[int] = []
    step_times: list[float] = []
    per_message = config.micro_batches_per_message
    steps: Iterable[int] = range(tally.next_step, config.steps, per_message)
    if progress:
        from pluribus.progress import track

        steps = track(steps, total=len(range(tally.next_step, config.steps, per_message)),
                      description="fedbone (flower)")
    for step in steps:
        count = min(per_message, config.steps - step)
        t0 = time.perf_counter()
        logs = train_exchange(server, transport, clients, step, pending, meter, sizes, count=count)
        step_times.extend([(time.perf_counter() - t0) / count] * count)  # per global step
        for log in logs:
            tally.record(log)
            _log_faults(log.fault_records, journal)
        done = tally.next_step = step + count
        if config.eval_every and done % config.eval_every == 0 and done < config.steps:
            from pluribus.federated.studies.simulate import mean_train_loss

            metrics = _evaluate(server, transport, clients, pending, meter, done, tally, journal)
            tally.curve.append({"step": done, "metrics": {f"{c}:{config.tasks[c]}": v for c, v in metrics.items()},
                                "train_loss": mean_train_loss(log)})
        if folder is not None and config.checkpoint_every and done % config.checkpoint_every == 0:
            request = Payload(scalars={"step": done, "token": token, "keep": committed})
            replies = transport.call(CKPT_SAVE, {c: request for c in clients}, done)
            records = [fault_record(done, c, CKPT_SAVE, r) for c, r in sorted(replies.items()) if isinstance(r, Fault)]
            tally.fault_log.extend(records)
            _log_faults(records, journal)
            ok, _ = _all_confirmed(replies, f"client checkpoints at step {done}")
            if ok:  # commit only when every client holds its state for this step
                folder.save_checkpoint(SERVER_CHECKPOINT, server_checkpoint_tensors(server, pending),
                                       {**tally.checkpoint_meta(meter), "token": token})
                committed = done
            else:
                skipped.append(done)
                log_flower(WARNING, "FedBone: checkpoint at step %d skipped (not every client confirmed)", done)
    final_raw = _evaluate(server, transport, clients, pending, meter, config.steps, tally, journal)
    final = {f"{c}:{config.tasks[c]}": v for c, v in final_raw.items()}
    tally.curve.append({"step": config.steps, "metrics": final})
    result = {
        "final": final,
        "curve": tally.curve,
        "bytes": {**meter.as_dict(), "per_step_train": meter.total("train") / max(config.steps, 1)},
        "record_bytes": transport.record_bytes,
        "step_times": step_times,
        "steps_done": config.steps,
        "resumed_from": resumed_from,
        "checkpoints_skipped": skipped,
        "faults": tally.faults,
        "fault_log": tally.fault_log,
        "interrupted_fault_log": interrupted,
        "quarantined": tally.quarantined,
        "mean_conflict_fraction": tally.mean_conflict_fraction,
        "clients": {str(c): clients_said[c] for c in sorted(clients_said)},  # what the hellos said, nothing more
        "server_state": server.state_tensors(),
    }
    if folder is not None:
        _write_folder(folder, config, result, server_checkpoint_tensors(server, pending))
    return result


class _FaultJournal:
    """Every fault of every attempt on a run folder, rewritten atomically as faults happen (None: no folder)."""

    def __init__(self, path: Path | None) -> None:
        from pluribus.io import read_json

        self.path = path
        self.records: list[dict[str, Any]] = (
            [dict(r) for r in read_json(path)] if path is not None and path.exists() else [])

    def not_in(self, log: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The journaled faults that ``log`` (a checkpoint's fault log) lacks, each occurrence counted once."""
        left = list(log)
        out = []
        for r in self.records:
            if r in left:
                left.remove(r)
            else:
                out.append(r)
        return out

    def add(self, records: list[dict[str, Any]]) -> None:
        """Append ``records`` and rewrite the journal (atomically)."""
        if self.path is None or not records:
            return
        from pluribus.io import write_json

        self.records.extend(dict(r) for r in records)
        write_json(self.path, self.records)


def _log_faults(records: list[dict[str, Any]], journal: _FaultJournal | None = None) -> None:
    """One ServerApp log line per fault: step, client, message type, kind and the true reason (and journaled)."""
    if journal is not None:
        journal.add(records)
    for r in records:
        log_flower(WARNING, "FedBone fault: step %s, client %s, %s, %s: %s", r["step"], r["client"],
                   r["message_type"], r["kind"], r["reason"])


def _evaluate(server: FedBoneServer, transport: GridTransport, clients: list[int], pending: Owed, meter: ByteMeter,
              step: int, tally: LoopTally, journal: _FaultJournal | None = None) -> dict[int, dict[str, float] | str]:
    """``evaluate_clients``, its faults kept in the tally's fault log, the ServerApp log and the journal."""
    before = len(tally.fault_log)
    out = evaluate_clients(server, transport, clients, pending, meter, step, tally.fault_log)
    _log_faults(tally.fault_log[before:], journal)
    return out


def _write_folder(folder: Any, config: FedBoneConfig, result: dict[str, Any], tensors: dict[str, Any]) -> None:
    """The run folder's result files: metrics, report and final checkpoint (as ``run_fedbone``), then the server
    state and ``flower_result.json`` (written last: its presence means the run finished)."""
    from pluribus.federated.studies.results import RunResult, write_run_folder
    from pluribus.io import save_tensors, write_json

    run = RunResult(config=config, tasks=list(config.tasks), curve=result["curve"], bytes=result["bytes"],
                    final={k: v for k, v in result["final"].items() if isinstance(v, dict)},
                    faults=result["faults"], quarantined=result["quarantined"], fault_log=result["fault_log"],
                    interrupted_fault_log=list(result.get("interrupted_fault_log", [])),
                    mean_conflict_fraction=result["mean_conflict_fraction"], wall_s=float(sum(result["step_times"])),
                    steps_done=result["steps_done"])
    write_run_folder(folder, run, tensors)
    save_tensors(folder.path / SERVER_STATE_FILE, result["server_state"])
    write_json(folder.path / RESULT_FILE, {k: v for k, v in result.items() if k != "server_state"})


def write_flower_app(folder: str | Path, config: FedBoneConfig, *, run_dir: str | Path | None = None,
                     client_state_root: str | Path | None = None, poll_s: float = DEFAULT_POLL_S) -> Path:
    """Write a Flower App folder (pyproject.toml) that runs FedBone with ``config`` under ``flwr run``.

    The components point at this package's apps; the config travels as the app's flattened run_config. With
    ``run_dir`` the ServerApp keeps a resumable run folder there (``flower_result.json`` marks a finished run);
    ``client_state_root`` is where clients whose SuperNode has no ``state-dir`` node config keep checkpoints
    (``<root>/partition-<K>``, on each client's machine); ``poll_s`` is the server's reply polling interval.
    """
    from pluribus.config import flatten_config

    if config.features_path:  # the ClientApp processes may start in another directory
        from dataclasses import replace

        config = replace(config, features_path=str(Path(config.features_path).resolve()))
    run_config: dict[str, Any] = dict(flatten_config(config))
    if run_dir is not None:
        run_config["run-dir"] = str(Path(run_dir).resolve())
    if client_state_root is not None:
        run_config["client-state-root"] = str(Path(client_state_root).resolve())
    run_config["poll-s"] = float(poll_s)
    return write_app_pyproject(folder, name="pluribus-fedbone", description="FedBone on Flower",
                               serverapp="pluribus.federated.flower.server_app:app",
                               clientapp="pluribus.federated.flower.client_app:app", run_config=run_config)


def make_server_app(config: FedBoneConfig | None = None, on_result: ResultSink | None = None, *,
                    run_dir: str | Path | None = None, resume: bool = True, progress: bool = False,
                    poll_s: float | None = None) -> ServerApp:
    """A ServerApp running FedBone; ``config`` None reads it from the run_config; results go to ``on_result``.

    ``run_dir`` None reads the run_config key ``run-dir`` (a resumable run folder; none: no files written);
    ``poll_s`` None reads ``poll-s`` (default 0.1 s; 0 = Flower's send_and_receive).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = config if config is not None else config_from_context(context)
        folder = run_dir if run_dir is not None else (context.run_config.get("run-dir") or None)
        poll = poll_s if poll_s is not None else float(context.run_config.get("poll-s", DEFAULT_POLL_S))
        result = run_server(grid, cfg, run_dir=None if folder is None else str(folder),
                            resume=bool(context.run_config.get("resume", resume)), progress=progress,
                            poll_s=poll if poll > 0 else None)
        if on_result is not None:
            on_result(result)

    return app


app = make_server_app()


def run_flower_inprocess(
    config: FedBoneConfig, *, drop: Callable[[int, str], bool] | None = None, run_dir: str | Path | None = None,
    resume: bool = True, client_state_root: str | Path | None = None, grid: InProcessGrid | None = None,
    progress: bool = False, unavailable: Callable[[Message], bool] | None = None,
    data_files: Sequence[str | Path] | None = None,
) -> dict[str, Any]:
    """Run FedBone's ServerApp and ClientApps over ``InProcessGrid``; returns the server's result.

    ``drop`` and ``unavailable`` inject faults (see ``InProcessGrid``).
    ``run_dir``: the server's resumable run folder; the clients then keep their checkpoints under
    ``client_state_root`` (default ``<run_dir>/clients``), in ``partition-<K>`` folders. ``grid`` reuses a grid
    (its clients keep their ``Context.state``: a server-only restart). ``data_files[K]``: client K's own data
    file (its node_config ``data-file``); the server never reads it.
    """
    from pluribus.federated.flower.client_app import make_client_app

    if client_state_root is None and run_dir is not None:
        client_state_root = Path(run_dir) / "clients"
    results: list[dict[str, Any]] = []
    server_app = make_server_app(config, on_result=results.append, run_dir=run_dir, resume=resume,
                                 progress=progress, poll_s=0)
    if grid is None:
        node_configs = None if data_files is None else [{"data-file": str(Path(f).resolve())} for f in data_files]
        grid = InProcessGrid(make_client_app(config), config.num_clients, drop=drop, state_root=client_state_root,
                             unavailable=unavailable, node_configs=node_configs)
    run_server_app_inprocess(server_app, grid)
    return results[0]

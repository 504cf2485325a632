"""The one layer that launches Flower engines, shared by FedBone and PrivFusion.

Each system brings its own ServerApp and ClientApp; this module only runs them:

- **in-process**: :class:`InProcessGrid` delivers every message to the ClientApp in this process (one
  ``Context`` per node, no SuperLink): for tests and for measuring the Flower path without transport;
- **simulation**: :func:`run_child` runs a Python child process (which calls :func:`simulate_apps`, Flower's
  Ray simulation engine) in its own session under a hard timeout;
- **deployment**: :func:`run_deployment` starts a SuperLink and one SuperNode per node config on loopback plus
  ``flwr run`` on an app folder written by :func:`write_app_pyproject`, each in its own process session;
  :func:`submit_run` submits such an app to a SuperLink that already runs elsewhere (TLS, nodes already joined;
  hosting and joining one is :mod:`pluribus.deploy`).

Every process started here is stopped by its PID (its session), never by name (:func:`stop_processes`).
:func:`exchange_messages` is the server side of one round trip: push, then pull replies (matched to their
requests by ``reply_to_message_id``) until all arrived or the timeout passed; :func:`reply_problem` says what a
reply stands for (usable, the node's own error, or the SuperLink's "unavailable" for a node that is gone).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run

from pluribus.errors import PluribusError

DropRule = Callable[[int, str], bool]
UnavailableRule = Callable[[Message], bool]
MessageRule = Callable[[Message], bool]
FIRST_NODE_ID = 2  # InProcessGrid's node ids start here: node id 1 is the SuperLink's own (SUPERLINK_NODE_ID)
FLOWER_POLL_S = 3.0  # Grid.send_and_receive's fixed poll interval in flwr 1.42


def in_process_node_id(partition: int) -> int:
    """The node id :class:`InProcessGrid` gives partition ``partition``."""
    return FIRST_NODE_ID + partition


def ensure_task_identity(run_id: int = 1) -> None:
    """Give this process the Flower task identity a Message needs (set by Flower's runtimes; unset in-process)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("run_id", run_id), ("node_id", 0), ("task_id", 1)):
        if getattr(TaskIdentity, f"_{attr}") is None:
            setattr(TaskIdentity, attr, value)


def superlink_unavailable_reply(message: Message) -> Message:
    """The reply a flwr 1.42 SuperLink sends for ``message`` when its destination node is unavailable."""
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

    return create_message_error_unavailable_res_message(message.metadata, "node_unavail")


def reply_problem(reply: Message, node: int) -> tuple[str, str] | None:
    """What is wrong with ``reply`` to a request sent to ``node``: None (a usable reply from ``node``), else
    (kind, reason) with kind "unavailable" or "error".

    The SuperLink answers for a node that stopped sending heartbeats, or for a message or reply that expired,
    with an error reply of its own (sender ``SUPERLINK_NODE_ID``, ``reply_to_message_id`` = the request,
    ``ErrorCode.NODE_UNAVAILABLE`` / ``REPLY_MESSAGE_UNAVAILABLE`` / ``MESSAGE_UNAVAILABLE``; see flwr's
    ``server/superlink/linkstate/utils.py``): "unavailable" (the node was absent, not broken). An error reply
    from the node itself is an "error"; so is a reply from any other node (never to be used).
    """
    from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

    sender = reply.metadata.src_node_id
    if sender == SUPERLINK_NODE_ID and sender != node:
        if not reply.has_error():
            return "error", (f"unexpected non-error reply from the SuperLink (message type "
                             f"{reply.metadata.message_type!r})")
        names = {ErrorCode.NODE_UNAVAILABLE: "node unavailable",
                 ErrorCode.REPLY_MESSAGE_UNAVAILABLE: "reply message unavailable",
                 ErrorCode.MESSAGE_UNAVAILABLE: "message unavailable"}
        what = names.get(reply.error.code, f"SuperLink error code {reply.error.code}")
        return "unavailable", f"{what} (SuperLink, error code {reply.error.code}): {reply.error.reason}"
    if sender != node:
        return "error", f"reply from node {sender}, expected node {node}"
    if reply.has_error():
        return "error", f"client error (code {reply.error.code}): {reply.error.reason}"
    return None


class InProcessGrid(Grid):
    """A Grid that delivers messages to a ClientApp in this process (one Context per node; no SuperLink).

    Partition ``n`` is node ``in_process_node_id(n)`` (ids from 2: id 1 is the SuperLink's) with node_config
    ``partition-id = n``, ``num-partitions``, ``state-dir`` (with ``state_root``: ``<root>/partition-<n>``) and
    the entries of ``node_configs[n]`` (a party's own files, say). Faults to inject: ``drop(node_id,
    message_type)`` True makes that node not answer (a timeout, as far as the server can tell);
    ``unavailable(message)`` True makes the "SuperLink" answer for it with the node-unavailable error reply a
    real SuperLink sends for a SuperNode that stopped its heartbeats (built by flwr's own function);
    ``late(message)`` True makes a slow node: the message is not answered in time (a timeout for the server), but
    the node still handles it, just before the next push's messages, and its reply arrives when nobody waits for
    it any more; ``duplicate(message)`` True delivers the message a second time, just before the next push's
    messages (a request redelivered or replayed). A message is judged by one rule, in that order. Replies that
    arrive after the server stopped waiting, and replies to a second delivery (the SuperLink keeps a message's
    first reply), are kept in ``stray_replies``, never returned by ``pull_messages``. A ClientApp exception
    becomes an error reply, as in Flower's runtimes.
    """

    synchronous = True  # delivery happens inside push_messages: a server need not poll

    def __init__(self, client_app: ClientApp, num_nodes: int, *, drop: DropRule | None = None,
                 unavailable: UnavailableRule | None = None, run_id: int = 1,
                 state_root: str | Path | None = None,
                 node_configs: Sequence[Mapping[str, Any]] | None = None, late: MessageRule | None = None,
                 duplicate: MessageRule | None = None) -> None:
        if node_configs is not None and len(node_configs) != num_nodes:
            raise PluribusError(f"{len(node_configs)} node configs for {num_nodes} nodes")
        ensure_task_identity(run_id)
        self.client_app, self.drop, self.unavailable = client_app, drop, unavailable
        self.late, self.duplicate = late, duplicate
        self._deferred: list[Message] = []  # late or second deliveries, made at the next push
        self.stray_replies: list[Message] = []
        self._run = Run.create_empty(run_id=run_id)

        def node_config(n: int) -> dict[str, Any]:
            extra = {"state-dir": str(Path(state_root) / f"partition-{n}")} if state_root is not None else {}
            own = dict(node_configs[n]) if node_configs is not None else {}
            return {"partition-id": n, "num-partitions": num_nodes, **extra, **own}

        self.contexts = {in_process_node_id(n): Context(run_id=run_id, node_id=in_process_node_id(n),
                                                        node_config=node_config(n), state=RecordDict(), run_config={})
                         for n in range(num_nodes)}
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
        """Deliver each message at once and keep the reply for pull_messages (late and second deliveries of
        earlier messages first)."""
        deferred, self._deferred = self._deferred, []
        for msg in deferred:
            self.stray_replies.append(self._answer(msg))
        ids = []
        for msg in messages:
            msg_id = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = msg_id
            ids.append(msg_id)
            node = msg.metadata.dst_node_id
            if self.drop is not None and self.drop(node, msg.metadata.message_type):
                continue
            if self.unavailable is not None and self.unavailable(msg):
                self._replies[msg_id] = superlink_unavailable_reply(msg)
                continue
            if self.late is not None and self.late(msg):
                self._deferred.append(msg)
                continue
            self._replies[msg_id] = self._answer(msg)
            if self.duplicate is not None and self.duplicate(msg):
                self._deferred.append(msg)
        return ids

    def _answer(self, msg: Message) -> Message:
        """The ClientApp's reply to ``msg`` on its node (a ClientApp failure is an error reply, not a crash)."""
        try:
            return self.client_app(msg, self.contexts[msg.metadata.dst_node_id])
        except Exception as err:
            return Message(Error(code=2, reason=f"{type(err).__name__}: {err}"), reply_to=msg)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Replies that arrived for these messages."""
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push and pull at once (delivery is synchronous; a dropped message simply has no reply)."""
        return self.pull_messages(self.push_messages(messages))


def run_server_app_inprocess(server_app: ServerApp, grid: Grid, run_config: Mapping[str, Any] | None = None) -> None:
    """Run a ServerApp's main loop on ``grid`` in this process."""
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                             run_config=dict(run_config or {})))


def exchange_messages(grid: Grid, messages: Sequence[Message], timeout_s: float, *,
                      poll_s: float | None = 0.1) -> dict[str, Message | None]:
    """Push ``messages`` and pull replies until all arrived or ``timeout_s`` passed, polling every ``poll_s``
    seconds (None: every 3 s, as Flower's ``send_and_receive``; a ``synchronous`` grid: one pull, no waiting).

    Returns {pushed message id: its reply, or None if none came}, in the order of ``messages``. Replies are
    matched by ``reply_to_message_id``, not by sender, so the SuperLink's own error replies for an unavailable
    node (sender: the SuperLink) land on the request they answer; judge them with :func:`reply_problem`.
    """
    if not messages:
        return {}
    ids = list(grid.push_messages(messages))
    synchronous = bool(getattr(grid, "synchronous", False))
    poll = FLOWER_POLL_S if poll_s is None else poll_s
    waiting = set(ids)
    deadline = time.monotonic() + timeout_s
    replies: dict[str, Message] = {}
    while waiting:
        for reply in grid.pull_messages(waiting):
            if reply.metadata.reply_to_message_id in waiting:
                replies[reply.metadata.reply_to_message_id] = reply
        waiting -= set(replies)
        left = deadline - time.monotonic()
        if synchronous or not waiting or left <= 0:
            break
        time.sleep(min(poll, left))
    return {i: replies.get(i) for i in ids}


def wait_for_nodes(grid: Grid, num_nodes: int, timeout_s: float) -> list[int]:
    """The grid's node ids once ``num_nodes`` connected; PluribusError if they did not within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    nodes: list[int] = []
    while time.monotonic() < deadline:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= num_nodes:
            return nodes
        time.sleep(0.2)
    raise PluribusError(f"only {len(nodes)} of {num_nodes} nodes connected within {timeout_s} s")


# ---- processes ------------------------------------------------------------------------------------------

def child_env(poll_s: float = 0.0) -> dict[str, str]:
    """Environment of every engine process: this venv's binaries first, one torch thread, no progress bars."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "PLURIBUS_PROGRESS": "0",
           "RAY_DEDUP_LOGS": "0", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if poll_s > 0:  # how often flower-superexec looks for a task to start (Flower's default: 1 s)
        env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(max(poll_s, 0.01))
    return env


def stop_processes(procs: list[subprocess.Popen[bytes]]) -> None:
    """Stop processes started in their own sessions: SIGTERM each session, then SIGKILL after 15 s."""
    for p in procs:  # each was started in its own session: stop that session's processes only
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=5)


def tail(path: Path, n: int = 3000) -> str:
    """The last ``n`` characters of a log file ('' if unreadable)."""
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def finished_since(path: Path, since_ns: int) -> bool:
    """Whether ``path`` was written at or after ``since_ns`` (a result file marks a finished run)."""
    try:
        return path.stat().st_mtime_ns >= since_ns
    except OSError:
        return False


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, deadline: float, log: Path) -> None:
    """Wait until something listens on 127.0.0.1:``port``; PluribusError with the log tail at ``deadline``."""
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise PluribusError(f"the SuperLink did not listen on 127.0.0.1:{port} in time; log:\n{tail(log)}")


def run_child(cmd: list[str], log: Path, result: Path, timeout_s: float, *, what: str) -> None:
    """Run ``cmd`` (the simulation engine's child process) in its own session under a hard timeout; raise
    PluribusError with the log tail unless it wrote ``result`` (a fresh file) before it ended."""
    since = time.time_ns()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with open(log, "wb") as fh:
            procs.append(subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=child_env(),
                                          start_new_session=True))
        try:
            procs[0].wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise PluribusError(f"{what} did not finish within {timeout_s} s; log tail:\n{tail(log)}") from None
    finally:
        stop_processes(procs)
    if not finished_since(result, since):
        raise PluribusError(f"{what} ended without a result in {result.parent}; log tail:\n{tail(log)}")


def simulate_apps(server_app: ServerApp, client_app: ClientApp, num_supernodes: int, *,
                  num_cpus: int | None = None) -> None:
    """Run ``server_app`` with ``num_supernodes`` ClientApps on Flower's Ray simulation engine (call it in a
    child process: Ray is started and stopped here)."""
    from flwr.simulation import run_simulation

    num_cpus = num_cpus or max(1, min(num_supernodes, os.cpu_count() or 1))
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_supernodes,
                   backend_config={"client_resources": {"num_cpus": 1},
                                   "init_args": {"num_cpus": num_cpus, "include_dashboard": False}})


def write_app_pyproject(folder: str | Path, *, name: str, description: str, serverapp: str, clientapp: str,
                        run_config: Mapping[str, Any]) -> Path:
    """Write a Flower App folder's pyproject.toml (components ``module:attr``; ``run_config`` scalars)."""
    import tomli_w

    from pluribus.io import write_text

    doc = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": name, "version": "1.0.0", "description": description,
                    "license": "Apache-2.0", "dependencies": []},
        "tool": {"hatch": {"build": {"targets": {"wheel": {"packages": ["."]}}}},
                 "flwr": {"app": {"publisher": "pluribus",
                                  "components": {"serverapp": serverapp, "clientapp": clientapp},
                                  "config": dict(run_config)}}},
    }
    path = Path(folder) / "pyproject.toml"
    write_text(path, tomli_w.dumps(doc))
    return path


def write_flwr_connection(home: Path, address: str, *, root_certificates: str | Path | None = None,
                          name: str = "federation") -> Path:
    """Write ``home/config.toml`` (a FLWR_HOME) whose default SuperLink connection ``name`` reaches ``address``:
    over TLS checked against ``root_certificates``, or plain HTTP when it is None (``insecure = true``)."""
    import tomli_w

    from pluribus.io import write_text

    conn: dict[str, Any] = {"address": address}
    if root_certificates is None:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(Path(root_certificates).resolve())
    return write_text(home / "config.toml", tomli_w.dumps({"superlink": {"default": name, name: conn}}))


def _await_result(runner: subprocess.Popen[bytes], result: Path, since: int, deadline: float, run_log: Path,
                  timeout_s: float, settle_s: float) -> None:
    """Wait until the ServerApp wrote ``result`` after ``since`` (``flwr run --stream`` returns when the run
    ends, failed or not); PluribusError with the ``flwr run`` log tail if it did not by ``deadline``."""
    while time.monotonic() < deadline and not finished_since(result, since):
        if runner.poll() is not None:
            grace = min(deadline, time.monotonic() + 10)
            while time.monotonic() < grace and not finished_since(result, since):
                time.sleep(0.2)
            if not finished_since(result, since):
                raise PluribusError(f"`flwr run` ended (exit {runner.returncode}) without a result in "
                                    f"{result.parent}; log tail:\n{tail(run_log, 6000)}")
            break
        time.sleep(0.2)
    if not finished_since(result, since):
        raise PluribusError(f"the Flower deployment engine did not finish within {timeout_s} s; flwr run log:\n"
                            f"{tail(run_log)}")
    time.sleep(settle_s)  # a ServerApp may write more files just before its result file; let them settle


def run_deployment(app_dir: Path, work: Path, node_configs: Sequence[str], result: Path, timeout_s: float, *,
                   poll_s: float = 0.0, settle_s: float = 1.0) -> None:
    """Run the Flower App in ``app_dir`` on the deployment engine on loopback: a SuperLink, one SuperNode per
    entry of ``node_configs`` (its ``--node-config`` string) and ``flwr run``, logs in ``work``; return once
    the ServerApp wrote ``result`` (a fresh file), PluribusError with a log tail if it did not within
    ``timeout_s``. Every process is stopped (by its session) before this returns."""
    home = work / "flwr"
    home.mkdir(parents=True, exist_ok=True)
    link = free_port()
    write_flwr_connection(home, f"127.0.0.1:{link}", name="loop")
    env = {**child_env(poll_s), "FLWR_HOME": str(home)}
    since = time.time_ns()
    deadline = time.monotonic() + timeout_s
    procs: list[subprocess.Popen[bytes]] = []

    def start(args: list[str], log: str) -> subprocess.Popen[bytes]:
        with open(work / log, "wb") as fh:
            proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        procs.append(proc)
        return proc

    try:
        start(["flower-superlink", "--insecure", "--disable-runtime-dependency-installation", "--port", str(link)],
              "superlink.log")
        wait_port(link, deadline, work / "superlink.log")
        for k, node_config in enumerate(node_configs):
            start(["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}", "--port",
                   str(free_port()), "--node-config", node_config], f"supernode{k}.log")
        runner = start(["flwr", "run", str(app_dir), "loop", "--stream"], "flwr_run.log")
        _await_result(runner, result, since, deadline, work / "flwr_run.log", timeout_s, settle_s)
    finally:
        stop_processes(procs)


def submit_run(app_dir: Path, work: Path, address: str, result: Path, timeout_s: float, *,
               root_certificates: str | Path | None = None, settle_s: float = 1.0) -> None:
    """Submit the Flower App in ``app_dir`` to the SuperLink already running at ``address`` (its SuperNodes
    already joined) with ``flwr run --stream``, over TLS checked against ``root_certificates`` (None: plain
    HTTP); return once the ServerApp wrote ``result`` (a fresh file: the ServerApp runs on the SuperLink's host,
    so ``result`` must be a path this host sees). On a timeout the run is stopped on the SuperLink (``flwr
    stop``) and PluribusError says so; ``flwr run`` is stopped by its session before this returns."""
    home = work / "flwr"
    home.mkdir(parents=True, exist_ok=True)
    write_flwr_connection(home, address, root_certificates=root_certificates)
    env = {**child_env(), "FLWR_HOME": str(home)}
    since = time.time_ns()
    deadline = time.monotonic() + timeout_s
    log = work / "flwr_run.log"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with open(log, "wb") as fh:
            procs.append(subprocess.Popen(["flwr", "run", str(app_dir), "federation", "--stream"], stdout=fh,
                                          stderr=subprocess.STDOUT, env=env, start_new_session=True))
        try:
            _await_result(procs[0], result, since, deadline, log, timeout_s, settle_s)
        except PluribusError:
            _stop_run(log, env)
            ended = procs[0].poll() is not None
            raise PluribusError(f"the run on the SuperLink at {address} "
                                + ("ended without a result" if ended else f"did not finish within {timeout_s:g} s")
                                + f" in {result.parent}: {last_error(log)}") from None
    finally:
        stop_processes(procs)


def last_error(log: Path) -> str:
    """The last exception a Flower log shows (``SomeError: text``), else its last line naming an error, else its
    last line (colour codes removed)."""
    import re

    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in tail(log, 50_000).splitlines()]
    lines = [line for line in lines if line]
    raised = [line for line in lines if re.match(r"[\w.]+(Error|Exception|Exhausted|Released): ", line)]
    named = [line for line in lines if re.search(r"Error|ERROR|Exception|refused|failed", line)]
    return (raised or named or lines or ["(empty log)"])[-1][:400]


def _stop_run(run_log: Path, env: Mapping[str, str]) -> None:
    """Stop the run that ``flwr run`` started (its id is in ``run_log``) on the SuperLink, within 30 s."""
    import re

    found = re.search(r"Successfully started run (\d+)", tail(run_log, 100_000))
    if found is None:
        return
    try:
        subprocess.run(["flwr", "stop", found.group(1), "federation"], env=dict(env), timeout=30,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        pass

"""FedBone's long-lived client worker: one per client, on the client's own SuperNode host.

Flower 1.42 starts a fresh ``flwr-clientapp`` process for every message, so the in-process ClientApp pays the
Flower runtime, the torch import, loading the client's task and building the client on every message. In worker
mode (node_config ``worker=true``: the worker is started by ``pluribus fed worker --state-dir DIR``;
``worker="auto"``: the first message starts it) the ClientApp is thin: it imports only flwr and the standard
library and forwards each message over a Unix domain socket (``DIR/worker.sock``, mode 0600, local to the host)
to this worker, which keeps the client object (model, optimizer, its own cached task) in memory and runs the
same handlers as the in-process ClientApp (``client_app.make_client_app(live=...)``), checkpoints included. All
cross-party traffic still goes through the SuperLink: the socket only joins two processes of one SuperNode host.

Safety: only one worker runs per state directory (an ``fcntl`` lock on ``worker.lock``; ``worker.pid`` names
it). A worker serves one training run at a time: each request carries the Flower run id, a hash of the
run_config and the id of the worker instance that served the run so far (kept in the ClientApp's
``Context.state``). The worker refuses a message of another run's config, of a run it was taken from, or of a
run another (dead or restarted) worker instance served, since that run's in-memory client state is gone; a
new run of the same config (a resume) takes the worker over with a fresh client, restored from the client's
checkpoint as in-process. Every refusal, an absent worker and a worker that dies mid-message become error
replies naming the socket, so the server records a fault and never applies a half-computed step.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import IO, Any

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict

from pluribus.errors import ConfigError, PluribusError

FORMAT = "pluribus.fedbone.worker/1"
SOCKET_NAME, PID_NAME, LOCK_NAME, LOG_NAME = "worker.sock", "worker.pid", "worker.lock", "worker.log"
WORKER_KEY = "fedbone_worker"  # ConfigRecord in the ClientApp's Context.state: the worker instance of this run
MAX_SOCKET_PATH = 104  # sun_path holds 108 bytes on Linux, 104 on macOS
DEFAULT_IDLE_S = 900.0  # an auto-started worker outlives its runs only this long without a message
START_WAIT_S = 180.0  # a fresh worker imports torch and the model code before it listens
REPLY_TIMEOUT_S = 3600.0
ERROR_CODE = 2  # flwr ErrorCode.CLIENT_APP_RAISED_EXCEPTION: the server records a client "error" fault
_HEAD = struct.Struct("!IQ")  # header length, body length


class WorkerUnavailable(PluribusError):
    """The client's worker is not running, did not start, or died mid-message."""


def worker_mode(context: Context) -> str | None:
    """The worker mode from node_config (else run_config) ``worker``: None (in-process), "external" (true: a
    worker started by the CLI) or "auto" (start one on the first message)."""
    value = context.node_config.get("worker", context.run_config.get("worker", False))
    text = value.strip().lower() if isinstance(value, str) else value
    if text in (False, 0, "", "false", "no", "off", "0"):
        return None
    if text in (True, 1, "true", "yes", "on", "1", "external"):
        return "external"
    if text == "auto":
        return "auto"
    raise ConfigError(f"node_config 'worker': expected true, false or \"auto\", got {value!r}")


def socket_path(state_dir: str | Path) -> Path:
    """The worker's Unix socket in ``state_dir``; ConfigError if the path is too long for a socket address."""
    path = Path(state_dir).resolve() / SOCKET_NAME
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ConfigError(f"state-dir {state_dir}: the worker socket path {path} is longer than "
                          f"{MAX_SOCKET_PATH} bytes (a Unix socket limit); use a shorter state directory")
    return path


def run_config_key(run_config: Any) -> str:
    """A hash of a run_config: what tells one training run's messages from another's."""
    text = json.dumps(dict(run_config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def running_pid(state_dir: str | Path) -> int | None:
    """The pid of the worker serving ``state_dir`` if its pid file names a live process, else None."""
    try:
        pid = int((Path(state_dir) / PID_NAME).read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def stop_worker(state_dir: str | Path, timeout_s: float = 15.0) -> int | None:
    """Stop the worker of ``state_dir`` by the pid in its pid file (SIGTERM, then SIGKILL); its pid or None."""
    pid = running_pid(state_dir)
    if pid is None:
        return None
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            return pid
        _reap(pid)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    _reap(pid)
    return pid


def _reap(pid: int) -> None:
    try:  # our own child (a test's worker): collect it so it does not linger as a zombie
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


# ----------------------------------------------------------------------------------------------- framing


def _send(sock: socket.socket, header: dict[str, Any], body: bytes = b"") -> None:
    head = json.dumps(header).encode()
    sock.sendall(_HEAD.pack(len(head), len(body)) + head)
    sock.sendall(body)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError(f"connection closed after {got} of {n} bytes")
        got += k
    return bytes(buf)


def _recv(sock: socket.socket) -> tuple[dict[str, Any], bytes]:
    head_len, body_len = _HEAD.unpack(_recv_exact(sock, _HEAD.size))
    header = json.loads(_recv_exact(sock, head_len))
    return header, _recv_exact(sock, body_len) if body_len else b""


# ----------------------------------------------------------------------------------- the thin ClientApp side


def _error_reply(message: Message, reason: str) -> Message:
    return Message(Error(code=ERROR_CODE, reason=reason), reply_to=message)


def _thin_state_dir(context: Context, state_root: str | Path | None) -> Path:
    from pluribus.federated.client_app import client_state_dir  # already loaded: the caller is client_app

    if "partition-id" not in context.node_config:
        raise ConfigError("node_config lacks 'partition-id' (start the SuperNode with --node-config 'partition-id=K')")
    state_dir = client_state_dir(context, int(context.node_config["partition-id"]), state_root)
    if state_dir is None:
        raise ConfigError("node_config 'worker': the worker lives in the client's state directory; set node_config "
                          "'state-dir' (or the run_config 'client-state-root')")
    return state_dir


def start_worker(state_dir: Path, idle_s: float = DEFAULT_IDLE_S) -> subprocess.Popen[bytes]:
    """Start a worker for ``state_dir`` in a new session (it outlives the ClientApp process), logging to
    ``state_dir/worker.log``."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(state_dir / LOG_NAME, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "pluribus.federated.worker", "--state-dir", str(state_dir),
                                 "--idle-s", str(idle_s)], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)


def _connect(path: Path, state_dir: Path, mode: str, idle_s: float) -> socket.socket:
    proc: subprocess.Popen[bytes] | None = None
    deadline = time.monotonic() + START_WAIT_S
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as err:
            sock.close()
            if mode != "auto":
                raise WorkerUnavailable(
                    f"client worker not running: cannot connect to {path} ({err.strerror}); start it with "
                    f"`pluribus fed worker --state-dir {state_dir}` or set node_config worker=\"auto\"") from None
            if proc is None and running_pid(state_dir) is None:
                proc = start_worker(state_dir, idle_s)
            elif proc is not None and proc.poll() is not None and running_pid(state_dir) is None:
                raise WorkerUnavailable(f"client worker for {path} exited (status {proc.returncode}) before it "
                                        f"listened; see {state_dir / LOG_NAME}") from None
            if time.monotonic() > deadline:
                raise WorkerUnavailable(f"client worker did not listen on {path} within {START_WAIT_S:.0f} s; "
                                        f"see {state_dir / LOG_NAME}") from None
            time.sleep(0.05)


def forward(message: Message, context: Context, mode: str, state_root: str | Path | None = None) -> Message:
    """Forward ``message`` to this client's worker and turn its answer into the reply Message; any failure
    (no worker, a dead one, a refusal, a handler error) is an error reply naming the socket."""
    from flwr.common.serde import message_to_proto, recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    try:
        state_dir = _thin_state_dir(context, state_root)
        path = socket_path(state_dir)
        sock = _connect(path, state_dir, mode, float(context.node_config.get("worker-idle-s", DEFAULT_IDLE_S)))
    except PluribusError as err:
        return _error_reply(message, str(err))
    record = context.state.config_records.get(WORKER_KEY)
    header = {"format": FORMAT, "run_id": int(context.run_id), "run_config_key": run_config_key(context.run_config),
              "expect": "" if record is None else str(record["instance"]),
              "node_config": dict(context.node_config), "run_config": dict(context.run_config)}
    try:
        with sock:
            sock.settimeout(REPLY_TIMEOUT_S)
            _send(sock, header, message_to_proto(message).SerializeToString())
            answer, body = _recv(sock)
    except (OSError, EOFError, ValueError) as err:
        return _error_reply(message, f"client worker at {path} gave no reply ({type(err).__name__}: {err}); did it "
                                     f"die? see {state_dir / LOG_NAME}")
    if not answer.get("ok"):
        return _error_reply(message, f"client worker at {path}: {answer.get('error')}")
    context.state.config_records[WORKER_KEY] = ConfigRecord({"instance": str(answer["instance"])})
    return Message(recorddict_from_proto(ProtoRecordDict.FromString(body)), reply_to=message)


# --------------------------------------------------------------------------------------------- the worker


class Worker:
    """One client's state between messages: the bound run, its Context and the live client object."""

    def __init__(self) -> None:
        from pluribus.federated.client_app import make_client_app

        self.instance = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.session: tuple[int, str] | None = None  # (Flower run id, run_config hash)
        self.live: dict[str, Any] = {}
        self.context: Context | None = None
        self.app = make_client_app(live=self.live)

    def _refusal(self, header: dict[str, Any]) -> str | None:
        run_id, key, expect = int(header["run_id"]), str(header["run_config_key"]), str(header["expect"])
        if expect and expect != self.instance:
            return (f"worker {self.instance} never served run {run_id} (worker {expect} did, and it died or was "
                    "restarted): that run's client state is gone; resume the run from its last checkpoint")
        if self.session == (run_id, key):
            if self.context is not None and dict(header["node_config"]) != dict(self.context.node_config):
                return f"run {run_id}: node_config changed mid-run ({header['node_config']!r})"
            return None
        if expect:
            return (f"worker {self.instance} was taken over by run {self.session and self.session[0]}; run {run_id}'s "
                    "client state is gone")
        if self.session is not None and self.session[1] != key:
            return (f"worker serves run {self.session[0]} of another run_config (hash {self.session[1]}, this "
                    f"message's {key}); a worker serves one training run: stop it (pluribus fed worker --stop "
                    "--state-dir DIR) or give this SuperNode its own state-dir")
        return None

    def handle(self, header: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
        """Answer one forwarded message: (answer header, serialized reply RecordDict)."""
        from flwr.common.serde import message_from_proto, recorddict_to_proto
        from flwr.proto.message_pb2 import Message as ProtoMessage

        if header.get("format") != FORMAT:
            return {"ok": False, "error": f"unknown request format {header.get('format')!r}, expected {FORMAT!r}"}, b""
        refusal = self._refusal(header)
        if refusal is not None:
            return {"ok": False, "error": refusal}, b""
        session = (int(header["run_id"]), str(header["run_config_key"]))
        if self.session != session or self.context is None:  # a new run (or a resume): a fresh client
            self.live.clear()
            self.context = Context(run_id=session[0], node_id=0, node_config=dict(header["node_config"]),
                                   state=RecordDict(), run_config=dict(header["run_config"]))
            self.session = session
        try:
            reply = self.app(message_from_proto(ProtoMessage.FromString(body)), self.context)
        except Exception as err:  # as Flower's runtime would: the handler's failure is the reply
            return {"ok": False, "error": f"{type(err).__name__}: {err}"}, b""
        if reply.has_error():
            return {"ok": False, "error": reply.error.reason}, b""
        return {"ok": True, "instance": self.instance}, recorddict_to_proto(reply.content).SerializeToString()


def _take_lock(state_dir: Path) -> IO[str]:
    fh = open(state_dir / LOCK_NAME, "a+")  # noqa: SIM115 - held for the worker's lifetime
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise WorkerUnavailable(f"another client worker (pid {running_pid(state_dir)}) already serves "
                                f"{state_dir}") from None
    return fh


def serve(state_dir: str | Path, *, idle_s: float = DEFAULT_IDLE_S, stop: threading.Event | None = None,
          ready: threading.Event | None = None) -> None:
    """Serve the client of ``state_dir`` until ``idle_s`` pass without a message, SIGTERM, or ``stop`` is set
    (``ready`` is set once it listens); WorkerUnavailable if another worker already serves it."""
    from pluribus.io import write_text

    if idle_s <= 0:
        raise ConfigError(f"--idle-s must be > 0, got {idle_s}")
    state_dir = Path(state_dir).resolve()
    path = socket_path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = _take_lock(state_dir)
    server: socket.socket | None = None
    main = threading.current_thread() is threading.main_thread()
    try:
        if main:  # SIGTERM unwinds through `finally` (socket and pid file removed)
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        worker = Worker()  # imports the model code before listening: a connecting client then waits no more
        write_text(state_dir / PID_NAME, f"{os.getpid()}\n")
        path.unlink(missing_ok=True)  # a dead worker's socket (the lock says none is alive)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        umask = os.umask(0o177)  # the socket is born 0600: no window where another user can connect
        try:
            server.bind(str(path))
        finally:
            os.umask(umask)
        os.chmod(path, 0o600)
        server.listen(8)
        server.settimeout(0.5)
        print(f"pluribus fed worker {worker.instance} listening on {path}", flush=True)
        if ready is not None:
            ready.set()
        last = time.monotonic()
        while not (stop is not None and stop.is_set()) and time.monotonic() - last < idle_s:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(REPLY_TIMEOUT_S)
                try:
                    header, body = _recv(conn)
                    _send(conn, *worker.handle(header, body))
                except (OSError, EOFError, ValueError, KeyError) as err:  # one bad client, not a dead worker
                    print(f"dropped a request: {type(err).__name__}: {err}", flush=True)
            last = time.monotonic()
    finally:
        if server is not None:
            server.close()
            path.unlink(missing_ok=True)
        if running_pid(state_dir) == os.getpid():
            (state_dir / PID_NAME).unlink(missing_ok=True)
        lock.close()


def main(argv: list[str] | None = None) -> None:
    """``python -m pluribus.federated.worker --state-dir DIR [--idle-s S]`` (what worker="auto" starts)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pluribus.federated.worker")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--idle-s", type=float, default=DEFAULT_IDLE_S)
    args = parser.parse_args(argv)
    try:
        serve(args.state_dir, idle_s=args.idle_s)
    except PluribusError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

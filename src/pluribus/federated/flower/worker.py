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
import os
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import IO, Any

from flwr.app import Context, RecordDict

from pluribus.errors import ConfigError, PluribusError
from pluribus.federated.flower.worker_socket import (
    DEFAULT_IDLE_S,
    FORMAT,
    LOCK_NAME,
    PID_NAME,
    REPLY_TIMEOUT_S,
    WorkerUnavailable,
    recv_frame,
    running_pid,
    send_frame,
    socket_path,
)


class Worker:
    """One client's state between messages: the bound run, its Context and the live client object."""

    def __init__(self) -> None:
        from pluribus.federated.flower.client_app import make_client_app

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
                    header, body = recv_frame(conn)
                    send_frame(conn, *worker.handle(header, body))
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
    """``python -m pluribus.federated.flower.worker --state-dir DIR [--idle-s S]`` (what worker="auto" starts)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pluribus.federated.flower.worker")
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

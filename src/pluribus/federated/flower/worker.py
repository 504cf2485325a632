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
run_config, the id of the worker instance that served the run so far and the secret that run's first answer
gave it (kept in the ClientApp's ``Context.state``). The worker refuses a message of another run's config, of a
run it was taken from, of a run another (dead or restarted) worker instance served, since that run's in-memory
client state is gone, and one that claims the running run without its secret. A new run of the same config
takes the worker over with a fresh client (restored from the client's checkpoint as in-process, for a resume)
only once the running run finished (it sent its final evaluation) or sent nothing for ``lease_s`` seconds, or
at once when it is that run's own resume (``query.checkpoint_restore`` with its run token); its hello is
answered meanwhile without a takeover. Every connection has its own thread and ``FRAME_TIMEOUT_S`` to send a
bounded, checked frame (:mod:`.worker_socket`); a malformed frame gets an error answer and is logged, and no
input ends the worker. Every refusal, an absent worker and a worker that dies mid-message become error replies
naming the socket, so the server records a fault (client, step, reason) and never applies a half-computed step.
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

from flwr.app import Context, Message, RecordDict

from pluribus.errors import ConfigError, PluribusError
from pluribus.federated.flower.worker_socket import (
    DEFAULT_IDLE_S,
    FORMAT,
    FRAME_TIMEOUT_S,
    LOCK_NAME,
    OPTIONAL_REQUEST_FIELDS,
    PID_NAME,
    REQUEST_FIELDS,
    BadFrame,
    WorkerUnavailable,
    check_header,
    recv_frame,
    running_pid,
    send_frame,
    socket_path,
)

DEFAULT_LEASE_S = 120.0  # a run that sent within this long (and did not finish) keeps its worker from other runs
MAX_CONNECTIONS = 32


class Worker:
    """One client's state between messages: the bound run (session), its Context and the live client object.

    ``handle`` never raises: every malformed, refused or failing request is an error answer. It is safe to call
    from several connection threads (one lock around the client state).
    """

    def __init__(self, *, lease_s: float = DEFAULT_LEASE_S) -> None:
        from pluribus.federated.flower.client_app import make_client_app

        self.instance = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.session: tuple[int, str] | None = None  # (Flower run id, run_config hash)
        self.secret = ""  # what the session's first answer gave its ClientApp; its later messages carry it
        self.last_seen = 0.0  # monotonic time of the session's last message
        self.finished = False  # the session's run sent its final evaluation
        self.lease_s = lease_s
        self.live: dict[str, Any] = {}
        self.context: Context | None = None
        self.app = make_client_app(live=self.live)
        self.lock = threading.Lock()

    def _refusal(self, header: dict[str, Any], message: Message) -> str | None:
        run_id, key, expect = header["run_id"], header["run_config_key"], header["expect"]
        if expect and expect != self.instance:
            return (f"worker {self.instance} never served run {run_id} (worker {expect} did, and it died or was "
                    "restarted): that run's client state is gone; resume the run from its last checkpoint")
        if self.session == (run_id, key):
            if self.secret and header.get("secret", "") != self.secret:
                return (f"a message of run {run_id} without the secret of that run's session refused (not sent by "
                        "the run's own ClientApp)")
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

    def _held(self, message: Message) -> str | None:
        """Why the current session may not be taken over by ``message`` of another run (None: it may): the held
        run is unfinished and sent within the lease, and ``message`` is not that run's own resume (a
        ``query.checkpoint_restore`` with the held run's token)."""
        from pluribus.federated.flower.client_app import CKPT_RESTORE, RUN_KEY

        if self.session is None or self.context is None or self.finished:
            return None
        quiet = time.monotonic() - self.last_seen
        if quiet >= self.lease_s:
            return None
        bound = self.context.state.config_records.get(RUN_KEY)
        if message.metadata.message_type == CKPT_RESTORE and bound is not None \
                and _scalar(message, "token") == str(bound["run"]):
            return None
        return (f"worker serves run {self.session[0]}, unfinished, whose last message came {quiet:.1f} s ago: "
                f"another run takes it over only once that run finished or sent nothing for {self.lease_s:.0f} s "
                "(a resume of the same run, through query.checkpoint_restore, at once)")

    def handle(self, header: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
        """Answer one forwarded message: (answer header, serialized reply RecordDict); never raises."""
        try:
            return self._handle(header, body)
        except Exception as err:  # a request no check foresaw: an error answer, never a dead worker
            return _error(f"request failed in the worker ({type(err).__name__}: {err})")

    def _handle(self, header: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
        from flwr.common.serde import message_from_proto
        from flwr.proto.message_pb2 import Message as ProtoMessage

        from pluribus.federated.flower.client_app import HELLO

        try:
            check_header(header, REQUEST_FIELDS, OPTIONAL_REQUEST_FIELDS)
        except BadFrame as err:
            return _error(str(err))
        if header["format"] != FORMAT:
            return _error(f"unknown request format {header['format']!r}, expected {FORMAT!r}")
        try:
            message = message_from_proto(ProtoMessage.FromString(body))
        except Exception as err:  # protobuf's DecodeError and kin
            return _error(f"frame body is not a Flower message ({type(err).__name__}: {err})")
        with self.lock:
            refusal = self._refusal(header, message)
            session = (header["run_id"], header["run_config_key"])
            held = self._held(message) if self.session != session else None
            if refusal is None and held is not None and message.metadata.message_type != HELLO:
                refusal = held
            if refusal is not None:
                return _error(refusal)
            if held is not None:  # a hello needs no client state: answer it, and leave the held run its worker
                context = Context(run_id=session[0], node_id=0, node_config=dict(header["node_config"]),
                                  state=RecordDict(), run_config=dict(header["run_config"]))
                return self._reply(message, context, {})
            if self.session != session or self.context is None:  # a new run (or a resume): a fresh client
                self.live.clear()
                self.context = Context(run_id=session[0], node_id=0, node_config=dict(header["node_config"]),
                                       state=RecordDict(), run_config=dict(header["run_config"]))
                self.session, self.secret, self.finished = session, uuid.uuid4().hex, False
            self.last_seen = time.monotonic()
            answer, reply = self._reply(message, self.context, {"instance": self.instance, "secret": self.secret})
            if answer["ok"] and _is_final_evaluation(message, self.context):
                self.finished = True
            return answer, reply

    def _reply(self, message: Message, context: Context, extra: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        from flwr.common.serde import recorddict_to_proto

        try:
            reply = self.app(message, context)
        except Exception as err:  # as Flower's runtime would: the handler's failure is the reply
            return _error(f"{type(err).__name__}: {err}")
        if reply.has_error():
            return _error(str(reply.error.reason))
        return {"ok": True, **extra}, recorddict_to_proto(reply.content).SerializeToString()


def _error(reason: str) -> tuple[dict[str, Any], bytes]:
    return {"ok": False, "error": reason}, b""


def _scalar(message: Message, name: str) -> str | None:
    """A scalar of a FedBone message's 'scalars' record, as text (None if absent)."""
    record = message.content.config_records.get("scalars")
    return None if record is None or name not in record else str(record[name])


def _is_final_evaluation(message: Message, context: Context) -> bool:
    """Whether ``message`` is the run's last: the evaluation after its last step (``steps`` of the run_config)."""
    from pluribus.federated.core.protocol import MSG_EVAL_HEAD

    steps, step = context.run_config.get("steps"), _scalar(message, "step")
    return (message.metadata.message_type == MSG_EVAL_HEAD and steps is not None and step is not None
            and step.lstrip("-").isdigit() and int(step) >= int(steps))


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
          ready: threading.Event | None = None, lease_s: float = DEFAULT_LEASE_S) -> None:
    """Serve the client of ``state_dir`` until ``idle_s`` pass without a message, SIGTERM, or ``stop`` is set
    (``ready`` is set once it listens); WorkerUnavailable if another worker already serves it.

    Each connection has its own thread (at most ``MAX_CONNECTIONS`` at once; one more is answered "busy") and
    ``FRAME_TIMEOUT_S`` to send its request frame, so no connection blocks another; a run holds the worker
    against another run's takeover while it is unfinished and sent within ``lease_s`` seconds.
    """
    from pluribus.io import write_text

    if idle_s <= 0:
        raise ConfigError(f"--idle-s must be > 0, got {idle_s}")
    if lease_s < 0:
        raise ConfigError(f"--lease-s must be >= 0, got {lease_s}")
    state_dir = Path(state_dir).resolve()
    path = socket_path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = _take_lock(state_dir)
    server: socket.socket | None = None
    connections = _Connections()
    main = threading.current_thread() is threading.main_thread()
    try:
        if main:  # SIGTERM unwinds through `finally` (socket and pid file removed)
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        worker = Worker(lease_s=lease_s)  # imports the model code before listening: a client then waits no more
        write_text(state_dir / PID_NAME, f"{os.getpid()}\n")
        path.unlink(missing_ok=True)  # a dead worker's socket (the lock says none is alive)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        umask = os.umask(0o177)  # the socket is born 0600: no window where another user can connect
        try:
            server.bind(str(path))
        finally:
            os.umask(umask)
        os.chmod(path, 0o600)
        server.listen(MAX_CONNECTIONS)
        server.settimeout(0.5)
        print(f"pluribus fed worker {worker.instance} listening on {path}", flush=True)
        if ready is not None:
            ready.set()
        while not (stop is not None and stop.is_set()) and time.monotonic() - connections.last < idle_s:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            connections.start(conn, worker)
    finally:
        if server is not None:
            server.close()
            path.unlink(missing_ok=True)
        connections.close()
        if running_pid(state_dir) == os.getpid():
            (state_dir / PID_NAME).unlink(missing_ok=True)
        lock.close()


class _Connections:
    """The worker's open connections, one thread each, and when the last request frame came (idle timing)."""

    def __init__(self) -> None:
        self.open: set[socket.socket] = set()
        self.threads: set[threading.Thread] = set()
        self.guard = threading.Lock()
        self.last = time.monotonic()

    def start(self, conn: socket.socket, worker: Worker) -> None:
        """Serve ``conn`` in its own thread, or answer "busy" if ``MAX_CONNECTIONS`` are open."""
        with self.guard:
            busy = len(self.open) >= MAX_CONNECTIONS
            if not busy:
                self.open.add(conn)
        if busy:
            _answer(conn, *_error(f"worker busy: {MAX_CONNECTIONS} connections open"))
            conn.close()
            return
        thread = threading.Thread(target=self._serve, args=(conn, worker), daemon=True)
        with self.guard:
            self.threads.add(thread)
        thread.start()

    def _serve(self, conn: socket.socket, worker: Worker) -> None:
        try:
            conn.settimeout(FRAME_TIMEOUT_S)
            try:
                header, body = recv_frame(conn)
            except BadFrame as err:
                print(f"refused a frame: {err}", flush=True)
                _answer(conn, *_error(f"refused: {err}"))
                return
            except (OSError, EOFError) as err:  # closed, timed out or reset before a whole frame came
                print(f"dropped a connection: {type(err).__name__}: {err}", flush=True)
                return
            self.last = time.monotonic()
            conn.settimeout(None)  # the request is in; computing its reply may take long
            answer, reply = worker.handle(header, body)
            if not answer["ok"]:
                print(f"refused a request of run {header.get('run_id')!r}: {answer['error']}", flush=True)
            conn.settimeout(FRAME_TIMEOUT_S)
            _answer(conn, answer, reply)
        finally:
            with self.guard:
                self.open.discard(conn)
                self.threads.discard(threading.current_thread())
            conn.close()

    def close(self, wait_s: float = 10.0) -> None:
        """End every open connection (a thread waiting for a frame returns) and wait for the threads."""
        with self.guard:
            conns, threads = list(self.open), list(self.threads)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + wait_s
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def _answer(conn: socket.socket, header: dict[str, Any], body: bytes = b"") -> None:
    try:
        send_frame(conn, header, body)
    except OSError as err:  # the other side is gone: nothing to tell it
        print(f"could not answer: {type(err).__name__}: {err}", flush=True)


def main(argv: list[str] | None = None) -> None:
    """``python -m pluribus.federated.flower.worker --state-dir DIR [--idle-s S]`` (what worker="auto" starts)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pluribus.federated.flower.worker")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--idle-s", type=float, default=DEFAULT_IDLE_S)
    parser.add_argument("--lease-s", type=float, default=DEFAULT_LEASE_S)
    args = parser.parse_args(argv)
    try:
        serve(args.state_dir, idle_s=args.idle_s, lease_s=args.lease_s)
    except PluribusError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

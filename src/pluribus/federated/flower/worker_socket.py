"""The channel between FedBone's thin ClientApp and its long-lived worker on the same SuperNode host.

A Unix domain socket in the client's state directory (``DIR/worker.sock``, mode 0600), length-prefixed frames
(a JSON header and a serialized Flower message), the worker's pid and lock files, and the ClientApp side that
forwards a message (``forward``), starting the worker first in ``worker="auto"`` mode.

Frames are bounded and checked before anything is allocated: a header of at most ``MAX_HEADER_BYTES`` that is a
JSON object of the fields and types ``REQUEST_FIELDS`` (or ``ANSWER_FIELDS``) names, a body of at most
``MAX_BODY_BYTES`` (Flower's own gRPC message limit), read as it arrives; anything else is a ``BadFrame``. This module imports only
flwr and the standard library: a thin ClientApp never loads torch or the model code. The worker itself is
:mod:`pluribus.federated.flower.worker`.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Error, Message

from pluribus.errors import ConfigError, PluribusError
from pluribus.federated.flower.node import client_state_dir

FORMAT = "pluribus.fedbone.worker/1"
SOCKET_NAME, PID_NAME, LOCK_NAME, LOG_NAME = "worker.sock", "worker.pid", "worker.lock", "worker.log"
WORKER_KEY = "fedbone_worker"  # ConfigRecord in the ClientApp's Context.state: the worker instance of this run
MAX_SOCKET_PATH = 104  # sun_path holds 108 bytes on Linux, 104 on macOS
DEFAULT_IDLE_S = 900.0  # an auto-started worker outlives its runs only this long without a message
START_WAIT_S = 180.0  # a fresh worker imports torch and the model code before it listens
REPLY_TIMEOUT_S = 3600.0  # the thin ClientApp waits this long for the worker to compute a reply
FRAME_TIMEOUT_S = 30.0  # the worker waits this long for a connection's request frame (then drops it)
MAX_HEADER_BYTES = 1 << 20  # a header holds the node and run configs: scalars, far below this
MAX_BODY_BYTES = 2_147_483_647  # = flwr.common.GRPC_MAX_MESSAGE_LENGTH: no Flower message is larger
_CHUNK = 1 << 20  # a body grows as its bytes arrive, never allocated at the announced length up front
ERROR_CODE = 2  # flwr ErrorCode.CLIENT_APP_RAISED_EXCEPTION: the server records a client "error" fault
_HEAD = struct.Struct("!IQ")  # header length, body length


class WorkerUnavailable(PluribusError):
    """The client's worker is not running, did not start, or died mid-message."""


class BadFrame(PluribusError):
    """A frame that is too long, not a JSON object, or whose header lacks a field or has one of the wrong type."""


SCALAR_TYPES = (str, int, float, bool)
# field -> type of a request header (the thin ClientApp -> worker) and of an answer header
REQUEST_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format": str, "run_id": int, "run_config_key": str, "expect": str, "node_config": dict, "run_config": dict}
OPTIONAL_REQUEST_FIELDS: dict[str, type | tuple[type, ...]] = {"secret": str}
ANSWER_FIELDS: dict[str, type | tuple[type, ...]] = {"ok": bool}
OPTIONAL_ANSWER_FIELDS: dict[str, type | tuple[type, ...]] = {"error": str, "instance": str, "secret": str}


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


def send_frame(sock: socket.socket, header: dict[str, Any], body: bytes = b"") -> None:
    """One frame: lengths, JSON header, body."""
    head = json.dumps(header).encode()
    sock.sendall(_HEAD.pack(len(head), len(body)) + head)
    sock.sendall(body)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    """``n`` bytes, the buffer growing as they arrive (an announced length alone allocates nothing)."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), _CHUNK))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_frame(sock: socket.socket, *, max_header: int = MAX_HEADER_BYTES,
               max_body: int = MAX_BODY_BYTES) -> tuple[dict[str, Any], bytes]:
    """One frame's (header, body); BadFrame for a length over the caps or a header that is not a JSON object
    (checked before the body is read), EOFError or OSError if the connection ends or times out first."""
    head_len, body_len = _HEAD.unpack(_recv_exact(sock, _HEAD.size))
    if head_len > max_header:
        raise BadFrame(f"frame header of {head_len} bytes refused (at most {max_header})")
    if body_len > max_body:
        raise BadFrame(f"frame body of {body_len} bytes refused (at most {max_body})")
    raw = _recv_exact(sock, head_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as err:
        raise BadFrame(f"frame header is not JSON ({type(err).__name__}: {err})") from None
    if not isinstance(header, dict):
        raise BadFrame(f"frame header is a JSON {type(header).__name__}, expected an object")
    return header, _recv_exact(sock, body_len) if body_len else b""


def check_header(header: dict[str, Any], fields: dict[str, type | tuple[type, ...]],
                 optional: dict[str, type | tuple[type, ...]] | None = None) -> None:
    """BadFrame naming the first field of ``header`` that is missing or of the wrong type (a bool is no int);
    a dict field must map strings to scalars."""
    for name, kind in {**fields, **(optional or {})}.items():
        if name not in header:
            if name in fields:
                raise BadFrame(f"frame header lacks the field {name!r}")
            continue
        value = header[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise BadFrame(f"frame header field {name!r} is {type(value).__name__} {_short(value)}, expected "
                           + " or ".join(k.__name__ for k in kinds))
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(item, SCALAR_TYPES):
                    raise BadFrame(f"frame header field {name!r}: entry {_short(key)} is {type(item).__name__}, "
                                   "expected a string, number or boolean")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ----------------------------------------------------------------------------------- the thin ClientApp side


def _error_reply(message: Message, reason: str) -> Message:
    return Message(Error(code=ERROR_CODE, reason=reason), reply_to=message)


def _thin_state_dir(context: Context, state_root: str | Path | None) -> Path:
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
        return subprocess.Popen([sys.executable, "-m", "pluribus.federated.flower.worker", "--state-dir", str(state_dir),
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
              "secret": "" if record is None else str(record.get("secret", "")),
              "node_config": dict(context.node_config), "run_config": dict(context.run_config)}
    try:
        with sock:
            sock.settimeout(REPLY_TIMEOUT_S)
            send_frame(sock, header, message_to_proto(message).SerializeToString())
            answer, body = recv_frame(sock)
        check_header(answer, ANSWER_FIELDS, OPTIONAL_ANSWER_FIELDS)
    except BadFrame as err:
        return _error_reply(message, f"client worker at {path} answered a malformed frame: {err}")
    except (OSError, EOFError, ValueError) as err:
        return _error_reply(message, f"client worker at {path} gave no reply ({type(err).__name__}: {err}); did it "
                                     f"die? see {state_dir / LOG_NAME}")
    if not answer["ok"]:
        return _error_reply(message, f"client worker at {path}: {answer.get('error')}")
    if "instance" in answer:  # the worker bound this run's session (a hello it answered unbound carries none)
        context.state.config_records[WORKER_KEY] = ConfigRecord({"instance": answer["instance"],
                                                                 "secret": str(answer.get("secret", ""))})
    try:
        content = recorddict_from_proto(ProtoRecordDict.FromString(body))
    except Exception as err:  # a body that is no RecordDict: protobuf's DecodeError and kin
        return _error_reply(message, f"client worker at {path} answered an unreadable body ({type(err).__name__})")
    return Message(content, reply_to=message)



"""The client worker survives any frame (issue 22, section 4b): bounded frames, a checked header, one thread per
connection, an error answer for every malformed frame and no takeover of a run that is still sending.

A real FedBone run goes through the workers while one of them is fuzzed mid-run (random and crafted frames, an
idle connection held open, another run's takeover, a spoofed message of the run itself): the run must end
exactly as the in-process run, and the worker must still answer it.
"""

from __future__ import annotations

import json
import random
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message, RecordDict

from pluribus.config import flatten_config
from pluribus.federated import FedBoneConfig, ModelConfig
from pluribus.federated.core.protocol import MSG_EMBED, Payload, encode_payload
from pluribus.federated.flower import worker as wk
from pluribus.federated.flower import worker_socket as ws
from pluribus.federated.flower.client_app import HELLO, make_client_app
from pluribus.federated.flower.server_app import make_server_app, run_flower_inprocess
from pluribus.flower_engines import InProcessGrid, in_process_node_id, run_server_app_inprocess

TINY = ModelConfig(dim=16, depth=1, heads=2, patch=2, adapter_hidden=16)
CFG = FedBoneConfig(suite="digits", tasks=("digit", "parity"), steps=4, batch_size=8, max_train_per_client=48,
                    model=TINY, eval_every=2)
HEAD = struct.Struct("!IQ")


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pz-", dir="/tmp"))  # Unix socket paths hold ~104 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start_worker(state_dir: Path, **kw: float) -> tuple[threading.Thread, threading.Event]:
    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(target=wk.serve, args=(state_dir,), kwargs={"stop": stop, "ready": ready, **kw},
                              daemon=True)
    thread.start()
    assert ready.wait(30)
    return thread, stop


def frame(header: object, body: bytes = b"", *, head_len: int | None = None, body_len: int | None = None) -> bytes:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return HEAD.pack(len(head) if head_len is None else head_len,
                     len(body) if body_len is None else body_len) + head + body


def raw(path: Path, data: bytes) -> dict | None:
    """Send ``data`` on a fresh connection, close the writing side; the worker's answer header (None: none)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(20)
        sock.connect(str(path))
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        try:
            header, _ = ws.recv_frame(sock)
        except (EOFError, OSError):
            return None
        return header


def thin_context(state_dir: Path, cfg: FedBoneConfig, run_id: int) -> Context:
    return Context(run_id=run_id, node_id=2, node_config={"partition-id": 0, "state-dir": str(state_dir),
                                                          "worker": True},
                   state=RecordDict(), run_config=dict(flatten_config(cfg)))


def message(message_type: str, payload: Payload | None = None) -> Message:
    msg = Message(encode_payload(payload or Payload()), 2, message_type)
    msg.metadata.__dict__["_message_id"] = "m" + str(time.monotonic_ns())
    return msg


def good_header(cfg: FedBoneConfig, **change: object) -> dict:
    header = {"format": ws.FORMAT, "run_id": 5, "run_config_key": ws.run_config_key(flatten_config(cfg)),
              "expect": "", "node_config": {"partition-id": 0}, "run_config": dict(flatten_config(cfg))}
    header.update(change)
    return header


def crafted(cfg: FedBoneConfig) -> list[tuple[str, bytes, str]]:
    """(what, frame, a phrase its error answer must hold)."""
    nulls = [(f"null {k}", frame(good_header(cfg, **{k: None})), repr(k)) for k in ws.REQUEST_FIELDS]
    return [
        ("body length 2^62", frame(good_header(cfg), body_len=2**62), "frame body of 4611686018427387904 bytes"),
        ("body length 2^64-1", frame(good_header(cfg), body_len=2**64 - 1), "refused (at most"),
        ("header length 2^32-1", frame(b"{}", head_len=2**32 - 1), "frame header of 4294967295 bytes"),
        ("JSON array header", frame([1, 2, 3]), "JSON list, expected an object"),
        ("JSON null header", frame(None), "JSON NoneType"),
        ("JSON string header", frame("hello"), "JSON str"),
        ("not JSON", frame(b"{not json"), "not JSON"),
        ("not UTF-8", frame(b"\xff\xfe\x00"), "not JSON"),
        ("empty object", frame({}), "lacks the field 'format'"),
        ("run id as text", frame(good_header(cfg, run_id="5")), "'run_id' is str"),
        ("run id as bool", frame(good_header(cfg, run_id=True)), "'run_id' is bool"),
        ("node_config a list", frame(good_header(cfg, node_config=[1])), "'node_config' is list"),
        ("nested node_config", frame(good_header(cfg, node_config={"a": {"b": 1}})), "entry 'a' is dict"),
        ("expect a number", frame(good_header(cfg, expect=5)), "'expect' is int"),
        ("secret a list", frame(good_header(cfg, secret=[])), "'secret' is list"),
        ("other format", frame(good_header(cfg, format="x/9")), "unknown request format"),
        ("garbage body", frame(good_header(cfg), b"\xff" * 64), "not a Flower message"),
        ("empty body", frame(good_header(cfg)), ""),
        *nulls,
    ]


def fuzz(path: Path, cfg: FedBoneConfig, seed: int = 0, n_random: int = 60) -> list[str]:
    """Send the crafted and ``n_random`` random frames; every answer must be an error; returns the answers."""
    errors = []
    for what, data, phrase in crafted(cfg):
        answer = raw(path, data)
        assert answer is not None and answer["ok"] is False, what
        assert phrase in answer["error"], (what, answer["error"])
        errors.append(answer["error"])
    rng = random.Random(seed)
    for i in range(n_random):
        kind = i % 4
        if kind == 0:  # random bytes
            data = rng.randbytes(rng.randint(0, 64))
        elif kind == 1:  # a random header length, random bytes after it
            data = HEAD.pack(rng.randint(0, 2**32 - 1), rng.randint(0, 2**64 - 1)) + rng.randbytes(rng.randint(0, 32))
        elif kind == 2:  # a good header with one field set to a random JSON value
            field = rng.choice([*ws.REQUEST_FIELDS, "secret"])
            value = rng.choice([None, -1, 2**70, 1.5, "x", [], {}, {"k": [1]}, True])
            data = frame(good_header(cfg, **{field: value}), rng.randbytes(rng.randint(0, 32)))
        else:  # a truncated frame: the connection ends before the announced bytes came
            data = frame(good_header(cfg), b"\x00" * 8, body_len=1000)[: rng.randint(0, 60)]
        answer = raw(path, data)
        assert answer is None or answer["ok"] is False, (i, answer)
    return errors


def test_the_worker_survives_any_frame_and_still_serves_its_run(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = CFG
    ref = run_flower_inprocess(cfg)
    dirs = [root / "clients" / f"partition-{k}" for k in range(cfg.num_clients)]
    workers = [start_worker(d) for d in dirs]
    fuzzed = {"done": False, "idle": None}
    path = ws.socket_path(dirs[0])

    def fuzz_mid_run(node: int, mtype: str) -> bool:
        if node == in_process_node_id(0) and mtype == MSG_EMBED and not fuzzed["done"]:
            fuzzed["done"] = True
            idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # held open, silent, for the rest of the run
            idle.connect(str(path))
            idle.sendall(HEAD.pack(10, 0))  # half a frame, then nothing
            fuzzed["idle"] = idle
            fuzz(path, cfg)
            app = make_client_app()
            # another run of the same run_config: its hello is answered, but it cannot take the worker over
            other = thin_context(dirs[0], cfg, run_id=99)
            assert not app(message(HELLO), other).has_error()
            refused = app(message(MSG_EMBED, Payload(scalars={"step": 0})), other)
            assert refused.has_error() and "another run takes it over only once" in refused.error.reason
            # a message posing as the running run (its run id and config), without that session's secret
            spoof = thin_context(dirs[0], cfg, run_id=1)
            refused = app(message(MSG_EMBED, Payload(scalars={"step": 50})), spoof)
            assert refused.has_error() and "without the secret" in refused.error.reason
        return False

    grid = InProcessGrid(make_client_app(), cfg.num_clients, state_root=root / "clients",
                         node_configs=[{"worker": True}] * cfg.num_clients, drop=fuzz_mid_run)
    for context in grid.contexts.values():
        context.run_config = dict(flatten_config(cfg))
    results: list[dict] = []
    try:
        t0 = time.monotonic()
        run_server_app_inprocess(make_server_app(cfg, on_result=results.append, poll_s=0), grid)
        assert time.monotonic() - t0 < 120  # the idle connection blocked nothing
        assert fuzzed["done"]
        res = results[0]
        assert res["fault_log"] == [] and res["final"] == ref["final"]
        for k, v in ref["server_state"].items():
            assert torch.equal(v, res["server_state"][k]), k
        # the worker still answers the run after it ended (a real round trip), every thread alive
        context = grid.contexts[in_process_node_id(0)]
        reply = make_client_app()(message(HELLO), context)
        assert not reply.has_error() and reply.content.config_records["info"]["index"] == 0
        assert all(t.is_alive() for t, _ in workers)
    finally:
        if fuzzed["idle"] is not None:
            fuzzed["idle"].close()  # type: ignore[attr-defined]
        for thread, stop in workers:
            stop.set()
            thread.join(15)
            assert not thread.is_alive()
    out = capsys.readouterr().out
    assert "refused a frame: frame body of 4611686018427387904 bytes refused" in out
    assert "refused a request of run 99:" in out  # every refusal logged with its reason


def test_a_finished_or_silent_run_can_be_taken_over(root: Path) -> None:
    state = root / "c0"
    thread, stop = start_worker(state, lease_s=0.5)
    app = make_client_app()
    try:
        first = thin_context(state, CFG, run_id=1)
        assert not app(message(HELLO), first).has_error()
        assert not app(message(MSG_EMBED, Payload(scalars={"step": 0})), first).has_error()
        second = thin_context(state, CFG, run_id=2)
        held = app(message(MSG_EMBED, Payload(scalars={"step": 0})), second)
        assert held.has_error() and "last message came" in held.error.reason
        time.sleep(0.6)  # the first run went silent for longer than the lease: it is abandoned
        assert not app(message(MSG_EMBED, Payload(scalars={"step": 0})), second).has_error()
        gone = app(message(MSG_EMBED, Payload(scalars={"step": 1})), first)
        assert gone.has_error() and "taken over by run 2" in gone.error.reason
    finally:
        stop.set()
        thread.join(15)


def test_connections_do_not_wait_for_each_other(root: Path) -> None:
    state = root / "c0"
    thread, stop = start_worker(state)
    path = ws.socket_path(state)
    idle = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(4)]
    try:
        for sock in idle:
            sock.connect(str(path))  # connected, never sending a byte
        t0 = time.monotonic()
        answer = raw(path, frame(good_header(CFG, run_id=None)))
        assert answer is not None and "'run_id' is NoneType" in answer["error"]
        context = thin_context(state, replace(CFG, steps=3), run_id=4)
        assert not make_client_app()(message(HELLO), context).has_error()
        assert time.monotonic() - t0 < ws.FRAME_TIMEOUT_S / 2  # not after the idle connections' timeout
    finally:
        for sock in idle:
            sock.close()
        stop.set()
        thread.join(15)
    assert not thread.is_alive()


@pytest.mark.parametrize(("data", "error", "match"), [
    (HEAD.pack(2, 2**62) + b"{}", ws.BadFrame, "frame body of 4611686018427387904 bytes refused"),
    (HEAD.pack(2**31, 0), ws.BadFrame, "frame header of 2147483648 bytes refused"),
    (HEAD.pack(2, 0) + b"[]", ws.BadFrame, "JSON list"),
    (HEAD.pack(2, 3) + b"{}ab", EOFError, "2 of 3 bytes"),
])
def test_frame_caps_refuse_before_reading(data: bytes, error: type[Exception], match: str) -> None:
    left, right = socket.socketpair()
    with left, right:
        left.sendall(data)
        left.shutdown(socket.SHUT_WR)
        with pytest.raises(error, match=match):
            ws.recv_frame(right)


def test_header_schema() -> None:
    with pytest.raises(ws.BadFrame, match="'run_id' is NoneType"):
        ws.check_header(good_header(CFG, run_id=None), ws.REQUEST_FIELDS)
    ws.check_header(good_header(CFG), ws.REQUEST_FIELDS, ws.OPTIONAL_REQUEST_FIELDS)

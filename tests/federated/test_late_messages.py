"""No late, duplicated or replayed message corrupts a run (issue 22, section 4a).

A request whose reply comes after the server's timeout is not withdrawn: the slow client still handles it, and
the server then sends the same embedding gradient again. Each request carries its step (and the server's run
token) and each embedding gradient the step of the batch it belongs to, so the client applies it once, to that
batch: the run equals, tensor for tensor (server and clients), one where that client simply missed the step.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from flwr.app import Message, RecordDict

from pluribus.federated import FedBoneConfig, ModelConfig
from pluribus.federated.core.protocol import (
    MSG_EMBED,
    MSG_EVAL_EMBED,
    MSG_HEAD,
    Fault,
    Payload,
    StaleMessage,
    decode_payload,
)
from pluribus.federated.core.runtime import FedBoneClient, check_echo
from pluribus.federated.flower.client_app import STATE_KEY, make_client_app
from pluribus.federated.flower.server_app import GridTransport, run_flower_inprocess
from pluribus.federated.studies.simulate import FedBoneSimulation
from pluribus.federated.studies.tasks import build_suite
from pluribus.flower_engines import InProcessGrid, in_process_node_id

TINY = ModelConfig(dim=16, depth=1, heads=2, patch=2, adapter_hidden=16)
CFG = FedBoneConfig(suite="digits", tasks=("digit", "parity"), steps=5, batch_size=8, max_train_per_client=48,
                    model=TINY, eval_every=0)
SLOW = in_process_node_id(1)


def at(node: int, message_type: str, step: int):  # noqa: ANN201
    """A rule matching the message of ``message_type`` to ``node`` in global step ``step`` (group id = step)."""
    return lambda m: (m.metadata.dst_node_id == node and m.metadata.message_type == message_type
                      and m.metadata.group_id == str(step))


def nth_drop(node: int, message_type: str, n: int):  # noqa: ANN201
    """A drop rule: ``node`` never receives its ``n``-th message of ``message_type`` (counting from 1)."""
    seen = {"n": 0}

    def drop(dst: int, mtype: str) -> bool:
        if dst == node and mtype == message_type:
            seen["n"] += 1
            return seen["n"] == n
        return False
    return drop


def client_states(grid: InProcessGrid) -> dict[int, dict[str, torch.Tensor]]:
    out = {}
    for node, context in grid.contexts.items():
        record = context.state.array_records[STATE_KEY]
        out[node] = {k: torch.from_numpy(record[k].numpy().copy()) for k in record}
    return out


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


def run(cfg: FedBoneConfig, **faults: object) -> tuple[dict, InProcessGrid]:
    grid = InProcessGrid(make_client_app(cfg), cfg.num_clients, **faults)  # type: ignore[arg-type]
    return run_flower_inprocess(cfg, grid=grid), grid


@pytest.mark.parametrize("late_step", [1, 3])
def test_a_late_embed_reply_equals_a_missed_step(late_step: int) -> None:
    late, late_grid = run(CFG, late=at(SLOW, MSG_EMBED, late_step))
    missed, missed_grid = run(CFG, drop=nth_drop(SLOW, MSG_EMBED, late_step + 1))
    # the slow client did handle the request, after the server had stopped waiting: a real embedding reply that
    # the server never used (it recorded a timeout, as for the client that missed the step)
    assert len(late_grid.stray_replies) == 1 and not late_grid.stray_replies[0].has_error()
    stray = decode_payload(late_grid.stray_replies[0].content)
    assert stray.scalars["step"] == late_step and "z" in stray.tensors
    assert late["fault_log"] == missed["fault_log"] == [
        {"step": late_step, "client": 1, "message_type": MSG_EMBED, "kind": "timeout", "reason": f"timeout after {CFG.timeout_s} s"}]
    assert_same_tensors(late["server_state"], missed["server_state"])
    assert late["final"] == missed["final"] and late["bytes"] == missed["bytes"]
    late_clients, missed_clients = client_states(late_grid), client_states(missed_grid)
    for node in late_clients:  # the slow client applied the resent embedding gradient once, to its batch
        assert_same_tensors(late_clients[node], missed_clients[node])


def test_duplicated_requests_change_nothing() -> None:
    ref, ref_grid = run(CFG)
    # every message to client 1 is delivered a second time, just before the server's next messages
    dup, dup_grid = run(CFG, duplicate=lambda m: m.metadata.dst_node_id == SLOW)
    assert dup["fault_log"] == [] and dup["final"] == ref["final"]
    assert_same_tensors(dup["server_state"], ref["server_state"])
    dup_clients, ref_clients = client_states(dup_grid), client_states(ref_grid)
    for node in ref_clients:
        assert_same_tensors(dup_clients[node], ref_clients[node])
    training = [r for r in dup_grid.stray_replies if r.metadata.message_type in (MSG_EMBED, MSG_HEAD)]
    assert len(training) == 2 * CFG.steps  # the last head's copy comes with the final evaluation
    assert all(r.has_error() and "refused as stale, duplicated or replayed" in r.error.reason for r in training)


def test_a_late_and_duplicated_run_equals_missed_steps_over_micro_batches() -> None:
    cfg = replace(CFG, steps=6, micro_batches_per_message=2)
    late, late_grid = run(cfg, late=at(SLOW, MSG_EMBED, 2), duplicate=lambda m: m.metadata.dst_node_id == SLOW)
    missed, missed_grid = run(cfg, drop=nth_drop(SLOW, MSG_EMBED, 2))
    assert_same_tensors(late["server_state"], missed["server_state"])
    late_clients, missed_clients = client_states(late_grid), client_states(missed_grid)
    for node in late_clients:
        assert_same_tensors(late_clients[node], missed_clients[node])


@pytest.fixture(scope="module")
def task():  # noqa: ANN201
    return build_suite("digits", ("digit",), seed=0, max_train_per_client=48)[0]


def test_client_refuses_stale_duplicated_and_replayed_requests(task) -> None:  # noqa: ANN001
    client = FedBoneClient(task, CFG, 0)

    def refused(message_type: str, payload: Payload, match: str) -> None:
        before = client.state_tensors()
        with pytest.raises(StaleMessage, match=match):
            client.handle(message_type, payload, strict=True)
        assert_same_tensors(client.state_tensors(), before)  # nothing changed

    z0 = client.handle(MSG_EMBED, Payload(scalars={"step": 0}), strict=True)
    assert z0.scalars == {"step": 0}  # the reply echoes its step
    refused(MSG_EMBED, Payload(scalars={"step": 0}), "train.embed of step 0 refused")  # a duplicate
    f = torch.randn_like(z0.tensors["z"])
    refused(MSG_HEAD, Payload({"f": f}, {"step": 3}), "holds the embeddings of step 0")
    client.handle(MSG_HEAD, Payload({"f": f}, {"step": 0}), strict=True)
    refused(MSG_HEAD, Payload({"f": f}, {"step": 0}), "already took its head step for step 0")
    refused(MSG_HEAD, Payload({"f": f}), "without its 'step' tag")
    dz = torch.randn_like(z0.tensors["z"]) * 1e-2
    refused(MSG_EMBED, Payload({"dz": dz}, {"step": 1, "dz_step": 4}), "embedding gradient of step 4 refused")
    refused(MSG_EMBED, Payload({"dz": dz * float("nan")}, {"step": 1, "dz_step": 0}), "non-finite")
    before = {k: v for k, v in client.state_tensors().items() if k.startswith("model.embed")}
    client.handle(MSG_EMBED, Payload({"dz": dz}, {"step": 1, "dz_step": 0}), strict=True)
    after = {k: v for k, v in client.state_tensors().items() if k.startswith("model.embed")}
    assert any(not torch.equal(before[k], after[k]) for k in before)  # applied once ...
    client.handle(MSG_EMBED, Payload({"dz": dz}, {"step": 2, "dz_step": 0}), strict=True)
    again = {k: v for k, v in client.state_tensors().items() if k.startswith("model.embed")}
    assert_same_tensors(again, after)  # ... and a resent one is skipped: it went to the batch of step 0 already
    refused(MSG_EMBED, Payload(scalars={"step": 1}), "already embedded step 2")  # an old request, replayed
    # the client's marks travel with its state (Context.state, checkpoints)
    other = FedBoneClient(task, CFG, 0)
    other.load_state_tensors(client.state_tensors())
    with pytest.raises(StaleMessage, match="already embedded step 2"):
        other.handle(MSG_EMBED, Payload(scalars={"step": 2}), strict=True)


def test_server_drops_a_reply_of_another_step_or_run() -> None:
    request = Payload(scalars={"step": 3, "run": "abc"})
    ok = check_echo(request, Payload({"z": torch.zeros(1)}, {"step": 3, "run": "abc", "loss": 1.0}))
    assert isinstance(ok, Payload) and ok.scalars == {"loss": 1.0}  # the echo is checked and stripped
    for scalars, what in (({"step": 2}, "step 2"), ({"step": 3, "run": "old"}, "run 'old'")):
        fault = check_echo(request, Payload(scalars=scalars))
        assert isinstance(fault, Fault) and fault.kind == "stale" and fault.transient and what in fault.reason


def test_a_stale_reply_is_a_recorded_fault_and_never_moves_the_server() -> None:
    tasks = build_suite("digits", CFG.tasks, seed=0, max_train_per_client=48)

    def stale(client: int, message_type: str, reply: Payload) -> Payload:
        if client == 1 and message_type == MSG_EMBED and reply.scalars["step"] == 2:
            reply.scalars["step"] = 1  # an answer to another step, with tensors of the right shape
        return reply

    sim = FedBoneSimulation(CFG, tasks, tamper=stale)
    logs = [sim.step() for _ in range(CFG.steps)]
    assert logs[2].fault_records == [{"step": 2, "client": 1, "message_type": MSG_EMBED, "kind": "stale",
                                      "reason": "stale reply: it answers step 1, the request was step 2"}]
    ref = FedBoneSimulation(CFG, tasks)
    inner = ref.transport.call

    def missing(message_type: str, requests: dict[int, Payload], step: int) -> dict:
        out = inner(message_type, {c: p for c, p in requests.items()
                                   if not (c == 1 and message_type == MSG_EMBED and step == 2)}, step)
        return out
    ref.transport.call = missing  # type: ignore[method-assign]
    for _ in range(CFG.steps):
        ref.step()
    assert_same_tensors(sim.server.state_tensors(), ref.server.state_tensors())
    for c in sim.clients:
        assert_same_tensors(sim.clients[c].state_tensors(), ref.clients[c].state_tensors())


def test_a_client_answers_only_the_run_it_serves() -> None:
    grid = InProcessGrid(make_client_app(CFG), 2)
    nodes = {c: in_process_node_id(c) for c in range(2)}
    first = GridTransport(grid, nodes, timeout_s=5.0, run="run-a")
    assert all(isinstance(r, Payload) for r in first.call(MSG_EMBED, {0: Payload(), 1: Payload()}, 0).values())
    other = GridTransport(grid, nodes, timeout_s=5.0, run="run-b")
    out = other.call(MSG_EVAL_EMBED, {0: Payload()}, 1)
    assert isinstance(out[0], Fault) and out[0].kind == "error" and "run run-b refused" in out[0].reason


def test_in_process_grid_keeps_late_and_second_replies_from_the_server() -> None:
    grid = InProcessGrid(make_client_app(CFG), 2, late=lambda m: m.metadata.dst_node_id == SLOW,
                         duplicate=lambda m: m.metadata.dst_node_id == in_process_node_id(0))
    transport = GridTransport(grid, {c: in_process_node_id(c) for c in range(2)}, timeout_s=0.2, poll_s=0.01)
    out = transport.call(MSG_EMBED, {0: Payload(), 1: Payload()}, 0)
    assert isinstance(out[0], Payload) and isinstance(out[1], Fault) and out[1].kind == "timeout"
    assert grid.stray_replies == []  # delivered at the next push, as a slow node (or a redelivery) would
    transport.call(MSG_EVAL_EMBED, {0: Payload()}, 1)
    kinds = sorted((r.metadata.src_node_id, r.has_error()) for r in grid.stray_replies)
    assert kinds == [(in_process_node_id(0), True), (SLOW, False)]  # the copy refused; the late one answered
    assert all(isinstance(m, Message) for m in grid.stray_replies)


@pytest.mark.parametrize(("late_step", "k"), [(1, 1), (4, 1), (2, 2)])  # 4: the last step, settled by the final evaluation
def test_a_late_head_reply_equals_a_missed_step(late_step: int, k: int) -> None:
    cfg = replace(CFG, steps=6 if k > 1 else CFG.steps, micro_batches_per_message=k)
    late, late_grid = run(cfg, late=at(SLOW, MSG_HEAD, late_step))
    missed, missed_grid = run(cfg, drop=nth_drop(SLOW, MSG_HEAD, late_step // k + 1))
    # the slow client took its head step and answered, after the server had stopped waiting: the server ignored the
    # reply, so the client rolls its head, adapter and their optimizer state back when the next request carries no
    # embedding gradient for that step
    assert len(late_grid.stray_replies) == 1 and not late_grid.stray_replies[0].has_error()
    assert "df" in decode_payload(late_grid.stray_replies[0].content).tensors
    assert late["fault_log"] == missed["fault_log"] == [
        {"step": late_step, "client": 1, "message_type": MSG_HEAD, "kind": "timeout",
         "reason": f"timeout after {cfg.timeout_s} s"}]
    assert_same_tensors(late["server_state"], missed["server_state"])
    assert late["final"] == missed["final"] and late["bytes"] == missed["bytes"]
    late_clients, missed_clients = client_states(late_grid), client_states(missed_grid)
    for node in late_clients:
        assert_same_tensors(late_clients[node], missed_clients[node])


def test_a_head_step_is_kept_when_the_server_took_it_and_undone_when_it_did_not(task) -> None:  # noqa: ANN001
    def output_state(c: FedBoneClient) -> dict[str, torch.Tensor]:
        return {k: v for k, v in c.state_tensors().items() if k.startswith(("model.adapter", "model.head", "output_opt"))}

    client = FedBoneClient(task, CFG, 0)
    z = client.handle(MSG_EMBED, Payload(scalars={"step": 0}), strict=True).tensors["z"]
    f = torch.randn_like(z)
    before = output_state(client)
    client.handle(MSG_HEAD, Payload({"f": f}, {"step": 0}), strict=True)
    took = output_state(client)
    assert any(not torch.equal(before[k], took[k]) for k in before)
    assert "head_undo.steps" in client.state_tensors()  # the undo travels with the state (Context.state, checkpoints)
    restored = FedBoneClient(task, CFG, 0)
    restored.load_state_tensors(client.state_tensors())
    # the server took step 0: its gradient rides on the next request, and the head step stays
    restored.handle(MSG_EMBED, Payload({"dz": torch.zeros_like(z)}, {"step": 1, "dz_step": 0}), strict=True)
    assert_same_tensors({k: v for k, v in output_state(restored).items()}, took)
    assert "head_undo.steps" not in restored.state_tensors()
    # it did not (no gradient for step 0): the head, adapter, Adam state and head mark go back as they were
    client.handle(MSG_EMBED, Payload(scalars={"step": 1}), strict=True)
    assert_same_tensors(output_state(client), before)
    assert client.marks is not None and client.marks.headed == -1 and "head_undo.steps" not in client.state_tensors()
    # a refused request changes nothing, the pending head step included
    client.handle(MSG_HEAD, Payload({"f": f}, {"step": 1}), strict=True)
    state = client.state_tensors()
    with pytest.raises(StaleMessage, match="embedding gradient of step 0 refused"):
        client.handle(MSG_EMBED, Payload({"dz": torch.zeros_like(z)}, {"step": 2, "dz_step": 0}), strict=True)
    assert_same_tensors(client.state_tensors(), state)


class RecordingGrid(InProcessGrid):
    """An InProcessGrid that keeps every message the server pushes."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.pushed: list[Message] = []

    def push_messages(self, messages):  # noqa: ANN001, ANN201
        messages = list(messages)
        self.pushed.extend(messages)
        return super().push_messages(messages)


def test_every_request_lives_the_step_timeout(tmp_path) -> None:  # noqa: ANN001
    cfg = replace(CFG, steps=2, eval_every=1, checkpoint_every=1, timeout_s=7.5)
    grid = RecordingGrid(make_client_app(cfg), cfg.num_clients, state_root=tmp_path / "clients")
    run_flower_inprocess(cfg, grid=grid, run_dir=tmp_path / "run")
    ttl = {(m.metadata.message_type, m.metadata.ttl) for m in grid.pushed}
    assert {t for t, _ in ttl} == {"query.hello", MSG_EMBED, MSG_HEAD, MSG_EVAL_EMBED, "evaluate.head",
                                   "query.checkpoint_save"}
    # the hello waits at least 10 s for slow starters, every other request the step timeout
    assert ttl == {("query.hello", 10.0)} | {(t, 7.5) for t, _ in ttl if t != "query.hello"}


def test_a_request_of_a_timed_out_step_expires_on_the_superlink() -> None:
    import time

    from flwr.server.utils.validator import validate_message

    grid = RecordingGrid(make_client_app(CFG), 2, drop=lambda node, _: node == SLOW)
    transport = GridTransport(grid, {c: in_process_node_id(c) for c in range(2)}, timeout_s=0.3, poll_s=0.01)
    out = transport.call(MSG_EVAL_EMBED, {0: Payload(), 1: Payload()}, 0)
    assert isinstance(out[1], Fault) and out[1].kind == "timeout"
    request = grid.pushed[1]
    assert request.metadata.dst_node_id == SLOW and request.metadata.ttl == 0.3
    time.sleep(0.35)
    # Flower's own check, as the SuperLink runs it on every stored request before a node pulls it: gone
    assert "Message TTL has expired" in validate_message(request, False)
    # and a reply the slow client makes now has no lifetime left: the SuperLink refuses it
    late_reply = Message(RecordDict(), reply_to=request)
    assert late_reply.metadata.ttl <= 0 and "`metadata.ttl` must be higher than zero" in validate_message(late_reply, True)

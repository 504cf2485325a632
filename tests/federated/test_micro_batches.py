"""micro_batches_per_message (K): one round of messages carries K global steps. K = 1 is the exact FedBone step
in every micro_batch_mode; K > 1 follows each mode's documented semantics (every micro-batch sees the exchange's
starting backbone θ_t; "stale" steps K times with gradients up to K - 1 steps stale, "stale_damped" at lr / (1 + j),
the "accumulate*" modes average each client's K gradients into one aggregation, stepped once at lr, lr × K,
lr × √K, or K times); bad K and modes are refused; the Flower path and resume agree."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pluribus.errors import ConfigError
from pluribus.federated import FedBoneConfig, ModelConfig
from pluribus.federated.core.config import MICRO_BATCH_MODES
from pluribus.federated.core.protocol import MSG_EMBED, Payload
from pluribus.federated.core.runtime import FedBoneClient, FedBoneServer
from pluribus.federated.core.split import task_loss
from pluribus.federated.studies.simulate import FedBoneSimulation
from pluribus.federated.studies.tasks import build_suite

TINY = ModelConfig(dim=16, depth=1, heads=2, patch=2, adapter_hidden=16)
CFG = FedBoneConfig(suite="digits", tasks=("digit", "segmentation"), steps=5, batch_size=8,
                    max_train_per_client=48, model=TINY)


@pytest.fixture(scope="module")
def tasks():
    return build_suite(CFG.suite, CFG.tasks, seed=0, max_train_per_client=48)


def reference_run(cfg: FedBoneConfig, tasks) -> FedBoneServer:  # noqa: ANN001
    """FedBone written out step by step from the spec (K = 1) and from the documented K > 1 semantics."""
    clients = [FedBoneClient(t, cfg, i) for i, t in enumerate(tasks)]
    server = FedBoneServer(cfg)
    big_k, ell = cfg.micro_batches_per_message, cfg.local_steps
    owed: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # per client: (indices, dz) per global step
    sizes = torch.tensor([float(t.num_train) for t in tasks])
    for t in range(0, cfg.steps, big_k):
        k = min(big_k, cfg.steps - t)
        grads: list[list[torch.Tensor]] = [[] for _ in range(k)]
        replay: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(k)]
        for c, cl in enumerate(clients):
            for idx, dz in owed.pop(c, []):  # message 4: one embedding step per global step, in order
                z = cl.model.embed(cl.task.x_train[idx.reshape(-1)])
                cl.embed_opt.zero_grad()
                z.backward(dz.reshape(z.shape))
                cl.embed_opt.step()
            steps_idx = [cl.batches(t + j) for j in range(k)]
            with torch.no_grad():  # all k micro-batches embedded with the embedding as it stands
                zs = [cl.model.embed(cl.task.x_train[i.reshape(-1)]) for i in steps_idx]
            graphs = [server.forward(z.reshape(ell, -1, *z.shape[1:])) for z in zs]  # all at θ_t
            for j, (leaf, f) in enumerate(graphs):
                dfs = []
                for m in range(ell):  # head/adapter: one update per mini-batch, in order
                    fm = f[m].detach().clone().requires_grad_(True)
                    loss = task_loss(cl.task.kind, cl.model.output(fm), cl.task.y_train[steps_idx[j][m]])
                    cl.output_opt.zero_grad()
                    loss.backward()
                    cl.output_opt.step()
                    assert fm.grad is not None
                    dfs.append(fm.grad / ell)
                g, dz = server.backward(leaf, f, torch.stack(dfs))
                grads[j].append(g)
                replay[j].append((leaf.detach(), torch.stack(dfs)))
                owed.setdefault(c, []).append((steps_idx[j], dz.detach()))
        server_update(server, cfg.micro_batch_mode, grads, replay, t, sizes)
    return server


def server_update(server: FedBoneServer, mode: str, grads: list[list[torch.Tensor]],
                  replay: list[list[tuple[torch.Tensor, torch.Tensor]]], t: int, sizes: torch.Tensor) -> None:
    """Each micro_batch_mode written out with the optimizer and aggregator themselves (not via step_exchange)."""
    k, opt, lr = len(grads), server.opt, server.config.server_lr
    segments = [p.numel() for p in server.params]

    def apply(vector: torch.Tensor, rate: float) -> None:
        opt.param_groups[0]["lr"] = rate
        offset = 0
        for p in server.params:
            p.grad = vector[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        opt.step()
        opt.zero_grad(set_to_none=True)
        opt.param_groups[0]["lr"] = lr

    if k > 1 and mode == "refresh":
        for j in range(k):  # step t + j: the clients' feature gradients back-propagated through θ_{t+j}
            rows = grads[0] if j == 0 else [
                torch.cat([p.reshape(-1) for p in torch.autograd.grad(
                    server.model(z.reshape(-1, *z.shape[2:])).reshape(z.shape), server.params, grad_outputs=df)])
                for z, df in replay[j]]
            vector, _ = server.aggregator(torch.stack(rows), step=t + j, segments=segments, sizes=sizes)
            apply(vector, lr)
        return
    if k == 1 or mode.startswith("stale"):
        for j in range(k):  # step t + j applies gradients computed at θ_t
            vector, _ = server.aggregator(torch.stack(grads[j]), step=t + j, segments=segments, sizes=sizes)
            apply(vector, lr / (1 + j) if mode == "stale_damped" else lr)
        return
    rows = [sum(g[c] for g in grads) / k for c in range(len(grads[0]))]  # per client: mean of its K gradients
    vector, _ = server.aggregator(torch.stack(rows), step=t, segments=segments, sizes=sizes)
    if mode == "accumulate_repeat":
        for _ in range(k):
            apply(vector, lr)
    else:
        apply(vector, lr * {"accumulate": 1.0, "accumulate_lr": k, "accumulate_sqrt_lr": k ** 0.5}[mode])


def run(cfg: FedBoneConfig, tasks) -> FedBoneSimulation:  # noqa: ANN001
    sim = FedBoneSimulation(cfg, tasks)
    calls = {"embed": 0}
    inner = sim.transport.call

    def counting(message_type: str, requests: dict[int, Payload], step: int):  # noqa: ANN202
        calls["embed"] += message_type == MSG_EMBED
        return inner(message_type, requests, step)

    sim.transport.call = counting  # type: ignore[method-assign]
    while sim.next_step < cfg.steps:
        sim.exchange()
    sim.calls = calls  # type: ignore[attr-defined]
    return sim


def same_state(a: FedBoneServer, b: FedBoneServer) -> bool:
    sa, sb = a.state_tensors(), b.state_tensors()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def optimizer_steps(server: FedBoneServer) -> set[int]:
    return {int(v) for k_, v in server.state_tensors().items() if k_.endswith(".step")}


@pytest.mark.parametrize(("k", "local_steps"), [(1, 1), (1, 2), (3, 1), (2, 2)])
def test_exchange_matches_the_written_out_algorithm(tasks, k: int, local_steps: int) -> None:  # noqa: ANN001
    cfg = replace(CFG, micro_batches_per_message=k, local_steps=local_steps)
    sim = run(cfg, tasks)
    assert same_state(sim.server, reference_run(cfg, tasks))
    assert sim.calls["embed"] == -(-cfg.steps // k)  # type: ignore[attr-defined]  # one round of messages per K
    assert optimizer_steps(sim.server) == {cfg.steps}  # one server optimizer step per global step, whatever K


@pytest.mark.parametrize("mode", MICRO_BATCH_MODES)
def test_every_mode_at_k1_is_the_fedbone_step(tasks, mode: str) -> None:  # noqa: ANN001
    base = run(replace(CFG, local_steps=2), tasks)
    sim = run(replace(CFG, local_steps=2, micro_batch_mode=mode), tasks)
    assert same_state(sim.server, base.server)  # bit for bit, whatever the mode


# steps 5 at K = 3: one full exchange and one of 2 micro-batches (scaled by its own count)
@pytest.mark.parametrize("mode", MICRO_BATCH_MODES)
@pytest.mark.parametrize(("k", "local_steps"), [(3, 1), (2, 2)])
def test_each_mode_matches_its_written_out_update(tasks, mode: str, k: int, local_steps: int) -> None:  # noqa: ANN001
    cfg = replace(CFG, micro_batches_per_message=k, local_steps=local_steps, micro_batch_mode=mode)
    sim = run(cfg, tasks)
    assert same_state(sim.server, reference_run(cfg, tasks))
    assert sim.calls["embed"] == -(-cfg.steps // k)  # type: ignore[attr-defined]
    exchanges = -(-cfg.steps // k)
    want = exchanges if mode.startswith("accumulate") and mode != "accumulate_repeat" else cfg.steps
    assert optimizer_steps(sim.server) == {want}


def test_modes_differ_and_log_one_aggregation_per_exchange(tasks) -> None:  # noqa: ANN001
    cfg = replace(CFG, micro_batches_per_message=3)
    states = {mode: run(replace(cfg, micro_batch_mode=mode), tasks).server for mode in MICRO_BATCH_MODES}
    for a in MICRO_BATCH_MODES:  # each mode is its own optimisation
        for b in MICRO_BATCH_MODES:
            assert a == b or not same_state(states[a], states[b]), (a, b)
    sim = FedBoneSimulation(replace(cfg, micro_batch_mode="accumulate"), tasks)
    logs = sim.exchange()
    assert [log.stats is None for log in logs] == [True, True, False]  # logged at the exchange's last step
    assert all(log.participants == [0, 1] for log in logs)
    assert sim.server.opt.param_groups[0]["lr"] == cfg.server_lr  # a scaled step leaves the lr as it was
    lr_sim = FedBoneSimulation(replace(cfg, micro_batch_mode="accumulate_lr"), tasks)
    lr_sim.exchange()
    assert lr_sim.server.opt.param_groups[0]["lr"] == cfg.server_lr


def test_k_changes_the_optimisation_and_k1_is_the_default(tasks) -> None:  # noqa: ANN001
    assert FedBoneConfig().micro_batches_per_message == 1
    one, three = run(CFG, tasks), run(replace(CFG, micro_batches_per_message=3), tasks)
    assert not same_state(one.server, three.server)  # stale gradients: K > 1 is not the same run
    one.evaluate()
    three.evaluate()  # delivers the last embedding gradients
    # the same tensors cross the split (the last exchange's embedding gradients ride on the evaluation request)
    assert one.meter.total() == three.meter.total()
    assert one.meter.by_category["train.features"] == three.meter.by_category["train.features"]


def test_bad_k_is_refused(tasks) -> None:  # noqa: ANN001
    for bad in (0, -2):
        with pytest.raises(ConfigError, match="micro_batches_per_message must be >= 1"):
            replace(CFG, micro_batches_per_message=bad)
    with pytest.raises(ConfigError, match="micro_batches_per_message must be <= 1024, got 1000000000"):
        replace(CFG, micro_batches_per_message=10**9)
    with pytest.raises(ConfigError, match="checkpoint_every .* multiple of micro_batches_per_message"):
        replace(CFG, micro_batches_per_message=4, checkpoint_every=6)
    with pytest.raises(ConfigError, match="eval_every"):
        replace(CFG, micro_batches_per_message=4, eval_every=2)
    with pytest.raises(ConfigError, match=r"^micro_batch_mode: unknown 'fresh'; known: \['stale'"):
        replace(CFG, micro_batch_mode="fresh")
    client = FedBoneClient(tasks[0], replace(CFG, micro_batches_per_message=2), 0)
    with pytest.raises(ConfigError, match="asks for 3 micro-batches"):
        client.handle(MSG_EMBED, Payload(scalars={"step": 0, "count": 3}))


@pytest.mark.parametrize("mode", ["stale", "accumulate_lr"])
def test_flower_path_and_resume_at_k(tmp_path: Path, mode: str) -> None:
    from flwr.app import Message

    from pluribus.federated.flower.server_app import run_flower_inprocess

    cfg = replace(CFG, steps=6, micro_batches_per_message=2, checkpoint_every=2, micro_batch_mode=mode)
    sim = FedBoneSimulation(cfg)
    while sim.next_step < cfg.steps:
        sim.exchange()
    full = run_flower_inprocess(cfg)
    for key, value in sim.server.state_tensors().items():
        assert torch.equal(value, full["server_state"][key]), key
    assert len(full["step_times"]) == cfg.steps

    def crash(m: Message) -> bool:
        if m.metadata.message_type == MSG_EMBED and m.metadata.group_id == "4":
            raise RuntimeError("simulated crash")
        return False

    with pytest.raises(RuntimeError, match="simulated crash"):
        run_flower_inprocess(cfg, run_dir=tmp_path / "run", unavailable=crash)
    resumed = run_flower_inprocess(cfg, run_dir=tmp_path / "run")
    assert resumed["resumed_from"] == 4 and resumed["final"] == full["final"]
    for key, value in full["server_state"].items():
        assert torch.equal(value, resumed["server_state"][key]), key


def test_refresh_leaves_out_a_client_whose_refreshed_gradient_is_not_finite(tasks) -> None:  # noqa: ANN001
    sim = FedBoneSimulation(replace(CFG, micro_batches_per_message=3, micro_batch_mode="refresh"), tasks)
    inner, calls = sim.server.forward, {"n": 0}

    def forward(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls["n"] += 1
        leaf, f = inner(z)
        # 2 clients x 3 micro-batches at θ_t, then refreshes (j=1: clients 0, 1; j=2: clients 0, 1)
        return (leaf, f * float("nan")) if calls["n"] == 10 else (leaf, f)

    sim.server.forward = forward  # type: ignore[method-assign]
    logs = sim.exchange()
    assert calls["n"] == 10
    assert [log.participants for log in logs] == [[0, 1], [0, 1], [0]]
    assert list(logs[2].quarantined) == [1] and "refreshed" in logs[2].quarantined[1]
    assert all(torch.isfinite(p).all() for p in sim.server.model.parameters())


@pytest.mark.parametrize(("setting", "message"), [
    ("micro_batch_mode=fresh", "micro_batch_mode: unknown 'fresh'; known: ['stale'"),
    ("micro_batches_per_message=0", "micro_batches_per_message must be >= 1, got 0"),
    ("micro_batches_per_message=5000", "micro_batches_per_message must be <= 1024, got 5000"),
])
def test_cli_refuses_bad_k_and_mode_in_one_line(tmp_path: Path, capsys, setting: str, message: str) -> None:  # noqa: ANN001
    from pluribus.cli import main

    cfg = tmp_path / "fed.toml"
    cfg.write_text('suite = "digits"\nsteps = 2\n')
    out = tmp_path / "run"
    assert main(["fed", "run", "--config", str(cfg), "--out", str(out), "--set", setting]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()  # nothing half-written

"""micro_batches_per_message (K): one round of messages carries K global steps. K = 1 is the exact FedBone step;
K > 1 follows its documented semantics (every micro-batch sees the exchange's starting backbone θ_t, the server's
K steps apply gradients up to K - 1 steps stale); bad K is refused; the Flower path and resume agree."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pluribus.errors import ConfigError
from pluribus.federated import FedBoneConfig, ModelConfig
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
                owed.setdefault(c, []).append((steps_idx[j], dz.detach()))
        for j in range(k):  # step t + j applies gradients computed at θ_t
            server.step(grads[j], t + j, sizes)
    return server


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


@pytest.mark.parametrize(("k", "local_steps"), [(1, 1), (1, 2), (3, 1), (2, 2)])
def test_exchange_matches_the_written_out_algorithm(tasks, k: int, local_steps: int) -> None:  # noqa: ANN001
    cfg = replace(CFG, micro_batches_per_message=k, local_steps=local_steps)
    sim = run(cfg, tasks)
    assert same_state(sim.server, reference_run(cfg, tasks))
    assert sim.calls["embed"] == -(-cfg.steps // k)  # type: ignore[attr-defined]  # one round of messages per K
    adam_steps = {int(v) for k_, v in sim.server.state_tensors().items() if k_.endswith(".step")}
    assert adam_steps == {cfg.steps}  # one server optimizer step per global step, whatever K


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
    client = FedBoneClient(tasks[0], replace(CFG, micro_batches_per_message=2), 0)
    with pytest.raises(ConfigError, match="asks for 3 micro-batches"):
        client.handle(MSG_EMBED, Payload(scalars={"step": 0, "count": 3}))


def test_flower_path_and_resume_at_k(tmp_path: Path) -> None:
    from flwr.app import Message

    from pluribus.federated.flower.server_app import run_flower_inprocess

    cfg = replace(CFG, steps=6, micro_batches_per_message=2, checkpoint_every=2)
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

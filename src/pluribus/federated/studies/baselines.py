"""Baselines on the same data, model and budget as FedBone: local-only, FedAvg, FedProx, FedPer, FedRep.

Every client holds the full model (its embedding, its own copy of the general model, adapter and head) and
trains on the same mini-batches FedBone would use (``steps × local_steps`` per client). Every ``round_steps``
mini-batches the shared parts are averaged, weighted by data size:

- ``local``: nothing shared (the Δm reference).
- ``fedavg``: general model (+ embedding when all inputs have one shape) averaged; adapter and head local.
- ``fedprox``: FedAvg plus a proximal term (μ/2)‖w − w_global‖² on the shared parts.
- ``fedper``: only the general model averaged; embedding, adapter and head personal.
- ``fedrep``: as FedPer, but each round first trains the personal parts (``fedrep_head_steps`` batches) with
  the backbone frozen, then the backbone with the personal parts frozen.

FedBone's own ablations (no projection, no history attention) are aggregation configs of ``run_fedbone``.

With a run folder a baseline checkpoints like FedBone (``config.checkpoint_every`` steps apart, checkpoint
``latest``: every client's models and optimizers, the last average and the byte count) and a rerun resumes
from it to the result of an uninterrupted run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pluribus.errors import ConfigError
from pluribus.federated.core.config import FedBoneConfig
from pluribus.federated.core.runtime import (
    load_module_tensors,
    load_optimizer_tensors,
    module_tensors,
    optimizer_tensors,
    seeded,
)
from pluribus.federated.core.split import (
    ClientModel,
    GeneralModel,
    check_common_inputs,
    common_embedding_seed,
    task_loss,
    task_metrics,
)
from pluribus.federated.core.task import ClientTask
from pluribus.federated.studies.results import RunResult, track_steps, write_run_folder
from pluribus.federated.studies.tasks import build_config_suite


class _LocalLearner:
    def __init__(self, task: ClientTask, config: FedBoneConfig, index: int) -> None:
        self.task, self.config, self.index = task, config, index
        with seeded(config.seed * 1009 + index + 1):
            self.client = ClientModel(task, config.model, common_seed=common_embedding_seed(config.seed))
        with seeded(config.seed * 1009):
            self.general = GeneralModel(config.model)
        self.personal_opt = torch.optim.Adam(self.client.parameters(), lr=config.client_lr)
        self.shared_opt = torch.optim.AdamW(self.general.parameters(), lr=config.server_lr,
                                            weight_decay=config.server_weight_decay)
        self.share_embedding = False

    def batch(self, step: int, j: int) -> torch.Tensor:
        rng = np.random.default_rng([self.config.seed, self.index, step])
        n, b = self.task.num_train, min(self.config.batch_size, self.task.num_train)
        draws = [rng.choice(n, size=b, replace=False) for _ in range(self.config.local_steps)]
        return torch.from_numpy(draws[j])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.client.output(self.general(self.client.embed(x)))

    def train_batch(self, idx: torch.Tensor, *, anchor: dict[str, torch.Tensor] | None, which: str) -> float:
        loss = task_loss(self.task.kind, self.forward(self.task.x_train[idx]), self.task.y_train[idx])
        if anchor is not None and self.config.prox_mu > 0:
            params = dict(self.named_shared())
            prox = sum(((params[k] - v) ** 2).sum() for k, v in anchor.items())
            loss = loss + 0.5 * self.config.prox_mu * prox
        self.personal_opt.zero_grad()
        self.shared_opt.zero_grad()
        loss.backward()
        if which in ("all", "personal"):
            self.personal_opt.step()
        if which in ("all", "shared"):
            self.shared_opt.step()
        return float(loss.detach())

    def named_shared(self) -> list[tuple[str, nn.Parameter]]:
        shared = [(f"general.{k}", v) for k, v in self.general.named_parameters()]
        if self.config.algorithm in ("fedavg", "fedprox") and self.share_embedding:
            shared += [(f"embed.{k}", v) for k, v in self.client.embed.named_parameters()]
        return shared

    def state_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Models and optimizers under ``prefix`` (a checkpoint)."""
        return {**module_tensors(self.client, f"{prefix}.client"), **module_tensors(self.general, f"{prefix}.general"),
                **optimizer_tensors(self.personal_opt, f"{prefix}.personal_opt"),
                **optimizer_tensors(self.shared_opt, f"{prefix}.shared_opt")}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], prefix: str) -> None:
        """Restore ``state_tensors``."""
        load_module_tensors(self.client, tensors, f"{prefix}.client")
        load_module_tensors(self.general, tensors, f"{prefix}.general")
        load_optimizer_tensors(self.personal_opt, tensors, f"{prefix}.personal_opt")
        load_optimizer_tensors(self.shared_opt, tensors, f"{prefix}.shared_opt")

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        out = self.forward(self.task.x_test)
        return {**task_metrics(self.task.kind, out, self.task.y_test),
                "loss": float(task_loss(self.task.kind, out, self.task.y_test))}


def _average(learners: list[_LocalLearner]) -> dict[str, torch.Tensor]:
    sizes = torch.tensor([float(lr.task.num_train) for lr in learners])
    weights = sizes / sizes.sum()
    named = [dict(lr.named_shared()) for lr in learners]
    avg = {k: sum(w * d[k].detach() for w, d in zip(weights, named, strict=True)) for k in named[0]}
    with torch.no_grad():
        for d in named:
            for k, v in d.items():
                v.copy_(avg[k])
    return {k: v.clone() for k, v in avg.items()}


def run_baseline(
    config: FedBoneConfig, *, tasks: list[ClientTask] | None = None, run_dir: str | Path | None = None,
    resume: bool = True, progress: bool = True,
) -> RunResult:
    """Train one baseline in-process on FedBone's data and budget; final test metrics per client."""
    from pluribus.runs import RunFolder

    folder = RunFolder(run_dir, config, resume=resume) if run_dir is not None else None
    suite = tasks if tasks is not None else build_config_suite(config)
    check_common_inputs(suite, config.model)
    if len(suite) != config.num_clients:
        raise ConfigError(f"{len(suite)} client tasks given for {config.num_clients} clients in config.tasks")
    learners = [_LocalLearner(t, config, k) for k, t in enumerate(suite)]
    same_input = len({t.input_shape for t in suite}) == 1
    for lr in learners:
        lr.share_embedding = same_input
    algo = config.algorithm
    anchor = _average(learners) if algo != "local" else None
    shared_bytes = sum(v.numel() * v.element_size() for _, v in learners[0].named_shared()) if algo != "local" else 0
    total_bytes, first = 0, 0
    saved = folder.load_checkpoint("latest") if folder is not None else None
    if saved is not None:  # the same config (RunFolder refuses another): continue after its last checkpoint
        saved_tensors, meta = saved
        for k, lr in enumerate(learners):
            lr.load_state_tensors(saved_tensors, f"learner{k}")
        anchor = {n[7:]: v for n, v in saved_tensors.items() if n.startswith("anchor.")} if algo != "local" else None
        first, total_bytes = int(meta["next_step"]), int(meta["bytes_total"])
    start = time.perf_counter()
    batch_no = first * config.local_steps
    for step in track_steps(range(first, config.steps), progress, algo):
        for j in range(config.local_steps):
            phase = batch_no % config.round_steps
            which = "all"
            if algo == "fedrep":
                which = "personal" if phase < config.fedrep_head_steps else "shared"
            for lr in learners:
                lr.train_batch(lr.batch(step, j), anchor=anchor if algo == "fedprox" else None, which=which)
            batch_no += 1
            if algo != "local" and batch_no % config.round_steps == 0:
                anchor = _average(learners)
                total_bytes += 2 * shared_bytes * len(learners)
        done = step + 1
        if folder is not None and config.checkpoint_every and done % config.checkpoint_every == 0:
            state = {n: v for k, lr in enumerate(learners) for n, v in lr.state_tensors(f"learner{k}").items()}
            state.update({f"anchor.{n}": v for n, v in (anchor or {}).items()})
            folder.save_checkpoint("latest", state, {"next_step": done, "bytes_total": total_bytes})
    final = {f"{k}:{lr.task.name}": lr.evaluate() for k, lr in enumerate(learners)}
    result = RunResult(config=config, tasks=[t.name for t in suite], final=final,
                       curve=[{"step": config.steps, "metrics": final}],
                       bytes={"total": total_bytes, "by_category": {"train.weights": total_bytes},
                              "per_step_train": total_bytes / max(config.steps, 1)},
                       wall_s=time.perf_counter() - start, steps_done=config.steps)
    if folder is not None:
        tensors: dict[str, torch.Tensor] = {}
        for k, lr in enumerate(learners):
            tensors.update({f"client{k}.{n}": p.detach() for n, p in lr.client.state_dict().items()})
            tensors.update({f"general{k}.{n}": p.detach() for n, p in lr.general.state_dict().items()})
        write_run_folder(folder, result, tensors)
    return result


def describe() -> dict[str, Any]:
    """The baselines and what each shares (for reports)."""
    return {"local": "nothing", "fedavg": "general model + embedding", "fedprox": "as fedavg, proximal term",
            "fedper": "general model", "fedrep": "general model; alternating personal/shared training"}

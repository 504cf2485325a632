"""In-process, deterministic FedBone training: clients and server in one process, messages as direct calls.

``run_fedbone(config)`` is the entry point (it also dispatches the baselines). With ``run_dir`` it writes a run
folder (config.toml, metrics.json, report.md, checkpoints) and resumes from the last checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pluribus.errors import ConfigError, PluribusError
from pluribus.federated.core.config import FedBoneConfig
from pluribus.federated.core.protocol import MESSAGE_TYPES, ByteMeter, Fault, Payload
from pluribus.federated.core.runtime import (
    FedBoneClient,
    FedBoneServer,
    LoopTally,
    Owed,
    StepLog,
    evaluate_clients,
    load_server_checkpoint_tensors,
    server_checkpoint_tensors,
    train_exchange,
)
from pluribus.federated.core.split import check_common_inputs
from pluribus.federated.core.task import ClientTask
from pluribus.federated.studies.results import RunResult, track_steps, write_run_folder
from pluribus.federated.studies.tasks import build_config_suite

Tamper = Callable[[int, str, Payload], Payload]


class DirectTransport:
    """Messages as direct method calls, with deterministic fault injection and an optional reply tamper hook."""

    def __init__(
        self, clients: dict[int, FedBoneClient], *, fault_rate: float = 0.0, seed: int = 0, tamper: Tamper | None = None,
    ) -> None:
        self.clients, self.fault_rate, self.seed, self.tamper = clients, fault_rate, seed, tamper

    def call(self, message_type: str, requests: dict[int, Payload], step: int) -> dict[int, Payload | Fault]:
        """Deliver each request; a client 'fails' with probability fault_rate (training messages only)."""
        out: dict[int, Payload | Fault] = {}
        kind = MESSAGE_TYPES.index(message_type) if message_type in MESSAGE_TYPES else 99
        for client, payload in requests.items():
            if self.fault_rate > 0 and message_type.startswith("train"):
                draw = np.random.default_rng([self.seed, max(step, 0), client, kind, 7]).random()
                if draw < self.fault_rate:
                    out[client] = Fault("injected failure", kind="injected")
                    continue
            try:
                reply = self.clients[client].handle(message_type, payload)
            except PluribusError as err:
                out[client] = Fault(f"client error: {err}")
                continue
            out[client] = self.tamper(client, message_type, reply) if self.tamper else reply
        return out


class FedBoneSimulation:
    """Server plus clients in one process; ``step()`` runs one global step, ``evaluate()`` the test sets.

    Args:
        config: the FedBone settings.
        tasks: the clients' tasks (default: built from ``config``'s suite).
        tamper: a hook that alters messages in transit (tests of the protocol's checks).
        general_model: a server backbone replacing the built-in one.

    Raises:
        ConfigError: not one task per client, or inputs a common embedding cannot share.
    """

    def __init__(
        self, config: FedBoneConfig, tasks: list[ClientTask] | None = None, *, tamper: Tamper | None = None,
        general_model: torch.nn.Module | None = None,
    ) -> None:
        self.config = config
        self.tasks = tasks if tasks is not None else build_config_suite(config)
        if len(self.tasks) != config.num_clients:
            raise ConfigError(f"{len(self.tasks)} client tasks given for {config.num_clients} clients in config.tasks")
        check_common_inputs(self.tasks, config.model)
        self.clients = {k: FedBoneClient(t, config, k) for k, t in enumerate(self.tasks)}
        self.server = FedBoneServer(config, general_model)
        self.transport = DirectTransport(self.clients, fault_rate=config.fault_rate, seed=config.seed, tamper=tamper)
        self.pending: Owed = {}
        self.meter = ByteMeter()
        self.sizes = {k: t.num_train for k, t in enumerate(self.tasks)}
        self.next_step = 0

    def step(self) -> StepLog:
        """One exchange over all clients (one global step, or ``micro_batches_per_message`` of them); the last
        step's log."""
        return self.exchange()[-1]

    def exchange(self) -> list[StepLog]:
        """One round of messages: ``micro_batches_per_message`` global steps (fewer at the end of the run)."""
        count = max(1, min(self.config.micro_batches_per_message, self.config.steps - self.next_step))
        logs = train_exchange(self.server, self.transport, list(self.clients), self.next_step, self.pending,
                              self.meter, self.sizes, count=count)
        self.next_step += count
        return logs

    def evaluate(self, fault_log: list[dict[str, Any]] | None = None) -> dict[str, dict[str, float] | str]:
        """Test metrics per client, keyed '<index>:<task>' (faults also go to ``fault_log`` when given).

        Args:
            fault_log: a list the evaluation's faults are appended to, or None.
        """
        res = evaluate_clients(self.server, self.transport, list(self.clients), self.pending, self.meter,
                               self.next_step, fault_log)
        return {f"{k}:{self.tasks[k].name}": v for k, v in res.items()}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Server, clients and undelivered embedding gradients, namespaced."""
        out = server_checkpoint_tensors(self.server, self.pending)
        for c, client in self.clients.items():
            out.update({f"client{c}.{k}": v for k, v in client.state_tensors().items()})
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], next_step: int) -> None:
        """Restore ``state_tensors`` and continue at ``next_step``.

        Args:
            tensors: what ``state_tensors`` returned.
            next_step: the step to continue at.
        """
        self.pending = load_server_checkpoint_tensors(self.server, tensors)
        for c, client in self.clients.items():
            prefix = f"client{c}."
            client.load_state_tensors({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        self.next_step = next_step


def run_fedbone(
    config: FedBoneConfig,
    *,
    run_dir: str | Path | None = None,
    resume: bool = True,
    tasks: list[ClientTask] | None = None,
    tamper: Tamper | None = None,
    progress: bool = True,
    general_model: torch.nn.Module | None = None,
) -> RunResult:
    """Train FedBone (or, by ``config.algorithm``, a baseline) in-process; optionally in a resumable run folder.

    ``tasks`` replaces the suite's built-in data (required for ``suite="custom"``, see
    ``tasks.client_tasks_from_features``); ``general_model`` replaces the built-in transformer backbone (any
    module mapping [B, T, D] -> [B, T, D], D = ``config.model.dim``; FedBone only).

    Args:
        config: the settings (``config.algorithm``: FedBone or a baseline).
        run_dir: a resumable run folder, or None.
        resume: resume ``run_dir`` if it holds an unfinished run.
        tasks: the clients' tasks, or None for the suite's.
        tamper: a hook that alters messages in transit (tests).
        progress: show a progress bar.
        general_model: a server backbone replacing the built-in one.

    Raises:
        ConfigError: settings or tasks that do not fit together (e.g. ``suite="custom"`` without ``tasks``).
    """
    if config.algorithm != "fedbone":
        from pluribus.federated.studies.baselines import run_baseline

        return run_baseline(config, tasks=tasks, run_dir=run_dir, resume=resume, progress=progress)
    from pluribus.runs import RunFolder

    folder = RunFolder(run_dir, config, resume=resume) if run_dir is not None else None
    sim = FedBoneSimulation(config, tasks, tamper=tamper, general_model=general_model)
    tally = LoopTally()
    if folder is not None:
        ckpt = folder.load_checkpoint("latest")
        if ckpt is not None:
            tensors, meta = ckpt
            tally = LoopTally.from_checkpoint_meta(meta, sim.meter)
            sim.load_state_tensors(tensors, tally.next_step)
    start = time.perf_counter()
    steps = range(sim.next_step, config.steps, config.micro_batches_per_message)
    iterator = track_steps(steps, progress, "fedbone")
    for _ in iterator:
        logs = sim.exchange()
        for log in logs:
            tally.record(log)
        done = tally.next_step = sim.next_step
        if config.eval_every and done % config.eval_every == 0 and done < config.steps:
            tally.curve.append({"step": done, "metrics": sim.evaluate(tally.fault_log), "train_loss": mean_train_loss(log)})
        if folder is not None and config.checkpoint_every and done % config.checkpoint_every == 0:
            folder.save_checkpoint("latest", sim.state_tensors(), tally.checkpoint_meta(sim.meter))
    final_raw = sim.evaluate(tally.fault_log)
    tally.curve.append({"step": config.steps, "metrics": final_raw})
    final = {k: v for k, v in final_raw.items() if isinstance(v, dict)}
    result = RunResult(config=config, tasks=[t.name for t in sim.tasks], final=final, curve=tally.curve,
                       general_model=sim.server.model,
                       bytes={**sim.meter.as_dict(), "per_step_train": sim.meter.total("train") / max(config.steps, 1)},
                       faults=tally.faults, quarantined=tally.quarantined, fault_log=tally.fault_log,
                       mean_conflict_fraction=tally.mean_conflict_fraction, conflict=tally.conflict_summary(),
                       wall_s=time.perf_counter() - start, steps_done=sim.next_step)
    if folder is not None:
        write_run_folder(folder, result, sim.state_tensors())
    return result


def mean_train_loss(log: StepLog) -> float | None:
    """Mean training loss of the clients that took part in a step (None if none did)."""
    return float(np.mean(list(log.losses.values()))) if log.losses else None

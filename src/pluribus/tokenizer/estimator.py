"""``UserTokenizer``: the scikit-learn style estimator around the multi-view RQ-VAE."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pluribus.config import config_from_dict, config_to_dict
from pluribus.errors import ConfigError, DataError, ShapeError
from pluribus.io import load_tensors, read_json, save_tensors, write_json
from pluribus.tokenizer.config import EMPTY_CODE, EmbedConfig, TokenizerConfig
from pluribus.tokenizer.inputs import SourceEmbeddings, as_source_embeddings, stack_sources, user_id_hashes
from pluribus.tokenizer.rqkmeans import ResidualKMeans, fit_residual_kmeans
from pluribus.tokenizer.rqvae import MultiViewRQVAE
from pluribus.tokenizer.train import InMemoryData, TrainData, TrainState, train_rqvae
from pluribus.tokenizer.vocab import TokenVocabulary, collision_suffix, validate_codes

FORMAT = "pluribus-u2qt-tokenizer"
#: 2: the file holds the vocabulary (shared codes have one token id; base-10 suffix digits) and may hold the
#: training users; a version-1 file still loads, with the version-2 vocabulary (its token ids differ).
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
META_FILE = "tokenizer.json"
WEIGHTS_FILE = "tokenizer.safetensors"
TRAINING_USERS_FILE = "training_users.safetensors"
#: Users a stable refit needs before it holds out a tenth of them to choose between the old and new decoder.
STABLE_MIN_USERS = 50
#: Config fields that fix the tensors' shapes or meaning: a warm start must keep them.
_ARCHITECTURE_FIELDS = ("backend", "layout", "n_shared", "n_specific", "shared_size", "specific_size", "latent_dim",
                        "hidden_dims", "codebook_update", "standardize")


class UserTokenizer:
    """Multi-view user tokenizer: per-source embeddings in, uint16 codes ``[users, sources, levels]`` out.

    ``config.backend`` picks the quantiser: the multi-view RQ-VAE (``rqvae``) or residual k-means on the
    standardised inputs (``rq-kmeans``); everything below works the same for both.

    ``fit``/``encode``/``decode`` take ``SourceEmbeddings``, a mapping source -> ``[users, dim]`` array
    (with an optional ``present`` mask per source), or a ``UserDataset`` (embedded first by stage 1 with
    ``embed_config``, cached under ``cache_dir``). A source a user lacks gets ``EMPTY_CODE`` (65535) on
    every level and decodes to a masked-out row.

    Fitted on data with user ids (``SourceEmbeddings``, a ``UserDataset`` or a vector folder), it remembers
    64-bit hashes of its training users' ids (``trained_on``), so metrics can keep held-out users apart.

    Args:
        config: stage 2 settings; None: ``TokenizerConfig()``.
        embed_config: stage 1 settings used when ``fit``/``encode`` get a ``UserDataset``; None: ``EmbedConfig()``
            at the first such call.
        cache_dir: the stage 1 embedding cache for a ``UserDataset``; None: no cache.
        progress: show progress bars (stage 1 and training).
    """

    training_users_: np.ndarray | None  # sorted int64 hashes of the training users' ids, or None
    vectors_embedder_: str | None  # the embedder a ``fit --vectors`` folder declared

    def __init__(
        self,
        config: TokenizerConfig | None = None,
        *,
        embed_config: EmbedConfig | None = None,
        cache_dir: str | Path | None = None,
        progress: bool = True,
    ) -> None:
        self.config = config if config is not None else TokenizerConfig()
        self.embed_config = embed_config
        self.cache_dir = cache_dir
        self.progress = progress

    # ---- fitting ------------------------------------------------------------------------------
    def fit(
        self,
        data: Any,
        *,
        present: Mapping[str, Any] | None = None,
        warm_start: UserTokenizer | None = None,
        stable: bool = False,
        checkpoint: Callable[[TrainState], None] | None = None,
        resume: TrainState | None = None,
    ) -> UserTokenizer:
        """Train on the users in ``data``; returns self.

        ``warm_start``: a fitted tokenizer of the same shape (sources, input widths, layout, levels, codebook
        sizes, latent and hidden widths). Training starts from its weights, input scaling and codebooks instead
        of a k-means initialisation, so most users keep their codes (``metrics.code_churn`` measures how many).
        ``stable=True`` (needs ``warm_start``): keep the previous tokenizer's input scaling, encoder and codebooks
        frozen and train only the decoder on ``data``, so every input encodes exactly as before (a user whose
        inputs did not change keeps every code; a changed user gets the codes its new inputs fall on) while
        decoding learns from the new data. In memory, with at least ``STABLE_MIN_USERS`` users, a random tenth is
        held out and the decoder kept is the one (the old one or an epoch's) that reconstructs it best.
        ``data`` may also be a folder of Parquet stage-1 vectors (``pluribus.tokenizer.stream``), read in batches.
        ``checkpoint`` receives the training state after every epoch; ``resume`` continues from one.

        Args:
            data: the training users: ``SourceEmbeddings``, a mapping source -> ``[users, dim]`` array, a
                ``UserDataset`` (embedded by stage 1 first) or a folder of Parquet stage-1 vectors.
            present: with a mapping: per source, a bool ``[users]`` mask of the users that have it (default: all).
            warm_start: a fitted tokenizer of the same shape to start from (see above); None: a fresh fit.
            stable: with ``warm_start``: train only the decoder (see above).
            checkpoint: called with the training state after every epoch (e.g. to save it).
            resume: a training state from ``checkpoint`` to continue from (``rqvae`` only).

        Returns:
            This tokenizer, fitted.

        Raises:
            ConfigError: ``stable`` without ``warm_start``; ``resume`` with the ``rq-kmeans`` backend;
                ``warm_start`` with another architecture (layout, levels, codebook sizes, widths, backend, ...);
                stage 1 cannot run on a ``UserDataset`` as configured (see ``embed_dataset``).
            DataError: fewer than 2 users; a source no user has; input that is not accepted (NaN/inf in a present
                row, an unknown mask, a malformed vector folder, stage 1 failing on a ``UserDataset``);
                ``warm_start`` not fitted or fitted on other sources or another stage-1 embedder.
            ShapeError: an array that is not ``[users, dim]`` or a mask not ``[users]``; ``warm_start`` fitted on
                other input widths.
        """
        if stable and warm_start is None:
            raise ConfigError("fit(stable=True) refits a previous tokenizer: pass warm_start=<the fitted tokenizer>")
        if isinstance(data, str | Path) and Path(data).is_dir():
            return self._fit_parquet(Path(data), warm_start=warm_start, stable=stable, checkpoint=checkpoint,
                                     resume=resume)
        emb = self._as_embeddings(data, present)
        if emb.n_users < 2:
            raise DataError(f"cannot fit a tokenizer on {emb.n_users} user(s)", expected="at least 2 users")
        for name in emb.source_names:
            if not emb.present[name].any():
                raise DataError(f"no user has source {name!r}", field=name, expected="at least one present row")
        self.source_names_ = emb.source_names
        self.in_dims_ = [int(emb.embeddings[s].shape[1]) for s in self.source_names_]
        positional = isinstance(data, Mapping)  # a mapping of arrays has row numbers, not user ids
        self.training_users_ = None if positional else np.unique(user_id_hashes(emb.user_ids))
        self.vectors_embedder_ = None
        x, pres = stack_sources(emb, self.source_names_, self.in_dims_)
        validation = None
        if stable and emb.n_users >= STABLE_MIN_USERS:  # hold out a tenth to keep the better decoder (old or new)
            order = torch.randperm(emb.n_users, generator=torch.Generator().manual_seed(self.config.seed))
            held, kept = order[: emb.n_users // 10], order[emb.n_users // 10 :]
            validation, x, pres = (x[:, held], pres[:, held]), x[:, kept], pres[:, kept]
        return self._train(InMemoryData(x, pres), warm_start=warm_start, stable=stable, checkpoint=checkpoint,
                           resume=resume, validation=validation)

    def _fit_parquet(
        self, folder: Path, *, warm_start: UserTokenizer | None, stable: bool,
        checkpoint: Callable[[TrainState], None] | None, resume: TrainState | None,
    ) -> UserTokenizer:
        from pluribus.tokenizer.stream import ParquetTrainData, folder_embedder, vector_folder

        files, dims = vector_folder(folder)
        self.source_names_ = list(dims)
        self.in_dims_ = [dims[s] for s in self.source_names_]
        self.vectors_embedder_ = folder_embedder(files)
        data = ParquetTrainData(folder, self.source_names_, self.in_dims_, seed=self.config.seed)
        self.training_users_ = data.user_hashes
        return self._train(data, warm_start=warm_start, stable=stable, checkpoint=checkpoint, resume=resume)

    def _train(
        self, data: TrainData, *, warm_start: UserTokenizer | None, stable: bool,
        checkpoint: Callable[[TrainState], None] | None, resume: TrainState | None,
        validation: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> UserTokenizer:
        torch.manual_seed(self.config.seed)
        model = build_model(self.config, self.in_dims_)
        if warm_start is not None:
            model.load_state_dict(self._warm_start_state(warm_start))
        if isinstance(model, ResidualKMeans):
            if resume is not None:
                raise ConfigError("resume: the rq-kmeans backend fits in one pass and has no epochs to resume; fit again")
            # stable: the codebooks are the whole model (no decoder to retrain), so every input keeps its codes
            self.history_ = [] if stable else fit_residual_kmeans(model, data, warm_start=warm_start is not None,
                                                                  progress=self.progress)
            self._set_model(model)
            return self
        anchor = None if stable or warm_start is None else warm_start._fitted()
        self.history_ = train_rqvae(
            model, data=data, progress=self.progress, warm_start=warm_start is not None, anchor=anchor,
            decoder_only=stable, validation=validation, checkpoint=checkpoint, resume=resume,
        )
        self._set_model(model)
        return self

    def _warm_start_state(self, previous: UserTokenizer) -> dict[str, torch.Tensor]:
        """The previous tokenizer's weights, after checking it has this tokenizer's shape."""
        if not isinstance(previous, UserTokenizer):
            raise DataError(f"warm_start is a {type(previous).__name__}", expected="a fitted UserTokenizer")
        old_model = previous._fitted()
        if list(previous.source_names_) != list(self.source_names_):
            raise DataError(
                f"warm_start: the previous tokenizer was fitted on sources {list(previous.source_names_)}",
                expected=f"the data's sources {list(self.source_names_)} in the same order",
            )
        if list(previous.in_dims_) != list(self.in_dims_):
            raise ShapeError("warm_start: the previous tokenizer's input widths", previous.in_dims_, str(list(self.in_dims_)))
        before, now = previous.embedder(), self.embedder()
        if before is not None and now is not None and before != now:
            raise DataError(f"warm_start: the previous tokenizer was fitted on vectors of embedder {before!r}, these "
                            f"are from {now!r}", field="embedder", expected="vectors from the same stage-1 embedder")
        for name in _ARCHITECTURE_FIELDS:
            old, new = getattr(previous.config, name), getattr(self.config, name)
            if old != new:
                raise ConfigError(
                    f"warm_start: the previous tokenizer has {name}={old!r} but this config has {name}={new!r}; "
                    "a warm start needs the same architecture (only training settings such as epochs, lr or seed "
                    "may change)"
                )
        return {k: v.detach().clone() for k, v in old_model.state_dict().items()}

    def _set_model(self, model: MultiViewRQVAE) -> None:
        self.model_ = model.eval()
        self.level_sizes_ = tuple(spec.codes_per_source for spec in model.quantizer.levels)
        shared = tuple(sum(g.rows[1] - g.rows[0] for g in spec.groups if g.name == "shared")
                       for spec in model.quantizer.levels)
        self.vocabulary_ = TokenVocabulary(tuple(self.source_names_), self.level_sizes_, shared)
        self.fingerprint_ = _fingerprint(model, self.vocabulary_)

    def embedder(self) -> str | None:
        """The stage-1 embedder the inputs come from: a vector folder's declared one for a ``fit --vectors``
        tokenizer, else the one ``embed_config`` names; None when unknown (arrays fitted directly)."""
        declared = getattr(self, "vectors_embedder_", None)
        if declared is not None:
            return str(declared)
        if self.embed_config is not None:
            from pluribus.tokenizer.embed import embedder_name

            return embedder_name(self.embed_config)
        return None

    def trained_on(self, user_ids: Any) -> np.ndarray | None:
        """Per user id, whether it was one of the training users; None when they were not recorded.

        Args:
            user_ids: the user ids to look up (compared by their 64-bit hashes).

        Returns:
            A bool array, one per id; None when the tokenizer was fitted on arrays without user ids.

        Raises:
            DataError: the tokenizer is not fitted.
        """
        self._fitted()
        known = getattr(self, "training_users_", None)
        if known is None:
            return None
        return np.isin(user_id_hashes(user_ids), known)

    def fit_transform(self, data: Any, *, present: Mapping[str, Any] | None = None) -> np.ndarray:
        """``fit`` then ``encode`` the same data.

        Args:
            data: ``SourceEmbeddings``, a mapping source -> ``[users, dim]`` array, or a ``UserDataset`` (embedded
                by stage 1 first).
            present: with a mapping: per source, a bool ``[users]`` mask of the users that have it (default: all).

        Returns:
            uint16 codes ``[users, sources, levels]``.

        Raises:
            ConfigError: see ``fit``.
            DataError: see ``fit`` and ``encode``.
            ShapeError: see ``fit`` and ``encode``.
        """
        return self.fit(data, present=present).encode(data, present=present)

    # ---- encoding -----------------------------------------------------------------------------
    def encode(self, data: Any, *, present: Mapping[str, Any] | None = None, batch_size: int = 8192) -> np.ndarray:
        """uint16 codes ``[users, sources, levels]``; EMPTY_CODE on every level of a source a user lacks.

        For a folder of stage-1 vectors larger than memory use ``encode_parquet`` (codes written in batches).

        Args:
            data: ``SourceEmbeddings``, a mapping source -> ``[users, dim]`` array, or a ``UserDataset`` (embedded
                by stage 1 first).
            present: with a mapping: per source, a bool ``[users]`` mask of the users that have it (default: all).
            batch_size: users encoded at a time.

        Returns:
            uint16 codes ``[users, sources, levels]``.

        Raises:
            DataError: the tokenizer is not fitted; the input is not one of the accepted kinds, lacks a fitted
                source, has a mask for an unknown source or NaN/inf in a present row, or has no users (or stage 1
                fails on a ``UserDataset``: see ``embed_dataset``).
            ShapeError: an array that is not 2-D, or whose users or width differ from the fit.
            ConfigError: stage 1 cannot run on a ``UserDataset`` as configured (see ``embed_dataset``).
        """
        self._fitted()
        x, pres = self._stack(data, present)
        return self.encode_tensors(x, pres, batch_size=batch_size)

    def encode_parquet(self, folder: str | Path, out: str | Path, *, batch_rows: int | None = None,
                       part_rows: int | None = None) -> dict[str, Any]:
        """Encode a Parquet folder of stage-1 vectors into a codes folder, batch by batch, with bounded memory
        (``batch_rows`` users at a time, default ``stream.ENCODE_BATCH_ROWS``; part files of at least
        ``part_rows`` users, default ``stream.PART_ROWS``).

        Args:
            folder: the Parquet folder of stage-1 vectors (a ``user_id`` column and one vector column per source).
            out: the codes folder to write; it appears only when every batch is encoded.
            batch_rows: users read and encoded at a time.
            part_rows: the least users per part file.

        Returns:
            A summary: users, parts and seconds.

        Raises:
            DataError: the tokenizer is not fitted; ``part_rows`` below 1; a vector folder that is missing or
                malformed (no ``user_id``, a fitted source missing, another vector width or stage-1 embedder,
                NaN/inf in a present vector); an output folder that cannot be written.
        """
        from pluribus.tokenizer.stream import ENCODE_BATCH_ROWS, PART_ROWS, encode_parquet

        self._fitted()
        return encode_parquet(self, folder, out, batch_rows=ENCODE_BATCH_ROWS if batch_rows is None else batch_rows,
                              part_rows=PART_ROWS if part_rows is None else part_rows)

    def encode_tensors(self, x: torch.Tensor, pres: torch.Tensor, *, batch_size: int = 8192) -> np.ndarray:
        """Codes of stacked inputs ``x [S, U, D]`` with mask ``pres [S, U]`` (the fitted source order).

        Args:
            x: the inputs, float ``[sources, users, max width]``, zero padded (as ``inputs.stack_sources`` builds).
            pres: bool ``[sources, users]``: which users have each source.
            batch_size: users encoded at a time.

        Returns:
            uint16 codes ``[users, sources, levels]``; EMPTY_CODE on every level of a source a user lacks.

        Raises:
            DataError: the tokenizer is not fitted, or ``x`` has no users.
        """
        model = self._fitted()
        if x.shape[1] == 0:
            raise DataError("no users to encode", field="users", expected="at least one user")
        chunks = []
        # rq-kmeans fits every level by nearest code and encodes so too: a user's codes never depend on its batch
        sinkhorn = (self.config.sinkhorn_last_level and self.config.sinkhorn_at_encode
                    and not isinstance(model, ResidualKMeans))
        with torch.no_grad():
            for start in range(0, x.shape[1], batch_size):
                xb, pb = x[:, start : start + batch_size], pres[:, start : start + batch_size]
                z = model.encode_latent(xb)
                chunks.append(model.quantizer(z, pb, sinkhorn=sinkhorn).codes)
        codes = torch.cat(chunks, dim=1).permute(1, 0, 2).numpy().astype(np.uint16)
        codes[~pres.T.numpy()] = EMPTY_CODE
        return codes

    transform = encode

    def latents(self, data: Any, *, present: Mapping[str, Any] | None = None) -> np.ndarray:
        """Pre-quantisation latents ``[users, sources, latent_dim]`` (zeros where a source is missing).

        Args:
            data: ``SourceEmbeddings``, a mapping source -> ``[users, dim]`` array, or a ``UserDataset`` (embedded
                by stage 1 first).
            present: with a mapping: per source, a bool ``[users]`` mask of the users that have it (default: all).

        Returns:
            float32 latents ``[users, sources, latent_dim]``.

        Raises:
            DataError: the tokenizer is not fitted; the input is not one of the accepted kinds, lacks a fitted
                source, has a mask for an unknown source or NaN/inf in a present row (or stage 1 fails on a
                ``UserDataset``: see ``embed_dataset``).
            ShapeError: an array that is not 2-D, or whose users or width differ from the fit.
            ConfigError: stage 1 cannot run on a ``UserDataset`` as configured (see ``embed_dataset``).
        """
        model = self._fitted()
        x, pres = self._stack(data, present)
        with torch.no_grad():
            z = model.encode_latent(x) * pres[..., None]
        return z.permute(1, 0, 2).numpy()

    def code_vectors(self, codes: np.ndarray) -> np.ndarray:
        """Quantised latents (sum of code vectors) ``[users, sources, latent_dim]``; zeros for empty sources.

        Args:
            codes: uint16 codes ``[users, sources, levels]`` of this tokenizer.

        Returns:
            float32 ``[users, sources, latent_dim]``.

        Raises:
            ShapeError: ``codes`` is not ``[users, sources, levels]`` of this tokenizer.
            DataError: the tokenizer is not fitted; codes that are not integers or out of range, or a source empty
                on some levels only.
        """
        model = self._fitted()
        present, local = self._check_codes(codes)
        with torch.no_grad():
            zq = model.quantizer.lookup(local) * present[..., None]
        return zq.permute(1, 0, 2).numpy()

    def token_vectors(self) -> dict[str, np.ndarray]:
        """The code vector behind each code token (``<sh_l{l}_c{c}>`` or ``<s{s}_l{l}_c{c}>``; float32 ``[latent_dim]``).

        Meant for language-model integration: an LLM's embedding rows for the added tokens can start from these
        vectors (e.g. ``UserEncoder(..., extra_token_vectors=tok.token_vectors())``) instead of noise, so codes
        that lie close in the codebook start close in the model. Empty-source and suffix tokens have no vector.
        """
        model = self._fitted()
        quantizer = model.quantizer
        vocab = self.vocabulary_
        out: dict[str, np.ndarray] = {}
        with torch.no_grad():
            for lvl, size in enumerate(vocab.level_sizes):
                rows = quantizer.allowed(lvl)  # [S, K_l] local code -> table row
                table = quantizer.codebooks[lvl].detach().float().numpy()
                for s in range(len(vocab.source_names)):
                    for c in range(size):
                        out[vocab.token(s, lvl, c)] = table[int(rows[s, c])]
        return out

    def decode(self, codes: np.ndarray) -> SourceEmbeddings:
        """Reconstruct per-source embeddings from codes; rows of empty sources are zero and marked absent.

        Args:
            codes: uint16 codes ``[users, sources, levels]`` of this tokenizer.

        Returns:
            The reconstructed embeddings (user ids are the row numbers ``"0"``, ``"1"``, ...).

        Raises:
            ShapeError: ``codes`` is not ``[users, sources, levels]`` of this tokenizer.
            DataError: the tokenizer is not fitted; codes that are not integers or out of range, or a source empty
                on some levels only.
        """
        model = self._fitted()
        present, local = self._check_codes(codes)
        with torch.no_grad():
            recon = model.decode_codes(local) * present[..., None]
        ids = np.array([str(i) for i in range(codes.shape[0])], dtype=object)
        emb = {s: recon[i, :, : self.in_dims_[i]].numpy() for i, s in enumerate(self.source_names_)}
        return SourceEmbeddings(ids, emb, {s: present[i].numpy() for i, s in enumerate(self.source_names_)})

    inverse_transform = decode

    def suffix(self, codes: np.ndarray) -> np.ndarray:
        """Collision suffix per user (0 where the full tuple is unique so far); zeros when switched off.

        Args:
            codes: uint16 codes ``[users, sources, levels]``; the suffix counts earlier rows with the same codes.

        Returns:
            uint16 ``[users]``.

        Raises:
            ShapeError: ``codes`` is not ``[users, sources, levels]`` of this tokenizer.
            DataError: the tokenizer is not fitted; codes that are not integers or out of range, a source empty
                on some levels only, or more than 65536 users sharing one code tuple (see ``collision_suffix``).
        """
        self._fitted()  # an unfitted tokenizer: the "not fitted" DataError, not an AttributeError
        self._check_codes(codes)
        if not self.config.collision_suffix:
            return np.zeros(codes.shape[0], dtype=np.uint16)
        return collision_suffix(codes)

    def tokens(self, codes: np.ndarray) -> list[list[str]]:
        """Token strings per user, e.g. ``<s2_l3_c17>``, with the collision suffix when switched on.

        Args:
            codes: uint16 codes ``[users, sources, levels]`` of this tokenizer.

        Returns:
            One list of tokens per user (see ``TokenVocabulary``).

        Raises:
            ShapeError: ``codes`` is not ``[users, sources, levels]`` of this tokenizer.
            DataError: the tokenizer is not fitted; codes that are not integers or out of range, a source empty
                on some levels only, or more than 65536 users sharing one code tuple (with the collision suffix on).
        """
        suffix = self.suffix(codes)
        return self.vocabulary_.render(codes, suffix)

    def token_ids(self, codes: np.ndarray) -> list[list[int]]:
        """Vocabulary ids per user (offset them by a language model's base vocabulary size).

        Args:
            codes: uint16 codes ``[users, sources, levels]`` of this tokenizer.

        Returns:
            One list of token ids per user.

        Raises:
            ShapeError: ``codes`` is not ``[users, sources, levels]`` of this tokenizer.
            DataError: the tokenizer is not fitted; codes that are not integers or out of range, a source empty
                on some levels only, or more than 65536 users sharing one code tuple (with the collision suffix on).
        """
        suffix = self.suffix(codes)
        return self.vocabulary_.ids(codes, suffix)

    def codes_from_tokens(self, rows: Any) -> np.ndarray:
        """Codes ``[users, sources, levels]`` of token sequences (strings or ids) that ``tokens``/``token_ids`` wrote.

        Args:
            rows: one sequence per user, all of token strings or all of token ids.

        Returns:
            uint16 codes ``[users, sources, levels]`` (the collision suffixes are read and dropped).

        Raises:
            DataError: the tokenizer is not fitted, or a sequence it cannot have written (an unknown token, a code
                of another source or level, a source cut short, tokens after the suffix).
        """
        self._fitted()
        rows = list(rows)
        if rows and rows[0] and isinstance(rows[0][0], str):
            return self.vocabulary_.codes_from_tokens(rows)[0]
        return self.vocabulary_.codes_from_ids(rows)[0]

    # ---- persistence --------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` (format, version, config, sources, shapes) and ``tokenizer.safetensors``.

        Also ``training_users.safetensors`` (the hashes behind ``trained_on``) when the training users are known.

        Args:
            path: the folder to write (created if needed).

        Returns:
            The folder.

        Raises:
            DataError: the tokenizer is not fitted, or a file in the folder cannot be written.
            OSError: the folder cannot be created (a file in its place, no permission).
        """
        model = self._fitted()
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        state = dict(model.state_dict())
        meta: dict[str, Any] = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "config": config_to_dict(self.config),
            "embed_config": None if self.embed_config is None else config_to_dict(self.embed_config),
            "source_names": list(self.source_names_),
            "in_dims": list(self.in_dims_),
            "level_sizes": list(self.level_sizes_),
            "shapes": {k: list(v.shape) for k, v in state.items()},
            "final_loss": self.history_[-1] if getattr(self, "history_", None) else None,
            "vocabulary": self.vocabulary_.to_dict(),
            "fingerprint": self.fingerprint_,
            "vectors_embedder": getattr(self, "vectors_embedder_", None),
            "training_users": None,
        }
        save_tensors(folder / WEIGHTS_FILE, state)
        known = getattr(self, "training_users_", None)
        if known is not None:
            save_tensors(folder / TRAINING_USERS_FILE, {"hashes": torch.from_numpy(np.ascontiguousarray(known))})
            meta["training_users"] = int(len(known))
        else:
            (folder / TRAINING_USERS_FILE).unlink(missing_ok=True)
        write_json(folder / META_FILE, meta)
        return folder

    @classmethod
    def load(cls, path: str | Path, *, progress: bool = True) -> UserTokenizer:
        """Read a tokenizer written by ``save``; another format version or mismatched shapes raise clearly.

        Args:
            path: the folder ``save`` wrote.
            progress: the loaded tokenizer's ``progress`` setting.

        Returns:
            The fitted tokenizer.

        Raises:
            DataError: a missing or malformed file (``source_names``, ``in_dims`` or ``level_sizes`` missing among
                them); not a pluribus tokenizer or a format version this release cannot
                read; a missing tensor; a vocabulary or fingerprint that does not match the weights.
            ConfigError: the saved config (or stage 1 config) is not a valid ``TokenizerConfig`` (``EmbedConfig``).
            ShapeError: a tensor, the level sizes or the training-user hashes of another shape than the config
                gives.
        """
        folder = Path(path)
        meta_path = folder / META_FILE
        meta = read_json(meta_path)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise DataError("not a pluribus tokenizer", path=meta_path, field="format", expected=repr(FORMAT))
        if meta.get("version") not in READABLE_VERSIONS:
            raise DataError(
                f"tokenizer format version {meta.get('version')!r} cannot be read by this pluribus",
                path=meta_path, field="version", expected=str(FORMAT_VERSION),
            )
        # a file written before the rq-kmeans backend existed holds an RQ-VAE, whatever the default is now
        saved_config: Any = meta.get("config")
        if isinstance(saved_config, dict):
            saved_config = {"backend": "rqvae", **saved_config}
        config = config_from_dict(TokenizerConfig, saved_config, source=f"{meta_path}:config")
        embed = meta.get("embed_config")
        tok = cls(config, embed_config=None if embed is None else config_from_dict(EmbedConfig, embed), progress=progress)
        for key in ("source_names", "in_dims", "level_sizes"):
            if not isinstance(meta.get(key), list):
                raise DataError("a field is missing or not a list", path=meta_path, field=key, expected="a list")
        tok.source_names_ = [str(s) for s in meta["source_names"]]
        tok.in_dims_ = [int(d) for d in meta["in_dims"]]
        model = build_model(config, tok.in_dims_)
        expected = model.state_dict()
        tensors = load_tensors(folder / WEIGHTS_FILE)
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise DataError(f"missing tensor(s) {missing[:3]}", path=folder / WEIGHTS_FILE)
        for name, want in expected.items():
            got = tensors[name]
            declared = meta.get("shapes", {}).get(name)
            if tuple(got.shape) != tuple(want.shape) or (declared is not None and list(declared) != list(got.shape)):
                raise ShapeError(f"{folder / WEIGHTS_FILE}: tensor {name!r}", got.shape, f"{list(want.shape)} for its config")
        model.load_state_dict({k: tensors[k] for k in expected})
        tok.history_ = [meta["final_loss"]] if meta.get("final_loss") else []
        tok._set_model(model)
        if list(tok.level_sizes_) != [int(v) for v in meta["level_sizes"]]:
            raise ShapeError(f"{meta_path}: level_sizes", meta["level_sizes"], str(list(tok.level_sizes_)))
        if meta.get("vocabulary") is not None:
            saved = TokenVocabulary.from_dict(meta["vocabulary"], origin=f"{meta_path}:vocabulary")
            if saved != tok.vocabulary_:
                raise DataError("the saved vocabulary does not match the model's codebooks", path=meta_path,
                                field="vocabulary", expected=f"{len(tok.vocabulary_)} tokens as the config implies")
        if meta.get("fingerprint") not in (None, tok.fingerprint_):
            raise DataError("the weights are not the ones this file was saved with (fingerprint differs)",
                            path=folder / WEIGHTS_FILE, field="fingerprint", expected=str(meta["fingerprint"]))
        tok.vectors_embedder_ = meta.get("vectors_embedder")
        tok.training_users_ = None
        if meta.get("training_users") is not None:
            hashes = load_tensors(folder / TRAINING_USERS_FILE)["hashes"].numpy()
            if len(hashes) != int(meta["training_users"]):
                raise ShapeError(f"{folder / TRAINING_USERS_FILE}: hashes", hashes.shape, f"[{meta['training_users']}]")
            tok.training_users_ = hashes
        return tok

    # ---- helpers ------------------------------------------------------------------------------
    def _fitted(self) -> MultiViewRQVAE:
        model = getattr(self, "model_", None)
        if model is None:
            raise DataError("this UserTokenizer is not fitted yet; call fit() or UserTokenizer.load()")
        return model

    def _as_embeddings(self, data: Any, present: Mapping[str, Any] | None) -> SourceEmbeddings:
        from pluribus.data.schema import UserDataset

        if isinstance(data, UserDataset):
            from pluribus.tokenizer.embed import embed_dataset

            cfg = self.embed_config if self.embed_config is not None else EmbedConfig()
            self.embed_config = cfg
            return embed_dataset(data, cfg, cache_dir=self.cache_dir, progress=self.progress)
        return as_source_embeddings(data, present=present)

    def _stack(self, data: Any, present: Mapping[str, Any] | None) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self._as_embeddings(data, present)
        return stack_sources(emb, self.source_names_, self.in_dims_)

    def _check_codes(self, codes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        codes = np.asarray(codes)
        expected = (len(self.source_names_), len(self.level_sizes_))
        if codes.ndim != 3 or codes.shape[1:] != expected:
            raise ShapeError("codes", codes.shape, f"[users, {expected[0]}, {expected[1]}]")
        present = validate_codes(codes, self.level_sizes_, self.source_names_)
        local = np.where(present[..., None], codes.astype(np.int64), 0)
        return torch.from_numpy(present.T.copy()), torch.from_numpy(local.transpose(1, 0, 2).copy())


def build_model(config: TokenizerConfig, in_dims: list[int]) -> MultiViewRQVAE:
    """The untrained model of ``config.backend`` for inputs of ``in_dims``."""
    if config.backend == "rq-kmeans":
        return ResidualKMeans(config, in_dims)
    return MultiViewRQVAE(config, in_dims)


def _fingerprint(model: MultiViewRQVAE, vocabulary: TokenVocabulary) -> str:
    """A short hash of the weights and the vocabulary: codes written with one tokenizer name it, so decoding
    them with another is refused."""
    import hashlib
    import json

    h = hashlib.sha256(json.dumps(vocabulary.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]

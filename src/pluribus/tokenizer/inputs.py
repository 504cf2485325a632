"""The tokenizer's input: one embedding matrix per source, with a mask of the users that have the source."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pluribus.errors import DataError, ShapeError


@dataclass
class SourceEmbeddings:
    """Per-source user embeddings: ``embeddings[src]`` is float32 ``[U, D_src]``, ``present[src]`` bool ``[U]``.

    Rows of users who lack a source are ignored (conventionally zero) and get the empty code.

    Attributes:
        user_ids: the users' ids, one per row (object array ``[U]``).
        embeddings: per source, float32 ``[U, D_src]``, in source order.
        present: per source, bool ``[U]``: which users have it.
    """

    user_ids: np.ndarray
    embeddings: dict[str, np.ndarray]
    present: dict[str, np.ndarray]

    @property
    def source_names(self) -> list[str]:
        """Sources in order."""
        return list(self.embeddings)

    @property
    def n_users(self) -> int:
        """Number of users."""
        return len(self.user_ids)

    def subset(self, index: np.ndarray | Sequence[int]) -> SourceEmbeddings:
        """Rows ``index`` of every source.

        Args:
            index: row numbers (or a bool mask ``[U]``), as numpy indexing takes them.

        Returns:
            The selected users, in ``index``'s order.
        """
        idx = np.asarray(index)
        return SourceEmbeddings(
            self.user_ids[idx],
            {k: v[idx] for k, v in self.embeddings.items()},
            {k: v[idx] for k, v in self.present.items()},
        )

    def concatenated(self, name: str = "all") -> SourceEmbeddings:
        """One source that concatenates every source (missing sources as zeros): the single-view baseline.

        Args:
            name: the name of the one source.

        Returns:
            The same users with one source; a user has it when it has any of the sources.
        """
        stacked = np.concatenate([self.embeddings[s] * self.present[s][:, None] for s in self.source_names], axis=1)
        any_present = np.any(np.stack([self.present[s] for s in self.source_names]), axis=0)
        return SourceEmbeddings(self.user_ids, {name: stacked.astype(np.float32)}, {name: any_present})


def as_source_embeddings(
    data: Any, *, present: Mapping[str, Any] | None = None, origin: str = "embeddings"
) -> SourceEmbeddings:
    """Accept SourceEmbeddings or a mapping source -> array ``[U, D]``; check shapes and finiteness."""
    if isinstance(data, SourceEmbeddings):
        emb, pres, ids = data.embeddings, data.present, data.user_ids
    elif isinstance(data, Mapping):
        if not data:
            raise DataError("no sources given", path=origin, expected="a mapping source -> [users, dim] array")
        emb = {str(k): _as_array(v, f"{origin}[{k!r}]") for k, v in data.items()}
        n = next(iter(emb.values())).shape[0] if emb else 0
        pres = {k: np.ones(n, dtype=bool) for k in emb}
        if present is not None:
            for k, v in present.items():
                if k not in emb:
                    raise DataError(f"mask for unknown source {k!r}", path=origin, expected=f"one of {list(emb)}")
                pres[k] = np.asarray(v, dtype=bool)
        ids = np.array([str(i) for i in range(n)], dtype=object)
    else:
        raise DataError(
            f"cannot tokenise a {type(data).__name__}", path=origin,
            expected="SourceEmbeddings, a mapping source -> [users, dim] array, or a UserDataset",
        )
    n_users = len(ids)
    clean_emb: dict[str, np.ndarray] = {}
    clean_pres: dict[str, np.ndarray] = {}
    for name, x in emb.items():
        x = _as_array(x, f"{origin}[{name!r}]")
        if x.ndim != 2 or x.shape[0] != n_users:
            raise ShapeError(f"{origin}[{name!r}]", x.shape, f"[{n_users}, dim]")
        mask = np.asarray(pres.get(name, np.ones(n_users, dtype=bool)), dtype=bool)
        if mask.shape != (n_users,):
            raise ShapeError(f"{origin} present mask of {name!r}", mask.shape, f"[{n_users}]")
        finite = np.isfinite(x).all(axis=1)
        bad = np.flatnonzero(mask & ~finite)
        if len(bad):
            row = int(bad[0])
            raise DataError(
                f"{len(bad)} user(s) have NaN or inf in their embedding, first at user {ids[row]!r}",
                path=origin, row=row, field=name,
                expected="finite values (mark a missing source with the present mask instead)",
            )
        clean_emb[name] = np.where(mask[:, None], x, 0.0).astype(np.float32)
        clean_pres[name] = mask
    return SourceEmbeddings(np.asarray(ids, dtype=object), clean_emb, clean_pres)


def stack_sources(data: SourceEmbeddings, source_names: Sequence[str], in_dims: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Tensors ``x [S, U, max D]`` (zero padded) and ``present [S, U]`` in the fitted source order."""
    missing = [s for s in source_names if s not in data.embeddings]
    if missing:
        raise DataError(
            f"source(s) {missing} missing from the input", field=missing[0],
            expected=f"sources {list(source_names)} (pass absent users via the present mask)",
        )
    width = max(in_dims)
    x = torch.zeros(len(source_names), data.n_users, width)
    present = torch.zeros(len(source_names), data.n_users, dtype=torch.bool)
    for s, (name, dim) in enumerate(zip(source_names, in_dims, strict=True)):
        arr = data.embeddings[name]
        if arr.shape[1] != dim:
            raise ShapeError(f"embeddings of source {name!r}", arr.shape, f"[{data.n_users}, {dim}] as fitted")
        x[s, :, :dim] = torch.from_numpy(np.ascontiguousarray(arr))
        present[s] = torch.from_numpy(data.present[name])
    return x, present


def user_id_hashes(user_ids: Any) -> np.ndarray:
    """64-bit hashes (blake2b) of user ids, as int64: how a tokenizer remembers its training users."""
    import hashlib

    digests = b"".join(hashlib.blake2b(str(u).encode("utf-8"), digest_size=8).digest() for u in user_ids)
    return np.frombuffer(digests, dtype="<i8").astype(np.int64)


def _as_array(value: Any, what: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise DataError(f"{what} is not numeric", expected="a float array [users, dim]") from None
    if arr.ndim != 2:
        raise ShapeError(what, arr.shape, "[users, dim]")
    return arr

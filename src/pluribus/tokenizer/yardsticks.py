"""Yardsticks at equal bytes per user: the simple compressors a user tokenizer must beat at its own size.

A tokenizer's codes cost ``bytes_per_user`` bytes (U2QT: 2 per uint16 code). The honest comparison spends the same
bytes on something trivial, fitted on the same training users:

- ``PCAInt8``: per source, the top principal components of the training users, one int8 coefficient each (per
  component, the training users' largest magnitude maps to 127): one byte per coefficient.
- ``ProductQuantiser``: FAISS product quantisation per source, ``m`` sub-vectors of 8-bit codes: one byte each
  (needs the ``faiss-cpu`` package, a development dependency).

The budget is split over the sources as evenly as it goes (the first sources take the remainder; a source narrower
than its share gives the excess to the others), so the bytes per user are exactly the budget; a budget no split can meet is a ``ConfigError`` in one line. ``features`` gives the
vectors a probe reads (the dequantised coefficients, or the decoded vectors), ``decode`` the reconstruction.
The benchmarks (``benchmarks/tokenizer/quality.py``, ``factors.py``) and the demo's tokenize step use these.
"""

from __future__ import annotations

from typing import Any, Self

import numpy as np

from pluribus.errors import ConfigError, DataError, ShapeError
from pluribus.tokenizer.inputs import SourceEmbeddings, as_source_embeddings

#: PQ's 8-bit codes: 256 centroids per sub-vector, which FAISS needs at least as many training rows for.
PQ_BITS = 8


def split_budget(bytes_per_user: int, limits: list[int]) -> list[int]:
    """``bytes_per_user`` split over sources as evenly as it goes (the first sources take the remainder), no source
    past its limit (a capped source's excess goes evenly to the others). Sums to less than the budget only when the
    budget exceeds the limits' sum."""
    shares = [0] * len(limits)
    left, open_ = int(bytes_per_user), list(range(len(limits)))
    while open_:
        base, extra = divmod(left, len(open_))
        even = {s: base + (1 if i < extra else 0) for i, s in enumerate(open_)}
        capped = [s for s in open_ if limits[s] < even[s]]
        if not capped:
            for s in open_:
                shares[s] = even[s]
            break
        for s in capped:
            shares[s] = limits[s]
            left -= limits[s]
        open_ = [s for s in open_ if s not in capped]
    return shares


def reconstruction_stats(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Mean cosine and MSE relative to the per-dimension variance of reconstructions ``y`` of ``x`` (as
    ``pluribus.tokenizer.metrics.reconstruction`` reports them for a tokenizer)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1) + 1e-12)
    mse = float(((x - y) ** 2).mean())
    var = float(x.var(0).mean()) if len(x) > 1 else float("nan")
    return {"mse": mse, "cosine": float(cos.mean()), "relative_mse": mse / var if var > 0 else float("nan")}


class _Yardstick:
    """Shared shape of the yardsticks: a budget split over sources, one byte per unit, per-source fit/encode/decode."""

    name = "yardstick"
    #: the dtype ``encode`` writes: codes of another kind (another yardstick's) are refused, not misread
    code_dtype: type[np.integer]
    bytes_per_user: int
    source_names_: list[str]
    in_dims_: list[int]
    per_source_: list[int]

    def __init__(self, bytes_per_user: int) -> None:
        self.bytes_per_user = bytes_per_user

    def _max_per_source(self, dim: int, n_train: int) -> int:
        raise NotImplementedError

    def _check_split(self, dim: int, share: int) -> bool:
        return True

    def _plan(self, emb: SourceEmbeddings) -> None:
        """Split the budget over the sources, or refuse it in one line."""
        if isinstance(self.bytes_per_user, bool) or not isinstance(self.bytes_per_user, int | np.integer):
            raise ConfigError(f"bytes_per_user={self.bytes_per_user!r}: must be a whole number of bytes")
        names = emb.source_names
        for s in names:  # else its limit is 0 and the budget's refusal would name a range the budget lies in
            if not emb.present[s].any():
                raise DataError(f"{self.name}: no training user has source {s!r}", field=s,
                                expected="at least one training user with each source")
        dims = [int(emb.embeddings[s].shape[1]) for s in names]
        limits = [self._max_per_source(d, int(emb.present[s].sum())) for s, d in zip(names, dims, strict=True)]
        shares = split_budget(int(self.bytes_per_user), limits) if self.bytes_per_user > 0 else [0] * len(names)
        bad = [s for s, share, limit, d in zip(names, shares, limits, dims, strict=True)
               if not 1 <= share <= limit or not self._check_split(d, share)]
        if bad or sum(shares) != self.bytes_per_user:
            raise ConfigError(
                f"bytes_per_user={self.bytes_per_user}: {self.name} cannot spend it over sources "
                f"{dict(zip(names, dims, strict=True))} (name: width); {self._rule()} per source, so the budget must lie "
                f"within [{len(names)}, {sum(limits)}]" + (f" ({self._extra_rule()})" if self._extra_rule() else "")
            )
        self.source_names_, self.in_dims_, self.per_source_ = names, dims, shares

    def _rule(self) -> str:
        raise NotImplementedError

    def _extra_rule(self) -> str:
        return ""

    def fit(self, data: Any) -> Self:
        """Fit on the users of ``data`` (SourceEmbeddings or source -> array); returns self."""
        emb = as_source_embeddings(data)
        self._plan(emb)
        self._fit_sources(emb)
        return self

    def _fit_sources(self, emb: SourceEmbeddings) -> None:
        raise NotImplementedError

    def encode(self, data: Any) -> np.ndarray:
        """One-byte codes ``[users, bytes_per_user]``, sources in order."""
        raise NotImplementedError

    def features(self, codes: np.ndarray) -> np.ndarray:
        """What a probe reads from ``codes`` (float64 ``[users, features]``)."""
        raise NotImplementedError

    def _fitted(self) -> None:
        if not hasattr(self, "per_source_"):
            raise DataError(f"this {type(self).__name__} is not fitted yet; call fit()")

    def _sources(self, data: Any) -> SourceEmbeddings:
        self._fitted()
        emb = as_source_embeddings(data)
        if emb.source_names != self.source_names_:
            raise DataError(f"sources {emb.source_names}", expected=f"the fitted sources {self.source_names_}")
        for s, d in zip(self.source_names_, self.in_dims_, strict=True):
            if emb.embeddings[s].shape[1] != d:
                raise ShapeError(f"source {s!r}", emb.embeddings[s].shape, f"[users, {d}]")
        return emb

    def _check_codes(self, codes: np.ndarray) -> np.ndarray:
        self._fitted()
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != self.bytes_per_user or codes.dtype != self.code_dtype:
            raise ShapeError(f"codes ({codes.dtype})", codes.shape,
                             f"[users, {self.bytes_per_user}] of {np.dtype(self.code_dtype).name} codes ({self.name})")
        return codes

    def _blocks(self, codes: np.ndarray) -> list[np.ndarray]:
        edges = np.cumsum([0, *self.per_source_])
        return [codes[:, edges[i]:edges[i + 1]] for i in range(len(self.per_source_))]

    def decode(self, codes: np.ndarray) -> SourceEmbeddings:
        """Reconstructed per-source vectors of ``codes`` (every user marked present)."""
        codes = self._check_codes(codes)
        ids = np.array([str(i) for i in range(codes.shape[0])], dtype=object)
        emb = {s: self._decode_source(i, block).astype(np.float32)
               for i, (s, block) in enumerate(zip(self.source_names_, self._blocks(codes), strict=True))}
        return SourceEmbeddings(ids, emb, {s: np.ones(codes.shape[0], bool) for s in self.source_names_})

    def _decode_source(self, index: int, block: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class PCAInt8(_Yardstick):
    """Per source, PCA with int8 coefficients (one byte each) at ``bytes_per_user`` bytes per user.

    ``fit`` centres each source on its present training rows and keeps the top components (SVD); each
    component's scale maps the training users' largest coefficient magnitude to 127. ``encode`` gives int8
    ``[users, bytes_per_user]`` (a source a user lacks: zeros, i.e. the mean), ``features`` the dequantised
    coefficients, ``decode`` the reconstruction.
    """

    name = "PCA + int8"
    code_dtype = np.int8
    mean_: list[np.ndarray]
    components_: list[np.ndarray]
    scale_: list[np.ndarray]

    def _max_per_source(self, dim: int, n_train: int) -> int:
        return min(dim, n_train)

    def _rule(self) -> str:
        return "one int8 coefficient per component, at least 1 and at most min(width, training users)"

    def _fit_sources(self, emb: SourceEmbeddings) -> None:
        self.mean_, self.components_, self.scale_ = [], [], []
        for s, k in zip(self.source_names_, self.per_source_, strict=True):
            x = emb.embeddings[s][emb.present[s]].astype(np.float64)
            mean = x.mean(0)
            _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
            components = vt[:k]
            coef = (x - mean) @ components.T
            peak = np.abs(coef).max(0) / 127.0
            self.mean_.append(mean)
            self.components_.append(components)
            self.scale_.append(np.where(peak > 0, peak, 1.0))

    def encode(self, data: Any) -> np.ndarray:
        """int8 coefficients ``[users, bytes_per_user]``, sources in order."""
        emb = self._sources(data)
        blocks = []
        for i, s in enumerate(self.source_names_):
            coef = (emb.embeddings[s].astype(np.float64) - self.mean_[i]) @ self.components_[i].T
            q = np.clip(np.rint(coef / self.scale_[i]), -127, 127)
            q[~emb.present[s]] = 0
            blocks.append(q.astype(np.int8))
        return np.concatenate(blocks, axis=1)

    def features(self, codes: np.ndarray) -> np.ndarray:
        """Dequantised coefficients (float64 ``[users, bytes_per_user]``): what a probe reads."""
        blocks = self._blocks(self._check_codes(codes))
        return np.concatenate([b.astype(np.float64) * self.scale_[i] for i, b in enumerate(blocks)], axis=1)

    def _decode_source(self, index: int, block: np.ndarray) -> np.ndarray:
        coef = block.astype(np.float64) * self.scale_[index]
        return coef @ self.components_[index] + self.mean_[index]


class ProductQuantiser(_Yardstick):
    """Per source, FAISS product quantisation: ``m`` sub-vectors of 8-bit codes (one byte each) at
    ``bytes_per_user`` bytes per user; a source's ``m`` must divide its width. ``encode`` gives uint8
    ``[users, bytes_per_user]``; ``features`` and ``decode`` the decoded vectors."""

    name = "product quantisation"
    code_dtype = np.uint8
    quantisers_: list[Any]

    def _max_per_source(self, dim: int, n_train: int) -> int:
        return dim

    def _check_split(self, dim: int, share: int) -> bool:
        return dim % share == 0

    def _rule(self) -> str:
        return "one byte per sub-vector, at least 1 and at most the width"

    def _extra_rule(self) -> str:
        return "and each source's share of it must divide its width"

    def _fit_sources(self, emb: SourceEmbeddings) -> None:
        faiss = _faiss()
        self.quantisers_ = []
        for s, m in zip(self.source_names_, self.per_source_, strict=True):
            x = np.ascontiguousarray(emb.embeddings[s][emb.present[s]], dtype=np.float32)
            if len(x) < 1 << PQ_BITS:
                raise DataError(f"product quantisation of source {s!r} needs at least {1 << PQ_BITS} training users "
                                f"(8-bit codes), got {len(x)}", field=s)
            pq = faiss.ProductQuantizer(x.shape[1], m, PQ_BITS)
            pq.cp.min_points_per_centroid = 1  # FAISS warns below 39 rows per centroid; few users is the data here
            pq.train(x)
            self.quantisers_.append(pq)

    def encode(self, data: Any) -> np.ndarray:
        """uint8 codes ``[users, bytes_per_user]``, sources in order."""
        emb = self._sources(data)
        return np.concatenate([pq.compute_codes(np.ascontiguousarray(emb.embeddings[s], dtype=np.float32))
                               for s, pq in zip(self.source_names_, self.quantisers_, strict=True)], axis=1)

    def features(self, codes: np.ndarray) -> np.ndarray:
        """Decoded vectors, concatenated (float64): what a probe reads."""
        decoded = self.decode(codes)
        return np.concatenate([decoded.embeddings[s].astype(np.float64) for s in self.source_names_], axis=1)

    def _decode_source(self, index: int, block: np.ndarray) -> np.ndarray:
        return self.quantisers_[index].decode(np.ascontiguousarray(block, dtype=np.uint8)).astype(np.float64)


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise ConfigError("product quantisation needs the 'faiss-cpu' package (pip install faiss-cpu)") from None
    return faiss

"""Token strings and vocabulary ids for U2QT codes, and the collision suffix.

A code ``c`` of level ``l`` of source ``s`` renders as ``<s{s}_l{l}_c{c}>``; a source the user lacks
renders as one ``<s{s}_empty>`` token; the collision suffix ``k`` (``k > 0`` only for the second and
later users sharing a full code tuple) renders as ``<dup{k}>``. Token ids are contiguous from 0 so a
language model can add them as new vocabulary rows (offset them by the base vocabulary size).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pluribus.errors import DataError, ShapeError
from pluribus.tokenizer.config import EMPTY_CODE


def collision_suffix(codes: np.ndarray) -> np.ndarray:
    """Per user, how many earlier users (in row order) share its full code tuple: uint16 ``[U]``, 0 if unique."""
    flat = np.ascontiguousarray(codes.reshape(codes.shape[0], -1))
    _, inverse = np.unique(flat, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    sorted_groups = inverse[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_groups)) + 1]
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    suffix = np.empty(len(order), dtype=np.int64)
    suffix[order] = np.arange(len(order)) - group_start
    if len(suffix) and suffix.max() > np.iinfo(np.uint16).max:
        raise DataError(f"{int(suffix.max())} users share one code tuple; the suffix does not fit uint16")
    return suffix.astype(np.uint16)


@dataclass(frozen=True)
class TokenVocabulary:
    """The token strings of a fitted tokenizer: per source and level, its codes; plus empty and suffix tokens."""

    source_names: tuple[str, ...]
    level_sizes: tuple[int, ...]  # codes per source at each level
    max_suffix: int = 8

    @property
    def n_levels(self) -> int:
        """Levels per source."""
        return len(self.level_sizes)

    def token(self, source: int, level: int, code: int) -> str:
        """The string of one code."""
        return f"<s{source}_l{level}_c{code}>"

    def tokens(self) -> list[str]:
        """Every token, in id order."""
        out: list[str] = []
        for s in range(len(self.source_names)):
            for lvl, size in enumerate(self.level_sizes):
                out.extend(self.token(s, lvl, c) for c in range(size))
            out.append(f"<s{s}_empty>")
        out.extend(f"<dup{k}>" for k in range(1, self.max_suffix + 1))
        return out

    def __len__(self) -> int:
        return len(self.source_names) * (sum(self.level_sizes) + 1) + self.max_suffix

    def _source_base(self, s: int) -> int:
        return s * (sum(self.level_sizes) + 1)

    def ids(self, codes: np.ndarray, suffix: np.ndarray | None = None) -> list[list[int]]:
        """Token ids per user, for codes ``[U, S, L]`` (an empty source gives one id) and an optional suffix."""
        self.check(codes)
        offsets = np.r_[0, np.cumsum(self.level_sizes)[:-1]]
        users: list[list[int]] = []
        for u in range(codes.shape[0]):
            row: list[int] = []
            for s in range(codes.shape[1]):
                base = self._source_base(s)
                if codes[u, s, 0] == EMPTY_CODE:
                    row.append(base + sum(self.level_sizes))
                else:
                    row.extend(int(base + o + c) for o, c in zip(offsets, codes[u, s], strict=True))
            if suffix is not None and suffix[u] > 0:
                k = min(int(suffix[u]), self.max_suffix)
                row.append(len(self.source_names) * (sum(self.level_sizes) + 1) + k - 1)
            users.append(row)
        return users

    def render(self, codes: np.ndarray, suffix: np.ndarray | None = None) -> list[list[str]]:
        """Token strings per user (see ``ids``)."""
        table = self.tokens()
        return [[table[i] for i in row] for row in self.ids(codes, suffix)]

    def check(self, codes: np.ndarray) -> None:
        """Raise unless ``codes [U, S, L]`` fit this vocabulary (codes in range; empty sources empty at every level)."""
        if codes.ndim != 3 or codes.shape[1:] != (len(self.source_names), self.n_levels):
            raise ShapeError("codes", codes.shape, f"[users, {len(self.source_names)}, {self.n_levels}]")
        validate_codes(codes, self.level_sizes, self.source_names)


def validate_codes(codes: np.ndarray, level_sizes: Sequence[int], source_names: Sequence[str]) -> np.ndarray:
    """Check codes ``[U, S, L]``: each level within its size or EMPTY_CODE on every level; returns the present mask."""
    if not np.issubdtype(codes.dtype, np.integer):
        raise DataError(f"codes have dtype {codes.dtype}", field="codes", expected="integers (uint16)")
    sizes = np.asarray(level_sizes)[None, None, :]
    empty = codes == EMPTY_CODE
    bad = ~empty & ((codes < 0) | (codes >= sizes))
    if bad.any():
        u, s, lvl = (int(i) for i in np.argwhere(bad)[0])
        raise DataError(
            f"code {int(codes[u, s, lvl])} out of range at user row {u}, source {source_names[s]!r}, level {lvl}",
            row=u, field="codes", expected=f"0..{int(level_sizes[lvl]) - 1} or {EMPTY_CODE} (empty source)",
        )
    partial = empty.any(-1) & ~empty.all(-1)
    if partial.any():
        u, s = (int(i) for i in np.argwhere(partial)[0])
        raise DataError(
            f"source {source_names[s]!r} of user row {u} is empty on some levels only", row=u, field="codes",
            expected=f"{EMPTY_CODE} on every level of an empty source, or on none",
        )
    return ~empty.all(-1)

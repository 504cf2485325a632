"""Token strings and vocabulary ids for U2QT codes, the collision suffix, and the way back from tokens to codes.

A code ``c`` that every source shares at level ``l`` (a shared codebook's code: the ``stacked`` layout's shared
levels, the first ``shared_size`` codes of a ``union`` level) renders as ``<sh_l{l}_c{c}>`` whichever source
chose it, so it has one token id; a source's own code renders as ``<s{s}_l{l}_c{c}>``. A source the user lacks
renders as one ``<s{s}_empty>`` token. A user's sequence is its sources in order (``levels`` tokens each, or
the empty token), then the collision suffix ``k`` (``k > 0`` only for the second and later users sharing a
full code tuple) written in base ``suffix_base`` with the digit tokens ``<dup0>`` .. ``<dup{base-1}>``, most
significant digit first (``<dup3>`` for 3, ``<dup1><dup2>`` for 12 in base 10): every suffix has its own
sequence, with a fixed reserve of ``suffix_base`` tokens. The position of a token in the sequence tells which
source it belongs to, so ``codes_from_ids`` reads sequences back into codes and suffixes.

Token ids are contiguous from 0 so a language model can add them as new vocabulary rows (offset them by the
base vocabulary size): the shared codes level by level, then each source's own codes level by level and its
empty token, then the suffix digits.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pluribus.errors import DataError, ShapeError
from pluribus.tokenizer.config import EMPTY_CODE

VOCABULARY_FORMAT = "pluribus-u2qt-vocabulary"
VOCABULARY_VERSION = 2
#: Largest suffix: the suffix is stored as uint16 beside the codes.
MAX_SUFFIX = int(np.iinfo(np.uint16).max)


def collision_suffix(codes: np.ndarray) -> np.ndarray:
    """Per user, how many earlier users (in row order) share its full code tuple: uint16 ``[U]``, 0 if unique.

    More than ``MAX_SUFFIX`` (65535) earlier users with one tuple cannot be stored: a ``DataError`` says so.

    Args:
        codes: codes ``[U, S, L]`` (or any array with one row per user); rows are compared whole.

    Returns:
        uint16 ``[U]``: 0 for the first user of each code tuple, 1 for the second, and so on.

    Raises:
        DataError: more than 65536 users share one code tuple.
    """
    flat = np.ascontiguousarray(codes.reshape(codes.shape[0], -1))
    _, inverse = np.unique(flat, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    sorted_groups = inverse[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_groups)) + 1]
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    suffix = np.empty(len(order), dtype=np.int64)
    suffix[order] = np.arange(len(order)) - group_start
    if len(suffix) and suffix.max() > MAX_SUFFIX:
        raise DataError(f"{int(suffix.max()) + 1} users share one code tuple", field="suffix",
                        expected=f"at most {MAX_SUFFIX + 1} users per tuple (uint16 suffix); use more levels or codes")
    return suffix.astype(np.uint16)


@dataclass(frozen=True)
class TokenVocabulary:
    """The token strings of a fitted tokenizer: shared codes, each source's own codes, empty and suffix tokens.

    ``level_sizes[l]`` is the number of codes a source may emit at level ``l``; the first ``shared_sizes[l]`` of
    them are shared by all sources (one token each). ``shared_sizes`` defaults to none shared.

    Attributes:
        source_names: the sources, in the order their tokens appear in a user's sequence.
        level_sizes: the codes per source at each level.
        shared_sizes: per level, how many leading codes every source shares; ``()``: none.
        suffix_base: the base of the collision suffix, and its number of digit tokens.

    Raises:
        DataError: no source or level, ``shared_sizes`` that do not fit ``level_sizes``, a level size outside
            [1, 65535], or ``suffix_base`` outside [2, 1000].
    """

    source_names: tuple[str, ...]
    level_sizes: tuple[int, ...]  # codes per source at each level
    shared_sizes: tuple[int, ...] = ()  # leading codes of each level shared by every source
    suffix_base: int = 10

    def __post_init__(self) -> None:
        object.__setattr__(self, "source_names", tuple(str(s) for s in self.source_names))
        object.__setattr__(self, "level_sizes", tuple(int(k) for k in self.level_sizes))
        shared = tuple(int(k) for k in self.shared_sizes) or (0,) * len(self.level_sizes)
        object.__setattr__(self, "shared_sizes", shared)
        if not self.source_names or not self.level_sizes:
            raise DataError("a vocabulary needs at least one source and one level", field="level_sizes")
        if len(shared) != len(self.level_sizes) or any(not 0 <= s <= k for s, k in zip(shared, self.level_sizes, strict=True)):
            raise DataError(f"shared_sizes {list(shared)} do not fit level_sizes {list(self.level_sizes)}",
                            field="shared_sizes", expected="one count per level, each within [0, that level's size]")
        if any(k < 1 or k > EMPTY_CODE for k in self.level_sizes):
            raise DataError(f"level_sizes {list(self.level_sizes)}", field="level_sizes", expected=f"sizes within [1, {EMPTY_CODE}]")
        if not 2 <= self.suffix_base <= 1000:
            raise DataError(f"suffix_base={self.suffix_base}", field="suffix_base", expected="within [2, 1000]")

    @property
    def n_levels(self) -> int:
        """Levels per source."""
        return len(self.level_sizes)

    def token(self, source: int, level: int, code: int) -> str:
        """The string of one code of ``source`` (a shared code gives the same string for every source).

        Args:
            source: the source's index in ``source_names``.
            level: the level.
            code: the code at that level (not EMPTY_CODE: see ``empty_token``).

        Returns:
            ``<sh_l{level}_c{code}>`` for a shared code, else ``<s{source}_l{level}_c{code}>``.
        """
        if code < self.shared_sizes[level]:
            return f"<sh_l{level}_c{code}>"
        return f"<s{source}_l{level}_c{code}>"

    def empty_token(self, source: int) -> str:
        """The token of a source the user lacks.

        Args:
            source: the source's index in ``source_names``.

        Returns:
            ``<s{source}_empty>``.
        """
        return f"<s{source}_empty>"

    def tokens(self) -> list[str]:
        """Every token, in id order."""
        out = [f"<sh_l{lvl}_c{c}>" for lvl, shared in enumerate(self.shared_sizes) for c in range(shared)]
        for s in range(len(self.source_names)):
            for lvl, (shared, size) in enumerate(zip(self.shared_sizes, self.level_sizes, strict=True)):
                out.extend(self.token(s, lvl, c) for c in range(shared, size))
            out.append(self.empty_token(s))
        out.extend(f"<dup{d}>" for d in range(self.suffix_base))
        return out

    def __len__(self) -> int:
        n_sources = len(self.source_names)
        own = sum(k - s for k, s in zip(self.level_sizes, self.shared_sizes, strict=True))
        return sum(self.shared_sizes) + n_sources * (own + 1) + self.suffix_base

    @functools.cached_property
    def _layout(self) -> tuple[np.ndarray, np.ndarray, int]:
        """Id of every (source, level, code) ``[S, L, max K]``, the empty tokens' ids ``[S]``, the first digit id."""
        n_sources, widest = len(self.source_names), max(self.level_sizes)
        table = np.full((n_sources, self.n_levels, widest), -1, dtype=np.int64)
        next_id = 0
        for lvl, shared in enumerate(self.shared_sizes):
            table[:, lvl, :shared] = np.arange(next_id, next_id + shared)
            next_id += shared
        empty = np.empty(n_sources, dtype=np.int64)
        for s in range(n_sources):
            for lvl, (shared, size) in enumerate(zip(self.shared_sizes, self.level_sizes, strict=True)):
                table[s, lvl, shared:size] = np.arange(next_id, next_id + size - shared)
                next_id += size - shared
            empty[s] = next_id
            next_id += 1
        return table, empty, next_id

    def suffix_ids(self, k: int) -> list[int]:
        """Digit token ids of suffix ``k`` (none for 0).

        Args:
            k: the collision suffix.

        Returns:
            The ids of its digits in base ``suffix_base``, most significant first.

        Raises:
            DataError: ``k`` outside [0, 65535].
        """
        if not 0 <= k <= MAX_SUFFIX:
            raise DataError(f"suffix {k}", field="suffix", expected=f"within [0, {MAX_SUFFIX}]")
        digits: list[int] = []
        while k:
            k, digit = divmod(k, self.suffix_base)
            digits.append(digit)
        first = self._layout[2]
        return [first + d for d in reversed(digits)]

    def ids(self, codes: np.ndarray, suffix: np.ndarray | None = None) -> list[list[int]]:
        """Token ids per user, for codes ``[U, S, L]`` (an empty source gives one id) and an optional suffix.

        Args:
            codes: codes ``[U, S, L]`` of this vocabulary (EMPTY_CODE on every level of a source a user lacks).
            suffix: the collision suffix per user ``[U]`` (see ``collision_suffix``); None: no suffix tokens.

        Returns:
            One list of token ids per user.

        Raises:
            ShapeError: ``codes`` is not ``[U, S, L]`` of this vocabulary, or ``suffix`` not ``[U]``.
            DataError: codes that are not integers or out of range, a source empty on some levels only, or a suffix
                above 65535.
        """
        self.check(codes)
        table, empty, _ = self._layout
        n_users, n_sources, n_levels = codes.shape
        present = codes[:, :, 0] != EMPTY_CODE  # [U, S]
        local = np.where(present[..., None], codes.astype(np.int64), 0)
        ids = table[np.arange(n_sources)[None, :, None], np.arange(n_levels)[None, None, :], local]  # [U, S, L]
        ids[~present] = empty[np.nonzero(~present)[1]][:, None]
        keep = np.ones(codes.shape, dtype=bool)
        keep[..., 1:] = present[..., None]  # an empty source keeps one token
        flat_ids, flat_keep = ids.reshape(n_users, -1), keep.reshape(n_users, -1)
        users = [flat_ids[u][flat_keep[u]].tolist() for u in range(n_users)]
        if suffix is not None:
            suffix = np.asarray(suffix)
            if suffix.shape != (n_users,):
                raise ShapeError("suffix", suffix.shape, f"[{n_users}] (one per user)")
            for u in np.flatnonzero(suffix):
                users[u].extend(self.suffix_ids(int(suffix[u])))
        return users

    def render(self, codes: np.ndarray, suffix: np.ndarray | None = None) -> list[list[str]]:
        """Token strings per user (see ``ids``).

        Args:
            codes: codes ``[U, S, L]`` of this vocabulary.
            suffix: the collision suffix per user ``[U]``; None: no suffix tokens.

        Returns:
            One list of token strings per user.

        Raises:
            ShapeError: see ``ids``.
            DataError: see ``ids``.
        """
        table = self._index[1]
        return [[table[i] for i in row] for row in self.ids(codes, suffix)]

    def codes_from_ids(self, rows: Sequence[Sequence[int]], *, origin: str = "token ids",
                       lines: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Read token id sequences (as ``ids`` writes them) back into codes ``[U, S, L]`` and suffixes ``[U]``.

        A sequence that this vocabulary cannot have written (an unknown id, a code of another source or level, a
        source cut short, tokens after the suffix, a suffix with a leading zero) raises a ``DataError`` naming
        the user row (or its line of ``origin`` when ``lines`` gives one per row) and the position.

        Args:
            rows: one sequence of token ids per user.
            origin: where the rows come from, for error messages (e.g. a file name).
            lines: per row, its line in ``origin``, for error messages; None: rows are named by number.

        Returns:
            Codes, uint16 ``[U, S, L]``, and suffixes, uint16 ``[U]``.

        Raises:
            DataError: a sequence this vocabulary cannot have written (see above) or a suffix above 65535.
        """
        _, empty, first_digit = self._layout
        n_sources, n_levels = len(self.source_names), self.n_levels
        meaning = self._meaning
        empties = {int(e): s for s, e in enumerate(empty)}
        tokens = self._index[1]
        codes = np.empty((len(rows), n_sources, n_levels), dtype=np.uint16)
        suffix = np.zeros(len(rows), dtype=np.uint16)

        def name(i: int) -> str:
            return tokens[i] if 0 <= i < len(tokens) else f"id {i}"

        def at(u: int) -> dict[str, Any]:
            return {"path": origin, "row": u} if lines is None else {"path": origin, "line": lines[u]}

        for u, row in enumerate(rows):
            seq = [int(i) for i in row]
            pos = 0
            for s in range(n_sources):
                if pos < len(seq) and empties.get(seq[pos]) == s:
                    codes[u, s] = EMPTY_CODE
                    pos += 1
                    continue
                for lvl in range(n_levels):
                    if pos >= len(seq):
                        raise DataError(f"the sequence ends inside source {self.source_names[s]!r}", **at(u),
                                        expected=f"{n_levels} code tokens or {self.empty_token(s)} per source")
                    got = meaning.get(seq[pos])
                    if got is None or got[1] != lvl or got[0] not in (-1, s):
                        raise DataError(f"token {name(seq[pos])} at position {pos} is not a level-{lvl} code of source "
                                        f"{self.source_names[s]!r}", **at(u),
                                        expected=f"{self.token(s, lvl, 0)} .. {self.token(s, lvl, self.level_sizes[lvl] - 1)}")
                    codes[u, s, lvl] = got[2]
                    pos += 1
            digits = seq[pos:]
            if any(not first_digit <= d < first_digit + self.suffix_base for d in digits):
                bad = next(d for d in digits if not first_digit <= d < first_digit + self.suffix_base)
                raise DataError(f"token {name(bad)} after the codes", **at(u),
                                expected=f"only suffix digits <dup0>..<dup{self.suffix_base - 1}> after the last source")
            if digits and digits[0] == first_digit:
                raise DataError("suffix starts with <dup0>", **at(u), expected="no leading zero digit")
            value = 0
            for d in digits:
                value = value * self.suffix_base + d - first_digit
                if value > MAX_SUFFIX:
                    raise DataError("suffix too large", **at(u), expected=f"at most {MAX_SUFFIX}")
            suffix[u] = value
        return codes, suffix

    @functools.cached_property
    def _meaning(self) -> dict[int, tuple[int, int, int]]:
        """Code token id -> (source, or -1 for a shared code; level; code)."""
        table = self._layout[0]
        meaning: dict[int, tuple[int, int, int]] = {}
        for lvl, shared in enumerate(self.shared_sizes):
            for c in range(shared):
                meaning[int(table[0, lvl, c])] = (-1, lvl, c)
        for s in range(len(self.source_names)):
            for lvl, (shared, size) in enumerate(zip(self.shared_sizes, self.level_sizes, strict=True)):
                for c in range(shared, size):
                    meaning[int(table[s, lvl, c])] = (s, lvl, c)
        return meaning

    @functools.cached_property
    def _index(self) -> tuple[dict[str, int], list[str]]:
        """Token string -> id, and the strings in id order."""
        tokens = self.tokens()
        return {t: i for i, t in enumerate(tokens)}, tokens

    def codes_from_tokens(self, rows: Sequence[Sequence[str]], *, origin: str = "tokens",
                          lines: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Read token string sequences back into codes and suffixes (see ``codes_from_ids``).

        Args:
            rows: one sequence of token strings per user.
            origin: where the rows come from, for error messages.
            lines: per row, its line in ``origin``, for error messages; None: rows are named by number.

        Returns:
            Codes, uint16 ``[U, S, L]``, and suffixes, uint16 ``[U]``.

        Raises:
            DataError: a token not in this vocabulary, or a sequence it cannot have written (see
                ``codes_from_ids``).
        """
        index = self._index[0]
        ids = []
        for u, row in enumerate(rows):
            unknown = [t for t in row if t not in index]
            if unknown:
                where: dict[str, Any] = {"row": u} if lines is None else {"line": lines[u]}
                raise DataError(f"token {unknown[0]!r} is not in this vocabulary", path=origin, **where,
                                expected=f"tokens of this tokenizer ({len(index)} of them, e.g. {self._index[1][0]})")
            ids.append([index[t] for t in row])
        return self.codes_from_ids(ids, origin=origin, lines=lines)

    def check(self, codes: np.ndarray) -> None:
        """Raise unless ``codes [U, S, L]`` fit this vocabulary (codes in range; empty sources empty at every level).

        Args:
            codes: the codes to check.

        Raises:
            ShapeError: ``codes`` is not ``[U, S, L]`` with this vocabulary's sources and levels.
            DataError: codes that are not integers, a code out of its level's range, or a source empty (EMPTY_CODE)
                on some levels only.
        """
        if codes.ndim != 3 or codes.shape[1:] != (len(self.source_names), self.n_levels):
            raise ShapeError("codes", codes.shape, f"[users, {len(self.source_names)}, {self.n_levels}]")
        validate_codes(codes, self.level_sizes, self.source_names)

    # ---- persistence ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description, with every token in id order (what a language model adds)."""
        return {"format": VOCABULARY_FORMAT, "version": VOCABULARY_VERSION, "source_names": list(self.source_names),
                "level_sizes": list(self.level_sizes), "shared_sizes": list(self.shared_sizes),
                "suffix_base": self.suffix_base, "tokens": self.tokens()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, origin: str = "vocabulary") -> TokenVocabulary:
        """Rebuild from ``to_dict``'s output; its token list must be the one these fields give.

        Args:
            data: the dict ``to_dict`` wrote (e.g. read back from JSON).
            origin: where it comes from, for error messages.

        Returns:
            The vocabulary.

        Raises:
            DataError: not a pluribus U2QT vocabulary or another version; a field missing or malformed or out of
                range; a token list other than the one the fields give.
        """
        if not isinstance(data, Mapping) or data.get("format") != VOCABULARY_FORMAT:
            raise DataError("not a pluribus U2QT vocabulary", path=origin, field="format", expected=repr(VOCABULARY_FORMAT))
        if data.get("version") != VOCABULARY_VERSION:
            raise DataError(f"vocabulary version {data.get('version')!r}", path=origin, field="version",
                            expected=str(VOCABULARY_VERSION))
        try:
            vocab = cls(tuple(data["source_names"]), tuple(data["level_sizes"]), tuple(data["shared_sizes"]),
                        int(data["suffix_base"]))
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"vocabulary field {err} missing or malformed", path=origin,
                            expected="source_names, level_sizes, shared_sizes, suffix_base") from None
        if "tokens" in data and list(data["tokens"]) != vocab.tokens():
            raise DataError("the token list does not match the vocabulary's fields", path=origin, field="tokens",
                            expected=f"{len(vocab)} tokens in the order the fields give")
        return vocab

    def save(self, path: str | Path) -> Path:
        """Write the vocabulary as JSON (atomic).

        Args:
            path: the JSON file to write.

        Returns:
            The path.

        Raises:
            DataError: the file cannot be written.
        """
        from pluribus.io import write_json

        write_json(Path(path), self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> TokenVocabulary:
        """Read a vocabulary written by ``save``.

        Args:
            path: the JSON file ``save`` wrote.

        Returns:
            The vocabulary.

        Raises:
            DataError: the file is missing or not valid JSON, or its content is not a vocabulary (see
                ``from_dict``).
        """
        from pluribus.io import read_json

        return cls.from_dict(read_json(Path(path)), origin=str(path))


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

"""One error family for everything pluribus rejects; messages say where and what was expected."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class PluribusError(Exception):
    """Base of every error pluribus raises on purpose; the CLI prints it without a traceback (exit 2)."""


class DataError(PluribusError):
    """Bad input data: names the file, the line or row, and the field that is wrong.

    Args:
        message: what is wrong.
        path: the file or data set it is in.
        line: the line number in that file.
        row: the row (user) index.
        field: the field or column.
        expected: what was expected instead.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        line: int | None = None,
        row: int | None = None,
        field: str | None = None,
        expected: str | None = None,
    ) -> None:
        self.path = None if path is None else str(path)
        self.line = line
        self.row = row
        self.field = field
        self.expected = expected
        where = []
        if self.path is not None:
            where.append(self.path + (f":{line}" if line is not None else ""))
        elif line is not None:
            where.append(f"line {line}")
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field '{field}'")
        text = (", ".join(where) + ": " if where else "") + message
        if expected is not None:
            text += f" (expected {expected})"
        super().__init__(text)


class ShapeError(PluribusError):
    """A tensor or array of the wrong shape; names the expected shape.

    Args:
        what: the array or tensor.
        got: its shape.
        expected: the shape wanted, in words.
    """

    def __init__(self, what: str, got: Sequence[int], expected: str) -> None:
        self.what = what
        self.got = tuple(int(d) for d in got)
        self.expected = expected
        super().__init__(f"{what} has shape {list(self.got)}, expected {expected}")


class ConfigError(PluribusError):
    """A configuration value that is missing, unknown or out of range."""


def check_shape(what: str, shape: Sequence[int], expected: Sequence[int | None]) -> None:
    """Raise ShapeError unless ``shape`` matches ``expected`` (None matches any size)."""
    ok = len(shape) == len(expected) and all(e is None or int(s) == e for s, e in zip(shape, expected, strict=False))
    if not ok:
        pretty = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ShapeError(what, shape, pretty)

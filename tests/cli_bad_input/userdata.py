"""A newcomer's own data set (24 users, two sources, a profile, two labels) and ways to break it."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

T0 = 1_700_000_000


def good_records(n_users: int = 24) -> list[dict[str, Any]]:
    """The user's own JSONL records: payments and apps, an age/tenure profile, churn (binary) and plan labels."""
    records = []
    for i in range(n_users):
        records.append({
            "user_id": f"u{i:02d}",
            "sources": {
                "payments": [{"timestamp": T0 + 3600 * k + i, "text": f"paid at shop {(i + k) % 5}",
                              "amount": 5.0 + k + i % 3} for k in range(6)],
                "apps": [{"timestamp": T0 + 7200 * k + i, "text": f"used app {(i * k) % 3}",
                          "minutes": float(k + 1)} for k in range(4)],
            },
            "profile": {"age": 20 + i, "tenure": float(i % 5)},
            "labels": {"churn": i % 2, "plan": ("basic", "plus", "pro")[i % 3]},
        })
    return records


def write_records(path: Path, records: list[Any]) -> Path:
    """Write records as JSONL; a str or bytes record is written as that raw line."""
    with path.open("wb") as out:
        for r in records:
            if isinstance(r, bytes):
                out.write(r + b"\n")
            elif isinstance(r, str):
                out.write(r.encode("utf-8") + b"\n")
            else:
                out.write(json.dumps(r).encode("utf-8") + b"\n")
    return path


Mutation = Callable[[list[dict[str, Any]]], list[Any]]


def edit(fn: Callable[[list[dict[str, Any]]], None]) -> Mutation:
    """A mutation that edits a deep copy of the good records in place."""

    def apply(records: list[dict[str, Any]]) -> list[Any]:
        out = copy.deepcopy(records)
        fn(out)
        return out

    return apply


def raw_line(index: int, text: str | bytes) -> Mutation:
    """Replace record ``index`` with a raw line."""

    def apply(records: list[dict[str, Any]]) -> list[Any]:
        out: list[Any] = copy.deepcopy(records)
        out[index] = text
        return out

    return apply


def json_with(index: int, transform: Callable[[str], str]) -> Mutation:
    """Record ``index`` as JSON text passed through ``transform`` (e.g. to write NaN or Infinity literals)."""
    return lambda records: [transform(json.dumps(r)) if i == index else r for i, r in enumerate(records)]

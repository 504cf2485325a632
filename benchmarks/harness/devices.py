"""The ``--device`` option shared by the speed benchmarks (a script puts ``benchmarks/`` on ``sys.path`` and imports ``harness.devices``).

``cpu`` and ``cuda`` are taken as asked; ``auto`` is ``cuda`` when torch sees a GPU, else ``cpu``. Asking for
``cuda`` where torch sees none is bad input: one ``error:`` line on stderr and exit status 2, before any work.
"""

from __future__ import annotations

import argparse
import sys

import torch

DEVICE_CHOICES = ("cpu", "cuda", "auto")


def add_device_arg(parser: argparse.ArgumentParser, *, default: str = "cpu", help: str | None = None) -> None:
    """Add ``--device {cpu,cuda,auto}`` to ``parser``."""
    parser.add_argument("--device", choices=DEVICE_CHOICES, default=default,
                        help=help or f"where the timed work runs (auto: cuda when a GPU is seen; default {default})")


def resolve_device(name: str) -> str:
    """``cpu`` or ``cuda`` for ``--device name``; exit 2 with one ``error:`` line when cuda is asked but absent."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: torch sees no CUDA GPU (torch.cuda.is_available() is False); "
              "use --device cpu or auto", file=sys.stderr)
        raise SystemExit(2)
    if name not in ("cpu", "cuda"):
        print(f"error: --device {name!r}: choose one of {', '.join(DEVICE_CHOICES)}", file=sys.stderr)
        raise SystemExit(2)
    return name


def device_label(device: str) -> str:
    """The device as the tables print it: ``cpu`` or ``cuda (<GPU name>)``."""
    if device == "cuda":
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return device

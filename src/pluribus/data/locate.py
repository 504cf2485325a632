"""Where pluribus keeps downloaded data sets: $PLURIBUS_DATA_DIR, else ~/.cache/pluribus."""

from __future__ import annotations

import os
from pathlib import Path


def data_home() -> Path:
    """The folder that holds fetched data sets."""
    return Path(os.environ.get("PLURIBUS_DATA_DIR", Path.home() / ".cache" / "pluribus")).expanduser()

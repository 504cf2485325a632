"""Where pluribus keeps downloaded data sets: $PLURIBUS_DATA_DIR, else ~/.cache/pluribus."""

from __future__ import annotations

import os
from pathlib import Path


def data_home() -> Path:
    """The folder that holds fetched data sets."""
    return Path(os.environ.get("PLURIBUS_DATA_DIR", Path.home() / ".cache" / "pluribus")).expanduser()


#: What a data argument accepts (help texts and error messages say the same thing).
DATA_CHOICES = "movielens-100k, synthetic or synthetic:N (N generated users), a data set folder or a .jsonl file"

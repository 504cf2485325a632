"""Cost and readings of the encoder's load-time mask self-check on SmolLM2-135M (fp32 and bf16, sdpa and eager).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/encoder/selfcheck.py
"""

from __future__ import annotations

import time

import torch

from pluribus.encoder.config import EncoderConfig
from pluribus.encoder.model import UserEncoder


def main() -> None:
    """Build each encoder without the check, then time ``check_mask()`` and print what it measured."""
    torch.set_num_threads(1)
    for dtype in ("float32", "bfloat16"):
        for impl in ("sdpa", "eager"):
            enc = UserEncoder(EncoderConfig(dtype=dtype, attn_implementation=impl, mask_check=False))  # type: ignore[arg-type]
            t = time.time()
            found = enc.check_mask()
            print(dtype, impl, {k: f"{v:.2e}" for k, v in found.items()}, f"{time.time() - t:.2f}s")


if __name__ == "__main__":
    main()

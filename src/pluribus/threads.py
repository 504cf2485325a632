"""How many CPU threads small-model work uses.

The demo's models are small (an RQ-VAE with a 256-unit layer, an MLP item scorer, logistic-regression probes on
~1,000 users): a second thread buys little and, on a shared machine, costs a lot. Measured on the 2-core machine at
load ~5: a 60-epoch tokenizer fit took 32 s with 2 torch threads and 6.5–7.6 s with 1; a 5-fold logistic probe on
1,152-d embeddings took 12.3 s with OpenBLAS's 2 threads and 0.4 s with 1 (idle threads spin while waiting for a
core). Big batched work, such as MiniLM's stage-1 embedding, keeps the machine's default.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads and ``n`` BLAS/OpenMP threads; ``None``: the machine's
    default (every core). The previous settings come back afterwards, also on an error."""
    import os

    import torch
    from threadpoolctl import threadpool_limits

    count = n if n is not None else (os.cpu_count() or 1)
    if count < 1:
        from pluribus.errors import ConfigError

        raise ConfigError(f"threads must be >= 1, got {count}")
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        with threadpool_limits(limits=count):
            yield
    finally:
        torch.set_num_threads(before)

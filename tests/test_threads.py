"""pluribus.threads: the CPU thread settings of a block are in effect inside it and restored after it."""

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info

from pluribus.errors import ConfigError
from pluribus.threads import cpu_threads


def _blas_threads() -> set[int]:
    np.ones((2, 2)) @ np.ones((2, 2))  # make sure numpy's BLAS is loaded
    return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}


def test_cpu_threads_sets_torch_and_blas_and_restores_them_even_after_an_error():
    before_torch, before_blas = torch.get_num_threads(), _blas_threads()
    with cpu_threads(1):
        assert torch.get_num_threads() == 1 and _blas_threads() == {1}
    assert torch.get_num_threads() == before_torch and _blas_threads() == before_blas
    with pytest.raises(RuntimeError), cpu_threads(1):
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before_torch


def test_cpu_threads_none_is_every_core_and_zero_is_refused():
    import os

    with cpu_threads(None):
        assert torch.get_num_threads() == (os.cpu_count() or 1)
    with pytest.raises(ConfigError, match="threads must be >= 1"), cpu_threads(0):
        pass

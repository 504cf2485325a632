"""Fixtures of the tokenizer tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from u2qt_helpers import make_views

from pluribus.tokenizer import TokenizerConfig

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def views() -> dict[str, np.ndarray]:
    return make_views()


@pytest.fixture(scope="session")
def small_config() -> TokenizerConfig:
    return TokenizerConfig(
        n_shared=2, n_specific=1, shared_size=16, specific_size=8, latent_dim=8, hidden_dims=(32,),
        epochs=40, batch_size=64, respawn_every=10,
    )


@pytest.fixture(scope="session")
def fitted(views, small_config):
    from pluribus.tokenizer import UserTokenizer

    present = {"src2": np.arange(len(views["src2"])) % 5 != 0}
    return UserTokenizer(small_config, progress=False).fit(views, present=present), present

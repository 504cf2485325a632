"""PrivFusion's hub and party apps on Flower's Ray simulation engine and on the deployment engine (loopback).

Opt-in (`-m ray`): each starts Ray or a SuperLink and SuperNodes, under a hard timeout; every process is stopped
by its session id. The deployment test also needs PLURIBUS_FLOWER_DEPLOYMENT=1 (each message starts a fresh
`flwr-clientapp` process that imports torch: minutes on a small machine). With a fixed noise seed (not private)
every engine must produce the in-process engine's fused tensors exactly (the same digest).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pluribus.fusion.core.config import FusionConfig
from pluribus.fusion.core.models import MLP, train_model
from pluribus.fusion.flower.apps import PartyFiles, run_fusion_flower
from pluribus.fusion.flower.party_files import load_party_model, save_party_data, save_party_model

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture()
def parties(tmp_path: Path) -> list[PartyFiles]:
    from pluribus.data.images import load_digits_images

    x, y = load_digits_images()
    x, y = torch.as_tensor(x[:200]).reshape(200, -1).float(), torch.as_tensor(y[:200])
    out = []
    for k in range(2):
        torch.manual_seed(k)
        idx = torch.arange(k * 100, (k + 1) * 100)
        save_party_model(tmp_path / f"m{k}.safetensors", train_model(MLP(64, (16,), 10), x[idx], y[idx], epochs=2))
        save_party_data(tmp_path / f"d{k}.safetensors", x[idx], y[idx])
        out.append(PartyFiles(f"p{k}", tmp_path / f"m{k}.safetensors", tmp_path / f"d{k}.safetensors",
                              tmp_path / f"fused{k}.safetensors"))
    return out


def _check(parties: list[PartyFiles], tmp_path: Path, engine: str, timeout_s: float) -> None:
    cfg = FusionConfig(epsilon=4.0, noise_seed=7)
    res = run_fusion_flower(parties, cfg, engine=engine, out_dir=tmp_path / engine, timeout_s=timeout_s)  # type: ignore[arg-type]
    ref = run_fusion_flower(parties, cfg, engine="inprocess", out_dir=tmp_path / "inprocess")
    assert res.parties == ["p0", "p1"] and not res.excluded, res.excluded
    assert res.digest == ref.digest  # the same messages, the same numbers, as in-process
    assert (tmp_path / engine / "fused.safetensors").exists() and res.result["holders"] == ["p0", "p1"]
    fused = load_party_model(parties[1].fused_out).state_dict()  # a party's own copy, written by its process
    assert all(torch.equal(fused[k], res.fused[k]) for k in res.fused)


def test_fusion_on_the_simulation_engine(parties: list[PartyFiles], tmp_path: Path) -> None:
    _check(parties, tmp_path, "simulation", timeout_s=300)


@pytest.mark.skipif(os.environ.get("PLURIBUS_FLOWER_DEPLOYMENT") != "1",
                    reason="deployment engine test is opt-in: set PLURIBUS_FLOWER_DEPLOYMENT=1")
def test_fusion_on_the_deployment_engine(parties: list[PartyFiles], tmp_path: Path) -> None:
    _check(parties, tmp_path, "deployment", timeout_s=480)

"""Two CPU processes (gloo) with the global batch split across them give the one-process loss curve."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from conftest import make_backbone
from pluribus.encoder.config import EncoderConfig, LoraSettings, ScheduleConfig, TrainConfig
from pluribus.errors import ConfigError

SCHEDULE = ScheduleConfig(policy="ggsm", total_steps=4, warmup_steps=2, norm="zscore")


def _setup():
    from pluribus.data.synthetic import make_synthetic_users
    from pluribus.encoder.backbone import word_tokenizer
    from pluribus.encoder.model import UserEncoder
    from pluribus.encoder.pairs import build_pairs, pairs_vocabulary

    pairs = build_pairs(make_synthetic_users(24, seed=0), source="payments", positive="profile", max_events=8)
    tok = word_tokenizer(pairs_vocabulary(pairs))
    cfg = EncoderConfig(model="tiny", projection=(16,), lora=LoraSettings(r=4), max_length=48)
    return pairs, UserEncoder(cfg, backbone=make_backbone(len(tok)), tokenizer=tok)


def _train_config(steps):
    # constant LR: the 2-step run stands in for an interrupted 4-step one
    return TrainConfig(steps=steps, batch_size=8, grad_accum=2, lr=5e-3, checkpoint_every=1, lr_schedule="constant",
                       lr_warmup_ratio=0.0)


def _worker(rank, size, init_file, out):
    import torch.distributed as dist

    from pluribus.encoder.train import train_encoder
    from pluribus.runs import RunFolder

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    run = RunFolder(os.path.join(out, "run"))
    saves = []
    original = run.save_checkpoint
    run.save_checkpoint = lambda *a, **k: (saves.append(1), original(*a, **k))  # type: ignore[method-assign]
    pairs, enc = _setup()
    train_encoder(enc, pairs, SCHEDULE, _train_config(2), run=run, progress=False)
    pairs, enc = _setup()
    res, sched = train_encoder(enc, pairs, SCHEDULE, _train_config(4), run=run, progress=False)  # resumes at 2
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump({"losses": res.losses, "top1": res.top1, "resumed_from": res.resumed_from, "saves": len(saves),
                   "importance": sched.importance[:16].tolist()}, fh)
    dist.destroy_process_group()


def run_two_workers(worker, tmp_path) -> None:
    """Run ``worker(rank, 2, init_file, out)`` on two processes (gloo, file init in ``tmp_path``), at most 240 s;
    the workers this call started are killed by their handles if they outlive it."""
    import torch.multiprocessing as mp

    # fork: the workers inherit the imported torch/transformers (spawn re-imports them, ~5 s per worker); only
    # with one intra-op thread, since forking a live OpenMP thread pool can hang the child
    method = "fork" if torch.get_num_threads() == 1 else "spawn"
    ctx = mp.start_processes(worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=False,
                             start_method=method)
    deadline = time.monotonic() + 240
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                raise AssertionError("distributed workers did not finish in 240 s")
    finally:
        for p in ctx.processes:  # only the workers this test started, by their handles
            if p.is_alive():
                p.kill()


def test_two_processes_match_one_process_and_resume(tmp_path):
    from pluribus.encoder.train import train_encoder

    run_two_workers(_worker, tmp_path)
    pairs, enc = _setup()
    ref, sched = train_encoder(enc, pairs, SCHEDULE, _train_config(4), progress=False)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for got in ranks:
        assert got["resumed_from"] == 2
        assert got["losses"] == pytest.approx(ref.losses, rel=1e-4, abs=1e-5)
        assert got["top1"] == pytest.approx(ref.top1)
        assert got["importance"] == pytest.approx(sched.importance[:16].tolist(), rel=1e-3, abs=1e-5)
    assert ranks[0]["saves"] == 4 and ranks[1]["saves"] == 0  # checkpoints by rank 0 only


def test_a_batch_that_does_not_split_over_the_ranks_is_refused(monkeypatch):
    import pluribus.encoder.train as train_module

    pairs, enc = _setup()
    monkeypatch.setattr(train_module, "dist_world", lambda: (0, 3))
    with pytest.raises(ConfigError, match=r"batch_size=8 \(the global micro-batch\) is not divisible by the 3 ranks"):
        train_module.train_encoder(enc, pairs, SCHEDULE, _train_config(1), progress=False)

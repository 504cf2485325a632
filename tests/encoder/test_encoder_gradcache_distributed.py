"""The gradient cache across two CPU processes (gloo): each rank encodes its slice of the global micro-batch in
pieces, negatives come from both ranks, and the run equals one process encoding the whole batch in one pass."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from test_encoder_distributed import SCHEDULE, _setup, _train_config, run_two_workers


def _step_gradients(enc, pairs, idx, piece_size, average) -> dict[str, float]:
    """Sum and sum of squares of each parameter's gradient after one GG-SM micro-batch of ``idx`` (then cleared):
    a wrong scale (e.g. of the gathered embedding gradient) shows here, though Adam and clipping would hide it."""
    from pluribus.encoder.train import contrastive_backward

    config = dataclasses.replace(_train_config(1), piece_size=piece_size, grad_accum=1)
    contrastive_backward(enc, pairs, idx, 0.5, config, importance="hidden")
    average([p for p in enc.parameters() if p.requires_grad])
    out = {}
    for name, p in enc.named_parameters():
        if p.grad is not None:
            out[name + ".sum"] = float(p.grad.double().sum())
            out[name + ".sq"] = float(p.grad.double().square().sum())
    enc.zero_grad(set_to_none=True)
    return out


def _worker(rank, size, init_file, out):
    import torch.distributed as dist

    from pluribus.encoder.distributed import average_gradients, shard
    from pluribus.encoder.train import train_encoder

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    pairs, enc = _setup()
    grads = _step_gradients(enc, pairs, shard(list(range(8)), rank, size), 3, average_gradients)
    # each rank holds 4 of the 8 inputs per tower: pieces of 3 and 1
    res, sched = train_encoder(enc, pairs, SCHEDULE, dataclasses.replace(_train_config(3), piece_size=3),
                               progress=False)
    weights = {k: float(v.double().sum()) for k, v in enc.trainable_state_dict().items()}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump({"losses": res.losses, "top1": res.top1, "importance": sched.importance[:16].tolist(),
                   "weights": weights, "rows": res.memory.rows if res.memory else None, "grads": grads}, fh)
    dist.destroy_process_group()


def test_two_processes_in_pieces_match_one_process_in_one_pass(tmp_path):
    from pluribus.encoder.train import train_encoder

    run_two_workers(_worker, tmp_path)
    pairs, enc = _setup()
    grads = _step_gradients(enc, pairs, list(range(8)), None, lambda params: None)
    ref, sched = train_encoder(enc, pairs, SCHEDULE, _train_config(3), progress=False)
    weights = {k: float(v.double().sum()) for k, v in enc.trainable_state_dict().items()}
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["rows"] == 3
        assert got["losses"] == pytest.approx(ref.losses, rel=1e-4, abs=1e-5)
        assert got["top1"] == pytest.approx(ref.top1)
        assert got["importance"] == pytest.approx(sched.importance[:16].tolist(), rel=1e-3, abs=1e-5)
        assert got["weights"] == pytest.approx(weights, rel=1e-4, abs=1e-4)
        assert got["grads"].keys() == grads.keys()
        scale = max(abs(v) for v in grads.values())
        assert got["grads"] == pytest.approx(grads, rel=1e-4, abs=1e-6 * scale)

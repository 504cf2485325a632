"""InfoNCE temperature x false-negative margin sweep on held-out Recall@10 (the tiny vehicle of encoder/learns.py).

One seed, the same pretrained backbone (``encoder/learns.py`` writes it) and head for every cell; the library
defaults otherwise. Measures which defaults the data support; a single seed, so gaps below about 0.01
Recall@10 (the seed spread in encoder/learns.py) mean nothing.

    .venv/bin/python benchmarks/encoder/loss_sweep.py --steps 200 --out runs/bench/encoder_learns
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PLURIBUS_PROGRESS", "0")
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from masks import pretrain_tiny, token_pairs

from pluribus.data.movielens import load_movielens
from pluribus.encoder import EncoderConfig, LoraSettings, ScheduleConfig, TrainConfig, UserEncoder
from pluribus.encoder.metrics import heldout_retrieval
from pluribus.encoder.pairs import split_pairs
from pluribus.encoder.train import train_encoder
from pluribus.eval.report import markdown_table
from pluribus.io import write_json, write_text


def main() -> None:
    """Train one encoder per (temperature, margin) cell; write sweep.json and sweep.md under --out."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--temperatures", default="0.02,0.05,0.1")
    ap.add_argument("--margins", default="0.1,none")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/encoder_learns"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    ds = load_movielens()
    model = str(pretrain_tiny(ds, args.out / "pretrained", steps=300))
    pairs, _ = token_pairs(ds, history_events=48, future_events=10)
    train_pairs, held = split_pairs(pairs, 0.2, seed=0)
    assert held is not None
    cfg = EncoderConfig(model=model, projection=(128,), lora=LoraSettings(r=0), max_length=128, batch_size=64)
    rows = []
    for temperature in [float(t) for t in args.temperatures.split(",")]:
        for margin_text in args.margins.split(","):
            margin = None if margin_text == "none" else float(margin_text)
            torch.manual_seed(args.seed)
            enc = UserEncoder(cfg)
            res, _ = train_encoder(enc, train_pairs, ScheduleConfig(total_steps=args.steps),
                                   TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, seed=args.seed,
                                               temperature=temperature, fn_margin=margin), progress=False)
            r = heldout_retrieval(enc, held)
            rows.append({"temperature": temperature, "fn_margin": margin_text, "recall@1": r["recall@1"],
                         "recall@10": r["recall@10"], "mrr": r["mrr"], "final loss": res.tail("losses"),
                         "ln B": res.chance_loss, "collapsed": res.collapsed})
            print(f"[{time.time() - t0:.0f}s] {rows[-1]}", flush=True)
            write_json(args.out / "sweep.json", {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows})
    text = (f"# Temperature x margin sweep\n\n{len(train_pairs)} training / {len(held)} held-out users, "
            f"{args.steps} steps, batch {args.batch}, seed {args.seed}; {time.time() - t0:.0f} s.\n\n"
            + markdown_table(rows, digits=4) + "\n")
    write_text(args.out / "sweep.md", text)
    print(text)


if __name__ == "__main__":
    main()

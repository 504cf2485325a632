"""Does GGSM training learn? Trained vs untrained encoder on held-out users, same head seed per arm.

The event-language vehicle (``pluribus.encoder.event_language``: a 4-layer Qwen3, hidden 128, pretrained
causally on MovieLens-100K histories in the token language ``i<item> r<rating>``), full fine-tuning. Objective: the library default, the
``future_events`` positive (the user's next K held-out events, here in the same token language). 80% of users
train, 20% are held out (``split_pairs``, split seed 0, the same for every seed). Per seed s, both arms start
from the same pretrained backbone and the same head (``torch.manual_seed(s)`` before building); the trained
arm then runs ``train_encoder`` with the library defaults (GG-SM schedule, LR warm-up + cosine, temperature
0.02, margin 0.1). Reported: held-out Recall@1/10 and MRR among all held-out users, mean probe AUC over
MovieLens tasks (all users, 5 folds), and the training loss against ln B with the collapse diagnostics.

    .venv/bin/python benchmarks/encoder/learns.py --steps 300 --seeds 0,1,2 --out runs/bench/encoder_learns

``--vehicle smollm2``: the packaged SmolLM2-135M-Instruct with LoRA (r = 8, the library default) on the text
rendering (``build_pairs``: the last ``--max-events`` events of each history, the next ``--future-events`` held-out
events as the positive, inputs cut to ``--max-length`` tokens), library defaults otherwise (gradient checkpointing
where the memory estimate needs it; ``--piece-size`` for the gradient cache). Also records each arm's wall time and the process's peak resident
memory:

    nice -n 10 .venv/bin/python benchmarks/encoder/learns.py --vehicle smollm2 --threads 2 --steps 40 --batch 16 \
        --lr 1e-3 --max-length 64 --max-events 4 --future-events 3 --seeds 0 --out runs/bench/encoder_learns_smollm2
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PLURIBUS_PROGRESS", "0")
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # BLAS threads thrash a shared CPU
    os.environ.setdefault(_var, "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from masks import evaluate, flat_metrics, train_summary

from pluribus.data.movielens import load_movielens
from pluribus.encoder import EncoderConfig, ScheduleConfig, TrainConfig, UserEncoder
from pluribus.encoder.event_language import PretrainSettings, vehicle
from pluribus.encoder.train import train_encoder
from pluribus.eval.report import markdown_table, mean_std
from pluribus.io import write_json, write_text


def main() -> None:
    """Run both arms for each seed; write results.json and report.md under --out."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--future-events", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/encoder_learns"))
    ap.add_argument("--vehicle", choices=("tiny", "smollm2"), default="tiny")
    ap.add_argument("--max-length", type=int, default=64, help="smollm2: tokens per input")
    ap.add_argument("--max-events", type=int, default=4, help="smollm2: history events rendered per user")
    ap.add_argument("--piece-size", type=int, default=None, help="smollm2: gradient-cache piece (default: one pass)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    ds = load_movielens()
    if args.vehicle == "smollm2":
        cfg, train_pairs, held, inputs = smollm2_vehicle(ds, args)
    else:
        # the positive is the last K held-out events (future_window="last"), as when docs/results/encoder.md's numbers ran
        v = vehicle(ds, args.out / "pretrained", source="ratings", settings=PretrainSettings(steps=args.pretrain_steps),
                    future_events=args.future_events, future_window="last", progress=False)
        cfg, train_pairs, held, inputs = v.config, v.train, v.held, v.inputs
        print(f"[{time.time() - t0:.0f}s] pretrain {v.pretrain_seconds:.0f}s ({'cached' if v.cached else 'cold'})",
              flush=True)
    print(f"[{time.time() - t0:.0f}s] {len(train_pairs)} training / {len(held)} held-out users", flush=True)
    rows, results = [], []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for arm in ("untrained", "trained"):
            started = time.time()
            torch.manual_seed(seed)  # the same head initialisation for both arms of a seed
            enc = UserEncoder(cfg)
            train = None
            if arm == "trained":
                res, _ = train_encoder(enc, train_pairs, ScheduleConfig(total_steps=args.steps),
                                       TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, seed=seed,
                                                   piece_size=args.piece_size),
                                       progress=False)
                train = train_summary(res)
                train["seconds"] = time.time() - started
                train["memory_estimate"] = res.memory.as_dict() if res.memory is not None else None
            ev = evaluate(enc, held, inputs, ds, 1.0)  # the encoder's default inference mask (bidirectional)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # this process so far (Linux: KiB)
            results.append({"seed": seed, "arm": arm, "retrieval": ev["retrieval"], "probes": ev["probes"],
                            "train": train, "seconds": time.time() - started, "peak_rss_bytes": peak})
            metrics = flat_metrics(ev)
            row = {"seed": seed, "arm": arm, **{k: metrics[k] for k in ("recall@1", "recall@10", "mrr", "mean AUC")}}
            if train:
                row.update({"final loss": train["final_loss"], "ln B": train["chance"],
                            "anchor cos": train["anchor_cosine"], "top-1": train["top1"]})
            row.update({"seconds": round(time.time() - started), "peak RSS GiB": peak / 2**30})
            rows.append(row)
            print(f"[{time.time() - t0:.0f}s] {row}", flush=True)
            write_json(args.out / "results.json", {"args": {k: str(v) for k, v in vars(args).items()},
                                                   "runs": results})
    summary = []
    for arm in ("untrained", "trained"):
        mine = [r for r in rows if r["arm"] == arm]
        summary.append({"arm": arm, **{k: mean_std([r[k] for r in mine]) for k in
                                       ("recall@1", "recall@10", "mrr", "mean AUC")}})
    gaps = [t["recall@10"] - u["recall@10"] for u, t in zip(rows[::2], rows[1::2], strict=True)]
    auc_gaps = [t["mean AUC"] - u["mean AUC"] for u, t in zip(rows[::2], rows[1::2], strict=True)]
    text = (f"# Does GGSM training learn?\n\nvehicle {args.vehicle}, {len(train_pairs)} training / {len(held)} "
            f"held-out users, {args.steps} steps, batch {args.batch}, lr {args.lr}; {time.time() - t0:.0f} s.\n\n"
            + markdown_table(summary) + "\n\nPer seed:\n\n" + markdown_table(rows, digits=4)
            + f"\n\nPaired (trained - untrained) Recall@10: {mean_std(gaps)}, seeds better {sum(g > 0 for g in gaps)}"
            f"/{len(gaps)}; mean AUC: {mean_std(auc_gaps)}, seeds better {sum(g > 0 for g in auc_gaps)}/{len(gaps)}\n")
    write_text(args.out / "report.md", text)
    print(text)


def smollm2_vehicle(ds: object, args: argparse.Namespace) -> tuple[EncoderConfig, object, object, list]:
    """(encoder config, training pairs, held-out pairs, every user's input) of the SmolLM2 text vehicle."""
    from pluribus.encoder.pairs import build_pairs, split_pairs, user_inputs

    pairs = build_pairs(ds, source="ratings", positive="future_events", max_events=args.max_events,  # type: ignore[arg-type]
                        future_events=args.future_events)
    train_pairs, held = split_pairs(pairs, 0.2, seed=0)
    _, inputs = user_inputs(ds, source="ratings", max_events=args.max_events)  # type: ignore[arg-type]
    return EncoderConfig(model="smollm2-135m", max_length=args.max_length), train_pairs, held, inputs


if __name__ == "__main__":
    main()

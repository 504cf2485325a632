"""FedBone quality at K micro-batches per message vs K = 1 (the exact FedBone step), same budget, >= 3 seeds.

K > 1 forwards all K micro-batches of an exchange through the backbone as it was at the exchange's start and
applies gradients up to K - 1 steps stale (see ``runtime.train_exchange``); this measures what that costs in
quality on the MNIST multi-task suite (digit acc, parity acc, segmentation mIoU, reconstruction RMSE, lower is
better). Every arm runs the same global steps on the same mini-batches; only the message cadence differs.

For each task it prints mean ± std over seeds and whether the K arm's mean lies inside the K = 1 seeds' range
[min, max] (the "seed spread"); Δm is against K = 1, per seed.

    nice -n 10 .venv/bin/python benchmarks/fedbone/micro_batches.py --ks 1,8 --seeds 0,1,2 --steps 240 \
        --max-train 1000 --out runs/fedbone_micro_batches
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

TASKS = ("digit", "parity", "segmentation", "reconstruction")


def main() -> None:
    """Run every (K, seed), print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", default="1,8")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--max-train", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("runs/fedbone_micro_batches"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    from pluribus.eval.multitask import delta_m
    from pluribus.eval.report import markdown_table, mean_std
    from pluribus.federated import FedBoneConfig, ModelConfig, build_suite, run_fedbone
    from pluribus.io import read_json, write_json

    args.out.mkdir(parents=True, exist_ok=True)
    cache_path = args.out / "results.json"
    cache: dict = read_json(cache_path) if cache_path.exists() else {}
    ks = [int(k) for k in args.ks.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    model = ModelConfig(dim=args.dim, depth=args.depth, heads=4, adapter_hidden=args.dim)
    lower: dict[str, bool] = {}
    for seed in seeds:
        tasks = build_suite("mnist", TASKS, seed=seed, max_train_per_client=args.max_train)
        lower = {t.name: t.lower_is_better for t in tasks}
        for k in ks:
            key = f"k{k}|s{seed}|{args.steps}|n{args.max_train}|d{args.dim}x{args.depth}"
            if key in cache:
                continue
            cfg = FedBoneConfig(suite="mnist", tasks=TASKS, steps=args.steps, batch_size=args.batch_size,
                                seed=seed, model=model, max_train_per_client=args.max_train)
            cfg = replace(cfg, micro_batches_per_message=k)
            t0 = time.perf_counter()
            res = run_fedbone(cfg, tasks=tasks, progress=False)
            primary = {t.name: res.final[f"{i}:{t.name}"][t.primary_metric] for i, t in enumerate(tasks)}
            cache[key] = {"k": k, "seed": seed, "primary": primary, "wall_s": time.perf_counter() - t0,
                          "exchanges": -(-args.steps // k), "bytes_total": res.bytes.get("total", 0)}
            write_json(cache_path, cache)
            print(f"K={k} seed {seed}: " + " ".join(f"{n}={v:.4f}" for n, v in primary.items())
                  + f" ({cache[key]['wall_s']:.0f} s)", flush=True)
    runs = {k: [r for r in cache.values() if r["k"] == k and r["seed"] in seeds] for k in ks}
    base = {r["seed"]: r["primary"] for r in runs[ks[0]]}
    rows = []
    for k, rs in runs.items():
        row: dict = {"K": k, "messages/client": 2 * rs[0]["exchanges"] if rs else 0}
        for task in TASKS:
            values = [r["primary"][task] for r in rs]
            ref = [b[task] for b in base.values()]
            inside = min(ref) <= float(np.mean(values)) <= max(ref)
            row[task] = mean_std(values) + ("" if k == ks[0] else (" (in)" if inside else " (OUT)"))
        deltas = [delta_m(r["primary"], base[r["seed"]], lower) for r in rs if r["seed"] in base]
        row[f"Δm vs K={ks[0]} (%)"] = mean_std(deltas, digits=2)
        row["n"] = len(rs)
        rows.append(row)
    print(f"\n### MNIST multi-task, {args.steps} steps, <= {args.max_train} train/client, seeds {seeds}\n")
    print(markdown_table(rows))
    print("\n(in) / (OUT): the K arm's mean lies inside / outside the K = 1 seeds' [min, max]")


if __name__ == "__main__":
    main()

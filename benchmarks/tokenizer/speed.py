"""U2QT speed: encode throughput and train-step time of our residual quantiser vs vector-quantize-pytorch.

Side by side in one process, at equal latent dim, levels and codebook size:

- ``ours``: ``MultiViewQuantizer`` (single view, all levels shared: the plain RQ case) and the multi-view
  stacked layout (4 shared + 2 specific over 3 sources, same number of vectors);
- ``ResidualVQ``: vector-quantize-pytorch's residual VQ (its defaults: EMA codebooks);
- ``floor``: a bare matmul nearest-neighbour loop (``argmin ||t||^2 - 2 x.t`` by one fused matmul, gather,
  subtract), the least work an exact residual encoder does; and the same loop with full squared
  distances (``||x||^2 + ||t||^2 - 2 x.t``), as most RQ-VAE code writes it.

Train step: encoder MLP -> quantiser -> decoder MLP, MSE + quantiser losses, backward, AdamW step.
Peak memory: the peak RSS growth of one encode call of ``--mem-n`` vectors, measured in a fresh subprocess
per method (CPU), or ``torch.cuda.max_memory_allocated`` on a GPU. Times are best-of-``--repeats``, with
the methods interleaved round-robin so that load from other processes hits them alike.

    .venv/bin/python benchmarks/tokenizer/speed.py [--n 15360] [--dim 64] [--levels 6] [--codebook 256] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness

import torch
from torch import nn

from harness.devices import add_device_arg, device_label, resolve_device
from harness.timing import interleaved_times
from pluribus.tokenizer.config import TokenizerConfig
from pluribus.tokenizer.rqvae import MultiViewQuantizer, PerSourceMLP, pairwise_sq_dist


def floor_encode(x: torch.Tensor, tables: list[torch.Tensor]) -> torch.Tensor:
    """Residual nearest-neighbour codes with one fused matmul per level (argmin of ||t||^2 - 2 x.t), nothing else."""
    r = x
    codes = []
    for table in tables:
        code = torch.addmm((table * table).sum(-1), r, table.T, alpha=-2.0).argmin(-1)
        r = r - table[code]
        codes.append(code)
    return torch.stack(codes, -1)


def naive_encode(x: torch.Tensor, tables: list[torch.Tensor]) -> torch.Tensor:
    """The same with full squared distances (||x||^2 + ||t||^2 - 2 x.t), as most RQ-VAE code computes them."""
    r = x
    codes = []
    for table in tables:
        code = pairwise_sq_dist(r, table).argmin(-1)
        r = r - table[code]
        codes.append(code)
    return torch.stack(codes, -1)


def _ours(args: argparse.Namespace, *, multiview: bool) -> tuple[nn.Module, Callable[[torch.Tensor], Any]]:
    if multiview:
        cfg = TokenizerConfig(n_shared=args.levels - 2, n_specific=2, shared_size=args.codebook,
                              specific_size=args.codebook, latent_dim=args.dim)
        q = MultiViewQuantizer(cfg, 3).eval()

        def run(x: torch.Tensor) -> Any:
            z = x.reshape(3, -1, args.dim)
            return q(z, torch.ones(z.shape[:2], dtype=torch.bool, device=x.device)).codes
        return q, run
    cfg = TokenizerConfig(n_shared=args.levels, n_specific=0, shared_size=args.codebook, latent_dim=args.dim)
    q = MultiViewQuantizer(cfg, 1).eval()

    def run1(x: torch.Tensor) -> Any:
        return q(x[None], torch.ones(1, x.shape[0], dtype=torch.bool, device=x.device)).codes
    return q, run1


def _rvq(args: argparse.Namespace) -> tuple[nn.Module, Callable[[torch.Tensor], Any]]:
    from vector_quantize_pytorch import ResidualVQ

    rvq = ResidualVQ(dim=args.dim, num_quantizers=args.levels, codebook_size=args.codebook).eval()

    def run(x: torch.Tensor) -> Any:
        return rvq(x[None])[1]
    return rvq, run


def _encoder(name: str, args: argparse.Namespace, device: str) -> Callable[[torch.Tensor], Any]:
    if name in ("floor", "naive full-distance loop"):
        tables = [torch.randn(args.codebook, args.dim, device=device) for _ in range(args.levels)]
        fn = floor_encode if name == "floor" else naive_encode
        return lambda x: fn(x, tables)
    module, run = _rvq(args) if name == "ResidualVQ" else _ours(args, multiview=name == "ours (stacked 4+2, 3 views)")
    module.to(device)
    return run


ENCODERS = ("ours (plain RQ)", "ours (stacked 4+2, 3 views)", "ResidualVQ", "naive full-distance loop", "floor")


def _peak_child(name: str, args_dict: dict[str, Any], queue: Any) -> None:
    args = argparse.Namespace(**args_dict)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.mem_n, args.dim)
    run = _encoder(name, args, "cpu")
    with torch.no_grad():
        run(x[:66])
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        run(x)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put((after - before) / 1024.0)  # ru_maxrss is in KiB on Linux


def peak_memory_mib(name: str, args: argparse.Namespace, device: str) -> float:
    """Peak memory growth of one encode call (MiB): CUDA allocator peak, or RSS in a fresh process on CPU."""
    if device == "cuda":
        x = torch.randn(args.mem_n, args.dim, device=device)
        run = _encoder(name, args, device)
        with torch.no_grad():
            run(x[:66])
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            run(x)
            torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_child, args=(name, vars(args), queue))
    proc.start()
    proc.join(timeout=300)
    return float(queue.get(timeout=5)) if proc.exitcode == 0 else float("nan")


class _AE(nn.Module):
    """Encoder MLP -> quantiser -> decoder MLP, the same for every quantiser compared."""

    def __init__(self, in_dim: int, args: argparse.Namespace, quantizer: str) -> None:
        super().__init__()
        self.enc = PerSourceMLP(1, [in_dim, 256, args.dim])
        self.dec = PerSourceMLP(1, [args.dim, 256, in_dim])
        self.kind = quantizer
        if quantizer == "ResidualVQ":
            from vector_quantize_pytorch import ResidualVQ

            self.rvq = ResidualVQ(dim=args.dim, num_quantizers=args.levels, codebook_size=args.codebook)
        else:
            update = "ema" if "EMA" in quantizer else "loss"
            cfg = TokenizerConfig(n_shared=args.levels, n_specific=0, shared_size=args.codebook, latent_dim=args.dim,
                                  codebook_update=update)
            self.q = MultiViewQuantizer(cfg, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.enc(x[None])
        if self.kind == "ResidualVQ":
            zq, _, commit = self.rvq(z)
            vq = commit.sum()
        else:
            out = self.q(z, torch.ones(z.shape[:2], dtype=torch.bool, device=x.device))
            zq, vq = z + (out.quantized - z).detach(), out.loss
        return ((self.dec(zq)[0] - x) ** 2).mean() + vq


TRAINERS = ("ours (loss codebooks)", "ours (EMA codebooks)", "ResidualVQ")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison and print the tables; returns the numbers."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=15360, help="vectors to encode (a multiple of 3)")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--levels", type=int, default=6)
    parser.add_argument("--codebook", type=int, default=256)
    parser.add_argument("--batch", type=int, default=256, help="train-step batch")
    parser.add_argument("--in-dim", type=int, default=384, help="train-step input width (MiniLM)")
    parser.add_argument("--repeats", type=int, default=15, help="timings are best-of-repeats, interleaved")
    parser.add_argument("--mem-n", type=int, default=131070, help="vectors encoded for the peak-memory figure")
    parser.add_argument("--threads", type=int, default=1)
    add_device_arg(parser, default="auto")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    args = parser.parse_args(argv)
    if args.n % 3:
        parser.error("--n must be a multiple of 3 (the multi-view case splits it over 3 sources)")
    args.device = device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"device {device_label(device)}, threads {args.threads}, N={args.n}, dim={args.dim}, levels={args.levels}, "
          f"codebook={args.codebook}, torch {torch.__version__}")
    x = torch.randn(args.n, args.dim, device=device)
    results: dict[str, Any] = {"device": device_label(device), "encode": {}, "train_step": {}, "args": vars(args)}
    runs = {name: _encoder(name, args, device) for name in ENCODERS}
    with torch.no_grad():
        seconds = interleaved_times({n: (lambda r=r: r(x)) for n, r in runs.items()}, args.repeats, device=device)
    for name in ENCODERS:
        mem = float("nan") if args.no_memory else peak_memory_mib(name, args, device)
        results["encode"][name] = {"seconds": seconds[name], "vectors_per_s": args.n / seconds[name], "peak_mib": mem}
    floor = results["encode"]["floor"]["seconds"]
    rvq = results["encode"]["ResidualVQ"]["seconds"]
    print("\nencode (no grad)")
    print(f"{'method':32s} {'ms':>9s} {'vectors/s':>12s} {'vs ResidualVQ':>14s} {'vs floor':>9s} {'peak MiB':>9s}"
          f"  (peak: one encode of {args.mem_n} vectors)")
    for name, r in results["encode"].items():
        print(f"{name:32s} {r['seconds'] * 1e3:9.2f} {r['vectors_per_s']:12.0f} {rvq / r['seconds']:13.2f}x "
              f"{r['seconds'] / floor:8.2f}x {r['peak_mib']:9.1f}")
    xb = torch.randn(args.batch, args.in_dim, device=device)
    steps = {}
    for name in TRAINERS:
        torch.manual_seed(0)
        model = _AE(args.in_dim, args, name).to(device).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

        def step(model: _AE = model, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            model(xb).backward()
            opt.step()
        steps[name] = step
    for name, sec in interleaved_times(steps, args.repeats, device=device).items():
        results["train_step"][name] = {"seconds": sec}
    base = results["train_step"]["ResidualVQ"]["seconds"]
    print(f"\ntrain step (batch {args.batch}, {args.in_dim} -> 256 -> {args.dim} -> quantiser -> 256 -> {args.in_dim})")
    print(f"{'method':32s} {'ms':>9s} {'speed-up vs ResidualVQ':>24s}")
    for name, r in results["train_step"].items():
        print(f"{name:32s} {r['seconds'] * 1e3:9.2f} {base / r['seconds']:23.2f}x")
    print("\n" + json.dumps({k: v for k, v in results.items() if k != "args"}, default=float))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])

"""Where one residual level's encode time goes: the fused score matmul, the argmin, and the alternatives.

Times, interleaved on the same ``[N, d]`` residuals and ``[K, d]`` codebook: the fused ``addmm`` of
``||t||² − 2 r·t`` (with its GFLOP/s), torch's ``argmin`` and ``amin`` over the scores, our exact two-stage
``argmin_last``, and a bf16 matmul of the same shapes (the reduced-precision option we do not take).

    .venv/bin/python benchmarks/tokenizer/nearest_profile.py [--n 15360] [--dim 64] [--codebook 256]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness

import torch

from harness.timing import interleaved_times
from pluribus.tokenizer.rqvae import argmin_last


def main() -> None:
    """Print per-operation milliseconds and ratios."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=15360)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--codebook", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    r = torch.randn(args.n, args.dim, generator=gen)
    table = torch.randn(args.codebook, args.dim, generator=gen)
    t_sq = (table * table).sum(-1)
    scores = torch.addmm(t_sq, r, table.T, alpha=-2.0)
    assert torch.equal(argmin_last(scores), scores.argmin(-1))
    r16, table16 = r.bfloat16(), table.bfloat16()
    times = interleaved_times({
        "fused score addmm (float32)": lambda: torch.addmm(t_sq, r, table.T, alpha=-2.0),
        "torch argmin over scores": lambda: scores.argmin(-1),
        "torch amin over scores": lambda: scores.amin(-1),
        "argmin_last (exact, two-stage)": lambda: argmin_last(scores),
        "bf16 matmul, same shapes": lambda: r16 @ table16.T,
    }, args.repeats)
    flops = 2.0 * args.n * args.dim * args.codebook
    print(f"N={args.n} d={args.dim} K={args.codebook}, threads {args.threads}, best of {args.repeats}")
    for name, sec in times.items():
        extra = f"  {flops / sec / 1e9:6.1f} GFLOP/s" if "matmul" in name or "addmm" in name else ""
        print(f"{name:34s} {sec * 1e3:8.3f} ms{extra}")
    print(f"argmin / argmin_last: {times['torch argmin over scores'] / times['argmin_last (exact, two-stage)']:.2f}x; "
          f"argmin / amin: {times['torch argmin over scores'] / times['torch amin over scores']:.1f}x; "
          f"float32 addmm / bf16 matmul: {times['fused score addmm (float32)'] / times['bf16 matmul, same shapes']:.2f}x")


if __name__ == "__main__":
    main()

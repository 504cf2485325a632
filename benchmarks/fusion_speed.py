"""PrivFusion speed benchmark: fusion wall time vs POT-based OT fusion, by width and number of parties.

Models: MLPs 784-w-w-10 with independent random initialisations (the timing depends on shapes and on
how many coordinate-descent sweeps the matching needs, not on accuracy). For each (width, K):

- ``release``: every party clips and perturbs its weights (hybrid mechanism, eps=4), summed over parties;
- ``PrivFusion match+avg``: Re-Basin-style Hungarian coordinate descent of every party against party 0
  on the released tensors, then averaging;
- ``OT fusion (POT emd)``: OTFusion-style layer-wise exact optimal transport (``ot.emd``) on the same
  released tensors, then averaging;
- ``OT fusion (POT sinkhorn)``: the same with entropic OT (``ot.sinkhorn``, reg 0.05).

Usage:
    .venv/bin/python benchmarks/fusion_speed.py --widths 128 512 2048 --parties 2 8
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pluribus.eval.report import markdown_table
from pluribus.fusion.config import FusionConfig
from pluribus.fusion.descriptors import release_party
from pluribus.fusion.fuse import fuse_releases
from pluribus.fusion.models import MLP
from pluribus.fusion.spec import spec_for
from pluribus.io import write_json
from timing import interleaved_times


def _time(fn: Callable[[], object], repeats: int) -> float:
    return interleaved_times({"fn": fn}, repeats, warmup=False)["fn"]


def main() -> None:
    """Time release, matching and OT fusion over the grid; print a table with ratios."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", nargs="+", type=int, default=[128, 512, 2048])
    ap.add_argument("--parties", nargs="+", type=int, default=[2, 8])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("runs/bench_fusion/speed.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows, records = [], []
    warm = [MLP(784, (16, 16), 10) for _ in range(2)]
    warm_rel = [release_party(m, spec_for(m), FusionConfig(epsilon=4.0), party=f"w{i}") for i, m in enumerate(warm)]
    for solver, reg in [("hungarian", 0.0), ("ot", 0.0), ("ot", 0.05)]:  # imports and first-call costs
        fuse_releases(warm_rel, spec_for(warm[0]), FusionConfig(epsilon=4.0, solver=solver, ot_reg=reg))
    for width in args.widths:
        for k in args.parties:
            models = []
            for i in range(k):
                torch.manual_seed(i)
                models.append(MLP(784, (width, width), 10))
            spec = spec_for(models[0])
            cfg = FusionConfig(epsilon=4.0)
            gens = [torch.Generator().manual_seed(i) for i in range(k)]
            t0 = time.perf_counter()
            releases = [release_party(m, spec, cfg, party=f"p{i}", generator=g)
                        for i, (m, g) in enumerate(zip(models, gens, strict=True))]
            t_release = time.perf_counter() - t0
            t_match = _time(lambda releases=releases, spec=spec: fuse_releases(releases, spec, FusionConfig(epsilon=4.0)),
                            args.repeats)
            t_emd = _time(lambda releases=releases, spec=spec: fuse_releases(releases, spec,
                          FusionConfig(epsilon=4.0, solver="ot")), args.repeats)
            t_sink = _time(lambda releases=releases, spec=spec: fuse_releases(releases, spec,
                           FusionConfig(epsilon=4.0, solver="ot", ot_reg=0.05)), args.repeats)
            rec = {"width": width, "K": k, "params_per_party": sum(p.numel() for p in models[0].parameters()),
                   "release_s": t_release, "privfusion_match_avg_s": t_match, "ot_emd_s": t_emd,
                   "ot_sinkhorn_s": t_sink}
            records.append(rec)
            rows.append({"width": width, "K": k, "release (s)": f"{t_release:.3f}",
                         "PrivFusion match+avg (s)": f"{t_match:.3f}", "OT emd (s)": f"{t_emd:.3f}",
                         "OT sinkhorn (s)": f"{t_sink:.3f}", "OT emd / PrivFusion": f"{t_emd / t_match:.2f}",
                         "OT sinkhorn / PrivFusion": f"{t_sink / t_match:.2f}"})
            print(rows[-1], flush=True)
    # scaling exponents (log-log slope over widths) per method and K
    scale_rows = []
    for k in args.parties:
        recs = [r for r in records if r["K"] == k]
        if len(recs) >= 2:
            w = np.log([r["width"] for r in recs])
            row = {"K": k}
            for key, name in [("privfusion_match_avg_s", "PrivFusion"), ("ot_emd_s", "OT emd"),
                              ("ot_sinkhorn_s", "OT sinkhorn"), ("release_s", "release")]:
                row[f"{name} exponent"] = f"{np.polyfit(w, np.log([r[key] for r in recs]), 1)[0]:.2f}"
            scale_rows.append(row)
    write_json(args.out, {"records": records, "args": {k: str(v) for k, v in vars(args).items()}})
    print(markdown_table(rows))
    if scale_rows:
        print("\nScaling: time ~ width^exponent (log-log fit over the widths run)\n")
        print(markdown_table(scale_rows))


if __name__ == "__main__":
    main()

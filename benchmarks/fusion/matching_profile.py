"""Where weight matching spends its time, and what the alternatives to the shipped fast path would give.

Same set-up as ``fusion/speed.py`` (K party MLPs 784-w-w-10 trained on IID shares of MNIST, one seeded
hybrid release each at the given epsilon). For parties 1..K-1 matched to party 0 it prints:

1. the plain path (``weight_matching_reference``): seconds in rebuilding similarity matrices vs in
   ``linear_sum_assignment``;
2. every assignment problem of the fast path solved as is vs on the reduced copy (``max_assignment``),
   best of 3 each, and whether the answers agree;
3. float64 vs float32 cost products (``WeightMatcher(dtype=...)``): time and differing permutation entries;
4. stopping after ``max_sweeps`` sweeps, and the forward start: matching objective, solves, fused accuracy.

Usage (the docs' run):
    nice -n 10 .venv/bin/python benchmarks/fusion/matching_profile.py --width 512 --parties 3
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

import pluribus.fusion.core.matching as matching
from pluribus.eval.report import markdown_table
from pluribus.fusion.core.config import FusionConfig
from pluribus.fusion.core.descriptors import release_party
from pluribus.fusion.core.fuse import load_fused
from pluribus.fusion.core.models import accuracy
from pluribus.fusion.core.spec import apply_perms, spec_for
from pluribus.fusion.studies.experiment import load_images, model_factory, split_images, train_parties


def _best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    """Run the four measurements and print them."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--parties", type=int, default=3)
    ap.add_argument("--epsilon", type=float, default=4.0)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    x, y = load_images("mnist")
    split = split_images(x.reshape(x.shape[0], -1), y, seed=args.seed)
    k, w = args.parties, args.width
    parts = np.array_split(np.random.default_rng(args.seed).permutation(len(split.y_train)), k)
    models = train_parties(model_factory("mlp", 28, (w, w)), split.x_train, split.y_train, parts,
                           same_init=False, epochs=args.epochs, seed=args.seed)
    spec = spec_for(models[0])
    cfg = FusionConfig(epsilon=args.epsilon, noise_seed=args.seed * 1000 + w + k)
    rel = [release_party(m, spec, cfg, party=f"p{i}").params for i, m in enumerate(models)]
    ref, others = rel[0], rel[1:]

    # 1. the plain path: similarity rebuilds vs assignment solves
    spent = {"similarity": 0.0, "assignment": 0.0}
    orig_sim, orig_lsa = matching.similarity_matrix, matching.linear_sum_assignment

    def timed(key, fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            spent[key] += time.perf_counter() - t0
            return out
        return wrapper

    matching.similarity_matrix = timed("similarity", orig_sim)
    matching.linear_sum_assignment = timed("assignment", orig_lsa)
    t0 = time.perf_counter()
    for j, other in enumerate(others, start=1):
        matching.weight_matching_reference(spec, ref, other, seed=j)
    total = time.perf_counter() - t0
    matching.similarity_matrix, matching.linear_sum_assignment = orig_sim, orig_lsa
    print(f"\n1. plain path, {k - 1} parties: {total:.3f} s; similarity rebuilds {spent['similarity']:.3f} s "
          f"({100 * spent['similarity'] / total:.0f} %), assignment solves {spent['assignment']:.3f} s "
          f"({100 * spent['assignment'] / total:.0f} %)")

    # 2. the fast path's assignment problems, as is vs reduced
    captured: list[np.ndarray] = []
    orig_max = matching.max_assignment

    def capture(c):
        captured.append(c.copy())
        return orig_max(c)

    matching.max_assignment = capture
    for j, other in enumerate(others, start=1):
        matching.weight_matching(spec, ref, other, seed=j)
    matching.max_assignment = orig_max
    raw = sum(_best_of(lambda c=c: linear_sum_assignment(c, maximize=True)) for c in captured)
    red = sum(_best_of(lambda c=c: orig_max(c)) for c in captured)
    agree = all(np.array_equal(linear_sum_assignment(c, maximize=True)[1], orig_max(c)) for c in captured)
    print(f"2. {len(captured)} assignment problems: as is {raw:.3f} s, reduced {red:.3f} s "
          f"({raw / red:.2f}x), same answers: {agree}")

    # 3. float64 vs float32 products
    rows = []
    for j, other in enumerate(others, start=1):
        out = {}
        for dtype in (torch.float64, torch.float32):
            t0 = time.perf_counter()
            out[dtype] = matching.WeightMatcher(spec, ref, dtype=dtype).match(other, seed=j)
            out[str(dtype)] = time.perf_counter() - t0
        diff = sum(int((out[torch.float64][n] != out[torch.float32][n]).sum()) for n in spec.sizes)
        rows.append({"party": j, "float64 (s)": f"{out['torch.float64']:.3f}",
                     "float32 (s)": f"{out['torch.float32']:.3f}", "differing perm entries": diff})
    print("\n3. float64 vs float32 cost products\n")
    print(markdown_table(rows))

    # 4. stopping early, and the forward start
    def objective(other, perms):
        aligned = apply_perms(spec, other, perms)
        keys = {r.param for refs in spec.axes.values() for r in refs if r.param in ref}
        return sum(float((ref[key].double() * aligned[key].double()).sum()) for key in keys)

    rows = []
    for start, sweeps in [("identity", 1), ("identity", 3), ("identity", 5), ("identity", 8), ("identity", 100),
                          ("forward", 100)]:
        matcher = matching.WeightMatcher(spec, ref)
        aligned, obj = [ref], 0.0
        for j, other in enumerate(others, start=1):
            perms = matcher.match(other, seed=j, max_sweeps=sweeps, start=start)
            aligned.append(apply_perms(spec, other, perms))
            obj += objective(other, perms)
        acc = accuracy(load_fused(models[0], matching.average(aligned)), split.x_test, split.y_test)
        rows.append({"start": start, "max_sweeps": sweeps, "objective": f"{obj:.1f}",
                     "solves": matcher.stats["solves"] + matcher.stats["start_solves"], "fused accuracy": f"{acc:.3f}"})
    print("\n4. stopping early and the forward start (sum over parties)\n")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()

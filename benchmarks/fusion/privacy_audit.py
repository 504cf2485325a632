"""Audit PrivFusion's release mechanisms as an adversary would: statistics, epsilon lower bounds, seeds, floats.

For every mechanism and epsilon:

- **bias** (z-score of the mean against the input) and **variance** against the exact formula, at three inputs;
- **histogram and threshold tests**: the two extreme inputs ``lo`` and ``hi`` are released ``n`` times each; for
  every output bin (and every threshold ``y > t``) the ratio of Clopper-Pearson bounds gives an epsilon that the
  mechanism provably exceeds with 95% confidence if it were broken (``eps_lb = log(lower(p_a) / upper(p_b))``).
  A correct mechanism has every lower bound at or below its epsilon; a tight audit has the best one close to it.

Then, for the noise source and the floating-point representation:

- **seed recovery**: a release made with an explicit seed is found by trying seeds (the check has power); a
  release from the operating system's CSPRNG matches none of the same seeds;
- **float attack** (Mironov 2012): the textbook floating-point Laplace sampler ``x - b sign(u) log(1 - 2|u|)`` is
  attacked by testing, for an output ``y`` and a candidate input ``x``, whether some 53-bit ``u`` reproduces ``y``
  exactly. Between two inputs only ``2^-20`` of the clip range apart (a change DP says should be invisible), the
  attack tells them apart almost always; against our lattice release the same two inputs give outputs on the same
  lattice, and the attacker's best test (exact-value likelihood ratio) stays at chance.

Then, for what happens around one release:

- **composition**: the same weight (the two extreme inputs) released k = 1, 2, 4, 8 times; the attacker sums the
  k releases' exact log-likelihood ratios (the most powerful test) and thresholds it. The empirical lower bound
  must grow with k (repeated releases do leak more: the reason a party keeps an odometer) and never exceed the
  composed total k * epsilon that the odometer reports;
- **hub inventory**: a small fusion on Flower's in-process grid in which one party's data file is broken and
  one party's budget is spent; every field of every reply the hub receives must be public or in the ledger
  (``apps.reply_leaks``), and the refusals must be fixed codes.

Run: ``python benchmarks/fusion/privacy_audit.py`` (full table, ~5 min on 2 cores) or ``--small`` (the CI version).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import Counter

import numpy as np
import torch
from scipy.stats import beta

from pluribus.fusion.privacy.ldp import MECHANISMS, make_mechanism
from pluribus.fusion.privacy.noise import SeededNoise, SystemNoise

CONFIDENCE = 0.95


def clopper_pearson(k: np.ndarray, n: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided (1 - alpha) Clopper-Pearson interval for k successes out of n."""
    lower = np.where(k > 0, beta.ppf(alpha / 2, k, n - k + 1), 0.0)
    upper = np.where(k < n, beta.ppf(1 - alpha / 2, k + 1, n - k), 1.0)
    return lower, upper


def eps_lower_bound(a: np.ndarray, b: np.ndarray, edges: np.ndarray, alpha: float) -> float:
    """Largest Clopper-Pearson epsilon lower bound over bins, both directions (Bonferroni over the bins)."""
    n = len(a)
    ca, _ = np.histogram(a, edges)
    cb, _ = np.histogram(b, edges)
    corrected = alpha / max(1, 2 * len(ca))
    la, ua = clopper_pearson(ca, n, corrected)
    lb, ub = clopper_pearson(cb, n, corrected)
    with np.errstate(divide="ignore"):
        best = max(np.max(np.log(np.maximum(la, 1e-300) / ub)), np.max(np.log(np.maximum(lb, 1e-300) / ua)))
    return float(max(best, 0.0))


def threshold_lower_bound(a: np.ndarray, b: np.ndarray, thresholds: np.ndarray, alpha: float) -> float:
    """Largest epsilon lower bound over the events ``y > t`` and ``y <= t``."""
    n = len(a)
    ka = (a[None, :] > thresholds[:, None]).sum(1)
    kb = (b[None, :] > thresholds[:, None]).sum(1)
    corrected = alpha / max(1, 4 * len(thresholds))
    best = 0.0
    for xa, xb in ((ka, kb), (n - ka, n - kb)):
        la, ua = clopper_pearson(xa, n, corrected)
        lb, ub = clopper_pearson(xb, n, corrected)
        with np.errstate(divide="ignore"):
            best = max(best, float(np.max(np.log(np.maximum(la, 1e-300) / ub))),
                       float(np.max(np.log(np.maximum(lb, 1e-300) / ua))))
    return best


def audit_mechanism(name: str, eps: float, n: int, seed: int) -> dict[str, object]:
    """Bias, variance and epsilon lower bounds of one mechanism at one epsilon."""
    lo, hi = -1.0, 1.0
    mech = make_mechanism(name, eps, lo=lo, hi=hi, delta=1e-5)
    noise = SeededNoise(seed, f"{name}-{eps}")  # an audit needs many draws, not secrecy
    worst_z, worst_var = 0.0, 0.0
    for value in (lo, 0.3, hi):
        x = torch.full((n,), value, dtype=torch.float64)
        out = mech(x, noise=noise).numpy()
        var = float(mech.variance(x[:1]))
        worst_z = max(worst_z, abs(out.mean() - value) / math.sqrt(var / n))
        worst_var = max(worst_var, abs(out.var() / var - 1))
    a = mech(torch.full((n,), lo, dtype=torch.float64), noise=noise).numpy()
    b = mech(torch.full((n,), hi, dtype=torch.float64), noise=noise).numpy()
    both = np.concatenate([a, b])
    if len(np.unique(both)) <= 2:  # Duchi: the two outputs are the only events
        edges = np.array([-np.inf, (lo + hi) / 2, np.inf])
    else:
        qs = np.quantile(both, np.linspace(0.0005, 0.9995, 41))
        edges = np.concatenate([[-np.inf], np.unique(qs), [np.inf]])
    thresholds = np.unique(np.quantile(both, np.linspace(0.001, 0.999, 60)))
    alpha = 1 - CONFIDENCE
    return {
        "mechanism": name, "epsilon": eps, "realised eps": round(mech.realised_epsilon, 6),
        "max |bias z|": round(worst_z, 2), "max |var/theory - 1|": round(worst_var, 4),
        "histogram eps LB": round(eps_lower_bound(a, b, edges, alpha), 3),
        "threshold eps LB": round(threshold_lower_bound(a, b, thresholds, alpha), 3),
    }


def seed_recovery(trials: int) -> dict[str, object]:
    """Try ``trials`` seeds against a seeded release and against a CSPRNG release."""
    mech = make_mechanism("hybrid", 4.0)
    x = torch.linspace(-0.5, 0.5, 256)
    planted = trials // 2
    seeded = mech(x, noise=SeededNoise(planted, "party0"))
    secure = mech(x, noise=SystemNoise())
    found_seeded, found_secure = [], []
    for s in range(trials):
        candidate = mech(x, noise=SeededNoise(s, "party0"))
        if torch.equal(candidate, seeded):
            found_seeded.append(s)
        if torch.equal(candidate, secure):
            found_secure.append(s)
    return {"seeds tried": trials, "seeded release: seeds that reproduce it": found_seeded,
            "CSPRNG release: seeds that reproduce it": found_secure}


def textbook_laplace(x: float, b: float, u: np.ndarray) -> np.ndarray:
    """The floating-point Laplace sampler the attack targets (u uniform on the 53-bit grid in [0, 1))."""
    v = u - 0.5
    return x - b * np.sign(v) * np.log1p(-2 * np.abs(v))


def reachable(y: np.ndarray, x: float, b: float, width: int = 6) -> np.ndarray:
    """Mironov's test: does some 53-bit u near the inverse CDF map candidate input x exactly to y?"""
    r = y - x
    v = np.sign(r) * -np.expm1(-np.abs(r) / b) / 2  # ideal v = u - 1/2 for noise r
    grid = np.round((v + 0.5) * 2.0**53)
    hit = np.zeros(len(y), dtype=bool)
    for d in range(-width, width + 1):
        u = np.clip(grid + d, 0, 2.0**53 - 1) / 2.0**53
        hit |= textbook_laplace(x, b, u) == y
    return hit


def float_attack(n: int, eps: float = 1.0) -> list[dict[str, object]]:
    """Distinguish inputs x0 = 0 and x1 = 2^-20 (of a clip range of 2) from one release of each."""
    x0, x1 = 0.0, 2.0 * 2.0**-20
    b = 2.0 / eps
    rng = np.random.default_rng(0)

    def grid_uniform(m: int) -> np.ndarray:
        return rng.integers(0, 2**53, size=m).astype(np.float64) / 2.0**53

    y0, y1 = textbook_laplace(x0, b, grid_uniform(n)), textbook_laplace(x1, b, grid_uniform(n))
    # guess x0 exactly when x0 reaches y and x1 does not; otherwise guess x1
    guess0_on_y0 = reachable(y0, x0, b) & ~reachable(y0, x1, b)
    guess0_on_y1 = reachable(y1, x0, b) & ~reachable(y1, x1, b)
    textbook_acc = 0.5 * (guess0_on_y0.mean() + (1 - guess0_on_y1.mean()))

    mech = make_mechanism("laplace", eps, lo=-1.0, hi=1.0)
    noise = SeededNoise(1, "float-attack")
    train0 = Counter(mech(torch.full((n,), x0, dtype=torch.float64), noise=noise).numpy().tolist())
    train1 = Counter(mech(torch.full((n,), x1, dtype=torch.float64), noise=noise).numpy().tolist())
    test0 = mech(torch.full((n,), x0, dtype=torch.float64), noise=noise).numpy()
    test1 = mech(torch.full((n,), x1, dtype=torch.float64), noise=noise).numpy()

    def says_x0(values: np.ndarray) -> np.ndarray:  # exact-value likelihood ratio, ties to x1
        return np.array([train0.get(v, 0) > train1.get(v, 0) for v in values.tolist()])

    ours_acc = 0.5 * (says_x0(test0).mean() + (1 - says_x0(test1).mean()))
    bound = math.exp(eps * (x1 - x0) / 2.0) / (1 + math.exp(eps * (x1 - x0) / 2.0))
    return [
        {"sampler": "textbook float Laplace", "attack": "exact reachability (Mironov)",
         "accuracy": round(float(textbook_acc), 4), "DP bound on accuracy": round(bound, 4)},
        {"sampler": "pluribus lattice Laplace", "attack": "exact-value likelihood ratio",
         "accuracy": round(float(ours_acc), 4), "DP bound on accuracy": round(bound, 4)},
    ]


def composition(n: int, eps: float = 0.5, ks: tuple[int, ...] = (1, 2, 4, 8)) -> list[dict[str, object]]:
    """Empirical epsilon lower bound from k releases of one weight (Laplace at ``eps``), against k * eps."""
    lo, hi = -1.0, 1.0
    mech = make_mechanism("laplace", eps, lo=lo, hi=hi)
    noise = SeededNoise(7, "composition")
    rate = mech.realised_epsilon / (hi - lo)  # the discrete Laplace's log-likelihood ratio per unit of output
    rows = []
    for k in ks:
        a = mech(torch.full((n * k,), lo, dtype=torch.float64), noise=noise).numpy().reshape(n, k)
        b = mech(torch.full((n * k,), hi, dtype=torch.float64), noise=noise).numpy().reshape(n, k)
        llr_a, llr_b = (rate * (np.abs(v - hi) - np.abs(v - lo)).sum(1) for v in (a, b))
        both = np.concatenate([llr_a, llr_b])
        thresholds = np.unique(np.quantile(both, np.linspace(0.001, 0.999, 60)))
        rows.append({"releases k": k, "epsilon per release": eps, "reported total": round(k * mech.realised_epsilon, 6),
                     "eps LB from the k releases": round(threshold_lower_bound(llr_a, llr_b, thresholds,
                                                                                1 - CONFIDENCE), 3)})
    return rows


def hub_inventory() -> dict[str, object]:
    """Every reply the hub receives in a small failing fusion: fields seen, and any not public or ledgered."""
    import tempfile
    from pathlib import Path

    from sklearn.datasets import load_digits

    from pluribus.flower_engines import InProcessGrid
    from pluribus.fusion import MLP, FusionConfig
    from pluribus.fusion.core.models import train_model
    from pluribus.fusion.flower.apps import PartyFiles, make_party_app, reply_leaks, run_fusion_inprocess
    from pluribus.fusion.flower.party_files import save_party_data, save_party_model

    class Recording(InProcessGrid):
        replies: list = []

        def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
            got = list(super().pull_messages(message_ids))
            self.replies.extend(got)
            return got

    x, y = load_digits(return_X_y=True)
    x, y = torch.as_tensor(x).float() / 16, torch.as_tensor(y)
    with tempfile.TemporaryDirectory(prefix="hub-inventory-") as tmp:
        parties = []
        for k in range(4):
            idx = torch.arange(k * 100, (k + 1) * 100)
            model = save_party_model(Path(tmp) / f"p{k}" / "model.safetensors",
                                     train_model(MLP(64, (12,), 10), x[idx], y[idx], epochs=1, seed=k))
            parties.append(PartyFiles(f"p{k}", model, save_party_data(Path(tmp) / f"p{k}" / "data.safetensors",
                                                                      x[idx], y[idx]), budget=5.0))
        run_fusion_inprocess(parties[2:], FusionConfig(epsilon=4.5))  # p3 has spent 4.5 of its 5
        parties[2].data.write_bytes(b"broken")  # then p2's data breaks: a party error
        cfg = FusionConfig(epsilon=1.0)  # p0 and p1 fuse; p2 fails; p3 refuses (5.5 > 5)
        grid = Recording(make_party_app(cfg), 4, node_configs=[p.node_config(k) for k, p in enumerate(parties)])
        run_fusion_inprocess(parties, cfg, grid=grid)
        fields = sorted({f"{r.metadata.message_type}: " + ("error: " + (r.error.reason or "") if r.has_error()
                                                           else "ok") for r in grid.replies})
        return {"replies": len(grid.replies), "kinds": fields,
                "leaks": [leak for r in grid.replies for leak in reply_leaks(r)]}


def run(n: int, eps_list: list[float], seeds_tried: int, attack_n: int) -> dict[str, object]:
    """The whole audit as a dict of tables."""
    rows = [audit_mechanism(name, eps, n, seed=k) for k, (name, eps) in
            enumerate((m, e) for m in MECHANISMS for e in eps_list)]
    return {"mechanisms": rows, "seeds": seed_recovery(seeds_tried), "float": float_attack(attack_n),
            "composition": composition(n // 4), "hub": hub_inventory()}


def _table(rows: list[dict[str, object]]) -> str:
    from pluribus.eval.report import markdown_table

    return markdown_table(rows)


def main(argv: list[str] | None = None) -> int:
    """Print the audit tables; exit 1 if any check fails."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="the small version run by `make test`")
    ap.add_argument("--n", type=int, default=400_000, help="releases per input and mechanism")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    n = 40_000 if args.small else args.n
    start = time.perf_counter()
    res = run(n, [0.5, 2.0, 8.0], seeds_tried=200 if args.small else 2000, attack_n=5_000 if args.small else 50_000)
    print(f"# Privacy audit (n = {n} releases per input, {CONFIDENCE:.0%} Clopper-Pearson, "
          f"{time.perf_counter() - start:.0f} s)\n")
    print(_table(res["mechanisms"]))  # type: ignore[arg-type]
    print("\n## Seed recovery\n")
    print(res["seeds"])
    print("\n## Float attack\n")
    print(_table(res["float"]))  # type: ignore[arg-type]
    print("\n## Composition: k releases of one weight\n")
    print(_table(res["composition"]))  # type: ignore[arg-type]
    print("\n## Hub inventory\n")
    print(res["hub"])
    failures = check(res)
    for f in failures:
        print("FAIL:", f)
    return 1 if failures else 0


def check(res: dict[str, object]) -> list[str]:
    """The audit's pass/fail rules: lower bounds never above epsilon, no bias, seeds, float attack at chance."""
    failures = []
    for row in res["mechanisms"]:  # type: ignore[union-attr]
        eps = float(row["epsilon"])  # type: ignore[index]
        for key in ("histogram eps LB", "threshold eps LB"):
            if float(row[key]) > eps + 1e-9:  # type: ignore[index]
                failures.append(f"{row['mechanism']} eps={eps}: {key} {row[key]} exceeds epsilon")  # type: ignore[index]
        if float(row["max |bias z|"]) > 5:  # type: ignore[index]
            failures.append(f"{row['mechanism']} eps={eps}: biased (z = {row['max |bias z|']})")  # type: ignore[index]
    seeds = res["seeds"]
    if seeds["CSPRNG release: seeds that reproduce it"] or len(seeds["seeded release: seeds that reproduce it"]) != 1:  # type: ignore[index]
        failures.append(f"seed check: {seeds}")
    textbook, ours = res["float"]  # type: ignore[misc]
    if not textbook["accuracy"] > 0.8:
        failures.append(f"float attack lost its power on the textbook sampler: {textbook}")
    if abs(ours["accuracy"] - 0.5) > 0.02:
        failures.append(f"float attack distinguishes the lattice release: {ours}")
    lbs = [float(r["eps LB from the k releases"]) for r in res["composition"]]  # type: ignore[union-attr, index]
    for r in res["composition"]:  # type: ignore[union-attr]
        if float(r["eps LB from the k releases"]) > float(r["reported total"]) + 1e-9:  # type: ignore[index]
            failures.append(f"composition: {r} exceeds the reported total")
    if not (all(b >= a - 0.1 for a, b in zip(lbs, lbs[1:], strict=False)) and lbs[-1] > lbs[0] + 0.5):
        failures.append(f"composition: the lower bound does not grow with the releases ({lbs}): the check lost power")
    hub = res["hub"]
    if hub["leaks"] or not any("budget-exhausted" in k for k in hub["kinds"]):  # type: ignore[index, union-attr]
        failures.append(f"hub inventory: {hub}")
    return failures


if __name__ == "__main__":
    sys.exit(main())

"""PrivFusion quality benchmark: fused test accuracy vs epsilon, side by side with its peers, in one process.

For every (dataset, seed, init regime, K, Dirichlet alpha) it trains K party MLPs once (cached for the
run) and evaluates on a held-out test set:

- each party alone (mean and best), the softmax ensemble of the clean party models (upper bound, not private);
- without DP: plain weight averaging, OT fusion (POT, OTFusion-style), matched averaging (Re-Basin-style
  Hungarian), matched averaging + adapter;
- at each finite epsilon: noisy averaging (same mechanism and clipping, no matching), PrivFusion without
  and with the perturbation filter adapter, and the agreement of the permutations found from noisy vs clean
  weights (party 1 against party 0);
- on the very same releases, without adapter: OT fusion (``solver="ot"``) and PrivFusion with the original
  Re-Basin descent (identity start, ``match_tol=0``; the default before the forward start), and the latter
  without DP too ("matched averaging, original descent");
- controls that show what the adapter alone can do: an MLP trained from scratch on the calibration set,
  and the same adapter trained on a random, unfused model.

The calibration set (default 200 examples) is held out from party data and test data, and treated as
public: the adapter adds no privacy cost here.

Usage (the docs' run):
    PLURIBUS_PROGRESS=0 .venv/bin/python benchmarks/fusion/quality.py --out runs/bench_fusion/quality.json
Quick check:
    .venv/bin/python benchmarks/fusion/quality.py --datasets digits --parties 2 --alphas 0.5 --seeds 0 --eps 1 inf
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from pluribus.data.partition import dirichlet_partition
from pluribus.eval.report import line_plot, markdown_table, mean_std
from pluribus.fusion.core.adapter import fit_adapter
from pluribus.fusion.core.config import AdapterConfig, FusionConfig
from pluribus.fusion.core.descriptors import release_party
from pluribus.fusion.core.fuse import fuse_releases, load_fused
from pluribus.fusion.core.matching import weight_matching
from pluribus.fusion.core.models import accuracy, ensemble_accuracy, train_model
from pluribus.fusion.core.spec import spec_for
from pluribus.fusion.studies.experiment import load_images, model_factory, split_images, train_parties
from pluribus.io import write_json, write_text

HIDDEN = {"mnist": (256, 256), "digits": (64, 64)}


def _eps_label(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


def _fused_accuracy(releases, spec, cfg: FusionConfig, weights, template, calib_x, xt, yt) -> float:
    """Test accuracy of ``releases`` fused under ``cfg`` (no adapter): a peer arm on the very same releases."""
    return accuracy(load_fused(template, fuse_releases(releases, spec, cfg, weights=weights), calib_x=calib_x), xt, yt)


def run_group(split, factory, parts, args, eps_list, seed):
    """All methods for one set of party models; returns {method: {eps_label: acc}} and extras."""
    models = train_parties(factory, split.x_train, split.y_train, parts, same_init=args.same_init_flag,
                           epochs=args.epochs, seed=seed)
    xt, yt = split.x_test, split.y_test
    calib = (split.x_calib, split.y_calib)
    spec = spec_for(models[0])
    weights = [float(len(p)) for p in parts]
    accs = [accuracy(m, xt, yt) for m in models]
    out: dict[str, dict[str, float]] = defaultdict(dict)
    out["party alone (mean)"]["inf"] = float(np.mean(accs))
    out["party alone (best)"]["inf"] = float(np.max(accs))
    out["ensemble (upper bound)"]["inf"] = ensemble_accuracy(models, xt, yt)
    adapter_cfg = AdapterConfig(epochs=args.adapter_epochs, seed=seed)
    extras: dict[str, dict[str, float]] = defaultdict(dict)

    def evaluate(cfg: FusionConfig, label: str, *, with_adapter: bool):
        t0 = time.perf_counter()
        releases = [release_party(m, spec, cfg, party=f"p{k}") for k, m in enumerate(models)]
        fused = fuse_releases(releases, spec, cfg, weights=weights)
        model = load_fused(models[0], fused, calib_x=calib[0])
        fuse_s = time.perf_counter() - t0
        acc = accuracy(model, xt, yt)
        acc_ad = None
        if with_adapter:
            adapted, _, _ = fit_adapter(copy.deepcopy(model), calib[0], calib[1], adapter_cfg)
            acc_ad = accuracy(adapted, xt, yt)
        extras["fuse_seconds"][label] = fuse_s
        return acc, acc_ad, releases

    clean = FusionConfig(epsilon=math.inf)
    out["plain averaging"]["inf"], _, _ = evaluate(clean.__class__(epsilon=math.inf, solver="identity"), "avg",
                                                   with_adapter=False)
    out["OT fusion (POT)"]["inf"], _, _ = evaluate(FusionConfig(epsilon=math.inf, solver="ot"), "ot",
                                                   with_adapter=False)
    acc, acc_ad, clean_rel = evaluate(clean, "match", with_adapter=True)
    out["matched averaging, original descent"]["inf"] = _fused_accuracy(
        clean_rel, spec, dataclasses.replace(clean, match_start="identity", match_tol=0.0), weights, models[0],
        calib[0], xt, yt)
    out["matched averaging"]["inf"] = acc
    out["matched averaging + adapter"]["inf"] = acc_ad
    clean_perm = weight_matching(spec, clean_rel[0].params, clean_rel[1].params)
    for eps in eps_list:
        if math.isinf(eps):
            continue
        lab = _eps_label(eps)
        # a study, not a release: both arms see the same (seeded, hence not private) noise, so they are paired
        noise_seed = seed * 7919 + int(eps * 100)
        noisy_cfg = FusionConfig(epsilon=eps, mechanism=args.mechanism, solver="identity", noise_seed=noise_seed)
        out["noisy averaging"][lab], acc_ad_avg, _ = evaluate(noisy_cfg, f"noisy_avg_{lab}", with_adapter=True)
        out["noisy averaging + adapter"][lab] = acc_ad_avg
        pf_cfg = FusionConfig(epsilon=eps, mechanism=args.mechanism, solver="hungarian", noise_seed=noise_seed)
        acc, acc_ad, rels = evaluate(pf_cfg, f"privfusion_{lab}", with_adapter=True)
        out["PrivFusion (no adapter)"][lab] = acc
        out["PrivFusion + adapter"][lab] = acc_ad
        # the same releases fused by the peers: the original Re-Basin descent (identity start, tol 0) and OT emd
        orig_cfg = dataclasses.replace(pf_cfg, match_start="identity", match_tol=0.0)
        out["PrivFusion, original descent (no adapter)"][lab] = _fused_accuracy(rels, spec, orig_cfg, weights,
                                                                              models[0], calib[0], xt, yt)
        out["OT fusion of the releases (no adapter)"][lab] = _fused_accuracy(
            rels, spec, dataclasses.replace(pf_cfg, solver="ot"), weights, models[0], calib[0], xt, yt)
        noisy_perm = weight_matching(spec, rels[0].params, rels[1].params)
        agree = np.mean([float((noisy_perm[n] == clean_perm[n]).float().mean()) for n in spec.order])
        extras["perm_agreement"][lab] = float(agree)
    return out, extras


def controls(split, factory, args, seed):
    """Calibration-set-only model, and the adapter on a random unfused model."""
    torch.manual_seed(seed + 12345)
    scratch = train_model(factory(), split.x_calib, split.y_calib, epochs=max(args.epochs, 50), seed=seed)
    torch.manual_seed(seed + 54321)
    random_model = factory().eval()
    adapted, _, _ = fit_adapter(random_model, split.x_calib, split.y_calib,
                                AdapterConfig(epochs=args.adapter_epochs, seed=seed))
    return {
        "calibration set only (from scratch)": accuracy(scratch, split.x_test, split.y_test),
        "adapter on a random model": accuracy(adapted, split.x_test, split.y_test),
    }


def main() -> None:
    """Run the grid and print summary tables."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["digits", "mnist"])
    ap.add_argument("--parties", nargs="+", type=int, default=[2, 4, 8])
    ap.add_argument("--alphas", nargs="+", type=float, default=[0.1, 0.5])
    ap.add_argument("--eps", nargs="+", type=float, default=[0.5, 1, 2, 4, 8, math.inf])
    ap.add_argument("--inits", nargs="+", default=["different", "same"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--adapter-epochs", type=int, default=100)
    ap.add_argument("--calib-size", type=int, default=200)
    ap.add_argument("--mechanism", default="hybrid")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_fusion/quality.json"))
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--summarise-only", action="store_true", help="Only print the tables of an existing --out.")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    records = []
    if args.out.exists():
        records = json.loads(args.out.read_text())["records"]
    done = {(r["dataset"], r["seed"], r["init"], r["K"], r["alpha"]) for r in records}
    control_records = json.loads(args.out.read_text())["controls"] if args.out.exists() else []
    if args.summarise_only:
        print(summarise(records, control_records, args))
        return
    done_controls = {(c["dataset"], c["seed"]) for c in control_records}
    t_start = time.perf_counter()
    data = {name: load_images(name) for name in args.datasets}
    for seed in args.seeds:  # seeds outermost: a run cut short still covers every configuration
        for dataset in args.datasets:
            x, y = data[dataset]
            factory = model_factory("mlp", x.shape[-1], HIDDEN[dataset])
            split = split_images(x, y, calib_size=args.calib_size, seed=seed)
            if (dataset, seed) not in done_controls:
                control_records.append({"dataset": dataset, "seed": seed, **controls(split, factory, args, seed)})
            for init in args.inits:
                args.same_init_flag = init == "same"
                for k in args.parties:
                    for alpha in args.alphas:
                        key = (dataset, seed, init, k, alpha)
                        if key in done:
                            continue
                        parts = dirichlet_partition(split.y_train.numpy(), k, alpha=alpha, seed=seed)
                        t0 = time.perf_counter()
                        res, extras = run_group(split, factory, parts, args, args.eps, seed)
                        records.append({"dataset": dataset, "seed": seed, "init": init, "K": k, "alpha": alpha,
                                        "acc": res, "extras": extras, "seconds": time.perf_counter() - t0})
                        write_json(args.out, {"records": records, "controls": control_records, "args": {
                            k2: (str(v) if isinstance(v, Path) else v) for k2, v in vars(args).items()}})
                        print(f"[{time.perf_counter() - t_start:7.1f}s] {dataset} seed={seed} {init}-init K={k} "
                              f"alpha={alpha}: ensemble {res['ensemble (upper bound)']['inf']:.3f} "
                              f"match {res['matched averaging']['inf']:.3f} avg {res['plain averaging']['inf']:.3f}",
                              flush=True)
    write_json(args.out, {"records": records, "controls": control_records,
                          "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}})
    summary = summarise(records, control_records, args)
    write_text(args.out.with_suffix(".md"), summary)
    print(summary)


METHOD_ORDER = [
    "party alone (mean)", "party alone (best)", "ensemble (upper bound)", "plain averaging", "OT fusion (POT)",
    "matched averaging, original descent", "matched averaging", "matched averaging + adapter", "noisy averaging",
    "noisy averaging + adapter", "OT fusion of the releases (no adapter)", "PrivFusion, original descent (no adapter)",
    "PrivFusion (no adapter)", "PrivFusion + adapter",
]


def summarise(records, control_records, args) -> str:
    """Markdown tables: per (dataset, init) mean ± std over seeds, K and alpha pooled or split."""
    eps_labels = [_eps_label(e) for e in args.eps]
    lines = []
    groups = defaultdict(list)
    for r in records:
        groups[(r["dataset"], r["init"], r["K"], r["alpha"])].append(r)
    by_di = defaultdict(list)
    for r in records:
        by_di[(r["dataset"], r["init"])].append(r)
    for (dataset, init), recs in sorted(by_di.items()):
        lines.append(f"\n### {dataset}, {init} init: test accuracy, mean ± std over "
                     f"{len(recs)} runs (seeds x K x alpha pooled)\n")
        rows = []
        for method in METHOD_ORDER:
            row = {"method": method}
            for lab in eps_labels:
                vals = [r["acc"][method][lab] for r in recs if lab in r["acc"].get(method, {})]
                row[f"eps={lab}"] = mean_std(vals) if vals else ""
            rows.append(row)
        lines.append(markdown_table(rows))
    lines.append("\n### Per K and alpha (mean over seeds): ratio of PrivFusion + adapter to the ensemble, "
                 "and matched vs plain averaging without DP\n")
    rows = []
    for (dataset, init, k, alpha), recs in sorted(groups.items()):
        row = {"dataset": dataset, "init": init, "K": k, "alpha": alpha, "seeds": len(recs)}
        ens = np.mean([r["acc"]["ensemble (upper bound)"]["inf"] for r in recs])
        row["ensemble"] = f"{ens:.3f}"
        row["plain avg"] = f"{np.mean([r['acc']['plain averaging']['inf'] for r in recs]):.3f}"
        row["OT"] = f"{np.mean([r['acc']['OT fusion (POT)']['inf'] for r in recs]):.3f}"
        row["matched"] = f"{np.mean([r['acc']['matched averaging']['inf'] for r in recs]):.3f}"
        for lab in eps_labels:
            if lab == "inf":
                continue
            pf = np.mean([r["acc"]["PrivFusion + adapter"][lab] for r in recs])
            row[f"PF+ad/ens eps={lab}"] = f"{pf / ens:.3f}"
        rows.append(row)
    lines.append(markdown_table(rows))
    if control_records:
        lines.append("\n### Controls (no fusion; what the calibration set alone gives)\n")
        crow = []
        for dataset in sorted({c["dataset"] for c in control_records}):
            cs = [c for c in control_records if c["dataset"] == dataset]
            crow.append({"dataset": dataset, "seeds": len(cs), **{
                k: mean_std([c[k] for c in cs]) for k in cs[0] if k not in ("dataset", "seed")}})
        lines.append(markdown_table(crow))
    agree = defaultdict(list)
    for r in records:
        for lab, v in r["extras"].get("perm_agreement", {}).items():
            agree[(r["dataset"], lab)].append(v)
    if agree:
        lines.append("\n### Permutation agreement, noisy vs clean matching (party 1 to party 0)\n")
        lines.append(markdown_table([{"dataset": d, "eps": lab, "agreement": mean_std(v)}
                                     for (d, lab), v in sorted(agree.items())]))
    if args.plot is not None:
        for dataset in sorted({r["dataset"] for r in records}):
            series = {}
            finite = [e for e in args.eps if not math.isinf(e)]
            for method in ["noisy averaging", "PrivFusion (no adapter)", "PrivFusion + adapter",
                           "noisy averaging + adapter"]:
                recs = [r for r in records if r["dataset"] == dataset and r["init"] == "different"]
                if recs:
                    ys = [float(np.mean([r["acc"][method][_eps_label(e)] for r in recs])) for e in finite]
                    series[method] = (finite, ys)
            for method in ["ensemble (upper bound)", "matched averaging"]:
                recs = [r for r in records if r["dataset"] == dataset and r["init"] == "different"]
                v = float(np.mean([r["acc"][method]["inf"] for r in recs]))
                series[f"{method}, no DP"] = (finite, [v] * len(finite))
            cs = [c["calibration set only (from scratch)"] for c in control_records if c["dataset"] == dataset]
            if cs:
                series["calibration set only, no fusion"] = (finite, [float(np.mean(cs))] * len(finite))
            path = args.plot.with_name(f"{args.plot.stem}_{dataset}{args.plot.suffix}")
            line_plot(path, series, xlabel="per-scalar epsilon", ylabel="test accuracy",
                      title=f"PrivFusion (reconstruction), {dataset}, different init", logx=True)
            lines.append(f"\nplot: {path}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

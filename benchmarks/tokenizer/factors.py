"""A controlled test of shared vs specific codebooks: which layout's codes recover which latent factor?

Data (``pluribus.data.factors``): 3 sources x 32 dims. Every user has a shared factor (4 dims) that drives
all three sources and, per source, a specific factor (4 dims) that drives only that source, mixed through a
fixed random ``tanh`` layer plus noise 0.1. The factors are known by construction, so for each tokenizer we
fit a ridge regression from its codes to each factor on the training users and report held-out R²:

- ``shared R²``: the shared factor (mean over its 4 dims);
- ``specific R²``: each source's own factor (mean over the 3 sources x 4 dims);
- both from the token features (code vectors of every source, concatenated) and from a one-hot bag of codes;
- for ``mrq-stacked``, also from the one-hot codes of its shared levels alone and of its specific levels alone.

Every layout emits 4 codes per source (12 per user, 24 bytes): ``mrq-stacked`` 2 shared + 2 specific levels,
``mrq-union`` 4 levels of 16 shared + 16 own codes, ``shared-only`` 4 shared levels, ``specific-only`` 4
specific levels, ``single-view`` one RQ-VAE with 12 levels on the concatenated 96-d input (latent 3x wider).
``raw vectors`` is the reference (the 96 floats themselves). Same users, splits and seeds for every row.

At the same 24 bytes per user (``--yardsticks``, on by default; ``pluribus.tokenizer.yardsticks``): PCA + int8
(8 coefficients per source), FAISS product quantisation (8 sub-vectors of 8 bits per source), and the RQ-KMeans
tokenizer backend (``rq-kmeans``: 4 per-source levels of 32 codes; ``rq-kmeans-stacked``: 2 shared + 2 per-source
levels; ``rq-kmeans-balanced``: per source, balanced k-means). Every row also reports the held-out users'
reconstruction (relative MSE, 1.0 = predicting the mean; mean over sources).

    .venv/bin/python benchmarks/tokenizer/factors.py [--seeds 0 1 2] [--users 4000] [--epochs 100]
    # the equal-bytes table of docs/results/tokenizer.md:
    nice .venv/bin/python benchmarks/tokenizer/factors.py --seeds 0 1 2 --only mrq-stacked specific-only rq-kmeans rq-kmeans-stacked rq-kmeans-balanced --out runs/bench/tokenizer_factors_yardsticks.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pluribus.data.factors import FactorViews, factor_views
from pluribus.eval.report import markdown_table, mean_std
from pluribus.io import write_json
from pluribus.tokenizer import SourceEmbeddings, TokenizerConfig, UserTokenizer
from pluribus.tokenizer.metrics import reconstruction, token_features
from pluribus.tokenizer.yardsticks import PCAInt8, ProductQuantiser, reconstruction_stats


def r2_scores(features: np.ndarray, data: FactorViews, train: np.ndarray, test: np.ndarray, alpha: float) -> dict[str, float]:
    """Held-out R² of a ridge regression (standardised features; strength by leave-one-out CV on the training
    users over ``alpha`` x 10^-2..10^4) to the shared and to each specific factor."""
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import r2_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def fit(target: np.ndarray) -> float:
        ridge = RidgeCV(alphas=alpha * np.logspace(-2, 4, 13))
        model = make_pipeline(StandardScaler(), ridge).fit(features[train], target[train])
        return float(r2_score(target[test], model.predict(features[test]), multioutput="uniform_average"))

    out = {"shared": fit(data.shared)}
    for name, own in data.specific.items():
        out[f"specific:{name}"] = fit(own)
    out["specific"] = float(np.mean([v for k, v in out.items() if k.startswith("specific:")]))
    return out


def level_columns(level_sizes: tuple[int, ...], n_sources: int, levels: range) -> np.ndarray:
    """Columns of ``token_features(kind='onehot')`` (blocks ordered source, then level) that belong to ``levels``."""
    cols, start = [], 0
    for _ in range(n_sources):
        for lvl, size in enumerate(level_sizes):
            if lvl in levels:
                cols.extend(range(start, start + size))
            start += size
    return np.asarray(cols)


def configs(epochs: int, size: int, latent: int) -> dict[str, tuple[TokenizerConfig, bool]]:
    """name -> (config, single_view); 4 codes per source each."""
    base = TokenizerConfig(shared_size=size, specific_size=size, latent_dim=latent, hidden_dims=(128,), epochs=epochs,
                           collision_suffix=False)
    return {
        "mrq-stacked": (dataclasses.replace(base, n_shared=2, n_specific=2), False),
        "mrq-union": (dataclasses.replace(base, layout="union", n_shared=2, n_specific=2, shared_size=size // 2,
                                          specific_size=size // 2), False),
        "shared-only": (dataclasses.replace(base, n_shared=4, n_specific=0), False),
        "specific-only": (dataclasses.replace(base, n_shared=0, n_specific=4), False),
        "single-view": (dataclasses.replace(base, n_shared=12, n_specific=0, latent_dim=3 * latent,
                                            hidden_dims=(256,)), True),
        "rq-kmeans": (dataclasses.replace(base, backend="rq-kmeans", n_shared=0, n_specific=4), False),
        "rq-kmeans-stacked": (dataclasses.replace(base, backend="rq-kmeans", n_shared=2, n_specific=2), False),
        "rq-kmeans-balanced": (dataclasses.replace(base, backend="rq-kmeans", n_shared=0, n_specific=4,
                                                   kmeans_balanced=True), False),
    }


def yardstick_rows(emb: SourceEmbeddings, data: FactorViews, train: np.ndarray, test: np.ndarray, budget: int,
                   alpha: float) -> dict[str, dict[str, Any]]:
    """PCA + int8 and FAISS PQ at ``budget`` bytes per user: R² from their probe features, held-out reconstruction."""
    rows = {}
    for name, method in (("PCA + int8", PCAInt8(budget)), ("PQ, FAISS (8-bit sub-vectors)", ProductQuantiser(budget))):
        method.fit(emb.subset(train))
        codes = method.encode(emb)
        decoded = method.decode(codes[test])
        recon = [reconstruction_stats(emb.embeddings[s][test], decoded.embeddings[s])["relative_mse"]
                 for s in emb.source_names]
        rows[name] = {"bytes": int(codes.shape[1] * codes.itemsize), "recon_relative_mse": float(np.mean(recon)),
                      "vectors": r2_scores(method.features(codes), data, train, test, alpha)}
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Every layout over the seeds; prints the R² table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--users", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--latent", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=1.0, help="centre of the ridge strength grid")
    parser.add_argument("--yardsticks", action=argparse.BooleanOptionalAction, default=True,
                        help="also PCA + int8 and FAISS PQ at the tokens' 24 bytes per user")
    parser.add_argument("--only", nargs="*", default=None, help="run only these tokenizer configurations")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/tokenizer_factors.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        data = factor_views(args.users, n_sources=3, dim=32, shared_dim=4, specific_dim=4, noise=0.1, seed=seed,
                            mixing_seed=seed)
        ids = np.array([str(i) for i in range(args.users)], dtype=object)
        emb = SourceEmbeddings(ids, data.views, {k: np.ones(args.users, bool) for k in data.views})
        concat = emb.concatenated()
        order = np.random.default_rng(seed).permutation(args.users)
        train, test = np.sort(order[: args.users * 3 // 4]), np.sort(order[args.users * 3 // 4 :])
        raw = concat.embeddings["all"]
        runs.append({"seed": seed, "config": "raw vectors", "bytes": 4 * raw.shape[1],
                     "vectors": r2_scores(raw, data, train, test, args.alpha)})
        if args.yardsticks:  # 4 uint16 codes per source: 24 bytes per user
            for name, row in yardstick_rows(emb, data, train, test, 2 * 4 * len(emb.source_names), args.alpha).items():
                runs.append({"seed": seed, "config": name, **row})
                print(f"seed {seed} {name:14s} shared R² {row['vectors']['shared']:.3f}  specific R² "
                      f"{row['vectors']['specific']:.3f}  recon rel MSE {row['recon_relative_mse']:.3f}", flush=True)
        chosen = {k: v for k, v in configs(args.epochs, args.size, args.latent).items()
                  if not args.only or k in args.only}
        for name, (cfg, single) in chosen.items():
            source = concat if single else emb
            t = time.time()
            tok = UserTokenizer(dataclasses.replace(cfg, seed=seed), progress=False).fit(source.subset(train))
            codes = tok.encode(source)
            fit_seconds = time.time() - t
            recon = reconstruction(tok, source.subset(test))
            run = {
                "seed": seed, "config": name, "fit_seconds": fit_seconds, "bytes": 2 * codes.shape[1] * codes.shape[2],
                "recon_relative_mse": float(np.mean([r["relative_mse"] for r in recon.values()])),
                "vectors": r2_scores(token_features(tok, codes), data, train, test, args.alpha),
                "onehot": r2_scores(token_features(tok, codes, kind="onehot"), data, train, test, args.alpha),
            }
            if name == "mrq-stacked":  # which codebooks hold which factor: probe the two kinds of level apart
                onehot = token_features(tok, codes, kind="onehot")
                for part, levels in (("shared levels", range(cfg.n_shared)),
                                     ("specific levels", range(cfg.n_shared, cfg.n_levels))):
                    cols = level_columns(tok.level_sizes_, len(tok.source_names_), levels)
                    run[part] = r2_scores(onehot[:, cols], data, train, test, args.alpha)
            runs.append(run)
            print(f"seed {seed} {name:14s} fit {run['fit_seconds']:5.1f}s  shared R² {run['vectors']['shared']:.3f}  "
                  f"specific R² {run['vectors']['specific']:.3f}  (one-hot {run['onehot']['shared']:.3f} / "
                  f"{run['onehot']['specific']:.3f})  recon rel MSE {run['recon_relative_mse']:.3f}", flush=True)
    rows = summarise(runs)
    print("\n" + markdown_table(rows, list(dict.fromkeys(k for row in rows for k in row))))
    parts = [{"mrq-stacked codes used": part, "shared R²": mean_std([r[part]["shared"] for r in runs if part in r]),
              "specific R²": mean_std([r[part]["specific"] for r in runs if part in r])}
             for part in ("shared levels", "specific levels") if any(part in r for r in runs)]
    if parts:
        print("\n" + markdown_table(parts))
    out = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs, "summary": rows, "stacked_parts": parts}
    write_json(args.out, out)
    print(f"written {args.out} in {time.time() - t0:.0f}s")
    return out


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std over seeds per configuration."""
    rows = []
    for name in dict.fromkeys(r["config"] for r in runs):
        rs = [r for r in runs if r["config"] == name]
        row: dict[str, Any] = {
            "config": name,
            "bytes/user": f"{rs[0]['bytes']:.0f}",
            "shared R² (vectors)": mean_std([r["vectors"]["shared"] for r in rs]),
            "specific R² (vectors)": mean_std([r["vectors"]["specific"] for r in rs]),
            "recon rel MSE": mean_std([r["recon_relative_mse"] for r in rs]) if "recon_relative_mse" in rs[0] else "",
        }
        if "onehot" in rs[0]:
            row["shared R² (one-hot)"] = mean_std([r["onehot"]["shared"] for r in rs])
            row["specific R² (one-hot)"] = mean_std([r["onehot"]["specific"] for r in rs])
            row["fit s"] = f"{np.mean([r['fit_seconds'] for r in rs]):.0f}"
        rows.append(row)
    return rows


if __name__ == "__main__":
    json.dumps(main(sys.argv[1:]), default=str)

"""U2QT refits on MovieLens-100K: warm start (from the previous codebooks) vs a cold refit; code churn and quality.

Per seed: users are split 80/20 (train/test). The *old* tokenizer is fitted on a random half of the training
users (yesterday's data); the refits see all training users (today's data, twice as many users):

- ``cold refit``: a fresh tokenizer, another seed, ``--epochs`` epochs (what one does without warm start);
- ``warm, anchor w``: ``fit(..., warm_start=old)`` for ``--warm-epochs`` epochs with ``anchor_weight=w``
  (0: plain continued training; w > 0 also keeps the new latents near the old ones).

Code churn (``metrics.code_churn``) compares the old and the new tokenizer's codes of all 943 users. Quality is
the token probe AUC (7 tasks, logistic regression fitted on the training users, scored on the test users) and
the reconstruction cosine on the test users. Stacked 4+2 layout, 64 codes x 64 dims, 3 text sources (MiniLM).

    .venv/bin/python benchmarks/tokenizer/refit.py [--seeds 0 1 2] [--epochs 200] [--warm-epochs 50]
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
from quality import probe_all

from pluribus.data.locate import data_home
from pluribus.data.movielens import load_movielens
from pluribus.data.split import split_indices
from pluribus.eval.report import markdown_table, mean_std
from pluribus.io import write_json
from pluribus.tokenizer import EmbedConfig, TokenizerConfig, UserTokenizer, embed_dataset
from pluribus.tokenizer.metrics import code_churn, codebook_usage, reconstruction, token_features


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the refit arms over the seeds and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=200, help="epochs of the old fit and of the cold refit")
    parser.add_argument("--warm-epochs", type=int, default=50)
    parser.add_argument("--anchors", type=float, nargs="+", default=[0.0, 1.0, 10.0])
    parser.add_argument("--c", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/tokenizer_refit.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    ds = load_movielens()
    emb = embed_dataset(ds, EmbedConfig(), cache_dir=data_home() / "embeddings", include_profile=False)
    base = TokenizerConfig(n_shared=4, n_specific=2, shared_size=64, specific_size=64, latent_dim=64,
                           hidden_dims=(256,), epochs=args.epochs, collision_suffix=False)
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        train, test = split_indices(ds.n_users, (0.8, 0.2), seed=seed)
        half = np.random.default_rng(seed).permutation(train)[: len(train) // 2]
        old = UserTokenizer(dataclasses.replace(base, seed=seed), progress=False).fit(emb.subset(half))
        old_codes = old.encode(emb)
        arms: dict[str, tuple[TokenizerConfig, UserTokenizer | None]] = {
            "old (half the users)": (base, None),
            "cold refit": (dataclasses.replace(base, seed=seed + 100), None),
        }
        for w in args.anchors:
            arms[f"warm, anchor {w:g}"] = (dataclasses.replace(base, seed=seed + 100, epochs=args.warm_epochs,
                                                               anchor_weight=w), old)
        for name, (cfg, start) in arms.items():
            t = time.time()
            if name.startswith("old"):
                tok, fit_s = old, float("nan")
            else:
                tok = UserTokenizer(cfg, progress=False).fit(emb.subset(train), warm_start=start)
                fit_s = time.time() - t
            codes = tok.encode(emb)
            churn = code_churn(old_codes, codes, tok.source_names_)
            recon = reconstruction(tok, emb.subset(test))
            run = {
                "seed": seed, "arm": name, "fit_seconds": fit_s, "churn": churn,
                "auc": float(np.mean(list(probe_all(token_features(tok, codes), ds, train, test, args.c).values()))),
                "recon_cosine": float(np.mean([r["cosine"] for r in recon.values()])),
                "min_usage": min(r["usage"] for r in codebook_usage(tok, codes)),
            }
            runs.append(run)
            print(f"seed {seed} {name:22s} fit {fit_s:5.1f}s churn users {churn['users']:.3f} level0 "
                  f"{churn['per_level'][0]:.3f} codes {churn['codes']:.3f} AUC {run['auc']:.4f} "
                  f"cos {run['recon_cosine']:.3f}", flush=True)
    rows = summarise(runs)
    print("\n" + markdown_table(rows))
    out = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs, "summary": rows}
    write_json(args.out, out)
    print(f"written {args.out} in {time.time() - t0:.0f}s")
    return out


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std over seeds per arm."""
    rows = []
    for arm in dict.fromkeys(r["arm"] for r in runs):
        rs = [r for r in runs if r["arm"] == arm]
        n_levels = len(rs[0]["churn"]["per_level"])
        rows.append({
            "arm": arm,
            "users changed": mean_std([r["churn"]["users"] for r in rs]),
            "codes changed": mean_std([r["churn"]["codes"] for r in rs]),
            **{f"level {lvl}": mean_std([r["churn"]["per_level"][lvl] for r in rs], digits=2) for lvl in range(n_levels)},
            "token AUC": mean_std([r["auc"] for r in rs]),
            "recon cos (test)": mean_std([r["recon_cosine"] for r in rs]),
            "min usage": mean_std([r["min_usage"] for r in rs], digits=2),
            "fit s": f"{np.nanmean([r['fit_seconds'] for r in rs]):.0f}" if arm != "old (half the users)" else "",
        })
    return rows


if __name__ == "__main__":
    json.dumps(main(sys.argv[1:]), default=str)

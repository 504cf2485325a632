"""U2QT quality on MovieLens-100K: multi-view layouts vs single-view RQ-VAE at equal bytes per user.

All 943 users; three text sources (ratings, activity, knowledge) embedded once with the packaged
all-MiniLM-L6-v2 (cached under $PLURIBUS_DATA_DIR/embeddings). For each seed, users are split 80/20;
every tokenizer is fitted on the training users only (no probe leakage), then:

- reconstruction (MSE, cosine) on the held-out users;
- codebook usage / perplexity / dead codes per level and part, and full-tuple collisions (suffix off),
  on all 943 users;
- bytes per user (uint16 codes) vs float32 / float16 embeddings;
- logistic-regression probe AUC (trained on the training users, scored on the held-out users) on each
  binary task, for: raw embeddings (concatenated), each tokenizer's tokens (the quantised latents, i.e.
  the code vectors, concatenated; and a one-hot bag of codes), and its pre-quantisation latents.

Configurations (18 codes per user = 36 bytes each):

- ``mrq-stacked``: 4 shared + 2 specific levels per source (the paper's layout);
- ``mrq-union``: 6 levels, each shared + the source's own codes (the official code's layout);
- ``shared-only``: 6 shared levels; ``specific-only``: 6 specific levels;
- ``single-view``: one RQ-VAE on the concatenated 1152-d embeddings, 18 levels, latent 3x wider;
- ``rq-kmeans``: the RQ-KMeans backend (``TokenizerConfig(backend="rq-kmeans")``), 6 per-source levels;
  ``rq-kmeans-stacked``: 4 shared (pooled over sources) + 2 per-source levels; ``rq-kmeans-balanced``: per source,
  balanced k-means.

Yardsticks at the same 36 bytes per user (``--yardsticks``, on by default; ``pluribus.tokenizer.yardsticks``):
PCA + int8 coefficients and FAISS product quantisation, per source 12 bytes.

    .venv/bin/python benchmarks/tokenizer/quality.py [--seeds 0 1 2] [--epochs 300] [--out runs/bench/tokenizer_quality.json]
    # the equal-bytes table of docs/results/tokenizer.md:
    nice .venv/bin/python benchmarks/tokenizer/quality.py --seeds 0 1 2 --only mrq-stacked rq-kmeans rq-kmeans-stacked rq-kmeans-balanced --out runs/bench/tokenizer_quality_yardsticks.json
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

from pluribus.data.features import simple_features
from pluribus.data.locate import data_home
from pluribus.data.movielens import load_movielens
from pluribus.data.split import split_indices
from pluribus.eval.probes import probe_train_test
from pluribus.eval.report import markdown_table, mean_std
from pluribus.io import write_json
from pluribus.tokenizer import EmbedConfig, SourceEmbeddings, TokenizerConfig, UserTokenizer, embed_dataset
from pluribus.tokenizer.metrics import (
    bytes_per_user,
    codebook_usage,
    collisions,
    reconstruction,
    token_features,
)
from pluribus.tokenizer.yardsticks import PCAInt8, ProductQuantiser, reconstruction_stats

TASKS = ("gender", "age_35plus", "occupation_student", "future_drama", "future_comedy", "future_action",
         "future_high_rating")


#: Stage 1 variants: the one-text rendering, or every slice of the whole history (see docs/results/tokenizer.md).
STAGE1 = {
    "one-text": EmbedConfig(),
    "slices-mean": EmbedConfig(slice_tokens=254, numeric_in_text=True, combine="mean"),
    "slices-recency": EmbedConfig(slice_tokens=254, numeric_in_text=True, combine="recency"),
}


def configs(epochs: int, size: int, latent: int) -> dict[str, tuple[TokenizerConfig, bool]]:
    """name -> (config, single_view); every one emits 18 uint16 codes per user."""
    base = TokenizerConfig(shared_size=size, specific_size=size, latent_dim=latent, hidden_dims=(256,), epochs=epochs,
                           collision_suffix=False)
    return {
        "mrq-stacked": (dataclasses.replace(base, n_shared=4, n_specific=2), False),
        "mrq-union": (dataclasses.replace(base, layout="union", n_shared=4, n_specific=2,
                                          shared_size=size // 2, specific_size=size // 2), False),
        "shared-only": (dataclasses.replace(base, n_shared=6, n_specific=0), False),
        "specific-only": (dataclasses.replace(base, n_shared=0, n_specific=6), False),
        "single-view": (dataclasses.replace(base, n_shared=18, n_specific=0, latent_dim=3 * latent,
                                            hidden_dims=(512,)), True),
        # the RQ-KMeans backend (no training loop): per source, shared + per source, and balanced k-means
        "rq-kmeans": (dataclasses.replace(base, backend="rq-kmeans", n_shared=0, n_specific=6), False),
        "rq-kmeans-stacked": (dataclasses.replace(base, backend="rq-kmeans", n_shared=4, n_specific=2), False),
        "rq-kmeans-balanced": (dataclasses.replace(base, backend="rq-kmeans", n_shared=0, n_specific=6,
                                                   kmeans_balanced=True), False),
    }


def yardstick(kind: str, emb: SourceEmbeddings, train: np.ndarray, test: np.ndarray, budget: int
              ) -> tuple[np.ndarray, float, float, int]:
    """A library yardstick (``pluribus.tokenizer.yardsticks``: ``pca-int8`` or ``pq``) at ``budget`` bytes per user,
    fitted on the training users. Returns its probe features for every user (dequantised PCA coefficients, or PQ's
    decoded vectors), the test users' reconstruction cosine and relative MSE (mean over sources), and the bytes per
    user its codes take."""
    method = (PCAInt8 if kind == "pca-int8" else ProductQuantiser)(budget).fit(emb.subset(train))
    codes = method.encode(emb)
    decoded = method.decode(codes[test])
    stats = [reconstruction_stats(emb.embeddings[s][test], decoded.embeddings[s]) for s in emb.source_names]
    return (method.features(codes), float(np.mean([r["cosine"] for r in stats])),
            float(np.mean([r["relative_mse"] for r in stats])), int(codes.shape[1] * codes.itemsize))


def probe_all(features: np.ndarray, ds: Any, train: np.ndarray, test: np.ndarray, c: float) -> dict[str, float]:
    """Probe AUC per task: fitted on ``train`` users, scored on ``test`` users."""
    out = {}
    for task in TASKS:
        mask, y = ds.label_array(task)
        labels = np.full(ds.n_users, -1)
        labels[mask] = y
        tr, te = train[labels[train] >= 0], test[labels[test] >= 0]
        out[task] = probe_train_test(features[tr], labels[tr], features[te], labels[te], c=c)["auc"]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every configuration over the seeds and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--size", type=int, default=64, help="codebook size (union: half shared, half own)")
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--c", type=float, default=0.1, help="inverse L2 strength of every probe")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--yardsticks", action=argparse.BooleanOptionalAction, default=True,
                        help="also PCA + int8, product quantisation (FAISS) and RQ-KMeans at the tokens' 36 bytes per "
                             "user (probes, reconstruction)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these configurations")
    parser.add_argument("--stage1", choices=list(STAGE1), default="one-text",
                        help="one-text: each source as one text (MiniLM keeps ~the 10 newest events); slices-mean / "
                             "slices-recency: every slice of the whole history (254-token budget, numeric fields in "
                             "the text) embedded and combined. Slices embed ~20k-60k texts per source (hours on a "
                             "busy CPU core; cached per shard, so an interrupted run resumes)")
    parser.add_argument("--sources", nargs="*", default=None, help="text sources to embed (default: all three)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/tokenizer_quality.json"))
    parser.add_argument("--summarise", type=Path, default=None, help="only print the tables of an earlier --out")
    args = parser.parse_args(argv)
    if args.summarise is not None:
        earlier = json.loads(args.summarise.read_text())
        print_tables(summarise(earlier["runs"]), earlier["runs"])
        return earlier
    torch.set_num_threads(args.threads)
    t0 = time.time()
    ds = load_movielens()
    reports: dict[str, Any] = {}
    emb = embed_dataset(ds, STAGE1[args.stage1], cache_dir=data_home() / "embeddings", include_profile=False,
                        reports=reports, sources=args.sources)
    print(f"MovieLens-100K: {ds.n_users} users, sources {emb.source_names}, stage 1 ({args.stage1}) in "
          f"{time.time() - t0:.0f}s (cached after the first run)")
    concat = emb.concatenated()
    raw = concat.embeddings["all"]
    chosen = {k: v for k, v in configs(args.epochs, args.size, args.latent).items() if not args.only or k in args.only}
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": [], "stage1": reports}
    simple = simple_features(ds)
    for seed in args.seeds:
        train, test = split_indices(ds.n_users, (0.8, 0.2), seed=seed)
        results["runs"].append({"seed": seed, "config": "simple features (profile)",
                                "probe": probe_all(simple, ds, train, test, args.c)})
        results["runs"].append({"seed": seed, "config": "raw embeddings", "probe": probe_all(raw, ds, train, test, args.c)})
        if args.yardsticks:  # the simplest compressors at the tokens' bytes per user (18 uint16 codes: 36)
            budget = 2 * 6 * len(emb.source_names)
            for name, (feats, cos, rel, nbytes) in {
                    "PCA + int8": yardstick("pca-int8", emb, train, test, budget),
                    "PQ, FAISS (8-bit sub-vectors)": yardstick("pq", emb, train, test, budget)}.items():
                results["runs"].append({"seed": seed, "config": name, "bytes": nbytes, "recon_cosine": cos,
                                        "recon_relative_mse": rel, "probe": probe_all(feats, ds, train, test, args.c)})
                print(f"seed {seed} {name}: {nbytes} bytes, cos {cos:.3f}, rel MSE {rel:.3f}, AUC "
                      f"{np.mean(list(results['runs'][-1]['probe'].values())):.4f}", flush=True)
        for name, (cfg, single) in chosen.items():
            data: SourceEmbeddings = concat if single else emb
            t = time.time()
            tok = UserTokenizer(dataclasses.replace(cfg, seed=seed), progress=False).fit(data.subset(train))
            fit_s = time.time() - t
            codes = tok.encode(data)
            usage = codebook_usage(tok, codes)
            recon = reconstruction(tok, data.subset(test))
            latents = tok.latents(data).reshape(ds.n_users, -1)
            run = {
                "seed": seed, "config": name, "fit_seconds": fit_s,
                "recon_cosine": float(np.mean([r["cosine"] for r in recon.values()])),
                "recon_relative_mse": float(np.mean([r["relative_mse"] for r in recon.values()])),
                "min_usage": min(r["usage"] for r in usage), "mean_usage": float(np.mean([r["usage"] for r in usage])),
                "min_perplexity_ratio": min(r["perplexity"] / r["size"] for r in usage),
                "dead_codes": int(sum(r["dead"] for r in usage)), "usage": usage,
                **{f"collision_{k}": v for k, v in collisions(codes).items()},
                "bytes": bytes_per_user(tok),
                "probe": probe_all(token_features(tok, codes), ds, train, test, args.c),
                "probe_onehot": probe_all(token_features(tok, codes, kind="onehot"), ds, train, test, args.c),
                "probe_latent": probe_all(latents, ds, train, test, args.c),
            }
            results["runs"].append(run)
            print(f"seed {seed} {name:14s} fit {fit_s:5.1f}s  cos {run['recon_cosine']:.3f}  min usage "
                  f"{run['min_usage']:.1%}  collisions {run['collision_collision_rate']:.2%}  token AUC "
                  f"{np.mean(list(run['probe'].values())):.4f}  latent AUC {np.mean(list(run['probe_latent'].values())):.4f}",
                  flush=True)
    summary = summarise(results["runs"])
    results["summary"] = summary
    write_json(args.out, results)
    print_tables(summary, results["runs"])
    print(f"\nwritten {args.out} in {time.time() - t0:.0f}s")
    return results


def print_tables(summary: dict[str, list[dict[str, Any]]], runs: list[dict[str, Any]]) -> None:
    """The summary tables, and per-level usage of the first seed's tokenizers."""
    columns = list(dict.fromkeys(k for row in summary["main"] for k in row))
    print("\n" + markdown_table(summary["main"], columns))
    print("\n" + markdown_table(summary["per_task"]))
    first = runs[0]["seed"]
    rows = []
    for r in (r for r in runs if r["seed"] == first and "usage" in r):
        for u in r["usage"]:
            rows.append({"config": r["config"], "level": u["level"], "part": u["part"], "size": u["size"],
                         "usage": f"{u['usage']:.1%}", "perplexity": f"{u['perplexity']:.1f}", "dead": u["dead"]})
    print(f"\nper-level codebook usage, seed {first}, all users (single-view: first 6 and last 2 levels)")
    keep = [row for row in rows if row["config"] != "single-view" or row["level"] < 6 or row["level"] >= 16]
    print(markdown_table(keep))


def summarise(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Mean ± std over seeds per configuration; AUC averaged over tasks within each seed first."""
    names = list(dict.fromkeys(r["config"] for r in runs))
    raw = [float(np.mean(list(r["probe"].values()))) for r in runs if r["config"] == "raw embeddings"]
    main_rows, task_rows = [], []
    for name in names:
        rs = [r for r in runs if r["config"] == name]
        auc = [float(np.mean(list(r["probe"].values()))) for r in rs]
        row: dict[str, Any] = {"config": name, "token AUC": mean_std(auc),
                               "Δ vs raw": f"{np.mean(auc) - np.mean(raw):+.4f}"}
        if "probe_onehot" in rs[0]:
            row.update({
                "one-hot AUC": mean_std([float(np.mean(list(r["probe_onehot"].values()))) for r in rs]),
                "latent AUC": mean_std([float(np.mean(list(r["probe_latent"].values()))) for r in rs]),
                "recon cos": mean_std([r["recon_cosine"] for r in rs]),
                "min usage": mean_std([r["min_usage"] for r in rs]),
                "collisions": mean_std([r["collision_collision_rate"] for r in rs], digits=4),
                "bytes/user": f"{rs[0]['bytes']['codes']:.0f}",
                "x fp32": f"{rs[0]['bytes']['ratio_float32']:.0f}",
                "fit s": f"{np.mean([r['fit_seconds'] for r in rs]):.0f}",
            })
        elif "recon_cosine" in rs[0]:  # a yardstick at equal bytes
            row.update({"recon cos": mean_std([r["recon_cosine"] for r in rs]),
                        "recon rel MSE": mean_std([r["recon_relative_mse"] for r in rs]),
                        "bytes/user": f"{rs[0]['bytes']:.0f}"})
        if "probe_onehot" in rs[0]:
            row["recon rel MSE"] = mean_std([r["recon_relative_mse"] for r in rs])
        main_rows.append(row)
        task_rows.append({"config": name, **{t: mean_std([r["probe"][t] for r in rs]) for t in TASKS}})
    return {"main": main_rows, "per_task": task_rows}


if __name__ == "__main__":
    json.dumps(main(sys.argv[1:]), default=str)

"""Next-item recommendation on MovieLens-100K's held-out future: U2QT tokens against raw embeddings, the equal-bytes
yardsticks (PCA + int8, product quantisation, RQ-KMeans), simple features and the multi-hot item history, beside
popularity, item-kNN and a SASRec-style sequential model.

Each user's ratings are split in time as ``load_movielens`` does (the newest 20% of each user's ratings are the
future, never an input). For each seed, users are split 80/20 (``split_indices``, as in ``tokenizer/quality.py``);
10% of the training users are held aside for validation (settings and epochs). Every method ranks all 1,682 items
for each held-out user, minus the items in that user's history, and is scored by Recall@10 and NDCG@10 against the
user's future items, averaged over users.

Training interactions, the same for every method: every user's history, plus the future of the fitting users
(training users minus validation users). Validation users' futures only choose settings and epochs.

- Representations (one row per user): (a) U2QT tokens of the stacked 4+2 layout (tokenizer fitted on the training
  users), as code vectors and as a one-hot bag of codes, 36 bytes/user; (y) the equal-bytes yardsticks fitted on
  the same users, each at the tokens' bytes per user (``pluribus.tokenizer.yardsticks``): PCA + int8 coefficients,
  FAISS product quantisation, and RQ-KMeans (the tokenizer's ``rq-kmeans`` backend, 6 levels per source, its code
  vectors); (b) the raw stage-1 embeddings (float32); (c) the 28 simple profile features; (d) the multi-hot item
  history (the item ids as a vector).
- Readouts of a representation (``NextItemSplit``):
  - ``user-kNN``: cosine neighbours among all other users; the neighbours vote with every training interaction
    (their histories, plus their futures for fitting users); neighbours, shrink and centering chosen on validation
    users. It reads what item-kNN reads, so the comparison measures the representation.
  - ``scorer (all interactions)``: the MLP scorer (``fit_item_scorer``) trained to predict every user's training
    interactions from the representation.
  - ``readout chosen on validation`` (the main one; ``NextItemSplit.readout``, what the demo uses): the better of
    the two above on the validation users' NDCG@10, recorded when both run.
  - ``scorer (futures)``: the older readout, the MLP scorer trained on the ~680 fitting users' futures only.
- Baselines: popularity and item-kNN on the training interactions (and on histories only); SASRec (2 layers,
  64-d, last 50 items, full-softmax cross-entropy) on the training sequences, best validation epoch.

Stage 1 is read from the cache under $PLURIBUS_DATA_DIR/embeddings (``one-text``: three sources, each one text of
about the 10 newest events; ``slices-mean``, every 254-token slice of the ratings source averaged, only if cached:
embedding it costs about 30 minutes on the shared CPU).

Commands of the tables in docs/results/tokenizer.md (Recommendation): every arm, then the "readout chosen on validation"
rows (validation NDCG recorded per readout), then the table of both:

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/tokenizer/recommend.py --seeds 0 1 2 --seq-epochs 30
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/tokenizer/recommend.py --seeds 0 1 2 --no-sasrec \
        --readouts user-knn scorer-all --out runs/bench/tokenizer_recommend_chosen.json
    .venv/bin/python benchmarks/tokenizer/recommend.py --summarise runs/bench/tokenizer_recommend.json \
        runs/bench/tokenizer_recommend_chosen.json

Options: [--stage1 one-text slices-mean] [--readouts user-knn scorer-all scorer-future] [--no-baselines]
[--out runs/bench/tokenizer_recommend.json] [--summarise FILE ...]
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
from pluribus.eval.recommend import (
    USER_KNN_GRID,
    NextItemSplit,
    ScorerConfig,
    SequentialConfig,
    interaction_matrix,
    sequential_scores,
    train_sequential,
    user_item_lists,
)
from pluribus.eval.report import markdown_table, mean_std
from pluribus.io import write_json
from pluribus.tokenizer import UserTokenizer, embed_dataset
from pluribus.tokenizer.metrics import token_features

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import STAGE1, configs  # (same stage 1 and tokenizer settings)

from pluribus.tokenizer.yardsticks import PCAInt8, ProductQuantiser

STAGE1_SOURCES = {"one-text": None, "slices-mean": ["ratings"], "slices-recency": ["ratings"]}
READOUTS = {"user-knn": "user-kNN", "scorer-all": "scorer (all interactions)", "scorer-future": "scorer (futures)"}
CHOSEN = "readout chosen on validation"
REFERENCE = "item-kNN"


def log(msg: str) -> None:
    """Progress to stderr."""
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every arm over the seeds, print the table and the ratios to item-kNN, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--stage1", nargs="+", choices=list(STAGE1_SOURCES), default=["one-text"])
    parser.add_argument("--readouts", nargs="+", choices=list(READOUTS), default=list(READOUTS))
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--tok-epochs", type=int, default=300, help="tokenizer epochs (as tokenizer/quality.py)")
    parser.add_argument("--scorer-epochs", type=int, default=300)
    parser.add_argument("--seq-epochs", type=int, default=30)
    parser.add_argument("--seq-lr", type=float, default=2e-3)
    parser.add_argument("--seq-negatives", type=int, default=0,
                        help="SASRec sampled softmax: items drawn per batch against each target (0: all items)")
    parser.add_argument("--no-sasrec", action="store_true", help="every arm but SASRec (the slowest)")
    parser.add_argument("--no-baselines", action="store_true",
                        help="only the stage-1 representation arms (to add a stage 1 variant to an earlier run)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/tokenizer_recommend.json"))
    parser.add_argument("--summarise", type=Path, nargs="+", default=None,
                        help="only print the tables of earlier --out files (their runs together)")
    args = parser.parse_args(argv)
    if args.summarise is not None:  # an arm and seed in several files: the first file's run counts
        kept: dict[tuple[int, str], dict[str, Any]] = {}
        for path in args.summarise:
            for r in json.loads(path.read_text())["runs"]:
                kept.setdefault((r["seed"], r["arm"]), r)
        runs_all = list(kept.values())
        print_tables(runs_all)
        return {"runs": runs_all}
    torch.set_num_threads(args.threads)
    t0 = time.time()
    ds = load_movielens()
    hist, fut, n_items = user_item_lists(ds, "ratings")
    k = args.k
    features: dict[str, Any] = {}
    for variant in args.stage1:
        features[variant] = embed_dataset(ds, STAGE1[variant], cache_dir=data_home() / "embeddings",
                                          include_profile=False, sources=STAGE1_SOURCES[variant], progress=True)
    simple = simple_features(ds).astype(np.float64)
    multi_hot = interaction_matrix(hist, n_items).toarray()
    log(f"MovieLens-100K: {ds.n_users} users, {n_items} items, {sum(map(len, hist))} history / "
        f"{sum(map(len, fut))} future ratings; stage 1 {args.stage1} ready in {time.time() - t0:.0f}s")
    stacked, _ = configs(args.tok_epochs, 64, 64)["mrq-stacked"]
    rq_kmeans, _ = configs(args.tok_epochs, 64, 64)["rq-kmeans"]  # per source, 6 levels: the tokens' codes
    scorer_cfg = ScorerConfig(epochs=args.scorer_epochs, k=k)
    runs: list[dict[str, Any]] = []

    def record(seed: int, arm: str, group: str, metrics: dict[str, float], seconds: float, **extra: Any) -> None:
        runs.append({"seed": seed, "arm": arm, "group": group, **metrics, "seconds": seconds, **extra})
        log(f"seed {seed} {arm:62s} Recall@{k} {metrics['recall']:.4f}  NDCG@{k} {metrics['ndcg']:.4f}  "
            f"({seconds:.0f}s)")

    def run_seed(seed: int) -> None:
        split = NextItemSplit.make(hist, fut, n_items, seed=seed, k=k)
        train, _ = split_indices(ds.n_users, (0.8, 0.2), seed=seed)  # the tokenizer's users
        hist_matrix = interaction_matrix(hist, n_items)

        # ---- baselines ----
        if not args.no_baselines:
            for label, matrix in (("", None), (" (histories only)", hist_matrix)):
                t = time.time()
                record(seed, "popularity" + label, "baseline", split.popularity(matrix), time.time() - t)
                t = time.time()
                metrics, (n_best, s_best) = split.item_knn(matrix)
                record(seed, REFERENCE + label, "baseline", metrics, time.time() - t, neighbours=n_best, shrink=s_best)
        if not (args.no_baselines or args.no_sasrec):
            t = time.time()
            seq_cfg = SequentialConfig(epochs=args.seq_epochs, lr=args.seq_lr, eval_every=2,
                                       negatives=args.seq_negatives or None, seed=seed)

            def validate(model: Any) -> float:
                return split.evaluate(sequential_scores(model, [hist[u] for u in split.val]), split.val)["ndcg"]

            model, seq_log = train_sequential(split.train_lists, n_items, seq_cfg, validate=validate)
            best_epoch = max((e for e in seq_log if "validation" in e), key=lambda e: e["validation"])["epoch"]
            record(seed, "SASRec", "baseline", split.evaluate(sequential_scores(model, [hist[u] for u in split.test])),
                   time.time() - t, best_epoch=best_epoch, log=seq_log)

        # ---- representations, each through every readout ----
        def read_out(name: str, x: np.ndarray, bytes_per_user: float | None, **extra: Any) -> None:
            x = np.asarray(x, dtype=np.float64)
            validated: dict[str, tuple[float, dict[str, float]]] = {}
            spent = 0.0
            for readout in args.readouts:
                t = time.time()
                # the split's own helpers also give the validation NDCG each readout was chosen by
                if readout == "user-knn":
                    m, (nb, sh, ce), val_ndcg = split._user_knn(x, USER_KNN_GRID)
                    setting: dict[str, Any] = {"neighbours": nb, "shrink": sh, "center": ce}
                else:
                    targets = "interactions" if readout == "scorer-all" else "future"
                    m, epoch, val_ndcg = split._scorer(x, dataclasses.replace(scorer_cfg, seed=seed), targets)
                    setting = {"best_epoch": epoch}
                if readout != "scorer-future":
                    validated[READOUTS[readout]] = (val_ndcg, m)
                    spent += time.time() - t
                record(seed, f"{name} · {READOUTS[readout]}", "representation", m, time.time() - t,
                       representation=name, readout=READOUTS[readout], bytes_per_user=bytes_per_user,
                       validation_ndcg=val_ndcg, **setting, **extra)
            if len(validated) == 2:  # NextItemSplit.readout: the one better on validation users
                chosen = max(validated, key=lambda r: validated[r][0])
                record(seed, f"{name} · {CHOSEN}", "representation", validated[chosen][1], spent,
                       representation=name, readout=CHOSEN, chosen=chosen, bytes_per_user=bytes_per_user, **extra)

        if not args.no_baselines:
            read_out("(c) simple features (28)", simple, None)
            read_out("(d) multi-hot item history", multi_hot, None)
        for variant, emb in features.items():
            t = time.time()
            tok = UserTokenizer(dataclasses.replace(stacked, seed=seed), progress=False).fit(emb.subset(train))
            codes = tok.encode(emb)
            fit_s = time.time() - t
            n_codes = int(np.prod(codes.shape[1:]))
            budget = 2 * n_codes  # uint16 codes
            for kind in ("vectors", "onehot"):
                read_out(f"(a) U2QT tokens, {kind} [{variant}]", token_features(tok, codes, kind=kind), budget,
                         tokenizer_fit_seconds=fit_s)
            raw = emb.concatenated().embeddings["all"]
            read_out(f"(b) raw embeddings, float32 [{variant}]", raw, 4 * raw.shape[1])
            for label in ("PCA + int8", "PQ (FAISS)", "RQ-KMeans"):
                t = time.time()
                x, nbytes = yardstick(label, emb, train, budget, rq_kmeans, seed)
                read_out(f"(y) {label} [{variant}]", x, nbytes, fit_seconds=time.time() - t)
        write_json(args.out, {"args": {key: str(v) for key, v in vars(args).items()}, "runs": runs, "partial": True})

    for seed in args.seeds:
        run_seed(seed)
    results = {"args": {key: str(v) for key, v in vars(args).items()}, "runs": runs,
               "summary": summarise(runs), "wall_seconds": time.time() - t0}
    write_json(args.out, results)
    print_tables(runs)
    print(f"\nwritten {args.out} in {time.time() - t0:.0f}s")
    return results


def yardstick(label: str, emb: Any, train: np.ndarray, budget: int, rq_config: Any, seed: int,
              ) -> tuple[np.ndarray, int]:
    """The equal-bytes yardstick ``label`` fitted on the ``train`` users at ``budget`` bytes per user: (every user's
    vector, the bytes per user its codes take). PCA + int8: the dequantised coefficients; PQ: the decoded vectors;
    RQ-KMeans (the tokenizer backend, per source): its code vectors, as for the U2QT tokens."""
    if label == "RQ-KMeans":
        tok = UserTokenizer(dataclasses.replace(rq_config, seed=seed), progress=False).fit(emb.subset(train))
        codes = tok.encode(emb)
        x, nbytes = token_features(tok, codes, kind="vectors"), 2 * int(np.prod(codes.shape[1:]))
    else:
        method = (PCAInt8 if label == "PCA + int8" else ProductQuantiser)(budget).fit(emb.subset(train))
        codes = method.encode(emb)
        x, nbytes = method.features(codes), int(codes.shape[1] * codes.itemsize)
    if nbytes != budget:
        raise ValueError(f"{label}: {nbytes} bytes per user, not the tokens' {budget}")
    return x, nbytes


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per arm: the seeds' values, the mean seconds, and the ratio of its mean to item-kNN's (same seeds) per
    metric."""
    arms = list(dict.fromkeys(r["arm"] for r in runs))

    def values(arm: str, metric: str) -> list[float]:
        return [r[metric] for r in runs if r["arm"] == arm]

    rows = []
    for arm in arms:
        first = next(r for r in runs if r["arm"] == arm)
        row: dict[str, Any] = {"arm": arm, "group": first["group"], "bytes_per_user": first.get("bytes_per_user"),
                               "recall": values(arm, "recall"), "ndcg": values(arm, "ndcg"),
                               "seconds": float(np.mean(values(arm, "seconds")))}
        if REFERENCE in arms:
            seeds = {r["seed"] for r in runs if r["arm"] == arm}
            for metric in ("recall", "ndcg"):
                ref = [r[metric] for r in runs if r["arm"] == REFERENCE and r["seed"] in seeds]
                row[f"{metric}_over_item_knn"] = float(np.mean(row[metric]) / np.mean(ref)) if ref else None
        rows.append(row)
    return rows


def print_tables(runs: list[dict[str, Any]]) -> None:
    """The table: mean ± std over seeds, bytes per user, ratio to item-kNN."""
    n_seeds = len({r["seed"] for r in runs})

    def ratio(value: float | None) -> str:
        return "" if value is None else f"{value:.2f}"

    table = [{"arm": r["arm"], "bytes/user": "" if r["bytes_per_user"] is None else f"{r['bytes_per_user']:.0f}",
              f"Recall@10 ({n_seeds} seeds)": mean_std(r["recall"], 4), "NDCG@10": mean_std(r["ndcg"], 4),
              "recall / item-kNN": ratio(r.get("recall_over_item_knn")),
              "NDCG / item-kNN": ratio(r.get("ndcg_over_item_knn")), "s/seed": f"{r['seconds']:.0f}"}
             for r in summarise(runs)]
    print("\n" + markdown_table(table))


if __name__ == "__main__":
    json.dumps(main(sys.argv[1:]), default=str)

"""Next-item recommendation on MovieLens-100K's held-out future: U2QT tokens vs raw embeddings vs simple features
vs popularity, item-kNN and a SASRec-style sequential model.

Each user's ratings are split in time as ``load_movielens`` does (the newest 20% of each user's ratings are
the future, never an input). For each seed, users are split 80/20 (``split_indices``, as in
``tokenizer/quality.py``); 10% of the training users are held aside for validation (model/epoch selection).
Every method ranks all 1,682 items for each held-out user, minus the items in that user's history, and is
scored by Recall@10 and NDCG@10 against the user's future items, averaged over users.

Training data, the same for every method: every user's history, plus the future of the fitting users
(training users minus validation users). Validation users' futures choose epochs and item-kNN's settings.

- user-representation arms, one scorer for all (``fit_item_scorer``: standardised input -> MLP(256) ->
  item logits, multinomial likelihood of the user's future items, epoch by validation NDCG@10), trained on
  the fitting users' (representation, future items): (a) U2QT tokens of the stacked 4+2 layout as a
  one-hot bag of codes and as code vectors (tokenizer fitted on the training users), (b) the raw stage-1
  embeddings it quantises, (c) the 28 simple profile features; plus the scorer with a constant input
  (it can learn only an item prior: what a user representation must beat);
- popularity and item-kNN on the training interactions (and on histories only, as the textbook versions);
- SASRec (2 layers, 64-d, last 50 items, full-softmax cross-entropy, 12 epochs) trained on the training users' sequences (history + future for
  fitting users, history only for the others), best validation epoch, ranked from each held-out user's
  history.

Stage 1 variants (cached under $PLURIBUS_DATA_DIR/embeddings): ``one-text`` (three sources, each one text of
about the 10 newest events) and ``slices-mean`` (every 254-token slice of the ratings source, averaged).

    .venv/bin/python benchmarks/tokenizer/recommend.py [--seeds 0 1 2] [--stage1 one-text slices-mean]
        [--out runs/bench/tokenizer_recommend.json]
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

STAGE1_SOURCES = {"one-text": None, "slices-mean": ["ratings"], "slices-recency": ["ratings"]}


def log(msg: str) -> None:
    """Progress to stderr."""
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every arm over the seeds, print the table and the ratios, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--stage1", nargs="+", choices=list(STAGE1_SOURCES), default=["one-text", "slices-mean"])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--tok-epochs", type=int, default=300, help="tokenizer epochs (as tokenizer/quality.py)")
    parser.add_argument("--scorer-epochs", type=int, default=300)
    parser.add_argument("--seq-epochs", type=int, default=12)
    parser.add_argument("--seq-lr", type=float, default=2e-3)
    parser.add_argument("--seq-negatives", type=int, default=0,
                        help="SASRec sampled softmax: items drawn per batch against each target (0: all items)")
    parser.add_argument("--no-baselines", action="store_true",
                        help="only the user-representation arms (to add a stage 1 variant to an earlier run)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/tokenizer_recommend.json"))
    parser.add_argument("--summarise", type=Path, nargs="+", default=None,
                        help="only print the tables of earlier --out files (their runs together)")
    args = parser.parse_args(argv)
    if args.summarise is not None:
        runs_all = [r for path in args.summarise for r in json.loads(path.read_text())["runs"]]
        print_tables(runs_all)
        return {"runs": runs_all}
    torch.set_num_threads(args.threads)
    t0 = time.time()
    ds = load_movielens()
    hist, fut, n_items = user_item_lists(ds, "ratings")
    k = args.k
    features: dict[str, Any] = {}
    for variant in args.stage1:
        emb = embed_dataset(ds, STAGE1[variant], cache_dir=data_home() / "embeddings", include_profile=False,
                            sources=STAGE1_SOURCES[variant], progress=True)
        features[variant] = emb
    simple = simple_features(ds)
    log(f"MovieLens-100K: {ds.n_users} users, {n_items} items, {sum(map(len, hist))} history / "
        f"{sum(map(len, fut))} future ratings; stage 1 {args.stage1} ready in {time.time() - t0:.0f}s")
    stacked, _ = configs(args.tok_epochs, 64, 64)["mrq-stacked"]
    scorer_cfg = ScorerConfig(epochs=args.scorer_epochs)
    runs: list[dict[str, Any]] = []

    def record(seed: int, arm: str, group: str, metrics: dict[str, float], seconds: float, **extra: Any) -> None:
        runs.append({"seed": seed, "arm": arm, "group": group, **metrics, "seconds": seconds, **extra})
        log(f"seed {seed} {arm:42s} Recall@{k} {metrics['recall']:.4f}  NDCG@{k} {metrics['ndcg']:.4f}  "
            f"({seconds:.0f}s)")

    def run_seed(seed: int) -> None:
        split = NextItemSplit.make(hist, fut, n_items, seed=seed, k=k)
        train, _ = split_indices(ds.n_users, (0.8, 0.2), seed=seed)  # the tokenizer's users, in split order
        test, val = split.test, split.val
        train_lists = split.train_lists
        hist_matrix = interaction_matrix(hist, n_items)

        # ---- baselines ----
        for label, matrix in () if args.no_baselines else (("", None), (" (histories only)", hist_matrix)):
            t = time.time()
            record(seed, "popularity" + label, "baseline", split.popularity(matrix), time.time() - t)
            t = time.time()
            metrics, (n_best, s_best) = split.item_knn(matrix)
            record(seed, "item-kNN" + label, "baseline", metrics, time.time() - t, neighbours=n_best, shrink=s_best)
        if not args.no_baselines:
            t = time.time()
            seq_cfg = SequentialConfig(epochs=args.seq_epochs, lr=args.seq_lr, eval_every=2, negatives=args.seq_negatives or None,
                                       seed=seed)

            def validate(model: Any) -> float:
                return split.evaluate(sequential_scores(model, [hist[u] for u in val]), val)["ndcg"]

            model, seq_log = train_sequential(train_lists, n_items, seq_cfg, validate=validate)
            best_epoch = max((e for e in seq_log if "validation" in e), key=lambda e: e["validation"])["epoch"]
            record(seed, "SASRec", "baseline", split.evaluate(sequential_scores(model, [hist[u] for u in test])),
                   time.time() - t, best_epoch=best_epoch, log=seq_log)

        # ---- user representations, one scorer ----
        def scored(x: np.ndarray) -> tuple[dict[str, float], float]:
            return split.scorer(x, dataclasses.replace(scorer_cfg, seed=seed))

        if not args.no_baselines:
            t = time.time()
            m, ep = scored(np.zeros((ds.n_users, 1)))
            record(seed, "scorer, constant input (item prior)", "representation", m, time.time() - t, best_epoch=ep)
            t = time.time()
            m, ep = scored(simple)
            record(seed, "(c) simple features (28)", "representation", m, time.time() - t, best_epoch=ep)
        for variant, emb in features.items():
            t = time.time()
            m, ep = scored(emb.concatenated().embeddings["all"].astype(np.float64))
            record(seed, f"(b) raw embeddings [{variant}]", "representation", m, time.time() - t, best_epoch=ep)
            t = time.time()
            tok = UserTokenizer(dataclasses.replace(stacked, seed=seed), progress=False).fit(emb.subset(train))
            codes = tok.encode(emb)
            fit_s = time.time() - t
            for kind in ("onehot", "vectors"):
                t = time.time()
                m, ep = scored(token_features(tok, codes, kind=kind).astype(np.float64))
                record(seed, f"(a) U2QT tokens, {kind} [{variant}]", "representation", m, time.time() - t,
                       best_epoch=ep, tokenizer_fit_seconds=fit_s, codes_per_user=int(np.prod(codes.shape[1:])))
        write_json(args.out, {"args": {key: str(v) for key, v in vars(args).items()}, "runs": runs, "partial": True})

    for seed in args.seeds:
        run_seed(seed)
    results = {"args": {key: str(v) for key, v in vars(args).items()}, "runs": runs,
               "summary": summarise(runs), "wall_seconds": time.time() - t0}
    write_json(args.out, results)
    print_tables(runs)
    print(f"\nwritten {args.out} in {time.time() - t0:.0f}s")
    return results


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over seeds per arm, and the best token arm / best baseline ratios (per-seed means)."""
    arms = list(dict.fromkeys(r["arm"] for r in runs))

    def mean_of(arm: str, metric: str) -> float:
        return float(np.mean([r[metric] for r in runs if r["arm"] == arm]))

    rows = [{"arm": a, "group": next(r["group"] for r in runs if r["arm"] == a),
             "recall": [r["recall"] for r in runs if r["arm"] == a], "ndcg": [r["ndcg"] for r in runs if r["arm"] == a],
             "seconds": mean_of(a, "seconds")} for a in arms]
    tokens = [a for a in arms if a.startswith("(a)")]
    baselines = [a for a in arms if next(r["group"] for r in runs if r["arm"] == a) == "baseline"]
    ratios = {}
    for metric in ("recall", "ndcg"):
        if tokens and baselines:
            best_tok = max(tokens, key=lambda a: mean_of(a, metric))
            best_base = max(baselines, key=lambda a: mean_of(a, metric))
            best_rep = max((a for a in arms if a.startswith(("(b)", "(c)"))), key=lambda a: mean_of(a, metric),
                           default=None)
            ratios[metric] = {"best_tokens": best_tok, "best_baseline": best_base,
                              "tokens_over_baseline": mean_of(best_tok, metric) / mean_of(best_base, metric)}
            if best_rep is not None:
                ratios[metric].update({"best_other_representation": best_rep,
                                       "tokens_over_representation": mean_of(best_tok, metric) / mean_of(best_rep, metric)})
    return {"rows": rows, "ratios": ratios}


def print_tables(runs: list[dict[str, Any]]) -> None:
    """The table (mean ± std over seeds) and the ratios."""
    summary = summarise(runs)
    n_seeds = len({r["seed"] for r in runs})
    table = [{"arm": r["arm"], f"Recall@10 ({n_seeds} seeds)": mean_std(r["recall"], 4),
              "NDCG@10": mean_std(r["ndcg"], 4), "s/seed": f"{r['seconds']:.0f}"} for r in summary["rows"]]
    print("\n" + markdown_table(table))
    for metric, r in summary["ratios"].items():
        line = (f"{metric}: best tokens ({r['best_tokens']}) / best baseline ({r['best_baseline']}) = "
                f"{r['tokens_over_baseline']:.3f}")
        if "best_other_representation" in r:
            line += (f"; / best other representation ({r['best_other_representation']}) = "
                     f"{r['tokens_over_representation']:.3f}")
        print(line)


if __name__ == "__main__":
    json.dumps(main(sys.argv[1:]), default=str)

"""U2QT refits on MovieLens-100K: do users whose inputs did not change keep their codes, and at what cost?

Per seed, users are split 80/20 (train/test). *Yesterday* is every event up to the ``--quantile`` of event times
(0.8: 234 of 943 users have an event after it); *today* is every event. A user with no event after the cutoff has
the same texts, so the same stage-1 vectors (reused bit for bit, as a pipeline that re-embeds only users with new
events would); the others' yesterday texts are embedded with the same MiniLM settings (cached). The *old*
tokenizer is fitted on yesterday's inputs of a random half of the training users (``--old-users half``: the
refit sees twice the users, a quarter of them changed) or of all of them (``--old-users all``: the same users,
a quarter of them changed, most of them new); every refit sees today's inputs of all training users. With
``--old-users returning`` both the old tokenizer and the refits train on the training users who had events
yesterday (no new users; only the few whose histories grew changed), yesterday's and today's inputs:

- ``cold refit``: a fresh tokenizer, another seed, ``--epochs`` epochs;
- ``cold + assignment``: the cold refit's codes renumbered, level by level, by the old-to-new code mapping that
  maximises agreement with the old codes (scipy ``linear_sum_assignment`` on the code co-occurrence counts of the
  training users; shared levels pooled over sources, specific levels per source);
- ``warm, anchor w``: ``fit(..., warm_start=old)`` for ``--warm-epochs`` epochs with ``anchor_weight=w``;
- ``stable``: ``fit(..., warm_start=old, stable=True)``: the old input scaling, encoder and codebooks frozen,
  only the decoder trained (``--warm-epochs`` epochs) on today's inputs.

Code churn (``metrics.refit_churn``) compares each user's old codes (old tokenizer, yesterday's inputs) with the
new ones (new tokenizer, today's inputs), for the users whose inputs did not change and for those whose inputs
changed, apart, over all 943 users. Quality: token probe AUC (7 tasks, fitted on training users, scored on test
users) and reconstruction of today's inputs of the test users (mean cosine and relative MSE over the 3 sources;
the cosine also for the changed test users alone).
Stacked 4+2 layout, 64 codes x 64 dims, 3 text sources (MiniLM), 18 codes per user.

    .venv/bin/python benchmarks/tokenizer/refit.py [--seeds 0 1 2] [--epochs 200] [--warm-epochs 50]
        [--old-users half|all|returning]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
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
from pluribus.io import load_tensors, save_tensors, write_json
from pluribus.tokenizer import (
    EMPTY_CODE,
    EmbedConfig,
    SourceEmbeddings,
    TokenizerConfig,
    TokenVocabulary,
    UserTokenizer,
    embed_dataset,
)
from pluribus.tokenizer.metrics import codebook_usage, reconstruction, refit_churn, token_features


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the refit arms over the seeds and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=200, help="epochs of the old fit and of the cold refit")
    parser.add_argument("--warm-epochs", type=int, default=50, help="epochs of the warm and stable refits")
    parser.add_argument("--anchors", type=float, nargs="+", default=[1.0, 10.0])
    parser.add_argument("--quantile", type=float, default=0.8, help="yesterday's cutoff, a quantile of event times")
    parser.add_argument("--old-users", choices=["half", "all", "returning"], default="half",
                        help="the old tokenizer's training users: a random half of today's, all of them, or those "
                             "with events yesterday (then the refits train on these users too)")
    parser.add_argument("--c", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/tokenizer_refit.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    ds = load_movielens()
    cache = data_home() / "embeddings"
    today = embed_dataset(ds, EmbedConfig(), cache_dir=cache, include_profile=False, progress=False)
    yesterday, changed = yesterday_inputs(ds, today, args.quantile, cache)
    print(f"{int(changed.sum())} of {ds.n_users} users have events after the cutoff (changed inputs)", flush=True)
    base = TokenizerConfig(n_shared=4, n_specific=2, shared_size=64, specific_size=64, latent_dim=64,
                           hidden_dims=(256,), epochs=args.epochs, collision_suffix=False)
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        train, test = split_indices(ds.n_users, (0.8, 0.2), seed=seed)
        returning = train[np.any([yesterday.present[s][train] for s in yesterday.source_names], axis=0)]
        first = {"all": train, "returning": returning,
                 "half": np.random.default_rng(seed).permutation(train)[: len(train) // 2]}[args.old_users]
        refit_rows = returning if args.old_users == "returning" else train
        old = UserTokenizer(dataclasses.replace(base, seed=seed), progress=False).fit(yesterday.subset(first))
        old_codes = old.encode(yesterday)
        refit = dataclasses.replace(base, seed=seed + 100)
        warm = dataclasses.replace(refit, epochs=args.warm_epochs)
        who = {"half": "half the users", "all": "all the users", "returning": "returning users"}[args.old_users]
        arms: dict[str, Any] = {f"old (yesterday, {who})": None, "cold refit": refit,
                                "cold + assignment": "relabel"}
        arms.update({f"warm, anchor {w:g}": dataclasses.replace(warm, anchor_weight=w) for w in args.anchors})
        arms["stable (decoder only)"] = "stable"
        cold: UserTokenizer | None = None
        for name, how in arms.items():
            t = time.time()
            if how is None:
                tok, fit_s, codes = old, float("nan"), old.encode(today)
            elif how == "relabel":
                assert cold is not None
                tok, fit_s = cold, float("nan")
                codes = relabel(old_codes, cold.encode(today), refit_rows, cold.vocabulary_)
            else:
                start, stable = (None, False) if name == "cold refit" else (old, how == "stable")
                cfg = warm if stable else how
                tok = UserTokenizer(cfg, progress=False).fit(today.subset(refit_rows), warm_start=start, stable=stable)
                fit_s, codes = time.time() - t, tok.encode(today)
                if name == "cold refit":
                    cold = tok
            churn = refit_churn(old_codes, codes, changed, tok.source_names_)
            recon = reconstruction(tok, today.subset(test))
            recon_changed = reconstruction(tok, today.subset(test[changed[test]]))
            scored = tok.encode(today)  # renumbering changes no information: the assignment arm scores the cold codes
            run = {
                "seed": seed, "arm": name, "fit_seconds": fit_s, "churn": churn,
                "auc": float(np.mean(list(probe_all(token_features(tok, scored), ds, train, test, args.c).values()))),
                "recon_cosine": float(np.mean([r["cosine"] for r in recon.values()])),
                "recon_relative_mse": float(np.mean([r["relative_mse"] for r in recon.values()])),
                "recon_cosine_changed": float(np.mean([r["cosine"] for r in recon_changed.values()])),
                "min_usage": min(r["usage"] for r in codebook_usage(tok, scored)),
            }
            runs.append(run)
            same, moved = churn["unchanged"], churn["changed"]
            print(f"seed {seed} {name:32s} fit {fit_s:5.1f}s | unchanged users: codes {same['codes']:.3f} tuples "
                  f"{same['users']:.3f} | changed users: codes {moved['codes']:.3f} | AUC {run['auc']:.4f} "
                  f"cos {run['recon_cosine']:.4f} rel.MSE {run['recon_relative_mse']:.4f}", flush=True)
    rows = summarise(runs)
    print("\n" + markdown_table(rows))
    out = {"args": {k: str(v) for k, v in vars(args).items()}, "changed_users": int(changed.sum()), "runs": runs,
           "summary": rows}
    write_json(args.out, out)
    print(f"written {args.out} in {time.time() - t0:.0f}s")
    return out


def yesterday_inputs(ds: Any, today: SourceEmbeddings, quantile: float,
                     cache_dir: Path) -> tuple[SourceEmbeddings, np.ndarray]:
    """Each user's stage-1 inputs as of the ``quantile`` of event times, and which users' inputs changed since.

    A user whose texts are the same keeps today's vectors bit for bit; the others' texts (events up to the
    cutoff) are embedded with the same MiniLM settings and cached under ``cache_dir``. A user with no event
    before the cutoff in a source lacks that source yesterday.
    """
    from pluribus.tokenizer import embed_texts
    from pluribus.tokenizer.embed import render_source_texts

    cfg = EmbedConfig()
    times = np.concatenate([ds.sources[s]["timestamp"].to_numpy() for s in today.source_names])
    cutoff = float(np.quantile(times, quantile))
    before = dataclasses.replace(ds, sources={s: f[f["timestamp"] <= cutoff] for s, f in ds.sources.items()})
    changed = np.zeros(ds.n_users, dtype=bool)
    vectors, present = {}, {}
    for name in today.source_names:
        old_texts, old_present = render_source_texts(before, name, cfg)
        new_texts, _ = render_source_texts(ds, name, cfg)
        differs = np.array([a != b for a, b in zip(old_texts, new_texts, strict=True)])
        changed |= differs
        todo = np.flatnonzero(differs & old_present)
        key = hashlib.sha256("\x1e".join(old_texts[i] for i in todo).encode()).hexdigest()[:16]
        path = cache_dir / f"refit-yesterday-{name}-{key}.safetensors"
        if path.exists():
            fresh = load_tensors(path)["embeddings"].numpy()
        else:
            fresh = embed_texts([old_texts[i] for i in todo], cfg) if len(todo) else np.zeros((0, 384), np.float32)
            save_tensors(path, {"embeddings": torch.from_numpy(np.ascontiguousarray(fresh))})
        x = today.embeddings[name].copy()
        x[todo] = fresh
        x[~old_present] = 0.0
        vectors[name], present[name] = x, old_present
    return SourceEmbeddings(today.user_ids, vectors, present), changed


def relabel(old_codes: np.ndarray, new_codes: np.ndarray, rows: np.ndarray, vocab: TokenVocabulary) -> np.ndarray:
    """``new_codes`` renumbered level by level by the permutation that best matches ``old_codes`` on ``rows``.

    A fully shared level is matched once over all sources' codes; a source-specific level per source (the
    stacked layout; a union level, part shared and part specific, is not handled here).
    """
    from scipy.optimize import linear_sum_assignment

    out = new_codes.copy()
    n_sources = new_codes.shape[1]
    for lvl, size in enumerate(vocab.level_sizes):
        groups = [list(range(n_sources))] if vocab.shared_sizes[lvl] > 0 else [[s] for s in range(n_sources)]
        for sources in groups:
            old = old_codes[rows][:, sources, lvl].reshape(-1).astype(np.int64)
            new = new_codes[rows][:, sources, lvl].reshape(-1).astype(np.int64)
            keep = (old != EMPTY_CODE) & (new != EMPTY_CODE)
            counts = np.zeros((size, size))
            np.add.at(counts, (new[keep], old[keep]), 1)
            new_ids, old_ids = linear_sum_assignment(counts, maximize=True)
            mapping = np.arange(size)
            mapping[new_ids] = old_ids
            column = out[:, sources, lvl]
            present = column != EMPTY_CODE
            column[present] = mapping[column[present].astype(np.int64)]
            out[:, sources, lvl] = column
    return out


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std over seeds per arm."""
    rows = []
    for arm in dict.fromkeys(r["arm"] for r in runs):
        rs = [r for r in runs if r["arm"] == arm]

        def churn(group: str, key: str, level: int | None = None, rs: list[dict[str, Any]] = rs) -> str:
            values = [r["churn"][group][key] if level is None else r["churn"][group][key][level] for r in rs]
            return mean_std(values, digits=3)

        rows.append({
            "arm": arm,
            "unchanged: codes changed": churn("unchanged", "codes"),
            "unchanged: users with any change": churn("unchanged", "users"),
            "unchanged: level 0": churn("unchanged", "per_level", 0),
            "changed: codes changed": churn("changed", "codes"),
            "changed: level 0": churn("changed", "per_level", 0),
            "token AUC": mean_std([r["auc"] for r in rs]),
            "recon cos (test)": mean_std([r["recon_cosine"] for r in rs], digits=4),
            "recon rel. MSE (test)": mean_std([r["recon_relative_mse"] for r in rs], digits=4),
            "recon cos (changed test users)": mean_std([r["recon_cosine_changed"] for r in rs], digits=4),
            "min usage": mean_std([r["min_usage"] for r in rs], digits=2),
            "fit s": "" if all(np.isnan(r["fit_seconds"]) for r in rs) else f"{np.nanmean([r['fit_seconds'] for r in rs]):.0f}",
        })
    return rows


if __name__ == "__main__":
    json.dumps(main(sys.argv[1:]), default=str)

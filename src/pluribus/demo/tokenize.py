"""Demo step 1, U2QT: embed each source (the ratings' whole history, slice by slice), fit the multi-view RQ-VAE
on training users, encode everyone; probes, next-item recommendation and the code churn of a warm refit."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pluribus.data.features import simple_features
from pluribus.data.locate import data_home
from pluribus.data.schema import UserDataset
from pluribus.data.split import split_indices
from pluribus.demo.basic import SIMPLE, compare_probes, mean_auc, probe_summary_row
from pluribus.demo.runner import DemoContext, StepResult
from pluribus.eval.report import compare_word, markdown_table, mean_std
from pluribus.threads import cpu_threads

TOKENIZER_FOLDER = "tokenizer"
#: The yardsticks at the tokens' bytes per user (pluribus.tokenizer.yardsticks, and the RQ-KMeans backend).
PCA_NAME = "PCA + int8"
RQ_KMEANS_NAME = "RQ-KMeans"
#: The source embedded slice by slice over the whole history when the data has it (the others as one text).
WHOLE_HISTORY_SOURCE = "ratings"
#: The recommendation arm that reads the item history itself (multi-hot) through the same readouts.
ITEM_HISTORY = "item history (multi-hot)"


def _cache_entries(folder: Path, one_text: list[str], sliced: list[str]) -> set[str]:
    """The cache files this stage 1 could write (another process may be filling other entries meanwhile)."""
    if not folder.exists():
        return set()
    found = {p.name for s in one_text for p in folder.glob(f"{s}-*.safetensors")}
    found |= {str(p.relative_to(folder)) for s in sliced for p in folder.glob(f"{s}-slices-*/*.safetensors")}
    return found


#: Stage 1's runtime (docs/results/tokenizer.md, "Faster stage 1"): the first of these this machine can run. OpenVINO in
#: bfloat16 embeds MiniLM ~2x faster than torch float32 at cosine 0.9999 (benchmarks/tokenizer/stage1.py) but needs a
#: CPU with bf16 instructions; elsewhere torch float32. The choice is printed and recorded, never silent.
STAGE1_BACKENDS = ("openvino-bf16", "torch")


def _stage1(ds: UserDataset, quick: bool) -> tuple[Any, dict[str, Any]]:
    import sys

    from pluribus.tokenizer.backends import backend_available

    backend = next(b for b in STAGE1_BACKENDS if backend_available(b))
    skipped = STAGE1_BACKENDS[: STAGE1_BACKENDS.index(backend)]
    print(f"stage 1 backend: {backend}" + (f" ({', '.join(skipped)} not available here)" if skipped else ""),
          file=sys.stderr, flush=True)
    with cpu_threads(None):  # MiniLM's batched embedding is the one big workload: every core
        return _embed_sources(ds, quick, backend)


def _embed_sources(ds: UserDataset, quick: bool, backend: str = "torch") -> tuple[Any, dict[str, Any]]:
    """Stage 1: (SourceEmbeddings, what was embedded how, with seconds and whether the cache was warm).

    Full mode embeds every 254-token slice of the ratings' whole history (mean of the slice vectors, the rating in
    the text) and the other sources as one text of their last 30 events; --quick embeds every source as one text
    of its last 10 events (64 word pieces): a smoke test, not the whole history. ``backend`` is
    ``EmbedConfig.backend`` (its loading checks that it is in effect).
    """
    from pluribus.tokenizer import EmbedConfig, embed_dataset
    from pluribus.tokenizer.inputs import SourceEmbeddings

    cache = data_home() / "embeddings"
    start = time.perf_counter()
    text_sources = [s for s in ds.source_names if ds.source_specs[s].text_field]
    one_text = EmbedConfig(max_events=10 if quick else 30, max_length=64 if quick else 256, backend=backend)  # type: ignore[arg-type]
    sliced = [] if quick or WHOLE_HISTORY_SOURCE not in text_sources else [WHOLE_HISTORY_SOURCE]
    rest = [s for s in text_sources if s not in sliced]
    before = _cache_entries(cache, rest, sliced)
    reports: dict[str, dict[str, Any]] = {}
    parts = []
    if sliced:
        whole = EmbedConfig(slice_tokens=254, numeric_in_text=True, combine="mean", backend=backend)  # type: ignore[arg-type]
        parts.append(embed_dataset(ds, whole, sources=sliced, include_profile=False, cache_dir=cache, progress=True,
                                   reports=reports))
    if rest:
        parts.append(embed_dataset(ds, one_text, sources=rest, include_profile=False, cache_dir=cache, progress=True))
    embeddings = SourceEmbeddings(parts[0].user_ids, {s: p.embeddings[s] for p in parts for s in p.source_names},
                                  {s: p.present[s] for p in parts for s in p.source_names})
    order = [s for s in text_sources if s in embeddings.embeddings]  # the data's source order
    embeddings = SourceEmbeddings(embeddings.user_ids, {s: embeddings.embeddings[s] for s in order},
                                  {s: embeddings.present[s] for s in order})
    new_entries = _cache_entries(cache, rest, sliced) - before
    info = {"seconds": time.perf_counter() - start, "cache": "cold" if new_entries else "warm",
            "whole_history": sliced, "one_text": rest, "one_text_events": one_text.max_events,
            "one_text_pieces": one_text.max_length, "slices": {s: r for s, r in reports.items()}, "backend": backend}
    return embeddings, info


def _stage1_text(info: dict[str, Any]) -> str:
    parts = []
    for source in info["whole_history"]:
        report = info["slices"].get(source, {})
        parts.append(f"`{source}`: its whole history, {report.get('slices', '?')} slices of at most 254 word pieces "
                     f"for {report.get('events', '?')} events ({report.get('slices_truncated', 0)} truncated), the "
                     "rating in the text, slice vectors averaged per user")
    if info["one_text"]:
        parts.append(", ".join(f"`{s}`" for s in info["one_text"]) + f": one text of the last {info['one_text_events']} "
                     f"events (up to {info['one_text_pieces']} word pieces)")
    backend = info.get("backend", "torch")
    runtime = "sentence-transformers on torch, float32" if backend == "torch" else f"the `{backend}` runtime"
    return "; ".join(parts) + f"; embedded with {runtime}"


def _recommendation(ctx: DemoContext, features: dict[str, np.ndarray]) -> tuple[dict[str, Any], str] | None:
    """Next-item Recall@10 / NDCG@10 of each user representation beside popularity and item-kNN, on the same
    per-seed user splits; None when the data has no held-out future with items.

    Every representation is read out by ``NextItemSplit.readout``: user-kNN (cosine neighbours among all other users
    vote with their training interactions) and the MLP scorer trained to predict every user's training interactions
    are both fitted, and the one better on the validation users is scored. Both read every training interaction
    (all histories, plus the fitting users' futures), the data item-kNN reads, so the gap measures the
    representation. The item history itself (multi-hot) is read out the same way.
    """
    from pluribus.errors import ConfigError
    from pluribus.eval.recommend import NextItemSplit, ScorerConfig, interaction_matrix, user_item_lists

    source = WHOLE_HISTORY_SOURCE if WHOLE_HISTORY_SOURCE in ctx.data.sources else ctx.data.source_names[0]
    try:
        hist, fut, n_items = user_item_lists(ctx.data, source)
    except ConfigError:  # no held-out future with items: the data cannot score recommendation
        return None
    features = {**features, ITEM_HISTORY: interaction_matrix(hist, n_items).toarray()}
    scorer = ScorerConfig(epochs=60 if ctx.config.quick else 150)
    arms: dict[str, list[dict[str, Any]]] = {"popularity": [], "item-kNN": []}
    arms.update({name: [] for name in features})
    for seed in ctx.seeds:
        split = NextItemSplit.make(hist, fut, n_items, seed=seed)
        arms["popularity"].append(split.popularity())
        arms["item-kNN"].append(split.item_knn()[0])
        for name, x in features.items():
            metrics, chosen = split.readout(x.astype(np.float64), dataclasses.replace(scorer, seed=seed))
            arms[name].append({**metrics, "readout": chosen["readout"]})
    reference = [r["recall"] for r in arms["item-kNN"]]
    rows = [{"ranks items from": name, "readout (per split)": ", ".join(r.get("readout", "-") for r in runs),
             "Recall@10": mean_std([r["recall"] for r in runs]), "NDCG@10": mean_std([r["ndcg"] for r in runs]),
             "Recall / item-kNN": f"{np.mean([r['recall'] for r in runs]) / np.mean(reference):.2f}"}
            for name, runs in arms.items()]
    text = (f"### Next-item recommendation\n\nEach held-out user's future `{source}` items ranked among all "
            f"{n_items} items (history excluded); {len(ctx.seeds)} user split(s), 20% test users, mean ± std over "
            "splits. Popularity and item-kNN read the item ids of the histories. Each user representation is read out "
            "from every training interaction (all histories, plus the futures of the fitting users), as item-kNN "
            "reads them, by the better on validation users of: user-kNN (the most similar other users by cosine vote "
            "with their items; neighbours, shrink and centering chosen on validation) and an MLP scorer trained to "
            f"predict each user's training items ({scorer.epochs} epochs, epoch chosen on validation). The item "
            "history as a multi-hot vector is the item-id counterpart through the same readouts.\n\n"
            + markdown_table(rows))
    return arms, text


def _churn(embeddings: Any, train: np.ndarray, held_out: np.ndarray, config: Any, cold: Any,
           ) -> tuple[dict[str, Any], str]:
    """Code churn of a warm-started refit against a cold one: the *old* tokenizer saw half the training users,
    both refits all of them; churn compares old and new codes of every user."""
    from pluribus.tokenizer import UserTokenizer
    from pluribus.tokenizer.metrics import code_churn, reconstruction

    half = np.sort(np.random.default_rng(0).permutation(train)[: len(train) // 2])
    old = UserTokenizer(config, progress=False).fit(embeddings.subset(half))
    warm_epochs = max(config.epochs // 6, 5)
    warm = UserTokenizer(dataclasses.replace(config, epochs=warm_epochs), progress=False).fit(
        embeddings.subset(train), warm_start=old)
    old_codes = old.encode(embeddings)
    names = list(old.source_names_)
    result: dict[str, Any] = {}
    rows = []
    for label, tok, epochs in ((f"warm start from the old codebooks ({warm_epochs} epochs)", warm, warm_epochs),
                               (f"cold refit ({config.epochs} epochs)", cold, config.epochs)):
        churn = code_churn(old_codes, tok.encode(embeddings), names)
        recon = float(np.mean([r["cosine"] for r in reconstruction(tok, embeddings.subset(held_out)).values()]))
        result[label] = {"users": churn["users"], "codes": churn["codes"], "per_level": churn["per_level"],
                         "reconstruction": recon, "epochs": epochs}
        rows.append({"refit": label, "codes changed": f"{churn['codes']:.1%}",
                     "users with a changed level-0 code": f"{churn['per_level'][0]:.1%}",
                     "users with any changed code": f"{churn['users']:.1%}",
                     "held-out reconstruction cosine": f"{recon:.3f}"})
    text = ("### Stable codes across refits\n\nThe *old* tokenizer is fitted on half of the training users; both "
            "refits see all of them. Churn compares the old and the new codes of every user (one refit each, no "
            "spread).\n\n" + markdown_table(rows))
    return result, text


def _equal_bytes(embeddings: Any, train: np.ndarray, held_out: np.ndarray, config: Any, budget: int,
                 ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """The yardsticks at the tokens' ``budget`` bytes per user, fitted on the training users: PCA with int8
    coefficients, and the RQ-KMeans backend with the tokens' codes per source. Probe features of every user, and
    per yardstick its bytes per user, held-out reconstruction and fit seconds."""
    from pluribus.tokenizer import UserTokenizer
    from pluribus.tokenizer.metrics import bytes_per_user, reconstruction, token_features
    from pluribus.tokenizer.yardsticks import PCAInt8, reconstruction_stats

    features, info = {}, {}
    start = time.perf_counter()
    pca = PCAInt8(budget).fit(embeddings.subset(train))
    codes = pca.encode(embeddings)
    decoded = pca.decode(codes[held_out])
    stats = [reconstruction_stats(embeddings.embeddings[s][held_out], decoded.embeddings[s])
             for s in embeddings.source_names]
    features[PCA_NAME] = pca.features(codes)
    info[PCA_NAME] = {"bytes": int(codes.shape[1]), "seconds": time.perf_counter() - start,
                      "cosine": float(np.mean([r["cosine"] for r in stats])),
                      "relative_mse": float(np.mean([r["relative_mse"] for r in stats]))}
    start = time.perf_counter()
    rq_config = dataclasses.replace(config, backend="rq-kmeans", n_shared=0, n_specific=config.n_levels,
                                    specific_size=config.shared_size)
    rq = UserTokenizer(rq_config, progress=False).fit(embeddings.subset(train))
    rq_codes = rq.encode(embeddings)
    recon = reconstruction(rq, embeddings.subset(held_out))
    features[RQ_KMEANS_NAME] = token_features(rq, rq_codes)
    info[RQ_KMEANS_NAME] = {"bytes": int(bytes_per_user(rq)["codes"]), "seconds": time.perf_counter() - start,
                            "cosine": float(np.mean([r["cosine"] for r in recon.values()])),
                            "relative_mse": float(np.mean([r["relative_mse"] for r in recon.values()]))}
    return features, info


def _equal_bytes_text(methods: dict[str, Any], tokens_name: str, size: dict[str, float], recon: dict[str, Any],
                      yardsticks: dict[str, dict[str, Any]]) -> str:
    """The equal-bytes table and a verdict computed from it (never a fixed sentence)."""
    ours = {"bytes": int(size["codes"]), "cosine": float(np.mean([r["cosine"] for r in recon.values()])),
            "relative_mse": float(np.mean([r["relative_mse"] for r in recon.values()]))}
    rows = [{"representation": name, "bytes/user": str(r["bytes"]), "mean probe AUC": f"{mean_auc(methods[name]):.3f}",
             "held-out recon cosine": f"{r['cosine']:.3f}", "held-out recon relative MSE": f"{r['relative_mse']:.3f}"}
            for name, r in {tokens_name: ours, **yardsticks}.items()]
    best = max(yardsticks, key=lambda n: mean_auc(methods[n]))
    beaten_on_recon = [n for n, r in yardsticks.items() if r["relative_mse"] < ours["relative_mse"]]
    against = probe_summary_row(methods, tokens_name, best)["verdict"]  # 'below X (gap -0.037, per-task spread ±…)'
    if against.startswith("below"):
        verdict = f"**At equal bytes the multi-view RQ-VAE does not earn its bytes here:** the U2QT tokens probe {against}"
    elif against.startswith("level with"):
        verdict = (f"**At equal bytes the multi-view RQ-VAE does not beat a trivial compressor here:** the U2QT tokens "
                   f"probe {against}")
    else:
        verdict = f"At equal bytes the U2QT tokens probe {against}"
    if beaten_on_recon:
        verdict += f", and {', '.join(beaten_on_recon)} reconstruct the held-out users better"
    return ("### At equal bytes\n\nThe tokens beside the simplest compressors at the same bytes per user, fitted on the "
            f"same training users: {PCA_NAME} (per source the top principal components, one int8 coefficient each) and "
            f"{RQ_KMEANS_NAME} (`TokenizerConfig(backend=\"rq-kmeans\")`, per-source residual k-means with the tokens' "
            "codes per source). Probe AUC as in the table above (mean over tasks); reconstruction on the held-out "
            "users.\n\n" + markdown_table(rows) + f"\n{verdict}.\n")


def step_tokenize(ctx: DemoContext) -> StepResult:
    """Fit U2QT; report compression, usage, collisions; probe and recommend from tokens vs raw embeddings; churn."""
    from pluribus.tokenizer import TokenizerConfig, UserTokenizer
    from pluribus.tokenizer.metrics import token_features, tokenizer_report

    ds = ctx.data
    quick = ctx.config.quick
    embeddings, stage1 = _stage1(ds, quick)
    train, held_out = split_indices(ds.n_users, (0.8, 0.2), seed=0)
    config = TokenizerConfig(epochs=60 if quick else 300, seed=0)
    start = time.perf_counter()
    tokenizer = UserTokenizer(config, progress=True).fit(embeddings.subset(train))
    fit_seconds = time.perf_counter() - start
    tokenizer.save(ctx.run.path / TOKENIZER_FOLDER)
    codes = tokenizer.encode(embeddings)
    report = tokenizer_report(tokenizer, embeddings.subset(held_out), usage_data=embeddings)

    raw = np.concatenate([embeddings.embeddings[s] for s in embeddings.source_names], axis=1)
    tokens = token_features(tokenizer, codes)
    raw_name, tokens_name = "raw embeddings (float32)", "U2QT tokens"
    size = report["bytes_per_user"]
    yardstick_features, yardsticks = _equal_bytes(embeddings, train, held_out, config, int(size["codes"]))
    methods, probe_text = compare_probes(
        ctx, {raw_name: raw, tokens_name: tokens, **yardstick_features},
        plot_name="tokenize_probe_auc", title="U2QT tokens vs raw embeddings and yardsticks at equal bytes",
    )
    equal_bytes_text = _equal_bytes_text(methods, tokens_name, size, report["reconstruction"], yardsticks)
    ctx.save_artifact(
        "tokenize",
        {"codes": torch.from_numpy(codes.astype(np.int32)), "code_vectors": torch.from_numpy(tokenizer.code_vectors(codes))},
        {"sources": list(tokenizer.source_names_), "levels": len(tokenizer.level_sizes_)},
    )
    recommend = _recommendation(ctx, {tokens_name: tokens, **yardstick_features, raw_name: raw,
                                      SIMPLE: simple_features(ds)})
    churn, churn_text = _churn(embeddings, train, held_out, config, tokenizer)

    collisions = report["collisions"]
    recon = report["reconstruction"]
    summary_rows = [
        {"metric": "codes per user", "value": f"{codes.shape[1]} sources x {codes.shape[2]} levels "
                                              f"({config.n_shared} shared + {config.n_specific} specific)"},
        {"metric": "bytes per user (uint16 codes)", "value": f"{size['codes']:.0f}"},
        {"metric": "bytes per user (float32 embeddings)", "value": f"{size['float32']:.0f}"},
        {"metric": "compression vs float32", "value": f"{size['ratio_float32']:.0f}x"},
        {"metric": "lowest codebook usage over levels", "value": f"{report['min_usage']:.1%}"},
        {"metric": "full-tuple collision rate", "value": f"{collisions['collision_rate']:.2%}"},
        {"metric": "held-out reconstruction cosine (mean over sources)",
         "value": f"{np.mean([r['cosine'] for r in recon.values()]):.3f}"},
        {"metric": "stage-1 embedding", "value": f"{stage1['seconds']:.0f} s ({stage1['cache']} cache)"},
        {"metric": "RQ-VAE fit", "value": f"{fit_seconds:.0f} s"},
    ]
    usage_rows = [{k: v for k, v in row.items() if k in ("level", "part", "size", "usage", "perplexity", "dead")}
                  for row in report["codebook_usage"]]
    section = (
        "## Step 1, U2QT: user tokens\n\n"
        f"Each user's sources are embedded with all-MiniLM-L6-v2 ({_stage1_text(stage1)}) and quantised by a "
        f"multi-view RQ-VAE fitted on {len(train)} training users ({config.epochs} epochs); metrics on all "
        f"{ds.n_users} users, reconstruction on the {len(held_out)} held-out users.\n\n" + markdown_table(summary_rows)
        + "\n<details><summary>codebook usage per level</summary>\n\n" + markdown_table(usage_rows)
        + "\n</details>\n\n### Linear probes\n\n" + probe_text + "\n" + equal_bytes_text
        + ("\n" + recommend[1] + "\n" if recommend else "") + "\n" + churn_text
    )
    summary = [probe_summary_row(methods, tokens_name, raw_name,
                                 ours_note=f"at {size['codes']:.0f} bytes/user",
                                 baseline_note=f"at {size['float32']:.0f} bytes/user"),
               *[probe_summary_row(methods, tokens_name, name, ours_note=f"at {size['codes']:.0f} bytes/user",
                                   baseline_note=f"at {info['bytes']} bytes/user")
                 for name, info in yardsticks.items()],
               probe_summary_row(methods, tokens_name, SIMPLE)]
    metrics: dict[str, Any] = {"bytes_per_user": size, "collisions": collisions, "min_usage": report["min_usage"],
                               "reconstruction": recon, "probes": methods, "stage1": stage1,
                               "fit_seconds": fit_seconds, "churn": churn, "equal_bytes": yardsticks}
    if recommend:
        runs = recommend[0]
        metrics["recommendation"] = runs
        recall = {name: [r["recall"] for r in arm] for name, arm in runs.items()}
        best_base = max(("popularity", "item-kNN"), key=lambda a: float(np.mean(recall[a])))
        beside = [best_base] + [n for n in (PCA_NAME, raw_name) if n in recall]
        ratio = float(np.mean(recall[tokens_name]) / np.mean(recall[best_base]))
        summary.append({
            "measure": "next-item Recall@10 (readout chosen on validation)",
            "ours": f"{tokens_name} {mean_std(recall[tokens_name])} ({ratio:.2f}x {best_base})",
            "baseline beside it": "; ".join(f"{n} {mean_std(recall[n])}" for n in beside),
            "verdict": "; ".join(f"{compare_word(recall[tokens_name], recall[n])} {n}" for n in beside),
        })
    warm_label, cold_label = list(churn)
    summary.append({
        "measure": "codes changed by a refit on twice the users",
        "ours": f"warm start {churn[warm_label]['codes']:.0%} (level 0: {churn[warm_label]['per_level'][0]:.0%} of users)",
        "baseline beside it": f"cold refit {churn[cold_label]['codes']:.0%} (level 0: "
                              f"{churn[cold_label]['per_level'][0]:.0%})",
        "verdict": ("fewer codes change with a warm start" if churn[warm_label]["codes"] < churn[cold_label]["codes"]
                    else "a warm start does not keep more codes here") + " (one refit, no spread)",
    })
    note = f"stage-1 embedding {stage1['seconds']:.0f} s ({stage1['cache']} cache), RQ-VAE fit {fit_seconds:.0f} s"
    return StepResult(metrics, section, summary=summary, timing_note=note)

"""Demo step 2, GGSM: a small decoder pretrained on the users' histories in the event language, trained as a
contrastive user encoder with the gradient-guided soft-mask schedule; trained vs untrained (same head seed).

The encoder reads the history in the event language (``pluribus.encoder.event_language``: ``i<item> r<rating>``
for MovieLens ratings); the U2QT codes feed FedBone. On 2 CPU cores a 135M-parameter LLM with LoRA does not
learn in the demo's budget (the loss stays at chance); the 4-layer decoder, pretrained on the same users'
histories (cached, so a rerun is warm), does (docs/results/encoder.md).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from pluribus.demo.basic import PROBE_C, SIMPLE, compare_probes, mean_auc, probe_summary_row
from pluribus.demo.runner import DemoContext, StepResult
from pluribus.eval.report import compare_word, line_plot, markdown_table, mean_std

#: (pretraining steps, contrastive training steps) of the demo: --quick, full
QUICK_STEPS = (100, 60)
FULL_STEPS = (300, 80)
# batch as benchmarks/encoder/learns.py; its lr 3e-4 suits 300 steps, these short runs learn more at 1e-3 (held-out
# Recall@10 quick 0.71 vs 0.66, full 0.434 vs 0.423; docs/results/encoder.md)
BATCH, LR = 32, 1e-3
HISTORY_EVENTS, FUTURE_EVENTS = 48, 10
#: PretrainSettings fields besides the steps (the decoder's shape; empty: the library's 4-layer, hidden 128)
PRETRAIN_SHAPE: dict[str, Any] = {}


def code_token_ids(tokenizer: object, codes: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Fixed-width token ids ``[users, sources * levels]`` of U2QT codes and the token strings they index.

    A source a user lacks fills its slots with that source's empty token, so every user has the same width
    (the collision suffix is left out: it tells users apart but carries no meaning for the encoder).
    """
    from pluribus.tokenizer import EMPTY_CODE

    vocab = tokenizer.vocabulary_  # type: ignore[attr-defined]
    strings = vocab.tokens()
    index = {t: i for i, t in enumerate(strings)}
    users, sources, levels = codes.shape
    ids = np.empty((users, sources * levels), dtype=np.int64)
    for s in range(sources):
        empty = index[f"<s{s}_empty>"]
        for lvl in range(levels):
            column = codes[:, s, lvl].astype(np.int64)
            lookup = np.array([index[vocab.token(s, lvl, c)] for c in range(vocab.level_sizes[lvl])])
            ids[:, s * levels + lvl] = np.where(column == EMPTY_CODE, empty, lookup[np.minimum(column, len(lookup) - 1)])
    return ids, strings


def step_encode(ctx: DemoContext) -> StepResult:
    """Pretrain (or reuse) the event-language decoder; per seed, train it as a GGSM encoder and compare it with
    its untrained copy (same head) on held-out retrieval and linear probes."""
    from pluribus.data.locate import data_home
    from pluribus.encoder import ScheduleConfig, TrainConfig, UserEncoder
    from pluribus.encoder.event_language import PretrainSettings, choose_source, vehicle
    from pluribus.encoder.metrics import heldout_retrieval
    from pluribus.encoder.train import train_encoder
    from pluribus.eval.probes import probe_tasks

    quick = ctx.config.quick
    pretrain_steps, steps = QUICK_STEPS if quick else FULL_STEPS
    source = choose_source(ctx.data)
    has_future = source in ctx.data.future and not ctx.data.future[source].empty
    t0 = time.time()
    settings = PretrainSettings(steps=pretrain_steps, **PRETRAIN_SHAPE)
    v = vehicle(ctx.data, data_home() / "encoder" / "event-language", source=source, settings=settings,
                history_events=HISTORY_EVENTS, future_events=FUTURE_EVENTS)
    pretrain_s, setup_s = v.pretrain_seconds, time.time() - t0
    tasks = ctx.probe_tasks()
    probe_seed = ctx.seeds[:1]
    per_seed: list[dict[str, Any]] = []
    train_s = eval_s = 0.0
    first: dict[str, Any] = {}
    for seed in ctx.seeds:
        t = time.time()
        torch.manual_seed(seed)  # the same head initialisation for both arms of a seed
        untrained = UserEncoder(v.config)
        u_ret = heldout_retrieval(untrained, v.held)
        # the untrained arm's probes: the first seed's only (compare_probes below), they barely move with the head
        u_emb = untrained.encode(v.inputs, progress=False) if not first else None
        eval_s += time.time() - t
        t = time.time()
        torch.manual_seed(seed)
        encoder = UserEncoder(v.config)
        result, schedule = train_encoder(encoder, v.train, ScheduleConfig(total_steps=steps),
                                         TrainConfig(steps=steps, batch_size=BATCH, lr=LR, seed=seed),
                                         run=ctx.run, checkpoint_name=f"last-seed{seed}")  # each seed resumes
        train_s += time.time() - t
        t = time.time()
        t_ret = heldout_retrieval(encoder, v.held)
        t_emb = encoder.encode(v.inputs, progress=False)
        t_auc = mean_auc({k: r.as_dict() for k, r in probe_tasks(t_emb, ctx.data, tasks, seeds=probe_seed,
                                                                        c=PROBE_C).items()},
                          tasks)
        eval_s += time.time() - t
        per_seed.append({"seed": seed, "untrained": u_ret, "trained": t_ret, "trained_mean_auc": t_auc, "losses": result.losses, "future_weights": result.future_weights,
                         "chance_loss": result.chance_loss, "collapsed": result.collapsed,
                         "final_loss": result.tail("losses"), "summary": result.summary(),
                         "diagnostics": result.diagnostics(), "nonfinite_steps": result.nonfinite_steps})
        if not first:
            first = {"trained": t_emb, "untrained": u_emb, "mask_check": encoder.mask_check_summary(),
                     "mask_check_result": encoder.mask_check_result}

    ctx.save_artifact("encode", {"user_embeddings": torch.from_numpy(first["trained"])},
                      {"dim": int(first["trained"].shape[1])})
    t = time.time()
    methods, probe_text = compare_probes(ctx, {"GGSM trained": first["trained"], "GGSM untrained": first["untrained"]},
                                         plot_name="encode_probe_auc", title="GGSM user embeddings vs simple features")
    eval_s += time.time() - t
    tokens_probe = ctx.earlier_metrics("tokenize").get("probes", {}).get("U2QT tokens")
    if tokens_probe:
        methods["U2QT tokens"] = tokens_probe

    chance = per_seed[0]["chance_loss"]
    series = {f"seed {r['seed']} loss": (list(range(1, len(r["losses"]) + 1)), r["losses"]) for r in per_seed}
    series[f"chance, ln {BATCH}"] = (list(range(1, steps + 1)), [chance] * steps)
    curve = line_plot(ctx.run.plot_path("encode_training"), series, xlabel="optimizer step",
                      ylabel="InfoNCE loss (in-batch)", title="GGSM training on the event language")

    def values(arm: str, key: str) -> list[float]:
        return [float(r[arm][key]) for r in per_seed]

    n_held = len(v.held)
    recall_t, recall_u = values("trained", "recall@10"), values("untrained", "recall@10")
    collapsed = sum(bool(r["collapsed"]) for r in per_seed)
    seeds_word = f"{len(per_seed)} seed{'s' if len(per_seed) > 1 else ''}"
    collapse_word = "not collapsed" if not collapsed else f"**collapsed** in {collapsed} of {len(per_seed)} seeds"
    gap = float(np.mean(recall_t) - np.mean(recall_u))
    summary = [
        {"measure": f"held-out Recall@10 ({n_held} users, {seeds_word})", "ours": f"GGSM trained {mean_std(recall_t)}",
         "baseline beside it": f"untrained, same head {mean_std(recall_u)}",
         "verdict": f"{compare_word(recall_t, recall_u)} untrained (gap {gap:+.3f}); {collapse_word}"},
        probe_summary_row(methods, "GGSM trained", SIMPLE,
                          ours_note=f"(untrained {mean_auc(methods['GGSM untrained'], tasks):.3f})"),
    ]
    warnings = []
    if n_held < 50:
        warnings.append(f"GGSM held-out retrieval scores only {n_held} users: Recall@10 is noisy")
    if collapsed:
        warnings.append(f"GGSM training collapsed in {collapsed} of {len(per_seed)} seeds (loss at ln B)")

    lang = v.language
    example = v.train.anchors[0].text.split()
    rows = [
        {"setting": "backbone", "value": f"{settings.layers}-layer Qwen3 decoder (hidden {settings.hidden}), pretrained "
         f"{pretrain_steps} steps by next-token prediction on these {len(v.user_ids)} users' {source} histories "
         f"({'cached: ' if v.cached else ''}{pretrain_s:.0f} s); full fine-tuning"},
        {"setting": "input", "value": f"the last {HISTORY_EVENTS} {source} events in the event language, e.g. "
         f"`{' '.join(example[:8])} ...` ({len(lang.words())} words); the U2QT codes feed FedBone, not this step"},
        {"setting": "positive", "value": f"the next {FUTURE_EVENTS} held-out {source} events, same language"
         + ("" if has_future else f" (the data holds out no future: each user's last {FUTURE_EVENTS} events)")},
        {"setting": "users", "value": f"{len(v.train)} train, {n_held} held out (never trained on)"},
        {"setting": "training", "value": f"{steps} steps, batch {BATCH}, lr {LR} (warm-up + cosine), InfoNCE "
         "(temperature 0.02, false-negative margin 0.1), GG-SM mask schedule (library defaults)"},
        {"setting": "loss vs ln B", "value": "; ".join(f"seed {r['seed']}: {r['losses'][0]:.3f} -> "
                                                      f"{r['final_loss']:.3f} (ln B {r['chance_loss']:.3f})"
                                                      for r in per_seed)},
        {"setting": "collapsed", "value": collapse_word},
        {"setting": "mask self-check", "value": first["mask_check"]},
        {"setting": "time", "value": f"pretrain {pretrain_s:.0f} s, training {train_s:.0f} s, evaluation {eval_s:.0f} s"},
    ]
    arms = [("untrained (same head)", "untrained"), ("GGSM trained", "trained")]
    untrained_auc = mean_auc(methods["GGSM untrained"], tasks)
    probe_cells = {"untrained": f"{untrained_auc:.3f} (seed {ctx.seeds[0]})",
                   "trained": mean_std([r["trained_mean_auc"] for r in per_seed])}
    retrieval_rows = [{"encoder": name, "Recall@1": mean_std(values(arm, "recall@1")),
                       "Recall@10": mean_std(values(arm, "recall@10")), "MRR": mean_std(values(arm, "mrr")),
                       "probe mean AUC": probe_cells[arm]} for name, arm in arms]
    seed_rows = [{"seed": r["seed"], "untrained Recall@10": r["untrained"]["recall@10"],
                  "trained Recall@10": r["trained"]["recall@10"], "trained mean AUC": r["trained_mean_auc"]}
                 for r in per_seed]
    section = (
        "## Step 2, GGSM: user encoder\n\n"
        "The encoder reads the history in the event language; U2QT codes feed FedBone (a U2QT code prefix gave "
        "the same held-out Recall@10 at 1.4x the time, docs/results/encoder.md). Both arms of a seed start "
        "from the same pretrained decoder and the same random head (`torch.manual_seed(seed)`); only the trained "
        "arm runs `train_encoder`, so the gap is the contrastive training's.\n\n"
        + markdown_table(rows) + "\n"
        + "\n".join(f"- seed {r['seed']}: {r['summary']}" for r in per_seed) + "\n\n"
        f"### Held-out retrieval\n\nIs each held-out user's true future the closest among all {n_held} held-out "
        f"users' futures? (chance Recall@10 = {min(10, n_held) / n_held:.3f}); mean ± std over {seeds_word}. Probe "
        f"mean AUC over {len(tasks)} tasks: the trained encoder of each seed (probe seed {probe_seed[0]}, 5 folds); "
        f"the untrained one of seed {ctx.seeds[0]} (the probe table below).\n\n"
        + markdown_table(retrieval_rows) + "\nPer seed:\n\n" + markdown_table(seed_rows, digits=3)
        + f"\n![training curve]({curve.name})\n\n### Linear probes (seed {ctx.seeds[0]}'s encoders)\n\n" + probe_text
    )
    metrics = {"probes": methods, "source": source, "pairs": len(v.train) + len(v.held), "train_pairs": len(v.train),
               "heldout_users": n_held, "positive": "future_events", "steps": steps, "pretrain_steps": pretrain_steps,
               "pretrain_cached": v.cached, "pretrain_folder": str(v.folder),
               "seconds": {"pretrain": pretrain_s, "setup": setup_s, "train": train_s, "eval": eval_s},
               "per_seed": per_seed, "collapsed": bool(collapsed), "chance_loss": chance,
               "retrieval": {arm: {k: float(np.mean(values(arm, k))) for k in ("recall@1", "recall@10", "mrr")}
                             for _, arm in arms},
               "mask_check": first["mask_check_result"]}
    note = (f"pretrain {pretrain_s:.0f} s ({'cached' if v.cached else 'cold: first run on these users'}), "
            f"training {train_s:.0f} s, evaluation {eval_s:.0f} s")
    return StepResult(metrics, section, warnings, summary=summary, timing_note=note)

"""Demo step 2, GGSM: a decoder-only LLM reads each user's U2QT codes as added tokens; trained briefly with
the gradient-guided soft-mask schedule (InfoNCE against a description of the user's held-out future)."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from pluribus.demo.basic import compare_probes
from pluribus.demo.runner import DemoContext, StepResult
from pluribus.demo.tokenize import TOKENIZER_FOLDER
from pluribus.eval.report import line_plot, markdown_table


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
    """Train the GGSM encoder on U2QT code tokens and probe its frozen user embeddings."""
    from pluribus.encoder import EncoderConfig, ScheduleConfig, TrainConfig, UserEncoder
    from pluribus.encoder.metrics import heldout_retrieval
    from pluribus.encoder.model import UserInput
    from pluribus.encoder.pairs import build_pairs, split_pairs
    from pluribus.encoder.train import train_encoder
    from pluribus.tokenizer import UserTokenizer

    tensors, _ = ctx.artifact("tokenize", needed_by="encode")
    tokenizer = UserTokenizer.load(ctx.run.path / TOKENIZER_FOLDER, progress=False)
    ids, vocab = code_token_ids(tokenizer, tensors["codes"].numpy())
    source = "ratings" if "ratings" in ctx.data.sources else ctx.data.source_names[0]
    # The positive is the user's next held-out events where the data has a future (learnable from the history,
    # unlike a templated summary that reads nearly the same for every user), else the user's profile.
    has_future = source in ctx.data.future and not ctx.data.future[source].empty
    positive: Literal["future_events", "profile"] = "future_events" if has_future else "profile"
    pairs = build_pairs(ctx.data, source=source, inputs="codes", codes=ids, code_vocab=vocab, positive=positive)
    # a fifth of the users never trains: retrieval on them measures generalisation, not memorised pairs
    train_pairs, held = split_pairs(pairs, 0.2, seed=0)
    assert held is not None

    quick = ctx.config.quick
    # A 135M-parameter decoder trains at seconds per step on 2 CPU cores: the demo's budget is small on
    # purpose (`pluribus encoder train` and benchmarks/encoder_masks.py run longer studies).
    steps, batch = (4, 8) if quick else (24, 16)
    encoder_config = EncoderConfig(max_length=48, batch_size=32)
    # The added code tokens start from their U2QT code vectors (projected to the model width), not from
    # noise: with a few dozen CPU steps the encoder could not learn what each of ~1,000 new tokens means.
    torch.manual_seed(0)  # the head's random init: the untrained arm below is the same on a rerun
    encoder = UserEncoder(encoder_config, extra_tokens=pairs.extra_tokens,
                          extra_token_vectors=tokenizer.token_vectors())
    # before training: the same backbone, added-token init and random head, so the gain is the training's
    untrained = heldout_retrieval(encoder, held)
    users = [UserInput(" ".join(vocab[i] for i in row)) for row in ids]
    features: dict[str, np.ndarray] = {}
    schedule = ScheduleConfig(policy="ggsm", total_steps=steps, warmup_ratio=0.25)
    result, _ = train_encoder(encoder, train_pairs, schedule, TrainConfig(steps=steps, batch_size=batch, lr=2e-4,
                                                                    checkpoint_every=max(steps // 4, 1)),
                              run=ctx.run)
    trained = heldout_retrieval(encoder, held)
    embeddings = encoder.encode(users)
    features["GGSM encoder"] = embeddings
    ctx.save_artifact("encode", {"user_embeddings": torch.from_numpy(embeddings)}, {"dim": int(embeddings.shape[1])})

    tokens_probe = ctx.earlier_metrics("tokenize").get("probes", {}).get("U2QT tokens")
    methods, probe_text = compare_probes(ctx, features, plot_name="encode_probe_auc",
                                         title="GGSM user embeddings vs simple features")
    if tokens_probe:
        methods["U2QT tokens"] = tokens_probe
    curve = line_plot(
        ctx.run.plot_path("encode_training"),
        {"InfoNCE loss": (list(range(1, len(result.losses) + 1)), result.losses),
         "mean future weight": (list(range(1, len(result.future_weights) + 1)), result.future_weights)},
        xlabel="optimizer step", ylabel="value", title="GGSM training: loss and future-attention weight",
    )
    rows = [
        {"setting": "backbone", "value": f"{encoder_config.model} + LoRA r={encoder_config.lora.r}"},
        {"setting": "input", "value": f"{ids.shape[1]} U2QT code tokens per user ({len(vocab)} added tokens, "
                                       "embeddings initialised from the code vectors)"},
        {"setting": "positive", "value": f"the next 3 held-out {source} events" if positive == "future_events"
         else "description of the user's profile"},
        {"setting": "users", "value": f"{len(train_pairs)} train, {len(held)} held out (retrieval)"},
        {"setting": "mask schedule", "value": f"GG-SM, warm-up {schedule.warmup_ratio:.0%} of {steps} steps, then linear to bidirectional"},
        {"setting": "loss first -> last", "value": f"{result.losses[0]:.3f} -> {result.losses[-1]:.3f}"},
        {"setting": "non-finite steps", "value": str(result.nonfinite_steps)},
        {"setting": "collapsed", "value": "**yes**" if result.collapsed else "no"},
        {"setting": "mask self-check", "value": encoder.mask_check_summary()},
    ]
    retrieval_rows = [
        {"encoder": name, "Recall@1": r["recall@1"], "Recall@10": r["recall@10"], "MRR": r["mrr"],
         "held-out users": int(r["users"])}
        for name, r in (("untrained (same head)", untrained), ("GGSM trained", trained))
    ]
    section = (
        "## Step 2, GGSM: user encoder\n\n" + markdown_table(rows) + "\n" + result.summary() + "\n\n"
        f"### Held-out retrieval\n\nIs each held-out user's true positive the closest among all "
        f"{len(held)} held-out users' positives? (chance Recall@1 = {1 / len(held):.3f})\n\n"
        + markdown_table(retrieval_rows) + "\n### Linear probes\n\n" + probe_text
        + f"\n![training curve]({curve.name})\n"
    )
    metrics = {"losses": result.losses, "future_weights": result.future_weights, "probes": methods,
               "pairs": len(pairs), "train_pairs": len(train_pairs), "positive": positive, "steps": steps,
               "retrieval": {"untrained": untrained, "trained": trained}, "diagnostics": result.diagnostics(),
               "chance_loss": result.chance_loss, "collapsed": result.collapsed,
               "mask_check": encoder.mask_check_result}
    return StepResult(metrics, section)

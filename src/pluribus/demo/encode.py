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
    from pluribus.encoder.model import UserInput
    from pluribus.encoder.pairs import build_pairs
    from pluribus.encoder.train import train_encoder
    from pluribus.tokenizer import UserTokenizer

    tensors, _ = ctx.artifact("tokenize", needed_by="encode")
    tokenizer = UserTokenizer.load(ctx.run.path / TOKENIZER_FOLDER, progress=False)
    ids, vocab = code_token_ids(tokenizer, tensors["codes"].numpy())
    source = "ratings" if "ratings" in ctx.data.sources else ctx.data.source_names[0]
    # The positive describes the user's held-out future where the data has one, else the user's profile.
    positive: Literal["future", "profile"] = "future" if source in ctx.data.future else "profile"
    pairs = build_pairs(ctx.data, source=source, inputs="codes", codes=ids, code_vocab=vocab, positive=positive)

    quick = ctx.config.quick
    # A 135M-parameter decoder trains at seconds per step on 2 CPU cores: the demo's budget is small on
    # purpose (`pluribus encoder train` and benchmarks/encoder_masks.py run longer studies).
    steps, batch = (4, 8) if quick else (24, 16)
    encoder_config = EncoderConfig(max_length=48, batch_size=32)
    # The added code tokens start from their U2QT code vectors (projected to the model width), not from
    # noise: with a few dozen CPU steps the encoder could not learn what each of ~1,000 new tokens means.
    encoder = UserEncoder(encoder_config, extra_tokens=pairs.extra_tokens,
                          extra_token_vectors=tokenizer.token_vectors())
    users = [UserInput(" ".join(vocab[i] for i in row)) for row in ids]
    features: dict[str, np.ndarray] = {}
    schedule = ScheduleConfig(policy="ggsm", total_steps=steps, warmup_ratio=0.25)
    result, _ = train_encoder(encoder, pairs, schedule, TrainConfig(steps=steps, batch_size=batch, lr=2e-4,
                                                                    checkpoint_every=max(steps // 4, 1)),
                              run=ctx.run)
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
        {"setting": "positive", "value": f"description of the held-out future {source}" if positive == "future"
         else "description of the user's profile"},
        {"setting": "mask schedule", "value": f"GG-SM, warm-up {schedule.warmup_ratio:.0%} of {steps} steps, then linear to bidirectional"},
        {"setting": "loss first -> last", "value": f"{result.losses[0]:.3f} -> {result.losses[-1]:.3f}"},
        {"setting": "non-finite steps", "value": str(result.nonfinite_steps)},
    ]
    section = (
        "## Step 2, GGSM: user encoder\n\n" + markdown_table(rows) + "\n" + probe_text
        + f"\n![training curve]({curve.name})\n"
    )
    metrics = {"losses": result.losses, "future_weights": result.future_weights, "probes": methods,
               "pairs": len(pairs), "steps": steps}
    return StepResult(metrics, section)

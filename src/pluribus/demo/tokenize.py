"""Demo step 1, U2QT: embed each source, fit the multi-view RQ-VAE on training users, encode everyone."""

from __future__ import annotations

import numpy as np
import torch

from pluribus.data.locate import data_home
from pluribus.data.split import split_indices
from pluribus.demo.basic import compare_probes
from pluribus.demo.runner import DemoContext, StepResult
from pluribus.eval.report import markdown_table

TOKENIZER_FOLDER = "tokenizer"


def step_tokenize(ctx: DemoContext) -> StepResult:
    """Fit U2QT, report compression, codebook usage and collisions, and probe tokens vs raw embeddings."""
    from pluribus.tokenizer import EmbedConfig, TokenizerConfig, UserTokenizer, embed_dataset
    from pluribus.tokenizer.metrics import token_features, tokenizer_report

    ds = ctx.data
    # Stage 1 dominates the chain's run time on a CPU: the demo embeds each source's last events only
    # (30 events in 256 word pieces; --quick: 10 in 64). `pluribus tokenize` uses the full defaults.
    quick = ctx.config.quick
    embed_config = EmbedConfig(max_events=10 if quick else 30, max_length=64 if quick else 256)
    embeddings = embed_dataset(ds, embed_config, cache_dir=data_home() / "embeddings", progress=True)
    train, held_out = split_indices(ds.n_users, (0.8, 0.2), seed=0)
    config = TokenizerConfig(epochs=60 if quick else 300, seed=0)
    tokenizer = UserTokenizer(config, progress=True).fit(embeddings.subset(train))
    tokenizer.save(ctx.run.path / TOKENIZER_FOLDER)
    codes = tokenizer.encode(embeddings)
    report = tokenizer_report(tokenizer, embeddings.subset(held_out), usage_data=embeddings)

    raw = np.concatenate([embeddings.embeddings[s] for s in embeddings.source_names], axis=1)
    tokens = token_features(tokenizer, codes)
    methods, probe_text = compare_probes(
        ctx, {"raw embeddings (float32)": raw, "U2QT tokens": tokens},
        plot_name="tokenize_probe_auc", title="U2QT tokens vs raw embeddings",
    )
    ctx.save_artifact(
        "tokenize",
        {"codes": torch.from_numpy(codes.astype(np.int32)), "code_vectors": torch.from_numpy(tokenizer.code_vectors(codes))},
        {"sources": list(tokenizer.source_names_), "levels": len(tokenizer.level_sizes_)},
    )

    size = report["bytes_per_user"]
    collisions = report["collisions"]
    usage = report["codebook_usage"]
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
    ]
    usage_rows = [{k: v for k, v in row.items() if k in ("level", "part", "size", "usage", "perplexity", "dead")}
                  for row in usage]
    section = (
        "## Step 1, U2QT: user tokens\n\n"
        f"Each user's sources ({', '.join(tokenizer.source_names_)}) are embedded with all-MiniLM-L6-v2 "
        f"(the last {embed_config.max_events} events, up to {embed_config.max_length} word pieces) "
        f"and quantised by a multi-view RQ-VAE fitted on {len(train)} training users "
        f"({config.epochs} epochs); metrics on all {ds.n_users} users, reconstruction on the "
        f"{len(held_out)} held-out users.\n\n" + markdown_table(summary_rows)
        + "\n<details><summary>codebook usage per level</summary>\n\n" + markdown_table(usage_rows)
        + "\n</details>\n\n" + probe_text
    )
    metrics = {"bytes_per_user": size, "collisions": collisions, "min_usage": report["min_usage"],
               "reconstruction": recon, "probes": methods}
    return StepResult(metrics, section)

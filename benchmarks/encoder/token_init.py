"""Does starting U2QT code tokens from their code vectors help a GGSM encoder? (untrained, frozen probes)

Reads a finished demo run folder (its U2QT tokenizer and codes), builds the SmolLM2-135M encoder over the
code tokens twice, with the added token rows from the code vectors (``UserTokenizer.token_vectors()``) and
from the default seeded noise, encodes every user without any training, and probes the frozen embeddings on
the data set's tasks (logistic regression, seeds x 5 folds). The randomly initialised projection head changes
the embeddings too, so both arms are built under the same torch seed, for several seeds (mean ± std).

    .venv/bin/python benchmarks/encoder/token_init.py --run runs/demo
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def main() -> None:
    """Probe both initialisations and print a table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo", help="a finished `pluribus demo` run folder (movielens-100k)")
    ap.add_argument("--seeds", default="0,1,2", help="probe seeds")
    ap.add_argument("--init-seeds", default="0,1,2", help="torch seeds for the encoder's random head")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from pluribus.data.movielens import load_movielens
    from pluribus.demo.encode import code_token_ids
    from pluribus.demo.tokenize import TOKENIZER_FOLDER
    from pluribus.encoder import EncoderConfig, UserEncoder
    from pluribus.encoder.model import UserInput
    from pluribus.eval.probes import probe_tasks
    from pluribus.eval.report import markdown_table
    from pluribus.runs import RunFolder
    from pluribus.tokenizer import UserTokenizer

    run = RunFolder(args.run)
    saved = run.load_checkpoint("artifact-tokenize")
    if saved is None:
        raise SystemExit(f"{args.run} has no finished tokenize step: run `pluribus demo --out {args.run}` first")
    tokenizer = UserTokenizer.load(run.path / TOKENIZER_FOLDER, progress=False)
    ids, vocab = code_token_ids(tokenizer, saved[0]["codes"].numpy())
    users = [UserInput(" ".join(vocab[i] for i in row)) for row in ids]
    ds = load_movielens()
    seeds = tuple(int(s) for s in args.seeds.split(","))
    arms = {"code vectors": tokenizer.token_vectors(), "seeded noise (default)": None}
    per_arm: dict[str, list[dict[str, float]]] = {name: [] for name in arms}
    for init_seed in (int(s) for s in args.init_seeds.split(",")):
        for name, vectors in arms.items():
            torch.manual_seed(init_seed)  # the same head initialisation for both arms
            encoder = UserEncoder(EncoderConfig(max_length=48, batch_size=32), extra_tokens=vocab,
                                  extra_token_vectors=vectors)
            result = probe_tasks(encoder.encode(users, progress=False), ds, seeds=seeds)
            aucs = {task: r.auc_mean for task, r in result.items()}
            per_arm[name].append(aucs)
            print(f"init seed {init_seed}, {name}: mean AUC {np.mean(list(aucs.values())):.3f}", flush=True)
    rows = []
    for name, runs in per_arm.items():
        means = [np.mean(list(a.values())) for a in runs]
        row = {"added token rows": name, "mean AUC": f"{np.mean(means):.3f} ± {np.std(means):.3f}"}
        row.update({task: f"{np.mean([a[task] for a in runs]):.3f}" for task in runs[0]})
        rows.append(row)
    print(markdown_table(rows))


if __name__ == "__main__":
    main()

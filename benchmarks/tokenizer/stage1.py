"""Stage 1 backends on CPU: slices/s, cosine to torch float32 and probe AUC, in one process.

1. Speed and fidelity: the same N real MovieLens-100K ratings slices as the demo embeds (``slice_tokens=254``, the
   rating in the text; rendered with ``pluribus.tokenizer.slices``, a fixed random sample of the 10,028) are
   embedded by the packaged all-MiniLM-L6-v2 with torch float32 (sentence-transformers) and with every installed
   backend of ``EmbedConfig.backend``. The slices are cut into rounds and each round runs every backend in a
   rotated order, so load from other processes on a shared machine falls on all backends alike. Each backend is
   loaded (and exported, first time, into $PLURIBUS_DATA_DIR/models) and warmed up on one batch before timing.
   Printed: slices/s, ratio to torch, per-row cosine to the torch vectors (min, mean).
2. Probe: for the fastest backend whose minimum cosine is >= 0.99, the probe tasks of benchmarks/tokenizer/quality.py
   (logistic regression on the 80/20 user split of each seed, mean AUC over the 7 tasks) on the raw stage-1 vectors
   of the one-text rendering of the three sources (943 users x 3 texts, quality.py's default stage 1), for torch
   float32 and for that backend, seeds 0 1 2. Torch's vectors come from the embedding cache when present.

    nice .venv/bin/python benchmarks/tokenizer/stage1.py --n 512 --threads 1 --probe-also onnx-int8 --out runs/bench/tokenizer_stage1.json

3. ``--cold BACKEND``: only the demo's cold ratings stage 1: all 10,028 slices embedded with BACKEND on every core
   (as the demo's ``_stage1`` runs it) into an empty temporary cache; prints the seconds.

    nice .venv/bin/python benchmarks/tokenizer/stage1.py --cold openvino-bf16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pluribus.data.locate import data_home
from pluribus.data.movielens import load_movielens
from pluribus.data.split import split_indices
from pluribus.eval.report import markdown_table, mean_std
from pluribus.io import write_json
from pluribus.tokenizer import EmbedConfig, embed_dataset
from pluribus.tokenizer import embed as embed_mod
from pluribus.tokenizer.backends import PACKAGES
from pluribus.tokenizer.config import EMBED_BACKENDS
from pluribus.tokenizer.slices import embedder_tokens, slice_source

sys.path.insert(0, str(Path(__file__).parent))
from quality import probe_all  # noqa: E402  (the same tasks, split and probe as the quality table)

SLICES = EmbedConfig(slice_tokens=254, numeric_in_text=True, combine="mean")  # the demo's ratings stage 1


def installed(backend: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(p) is not None for p in PACKAGES.get(backend, ()))


def sample_slices(ds: Any, n: int, seed: int) -> tuple[list[str], dict[str, Any]]:
    count, limit = embedder_tokens(SLICES)
    cut = slice_source(ds, "ratings", SLICES, count_tokens=count, token_limit=limit)
    pick = np.random.default_rng(seed).choice(len(cut.texts), size=min(n, len(cut.texts)), replace=False)
    texts = [cut.texts[i] for i in sorted(pick)]
    lengths = count(texts)
    return texts, {"slices_total": len(cut.texts), "sampled": len(texts), "tokens_mean": float(np.mean(lengths)),
                   "tokens_max": int(np.max(lengths))}


def speed(texts: list[str], backends: list[str], rounds: int, batch: int) -> dict[str, dict[str, Any]]:
    """Seconds per backend over interleaved rounds, plus the vectors; backend load (and export) timed apart."""
    out: dict[str, dict[str, Any]] = {}
    for b in backends:
        cfg = EmbedConfig(backend=b, batch_size=batch)  # type: ignore[arg-type]
        t0 = time.perf_counter()
        note = "sentence-transformers, torch float32"
        if cfg.backend is not None:
            note = embed_mod.load_backend(cfg).in_effect  # in effect, not assumed
        embed_mod.embed_texts(texts[:batch], cfg)  # warm-up (and, for torch, the model load)
        out[b] = {"config": cfg, "load_s": time.perf_counter() - t0, "in_effect": note, "seconds": 0.0, "parts": {}}
        print(f"{b}: loaded and warmed up in {out[b]['load_s']:.1f}s ({note})", flush=True)
    chunks = np.array_split(np.arange(len(texts)), rounds)
    for r, idx in enumerate(chunks):
        order = backends[r % len(backends):] + backends[: r % len(backends)]
        for b in order:
            t0 = time.perf_counter()
            vecs = embed_mod.embed_texts([texts[i] for i in idx], out[b]["config"])
            out[b]["seconds"] += time.perf_counter() - t0
            out[b]["parts"][r] = vecs
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{b} {(sum(len(c) for c in chunks[: r + 1])) / out[b]['seconds']:.1f}/s"
                                                    for b in backends), flush=True)
    for b in backends:
        out[b]["vectors"] = np.concatenate([out[b]["parts"][r] for r in range(len(chunks))])
    return out


def one_text(ds: Any, backend: str | None) -> np.ndarray:
    cfg = EmbedConfig(backend=backend)  # type: ignore[arg-type]
    emb = embed_dataset(ds, cfg, cache_dir=data_home() / "embeddings", include_profile=False, progress=False)
    return emb.concatenated().embeddings["all"]


def cold(backend: str) -> float:
    """Seconds of the demo's ratings stage 1 with ``backend`` from an empty cache, on every core."""
    import tempfile

    from pluribus.threads import cpu_threads

    ds = load_movielens()
    cfg = EmbedConfig(slice_tokens=254, numeric_in_text=True, combine="mean", backend=backend)  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory(prefix="cold-stage1-") as cache, cpu_threads(None):
        t0 = time.perf_counter()
        embed_dataset(ds, cfg, sources=["ratings"], include_profile=False, cache_dir=cache, progress=True)
        seconds = time.perf_counter() - t0
    print(f"{backend}: the demo's ratings stage 1, cold, {torch.get_num_threads()} threads: {seconds:.0f}s")
    return seconds


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the speed/fidelity comparison and the probe of the fastest faithful backend."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=512, help="ratings slices embedded by every backend")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds (backends rotate each round)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch / ONNX Runtime / OpenVINO threads")
    parser.add_argument("--backends", nargs="*", default=None, help="default: torch and every installed backend")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--c", type=float, default=0.1, help="inverse L2 strength of every probe (as quality.py)")
    parser.add_argument("--no-probe", action="store_true")
    parser.add_argument("--probe-also", nargs="*", default=[], help="probe these backends too (e.g. one below 0.99)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/tokenizer_stage1.json"))
    parser.add_argument("--cold", default=None, help="only time the demo's cold ratings stage 1 with this backend")
    args = parser.parse_args(argv)
    if args.cold is not None:
        return {"cold_seconds": cold(args.cold)}
    torch.set_num_threads(args.threads)
    chosen = args.backends or [b for b in EMBED_BACKENDS if b == "torch" or installed(b)]
    if chosen[0] != "torch":
        chosen = ["torch", *[b for b in chosen if b != "torch"]]
    ds = load_movielens()
    texts, sample = sample_slices(ds, args.n, seed=0)
    print(f"{sample['sampled']} of {sample['slices_total']} ratings slices, {sample['tokens_mean']:.0f} word pieces on "
          f"average (max {sample['tokens_max']}); {args.threads} thread(s); backends {chosen}", flush=True)
    runs = speed(texts, chosen, args.rounds, args.batch)
    ref = runs["torch"]["vectors"]
    rows, result = [], {"sample": sample, "args": {k: str(v) for k, v in vars(args).items()}, "backends": {}}
    for b in chosen:
        v = runs[b]["vectors"]
        cos = (v * ref).sum(1) / np.linalg.norm(v, axis=1) / np.linalg.norm(ref, axis=1)
        rate = len(texts) / runs[b]["seconds"]
        entry = {"slices_per_s": rate, "ratio_to_torch": rate / (len(texts) / runs["torch"]["seconds"]),
                 "cos_min": float(cos.min()), "cos_mean": float(cos.mean()), "load_s": runs[b]["load_s"],
                 "in_effect": runs[b]["in_effect"]}
        result["backends"][b] = entry
        rows.append({"backend": b, "slices/s": f"{rate:.1f}", "x torch": f"{entry['ratio_to_torch']:.2f}",
                     "cos min": f"{entry['cos_min']:.4f}", "cos mean": f"{entry['cos_mean']:.5f}",
                     "load s": f"{entry['load_s']:.1f}"})
    print(markdown_table(rows))
    faithful = [b for b in chosen if b != "torch" and result["backends"][b]["cos_min"] >= 0.99]
    if faithful and not args.no_probe:
        best = max(faithful, key=lambda b: result["backends"][b]["slices_per_s"])
        print(f"probe: torch float32 vs {best} (one-text stage 1, 3 sources, seeds {args.seeds})", flush=True)
        probe: dict[str, list[float]] = {}
        extra = [b for b in args.probe_also if b != best and b in chosen]
        for name, backend in (("torch float32", None), (best, best), *((b, b) for b in extra)):
            t0 = time.perf_counter()
            raw = one_text(ds, backend)
            print(f"  {name}: stage 1 in {time.perf_counter() - t0:.0f}s", flush=True)
            probe[name] = []
            for seed in args.seeds:
                train, test = split_indices(ds.n_users, (0.8, 0.2), seed=seed)
                probe[name].append(float(np.mean(list(probe_all(raw, ds, train, test, args.c).values()))))
            if backend is None:
                ref_users = raw
            cos_users = (raw * ref_users).sum(1) / np.maximum(
                np.linalg.norm(raw, axis=1) * np.linalg.norm(ref_users, axis=1), 1e-12)
            result.setdefault("user_vector_cos", {})[name] = [float(cos_users.min()), float(cos_users.mean())]
        result["probe"] = {"backend": best, "auc": probe}
        print(markdown_table([{"stage 1": k, "mean AUC (7 tasks)": mean_std(v),
                               "per seed": ", ".join(f"{x:.4f}" for x in v),
                               "user-vector cos min / mean": "{:.4f} / {:.5f}".format(*result["user_vector_cos"][k])}
                              for k, v in probe.items()]))
        for name in [best, *extra]:
            diff = [a - b for a, b in zip(probe[name], probe["torch float32"], strict=True)]
            print(f"per-seed difference {name} - torch: {', '.join(f'{d:+.4f}' for d in diff)}; seed spread (std) of "
                  f"torch {np.std(probe['torch float32']):.4f}")
    write_json(args.out, result)
    print(f"-> {args.out}")
    return result


if __name__ == "__main__":
    main()

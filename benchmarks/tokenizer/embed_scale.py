"""Stage 1 throughput over Parquet shards: 1 and 2 workers, process-pool and Ray engines, on real MovieLens slices.

The slices are the demo's (``EmbedConfig(slice_tokens=254, numeric_in_text=True)`` on the ``ratings`` source of
MovieLens-100K, rendered by ``pluribus.tokenizer.slices``) for the first ``--users`` users, written as
``--shards`` Parquet shards by ``shards.write_slice_shards``. Then, one after the other in this process, each
into a fresh output folder, with the packaged MiniLM and 1 torch thread per worker:

- ``embed_texts``: every slice text in one in-process call (the current stage 1, no shards; the reference);
- ``local 1``: ``embed_shards`` with the local engine (this process, the model already loaded by the reference);
- ``pool 1`` / ``pool 2``: spawned worker processes (each imports torch and loads MiniLM: start-up included);
- ``ray 1`` / ``ray 2``: a local Ray (``ray.init(num_cpus=workers)``) and Ray Data ``map_batches`` with an actor
  pool (Ray start-up, actors and model loads included; Ray is shut down after each arm).

Reported per arm: wall seconds end to end, slices/s, the 1-minute load average before the arm, and the largest
difference of its vectors from the first round's ``local 1`` output; then the ratios 2 workers / 1 worker per engine and each
arm / ``embed_texts``. ``--rounds`` repeats the whole sequence; on a shared machine, read the load average beside each number.

    nice -n 10 .venv/bin/python benchmarks/tokenizer/embed_scale.py [--users 40] [--shards 8] [--rounds 2] [--engines pool,ray] [--work runs/bench/embed_scale]
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pluribus.data.store import load_user_data
from pluribus.eval.report import markdown_table
from pluribus.io import write_json
from pluribus.tokenizer.config import EmbedConfig
from pluribus.tokenizer.embed import embed_texts
from pluribus.tokenizer.shards import embed_shards, write_slice_shards

SOURCE = "ratings"
DEMO_SLICES = EmbedConfig(slice_tokens=254, numeric_in_text=True, combine="mean")


def vectors(folder: Path) -> dict[str, np.ndarray]:
    """user id -> its ratings vector, over every file of a vector folder."""
    out = {}
    for path in sorted(folder.glob("*.parquet")):
        table = pq.read_table(path)
        for user, value in zip(table.column("user_id").to_pylist(), table.column(SOURCE).to_pylist(), strict=True):
            out[user] = np.asarray(value, dtype=np.float32)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=40, help="first N MovieLens users (their slices are embedded)")
    parser.add_argument("--shards", type=int, default=8, help="Parquet shards the slices are written as")
    parser.add_argument("--engines", default="pool,ray", help="comma-separated: pool, ray")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every arm, in the same order, this many times")
    parser.add_argument("--work", type=Path, default=Path("runs/bench/embed_scale"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("PLURIBUS_PROGRESS", "0")
    shutil.rmtree(args.work, ignore_errors=True)
    ds = load_user_data("movielens-100k")
    ds = ds.subset(list(ds.user_ids[: args.users]))
    written = write_slice_shards(ds, args.work / "slices", DEMO_SLICES, sources=[SOURCE], shards=args.shards)
    texts = pa.concat_tables([pq.read_table(p) for p in sorted((args.work / "slices").glob("*.parquet"))])
    n = texts.num_rows
    print(f"{n} slices of {written['users']} users ({SOURCE}, 254-token slices) in {args.shards} shards; "
          f"{os.cpu_count()} CPUs, 1 torch thread per worker", flush=True)

    rows: list[dict[str, Any]] = []

    def record(rnd: int, arm: str, engine: str, workers: int, seconds: float, load: float, out: Path | None) -> None:
        rows.append({"round": rnd, "arm": arm, "engine": engine, "workers": workers, "seconds": round(seconds, 1),
                     "slices_per_s": round(n / seconds, 2), "load_1min_before": round(load, 2), "out": out})
        print(f"round {rnd} {arm}: {seconds:.1f} s, {n / seconds:.2f} slices/s (load {load:.2f} before)", flush=True)

    engines = args.engines.split(",")
    arms = [("local", 1)] + [(e, w) for e in engines for w in (1, 2)]
    for rnd in range(1, args.rounds + 1):
        load = os.getloadavg()[0]
        start = time.perf_counter()
        embed_texts(texts.column("text").to_pylist(), EmbedConfig())
        record(rnd, "embed_texts (in process)", "-", 1, time.perf_counter() - start, load, None)
        for engine, workers in arms:
            out = args.work / f"vectors-{rnd}-{engine}-{workers}"
            load = os.getloadavg()[0]
            start = time.perf_counter()
            report = embed_shards(args.work / "slices", out, DEMO_SLICES, workers=workers, engine=engine,
                                  progress=False, note=lambda _: None)
            assert report["slices"] == n, report
            record(rnd, f"{engine} {workers}", engine, workers, time.perf_counter() - start, load, out)

    reference = vectors(args.work / "vectors-1-local-1")
    for row in rows:
        out = row.pop("out")
        row["max_abs_diff_vs_local"] = None
        if out is not None:
            got = vectors(out)
            assert got.keys() == reference.keys()
            row["max_abs_diff_vs_local"] = float(max(np.abs(got[u] - reference[u]).max() for u in reference))
    print(markdown_table(rows))
    ratios = []
    for rnd in range(1, args.rounds + 1):
        mine = [r for r in rows if r["round"] == rnd]
        base = mine[0]["slices_per_s"]
        rate = {(r["engine"], r["workers"]): r["slices_per_s"] for r in mine[1:]}
        for engine in engines:
            ratios.append({"round": rnd, "engine": engine,
                           "2 workers / 1 worker": round(rate[engine, 2] / rate[engine, 1], 2),
                           "1 worker / embed_texts": round(rate[engine, 1] / base, 2),
                           "2 workers / embed_texts": round(rate[engine, 2] / base, 2)})
        ratios.append({"round": rnd, "engine": "local", "2 workers / 1 worker": None,
                       "1 worker / embed_texts": round(rate["local", 1] / base, 2), "2 workers / embed_texts": None})
    print(markdown_table(ratios))
    write_json(args.work / "results.json", {"slices": n, "users": written["users"], "shards": args.shards,
                                            "rows": rows, "ratios": ratios})

if __name__ == "__main__":
    main()

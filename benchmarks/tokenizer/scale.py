"""U2QT encode at scale: Parquet streaming vs in-memory encode at 100k and 1M synthetic users.

Stage-1 vectors are generated (``pluribus.data.factors``: 3 sources x ``--dim`` floats, one shared and one
specific latent factor per source), so the embedder is not the bottleneck. They are written once as Parquet
folders of 100k-user files under ``--work``. A small tokenizer (stacked 2+1, 64/32 codes, latent 16) is fitted
on 20k users. Then each measurement runs in its own child process, so peak RSS of one size cannot leak into
another:

- ``stream N``: ``UserTokenizer.encode_parquet`` over the N-user folder, codes written in batches of
  ``--batch-rows`` users to a codes folder (timed after importing pyarrow.parquet and removing the previous
  round's codes folder, the two one-off costs outside the encode itself);
- ``memory N``: the N users' vectors loaded into memory first, then ``encode`` (timed without the load).

Each cell runs ``--repeats`` times, interleaved round-robin with the others (for each size, "memory" then
"stream" back to back); the fastest round is reported (all rounds are in the JSON). Reported: users/s (encode
wall time), the step's CPU seconds (all threads), peak RSS of the child (``VmHWM``) and its RSS just before the
measured step (after imports and the tokenizer load), so ``peak - base`` is what the step itself added, and
the 1-minute load average when each child started. Since the machine may be shared, a second table gives
for every round and size the ratio stream / memory wall time of the two back-to-back runs. ``--check`` (the
default) also verifies that the streamed codes equal the in-memory codes, code for code, for every size.

    .venv/bin/python benchmarks/tokenizer/scale.py [--sizes 100000 1000000] [--dim 32] [--work runs/bench/scale]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pluribus.data.factors import factor_views
from pluribus.eval.report import markdown_table
from pluribus.io import write_json
from pluribus.tokenizer import SourceEmbeddings, TokenizerConfig, UserTokenizer
from pluribus.tokenizer.stream import ENCODE_BATCH_ROWS, read_sample, write_vectors

FILE_ROWS = 100_000


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"/proc/self/status has no {key}")


def _rss_mib() -> float:
    # VmHWM (this process's own high-water mark): ru_maxrss would carry the parent's peak across fork + exec
    return _status_mib("VmHWM")


def _current_rss_mib() -> float:
    return _status_mib("VmRSS")


def _chunk(n: int, seed: int, dim: int, offset: int) -> SourceEmbeddings:
    data = factor_views(n, dim=dim, shared_dim=4, specific_dim=4, seed=seed, mixing_seed=0)
    ids = [f"u{offset + i:08d}" for i in range(n)]
    import numpy as np

    return SourceEmbeddings(np.asarray(ids, dtype=object), data.views, {k: np.ones(n, bool) for k in data.views})


def make_folder(folder: Path, n_users: int, dim: int) -> Path:
    """A vector folder of ``n_users`` users in files of 100k (kept between runs)."""
    done = folder / "DONE"
    if done.exists():
        if "plain" not in done.read_text():
            print(f"note: {folder} was written before write_vectors stored vectors plain (Parquet defaults: "
                  "dictionary + Snappy, ~20% more read CPU); delete it to regenerate", flush=True)
        return folder
    starts = range(0, n_users, FILE_ROWS)
    write_vectors(folder, (_chunk(min(FILE_ROWS, n_users - s), 1000 + s // FILE_ROWS, dim, s) for s in starts))
    done.write_text(f"{n_users} users, vector columns plain")
    return folder


def child(args: argparse.Namespace) -> None:
    """One measurement in this process; prints one JSON line."""
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    tok = UserTokenizer.load(args.tokenizer, progress=False)
    if args.child == "stream":
        # outside the timing, as in the "memory" child (which loads the users first): importing pyarrow.parquet
        # (~0.1 s, once per process) and deleting the previous round's codes folder (unlinking 40 just-written
        # parts took ~0.2 s here; encode_parquet would delete it after writing the new one)
        import shutil

        import pyarrow.parquet  # noqa: F401

        shutil.rmtree(args.codes, ignore_errors=True)
        base = _current_rss_mib()
        t, cpu = time.perf_counter(), time.process_time()
        info = tok.encode_parquet(args.folder, args.codes, batch_rows=args.batch_rows)
        seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
        users = info["users"]
    else:
        emb = read_sample(args.folder, tok.source_names_, args.n)
        from pluribus.tokenizer.inputs import stack_sources

        x, present = stack_sources(emb, tok.source_names_, tok.in_dims_)
        del emb
        base = _current_rss_mib()
        t, cpu = time.perf_counter(), time.process_time()
        codes = tok.encode_tensors(x, present)
        seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
        users = codes.shape[0]
        if args.codes is not None:  # kept for --check (written after the measurement)
            import numpy as np

            np.save(args.codes, codes)
    print(json.dumps({"mode": args.child, "users": users, "seconds": seconds, "users_per_s": users / seconds,
                      "cpu_s": cpu, "peak_rss_mib": _rss_mib(), "base_rss_mib": base, "load_1min": load}))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Generate the folders, fit the tokenizer, run every measurement in a child process, print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--batch-rows", type=int, default=ENCODE_BATCH_ROWS)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the fastest is reported")
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                        help="check that the streamed codes equal the in-memory codes (outside the timing)")
    parser.add_argument("--work", type=Path, default=Path("runs/bench/scale"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench/tokenizer_scale.json"))
    parser.add_argument("--child", choices=["stream", "memory"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--codes", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        child(args)
        return {}
    torch.set_num_threads(1)
    t0 = time.time()
    folders = {}
    for n in args.sizes:
        t = time.time()
        folders[n] = make_folder(args.work / f"vectors-{n}", n, args.dim)
        print(f"{n} users of vectors in {folders[n]} ({time.time() - t:.0f}s)", flush=True)
    cfg = TokenizerConfig(n_shared=2, n_specific=1, shared_size=64, specific_size=32, latent_dim=16,
                          hidden_dims=(64,), epochs=5, collision_suffix=False)
    t = time.time()
    tok = UserTokenizer(cfg, progress=False).fit(_chunk(20_000, 7, args.dim, 0))
    tok_path = tok.save(args.work / "tokenizer")
    print(f"tokenizer fitted on 20000 users in {time.time() - t:.0f}s", flush=True)
    trials: dict[tuple[str, int], list[dict[str, Any]]] = {}
    paired: list[dict[str, Any]] = []
    for trial in range(args.repeats):  # interleaved rounds: load drift on this shared machine hits every cell alike
        for n in args.sizes:
            for mode in ("memory", "stream"):
                codes = args.work / (f"codes-{n}" if mode == "stream" else f"codes-memory-{n}.npy")
                cmd = [sys.executable, __file__, "--child", mode, "--folder", str(folders[n]), "--tokenizer",
                       str(tok_path), "--codes", str(codes), "--n", str(n), "--batch-rows", str(args.batch_rows)]
                res = subprocess.run(cmd, capture_output=True, text=True, check=True)
                row = json.loads(res.stdout.strip().splitlines()[-1])
                trials.setdefault((mode, n), []).append(row)
                print(f"round {trial} {mode:6s} {n:>8d} users: {row['users_per_s']:9.0f} users/s, {row['cpu_s']:.2f} "
                      f"CPU s, peak RSS {row['peak_rss_mib']:7.1f} MiB (base {row['base_rss_mib']:.1f}), "
                      f"load {row['load_1min']:.1f}", flush=True)
            mem, stream = trials[("memory", n)][-1], trials[("stream", n)][-1]
            paired.append({"round": trial, "users": n, "load at start": f"{mem['load_1min']:.1f} / {stream['load_1min']:.1f}",
                           "memory s": f"{mem['seconds']:.2f}", "stream s": f"{stream['seconds']:.2f}",
                           "stream / memory": f"{stream['seconds'] / mem['seconds']:.2f}x",
                           "CPU s memory / stream": f"{mem['cpu_s']:.2f} / {stream['cpu_s']:.2f}"})
    if args.check:
        import numpy as np

        from pluribus.tokenizer.stream import read_codes

        for n in args.sizes:
            _, streamed = read_codes(args.work / f"codes-{n}", tok.source_names_)
            same = np.array_equal(streamed, np.load(args.work / f"codes-memory-{n}.npy"))
            print(f"{n} users: streamed codes {'equal' if same else 'DIFFER FROM'} the in-memory codes", flush=True)
            if not same:
                raise SystemExit(f"streamed codes of {n} users differ from the in-memory encode")
    # the fastest round per cell (least disturbed by other jobs); peak RSS is near-constant across rounds
    runs = [dict(max(rows, key=lambda r: r["users_per_s"]), trials=rows) for (_, _), rows in sorted(trials.items())]
    ref = next(r for r in runs if r["mode"] == "memory" and r["users"] == min(args.sizes))["users_per_s"]
    small = next(r for r in runs if r["mode"] == "stream" and r["users"] == min(args.sizes))["peak_rss_mib"]
    same = {r["users"]: r["users_per_s"] for r in runs if r["mode"] == "memory"}
    rows = [{"mode": r["mode"], "users": r["users"], "encode s": f"{r['seconds']:.2f}", "CPU s": f"{r['cpu_s']:.2f}",
             "users/s": f"{r['users_per_s']:.0f}", "vs in-memory (smallest)": f"{ref / r['users_per_s']:.2f}x slower",
             "vs in-memory (same size)": f"{same[r['users']] / r['users_per_s']:.2f}x slower",
             "peak RSS MiB": f"{r['peak_rss_mib']:.0f}",
             "RSS before step MiB": f"{r['base_rss_mib']:.0f}",
             "peak vs stream (smallest)": f"{r['peak_rss_mib'] / small - 1:+.1%}" if r["mode"] == "stream" else ""}
            for r in runs]
    print("\n" + markdown_table(rows))
    print("stream / memory per round (the two runs back to back):\n" + markdown_table(paired))
    out = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs, "table": rows, "paired": paired}
    write_json(args.out, out)
    print(f"written {args.out} in {time.time() - t0:.0f}s")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])

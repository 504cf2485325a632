"""GGSM mask study: causal / hybrid / bidirectional / scheduler-only / GG-SM at equal steps, >= 3 seeds.

Every policy starts from the same *causally pretrained* decoder, is trained contrastively (history vs held-out
future) for the same number of steps, then frozen; its embeddings of all MovieLens-100K users are probed
(logistic regression, 5-fold AUC) on demographic and future-behaviour tasks. Reported per policy: probe AUC
mean ± std over training seeds, final loss, loss variance over the second half, loss spikes, diverged runs,
and the mean future-key weight; plus loss curves (PNG).

Vehicles:

* ``tiny`` (default, CPU): a small Qwen3 decoder pretrained here by next-token prediction on users' history
  sequences in an item/rating token language ("i50 r5 i172 r4 ..."); the positive is the future sequence.
* ``smollm2``: SmolLM2-135M-Instruct (packaged GGUF) with LoRA on rendered text (``pairs.build_pairs``).

    .venv/bin/python benchmarks/encoder_masks.py --vehicle tiny --steps 150 --seeds 0,1,2
    .venv/bin/python benchmarks/encoder_masks.py --vehicle smollm2 --steps 40 --batch 8 --seeds 0,1,2 --lr 2e-3 \
        --bf16 --max-events 2 --max-length 64 --positive events --future-events 2

Each finished (policy, seed) run is saved to ``<out>/<vehicle>/runs/`` at once; rerunning the same command
with the same settings skips finished runs (an interrupted study loses at most the run in progress).
Embeddings are probed twice: the encoder's output (projection head, L2-normalised) and the mean-pooled last
hidden states of the backbone (the reference row has no head, so the latter compares like with like).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PLURIBUS_PROGRESS", "0")
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # BLAS threads thrash a shared CPU
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pluribus.data.movielens import load_movielens  # noqa: E402
from pluribus.encoder import EncoderConfig, LoraSettings, ScheduleConfig, TrainConfig, UserEncoder  # noqa: E402
from pluribus.encoder.model import UserInput  # noqa: E402
from pluribus.encoder.pairs import PairSet, build_pairs, describe_future, user_inputs  # noqa: E402
from pluribus.encoder.train import train_encoder  # noqa: E402
from pluribus.eval.probes import probe_tasks  # noqa: E402
from pluribus.eval.report import line_plot, markdown_table, mean_std  # noqa: E402
from pluribus.io import read_json, write_json, write_text  # noqa: E402

TASKS = ("gender", "age_35plus", "occupation_student", "future_drama", "future_comedy", "future_action",
         "future_high_rating")

#: name -> schedule overrides (on top of the shared total/warm-up settings)
VARIANTS = {
    "causal": {"policy": "causal"},
    "hybrid": {"policy": "hybrid", "hybrid_weight": 0.5},
    "bidirectional": {"policy": "bidirectional"},
    "scheduler": {"policy": "scheduler", "scheduler_start": 0.0},
    "scheduler-0.5": {"policy": "scheduler", "scheduler_start": 0.5},
    "ggsm": {"policy": "ggsm"},
    "ggsm-zscore": {"policy": "ggsm", "norm": "zscore"},
}


# ---- the tiny vehicle: token language, causal pretraining ------------------------------------------
def event_tokens(frame: object, limit: int) -> str:
    """'i<item> r<rating>' for the last ``limit`` events of a user's frame (chronological)."""
    items = frame["item_id"].astype(str).tolist()[-limit:]  # type: ignore[index]
    ratings = frame["rating"].astype(int).astype(str).tolist()[-limit:]  # type: ignore[index]
    return " ".join(f"i{i} r{r}" for i, r in zip(items, ratings, strict=True))


def token_pairs(ds: object, history_events: int, future_events: int) -> tuple[PairSet, list[UserInput]]:
    """(pairs history -> future in the token language, one history input per user in data set order)."""
    hist = ds.events_by_user("ratings")  # type: ignore[attr-defined]
    fut = {str(u): g.sort_values("timestamp") for u, g in ds.future["ratings"].groupby("user_id")}  # type: ignore[attr-defined]
    pairs = PairSet([], [], [])
    inputs = []
    for uid in ds.user_ids.tolist():  # type: ignore[attr-defined]
        anchor = UserInput(event_tokens(hist[str(uid)], history_events))
        inputs.append(anchor)
        if str(uid) in fut:
            pairs.user_ids.append(str(uid))
            pairs.anchors.append(anchor)
            pairs.positives.append(UserInput(event_tokens(fut[str(uid)], future_events)))
    return pairs, inputs


def pretrain_tiny(ds: object, folder: Path, *, steps: int, seed: int = 0, log: list[float] | None = None) -> Path:
    """Pretrain a small Qwen3 causally on users' history sequences; save model + tokenizer to ``folder``."""
    if (folder / "config.json").exists():
        return folder
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from pluribus.encoder.backbone import word_tokenizer

    hist = ds.events_by_user("ratings")  # type: ignore[attr-defined]
    words = [f"r{r}" for r in range(1, 6)] + [f"i{i}" for i in sorted(
        {int(x) for x in ds.sources["ratings"]["item_id"]} | {int(x) for x in ds.future["ratings"]["item_id"]})]  # type: ignore[attr-defined]
    tok = word_tokenizer(words)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                      tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg)
    window = 128
    seqs = []
    for frame in hist.values():
        ids = tok(event_tokens(frame, 10_000))["input_ids"]
        seqs += [ids[s : s + window] for s in range(0, max(len(ids) - window // 2, 1), window // 2)]
    seqs = [s for s in seqs if len(s) >= 8]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(steps):
        batch = [seqs[i] for i in rng.choice(len(seqs), size=32, replace=False)]
        length = max(len(s) for s in batch)
        ids = torch.full((32, length), tok.pad_token_id)
        mask = torch.zeros((32, length), dtype=torch.long)
        for i, s in enumerate(batch):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if log is not None:
            log.append(float(loss))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# ---- stability --------------------------------------------------------------------------------------
def stability(losses: list[float]) -> dict[str, float]:
    """Loss variance over the second half, spikes (> 1.5x the previous 10-step mean), divergence flag."""
    arr = np.asarray(losses, dtype=float)
    half = arr[len(arr) // 2 :]
    spikes = sum(1 for t in range(10, len(arr)) if arr[t] > 1.5 * arr[t - 10 : t].mean())
    diverged = (not np.isfinite(arr).all()) or float(arr[-5:].mean()) > float(arr[:5].mean())
    return {"loss_var_2nd_half": float(np.var(half)), "spikes": float(spikes), "diverged": float(diverged),
            "final_loss": float(arr[-5:].mean())}


@torch.inference_mode()
def encode_both(enc: UserEncoder, users: Sequence[UserInput], weight: float | torch.Tensor,
                ctx: Callable[[], contextlib.AbstractContextManager]) -> tuple[np.ndarray, np.ndarray]:
    """(encoder outputs ``[N, D]``, mean-pooled last hidden states ``[N, H]``) of users, in one pass."""
    enc.eval()
    size = enc.config.batch_size
    order = sorted(range(len(users)), key=lambda i: -len(users[i].text))  # little padding per batch
    out = np.zeros((len(users), enc.embedding_dim), dtype=np.float32)
    pooled = np.zeros((len(users), enc.hidden_size), dtype=np.float32)
    for s in range(0, len(users), size):
        idx = order[s : s + size]
        batch = enc.tokenize([users[i] for i in idx])
        with ctx():
            hidden, _ = enc.hidden_states(batch, weight)
            p = enc.pool(hidden, batch)
            e = torch.nn.functional.normalize(enc.head(p).float(), dim=-1)
        out[idx] = e.cpu().numpy()
        pooled[idx] = p.float().cpu().numpy()
    return out, pooled


def shorten_positives(ds: object, pairs: PairSet, titles: int) -> None:
    """Re-render the future descriptions with ``titles`` example titles (0 = none), in place."""
    fut = {str(u): g.sort_values("timestamp") for u, g in ds.future["ratings"].groupby("user_id")}  # type: ignore[attr-defined]
    for i, uid in enumerate(pairs.user_ids):
        text = describe_future(fut[uid], "text", examples=titles)
        if titles == 0:
            text = text.replace(" For example: .", "")
        pairs.positives[i] = UserInput(text)


def summary_table(results: dict[str, list[dict]], prefix: str = "") -> str:
    """Markdown table: probe AUC mean ± std over seeds per task, and the stability columns."""
    rows = []
    order = ["pretrained (no CL)", *VARIANTS]
    for name, runs in sorted(results.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)):
        if prefix and prefix + TASKS[0] not in runs[0]:
            continue
        aucs = [np.mean([r[prefix + t] for t in TASKS]) for r in runs]
        row = {"policy": name, "mean AUC": mean_std(aucs)}
        for t in TASKS:
            row[t] = mean_std([r[prefix + t] for r in runs])
        if "final_loss" in runs[0]:
            row["final loss"] = mean_std([r["final_loss"] for r in runs])
            row["loss var (2nd half)"] = mean_std([r["loss_var_2nd_half"] for r in runs], digits=4)
            row["spikes"] = int(sum(r["spikes"] for r in runs))
            row["diverged"] = f"{int(sum(r['diverged'] for r in runs))}/{len(runs)}"
            row["future w (end)"] = f"{runs[0]['mean_future_weight_end']:.3f}"
        if "w0_mean" in runs[0]:
            row["W0 mean (std)"] = f"{np.mean([r['w0_mean'] for r in runs]):.4f} ({np.mean([r['w0_std'] for r in runs]):.4f})"
        rows.append(row)
    columns = ["policy", "mean AUC", *TASKS]
    if not prefix:
        columns += ["final loss", "loss var (2nd half)", "spikes", "diverged", "future w (end)", "W0 mean (std)"]
    return markdown_table(rows, columns, digits=4)


def paired_table(results: dict[str, list[dict]], baseline: str = "causal") -> str:
    """Markdown table of per-seed mean-AUC differences to ``baseline`` (mean ± std, wins), head and pooled."""
    if baseline not in results or len(results[baseline]) < 2:
        return ""

    def mean_auc(row: dict, prefix: str) -> float:
        return float(np.mean([row[prefix + t] for t in TASKS]))

    rows = []
    for name, runs in results.items():
        if name == baseline or "final_loss" not in runs[0] or len(runs) != len(results[baseline]):
            continue
        row = {"policy": f"{name} - {baseline}"}
        for label, prefix in (("head", ""), ("pooled", "pooled_")):
            if prefix + TASKS[0] not in runs[0]:
                continue
            d = [mean_auc(r, prefix) - mean_auc(b, prefix) for r, b in zip(runs, results[baseline], strict=True)]
            row[f"d mean AUC ({label})"] = mean_std(d, digits=4)
            row[f"seeds better ({label})"] = f"{sum(x > 0 for x in d)}/{len(d)}"
        rows.append(row)
    return markdown_table(rows) if rows else ""


def plot_curves(out: Path, curves: dict[str, list[list[float]]], *, batch: int, vehicle: str, smooth: int = 1) -> None:
    """loss_curves.png: per-step loss, mean over seeds (trailing mean over ``smooth`` steps), and chance ln(batch)."""
    series = {}
    for name, runs in curves.items():
        mean = np.mean(runs, axis=0)
        sm = [float(mean[max(0, t - smooth + 1) : t + 1].mean()) for t in range(len(mean))]
        series[name] = (list(range(1, len(mean) + 1)), sm)
    steps = max(len(v[0]) for v in series.values())
    series[f"chance, ln {batch}"] = (list(range(1, steps + 1)), [float(np.log(batch))] * steps)
    ylabel = "InfoNCE loss (mean over seeds" + (f", {smooth}-step trailing mean)" if smooth > 1 else ")")
    line_plot(out / "loss_curves.png", series, xlabel="optimizer step", ylabel=ylabel,
              title=f"GGSM mask policies ({vehicle})")


def write_report(out: Path, header: str, results: dict[str, list[dict]]) -> None:
    """Write report.md and print the header and table(s)."""
    table = summary_table(results)
    first = next(iter(results.values()))[0]
    if "pooled_" + TASKS[0] in first:
        table += ("\n\nProbes on the mean-pooled last hidden states of the backbone (before the head):\n\n"
                  + summary_table(results, prefix="pooled_"))
    for baseline in ("causal", "ggsm"):
        paired = paired_table(results, baseline)
        if paired:
            table += (f"\n\nMean AUC difference to the same seed's {baseline} run (same initialisation and "
                      f"batches):\n\n{paired}")
    write_text(out / "report.md", f"# GGSM mask study\n\n{header}\n\n{table}\n\n![loss curves](loss_curves.png)\n")
    print(header)
    print(table)


def main() -> None:
    """Run the study and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vehicle", choices=["tiny", "smollm2"], default="tiny")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--policies", default=",".join(VARIANTS))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--probe-users", type=int, default=0, help="probe on the first N users only (0 = all)")
    ap.add_argument("--out", default="runs/bench_encoder_masks")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast for training and encoding (fp32 weights)")
    ap.add_argument("--max-events", type=int, default=4, help="smollm2: history events rendered per user")
    ap.add_argument("--max-length", type=int, default=128, help="smollm2: tokens per input (keeps the last)")
    ap.add_argument("--future-titles", type=int, default=2, help="smollm2: example titles in the positive")
    ap.add_argument("--positive", choices=["description", "events"], default="description",
                    help="smollm2: templated description of the future, or the next --future-events events as text")
    ap.add_argument("--future-events", type=int, default=3, help="smollm2: events in an 'events' positive")
    ap.add_argument("--from-results", action="store_true",
                    help="only rebuild report.md and loss_curves.png from results.json")
    ap.add_argument("--smooth", type=int, default=1, help="trailing-mean window of the plotted loss curves")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out) / args.vehicle
    out.mkdir(parents=True, exist_ok=True)
    if args.from_results:
        saved = read_json(out / "results.json")
        plot_curves(out, saved["curves"], batch=saved["args"]["batch"], vehicle=args.vehicle, smooth=args.smooth)
        write_report(out, saved["header"], saved["runs"])
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.policies.split(",")
    ds = load_movielens()
    t0 = time.time()

    pretrain_log: list[float] = []
    ctx: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    if args.bf16:
        def ctx() -> contextlib.AbstractContextManager:
            # no weight-cast cache: it would keep the first step's bf16 copies of the trainable weights
            return torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)
    if args.vehicle == "tiny":
        model_path = str(pretrain_tiny(ds, out / "pretrained", steps=args.pretrain_steps, log=pretrain_log))
        pairs, inputs = token_pairs(ds, history_events=48, future_events=20)
        enc_cfg = EncoderConfig(model=model_path, projection=(128,), lora=LoraSettings(r=0), max_length=128,
                                batch_size=64)
        lr = args.lr or 3e-4
    else:
        pairs = build_pairs(ds, source="ratings", positive="future_events" if args.positive == "events" else "future",
                            max_events=args.max_events, future_events=args.future_events)
        if args.positive != "events" and args.future_titles != 2:
            shorten_positives(ds, pairs, args.future_titles)
        _, inputs = user_inputs(ds, source="ratings", max_events=args.max_events)
        enc_cfg = EncoderConfig(model="smollm2-135m", projection=(128,), lora=LoraSettings(r=8),
                                max_length=args.max_length, batch_size=16)
        lr = args.lr or 1e-4
    probe_ds = ds
    if args.probe_users:
        probe_ds = ds.subset(ds.user_ids[: args.probe_users].tolist())
        inputs = inputs[: args.probe_users]
    print(f"[{time.time() - t0:.0f}s] {len(pairs)} pairs; vehicle {args.vehicle}; pretrain losses "
          f"{pretrain_log[:1]} -> {pretrain_log[-1:]}", flush=True)
    print(f"anchor: {pairs.anchors[0].text!r}\npositive: {pairs.positives[0].text!r}", flush=True)

    base = ScheduleConfig(total_steps=args.steps, warmup_ratio=0.1)
    train_cfg = TrainConfig(steps=args.steps, batch_size=args.batch, lr=lr, temperature=0.05, fn_margin=0.1,
                            checkpoint_every=10**9)
    # finished runs are kept per (policy, seed) under a key of every setting that changes their result
    settings = {k: v for k, v in vars(args).items() if k not in ("seeds", "policies", "out", "from_results", "threads",
                                                                    "smooth")}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    done_dir = out / "runs"
    done_dir.mkdir(exist_ok=True)

    def cached(name: str) -> dict | None:
        path = done_dir / f"{name}.json"
        if path.exists():
            saved = read_json(path)
            if saved.get("key") == key:
                return saved
        return None

    def probe_row(x: np.ndarray, pooled: np.ndarray | None) -> dict:
        row = {t: r.auc_mean for t, r in probe_tasks(x, probe_ds, TASKS, seeds=(0,), folds=5).items()}
        if pooled is not None:
            row.update({"pooled_" + t: r.auc_mean
                        for t, r in probe_tasks(pooled, probe_ds, TASKS, seeds=(0,), folds=5).items()})
        return row

    results: dict[str, list[dict]] = {}
    curves: dict[str, list[list[float]]] = {}
    # reference: the pretrained decoder, no contrastive training, causal mean pooling (no head)
    saved_ref = cached("reference")
    if saved_ref is None:
        ref = UserEncoder(replace(enc_cfg, projection=(), lora=LoraSettings(r=0)))
        t_ref = time.time()
        x_ref, _ = encode_both(ref, inputs, 0.0, ctx)
        encode_s = time.time() - t_ref
        row = probe_row(x_ref, None)
        if args.vehicle == "smollm2":  # the reference has no head: its outputs are the pooled states
            row.update({"pooled_" + t: row[t] for t in TASKS})
        row["encode_seconds"] = encode_s
        write_json(done_dir / "reference.json", {"key": key, "settings": settings, "row": row})
        del ref
    else:
        row = saved_ref["row"]
    results["pretrained (no CL)"] = [row]
    print(f"[{time.time() - t0:.0f}s] reference: mean AUC {np.mean([row[t] for t in TASKS]):.4f} "
          f"(encode {row['encode_seconds']:.0f}s for {len(inputs)} users)", flush=True)
    for name in names:
        sched_cfg = replace(base, **VARIANTS[name])
        for seed in seeds:
            saved_run = cached(f"{name}_seed{seed}")
            if saved_run is not None:
                row, losses = saved_run["row"], saved_run["losses"]
                print(f"[{time.time() - t0:.0f}s] {name} seed {seed}: finished earlier, loaded", flush=True)
            else:
                torch.manual_seed(seed)
                enc = UserEncoder(enc_cfg)
                t_run = time.time()
                with ctx():
                    res, schedule = train_encoder(enc, pairs, sched_cfg, replace(train_cfg, seed=seed), progress=False)
                train_s = time.time() - t_run
                losses = res.losses
                weight = schedule.future_weights()
                x, pooled = encode_both(enc.merge_lora(), inputs, weight, ctx)
                row = probe_row(x, pooled if args.vehicle == "smollm2" else None)
                row.update(stability(losses))
                row["mean_future_weight_end"] = schedule.mean_future_weight(128)
                row["train_seconds"], row["run_seconds"] = train_s, time.time() - t_run
                if schedule.w0 is not None:
                    row["w0_mean"], row["w0_std"] = float(schedule.w0[:128].mean()), float(schedule.w0[:128].std())
                write_json(done_dir / f"{name}_seed{seed}.json",
                           {"key": key, "settings": settings, "row": row, "losses": losses})
                del enc
            results.setdefault(name, []).append(row)
            curves.setdefault(name, []).append(losses)
            print(f"[{time.time() - t0:.0f}s] {name} seed {seed}: mean AUC "
                  f"{np.mean([row[t] for t in TASKS]):.4f}, final loss {row['final_loss']:.4f}, "
                  f"losses {np.round(losses[:3], 3).tolist()} ... {np.round(losses[-3:], 3).tolist()}", flush=True)

    plot_curves(out, curves, batch=args.batch, vehicle=args.vehicle, smooth=args.smooth)
    header = (f"vehicle {args.vehicle}, steps {args.steps}, seeds {seeds}, batch {args.batch}, lr {lr}, "
              f"probe users {probe_ds.n_users}, tasks {list(TASKS)}, {time.time() - t0:.0f}s this invocation")
    if args.vehicle == "smollm2":
        header += (f"; max events {args.max_events}, max length {args.max_length}, positive {args.positive} "
                   f"(future events {args.future_events}, titles {args.future_titles}), bf16 autocast {args.bf16}")
    write_json(out / "results.json", {"args": vars(args), "runs": results, "curves": curves, "header": header,
                                      "pretrain_losses": pretrain_log, "seconds": time.time() - t0})
    write_report(out, header, results)


if __name__ == "__main__":
    main()

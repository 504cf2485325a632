"""GGSM mask study: causal / scheduler-0.5 / GG-SM / bidirectional at equal steps, paired by seed.

Every arm starts from the same *causally pretrained* decoder and the same head (``torch.manual_seed(seed)``
before building), sees the same batches, and trains contrastively for the same number of optimizer steps with
the library defaults (InfoNCE, temperature 0.02, false-negative margin 0.1, LR warm-up over 10% of the steps then
cosine decay) on the learnable objective of ``encoder/learns.py``: the positive is the user's next K held-out
events (the ``future_events`` positive). 80% of users train, 20% are held out (split seed 0, the same for every
seed and arm). Arms (``ScheduleConfig``, T_w = 10% of the steps):

* ``causal``: future weight 0 throughout;
* ``scheduler-0.5``: 0.5 during warm-up, then linear to 1 at the last step (GG-SM without the gradient term);
* ``ggsm``: ``sigmoid(logit(0.5) + beta * I)`` per key position during warm-up, ``I`` the z-scored
  (``norm="zscore"``) last-hidden-state gradient importance, frozen as W0 at T_w, then linear to 1;
* ``bidirectional``: future weight 1 throughout.

(Optional arms: ``hybrid`` (0.5 throughout), ``scheduler`` (0 then linear), ``ggsm-raw`` (the un-normalised
importance, whose W0 stays at 0.5), and GG-SM with a per-token signal (issue 24 §4; z-scored, as ``ggsm``):
``ggsm-mask`` (``importance="mask_grad"``: minus the loss gradient of each key's soft mask weight) and
``ggsm-emb`` (``importance="embedding_grad"``: input-embedding gradient norms); ``ggsm-mask-ema`` is
``ggsm-mask`` with the importance averaged over the warm-up batches (EMA 0.8).) Each arm is evaluated under the mask in force at the end of its training
(causal 0, the others 1): held-out Recall@1/10 and MRR of the true positive among all held-out users
(``pluribus.encoder.metrics``), and probe AUCs (logistic regression, 5 folds) of all users' embeddings on 7
MovieLens-100K tasks. Reported: mean ± std over seeds, paired differences by seed (each arm minus causal, GG-SM
minus scheduler-0.5 and minus bidirectional) with how many seeds go each way, training loss against ln B, stability, GG-SM's W0 (mean
and spread over the key positions seen), and loss curves (PNG).

Vehicles:

* ``tiny`` (default, CPU): a 4-layer Qwen3 decoder pretrained here by next-token prediction on users' history
  sequences in an item/rating token language ("i50 r5 i172 r4 ..."); full fine-tuning.
* ``smollm2`` (needs a GPU for a useful budget): SmolLM2-135M-Instruct (packaged GGUF) with LoRA on rendered
  text (``pairs.build_pairs``, the ``future_events`` positive); probes also on the mean-pooled backbone states.

    nice -n 10 .venv/bin/python benchmarks/encoder/masks.py --vehicle tiny --steps 500 --batch 16 --seeds 0,1,2,3,4
    .venv/bin/python benchmarks/encoder/masks.py --vehicle smollm2 --steps 500 --batch 32 --seeds 0,1,2 --bf16

Each finished (arm, seed) run is saved to ``<out>/<vehicle>/runs/`` at once; rerunning the same command with
the same settings skips finished runs (an interrupted study loses at most the run in progress), so several
processes with disjoint ``--seeds`` or ``--policies`` can share one ``--out``; a last run with every seed
and arm loads them all and writes the report.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PLURIBUS_PROGRESS", "0")
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # BLAS threads thrash a shared CPU
    os.environ.setdefault(_var, "1")

import numpy as np
import torch

from pluribus.data.movielens import load_movielens
from pluribus.encoder import EncoderConfig, LoraSettings, ScheduleConfig, TrainConfig, UserEncoder
from pluribus.encoder.event_language import (
    EventLanguage,
    PretrainSettings,
    event_pairs,
    fit_language,
    pretrain,
    vehicle,
)
from pluribus.encoder.metrics import heldout_retrieval
from pluribus.encoder.model import UserInput
from pluribus.encoder.pairs import PairSet, build_pairs, describe_future, split_pairs, user_inputs
from pluribus.encoder.schedule import MaskSchedule
from pluribus.encoder.train import TrainResult, train_encoder
from pluribus.eval.probes import probe_tasks
from pluribus.eval.report import line_plot, markdown_table, mean_std
from pluribus.io import read_json, write_json, write_text

TASKS = ("gender", "age_35plus", "occupation_student", "future_drama", "future_comedy", "future_action",
         "future_high_rating")
METRICS = ("recall@1", "recall@10", "mrr", "mean AUC")

#: name -> schedule overrides (on top of the shared total/warm-up settings)
VARIANTS = {
    "causal": {"policy": "causal"},
    "scheduler-0.5": {"policy": "scheduler", "scheduler_start": 0.5},
    "ggsm": {"policy": "ggsm", "norm": "zscore"},
    "bidirectional": {"policy": "bidirectional"},
    "hybrid": {"policy": "hybrid", "hybrid_weight": 0.5},
    "scheduler": {"policy": "scheduler", "scheduler_start": 0.0},
    "ggsm-raw": {"policy": "ggsm", "norm": "none"},
    "ggsm-mask": {"policy": "ggsm", "norm": "zscore", "importance": "mask_grad"},
    "ggsm-emb": {"policy": "ggsm", "norm": "zscore", "importance": "embedding_grad"},
    "ggsm-mask-ema": {"policy": "ggsm", "norm": "zscore", "importance": "mask_grad", "ema": 0.8},
}
ARMS = ("causal", "scheduler-0.5", "ggsm", "bidirectional")
#: paired differences reported (arm, baseline), when both ran
PAIRS = (("scheduler-0.5", "causal"), ("ggsm", "causal"), ("bidirectional", "causal"), ("hybrid", "causal"),
         ("scheduler", "causal"), ("ggsm-raw", "causal"), ("ggsm", "scheduler-0.5"), ("ggsm", "bidirectional"),
         ("ggsm-raw", "scheduler-0.5"), ("ggsm-mask", "causal"), ("ggsm-mask", "scheduler-0.5"), ("ggsm-mask", "ggsm"),
         ("ggsm-mask", "bidirectional"), ("ggsm-emb", "causal"), ("ggsm-emb", "scheduler-0.5"), ("ggsm-emb", "ggsm"),
         ("ggsm-mask-ema", "scheduler-0.5"), ("ggsm-mask-ema", "ggsm-mask"))
REFERENCE = "pretrained (no CL)"


def log(message: str) -> None:
    """A progress line on stderr (the tables go to stdout)."""
    print(message, file=sys.stderr, flush=True)


# ---- the tiny vehicle: the library's event language (pluribus.encoder.event_language) ---------------------
def _language(ds: object) -> EventLanguage:
    return fit_language(ds, "ratings")  # type: ignore[arg-type]


def token_pairs(ds: object, history_events: int, future_events: int) -> tuple[PairSet, list[UserInput]]:
    """(pairs history -> future in the token language, one history input per user in data set order); the
    positive is the *last* ``future_events`` events of the held-out future (as this study always did)."""
    pairs, inputs, _ = event_pairs(ds, _language(ds), history_events=history_events,  # type: ignore[arg-type]
                                   future_events=future_events, future_window="last")
    return pairs, [UserInput(t) for t in inputs]


def pretrain_tiny(ds: object, folder: Path, *, steps: int, seed: int = 0, log: list[float] | None = None) -> Path:
    """Pretrain the small Qwen3 causally on users' history sequences (``event_language.pretrain``, cached in a
    subfolder of ``folder`` keyed by the data and the settings); returns the model folder."""
    return pretrain(ds, _language(ds), folder, PretrainSettings(steps=steps, seed=seed),  # type: ignore[arg-type]
                    progress=False, log=log)


def tiny_vehicle(ds: object, folder: Path, *, pretrain_steps: int, history_events: int = 48,
                 future_events: int = 10, heldout: float = 0.2,
                 log: list[float] | None = None) -> tuple[EncoderConfig, PairSet, PairSet, list[UserInput]]:
    """(encoder config, training pairs, held-out pairs, one history input per user) of the tiny vehicle.

    The decoder is pretrained into ``folder`` unless it is there already; the held-out users depend on split
    seed 0 only."""
    v = vehicle(ds, folder, source="ratings", settings=PretrainSettings(steps=pretrain_steps),  # type: ignore[arg-type]
                history_events=history_events, future_events=future_events, heldout=heldout, future_window="last",
                progress=False)
    if log is not None:
        log.extend(v.pretrain_losses)
    return v.config, v.train, v.held, v.inputs


def train_summary(res: TrainResult) -> dict:
    """Final loss (mean of the last 10% of steps) against ln B, the collapse diagnostics, and the loss curve."""
    return {"final_loss": res.tail("losses"), "chance": res.chance_loss, "collapsed": res.collapsed,
            "anchor_cosine": res.tail("anchor_cosine"), "positive_cosine": res.tail("positive_cosine"),
            "advantage": res.tail("advantage"), "top1": res.tail("top1"), "losses": res.losses}


def probe_aucs(x: np.ndarray, ds: object) -> dict[str, float]:
    """Probe AUC (5-fold logistic regression, probe seed 0) per task of embeddings ``x`` of ``ds``'s users."""
    return {t: r.auc_mean for t, r in probe_tasks(x, ds, TASKS, seeds=(0,), folds=5).items()}


def evaluate(enc: UserEncoder, held: PairSet, inputs: Sequence[UserInput], ds: object,
             weight: float | torch.Tensor, *, ctx: Callable[[], contextlib.AbstractContextManager] | None = None,
             pooled: bool = False) -> dict:
    """Held-out retrieval (Recall@1/10, MRR) and probe AUCs of all users' embeddings, under future weight
    ``weight``; with ``pooled``, also probes of the mean-pooled backbone states (before the head)."""
    ctx = ctx or contextlib.nullcontext
    with ctx():
        retrieval = heldout_retrieval(enc, held, future_weight=weight)
    x, states = encode_both(enc, inputs, weight, ctx)
    out = {"retrieval": retrieval, "probes": probe_aucs(x, ds)}
    if pooled:
        out["pooled_probes"] = probe_aucs(states, ds)
    return out


def flat_metrics(ev: dict) -> dict[str, float]:
    """Recall@1/10, MRR, mean AUC and the per-task AUCs (``pooled_<task>`` too, if probed) of ``evaluate``."""
    row = {k: ev["retrieval"][k] for k in ("recall@1", "recall@10", "mrr")}
    row["mean AUC"] = float(np.mean([ev["probes"][t] for t in TASKS]))
    row.update(ev["probes"])
    if "pooled_probes" in ev:
        row["pooled mean AUC"] = float(np.mean([ev["pooled_probes"][t] for t in TASKS]))
        row.update({"pooled_" + t: v for t, v in ev["pooled_probes"].items()})
    return row


def w0_stats(schedule: MaskSchedule) -> dict:
    """GG-SM's frozen warm-up weights W0 over the key positions the importance saw: mean, std, min, max (and
    W0 at the first 128 positions)."""
    if schedule.w0 is None:
        return {}
    w = schedule.w0[schedule.importance != 0]
    if w.numel() == 0:
        w = schedule.w0
    return {"w0_mean": float(w.mean()), "w0_std": float(w.std(unbiased=False)), "w0_min": float(w.min()),
            "w0_max": float(w.max()), "w0_positions": float(w.numel()), "w0_first128": schedule.w0[:128].tolist()}


# ---- stability --------------------------------------------------------------------------------------
def stability(losses: list[float]) -> dict[str, float]:
    """Loss variance over the second half, spikes (> 1.5x the previous 10-step mean), divergence flag."""
    arr = np.asarray(losses, dtype=float)
    half = arr[len(arr) // 2 :]
    spikes = sum(1 for t in range(10, len(arr)) if arr[t] > 1.5 * arr[t - 10 : t].mean())
    diverged = (not np.isfinite(arr).all()) or float(arr[-5:].mean()) > float(arr[:5].mean())
    return {"loss_var_2nd_half": float(np.var(half)), "spikes": float(spikes), "diverged": float(diverged)}


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


def _order(results: dict[str, list[dict]]) -> list[str]:
    order = [REFERENCE, *VARIANTS]
    return sorted(results, key=lambda n: order.index(n) if n in order else len(order))


def summary_table(results: dict[str, list[dict]]) -> str:
    """Markdown table per arm: retrieval and probe metrics (mean ± std over seeds), training and W0 columns."""
    rows = []
    for name in _order(results):
        runs = results[name]
        row: dict[str, object] = {"arm": name, "seeds": len(runs)}
        for m in METRICS:
            row[m] = mean_std([r[m] for r in runs])
        if "pooled mean AUC" in runs[0]:
            row["pooled mean AUC"] = mean_std([r["pooled mean AUC"] for r in runs])
        if "final_loss" in runs[0]:
            row["final loss (ln B)"] = f"{mean_std([r['final_loss'] for r in runs])} ({runs[0]['chance']:.3f})"
            row["top-1"] = mean_std([r["top1"] for r in runs])
            row["loss var (2nd half)"] = mean_std([r["loss_var_2nd_half"] for r in runs], digits=4)
            row["spikes"] = int(sum(r["spikes"] for r in runs))
            row["diverged"] = f"{int(sum(r['diverged'] for r in runs))}/{len(runs)}"
            row["collapsed"] = f"{int(sum(bool(r['collapsed']) for r in runs))}/{len(runs)}"
            row["future w (T_w)"] = mean_std([r["future_weight_warmup"] for r in runs])
            row["future w (end)"] = mean_std([r["mean_future_weight_end"] for r in runs])
        if "w0_mean" in runs[0]:
            row["W0 mean ± spread [min, max]"] = (
                f"{np.mean([r['w0_mean'] for r in runs]):.3f} ± {np.mean([r['w0_std'] for r in runs]):.3f} "
                f"[{min(r['w0_min'] for r in runs):.3f}, {max(r['w0_max'] for r in runs):.3f}]")
        rows.append(row)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return markdown_table(rows, columns, digits=4)


def task_table(results: dict[str, list[dict]], prefix: str = "") -> str:
    """Markdown table of probe AUC per task (mean ± std over seeds) per arm."""
    rows = []
    for name in _order(results):
        runs = results[name]
        if prefix + TASKS[0] not in runs[0]:
            continue
        rows.append({"arm": name, **{t: mean_std([r[prefix + t] for r in runs]) for t in TASKS}})
    return markdown_table(rows, ["arm", *TASKS], digits=4)


def paired_rows(results: dict[str, list[dict]]) -> list[dict[str, str]]:
    """Per-seed differences (arm minus baseline, same seeds) of each metric: 'mean ± std (k+ / k-)'."""
    rows = []
    for arm, base in PAIRS:
        if arm not in results or base not in results:
            continue
        mine = {r["seed"]: r for r in results[arm]}
        theirs = {r["seed"]: r for r in results[base]}
        seeds = sorted(set(mine) & set(theirs))
        if not seeds:
            continue
        row = {"difference": f"{arm} - {base}", "seeds": str(len(seeds))}
        for m in METRICS:
            d = [mine[s][m] - theirs[s][m] for s in seeds]
            row[f"d {m}"] = (f"{mean_std(d, digits=4)} ({sum(x > 0 for x in d)}+ / {sum(x < 0 for x in d)}-)")
        rows.append(row)
    return rows


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


def write_report(out: Path, header: str, results: dict[str, list[dict]]) -> str:
    """Write report.md (and print it); returns its text."""
    text = f"# GGSM mask study\n\n{header}\n\n{summary_table(results)}\n\nProbe AUC per task:\n\n{task_table(results)}\n"
    first = next(iter(results.values()))[0]
    if "pooled_" + TASKS[0] in first:
        text += ("\nProbes on the mean-pooled last hidden states of the backbone (before the head):\n\n"
                 + task_table(results, prefix="pooled_") + "\n")
    paired = paired_rows(results)
    if paired:
        text += ("\nPaired differences by seed (same initialisation and batches); (k+ / k-) = seeds where the "
                 "difference is positive / negative:\n\n" + markdown_table(paired) + "\n")
    text += "\n![loss curves](loss_curves.png)\n"
    write_text(out / "report.md", text)
    print(text)
    return text


def main(argv: Sequence[str] | None = None) -> None:
    """Run the study (or rebuild its report) and print the tables."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vehicle", choices=["tiny", "smollm2"], default="tiny")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--policies", default=",".join(ARMS), help=f"arms, of {', '.join(VARIANTS)}")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=None, help="default: 3e-4 (tiny), 1e-4 (smollm2)")
    ap.add_argument("--pretrain-steps", type=int, default=300, help="tiny: causal LM pretraining steps")
    ap.add_argument("--history-events", type=int, default=48, help="tiny: history events per anchor")
    ap.add_argument("--future-events", type=int, default=10, help="K of the future_events positive")
    ap.add_argument("--users", type=int, default=0, help="use the first N users only (0 = all; for smoke runs)")
    ap.add_argument("--out", default="runs/bench_encoder_masks")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast for training and encoding (fp32 weights)")
    ap.add_argument("--max-events", type=int, default=4, help="smollm2: history events rendered per user")
    ap.add_argument("--max-length", type=int, default=128, help="smollm2: tokens per input (keeps the last)")
    ap.add_argument("--positive", choices=["events", "description"], default="events",
                    help="smollm2: the next --future-events events as text, or the templated future description")
    ap.add_argument("--future-titles", type=int, default=2, help="smollm2: example titles in a 'description'")
    ap.add_argument("--from-results", action="store_true",
                    help="only rebuild report.md and loss_curves.png from results.json")
    ap.add_argument("--smooth", type=int, default=25, help="trailing-mean window of the plotted loss curves")
    args = ap.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        ap.error(f"--seeds: comma-separated integers, got {args.seeds!r}")
    names = args.policies.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"--policies: unknown arm(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if args.steps < 1 or args.batch < 2:
        ap.error("--steps must be >= 1 and --batch >= 2")
    torch.set_num_threads(args.threads)
    out = Path(args.out) / args.vehicle
    out.mkdir(parents=True, exist_ok=True)
    if args.from_results:
        saved = read_json(out / "results.json")
        plot_curves(out, saved["curves"], batch=saved["args"]["batch"], vehicle=args.vehicle, smooth=args.smooth)
        write_report(out, saved["header"], saved["runs"])
        return
    t0 = time.time()
    load0 = os.getloadavg()[0]
    ds = load_movielens()
    if args.users:
        ds = ds.subset(ds.user_ids[: args.users].tolist())

    pretrain_log: list[float] = []
    ctx: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    if args.bf16:
        def ctx() -> contextlib.AbstractContextManager:
            # no weight-cast cache: it would keep the first step's bf16 copies of the trainable weights
            return torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)
    if args.vehicle == "tiny":
        # the decoder depends on the pretraining steps only (and the users, for a smoke run)
        folder = out / (f"pretrained-{args.pretrain_steps}" + (f"-users{args.users}" if args.users else ""))
        enc_cfg, train_pairs, held, inputs = tiny_vehicle(ds, folder, pretrain_steps=args.pretrain_steps,
                                                          history_events=args.history_events,
                                                          future_events=args.future_events, log=pretrain_log)
        lr = args.lr or 3e-4
    else:
        pairs = build_pairs(ds, source="ratings", positive="future_events" if args.positive == "events" else "future",
                            max_events=args.max_events, future_events=args.future_events)
        if args.positive != "events" and args.future_titles != 2:
            shorten_positives(ds, pairs, args.future_titles)
        train_pairs, held_or_none = split_pairs(pairs, 0.2, seed=0)
        assert held_or_none is not None
        held = held_or_none
        _, inputs = user_inputs(ds, source="ratings", max_events=args.max_events)
        enc_cfg = EncoderConfig(model="smollm2-135m", projection=(128,), lora=LoraSettings(r=8),
                                max_length=args.max_length, batch_size=16)
        lr = args.lr or 1e-4
    pooled = args.vehicle == "smollm2"
    log(f"[{time.time() - t0:.0f}s] vehicle {args.vehicle}: {len(train_pairs)} training / {len(held)} held-out "
          f"users; pretrain losses {pretrain_log[:1]} -> {pretrain_log[-1:]}")
    log(f"anchor: {train_pairs.anchors[0].text!r}\npositive: {train_pairs.positives[0].text!r}")

    base = ScheduleConfig(total_steps=args.steps, warmup_ratio=0.1)
    train_cfg = TrainConfig(steps=args.steps, batch_size=args.batch, lr=lr, checkpoint_every=10**9)
    # finished runs are kept per (arm, seed) under a key of every setting that changes their result
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

    results: dict[str, list[dict]] = {}
    curves: dict[str, list[list[float]]] = {}
    # reference: the pretrained decoder, no contrastive training, causal mean pooling, no head
    saved_ref = cached("reference")
    if saved_ref is None:
        ref = UserEncoder(replace(enc_cfg, projection=(), lora=LoraSettings(r=0)))
        row = flat_metrics(evaluate(ref, held, inputs, ds, 0.0, ctx=ctx, pooled=pooled))
        write_json(done_dir / "reference.json", {"key": key, "settings": settings, "row": row})
        del ref
    else:
        row = saved_ref["row"]
    results[REFERENCE] = [row]
    log(f"[{time.time() - t0:.0f}s] reference: " + ", ".join(f"{m} {row[m]:.4f}" for m in METRICS))
    for name in names:
        sched_cfg = replace(base, **VARIANTS[name])
        for seed in seeds:
            saved_run = cached(f"{name}_seed{seed}")
            if saved_run is not None:
                row, losses = saved_run["row"], saved_run["losses"]
                log(f"[{time.time() - t0:.0f}s] {name} seed {seed}: finished earlier, loaded")
            else:
                torch.manual_seed(seed)  # the same head initialisation for every arm of a seed
                enc = UserEncoder(enc_cfg)
                t_run = time.time()
                with ctx():
                    res, schedule = train_encoder(enc, train_pairs, sched_cfg, replace(train_cfg, seed=seed),
                                                  progress=False)
                train_s = time.time() - t_run
                summary = train_summary(res)
                losses = summary.pop("losses")
                ev = evaluate(enc.merge_lora(), held, inputs, ds, schedule.future_weights(), ctx=ctx, pooled=pooled)
                row = {"seed": seed, **flat_metrics(ev), **summary, **stability(losses), **w0_stats(schedule),
                       "future_weight_warmup": res.future_weights[max(sched_cfg.warmup - 1, 0)],
                       "mean_future_weight_end": schedule.mean_future_weight(128),
                       "train_seconds": train_s, "run_seconds": time.time() - t_run,
                       "load_average": os.getloadavg()[0]}
                write_json(done_dir / f"{name}_seed{seed}.json",
                           {"key": key, "settings": settings, "row": row, "losses": losses})
                del enc
            results.setdefault(name, []).append(row)
            curves.setdefault(name, []).append(losses)
            w0 = f", W0 {row['w0_mean']:.3f} ± {row['w0_std']:.3f}" if "w0_mean" in row else ""
            log(f"[{time.time() - t0:.0f}s] {name} seed {seed}: " + ", ".join(f"{m} {row[m]:.4f}" for m in METRICS)
                  + f", final loss {row['final_loss']:.3f} (ln B {row['chance']:.3f}){w0}, "
                  f"{row['run_seconds']:.0f}s")

    plot_curves(out, curves, batch=args.batch, vehicle=args.vehicle, smooth=args.smooth)
    header = (f"vehicle {args.vehicle}, steps {args.steps} (T_w {base.warmup}), batch {args.batch}, lr {lr} "
              f"(warm-up 10% + cosine), seeds {seeds}, {len(train_pairs)} training / {len(held)} held-out users, "
              f"future events {args.future_events}, probe users {ds.n_users}, tasks {list(TASKS)}; "
              f"{time.time() - t0:.0f}s this invocation, load average {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    if args.vehicle == "tiny":
        header += f"; history events {args.history_events}, pretrain steps {args.pretrain_steps}"
    else:
        header += (f"; max events {args.max_events}, max length {args.max_length}, positive {args.positive}, "
                   f"bf16 autocast {args.bf16}")
    write_json(out / "results.json", {"args": vars(args), "runs": results, "curves": curves, "header": header,
                                      "pretrain_losses": pretrain_log, "seconds": time.time() - t0})
    write_report(out, header, results)


if __name__ == "__main__":
    main()

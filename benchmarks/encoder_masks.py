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
    .venv/bin/python benchmarks/encoder_masks.py --vehicle smollm2 --steps 10 --seeds 0 --policies causal,ggsm
"""

from __future__ import annotations

import argparse
import os
import time
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
from pluribus.encoder.pairs import PairSet, build_pairs, user_inputs  # noqa: E402
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


def summary_table(results: dict[str, list[dict]]) -> str:
    """Markdown table: probe AUC mean ± std over seeds per task, and the stability columns."""
    rows = []
    order = ["pretrained (no CL)", *VARIANTS]
    for name, runs in sorted(results.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)):
        aucs = [np.mean([r[t] for t in TASKS]) for r in runs]
        row = {"policy": name, "mean AUC": mean_std(aucs)}
        for t in TASKS:
            row[t] = mean_std([r[t] for r in runs])
        if "final_loss" in runs[0]:
            row["final loss"] = mean_std([r["final_loss"] for r in runs])
            row["loss var (2nd half)"] = mean_std([r["loss_var_2nd_half"] for r in runs], digits=4)
            row["spikes"] = int(sum(r["spikes"] for r in runs))
            row["diverged"] = f"{int(sum(r['diverged'] for r in runs))}/{len(runs)}"
            row["future w (end)"] = f"{runs[0]['mean_future_weight_end']:.3f}"
        if "w0_mean" in runs[0]:
            row["W0 mean (std)"] = f"{np.mean([r['w0_mean'] for r in runs]):.4f} ({np.mean([r['w0_std'] for r in runs]):.4f})"
        rows.append(row)
    columns = ["policy", "mean AUC", *TASKS, "final loss", "loss var (2nd half)", "spikes", "diverged",
               "future w (end)", "W0 mean (std)"]
    return markdown_table(rows, columns, digits=4)


def write_report(out: Path, header: str, results: dict[str, list[dict]]) -> None:
    """Write report.md and print the header and table."""
    table = summary_table(results)
    write_text(out / "report.md", f"# GGSM mask study\n\n{header}\n\n{table}\n![loss curves](loss_curves.png)\n")
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
    ap.add_argument("--from-results", action="store_true", help="only rebuild report.md from results.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out) / args.vehicle
    out.mkdir(parents=True, exist_ok=True)
    if args.from_results:
        saved = read_json(out / "results.json")
        write_report(out, saved["header"], saved["runs"])
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.policies.split(",")
    ds = load_movielens()
    t0 = time.time()

    pretrain_log: list[float] = []
    if args.vehicle == "tiny":
        model_path = str(pretrain_tiny(ds, out / "pretrained", steps=args.pretrain_steps, log=pretrain_log))
        pairs, inputs = token_pairs(ds, history_events=48, future_events=20)
        enc_cfg = EncoderConfig(model=model_path, projection=(128,), lora=LoraSettings(r=0), max_length=128,
                                batch_size=64)
        lr = args.lr or 3e-4
    else:
        pairs = build_pairs(ds, source="ratings", positive="future", max_events=4)
        _, inputs = user_inputs(ds, source="ratings", max_events=4)
        enc_cfg = EncoderConfig(model="smollm2-135m", projection=(128,), lora=LoraSettings(r=8), max_length=128,
                                batch_size=16)
        lr = args.lr or 1e-4
    probe_ds = ds
    if args.probe_users:
        probe_ds = ds.subset(ds.user_ids[: args.probe_users].tolist())
        inputs = inputs[: args.probe_users]
    print(f"[{time.time() - t0:.0f}s] {len(pairs)} pairs; vehicle {args.vehicle}; pretrain losses "
          f"{pretrain_log[:1]} -> {pretrain_log[-1:]}", flush=True)

    base = ScheduleConfig(total_steps=args.steps, warmup_ratio=0.1)
    train_cfg = TrainConfig(steps=args.steps, batch_size=args.batch, lr=lr, temperature=0.05, fn_margin=0.1,
                            checkpoint_every=10**9)
    results: dict[str, list[dict]] = {}
    curves: dict[str, list[list[float]]] = {}
    # reference: the pretrained decoder, no contrastive training, causal mean pooling (no head)
    ref = UserEncoder(replace(enc_cfg, projection=(), lora=LoraSettings(r=0)))
    x_ref = ref.encode(inputs, future_weight=0.0, progress=False)
    ref_probe = probe_tasks(x_ref, probe_ds, TASKS, seeds=(0,), folds=5)
    results["pretrained (no CL)"] = [{t: r.auc_mean for t, r in ref_probe.items()}]
    del ref
    for name in names:
        sched_cfg = replace(base, **VARIANTS[name])
        for seed in seeds:
            torch.manual_seed(seed)
            enc = UserEncoder(enc_cfg)
            res, schedule = train_encoder(enc, pairs, sched_cfg, replace(train_cfg, seed=seed), progress=False)
            weight = schedule.future_weights()
            x = enc.merge_lora().encode(inputs, future_weight=weight, progress=False)
            probe = probe_tasks(x, probe_ds, TASKS, seeds=(0,), folds=5)
            row = {t: r.auc_mean for t, r in probe.items()}
            row.update(stability(res.losses))
            row["mean_future_weight_end"] = schedule.mean_future_weight(128)
            if schedule.w0 is not None:
                row["w0_mean"], row["w0_std"] = float(schedule.w0[:128].mean()), float(schedule.w0[:128].std())
            results.setdefault(name, []).append(row)
            curves.setdefault(name, []).append(res.losses)
            print(f"[{time.time() - t0:.0f}s] {name} seed {seed}: mean AUC "
                  f"{np.mean([row[t] for t in TASKS]):.4f}, final loss {row['final_loss']:.4f}", flush=True)
            del enc

    mean_curves = {n: (list(range(1, args.steps + 1)), np.mean(c, axis=0).tolist()) for n, c in curves.items()}
    line_plot(out / "loss_curves.png", mean_curves, xlabel="optimizer step", ylabel="InfoNCE loss (mean over seeds)",
              title=f"GGSM mask policies ({args.vehicle})")
    header = (f"vehicle {args.vehicle}, steps {args.steps}, seeds {seeds}, batch {args.batch}, lr {lr}, "
              f"probe users {probe_ds.n_users}, tasks {list(TASKS)}, {time.time() - t0:.0f}s")
    write_json(out / "results.json", {"args": vars(args), "runs": results, "curves": curves, "header": header,
                                      "pretrain_losses": pretrain_log, "seconds": time.time() - t0})
    write_report(out, header, results)


if __name__ == "__main__":
    main()

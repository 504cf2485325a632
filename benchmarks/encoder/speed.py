"""GGSM speed: soft-mask train step vs plain causal, and encode throughput vs sentence-transformers.

Same backbone, batch and inputs on both sides of each ratio, in one process:

* train step (forward both towers + InfoNCE + backward + AdamW) with the GG-SM soft mask (per-position
  future weights as a 4D additive bias, with last-hidden-state gradient capture) vs the same encoder
  with the backbone's native causal attention (target: <= 1.15x);
* encode throughput (users/s, bidirectional inference) vs a SentenceTransformer wrapping the same
  backbone folder with mean pooling, same batch size and max length (target: >= 1.0x);
* peak extra resident memory of each phase (sampled RSS; CUDA peak allocation on GPU).

    .venv/bin/python benchmarks/encoder/speed.py                  # SmolLM2-135M (packaged GGUF, cached)
    .venv/bin/python benchmarks/encoder/speed.py --model tiny     # a tiny random Qwen3, seconds
    .venv/bin/python benchmarks/encoder/speed.py --model smollm2-shape --device cuda   # a GPU run, no weights

``smollm2-shape`` is a randomly initialised Llama with SmolLM2-135M's layer sizes (30 layers, width 576, 9
heads, 3 KV heads, MLP 1536) and a word tokenizer: the same work per token as the real model, for machines
the packaged GGUF cannot reach (speed only; its embeddings mean nothing). ``--device auto`` (the default) is
cuda when torch sees a GPU, else cpu.
"""

from __future__ import annotations

import argparse
import atexit
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PLURIBUS_PROGRESS", "0")
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # BLAS threads thrash a shared CPU
    os.environ.setdefault(_var, "1")

import numpy as np
import torch

from harness.devices import add_device_arg, device_label, resolve_device
from harness.timing import interleaved_times
from pluribus.encoder import EncoderConfig, LoraSettings, ScheduleConfig, UserEncoder, info_nce
from pluribus.encoder.backbone import resolve_model_path
from pluribus.encoder.schedule import MaskSchedule
from pluribus.eval.report import markdown_table


def peak_memory_mb(phase: str, argv: list[str]) -> float:
    """Peak extra memory (MB) of two calls of ``phase`` in a fresh process, above the level after loading."""
    cmd = [sys.executable, __file__, *argv, "--phase", phase]
    env = {**os.environ, "PLURIBUS_PROGRESS": "0"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return float(next(line.split()[1] for line in out.splitlines() if line.startswith("PEAK_MB")))


def texts(n: int, words: int, seed: int = 0) -> list[str]:
    """MovieLens-like rendered histories of about ``words`` words each (synthetic titles, deterministic)."""
    rng = np.random.default_rng(seed)
    genres = ["Drama", "Comedy", "Action", "Thriller", "Romance", "Sci-Fi", "Horror", "Animation"]
    out = []
    for _ in range(n):
        parts = []
        while sum(len(p.split()) for p in parts) < words:
            g = ", ".join(rng.choice(genres, size=2, replace=False))
            parts.append(f"Movie {int(rng.integers(1, 1682))} ({int(rng.integers(1930, 1998))}) [{g}] "
                         f"rated {int(rng.integers(1, 6))}/5")
        out.append("; ".join(parts))
    return out


def compare(ours: Callable[[], object], peer: Callable[[], object], repeats: int, device: str) -> tuple[float, float]:
    """Median seconds of interleaved calls (ours, peer, ours, ...) after a warm-up of each.

    Interleaving keeps slow drifts of a shared machine from favouring either side.
    """
    times = interleaved_times({"ours": ours, "peer": peer}, repeats, device=device, reduce="median")
    return times["ours"], times["peer"]


def st_model(path: str, max_length: int, device: str) -> Any:
    """A SentenceTransformer over the same backbone folder: Transformer (sdpa) + mean pooling."""
    from sentence_transformers import SentenceTransformer, models

    module = models.Transformer(path, max_seq_length=max_length, model_kwargs={"attn_implementation": "sdpa"})
    if module.tokenizer.pad_token is None:
        module.tokenizer.pad_token = module.tokenizer.eos_token
    pooling = models.Pooling(module.get_embedding_dimension(), "mean")
    return SentenceTransformer(modules=[module, pooling], device=device)


def _status_mb(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return float(line.split()[1]) / 1024


def measure_peak(call: Callable[[], object], device: str) -> None:
    """Run ``call`` twice and print the peak memory above the level before it, for the parent process.

    CUDA: peak allocation; CPU: the resident-set high-water mark (VmHWM, reset through clear_refs) minus the
    resident size before the calls, so model loading and imports are excluded. Falls back to max RSS.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")  # reset the peak RSS
            base = _status_mb("VmRSS")
        except OSError:
            base = 0.0
    call()
    call()
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        try:
            peak = _status_mb("VmHWM")
        except (OSError, StopIteration):
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"PEAK_MB {peak - base:.1f}")


def shape_model_dir() -> str:
    """A random Llama of SmolLM2-135M's sizes with a word tokenizer (``--model smollm2-shape``): speed only."""
    from transformers import LlamaConfig, LlamaModel

    from pluribus.encoder.backbone import word_tokenizer

    folder = Path(tempfile.mkdtemp(prefix="ggsm-shape-"))
    tok = word_tokenizer([w for t in texts(50, 40) for w in t.split()])
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def tiny_model_dir() -> str:
    """A tiny random Qwen3 saved with a word tokenizer."""
    from transformers import Qwen3Config, Qwen3Model

    from pluribus.encoder.backbone import word_tokenizer

    folder = Path(tempfile.mkdtemp(prefix="ggsm-tiny-"))
    tok = word_tokenizer([w for t in texts(50, 40) for w in t.split()])
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
    torch.manual_seed(0)
    Qwen3Model(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def main() -> None:
    """Run the speed comparison and print a table of ratios."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m",
                    help="smollm2-135m, a local folder, 'tiny', or 'smollm2-shape' (random weights, SmolLM2 sizes)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--words", type=int, default=60, help="words per rendered history (about 1.5 tokens each)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--encode-users", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses (nan in the table)")
    ap.add_argument("--phase", default=None, help=argparse.SUPPRESS)  # internal: one memory measurement
    add_device_arg(ap, default="auto")
    args = ap.parse_args()
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    makers = {"tiny": tiny_model_dir, "smollm2-shape": shape_model_dir}
    path = makers[args.model]() if args.model in makers else resolve_model_path(args.model)
    if args.model in makers:  # made here (the memory subprocesses get its path): removed when this process ends
        atexit.register(shutil.rmtree, path, True)
    users = texts(args.encode_users, args.words, 3)
    if args.phase == "encode-st":
        st = st_model(path, args.max_length, device)
        measure_peak(lambda: st.encode(users, batch_size=args.batch, show_progress_bar=False), device)
        return

    cfg = EncoderConfig(model=path, max_length=args.max_length, lora=LoraSettings(r=8), batch_size=args.batch)
    enc = UserEncoder(cfg).to(device)
    anchors, positives = texts(args.batch, args.words, 1), texts(args.batch, args.words // 2, 2)
    a_batch, p_batch = enc.tokenize(anchors), enc.tokenize(positives)
    schedule = MaskSchedule(ScheduleConfig(policy="ggsm", total_steps=100, warmup_steps=10))
    params = [p for p in enc.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step(weight: float | torch.Tensor, capture: bool) -> None:
        u, hidden = enc.embed(a_batch, weight)
        if capture:
            hidden.retain_grad()
        a, _ = enc.embed(p_batch, weight)
        info_nce(u, a).backward()
        if capture and hidden.grad is not None:
            mask = a_batch.attention_mask
            schedule.update_importance(hidden.grad.norm(dim=-1), mask, (mask.cumsum(-1) - 1).clamp_min(0))
        opt.step()
        opt.zero_grad(set_to_none=True)

    enc.train()
    soft_weight = schedule.future_weights()

    if args.phase is not None:
        if args.phase.startswith("encode"):
            enc.merge_lora().eval()
        call = {
            "train-soft": lambda: step(soft_weight, True),
            "train-causal": lambda: step(0.0, False),
            "encode-ours": lambda: enc.encode(users, batch_size=args.batch, progress=False),
        }[args.phase]
        measure_peak(call, device)
        return
    t_soft, t_causal = compare(lambda: step(soft_weight, True), lambda: step(0.0, False), args.repeats, device)
    print(f"[{time.perf_counter() - t_start:.0f}s] train steps timed; timing encode", flush=True)
    st = st_model(path, args.max_length, device)
    enc.merge_lora().eval()  # deployed encoders fold LoRA into the weights (load_encoder_run does this)
    t_ours, t_st = compare(lambda: enc.encode(users, batch_size=args.batch, progress=False),
                           lambda: st.encode(users, batch_size=args.batch, show_progress_bar=False),
                           args.repeats, device)
    argv = list(sys.argv[1:]) + ["--device", device]
    if args.model in makers:
        argv += ["--model", path]
    phases = ("train-soft", "train-causal", "encode-ours", "encode-st")
    mem = {phase: float("nan") if args.no_memory else peak_memory_mb(phase, argv) for phase in phases}
    n_tokens = int(a_batch.attention_mask.sum())
    rows = [
        {"measure": "train step, s", "ours": t_soft, "peer": t_causal, "ours is": "GG-SM soft mask (warm-up)",
         "peer is": "same encoder, native causal", "ratio": t_soft / t_causal, "target": "<= 1.15"},
        {"measure": "train peak extra MB", "ours": mem["train-soft"], "peer": mem["train-causal"],
         "ours is": "GG-SM soft mask (warm-up)", "peer is": "same encoder, native causal",
         "ratio": mem["train-soft"] / max(mem["train-causal"], 1e-9), "target": "-"},
        {"measure": "encode users/s", "ours": len(users) / t_ours, "peer": len(users) / t_st,
         "ours is": "UserEncoder, bidirectional", "peer is": "sentence-transformers, same backbone",
         "ratio": t_st / t_ours, "target": ">= 1.0"},
        {"measure": "encode peak extra MB", "ours": mem["encode-ours"], "peer": mem["encode-st"],
         "ours is": "UserEncoder, bidirectional", "peer is": "sentence-transformers, same backbone",
         "ratio": mem["encode-ours"] / max(mem["encode-st"], 1e-9), "target": "-"},
    ]
    print(f"model {args.model} ({path}), device {device_label(device)}, threads {args.threads}, batch {args.batch}, "
          f"anchor tokens in batch {n_tokens} (max_length {args.max_length}), repeats {args.repeats}")
    for row in rows:
        row["device"] = device_label(device)
    print(markdown_table(rows, ["measure", "ours", "peer", "ratio", "target", "device", "ours is", "peer is"],
                         digits=3))


if __name__ == "__main__":
    main()

"""Training memory (issue 24 §3): gradient checkpointing is proven in effect (or refused), the estimate bounds what
was measured on SmolLM2-135M, a setting that cannot fit is one ConfigError (exit 2 from the CLI, nothing written),
and `pluribus encoder train --model smollm2-135m` at its defaults fits this machine's 24 GiB."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from conftest import make_backbone
from pluribus.cli import main
from pluribus.encoder.backbone import word_tokenizer
from pluribus.encoder.config import EncoderConfig, LoraSettings, ScheduleConfig, TrainConfig
from pluribus.encoder.memory import (
    GIB,
    LIMIT_ENV,
    USABLE_SHARE,
    MemoryEstimate,
    _layer_runs,
    activation_bytes,
    available_memory,
    check_fits,
    checkpointing_layers,
    enable_gradient_checkpointing,
    estimate_training_memory,
    limit_heap_retention,
    parse_size,
    prepare_training_memory,
)
from pluribus.encoder.model import UserEncoder
from pluribus.encoder.pairs import build_pairs, pairs_vocabulary
from pluribus.encoder.train import train_encoder
from pluribus.errors import ConfigError

#: SmolLM2-135M's decoder sizes (its config.json; no weights needed for the estimate)
SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "vocab_size": 49152}


@pytest.fixture(scope="module")
def pairs():
    from pluribus.data.synthetic import make_synthetic_users

    return build_pairs(make_synthetic_users(24, seed=0), source="payments", positive="profile", max_events=8)


def _encoder(pairs) -> UserEncoder:
    tok = word_tokenizer(pairs_vocabulary(pairs))
    cfg = EncoderConfig(model="tiny", projection=(16,), lora=LoraSettings(r=4), max_length=48)
    torch.manual_seed(0)
    return UserEncoder(cfg, backbone=make_backbone(len(tok), seed=0), tokenizer=tok)


def test_sizes_and_the_available_memory_read_from_meminfo(tmp_path, monkeypatch):
    assert parse_size("6GiB") == 6 * GIB and parse_size("800 MB") == 800 * 10**6 and parse_size("1024") == 1024
    for bad in ("lots", "-1GiB", "0", "3 parsecs"):
        with pytest.raises(ConfigError, match=LIMIT_ENV):
            parse_size(bad)
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24683772 kB\nMemFree:        1000 kB\nMemAvailable:   22696032 kB\n")
    monkeypatch.delenv(LIMIT_ENV, raising=False)
    assert available_memory(meminfo) == 22696032 * 1024
    monkeypatch.setenv(LIMIT_ENV, "2GiB")  # an injected, smaller limit wins
    assert available_memory(meminfo) == 2 * GIB
    monkeypatch.setenv(LIMIT_ENV, "1TiB")  # a larger one does not raise what the machine has
    assert available_memory(meminfo) == 22696032 * 1024
    assert available_memory(tmp_path / "absent") == 2**40
    monkeypatch.delenv(LIMIT_ENV)
    assert available_memory(tmp_path / "absent") is None
    assert isinstance(available_memory(), int)  # this Linux machine's own /proc/meminfo


def test_checkpointing_is_proven_in_effect(pairs):
    encoder = _encoder(pairs).train()
    inner = encoder.backbone.get_base_model()
    assert checkpointing_layers(encoder.backbone) == 0
    assert _layer_runs(inner, inner.layers[0]) == 1  # without checkpointing each sublayer runs once
    before = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    assert enable_gradient_checkpointing(encoder.backbone) == len(inner.layers) == 2
    assert checkpointing_layers(encoder.backbone) == 2
    assert _layer_runs(inner, inner.layers[0]) == 2  # forward, then recompute in the backward pass
    assert all(p.grad is None for p in encoder.parameters())  # the probe leaves no gradients...
    assert all(torch.equal(before[n], p) for n, p in encoder.named_parameters())  # ...and no changed weights

    # during training, too: the first layer's attention runs twice per tower and micro-batch
    calls = []
    handle = inner.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
    train_encoder(encoder, pairs, ScheduleConfig(policy="bidirectional", total_steps=1),
                  TrainConfig(steps=1, batch_size=4, gradient_checkpointing=True), progress=False)
    handle.remove()
    assert len(calls) == 2 * 2
    calls.clear()
    other = _encoder(pairs)
    other_inner = other.backbone.get_base_model()
    handle = other_inner.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
    train_encoder(other, pairs, ScheduleConfig(policy="bidirectional", total_steps=1),
                  TrainConfig(steps=1, batch_size=4, gradient_checkpointing=False), progress=False)
    handle.remove()
    assert len(calls) == 2 and checkpointing_layers(other.backbone) == 0


def test_by_default_checkpointing_is_on_only_where_training_would_not_fit_without_it(pairs):
    encoder = _encoder(pairs)
    config = TrainConfig(steps=1, batch_size=8)
    assert config.gradient_checkpointing is None
    off = estimate_training_memory(encoder, config, checkpointing=False)
    on = estimate_training_memory(encoder, config, checkpointing=True)
    assert on.activations < off.activations
    between = int((on.to_allocate + off.to_allocate) / 2 / USABLE_SHARE)
    assert prepare_training_memory(encoder, config, available=100 * off.to_allocate).checkpointing is False
    assert checkpointing_layers(encoder.backbone) == 0
    assert prepare_training_memory(encoder, config, available=between).checkpointing is True
    assert checkpointing_layers(encoder.backbone) == 2
    assert prepare_training_memory(encoder, config, available=100 * off.to_allocate).checkpointing is False
    assert checkpointing_layers(encoder.backbone) == 0  # turned off again when it is not needed
    forced = dataclasses.replace(config, gradient_checkpointing=True)
    assert prepare_training_memory(encoder, forced, available=100 * off.to_allocate).checkpointing is True
    with pytest.raises(ConfigError, match="training cannot fit in memory"):
        prepare_training_memory(encoder, config, available=on.to_allocate // 2)


def test_checkpointing_that_does_nothing_or_cannot_be_had_is_refused(pairs, monkeypatch):
    encoder = _encoder(pairs)
    inner = encoder.backbone.get_base_model()

    def flag_only(**_):  # a model whose flag is set on modules that never recompute
        for layer in inner.layers:
            layer.mlp.gradient_checkpointing = True

    monkeypatch.setattr(inner, "activation_checkpointing_enable", flag_only)
    with pytest.raises(ConfigError, match="gradient checkpointing is not in effect on Qwen3Model: its first layer ran 1"):
        enable_gradient_checkpointing(encoder.backbone)
    monkeypatch.setattr(inner, "supports_gradient_checkpointing", False)
    with pytest.raises(ConfigError, match="Qwen3Model does not support gradient checkpointing"):
        enable_gradient_checkpointing(encoder.backbone)


def test_the_estimate_bounds_what_was_measured_on_smollm2():
    from transformers import LlamaConfig

    cfg = LlamaConfig(**SMOLLM2)
    full = activation_bytes(cfg, rows=1, tokens=512, element=4, checkpointing=False, eager=False)
    ckpt = activation_bytes(cfg, rows=1, tokens=512, element=4, checkpointing=True, eager=False)
    # measured (peak resident growth, heap threshold pinned): 701 MB without checkpointing, 107 MB with it
    assert 701 * 2**20 <= full <= 1.3 * 701 * 2**20
    assert 107 * 2**20 <= ckpt <= 1.3 * 107 * 2**20
    assert activation_bytes(cfg, rows=4, tokens=512, element=4, checkpointing=True, eager=False) > 4 * ckpt - 1
    assert activation_bytes(cfg, rows=1, tokens=512, element=4, checkpointing=False, eager=True) > full
    assert activation_bytes(cfg, rows=1, tokens=512, element=2, checkpointing=False, eager=False) < full


def test_smollm2_defaults_fit_24_gib_with_checkpointing_and_not_without():
    from transformers import LlamaConfig

    cfg, defaults = LlamaConfig(**SMOLLM2), TrainConfig()
    rows = 2 * defaults.batch_size  # both towers of the default micro-batch in one pass
    h, i, kv, r = 576, 1536, 192, 8  # LoRA r=8 on q, k, v, o, gate, up, down in 30 layers, plus the head
    lora = 30 * r * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 3)
    trainable = lora + h * 512 + 512 + 512 * 128 + 128
    added = trainable * 4 * 3  # gradients and two AdamW moments, float32
    on = activation_bytes(cfg, rows=rows, tokens=EncoderConfig().max_length, element=4, checkpointing=True,
                          eager=False)
    off = activation_bytes(cfg, rows=rows, tokens=EncoderConfig().max_length, element=4, checkpointing=False,
                           eager=False)
    machine = 22 * GIB  # MemAvailable of this 24 GiB machine when idle
    assert on + added <= USABLE_SHARE * machine / 3  # room to spare
    assert off + added > machine  # what was killed at 22.3 GB resident before checkpointing


def test_a_setting_that_cannot_fit_is_one_line_before_training(pairs):
    encoder = _encoder(pairs)
    config = TrainConfig(steps=1, batch_size=8)
    estimate = estimate_training_memory(encoder, config)
    assert estimate.rows == 16 and estimate.tokens == 48 and estimate.checkpointing is False
    assert estimate.to_allocate == estimate.gradients + estimate.optimizer + estimate.activations
    assert estimate.optimizer == 2 * estimate.gradients  # float32 trainables: two moments each
    check_fits(estimate, None)  # nothing known: nothing refused
    check_fits(estimate, estimate.to_allocate * 2)
    with pytest.raises(ConfigError) as err:
        check_fits(estimate, estimate.to_allocate)  # only 90% of it is usable
    text = str(err.value)
    assert "\n" not in text and text.startswith("training cannot fit in memory: it needs about")
    assert "gradient checkpointing off" in text and "try --gradient-checkpointing" in text and "--piece-size" in text
    before = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    with pytest.raises(ConfigError, match="training cannot fit in memory"):
        train_encoder(encoder, pairs, ScheduleConfig(total_steps=1), config, progress=False, memory_available=1000)
    assert all(torch.equal(before[n], p) for n, p in encoder.named_parameters())
    # pieces shrink the activations: a piece of 2 at once instead of both towers of 8
    pieces = estimate_training_memory(encoder, dataclasses.replace(config, piece_size=2))
    assert pieces.rows == 2 and pieces.activations < estimate.activations / 4
    assert isinstance(MemoryEstimate(1, 2, 3, 4, 1, 1, True).describe(), str)


def test_heap_retention_is_limited_on_glibc():
    import platform

    assert limit_heap_retention() is (platform.libc_ver()[0] == "glibc")


def _train_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["encoder", "train", "--model", str(model), "--data", "synthetic:40", "--source", "payments",
            "--steps", "2", "--batch-size", "8", "--max-length", "40", "--out", str(out), *extra]


def test_cli_refuses_what_cannot_fit_in_one_line_and_writes_nothing(pairs, tmp_path, monkeypatch, capsys):
    from pluribus.data.synthetic import make_synthetic_users

    tok = word_tokenizer(pairs_vocabulary(build_pairs(make_synthetic_users(40, seed=0), source="payments",
                                                      positive="profile", max_events=30)))
    folder = tmp_path / "model"
    make_backbone(len(tok), family="llama").save_pretrained(folder)
    tok.save_pretrained(folder)
    run = tmp_path / "run"
    monkeypatch.setenv(LIMIT_ENV, "1MB")
    assert main(_train_args(folder, run)) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "training cannot fit in memory" in lines[0] and LIMIT_ENV in lines[0]
    assert not run.exists()
    monkeypatch.setenv(LIMIT_ENV, "64GiB")  # capped by what the machine has: the same run now trains
    assert main(_train_args(folder, run, "--piece-size", "3", "--gradient-checkpointing")) == 0
    metrics = json.loads((run / "metrics.json").read_text())["train"]
    assert metrics["memory_estimate"]["rows"] == 3 and metrics["memory_estimate"]["checkpointing"] is True
    assert metrics["peak_rss_bytes"] > 0
    assert "Memory: estimated" in (run / "report.md").read_text()

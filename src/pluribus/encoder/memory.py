"""Training memory: gradient checkpointing (turned on and proven), an estimate before training, and a refusal
when the estimate cannot fit the memory the machine has available.

Why the heap setting: on glibc, PyTorch's freed CPU activation buffers of a few MB stay in the process heap once
the allocator's dynamic mmap threshold has risen past them, so resident memory keeps every layer's recomputed
activations although checkpointing freed them (SmolLM2-135M, 512 tokens: 489 MiB above the loaded model instead of
107 MiB). ``limit_heap_retention`` pins the threshold, so large buffers go back to the system when freed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pluribus.errors import ConfigError

if TYPE_CHECKING:
    from pluribus.encoder.config import TrainConfig
    from pluribus.encoder.model import UserEncoder

#: environment variable that caps the memory training may count on (bytes, or e.g. "6GiB", "800MB")
LIMIT_ENV = "PLURIBUS_MEMORY_LIMIT"
#: the share of the available memory an estimate may take (the rest: the allocator, Python objects, the OS)
USABLE_SHARE = 0.9
#: glibc's mallopt parameter number of M_MMAP_THRESHOLD, and the threshold pinned for training
_M_MMAP_THRESHOLD = -3
HEAP_MMAP_THRESHOLD = 128 * 1024
GIB = 2**30

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes of a size such as ``"6GiB"``, ``"800 MB"`` or ``"1073741824"`` (ConfigError otherwise)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"{LIMIT_ENV}={text!r} is not a memory size; give bytes or a number with a unit such as "
                          "6GiB or 800MB")
    return int(float(match.group(1)) * _UNITS[unit])


def available_memory(meminfo: str | Path = "/proc/meminfo", *, device: torch.device | None = None) -> int | None:
    """Bytes training may count on: ``MemAvailable`` of ``meminfo`` (on a CUDA ``device``: its free memory), capped
    by ``$PLURIBUS_MEMORY_LIMIT`` where set; None where neither is known (not Linux, and no limit given)."""
    found: int | None
    if device is not None and device.type == "cuda":
        found = int(torch.cuda.mem_get_info(device)[0])
    else:
        found = _meminfo_available(meminfo)
    limit = os.environ.get(LIMIT_ENV)
    if limit:
        capped = parse_size(limit)
        found = capped if found is None else min(found, capped)
    return found


def _meminfo_available(meminfo: str | Path) -> int | None:
    """``MemAvailable`` of a ``/proc/meminfo``-style file in bytes, or None."""
    found: int | None = None
    try:
        for line in Path(meminfo).read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                found = int(line.split()[1]) * 1024  # the kernel writes kB (KiB)
                break
    except (OSError, ValueError, IndexError):
        found = None
    return found


def limit_heap_retention() -> bool:
    """Pin glibc's mmap threshold so freed activation buffers leave the resident set (see the module docstring);
    False where the C library is not glibc."""
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    return bool(ctypes.CDLL(name).mallopt(_M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD))


def enable_gradient_checkpointing(backbone: Any) -> int:
    """Turn on transformers' activation checkpointing (non-reentrant) for every decoder layer of ``backbone`` (a
    transformers model, under a peft wrapper or not) and prove it is in effect: in a tiny forward and backward in
    training mode, the first checkpointed layer must run twice (forward, then recompute). Returns the number of
    checkpointed layers; ConfigError where the model cannot checkpoint or its layers are not recomputed."""
    inner = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
    name = type(inner).__name__
    if not getattr(inner, "supports_gradient_checkpointing", False):
        raise ConfigError(f"{name} does not support gradient checkpointing; set train.gradient_checkpointing = false "
                          "(--no-gradient-checkpointing) and plan memory for every layer's activations")
    enable = getattr(inner, "activation_checkpointing_enable", None)
    if enable is not None:  # transformers >= 5.x; gradient_checkpointing_enable is its deprecated alias
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = _checkpointed(inner)
    if not layers:
        raise ConfigError(f"gradient checkpointing was enabled on {name} but no layer took it; set "
                          "train.gradient_checkpointing = false (--no-gradient-checkpointing)")
    runs = _layer_runs(inner, layers[0])
    if runs != 2:
        raise ConfigError(f"gradient checkpointing is not in effect on {name}: its first layer ran {runs} time(s) in a "
                          "forward and backward pass instead of 2 (forward, recompute); set "
                          "train.gradient_checkpointing = false (--no-gradient-checkpointing)")
    return len(layers)


def _checkpointed(model: Any) -> list[torch.nn.Module]:
    """The modules below ``model`` (its layers) whose activation checkpointing flag is on."""
    return [m for m in model.modules() if m is not model and getattr(m, "gradient_checkpointing", False) is True]


def _layer_runs(model: Any, layer: torch.nn.Module) -> int:
    """How often the submodules of ``layer`` run (at most) in one forward and backward of ``model`` on a 4-token
    input: 1 without checkpointing, 2 with it (the gradient goes to the input only: no ``.grad`` changes)."""
    counts: dict[int, int] = {}
    handles = [child.register_forward_hook(lambda *_, k=k: counts.__setitem__(k, counts.get(k, 0) + 1))
               for k, child in enumerate(layer.children())]
    was_training = model.training
    model.train()
    try:
        weight = model.get_input_embeddings().weight
        x = torch.randn(1, 4, weight.shape[1], dtype=weight.dtype, device=weight.device, requires_grad=True)
        out = model(inputs_embeds=x, use_cache=False).last_hidden_state
        torch.autograd.grad(out.float().sum(), x)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return max(counts.values(), default=0)


def checkpointing_layers(backbone: Any) -> int:
    """How many layers of ``backbone`` have activation checkpointing on (0: none)."""
    inner = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
    return len(_checkpointed(inner))


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a training run needs: the parameters (resident once the model is loaded), the trainable parameters'
    gradients, AdamW's two moments, and the activations alive at once (one piece, or both towers of the micro-batch
    without the gradient cache) at ``tokens`` per input."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    rows: int
    tokens: int
    checkpointing: bool

    @property
    def to_allocate(self) -> int:
        """What training adds to a loaded model: gradients, optimizer state and activations."""
        return self.gradients + self.optimizer + self.activations

    @property
    def total(self) -> int:
        """Parameters plus what training adds."""
        return self.parameters + self.to_allocate

    def describe(self) -> str:
        """One line: each part, in GiB or MiB."""
        return (f"parameters {size_text(self.parameters)} + gradients {size_text(self.gradients)} + AdamW state "
                f"{size_text(self.optimizer)} + activations {size_text(self.activations)} ({self.rows} inputs x "
                f"{self.tokens} tokens at once, gradient checkpointing {'on' if self.checkpointing else 'off'})")

    def as_dict(self) -> dict[str, int | bool]:
        """The parts in bytes (for metrics.json)."""
        return {"parameters": self.parameters, "gradients": self.gradients, "optimizer": self.optimizer,
                "activations": self.activations, "rows": self.rows, "tokens": self.tokens,
                "checkpointing": self.checkpointing, "total": self.total}


def size_text(size: int) -> str:
    """``3.72 GiB`` from 1 GiB on, ``12.5 MiB`` below."""
    return f"{size / GIB:.2f} GiB" if size >= GIB else f"{size / 2**20:.1f} MiB"


def activation_bytes(config: Any, *, rows: int, tokens: int, element: int, checkpointing: bool,
                     eager: bool, masks: int = 1) -> int:
    """Upper estimate of the activation bytes of one forward and backward of ``rows`` inputs of ``tokens`` through
    a decoder with transformers config ``config``.

    A layer keeps about 10 hidden-width and 5 MLP-width values per token for its backward (norm inputs, q/k/v/o,
    rotated q/k, gate, up, activation, product); eager attention also keeps scores and probabilities per head.
    Without checkpointing every layer keeps them; with it each layer keeps its input, and one layer at a time is
    recomputed. Either way the backward adds two layers' worth (the gradients of one layer's activations and its
    temporaries). The additive mask is one ``[rows, L, L]`` bias per layer type. Measured on SmolLM2-135M (LoRA,
    sdpa, float32, one input of 512 tokens, peak resident growth with the heap threshold pinned): 701 MiB without
    checkpointing (this estimate: 846 MiB), 107 MiB with it (estimate: 118 MiB).
    """
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "d_model", 0) or getattr(config, "n_embd", 0))
    mlp = int(getattr(config, "intermediate_size", 0) or getattr(config, "ffn_dim", 0) or 4 * hidden)
    layers = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0)
                 or getattr(config, "n_layers", 0) or 1)
    heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 0)
                or getattr(config, "n_heads", 0) or 1)
    per_layer = (10 * hidden + 5 * mlp + (3 * heads * tokens if eager else 0)) * element
    around = 4 * hidden * element  # input embeddings, last hidden state and their gradients
    kept = (layers * hidden * element + per_layer if checkpointing else layers * per_layer) + 2 * per_layer
    return rows * tokens * (kept + around) + masks * rows * tokens * tokens * element


def estimate_training_memory(encoder: UserEncoder, config: TrainConfig, *, world_size: int = 1,
                             checkpointing: bool | None = None) -> MemoryEstimate:
    """The memory ``train_encoder`` will need for ``encoder`` under ``config`` on one of ``world_size`` ranks,
    with every input at the encoder's ``max_length`` (the worst case); ``checkpointing``: with or without gradient
    checkpointing (default: as the encoder's layers are set now)."""
    params = list(encoder.parameters())
    trainable = [p for p in params if p.requires_grad]
    shard = max(1, config.batch_size // world_size)
    rows = min(config.piece_size, shard) if config.piece_size is not None else 2 * shard  # both towers at once
    inner = encoder.backbone.get_base_model() if hasattr(encoder.backbone, "get_base_model") else encoder.backbone
    masks = max(1, len(set(encoder.layout.layer_kinds))) if encoder.layout.takes_layer_masks else 1
    if checkpointing is None:
        checkpointing = checkpointing_layers(encoder.backbone) > 0
    activations = activation_bytes(
        inner.config, rows=rows, tokens=encoder.max_length, element=torch.finfo(encoder.dtype).bits // 8,
        checkpointing=checkpointing, eager=encoder.attn_implementation == "eager", masks=masks)
    return MemoryEstimate(
        parameters=sum(p.numel() * p.element_size() for p in params),
        gradients=sum(p.numel() * p.element_size() for p in trainable),
        optimizer=sum(2 * p.numel() * 4 for p in trainable),  # AdamW: exp_avg and exp_avg_sq, float32 at most
        activations=activations, rows=rows, tokens=encoder.max_length, checkpointing=checkpointing)


def fits(estimate: MemoryEstimate, available: int | None) -> bool:
    """Whether what training adds to the loaded model stays within ``USABLE_SHARE`` of ``available`` bytes (True
    where ``available`` is None: nothing known, nothing refused)."""
    return available is None or estimate.to_allocate <= USABLE_SHARE * available


def check_fits(estimate: MemoryEstimate, available: int | None) -> None:
    """ConfigError (one line) when what training adds to the loaded model exceeds ``USABLE_SHARE`` of
    ``available`` bytes; nothing to check where ``available`` is None."""
    if available is None or fits(estimate, available):
        return
    hints = [] if estimate.checkpointing else ["--gradient-checkpointing (train.gradient_checkpointing = true)"]
    hints.append("a smaller --piece-size (train.piece_size: inputs encoded at once; the batch and its negatives "
                 "stay the same)" if estimate.rows > 1 else "a smaller --max-length")
    raise ConfigError(
        f"training cannot fit in memory: it needs about {size_text(estimate.to_allocate)} more than the loaded "
        f"model ({estimate.describe()}), but {size_text(available)} is available (MemAvailable"
        f"{' or ' + LIMIT_ENV if os.environ.get(LIMIT_ENV) else ''}, {USABLE_SHARE:.0%} usable); try "
        + " or ".join(hints)
    )


def prepare_training_memory(encoder: UserEncoder, config: TrainConfig, *, world_size: int = 1,
                            available: int | None = None) -> MemoryEstimate:
    """Set up ``encoder`` for training under ``config``'s memory settings and refuse what cannot fit: turn gradient
    checkpointing on (proven in effect) or off as configured (``None``: on only where training would not fit
    without it, or where the available memory is unknown), pin the heap threshold, estimate the memory and check it
    against ``available`` bytes (default: ``available_memory()``). Returns the estimate."""
    if available is None:
        available = available_memory(device=encoder.device)
    wanted = config.gradient_checkpointing
    if wanted is None:
        without = estimate_training_memory(encoder, config, world_size=world_size, checkpointing=False)
        wanted = available is None or not fits(without, available)
    if wanted:
        if checkpointing_layers(encoder.backbone) == 0:
            enable_gradient_checkpointing(encoder.backbone)
    elif checkpointing_layers(encoder.backbone):
        inner = encoder.backbone.get_base_model() if hasattr(encoder.backbone, "get_base_model") else encoder.backbone
        disable = getattr(inner, "activation_checkpointing_disable", None) or inner.gradient_checkpointing_disable
        disable()
    limit_heap_retention()
    estimate = estimate_training_memory(encoder, config, world_size=world_size)
    check_fits(estimate, available)
    return estimate

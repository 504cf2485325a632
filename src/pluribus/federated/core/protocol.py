"""FedBone's wire protocol: message types, payloads, Flower encoding and byte accounting.

Per global step and client, four tensors cross the split (spec §2.3):

====  =================  ==========================  ===============================================
 #    direction          tensor key (category)       message
====  =================  ==========================  ===============================================
 1    client -> server   ``z``  (embeddings)         reply to ``train.embed``
 2    server -> client   ``f``  (features)           ``train.head``
 3    client -> server   ``df`` (feature_grads)      reply to ``train.head``
 4    server -> client   ``dz`` (embedding_grads)    piggybacked on the next ``train.embed`` / ``evaluate.embed``
====  =================  ==========================  ===============================================

General-model weights never travel; labels and raw inputs never leave a client. Message 4 rides on the next
request, which is equivalent to sending it at once: the client applies it before it embeds again.

Every request carries the global step it belongs to (``step``; a Flower server adds its run token, ``run``) and
an embedding gradient carries the step whose mini-batches it belongs to (``dz_step``); a client echoes ``step``
and ``run`` in its reply. So a client applies a gradient only to the batch it was computed for, and refuses
(``StaleMessage``) or ignores a stale, duplicated or replayed request: a request whose reply came too late is
not withdrawn by Flower, so the client may still process it, and the server then sends the same gradient again.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pluribus.errors import DataError, PluribusError

if TYPE_CHECKING:  # flwr is imported lazily, only where Flower messages are built
    from flwr.app import RecordDict

MSG_EMBED = "train.embed"
MSG_HEAD = "train.head"
MSG_EVAL_EMBED = "evaluate.embed"
MSG_EVAL_HEAD = "evaluate.head"
MESSAGE_TYPES = (MSG_EMBED, MSG_HEAD, MSG_EVAL_EMBED, MSG_EVAL_HEAD)

STEP_KEY, RUN_KEY, DZ_STEP_KEY = "step", "run", "dz_step"  # a message's tags (scalars), see the module doc
ECHO_KEYS = (STEP_KEY, RUN_KEY)  # what a reply repeats of its request

TENSOR_CATEGORIES = {"z": "embeddings", "f": "features", "df": "feature_grads", "dz": "embedding_grads"}

Scalar = int | float | str | bool


@dataclass
class Payload:
    """What one message carries: named tensors and scalars."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    scalars: dict[str, Scalar] = field(default_factory=dict)

    def nbytes(self) -> int:
        """Tensor payload size in bytes (what dominates the wire)."""
        return payload_bytes(self.tensors)


FAULT_KINDS = ("error", "timeout", "unavailable", "injected", "stale")
TRANSIENT_FAULTS = frozenset({"timeout", "unavailable", "injected", "stale"})


class StaleMessage(PluribusError):
    """A request or reply that does not belong to the step or run it arrived in (stale, duplicated, replayed)."""


@dataclass(frozen=True)
class Fault:
    """A client that did not answer usefully, with its true reason.

    kind: "error" (the client answered with an error or a malformed reply: something is wrong with it),
    "timeout" (no reply in time), "unavailable" (the SuperLink answered for it: node or message unavailable, e.g.
    a SuperNode that died), "injected" (simulated) or "stale" (a reply that answers another step or run than the
    request's). All but "error" are transient: the step goes on without the client and a checkpoint is merely
    skipped, where an error stops the checkpoint or resume that needed it.
    """

    reason: str
    kind: str = "error"

    @property
    def transient(self) -> bool:
        """True when the client was only absent (timeout, unavailable node, injected), not broken."""
        return self.kind in TRANSIENT_FAULTS


def payload_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of the tensors' data: sum of numel × element size."""
    return sum(int(t.numel()) * t.element_size() for t in tensors.values())


class ByteMeter:
    """Counts bytes per (phase, category) and per client, e.g. ('train', 'features')."""

    def __init__(self) -> None:
        self.by_category: dict[str, int] = defaultdict(int)
        self.by_client: dict[int, int] = defaultdict(int)

    def add(self, phase: str, client: int, payload: Payload) -> None:
        """Record one message's tensors."""
        for key, tensor in payload.tensors.items():
            n = int(tensor.numel()) * tensor.element_size()
            self.by_category[f"{phase}.{TENSOR_CATEGORIES.get(key, key)}"] += n
            self.by_client[client] += n

    def total(self, phase: str | None = None) -> int:
        """All bytes, or one phase's."""
        return sum(v for k, v in self.by_category.items() if phase is None or k.startswith(phase + "."))

    def as_dict(self) -> dict[str, Any]:
        """Plain-dict view for metrics files."""
        return {"by_category": dict(self.by_category), "by_client": {str(k): v for k, v in self.by_client.items()},
                "total": self.total()}

    def load_dict(self, data: dict[str, Any]) -> None:
        """Restore counts saved by ``as_dict`` (checkpoint resume)."""
        self.by_category = defaultdict(int, {k: int(v) for k, v in data.get("by_category", {}).items()})
        self.by_client = defaultdict(int, {int(k): int(v) for k, v in data.get("by_client", {}).items()})


def encode_payload(payload: Payload) -> RecordDict:
    """A Payload as a Flower RecordDict (tensors in an ArrayRecord, scalars in a ConfigRecord)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    arrays = ArrayRecord({k: Array(np.ascontiguousarray(v.detach().cpu().numpy())) for k, v in payload.tensors.items()})
    return RecordDict({"tensors": arrays, "scalars": ConfigRecord(dict(payload.scalars))})


def decode_payload(content: RecordDict) -> Payload:
    """The Payload inside a Flower RecordDict; a malformed one raises DataError naming the missing record."""
    if "tensors" not in content.array_records or "scalars" not in content.config_records:
        raise DataError("message lacks the 'tensors' or 'scalars' record", field="content",
                        expected="records 'tensors' (ArrayRecord) and 'scalars' (ConfigRecord)")
    arrays = content.array_records["tensors"]
    tensors = {k: torch.from_numpy(np.array(arrays[k].numpy(), copy=True)) for k in arrays}
    scalars = dict(content.config_records["scalars"])
    return Payload(tensors=tensors, scalars=scalars)  # type: ignore[arg-type]


def record_bytes(content: RecordDict) -> int:
    """Serialized tensor bytes of a Flower RecordDict's ArrayRecords (the Flower-side count)."""
    return sum(len(arr.data) for rec in content.array_records.values() for arr in rec.values())

"""Decentralized fusion exchange: parties perturb locally; a hub only relays perturbed tensors.

Protocol (O7: Flower has no peer-to-peer mode, so a hub-and-spoke relay carries the messages):

1. every party sends its release (perturbed parameters, perturbed activation statistics, ledger) to the hub;
2. the hub relays all releases to every party, unchanged (it computes nothing);
3. each party aligns *its own released tensors* to the reference release (party 0) and sends the aligned
   tensors (a permutation of what it already released) to the hub;
4. the hub relays the aligned releases to every party, and each party averages them locally, so every
   party ends with the same fused model.

No party ever sends a raw weight; the hub never sees more than the released, perturbed tensors. Two
transports carry the same messages: ``"inprocess"`` (plain dicts) and ``"flower"``, which builds real
``flwr`` ``Message`` objects and round-trips each through Flower's protobuf wire format. The message
log (``ExchangeResult.log``) holds every array that travelled, for inspection.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pluribus.errors import ConfigError
from pluribus.fusion.accounting import PrivacyLedger
from pluribus.fusion.config import FusionConfig
from pluribus.fusion.descriptors import PartyRelease, release_party
from pluribus.fusion.fuse import check_releases, check_same_architecture
from pluribus.fusion.matching import align, average
from pluribus.fusion.spec import Params, PermutationSpec, spec_for

HUB = "hub"


@dataclass
class LoggedMessage:
    """One message as it travelled: sender, receiver, kind and every array it carried."""

    src: str
    dst: str
    kind: str
    arrays: dict[str, torch.Tensor]
    meta: dict[str, Any]
    wire_bytes: int = 0


@dataclass
class ExchangeResult:
    """Each party's fused tensors (identical across parties), the ledgers and the message log."""

    fused: dict[str, Params]
    ledgers: list[PrivacyLedger]
    log: list[LoggedMessage] = field(default_factory=list)


class _Wire:
    """Carries (arrays, meta) between two named endpoints and logs what it saw."""

    def __init__(self, transport: str) -> None:
        if transport not in ("inprocess", "flower"):
            raise ConfigError(f"unknown transport {transport!r}; choose 'inprocess' or 'flower'")
        self.transport = transport
        self.log: list[LoggedMessage] = []
        self._ids = {HUB: 0}

    def _node(self, name: str) -> int:
        return self._ids.setdefault(name, len(self._ids))

    def send(self, src: str, dst: str, kind: str, arrays: dict[str, torch.Tensor], meta: dict[str, Any]):
        """Deliver a message and return what the receiver gets (arrays, meta)."""
        if self.transport == "inprocess":
            got_arrays = {k: v.detach().clone() for k, v in arrays.items()}
            got_meta = json.loads(json.dumps(meta))
            size = sum(v.numel() * v.element_size() for v in arrays.values())
        else:
            got_arrays, got_meta, size = self._flower_roundtrip(src, dst, kind, arrays, meta)
        self.log.append(LoggedMessage(src, dst, kind, got_arrays, got_meta, size))
        return got_arrays, got_meta

    def _flower_roundtrip(
        self, src: str, dst: str, kind: str, arrays: dict[str, torch.Tensor], meta: dict[str, Any]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], int]:
        from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, RecordDict
        from flwr.common.serde import message_from_proto, message_to_proto

        content = RecordDict(
            {
                "arrays": ArrayRecord(torch_state_dict={k: v.detach().contiguous() for k, v in arrays.items()}),
                "meta": ConfigRecord({"json": json.dumps(meta)}),
            }
        )
        metadata = Metadata(
            run_id=1, message_id="", src_node_id=self._node(src), dst_node_id=self._node(dst),
            reply_to_message_id="", group_id=kind, created_at=time.time(), ttl=3600.0, message_type="query",
        )
        message = Message(metadata=metadata, content=content)  # type: ignore[call-overload]
        wire = message_to_proto(message).SerializeToString()
        from flwr.proto.message_pb2 import Message as ProtoMessage

        proto = ProtoMessage()
        proto.ParseFromString(wire)
        received = message_from_proto(proto)
        record = received.content["arrays"]
        assert isinstance(record, ArrayRecord)
        got = {k: v.clone() for k, v in record.to_torch_state_dict().items()}
        got_meta = json.loads(str(received.content["meta"]["json"]))
        return got, got_meta, len(wire)


def _pack(prefix: str, rel: PartyRelease) -> dict[str, torch.Tensor]:
    out = {f"{prefix}params/{k}": v for k, v in rel.params.items()}
    out.update({f"{prefix}acts/{k}": v for k, v in rel.acts.items()})
    return out


def _unpack(prefix: str, arrays: dict[str, torch.Tensor], party: str, private: bool) -> PartyRelease:
    params = {k[len(prefix) + 7 :]: v for k, v in arrays.items() if k.startswith(prefix + "params/")}
    acts = {k[len(prefix) + 5 :]: v for k, v in arrays.items() if k.startswith(prefix + "acts/")}
    return PartyRelease(party, params, acts, None, private)


def run_exchange(
    models: Sequence[nn.Module],
    *,
    config: FusionConfig | None = None,
    party_data: Sequence[torch.Tensor] | None = None,
    spec: PermutationSpec | None = None,
    transport: str = "inprocess",
    generators: Sequence[torch.Generator] | None = None,
    allow_non_private: bool = False,
) -> ExchangeResult:
    """Run the decentralized exchange among ``len(models)`` parties and a relaying hub."""
    config = config or FusionConfig()
    if not config.private and not allow_non_private:
        raise ConfigError("epsilon = inf would send raw weights over the exchange; pass allow_non_private=True")
    check_same_architecture(models)
    spec = spec or spec_for(models[0])
    wire = _Wire(transport)
    names = [f"party{k}" for k in range(len(models))]

    # 1. local releases, sent to the hub
    own: list[PartyRelease] = []
    at_hub: list[PartyRelease] = []
    for k, (name, model) in enumerate(zip(names, models, strict=True)):
        rel = release_party(
            model, spec, config, party=name, data=None if party_data is None else party_data[k],
            generator=None if generators is None else generators[k],
        )
        own.append(rel)
        ledger_json = json.dumps(rel.ledger.as_dict() if rel.ledger else {})
        arrays, meta = wire.send(name, HUB, "release", _pack("", rel), {"party": name, "ledger": ledger_json})
        at_hub.append(_unpack("", arrays, meta["party"], rel.private))
    check_releases(at_hub)

    # 2. the hub relays every release to every party, unchanged
    relay_arrays: dict[str, torch.Tensor] = {}
    for rel in at_hub:
        relay_arrays.update(_pack(f"{rel.party}:", rel))
    views: dict[str, list[PartyRelease]] = {}
    for name in names:
        arrays, _ = wire.send(HUB, name, "relay_releases", relay_arrays, {"parties": names})
        views[name] = [_unpack(f"{p}:", arrays, p, config.private) for p in names]

    # 3. each party aligns its own release to the reference release and sends the result
    aligned_at_hub: dict[str, Params] = {}
    for k, name in enumerate(names):
        reference = views[name][0]
        mine = views[name][k]
        if k == 0:
            aligned = dict(mine.params)
        else:
            use_acts = bool(reference.acts) and bool(mine.acts)
            aligned = align(
                spec, reference.params, mine.params, solver=config.solver,
                ref_acts=reference.acts if use_acts else None, other_acts=mine.acts if use_acts else None,
                act_weight=config.act_weight, max_sweeps=config.max_sweeps, ot_reg=config.ot_reg, seed=config.seed + k,
            )
        arrays, _ = wire.send(name, HUB, "aligned", {f"params/{p}": v for p, v in aligned.items()}, {"party": name})
        aligned_at_hub[name] = {p[7:]: v for p, v in arrays.items()}

    # 4. the hub relays the aligned releases; each party averages locally
    relay_aligned = {f"{p}:{key}": v for p, params in aligned_at_hub.items() for key, v in params.items()}
    fused: dict[str, Params] = {}
    for name in names:
        arrays, _ = wire.send(HUB, name, "relay_aligned", relay_aligned, {"parties": names})
        per_party = [{key[len(p) + 1 :]: v for key, v in arrays.items() if key.startswith(p + ":")} for p in names]
        fused[name] = average(per_party)
    ledgers = [rel.ledger or PrivacyLedger(rel.party) for rel in own]
    return ExchangeResult(fused, ledgers, wire.log)

"""Decentralized fusion exchange: parties perturb locally; a hub only relays perturbed tensors.

Protocol (O7: Flower has no peer-to-peer mode, so a hub-and-spoke relay carries the messages):

1. every party sends its release (perturbed parameters, perturbed activation statistics, ledger) to the hub,
   which checks names, shapes and finiteness against the agreed architecture (:func:`validate_release`);
2. the hub relays to every party the reference release (the first party's) and the party's own release,
   unchanged (it computes nothing; the other releases are not needed for the next step);
3. each party aligns *its own released tensors* to the reference release (:func:`align_own_release`) and
   sends the aligned tensors to the hub, which checks that, for a permutation solver, they are a
   permutation of what that party already released (:func:`check_aligned`);
4. the hub relays all aligned releases to every party, and each party averages them locally
   (:func:`average_relayed`), so every party ends with the same fused model.

No party ever sends a raw weight; the hub never sees more than the released, perturbed tensors. The
party-side steps here are used twice: by :func:`run_exchange` (every party in this process) and by the
Flower ClientApp of :mod:`pluribus.fusion.flower.apps` (each party its own process). Two transports carry
:func:`run_exchange`'s messages: ``"inprocess"`` (plain dicts) and ``"flower"``, which builds real ``flwr``
``Message`` objects and round-trips each through Flower's protobuf wire format. The message log
(``ExchangeResult.log``) holds every array that travelled, for inspection.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pluribus.errors import ConfigError, DataError, ShapeError
from pluribus.fusion.core.config import FusionConfig
from pluribus.fusion.core.descriptors import RUNNING_STATS, PartyRelease, clip_bounds, release_party
from pluribus.fusion.core.fuse import check_same_architecture
from pluribus.fusion.core.matching import align, average
from pluribus.fusion.core.spec import Params, PermutationSpec, spec_for
from pluribus.fusion.privacy.accounting import PrivacyLedger
from pluribus.fusion.privacy.ldp import Mechanism, make_mechanism

HUB = "hub"
# Solvers whose alignment only reorders units: an aligned tensor then holds exactly the released values.
PERMUTATION_SOLVERS = ("hungarian", "graph", "identity")


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


def pack_release(rel: PartyRelease, prefix: str = "") -> dict[str, torch.Tensor]:
    """A release's tensors under flat message keys: ``<prefix>params/<name>`` and ``<prefix>acts/<perm>``."""
    out = {f"{prefix}params/{k}": v for k, v in rel.params.items()}
    out.update({f"{prefix}acts/{k}": v for k, v in rel.acts.items()})
    return out


def unpack_release(arrays: Mapping[str, torch.Tensor], party: str, *, prefix: str = "",
                   private: bool = True) -> PartyRelease:
    """Inverse of :func:`pack_release` (keys without ``prefix`` are ignored; the ledger is not carried)."""
    params = {k[len(prefix) + 7 :]: v for k, v in arrays.items() if k.startswith(prefix + "params/")}
    acts = {k[len(prefix) + 5 :]: v for k, v in arrays.items() if k.startswith(prefix + "acts/")}
    return PartyRelease(party, params, acts, None, private)


@dataclass(frozen=True)
class ReleaseShapes:
    """What a release of one architecture must hold: tensor name -> shape and dtype, for parameters and
    activations, and (under DP) the mechanism each tensor was released with, whose output set is public."""

    params: dict[str, tuple[int, ...]]
    acts: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    mechanisms: dict[str, Mechanism] = field(default_factory=dict)  # "params/<name>" or "acts/<perm>"


def release_shapes(template: nn.Module, spec: PermutationSpec, config: FusionConfig) -> ReleaseShapes:
    """The tensors a party of ``template``'s architecture releases under ``config`` (a meta-device model will
    do: only shapes, dtypes and module kinds are read, so the hub needs no weights)."""
    state = template.state_dict()
    params = {k: tuple(v.shape) for k, v in state.items()
              if not (config.private and k.rsplit(".", 1)[-1] in RUNNING_STATS)}
    dtypes = {f"params/{k}": state[k].dtype for k in params}
    acts: dict[str, tuple[int, ...]] = {}
    if config.use_act_stats:
        acts = {name: (int(spec.sizes[name]),) for name in spec.order}
        dtypes.update({f"acts/{name}": torch.float32 for name in acts})
    mechanisms: dict[str, Mechanism] = {}
    if config.private:
        bounds = clip_bounds(template, clip_mult=config.clip_mult, bn_clip=config.bn_clip)
        for key in params:
            mechanisms[f"params/{key}"] = make_mechanism(config.mechanism, config.weight_epsilon, lo=-bounds[key],
                                                         hi=bounds[key], delta=config.delta)
        if acts:
            act_mech = make_mechanism(config.act_mechanism, config.act_epsilon, lo=0.0, hi=config.act_max,
                                      delta=config.delta)
            mechanisms.update({f"acts/{name}": act_mech for name in acts})
    return ReleaseShapes(params, acts, dtypes, mechanisms)


def validate_release(rel: PartyRelease, shapes: ReleaseShapes) -> None:
    """Raise DataError/ShapeError naming the party and tensor unless ``rel`` holds exactly the expected tensors:
    names, shapes and dtypes of the agreed architecture, finite, and (under DP) every value one that the tensor's
    mechanism could have released (on its public output lattice, within its output bound). So a tampered
    shape, a missing or extra tensor, NaN or inf, a value off the lattice or a scaled release is refused."""
    for what, kind, got, want in (("tensor", "params", rel.params, shapes.params),
                                  ("activation statistic", "acts", rel.acts, shapes.acts)):
        extra, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
        if extra or missing:
            raise DataError(f"party {rel.party!r} released {what}s {extra[:5]} not expected, lacks {missing[:5]}")
        for key, value in got.items():
            if tuple(value.shape) != want[key]:
                raise ShapeError(f"party {rel.party!r} {what} {key!r}", value.shape, f"{list(want[key])}")
            expected = shapes.dtypes.get(f"{kind}/{key}")
            if not torch.is_floating_point(value) or (expected is not None and value.dtype != expected):
                raise DataError(f"party {rel.party!r} {what} {key!r} has dtype {value.dtype}, expected "
                                f"{expected or 'floating point'}")
    rel.check()
    for what, kind, got in (("tensor", "params", rel.params), ("activation statistic", "acts", rel.acts)):
        for key, value in got.items():
            mech = shapes.mechanisms.get(f"{kind}/{key}")
            if mech is None:
                continue
            bad = int((~mech.could_output(value)).sum())
            if bad:
                raise DataError(f"party {rel.party!r} {what} {key!r}: {bad} of {value.numel()} values are not "
                                f"outputs of the agreed {mech.name} mechanism (epsilon {mech.epsilon:g}, clip "
                                f"[{mech.lo:.4g}, {mech.hi:.4g}]): off its lattice or past its output bound")


def check_aligned(party: str, released: Params, aligned: Params, *, solver: str) -> None:
    """Raise DataError unless ``aligned`` has the released tensors' names and shapes and, for a permutation
    solver, each aligned tensor holds exactly the released values (a permutation of them): so the align step
    can carry no information beyond the party's release."""
    if set(aligned) != set(released):
        raise DataError(f"party {party!r} sent aligned tensors {sorted(set(aligned) ^ set(released))[:5]} "
                        "that do not match its release")
    for key, value in aligned.items():
        if value.shape != released[key].shape:
            raise ShapeError(f"party {party!r} aligned tensor {key!r}", value.shape, f"{list(released[key].shape)}")
        if not torch.is_floating_point(value) or not bool(torch.isfinite(value).all()):
            raise DataError(f"party {party!r} aligned tensor {key!r} is not finite floating point")
        if solver in PERMUTATION_SOLVERS and not torch.equal(value.flatten().sort().values,
                                                                released[key].flatten().sort().values):
            raise DataError(f"party {party!r} aligned tensor {key!r} is not a permutation of its released values")


def align_own_release(spec: PermutationSpec, config: FusionConfig, reference: PartyRelease, mine: PartyRelease,
                      *, index: int, is_reference: bool = False) -> Params:
    """Party-side step 3: this party's released tensors aligned to the reference release (the reference party
    sends its release as it is)."""
    if is_reference:
        return dict(mine.params)
    use_acts = bool(reference.acts) and bool(mine.acts)
    return align(
        spec, reference.params, mine.params, solver=config.solver,
        ref_acts=reference.acts if use_acts else None, other_acts=mine.acts if use_acts else None,
        act_weight=config.act_weight, max_sweeps=config.max_sweeps, ot_reg=config.ot_reg, seed=config.seed + index,
        start=config.match_start, tol=config.match_tol,
    )


def pack_aligned(party: str, aligned: Params) -> dict[str, torch.Tensor]:
    """Aligned tensors under relay keys ``<party>:<name>``."""
    return {f"{party}:{k}": v for k, v in aligned.items()}


def average_relayed(arrays: Mapping[str, torch.Tensor], parties: Sequence[str]) -> Params:
    """Party-side step 4 (and the hub's copy): the plain average of every party's relayed aligned tensors."""
    per_party = [{key[len(p) + 1 :]: v for key, v in arrays.items() if key.startswith(p + ":")} for p in parties]
    return average(per_party)


def fused_digest(fused: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the fused tensors (names, dtypes, shapes, bytes): parties and hub compare it, not tensors."""
    h = hashlib.sha256()
    for key in sorted(fused):
        value = fused[key].detach().contiguous().cpu()
        h.update(f"{key}|{value.dtype}|{list(value.shape)}|".encode())
        h.update(value.numpy().tobytes())
    return h.hexdigest()


def run_exchange(
    models: Sequence[nn.Module],
    *,
    config: FusionConfig | None = None,
    party_data: Sequence[torch.Tensor] | None = None,
    spec: PermutationSpec | None = None,
    transport: str = "inprocess",
    allow_non_private: bool = False,
) -> ExchangeResult:
    """Run the decentralized exchange among ``len(models)`` parties and a relaying hub, in this process."""
    config = config or FusionConfig()
    if not config.private and not allow_non_private:
        raise ConfigError("epsilon = inf would send raw weights over the exchange; pass allow_non_private=True")
    check_same_architecture(models)
    spec = spec or spec_for(models[0])
    shapes = release_shapes(models[0], spec, config)
    wire = _Wire(transport)
    names = [f"party{k}" for k in range(len(models))]

    # 1. local releases, sent to the hub, which checks them
    own: list[PartyRelease] = []
    at_hub: list[PartyRelease] = []
    for k, (name, model) in enumerate(zip(names, models, strict=True)):
        rel = release_party(
            model, spec, config, party=name, data=None if party_data is None else party_data[k],
        )
        own.append(rel)
        ledger_json = json.dumps(rel.ledger.as_dict() if rel.ledger else {})
        arrays, meta = wire.send(name, HUB, "release", pack_release(rel), {"party": name, "ledger": ledger_json})
        at_hub.append(unpack_release(arrays, meta["party"], private=rel.private))
        validate_release(at_hub[-1], shapes)

    # 2. the hub relays the reference release and the party's own release to every party, unchanged
    reference = at_hub[0]
    views: dict[str, tuple[PartyRelease, PartyRelease]] = {}
    for rel in at_hub:
        relay = {**pack_release(reference, "reference:"), **pack_release(rel, "own:")}
        arrays, _ = wire.send(HUB, rel.party, "relay_releases", relay, {"reference": reference.party})
        views[rel.party] = (unpack_release(arrays, reference.party, prefix="reference:", private=config.private),
                            unpack_release(arrays, rel.party, prefix="own:", private=config.private))

    # 3. each party aligns its own release to the reference release and sends the result; the hub checks it
    aligned_at_hub: dict[str, Params] = {}
    for k, name in enumerate(names):
        ref_view, mine = views[name]
        aligned = align_own_release(spec, config, ref_view, mine, index=k, is_reference=k == 0)
        arrays, _ = wire.send(name, HUB, "aligned", {f"params/{p}": v for p, v in aligned.items()}, {"party": name})
        aligned_at_hub[name] = {p[7:]: v for p, v in arrays.items()}
        check_aligned(name, at_hub[k].params, aligned_at_hub[name], solver=config.solver)

    # 4. the hub relays the aligned releases; each party averages locally
    relay_aligned = {key: v for p, params in aligned_at_hub.items() for key, v in pack_aligned(p, params).items()}
    fused: dict[str, Params] = {}
    for name in names:
        arrays, _ = wire.send(HUB, name, "relay_aligned", relay_aligned, {"parties": names})
        fused[name] = average_relayed(arrays, names)
    ledgers = [rel.ledger or PrivacyLedger(rel.party) for rel in own]
    return ExchangeResult(fused, ledgers, wire.log)

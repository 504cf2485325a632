"""PrivFusion on Flower: each party a ClientApp with its own model file and data; a ServerApp hub that relays.

Who holds what:

- a **party** (ClientApp, one SuperNode each) holds its model file and its data file; its node config names
  them: ``party-name``, ``model-file``, ``data-file`` and optionally ``fused-out`` (where it saves the fused
  model). It perturbs locally (``release_party``), aligns its own release to the reference release, and
  averages the relayed aligned releases into the fused model, whose BatchNorm statistics it re-estimates on
  its own data (that model stays with the party);
- the **hub** (ServerApp) holds the released, perturbed tensors only. It checks every release (names, shapes
  and finiteness against the agreed architecture) and every aligned release (for a permutation solver: a
  permutation of that party's release), relays them, writes the privacy report from the ledgers the parties
  sent, and writes the fused model from the relayed aligned tensors (BatchNorm statistics re-estimated on a
  public calibration file if one is given).

Messages (the protocol of :mod:`pluribus.fusion.core.exchange`, over Flower's Message API):
``query.hello`` (party -> name, index, architecture; no tensors), ``query.release`` (party -> its release
and ledger), ``query.align`` (hub -> reference release + the party's own release; party -> its aligned
tensors), ``query.average`` (hub -> every aligned release; party -> a SHA-256 digest of its fused tensors,
which must equal the hub's).

A party that fails a step (an error reply, no reply within the step timeout, a release that fails the
checks, another architecture, a digest that differs) is left out: ``(party, step, reason)`` is logged and
listed in the result; the fusion goes on while at least 2 parties remain, else it stops with PluribusError.

The same two apps run in-process (:func:`run_fusion_inprocess`, an ``InProcessGrid``), on the Ray simulation
engine and on the deployment engine (:func:`run_fusion_flower`; launching is :mod:`pluribus.flower_engines`).
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from pluribus.errors import ConfigError, PluribusError
from pluribus.fusion.core.config import FusionConfig
from pluribus.fusion.core.descriptors import PartyRelease, release_party
from pluribus.fusion.core.exchange import (
    align_own_release,
    average_relayed,
    check_aligned,
    fused_digest,
    pack_aligned,
    pack_release,
    release_shapes,
    unpack_release,
    validate_release,
)
from pluribus.fusion.core.spec import spec_for
from pluribus.fusion.flower.party_files import (
    build_model,
    describe_architecture,
    load_party_data,
    load_party_model,
    read_party_architecture,
    save_party_model,
)
from pluribus.fusion.privacy.accounting import PrivacyLedger
from pluribus.fusion.privacy.odometer import (
    DEFAULT_BUDGET,
    BudgetExhausted,
    PrivacyOdometer,
    Spent,
    check_budget,
    model_digest,
)

log = logging.getLogger("pluribus.fusion.flower")

Engine = Literal["inprocess", "simulation", "deployment"]
ENGINES = ("inprocess", "simulation", "deployment")
HELLO, RELEASE, ALIGN, AVERAGE = "query.hello", "query.release", "query.align", "query.average"
STEPS = {HELLO: "hello", RELEASE: "release", ALIGN: "align", AVERAGE: "average"}
RESULT_FILE = "fusion_flower.json"
FUSED_FILE = "fused.safetensors"
FUSED_TENSORS_FILE = "fused_tensors.safetensors"
PRIVACY_FILE = "privacy.json"
PRIVACY_REPORT_FILE = "privacy.md"
_STATE = "pluribus_fusion_party"  # ConfigRecord in a party's Context.state: the digest of what it released


@dataclass(frozen=True)
class PartyFiles:
    """One party's own files: its model file, its data file, its state folder (privacy odometer; default
    ``<model folder>/<name>.state``), its privacy budget (epsilon per weight scalar of this model, over every
    release; default ``odometer.DEFAULT_BUDGET``) and (optional) where it saves its own fused model.

    Attributes:
        name: the party's name.
        model: its model file.
        data: its data file.
        fused_out: where it saves its own copy of the fused model, or None.
        state_dir: its state folder, or None for the default.
        budget: its privacy budget, or None for the default.
    """

    name: str
    model: Path
    data: Path
    fused_out: Path | None = None
    state_dir: Path | None = None
    budget: float | None = None

    @property
    def state(self) -> Path:
        """The party's state folder (its privacy odometer lives there)."""
        return Path(self.state_dir) if self.state_dir is not None else Path(self.model).parent / f"{self.name}.state"

    def node_config(self, index: int) -> dict[str, Any]:
        """This party's SuperNode node config (absolute paths: the party process may start elsewhere).

        Args:
            index: the party's partition id.
        """
        cfg: dict[str, Any] = {"partition-id": index, "party-name": self.name,
                               "model-file": str(Path(self.model).resolve()),
                               "data-file": str(Path(self.data).resolve()),
                               "state-dir": str(self.state.resolve())}
        if self.fused_out is not None:
            cfg["fused-out"] = str(Path(self.fused_out).resolve())
        if self.budget is not None:
            cfg["budget"] = float(self.budget)
        return cfg


@dataclass
class Exclusion:
    """A party left out: at which step and why."""

    party: str
    step: str
    reason: str


@dataclass
class FlowerFusionResult:
    """What the hub ends with: fused tensors (and model, when it could rebuild it), ledgers, who was left out.

    Attributes:
        fused: the fused tensors.
        model: the fused model, when the hub could rebuild it (it holds no party's architecture file otherwise).
        ledgers: the ledgers of the parties that took part.
        parties: the parties' names, in order.
        excluded: the parties left out, each with its step and reason.
        digest: the SHA-256 digest of the fused tensors (every party checks its own against it).
        out_dir: where the hub wrote its outputs, or None.
        result: the run's summary as written to ``fusion_flower.json``.
    """

    fused: dict[str, torch.Tensor]
    model: torch.nn.Module | None
    ledgers: list[PrivacyLedger]
    parties: list[str]
    excluded: list[Exclusion] = field(default_factory=list)
    digest: str = ""
    out_dir: str | None = None
    result: dict[str, Any] = field(default_factory=dict)


# ---- messages ------------------------------------------------------------------------------------------

def _content(arrays: Mapping[str, torch.Tensor] | None = None, **meta: Any) -> RecordDict:
    record: dict[str, Any] = {"meta": ConfigRecord({"json": json.dumps(meta)})}
    if arrays:
        record["arrays"] = ArrayRecord(torch_state_dict={k: v.detach().contiguous() for k, v in arrays.items()})
    return RecordDict(record)


def _read(content: RecordDict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    meta_rec = content.config_records.get("meta")
    if meta_rec is None or "json" not in meta_rec:
        raise PluribusError("message has no 'meta' record")
    meta = json.loads(str(meta_rec["json"]))
    rec = content.array_records.get("arrays")
    arrays = {k: v.clone() for k, v in rec.to_torch_state_dict().items()} if rec is not None else {}
    return arrays, meta


def _record_bytes(content: RecordDict) -> int:
    return sum(len(arr.data) for rec in content.array_records.values() for arr in rec.values())


def config_to_json(config: FusionConfig) -> str:
    """The fusion config as one JSON string (a run_config value; inf and None survive, unlike TOML scalars)."""
    from pluribus.config import config_to_dict

    return json.dumps(config_to_dict(config))


def config_from_json(text: str) -> FusionConfig:
    """Inverse of :func:`config_to_json`."""
    from pluribus.config import config_from_dict

    return config_from_dict(FusionConfig, json.loads(text), source="run_config 'fusion-json'")


# ---- party (ClientApp) -------------------------------------------------------------------------------

def _party_files(context: Context, parties: Sequence[PartyFiles] | None) -> tuple[int, PartyFiles]:
    """This node's party: its node config names its files (deployment), else ``parties[partition-id]``."""
    if "partition-id" not in context.node_config:
        raise ConfigError("node_config lacks 'partition-id' (start the SuperNode with --node-config 'partition-id=K')")
    index = int(context.node_config["partition-id"])
    node = context.node_config
    if "model-file" in node:
        if "data-file" not in node:
            raise ConfigError("node_config names a 'model-file' but no 'data-file' (the party's own data)")
        out = str(node.get("fused-out", "")) or None
        state = str(node.get("state-dir", "")) or None
        budget = None if node.get("budget") in (None, "") else check_budget(node["budget"], what="node_config 'budget'")
        return index, PartyFiles(str(node.get("party-name", f"party{index}")), Path(str(node["model-file"])),
                                 Path(str(node["data-file"])), None if out is None else Path(out),
                                 None if state is None else Path(state), budget)
    listed = list(parties) if parties is not None else [
        _party_from_json(p) for p in json.loads(str(context.run_config.get("parties-json", "[]")))]
    if not 0 <= index < len(listed):
        raise ConfigError(f"partition-id {index} has no party (the run knows {len(listed)} parties); give the "
                          "SuperNode node_config 'model-file' and 'data-file'")
    return index, listed[index]


class AlreadyReleased(PluribusError):
    """The hub asked a party for a second release in one run."""


class NotOwnRelease(PluribusError):
    """The hub relayed a release that is not the one this party sent."""


#: What a party tells the hub when it cannot answer: a fixed code per kind of failure, never the error's text
#: (which may name its files, the shape of its data or its row count). The details stay in the party's log.
REFUSAL_CODES: tuple[tuple[type[BaseException], str], ...] = (
    (BudgetExhausted, "budget-exhausted"),
    (AlreadyReleased, "already-released"),
    (NotOwnRelease, "not-own-release"),
)
PARTY_ERROR = "party-error"
REFUSED = ("budget-exhausted", "already-released")  # a party that said no, not one that broke
party_log = logging.getLogger("pluribus.fusion.party")


def refusal_reason(step: str, code: str) -> str:
    """The error reason a party sends for ``code`` at ``step`` (all the hub learns of a failure)."""
    return f"party refused at step {step}: {code}"


def guarded(step: str) -> Callable[[Callable[[Message, Context], Message]], Callable[[Message, Context], Message]]:
    """A party handler whose failures reach the hub as an error reply with a fixed code and the step only; the
    exception itself (paths, shapes, counts) is logged on the party's host."""
    def wrap(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
        def call(message: Message, context: Context) -> Message:
            try:
                return handler(message, context)
            except Exception as err:  # every failure, ours or a library's: none may carry text to the hub
                code = next((c for kind, c in REFUSAL_CODES if isinstance(err, kind)), PARTY_ERROR)
                party_log.warning("party at step %s: %s (%s: %s); the hub is told only %r", step, code,
                                  type(err).__name__, err, code, exc_info=code == PARTY_ERROR)
                return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=refusal_reason(step, code)),
                               reply_to=message)
        call.__name__ = handler.__name__
        return call
    return wrap


#: Every field a party's reply may carry, per message type: public (names, the agreed architecture, digests)
#: or ledgered (the release and its ledger). ``reply_leaks`` checks a reply against it.
REPLY_FIELDS = {HELLO: {"party", "index", "architecture"}, RELEASE: {"party", "ledger", "private"},
                ALIGN: {"party"}, AVERAGE: {"party", "digest"}}
REPLY_ARRAYS = {HELLO: (), RELEASE: ("params/", "acts/"), ALIGN: ("params/",), AVERAGE: ()}
LEDGER_FIELDS = {"party", "noise", "private_noise", "releases", "per_scalar", "whole_release_basic",
                 "whole_release_gaussian", "guarantees", "status", "spent_on_this_model", "budget"}
_REFUSAL = re.compile(r"party refused at step (hello|release|align|average): (" +
                      "|".join([c for _, c in REFUSAL_CODES] + [PARTY_ERROR]) + ")")


def reply_leaks(reply: Message) -> list[str]:
    """What in a party's reply is neither public nor in its ledger (empty: nothing): a field the protocol does
    not list, an array that is not a released or aligned tensor, error text beyond a fixed code and step."""
    mtype = reply.metadata.message_type
    if reply.has_error():
        return [] if _REFUSAL.fullmatch(reply.error.reason or "") else [f"{mtype}: error text {reply.error.reason!r}"]
    if mtype not in REPLY_FIELDS:
        return [f"a reply to an unknown message type {mtype!r}"]
    arrays, meta = _read(reply.content)
    leaks = [f"{mtype}: field {k!r}" for k in sorted(set(meta) - REPLY_FIELDS[mtype])]
    leaks += [f"{mtype}: array {k!r}" for k in sorted(arrays) if not k.startswith(REPLY_ARRAYS[mtype] or ("\0",))]
    if mtype == RELEASE and isinstance(meta.get("ledger"), dict):
        leaks += [f"{mtype}: ledger field {k!r}" for k in sorted(set(meta["ledger"]) - LEDGER_FIELDS)]
    return leaks


def make_party_app(config: FusionConfig | None = None, *, parties: Sequence[PartyFiles] | None = None) -> ClientApp:
    """The party's ClientApp; ``config`` None reads run_config 'fusion-json'; ``parties`` lists the parties'
    files by partition-id (for engines that cannot give each node its own node config, like the simulation).

    Args:
        config: the fusion settings (default: from the run config).
        parties: the parties' files indexed by partition id (in-process runs), or None to read each node's own
            files from its node config.
    """
    app = ClientApp()

    def setup(context: Context) -> tuple[int, PartyFiles, FusionConfig]:
        cfg = config if config is not None else config_from_json(str(context.run_config["fusion-json"]))
        index, files = _party_files(context, parties)
        return index, files, cfg

    @app.query("hello")
    @guarded("hello")
    def hello(message: Message, context: Context) -> Message:
        index, files, _ = setup(context)
        return Message(_content(party=files.name, index=index, architecture=read_party_architecture(files.model)),
                       reply_to=message)

    @app.query("release")
    @guarded("release")
    def release(message: Message, context: Context) -> Message:
        _, files, cfg = setup(context)
        if _STATE in context.state.config_records:  # one release per run: a second query gets nothing new
            raise AlreadyReleased(f"party {files.name!r} already released in this run")
        _, meta = _read(message.content)
        model = load_party_model(files.model, architecture=meta["architecture"])
        x, _ = load_party_data(files.data, model=model)
        odometer = PrivacyOdometer(files.state, model_digest(model.state_dict()), party=files.name,
                                   budget=files.budget if files.budget is not None else DEFAULT_BUDGET)
        spent: list[Spent] = []
        rel = release_party(model, spec_for(model), cfg, party=files.name, data=x if cfg.use_act_stats else None,
                            before_noise=lambda ledger: spent.append(odometer.debit(ledger, run=str(context.run_id))))
        arrays = pack_release(rel)
        context.state.config_records[_STATE] = ConfigRecord({"released": fused_digest(arrays)})
        ledger = rel.ledger or PrivacyLedger(files.name)
        if spent:
            ledger.spent, ledger.budget = spent[0].as_dict(), odometer.budget
        return Message(_content(arrays, party=files.name, ledger=ledger.as_dict(), private=rel.private),
                       reply_to=message)

    @app.query("align")
    @guarded("align")
    def align_step(message: Message, context: Context) -> Message:
        index, files, cfg = setup(context)
        arrays, meta = _read(message.content)
        reference = unpack_release(arrays, str(meta["reference"]), prefix="reference:", private=cfg.private)
        mine = unpack_release(arrays, files.name, prefix="own:", private=cfg.private)
        sent = context.state.config_records.get(_STATE)
        if sent is None or fused_digest(pack_release(mine)) != str(sent["released"]):
            raise NotOwnRelease(f"party {files.name!r}: the hub relayed a release that is not the one it sent")
        model = build_model(read_party_architecture(files.model), device="meta")
        aligned = align_own_release(spec_for(model), cfg, reference, mine, index=int(meta["index"]),
                                    is_reference=bool(meta["is_reference"]))
        return Message(_content({f"params/{k}": v for k, v in aligned.items()}, party=files.name), reply_to=message)

    @app.query("average")
    @guarded("average")
    def average_step(message: Message, context: Context) -> Message:
        _, files, _ = setup(context)
        arrays, meta = _read(message.content)
        fused = average_relayed(arrays, list(meta["parties"]))
        if files.fused_out is not None:  # the party's own copy: BatchNorm re-estimated on its private rows
            from pluribus.fusion.core.fuse import load_fused

            own = load_party_model(files.model)
            x, _ = load_party_data(files.data, model=own)
            save_party_model(files.fused_out, load_fused(own, fused, calib_x=x), party=files.name)
        return Message(_content(party=files.name, digest=fused_digest(fused)), reply_to=message)

    return app


# ---- hub (ServerApp) ------------------------------------------------------------------------------------

class _Hub:
    """The hub's bookkeeping for one run: which node is which party, who is left out and why, bytes per step."""

    def __init__(self, grid: Grid, timeout_s: float, poll_s: float | None) -> None:
        self.grid, self.timeout_s, self.poll_s = grid, timeout_s, poll_s
        self.name_of: dict[int, str] = {}
        self.excluded: list[Exclusion] = []
        self.bytes: dict[str, int] = {}
        self.step_s: dict[str, float] = {}

    def exclude(self, node: int, step: str, reason: str) -> None:
        party = self.name_of.get(node, f"node {node}")
        log.warning("party %s left out at step %s: %s", party, step, reason)
        self.excluded.append(Exclusion(party, step, reason))

    def call(self, message_type: str, requests: dict[int, RecordDict]) -> dict[int, tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        """Send each node its request; the decoded replies of the nodes that answered in time without error
        (the others are left out, logged with the true reason: no reply in time, the SuperLink reporting the
        node unavailable, or the party's own error)."""
        from pluribus.flower_engines import exchange_messages, reply_problem

        step = STEPS[message_type]
        t0 = time.perf_counter()
        messages = [Message(content, node, message_type, group_id=step) for node, content in requests.items()]
        sent = sum(_record_bytes(m.content) for m in messages)
        replies = exchange_messages(self.grid, messages, self.timeout_s, poll_s=self.poll_s)
        out: dict[int, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {}
        for node, reply in zip(requests, replies.values(), strict=True):
            problem = None if reply is None else reply_problem(reply, node)
            if reply is None:
                self.exclude(node, step, f"no reply within {self.timeout_s:g} s")
            elif problem is not None:
                kind, reason = problem  # "unavailable: node unavailable (SuperLink, ...)", or the party's error
                self.exclude(node, step, f"{kind}: {reason}" if kind == "unavailable" else reason)
            else:
                sent += _record_bytes(reply.content)
                try:
                    out[node] = _read(reply.content)
                except (PluribusError, ValueError, KeyError) as err:
                    self.exclude(node, step, f"unreadable reply: {err}")
        self.bytes[step] = sent
        self.step_s[step] = time.perf_counter() - t0
        return out

    def need_two(self, active: Sequence[int], step: str) -> None:
        if len(active) < 2:
            left = "; ".join(f"{e.party} at {e.step}: {e.reason}" for e in self.excluded) or "none"
            raise PluribusError(f"fusion needs at least 2 parties, {len(active)} left after step {step!r} "
                                f"(left out: {left})")


def run_hub(grid: Grid, config: FusionConfig, *, num_parties: int, out_dir: str | Path | None = None,
            calib: str | Path | None = None, timeout_s: float = 120.0, poll_s: float | None = 0.1,
            allow_non_private: bool = False) -> FlowerFusionResult:
    """The hub's protocol over ``grid`` (module docstring); with ``out_dir`` it writes the fused model, the
    privacy report and ``fusion_flower.json`` (last: its presence means the run finished)."""
    from pluribus.flower_engines import wait_for_nodes

    if not config.private and not allow_non_private:
        raise ConfigError("epsilon = inf would send raw weights to the hub; pass allow_non_private=True")
    hub = _Hub(grid, timeout_s, poll_s)
    try:
        nodes = wait_for_nodes(grid, num_parties, timeout_s)
    except PluribusError as err:  # go on with the parties that did connect, if there are enough
        nodes = list(grid.get_node_ids())
        missing = num_parties - len(nodes)
        hub.excluded.append(Exclusion(f"{missing} of {num_parties} parties", "connect", str(err)))
        log.warning("%d of %d parties left out at step connect: %s", missing, num_parties, err)

    # hello: names, indices and architectures (no tensors); the most common architecture is the agreed one
    hello = hub.call(HELLO, {n: _content() for n in nodes})
    index_of: dict[int, int] = {}
    archs: dict[int, dict[str, Any]] = {}
    for node, (_, meta) in list(hello.items()):
        try:
            name, index, arch = str(meta["party"]), int(meta["index"]), dict(meta["architecture"])
        except (KeyError, TypeError, ValueError) as err:
            hub.exclude(node, "hello", f"malformed hello reply: {err!r}")
            del hello[node]
            continue
        hub.name_of[node], index_of[node], archs[node] = name, index, arch
    names = [hub.name_of[n] for n in hello]
    if len(set(names)) != len(names) or len(set(index_of.values())) != len(index_of):
        raise PluribusError(f"two nodes claim the same party name or partition-id: {sorted(names)}")
    active = sorted(hello, key=lambda n: index_of[n])
    hub.need_two(active, "hello")
    counts = Counter(json.dumps(archs[n], sort_keys=True) for n in active)
    agreed = json.loads(max(counts, key=lambda a: (counts[a], -min(index_of[n] for n in active
                                                                     if json.dumps(archs[n], sort_keys=True) == a))))
    for node in list(active):
        if archs[node] != agreed:
            hub.exclude(node, "hello", f"architecture {describe_architecture(archs[node])} differs from the "
                                       f"agreed {describe_architecture(agreed)}")
            active.remove(node)
    hub.need_two(active, "hello")
    template = build_model(agreed, where="agreed architecture", device="meta")  # shapes only: no weights
    spec = spec_for(template)
    shapes = release_shapes(template, spec, config)

    # 1. releases, checked against the agreed architecture and the mechanisms' public output sets
    got = hub.call(RELEASE, {n: _content(architecture=agreed) for n in active})
    releases: dict[int, PartyRelease] = {}
    ledgers: dict[int, PrivacyLedger] = {}  # every party that released anything: it stays in the report
    for node in list(active):
        if node not in got:
            active.remove(node)
            continue
        arrays, meta = got[node]
        rel = unpack_release(arrays, hub.name_of[node], private=config.private)
        try:
            ledgers[node] = PrivacyLedger.from_dict(meta["ledger"])
        except (PluribusError, KeyError, TypeError) as err:
            ledgers[node] = PrivacyLedger(hub.name_of[node], noise="unknown: the party's ledger was unreadable")
            hub.exclude(node, "release", f"unreadable ledger ({type(err).__name__})")
            active.remove(node)
            continue
        try:
            validate_release(rel, shapes)
        except PluribusError as err:
            hub.exclude(node, "release", str(err))
            active.remove(node)
            continue
        releases[node] = rel
    try:  # from here on, a failed run still reports every party that released
        hub.need_two(active, "release")

        # 2.-3. relay the reference release and each party's own; each party aligns its own to the reference
        ref_node = active[0]
        reference = releases[ref_node]
        requests = {n: _content({**pack_release(reference, "reference:"), **pack_release(releases[n], "own:")},
                                reference=reference.party, index=index_of[n], is_reference=n == ref_node)
                    for n in active}
        got = hub.call(ALIGN, requests)
        aligned: dict[int, dict[str, torch.Tensor]] = {}
        for node in list(active):
            if node not in got:
                active.remove(node)
                continue
            params = {k[7:]: v for k, v in got[node][0].items() if k.startswith("params/")}
            try:
                check_aligned(hub.name_of[node], releases[node].params, params, solver=config.solver)
            except PluribusError as err:
                hub.exclude(node, "align", str(err))
                active.remove(node)
                continue
            aligned[node] = params
        hub.need_two(active, "align")

        # 4. relay every aligned release; each party averages locally and answers with its digest
        order = [hub.name_of[n] for n in active]
        relay = {k: v for n in active for k, v in pack_aligned(hub.name_of[n], aligned[n]).items()}
        fused = average_relayed(relay, order)
        digest = fused_digest(fused)
        got = hub.call(AVERAGE, {n: _content(relay, parties=order) for n in active})
        holders = []
        for node in active:
            if node in got and got[node][1].get("digest") != digest:
                hub.exclude(node, "average", "its fused tensors differ from the hub's (digest mismatch)")
            elif node in got:
                holders.append(hub.name_of[node])
        result = FlowerFusionResult(fused, None, _reported_ledgers(hub, ledgers, active), order, hub.excluded, digest,
                                    None if out_dir is None else str(out_dir))
        result.result = {
            "parties": order, "reference": reference.party, "holders": holders, "digest": digest,
            "excluded": [vars(e) for e in hub.excluded], "architecture": agreed,
            "bytes": hub.bytes, "step_s": hub.step_s, "config": json.loads(config_to_json(config)),
        }
        result.model = _fused_model(agreed, fused, calib)
        if out_dir is not None:
            _write_outputs(Path(out_dir), result)
    except PluribusError:
        if out_dir is not None:
            _write_privacy(Path(out_dir), _reported_ledgers(hub, ledgers, []), hub.excluded)
        raise
    return result


def _reported_ledgers(hub: _Hub, ledgers: Mapping[int, PrivacyLedger], fused_nodes: Sequence[int]) -> list[PrivacyLedger]:
    """The privacy report's parties: every party that released (fused, or excluded after its release, with
    the step and reason) and every party that refused to release (its code), in partition order."""
    out = []
    for node, ledger in ledgers.items():
        name = hub.name_of[node]
        if node in fused_nodes and not any(e.party == name for e in hub.excluded):
            ledger.status = "fused"
        else:
            why = next((e for e in hub.excluded if e.party == name), None)
            ledger.status = ("excluded after release" if why is None
                             else f"excluded after release at {why.step}: {why.reason}")
        out.append(ledger)
    for e in hub.excluded:
        code = next((c for c in REFUSED if e.step == "release" and e.reason.endswith(refusal_reason(e.step, c))), None)
        if code is not None:
            out.append(PrivacyLedger(e.party, noise="none: nothing released", status=f"refused: {code}"))
    return out


def _fused_model(arch: Mapping[str, Any], fused: dict[str, torch.Tensor], calib: str | Path | None) -> torch.nn.Module | None:
    """The fused model built from released tensors; None if it has BatchNorm and no calibration file is given."""
    from pluribus.fusion.core.fuse import load_fused

    template = build_model(arch, where="agreed architecture")  # fresh init: a container, nobody's weights
    needs_bn = any(isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d) for m in template.modules())
    if needs_bn and calib is None:
        return None
    calib_x = load_party_data(calib, model=template)[0] if calib is not None else None
    return load_fused(template, fused, calib_x=calib_x)


PARTY_OUTPUTS_NOTE = (
    "\nWhat the hub holds: the parties' released (noised) tensors and ledgers, the aligned releases, and the fused "
    "model built from them (BatchNorm statistics, if any, re-estimated on the public calibration file). A party "
    "that saves its own fused model (`fused-out`) keeps it in its own folder: its BatchNorm statistics come from "
    "that party's private rows without noise, so it never leaves the party. A party's error replies carry a "
    "fixed code and the step only; the details stay in that party's log.\n")


def _write_outputs(out: Path, result: FlowerFusionResult) -> None:
    from pluribus.io import save_tensors, write_json

    out.mkdir(parents=True, exist_ok=True)
    if result.model is not None:
        save_party_model(out / FUSED_FILE, result.model, party="fused")
        result.result["fused_model"] = str(out / FUSED_FILE)
    else:  # a BatchNorm model without a calibration file: the tensors, without running statistics
        save_tensors(out / FUSED_TENSORS_FILE, result.fused)
        result.result["fused_model"] = None
        result.result["fused_tensors"] = str(out / FUSED_TENSORS_FILE)
    _write_privacy(out, result.ledgers, result.excluded)
    write_json(out / RESULT_FILE, result.result)


def _write_privacy(out: Path, ledgers: list[PrivacyLedger], excluded: Sequence[Exclusion]) -> None:
    """privacy.json and privacy.md: every party that released or refused, with its status and totals."""
    from pluribus.fusion.privacy.accounting import privacy_report, privacy_report_markdown
    from pluribus.io import write_json, write_text

    out.mkdir(parents=True, exist_ok=True)
    report = privacy_report(ledgers)
    report["excluded"] = [vars(e) for e in excluded]
    write_json(out / PRIVACY_FILE, report)
    write_text(out / PRIVACY_REPORT_FILE, privacy_report_markdown(ledgers) + PARTY_OUTPUTS_NOTE)


def make_hub_app(config: FusionConfig | None = None, *, num_parties: int | None = None,
                 out_dir: str | Path | None = None, calib: str | Path | None = None, timeout_s: float | None = None,
                 poll_s: float | None = None, on_result: Callable[[FlowerFusionResult], None] | None = None) -> ServerApp:
    """The hub's ServerApp; arguments left None are read from the run_config ('fusion-json', 'num-parties',
    'out-dir', 'calib-file', 'timeout-s', 'poll-s').

    Args:
        config: the fusion settings.
        num_parties: how many parties to wait for.
        out_dir: where the hub writes its outputs.
        calib: the hub's calibration data file.
        timeout_s: how long each step waits for replies.
        poll_s: how often the hub polls for replies.
        on_result: called with the result when the run ends.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        rc = context.run_config
        cfg = config if config is not None else config_from_json(str(rc["fusion-json"]))
        folder = out_dir if out_dir is not None else (str(rc.get("out-dir", "")) or None)
        calib_file = calib if calib is not None else (str(rc.get("calib-file", "")) or None)
        poll = poll_s if poll_s is not None else float(rc.get("poll-s", 0.1))
        result = run_hub(grid, cfg, num_parties=num_parties or int(rc["num-parties"]), out_dir=folder,
                         calib=None if calib_file is None else str(calib_file),
                         timeout_s=timeout_s if timeout_s is not None else float(rc.get("timeout-s", 120.0)),
                         poll_s=poll if poll > 0 else None)
        if on_result is not None:
            on_result(result)

    return app


hub_app = make_hub_app()
party_app = make_party_app()


# ---- engines -----------------------------------------------------------------------------------------------

def run_fusion_inprocess(parties: Sequence[PartyFiles], config: FusionConfig, *, out_dir: str | Path | None = None,
                         calib: str | Path | None = None, timeout_s: float = 120.0,
                         drop: Callable[[int, str], bool] | None = None,
                         unavailable: Callable[[Message], bool] | None = None,
                         grid: Grid | None = None) -> FlowerFusionResult:
    """The hub's ServerApp and every party's ClientApp over an ``InProcessGrid`` in this process
    (``drop(node, type)``: that node does not answer; ``unavailable(message)``: the SuperLink answers that the
    node is gone; nodes are ``in_process_node_id(k)`` for party k; ``grid``: a grid of your own, e.g. one that
    records what the hub receives).

    Args:
        parties: each party's files.
        config: the fusion settings.
        out_dir: where the hub writes its outputs, or None.
        calib: the hub's calibration data file, or None.
        timeout_s: how long each step waits for replies.
        drop: see above.
        unavailable: see above.
        grid: see above.

    Raises:
        ConfigError: fewer than two parties or repeated names.
        DataError: a party's file is missing.
    """
    from pluribus.flower_engines import InProcessGrid, run_server_app_inprocess

    check_parties(parties)
    if grid is None:
        grid = InProcessGrid(make_party_app(config), len(parties), drop=drop, unavailable=unavailable,
                             node_configs=[p.node_config(k) for k, p in enumerate(parties)])
    results: list[FlowerFusionResult] = []
    hub = make_hub_app(config, num_parties=len(parties), out_dir=out_dir, calib=calib, timeout_s=timeout_s,
                       poll_s=0, on_result=results.append)
    run_server_app_inprocess(hub, grid)
    return results[0]


def check_parties(parties: Sequence[PartyFiles]) -> None:
    """ConfigError/DataError unless there are >= 2 uniquely named parties whose model and data files exist."""
    from pluribus.errors import DataError

    if len(parties) < 2:
        raise ConfigError(f"fusion needs at least 2 parties, got {len(parties)}")
    names = [p.name for p in parties]
    if len(set(names)) != len(names):
        raise ConfigError(f"party names must be unique, got {names}")
    for p in parties:
        for what, path in (("model", p.model), ("data", p.data)):
            if not Path(path).is_file():
                raise DataError(f"party {p.name!r}: {what} file not found", path=path)


def run_fusion_flower(parties: Sequence[PartyFiles], config: FusionConfig, *, engine: Engine = "inprocess",
                      out_dir: str | Path, calib: str | Path | None = None, timeout_s: float = 600.0,
                      step_timeout_s: float = 120.0, num_cpus: int | None = None,
                      poll_s: float = 0.1) -> FlowerFusionResult:
    """Fuse the parties' models through the hub and party apps on ``engine``; the hub's outputs go to
    ``out_dir`` (fused model, privacy report, ``fusion_flower.json``). ``timeout_s`` bounds a whole
    simulation or deployment run (every process is stopped after it), ``step_timeout_s`` one protocol step.

    Args:
        parties: each party's files.
        config: the fusion settings (private: ``epsilon`` finite).
        engine: ``inprocess``, ``simulation`` or ``deployment``.
        out_dir: where the hub writes its outputs.
        calib: the hub's calibration data file, or None.
        timeout_s: see above.
        step_timeout_s: see above.
        num_cpus: CPUs for Ray (simulation), or None.
        poll_s: how often the hub polls for replies.

    Raises:
        ConfigError: an unknown engine, ``epsilon = inf``, non-positive timeouts, fewer than two parties or
            repeated names.
        DataError: a party's file is missing.
        PluribusError: the run ended without its result.
    """
    from pluribus.io import write_json

    if engine not in ENGINES:
        raise ConfigError(f"engine: unknown {engine!r}; known: {list(ENGINES)}")
    if not config.private:
        raise ConfigError("epsilon = inf would send raw weights to the hub; the Flower path runs with DP only")
    if timeout_s <= 0 or step_timeout_s <= 0:
        raise ConfigError(f"timeout_s and step_timeout_s must be > 0, got {timeout_s}, {step_timeout_s}")
    check_parties(parties)
    out = Path(out_dir).resolve()
    calib_path = None if calib is None else str(Path(calib).resolve())
    if engine == "inprocess":
        return run_fusion_inprocess(parties, config, out_dir=out, calib=calib_path, timeout_s=step_timeout_s)
    from pluribus.flower_engines import run_child, run_deployment, tail

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fusion-flower-") as tmp_name:
        tmp = Path(tmp_name)
        if engine == "simulation":
            job = {"config": config_to_json(config), "out_dir": str(out), "calib": calib_path,
                   "timeout_s": step_timeout_s, "num_cpus": num_cpus,
                   "parties": [_party_json(p) for p in parties]}
            write_json(tmp / "job.json", job)
            import sys

            run_child([sys.executable, "-m", "pluribus.fusion.flower.apps", str(tmp / "job.json")],
                      tmp / "simulation.log", out / RESULT_FILE, timeout_s, what="the Flower simulation engine")
        else:
            app_dir = write_fusion_app(tmp / "app", config, num_parties=len(parties), out_dir=out, calib=calib_path,
                                       step_timeout_s=step_timeout_s, poll_s=poll_s)
            node_configs = [" ".join(f"{k}={json.dumps(v)}" for k, v in p.node_config(i).items())
                            for i, p in enumerate(parties)]
            run_deployment(app_dir, tmp, node_configs, out / RESULT_FILE, timeout_s, poll_s=poll_s)
        if not (out / RESULT_FILE).exists():
            raise PluribusError(f"the Flower run ended without {RESULT_FILE} in {out}; log tail:\n"
                                f"{tail(tmp / 'flwr_run.log')}")
    return read_hub_outputs(out)


def write_fusion_app(folder: str | Path, config: FusionConfig, *, num_parties: int, out_dir: str | Path,
                     calib: str | Path | None = None, step_timeout_s: float = 120.0, poll_s: float = 0.1) -> Path:
    """Write the PrivFusion Flower App folder (hub ServerApp, party ClientApp) whose run_config carries the
    fusion config, the number of parties, the hub's output folder and (optional) public calibration file: the
    parties' own files are named by each SuperNode's node config, never here."""
    from pluribus.flower_engines import write_app_pyproject

    if num_parties < 2:
        raise ConfigError(f"--parties: fusion needs at least 2 parties, got {num_parties}")
    run_config = {"fusion-json": config_to_json(config), "num-parties": int(num_parties),
                  "out-dir": str(Path(out_dir).resolve()), "calib-file": "" if calib is None else str(Path(calib).resolve()),
                  "timeout-s": float(step_timeout_s), "poll-s": float(poll_s)}
    Path(folder).mkdir(parents=True, exist_ok=True)
    return write_app_pyproject(folder, name="pluribus-privfusion", description="PrivFusion on Flower",
                               serverapp="pluribus.fusion.flower.apps:hub_app",
                               clientapp="pluribus.fusion.flower.apps:party_app", run_config=run_config)


def read_hub_outputs(out: str | Path) -> FlowerFusionResult:
    """The hub's outputs in ``out`` (``fusion_flower.json``, the fused model or tensors, ``privacy.json``)."""
    from pluribus.io import load_tensors, read_json

    out = Path(out)
    res = dict(read_json(out / RESULT_FILE))
    fused = load_tensors(out / FUSED_FILE) if res.get("fused_model") else load_tensors(out / FUSED_TENSORS_FILE)
    model = load_party_model(out / FUSED_FILE) if res.get("fused_model") else None
    ledgers = [PrivacyLedger.from_dict(p) for p in read_json(out / PRIVACY_FILE)["parties"]]
    excluded = [Exclusion(**e) for e in res["excluded"]]
    return FlowerFusionResult(fused, model, ledgers, list(res["parties"]), excluded, str(res["digest"]), str(out), res)


def _party_json(p: PartyFiles) -> dict[str, Any]:
    return {"name": p.name, "model": str(Path(p.model).resolve()), "data": str(Path(p.data).resolve()),
            "fused_out": None if p.fused_out is None else str(Path(p.fused_out).resolve()),
            "state_dir": str(p.state.resolve()), "budget": p.budget}


def _party_from_json(p: Mapping[str, Any]) -> PartyFiles:
    return PartyFiles(p["name"], Path(p["model"]), Path(p["data"]), Path(p["fused_out"]) if p.get("fused_out") else None,
                      Path(p["state_dir"]) if p.get("state_dir") else None,
                      None if p.get("budget") is None else float(p["budget"]))


def _simulation_main(job_path: str) -> None:
    """Child-process body of the simulation engine: the hub and the parties on Flower's Ray engine."""
    from pluribus.flower_engines import simulate_apps
    from pluribus.io import read_json

    torch.set_num_threads(1)
    job = read_json(job_path)
    parties = [_party_from_json(p) for p in job["parties"]]
    config = config_from_json(job["config"])
    simulate_apps(make_hub_app(config, num_parties=len(parties), out_dir=job["out_dir"], calib=job["calib"],
                               timeout_s=float(job["timeout_s"]), poll_s=0.1),
                  make_party_app(config, parties=parties), len(parties), num_cpus=job.get("num_cpus"))


if __name__ == "__main__":
    import sys

    _simulation_main(sys.argv[1])

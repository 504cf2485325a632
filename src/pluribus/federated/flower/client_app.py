"""FedBone's Flower ClientApp (Message API): the same ``FedBoneClient`` logic behind Flower message handlers.

Each SuperNode is one client; its index is ``node_config["partition-id"]`` and its task is
``config.tasks[index]``. Its data are its own: for ``suite="features"`` the file of its institution alone, named by
``node_config["data-file"]`` (``flower-supernode --node-config 'partition-id=0 data-file="/data/client-0.safetensors"'``),
else by the factory's ``data_files[index]``, else the folder ``config.features_path`` (its own
``client-<K>.safetensors`` there); a file of every institution's users is refused. The built-in suites build
only this client's share. Its first reply (``query.hello``) tells the server what it learns of the client: task,
kind, input kind, output size, train and test counts, primary metric. The client's modules and optimizer state live in ``Context.state`` (an ArrayRecord),
so the app holds no state between messages and works under every Flower runtime (in-process, simulation,
deployment). The config comes from the factory argument, or else from the flattened ``run_config``.

Run it with ``pluribus.federated.flower.client_app:app`` (config from ``run_config``) or build one with
``make_client_app(config)``.

Checkpoints are the client's own business: at the server's checkpoint steps the ServerApp sends
``query.checkpoint_save`` (step, run token) and the client writes its ``Context.state`` (modules, optimizer
state, last batch indices) atomically to its *state directory*, a folder on the client's machine that the
server never reads: ``node_config["state-dir"]`` (``flower-supernode --node-config 'partition-id=0
state-dir="/var/lib/fedbone"'``), else ``<root>/partition-<K>`` for the factory's ``state_root`` or the
``client-state-root`` run_config key. On resume the ServerApp sends ``query.checkpoint_restore`` with the step it
resumes from; the client keeps its ``Context.state`` if that is exactly the state it saved for that step, else
loads its checkpoint file, and fails with a clear error (an error reply; the server then stops) if it has none.

Worker mode (node_config ``worker=true`` or ``worker="auto"``): Flower starts a fresh ``flwr-clientapp``
process per message, so the in-process path pays the torch import, task loading and client construction every
time. With ``worker`` set, this module's handlers only forward each message over a Unix socket in the client's
state directory to a long-lived worker on the same host (:mod:`pluribus.federated.flower.worker`), which runs these
same handlers with the client kept in memory; importing this module loads neither torch nor the model code.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from logging import WARNING
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from pluribus.errors import ConfigError, DataError, PluribusError
from pluribus.federated.flower.node import client_data_file, client_index, client_state_dir

if TYPE_CHECKING:  # the thin worker path imports neither torch nor the model code: they load where used
    import torch

    from pluribus.federated.core.config import FedBoneConfig
    from pluribus.federated.core.runtime import FedBoneClient
    from pluribus.federated.core.task import ClientTask

STATE_KEY = "fedbone_client"
SYNC_KEY = "fedbone_sync"  # ConfigRecord: the checkpoint step Context.state equals exactly (-1: changed since)
RUN_KEY = "fedbone_run"  # ConfigRecord: the server run token this client serves (its first tagged request, a restore)
HELLO = "query.hello"
CKPT_SAVE = "query.checkpoint_save"
CKPT_RESTORE = "query.checkpoint_restore"
CKPT_FORMAT = "pluribus.fedbone.client-checkpoint/1"
RUN_CONFIG_EXTRAS = ("run-dir", "run_dir", "client-state-root", "poll-s", "resume", "worker")
# = protocol.MESSAGE_TYPES, spelled here because protocol imports torch (tests/federated/test_worker.py checks)
MESSAGE_TYPES = ("train.embed", "train.head", "evaluate.embed", "evaluate.head")


TASK_CACHE_FORMAT = "pluribus.fedbone.client-task/1"  # bump when a suite builder's output changes
_TASKS: dict[str, ClientTask] = {}  # this process's built tasks, by task fingerprint
_TASK_FIELDS = ("x_train", "y_train", "x_test", "y_test")


def task_fingerprint(config: FedBoneConfig, index: int, data_file: str | Path | None = None) -> str:
    """What client ``index``'s task data depend on (suite, all task names, seed, split, cap, the data file it reads
    with its size and mtime), hashed: a cached task is reused only under an equal fingerprint."""
    import hashlib

    from pluribus.io import json_text

    source = _data_source(config, index, data_file)
    feature_file: list[int] = []
    if source is not None and source.is_file():
        stat = source.stat()
        feature_file = [stat.st_size, stat.st_mtime_ns]
    key = {"format": TASK_CACHE_FORMAT, "suite": config.suite, "tasks": list(config.tasks), "index": index,
           "seed": config.seed, "test_fraction": config.test_fraction, "cap": config.max_train_per_client,
           "features_path": None if source is None else str(source), "features_file": feature_file}
    return hashlib.sha256(json_text(key).encode()).hexdigest()[:20]


def _data_source(config: FedBoneConfig, index: int, data_file: str | Path | None) -> Path | None:
    """The one file client ``index`` reads its data from (suite 'features'; None: a built-in suite): its node's
    ``data_file``, else its own file in the folder ``features_path``, else ``features_path`` itself (which
    ``institution_task`` accepts only if it is this client's own file); ConfigError when it has none."""
    if config.suite != "features":
        return None
    if data_file is not None and str(data_file):
        return Path(str(data_file))
    if not config.features_path:
        raise ConfigError(f"client {index}: node_config lacks 'data-file', the file of this institution's own users "
                          f"(start its SuperNode with --node-config 'partition-id={index} data-file=\"FILE\"'; "
                          "pluribus fed prepare writes one file per institution)")
    from pluribus.federated.studies.tasks import institution_file

    path = Path(config.features_path)
    return institution_file(path, index) if path.is_dir() else path


def task_cache_path(state_dir: Path, index: int) -> Path:
    """Where client ``index`` caches its own task data inside its state directory."""
    return state_dir / f"fedbone-task-client{index}.safetensors"


def build_config_client_task(config: FedBoneConfig, index: int) -> ClientTask:
    """Build client ``index``'s task of a built-in suite from the config (``tasks.build_config_client_task``,
    imported on use)."""
    from pluribus.federated.studies.tasks import build_config_client_task as build

    return build(config, index)


def build_own_task(config: FedBoneConfig, index: int, data_file: str | Path | None = None) -> ClientTask:
    """Client ``index``'s task from its own data only: for suite 'features' its institution's file
    (``tasks.institution_task``, which refuses another institution's file, a file of every institution and a task
    the config does not give this client), else its share of the built-in suite."""
    source = _data_source(config, index, data_file)
    if source is None:
        return build_config_client_task(config, index)
    from pluribus.federated.studies.tasks import institution_task

    return institution_task(source, config.tasks, index, seed=config.seed, test_fraction=config.test_fraction,
                            max_train_per_client=config.max_train_per_client)


def client_task(config: FedBoneConfig, index: int, state_dir: Path | None = None,
                data_file: str | Path | None = None) -> ClientTask:
    """Client ``index``'s own task, and only it: from this process's memory, else from the cache file in its
    ``state_dir`` when the file's fingerprint matches the config and data file (any data-relevant change rebuilds
    it), else built (``build_own_task``) and cached there atomically."""
    fingerprint = task_fingerprint(config, index, data_file)
    if fingerprint in _TASKS:
        return _TASKS[fingerprint]
    task = _read_task_cache(task_cache_path(state_dir, index), fingerprint) if state_dir is not None else None
    if task is None:
        task = build_own_task(config, index, data_file)
        if state_dir is not None:
            _write_task_cache(task_cache_path(state_dir, index), fingerprint, task)
    if len(_TASKS) >= 8:  # a process serves one client; several only in-process: keep memory bounded
        _TASKS.pop(next(iter(_TASKS)))
    _TASKS[fingerprint] = task
    return task


def _write_task_cache(path: Path, fingerprint: str, task: ClientTask) -> None:
    from pluribus.io import save_tensors

    meta = {"format": TASK_CACHE_FORMAT, "fingerprint": fingerprint, "name": task.name, "kind": task.kind,
            "input_kind": task.input_kind, "num_outputs": task.num_outputs, "primary_metric": task.primary_metric,
            "lower_is_better": task.lower_is_better}
    save_tensors(path, {f: getattr(task, f) for f in _TASK_FIELDS}, metadata={"fedbone": json.dumps(meta)})


def _read_task_cache(path: Path, fingerprint: str) -> ClientTask | None:
    """The cached task, or None if there is none, it is unreadable, or it was built for other data."""
    from pluribus.federated.core.task import ClientTask
    from pluribus.io import load_tensor_metadata, load_tensors

    if not path.is_file():
        return None
    try:
        meta = load_tensor_metadata(path, "fedbone")
        if meta.get("format") != TASK_CACHE_FORMAT or meta.get("fingerprint") != fingerprint:
            return None
        tensors = load_tensors(path)
        return ClientTask(name=str(meta["name"]), kind=str(meta["kind"]), input_kind=str(meta["input_kind"]),
                          x_train=tensors["x_train"], y_train=tensors["y_train"], x_test=tensors["x_test"],
                          y_test=tensors["y_test"], num_outputs=int(meta["num_outputs"]),
                          primary_metric=str(meta["primary_metric"]), lower_is_better=bool(meta["lower_is_better"]))
    except (PluribusError, KeyError, TypeError, ValueError):
        return None  # a damaged cache is rebuilt, never trusted


HELLO_FIELDS = ("index", "task", "kind", "input_kind", "num_outputs", "num_train", "num_test", "primary_metric",
                "lower_is_better")


def hello_info(index: int, task: ClientTask) -> dict[str, Any]:
    """What a client's hello tells the server (``HELLO_FIELDS``): its index, its task's name, kind, input kind,
    output size, train and test counts, primary metric and its direction; never an example or a label."""
    return {"index": index, "task": task.name, "kind": task.kind, "input_kind": task.input_kind,
            "num_outputs": int(task.num_outputs), "num_train": int(task.num_train), "num_test": len(task.y_test),
            "primary_metric": task.primary_metric, "lower_is_better": bool(task.lower_is_better)}


def config_from_context(context: Context) -> FedBoneConfig:
    """The FedBone config from a Flower run_config (flattened dotted keys; unknown keys rejected)."""
    from pluribus.config import unflatten_config
    from pluribus.federated.core.config import FedBoneConfig

    flat = {k: v for k, v in context.run_config.items() if k not in RUN_CONFIG_EXTRAS}
    return unflatten_config(FedBoneConfig, flat)


def _own_task(config: FedBoneConfig, context: Context, index: int, state_root: str | Path | None = None,
              data_files: Sequence[str | Path] | None = None) -> ClientTask:
    return client_task(config, index, client_state_dir(context, index, state_root),
                       client_data_file(context, index, data_files))


def _load_client(config: FedBoneConfig, context: Context, state_root: str | Path | None = None,
                 live: dict[str, Any] | None = None,
                 data_files: Sequence[str | Path] | None = None) -> FedBoneClient:
    """This node's client: the live object a worker keeps (``live``), else rebuilt from ``Context.state``."""
    import torch

    from pluribus.federated.core.runtime import FedBoneClient

    if live is not None and "client" in live:
        return live["client"]
    index = client_index(context, config.num_clients)
    client = FedBoneClient(_own_task(config, context, index, state_root, data_files), config, index)
    if STATE_KEY in context.state.array_records:
        record = context.state.array_records[STATE_KEY]
        client.load_state_tensors({k: torch.from_numpy(record[k].numpy().copy()) for k in record})
    return client


def _save_client(client: FedBoneClient, context: Context, live: dict[str, Any] | None = None) -> None:
    if live is not None:  # a worker keeps the object itself (model, optimizer): nothing to copy
        live["client"] = client
        return
    context.state.array_records[STATE_KEY] = ArrayRecord(
        {k: v.detach().contiguous() for k, v in client.state_tensors().items()})


def _mark_synced(context: Context, step: int, token: str = "") -> None:
    context.state.config_records[SYNC_KEY] = ConfigRecord({"step": step, "token": token})


def check_run(context: Context, scalars: dict[str, Any], index: int, message_type: str) -> None:
    """Bind this client to the server run token of its first tagged request; StaleMessage for a request of
    another run (a replay across runs, or a server that restarted without restoring its clients)."""
    from pluribus.federated.core.protocol import RUN_KEY as TAG
    from pluribus.federated.core.protocol import StaleMessage

    run = scalars.get(TAG)
    if run is None:
        return
    bound = context.state.config_records.get(RUN_KEY)
    if bound is None:
        context.state.config_records[RUN_KEY] = ConfigRecord({"run": str(run)})
    elif str(bound["run"]) != str(run):
        raise StaleMessage(f"client {index}: {message_type} request of run {run} refused: this client serves "
                           f"run {str(bound['run'])} (resume a run through query.checkpoint_restore)")


def _refused(err: PluribusError, message: Message, context: Context) -> None:
    """Log a refused request on the client's side too: its error reply may reach no one (a late duplicate)."""
    from flwr.common.logger import log as log_flower

    from pluribus.federated.core.protocol import StaleMessage

    if isinstance(err, StaleMessage):
        log_flower(WARNING, "FedBone client (node %s, run %s): refused %s of group %s: %s", context.node_id,
                   context.run_id, message.metadata.message_type, message.metadata.group_id, err)


def client_checkpoint_path(state_dir: Path, index: int, step: int) -> Path:
    """The file of client ``index``'s checkpoint after ``step`` global steps."""
    return state_dir / f"fedbone-client{index}-step{step:07d}.safetensors"


def _checkpoint_steps(state_dir: Path, index: int) -> dict[int, Path]:
    pattern = re.compile(rf"fedbone-client{index}-step(\d+)\.safetensors$")
    found = {}
    if state_dir.is_dir():
        for p in state_dir.iterdir():
            m = pattern.match(p.name)
            if m:
                found[int(m.group(1))] = p
    return found


def save_client_checkpoint(client: FedBoneClient, state_dir: Path, step: int, *, token: str,
                           keep: tuple[int, ...] = ()) -> Path:
    """Write the client's state after ``step`` steps (atomic safetensors + JSON metadata); delete this client's
    other checkpoints except the steps in ``keep`` (the server's last committed one)."""
    from pluribus.federated.core.runtime import config_fingerprint
    from pluribus.io import save_tensors

    meta = {"format": CKPT_FORMAT, "client": client.index, "task": client.task.name, "step": step,
            "token": token, "config": config_fingerprint(client.config)}
    path = save_tensors(client_checkpoint_path(state_dir, client.index, step), client.state_tensors(),
                        metadata={"fedbone": json.dumps(meta)})
    for old_step, old in _checkpoint_steps(state_dir, client.index).items():
        if old_step != step and old_step not in keep:
            old.unlink(missing_ok=True)
    return path


def load_client_checkpoint(state_dir: Path | None, config: FedBoneConfig, index: int, step: int,
                           token: str) -> dict[str, torch.Tensor]:
    """Client ``index``'s state saved after ``step`` steps of the run ``token``; PluribusError if it has none,
    or if the file belongs to another run or config."""
    from pluribus.federated.core.runtime import config_fingerprint
    from pluribus.io import load_tensor_metadata, load_tensors

    if state_dir is None:
        raise ConfigError(f"client {index}: cannot resume at step {step}: no state directory (set node_config "
                          "'state-dir' or 'client-state-root')")
    path = client_checkpoint_path(state_dir, index, step)
    if not path.exists():
        have = sorted(_checkpoint_steps(state_dir, index))
        raise PluribusError(f"client {index}: no checkpoint for step {step} in {state_dir} (it has steps {have}); "
                            "the server cannot resume from mismatched client state")
    meta = load_tensor_metadata(path, "fedbone")
    expected = {"format": CKPT_FORMAT, "client": index, "step": step, "config": config_fingerprint(config),
                "token": token}
    for key, want in expected.items():
        if meta.get(key) != want:
            raise DataError(f"client checkpoint of another run: {key} is {meta.get(key)!r}, expected {want!r}",
                            path=path, field=key)
    return load_tensors(path)


def make_client_app(config: FedBoneConfig | None = None, *, state_root: str | Path | None = None,
                    live: dict[str, Any] | None = None,
                    data_files: Sequence[str | Path] | None = None) -> ClientApp:
    """A ClientApp answering FedBone's messages; ``config`` None reads it from the run_config; ``state_root``
    is where clients without a node_config 'state-dir' keep their checkpoints (``<root>/partition-<K>``);
    ``data_files[K]`` is client K's own data file where its node_config has no 'data-file' (the in-process and
    simulation engines, whose nodes Flower configures).

    A node_config (or run_config) ``worker`` of true/"auto" makes every handler a thin forwarder to the client's
    long-lived worker (:mod:`pluribus.federated.flower.worker`), which runs these same handlers with ``live`` set: a
    dict where the worker keeps the client object (model, optimizer) between messages instead of
    ``Context.state``.
    """
    app = ClientApp()

    def resolve(context: Context) -> FedBoneConfig:
        return config if config is not None else config_from_context(context)

    def forwarding(handler: Any) -> Any:
        """``handler`` in-process, or (worker mode, outside the worker) forwarded to the client's worker."""
        def call(message: Message, context: Context) -> Message:
            if live is None:
                from pluribus.federated.flower.worker_socket import forward, worker_mode  # stdlib + flwr only

                mode = worker_mode(context)
                if mode is not None:
                    if config is not None:
                        raise ConfigError("node_config 'worker': the worker reads the config from the run_config; "
                                          "use make_client_app() without a config (the Flower App's client)")
                    return forward(message, context, mode, state_root)
            return handler(message, context)
        return call

    def handle(message: Message, context: Context) -> Message:
        from pluribus.federated.core.protocol import decode_payload, encode_payload

        cfg = resolve(context)
        client = _load_client(cfg, context, state_root, live, data_files)
        request = decode_payload(message.content)
        try:
            check_run(context, request.scalars, client.index, message.metadata.message_type)
            reply = client.handle(message.metadata.message_type, request, strict=True)
        except PluribusError as err:
            _refused(err, message, context)
            raise
        _save_client(client, context, live)
        _mark_synced(context, -1)  # the client's state no longer equals any checkpoint
        return Message(encode_payload(reply), reply_to=message)

    def checkpoint_save(message: Message, context: Context) -> Message:
        from pluribus.federated.core.protocol import Payload, decode_payload, encode_payload

        cfg = resolve(context)
        request = decode_payload(message.content).scalars
        step, token = int(request["step"]), str(request["token"])
        client = _load_client(cfg, context, state_root, live, data_files)
        check_run(context, request, client.index, CKPT_SAVE)
        state_dir = client_state_dir(context, client.index, state_root)
        if state_dir is None:
            raise ConfigError(f"client {client.index}: cannot checkpoint: no state directory (set node_config "
                              "'state-dir' or 'client-state-root')")
        keep = (int(request["keep"]),) if int(request.get("keep", -1)) >= 0 else ()
        save_client_checkpoint(client, state_dir, step, token=token, keep=keep)
        _mark_synced(context, step, token)
        return Message(encode_payload(Payload(scalars={"step": step})), reply_to=message)

    def checkpoint_restore(message: Message, context: Context) -> Message:
        from pluribus.federated.core.protocol import Payload, decode_payload, encode_payload
        from pluribus.federated.core.runtime import FedBoneClient

        cfg = resolve(context)
        request = decode_payload(message.content).scalars
        step, token = int(request["step"]), str(request["token"])
        index = client_index(context, cfg.num_clients)
        sync = context.state.config_records.get(SYNC_KEY)
        has_state = (live is not None and "client" in live) or STATE_KEY in context.state.array_records
        in_memory = (sync is not None and int(sync["step"]) == step and str(sync["token"]) == token  # type: ignore[arg-type]
                     and has_state)
        if not in_memory:
            tensors = load_client_checkpoint(client_state_dir(context, index, state_root), cfg, index, step, token)
            client = FedBoneClient(_own_task(cfg, context, index, state_root, data_files), cfg, index)
            client.load_state_tensors(tensors)
            _save_client(client, context, live)
            _mark_synced(context, step, token)
        context.state.config_records[RUN_KEY] = ConfigRecord({"run": token})  # a restore binds the client anew
        return Message(encode_payload(Payload(scalars={"step": step, "source": "memory" if in_memory else "disk"})),
                       reply_to=message)

    def hello(message: Message, context: Context) -> Message:
        cfg = resolve(context)
        index = client_index(context, cfg.num_clients)
        task = _own_task(cfg, context, index, state_root, data_files)
        return Message(RecordDict({"info": ConfigRecord(dict(hello_info(index, task)))}), reply_to=message)

    app.query("checkpoint_save")(forwarding(checkpoint_save))
    app.query("checkpoint_restore")(forwarding(checkpoint_restore))
    app.query("hello")(forwarding(hello))
    for message_type in MESSAGE_TYPES:
        category, action = message_type.split(".")
        getattr(app, category)(action)(forwarding(handle))
    return app


app = make_client_app()

"""FedBone's Flower ClientApp (Message API): the same ``FedBoneClient`` logic behind Flower message handlers.

Each SuperNode is one client; its index is ``node_config["partition-id"]`` and its task is
``config.tasks[index]``. The client's modules and optimizer state live in ``Context.state`` (an ArrayRecord),
so the app holds no state between messages and works under every Flower runtime (in-process, simulation,
deployment). The config comes from the factory argument, or else from the flattened ``run_config``.

Run it with ``pluribus.federated.client_app:app`` (config from ``run_config``) or build one with
``make_client_app(config)``.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from pluribus.config import unflatten_config
from pluribus.errors import ConfigError
from pluribus.federated.config import FedBoneConfig
from pluribus.federated.protocol import (
    MSG_EMBED,
    MSG_EVAL_EMBED,
    MSG_EVAL_HEAD,
    MSG_HEAD,
    decode_payload,
    encode_payload,
)
from pluribus.federated.runtime import FedBoneClient
from pluribus.federated.tasks import ClientTask, build_config_suite

STATE_KEY = "fedbone_client"
HELLO = "query.hello"


@lru_cache(maxsize=4)
def _suite(config: FedBoneConfig) -> tuple[ClientTask, ...]:
    # Data are read-only and deterministic in the config; cache them so a message does not reload the data set.
    return tuple(build_config_suite(config))


def config_from_context(context: Context) -> FedBoneConfig:
    """The FedBone config from a Flower run_config (flattened dotted keys; unknown keys rejected)."""
    flat = {k: v for k, v in context.run_config.items() if k not in ("run-dir", "run_dir")}
    return unflatten_config(FedBoneConfig, flat)


def client_index(context: Context, num_clients: int) -> int:
    """This node's client index from node_config['partition-id']."""
    if "partition-id" not in context.node_config:
        raise ConfigError("node_config lacks 'partition-id' (start the SuperNode with --node-config 'partition-id=K')")
    index = int(context.node_config["partition-id"])
    if not 0 <= index < num_clients:
        raise ConfigError(f"partition-id {index} out of range for {num_clients} clients")
    return index


def _load_client(config: FedBoneConfig, context: Context) -> FedBoneClient:
    index = client_index(context, config.num_clients)
    client = FedBoneClient(_suite(config)[index], config, index)
    if STATE_KEY in context.state.array_records:
        record = context.state.array_records[STATE_KEY]
        client.load_state_tensors({k: torch.from_numpy(record[k].numpy().copy()) for k in record})
    return client


def _save_client(client: FedBoneClient, context: Context) -> None:
    context.state.array_records[STATE_KEY] = ArrayRecord(
        {k: v.detach().contiguous() for k, v in client.state_tensors().items()})


def make_client_app(config: FedBoneConfig | None = None) -> ClientApp:
    """A ClientApp answering FedBone's messages; ``config`` None reads it from the run_config."""
    app = ClientApp()

    def resolve(context: Context) -> FedBoneConfig:
        return config if config is not None else config_from_context(context)

    def handle(message: Message, context: Context) -> Message:
        cfg = resolve(context)
        client = _load_client(cfg, context)
        reply = client.handle(message.metadata.message_type, decode_payload(message.content))
        _save_client(client, context)
        return Message(encode_payload(reply), reply_to=message)

    @app.query("hello")
    def hello(message: Message, context: Context) -> Message:
        cfg = resolve(context)
        index = client_index(context, cfg.num_clients)
        from flwr.app import ConfigRecord

        info = ConfigRecord({"index": index, "task": cfg.tasks[index], "num_train": _suite(cfg)[index].num_train})
        return Message(RecordDict({"info": info}), reply_to=message)

    for message_type in (MSG_EMBED, MSG_HEAD, MSG_EVAL_EMBED, MSG_EVAL_HEAD):
        category, action = message_type.split(".")
        getattr(app, category)(action)(handle)
    return app


app = make_client_app()

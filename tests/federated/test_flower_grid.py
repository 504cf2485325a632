"""The shared Grid plumbing (pluribus.flower_engines): node ids clear of the SuperLink's, replies matched to the
requests they answer (so the SuperLink's own replies are kept), missing replies reported as None."""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID

from pluribus.flower_engines import InProcessGrid, exchange_messages, in_process_node_id, reply_problem


def echo_app() -> ClientApp:
    app = ClientApp()

    @app.query("echo")
    def echo(message: Message, context) -> Message:  # noqa: ANN001
        return Message(RecordDict({"c": ConfigRecord({"node": context.node_id})}), reply_to=message)

    return app


class LateGrid(InProcessGrid):
    synchronous = False  # replies come on later pulls, in reverse order, as over a SuperLink

    def pull_messages(self, message_ids):  # noqa: ANN001, ANN201
        self.pulls = getattr(self, "pulls", 0) + 1
        return [] if self.pulls == 1 else list(reversed(list(super().pull_messages(message_ids))))


def test_exchange_keys_replies_by_request_and_keeps_superlink_replies() -> None:
    nodes = [in_process_node_id(k) for k in range(3)]
    assert SUPERLINK_NODE_ID not in nodes
    grid = LateGrid(echo_app(), 3, drop=lambda node, _: node == nodes[2],
                    unavailable=lambda m: m.metadata.dst_node_id == nodes[1])
    assert sorted(grid.get_node_ids()) == nodes
    messages = [Message(RecordDict(), n, "query.echo") for n in nodes]
    replies = exchange_messages(grid, messages, timeout_s=0.3, poll_s=0.01)
    assert list(replies) == [m.metadata.message_id for m in messages]  # the request order, by pushed id
    first, gone, dropped = replies.values()
    assert first is not None and reply_problem(first, nodes[0]) is None
    assert int(first.content.config_records["c"]["node"]) == nodes[0]  # type: ignore[arg-type]
    assert gone is not None and gone.metadata.src_node_id == SUPERLINK_NODE_ID
    problem = reply_problem(gone, nodes[1])
    assert problem is not None and problem[0] == "unavailable" and problem[1].startswith("node unavailable")
    assert dropped is None and grid.pulls >= 3
    assert exchange_messages(grid, [], timeout_s=1.0) == {}

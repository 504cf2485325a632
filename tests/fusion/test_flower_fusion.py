"""PrivFusion's hub (ServerApp) and parties (ClientApps) over an in-process grid: what crosses, who is left out."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch

from pluribus.errors import ConfigError, PluribusError
from pluribus.flower_engines import InProcessGrid, in_process_node_id
from pluribus.fusion.core.config import FusionConfig
from pluribus.fusion.core.fuse import fuse_releases
from pluribus.fusion.core.models import MLP, SmallCNN, train_model
from pluribus.fusion.core.spec import spec_for
from pluribus.fusion.flower import apps as flower_apps
from pluribus.fusion.flower.apps import PartyFiles, make_party_app, run_fusion_inprocess
from pluribus.fusion.flower.party_files import load_party_model, save_party_data, save_party_model


@pytest.fixture(scope="module")
def digits():
    from pluribus.data.images import load_digits_images

    x, y = load_digits_images()
    return torch.as_tensor(x[:480]).reshape(480, -1).float(), torch.as_tensor(y[:480])


def _write_parties(root: Path, models, xs, ys, *, fused_out: bool = True, budget: float = 1e4) -> list[PartyFiles]:
    """Each model and data file as a party's own; the module's tests release the same models many times, so
    their budget is large (budgets themselves: tests/fusion/test_budget.py)."""
    parties = []
    for k, (m, x, y) in enumerate(zip(models, xs, ys, strict=True)):
        save_party_model(root / f"p{k}.safetensors", m, party=f"p{k}")
        save_party_data(root / f"d{k}.safetensors", x, y)
        parties.append(PartyFiles(f"p{k}", root / f"p{k}.safetensors", root / f"d{k}.safetensors",
                                  root / f"fused{k}.safetensors" if fused_out else None, budget=budget))
    return parties


@pytest.fixture(scope="module")
def mlp_parties(digits, tmp_path_factory):
    x, y = digits
    models, xs, ys = [], [], []
    for k in range(3):
        torch.manual_seed(k)
        idx = torch.arange(k * 160, (k + 1) * 160)
        models.append(train_model(MLP(64, (16, 16), 10), x[idx], y[idx], epochs=4, seed=k))
        xs.append(x[idx])
        ys.append(y[idx])
    return models, _write_parties(tmp_path_factory.mktemp("parties"), models, xs, ys)


class RecordingGrid(InProcessGrid):
    """Records every tensor the hub receives (reply contents), per message type and sending node."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.received: list[tuple[str, int, dict[str, torch.Tensor]]] = []

    def pull_messages(self, message_ids):
        replies = list(super().pull_messages(message_ids))
        for r in replies:
            if not r.has_error():
                arrays = r.content.array_records.get("arrays")
                got = {k: v for k, v in arrays.to_torch_state_dict().items()} if arrays is not None else {}
                self.received.append((r.metadata.message_type, r.metadata.src_node_id, got))
        return replies


def _grid(parties, config, *, cls=InProcessGrid, wrap=None, **kw):
    app = make_party_app(config)
    return cls(wrap(app) if wrap else app, len(parties),
               node_configs=[p.node_config(k) for k, p in enumerate(parties)], **kw)


def test_hub_receives_only_released_tensors_bit_for_bit(mlp_parties, monkeypatch, tmp_path):
    models, parties = mlp_parties
    released = {}
    real = flower_apps.release_party

    def spy(*args, **kwargs):  # what each party released, as the party holds it
        rel = real(*args, **kwargs)
        released[rel.party] = rel
        return rel

    monkeypatch.setattr(flower_apps, "release_party", spy)
    cfg = FusionConfig(epsilon=2.0)
    grid = _grid(parties, cfg, cls=RecordingGrid)
    result = run_fusion_inprocess(parties, cfg, grid=grid, out_dir=tmp_path / "hub")
    assert result.parties == ["p0", "p1", "p2"] and not result.excluded
    raw = {f"p{k}": m.state_dict() for k, m in enumerate(models)}
    by_type: dict[str, int] = {}
    for mtype, node, arrays in grid.received:
        by_type[mtype] = by_type.get(mtype, 0) + len(arrays)
        party = f"p{node - in_process_node_id(0)}"
        rel = released[party]
        for key, value in arrays.items():
            name = key.split("/", 1)[1]
            if mtype == "query.release":
                sent = rel.params[name] if key.startswith("params/") else rel.acts[name]
                assert value.dtype == sent.dtype and torch.equal(value, sent), f"{party} {key} changed in transit"
                if key.startswith("params/"):  # no raw value crosses: not one entry equals the party's raw weight
                    assert int((value == raw[party][name]).sum()) == 0, f"{party} {key} holds raw values"
            else:  # aligned tensors hold exactly the released values, permuted: nothing beyond the release
                assert mtype == "query.align"
                sent = rel.params[name]
                assert torch.equal(value.flatten().sort().values, sent.flatten().sort().values)
                assert not any(torch.equal(value, r) for r in raw[party].values() if r.shape == value.shape)
    # every released tensor crossed; hello and average replies carry no tensors at all
    n = len(released["p0"].params)
    assert by_type == {"query.hello": 0, "query.release": 3 * n, "query.align": 3 * n, "query.average": 0}
    # the hub's fused tensors are the in-process fuser's on the same releases; every party holds the same model
    direct = fuse_releases([released[p] for p in result.parties], spec_for(models[0]), cfg)
    assert all(torch.allclose(direct[k], result.fused[k]) for k in direct)
    for p in parties:
        fused = load_party_model(p.fused_out).state_dict()
        assert all(torch.equal(fused[k], result.fused[k]) for k in result.fused)
    assert result.result["holders"] == ["p0", "p1", "p2"]
    assert (tmp_path / "hub" / "fused.safetensors").exists() and (tmp_path / "hub" / "privacy.md").exists()
    assert [ledger.party for ledger in result.ledgers] == ["p0", "p1", "p2"]


def test_party_that_never_answers_is_left_out_and_logged(mlp_parties, caplog):
    _, parties = mlp_parties
    cfg = FusionConfig(epsilon=2.0)
    with caplog.at_level(logging.WARNING, logger="pluribus.fusion.flower"):
        res = run_fusion_inprocess(parties, cfg, drop=lambda node, mtype: node == in_process_node_id(1) and mtype == "query.align")
    assert res.parties == ["p0", "p2"]
    assert [(e.party, e.step) for e in res.excluded] == [("p1", "align")] and "no reply" in res.excluded[0].reason
    assert "party p1 left out at step align: no reply" in caplog.text
    # the reference party failing is survivable too: the next party becomes the reference
    res = run_fusion_inprocess(parties, cfg, drop=lambda node, mtype: node == in_process_node_id(0) and mtype == "query.release")
    assert res.parties == ["p1", "p2"] and res.result["reference"] == "p1"
    assert res.model is not None


def test_party_whose_supernode_is_gone_is_left_out_as_unavailable(mlp_parties, caplog):
    """The SuperLink's own "node unavailable" reply (sender: the SuperLink, not the party) reaches the hub as
    the true reason, not as a timeout."""
    _, parties = mlp_parties
    gone = in_process_node_id(1)
    with caplog.at_level(logging.WARNING, logger="pluribus.fusion.flower"):
        res = run_fusion_inprocess(parties, FusionConfig(epsilon=2.0), timeout_s=30.0, unavailable=lambda m: (
            m.metadata.dst_node_id == gone and m.metadata.message_type == "query.release"))
    assert res.parties == ["p0", "p2"]
    (exc,) = res.excluded
    assert (exc.party, exc.step) == ("p1", "release")
    assert exc.reason.startswith("unavailable: node unavailable (SuperLink"), exc.reason
    assert "no reply" not in exc.reason
    assert "party p1 left out at step release: unavailable: node unavailable" in caplog.text


def test_fewer_than_two_parties_left_is_a_clear_error(mlp_parties):
    _, parties = mlp_parties
    with pytest.raises(PluribusError, match=r"at least 2 parties, 1 left after step 'release'.*p1 at release"):
        run_fusion_inprocess(parties, FusionConfig(epsilon=2.0), drop=lambda node, mtype: node > in_process_node_id(0)
                             and mtype == "query.release")
    with pytest.raises(ConfigError, match="raw weights"):
        run_fusion_inprocess(parties, FusionConfig(epsilon=math.inf))


def _tamper(change):
    """A ClientApp wrapper that alters the release reply of partition 1 before the hub gets it."""
    from flwr.app import ArrayRecord

    def wrap(app):
        def call(message, context):
            reply = app(message, context)
            if message.metadata.message_type == "query.release" and context.node_id == in_process_node_id(1):
                arrays = reply.content.array_records["arrays"].to_torch_state_dict()
                change(arrays)
                reply.content.array_records["arrays"] = ArrayRecord(torch_state_dict=arrays)
            return reply
        return call
    return wrap


@pytest.mark.parametrize(("change", "reason"), [
    (lambda a: a.__setitem__("params/layers.1.weight", torch.zeros(16, 15)),
     r"party 'p1' tensor 'layers.1.weight' has shape \[16, 15\], expected \[16, 16\]"),
    (lambda a: a["params/layers.2.bias"].__setitem__(0, math.nan), r"party 'p1' tensor 'params/layers.2.bias'|"
                                                                   r"party 'p1' tensor 'layers.2.bias'"),
    (lambda a: a.pop("params/layers.0.bias"), r"party 'p1' released tensors .* lacks \['layers.0.bias'\]"),
], ids=["shape", "nan", "missing"])
def test_tampered_release_is_rejected_naming_party_and_tensor(mlp_parties, change, reason):
    _, parties = mlp_parties
    cfg = FusionConfig(epsilon=2.0)
    res = run_fusion_inprocess(parties, cfg, grid=_grid(parties, cfg, wrap=_tamper(change)))
    assert res.parties == ["p0", "p2"]
    (exc,) = res.excluded
    assert exc.party == "p1" and exc.step == "release"
    assert __import__("re").search(reason, exc.reason), exc.reason


def test_party_of_another_architecture_or_with_broken_files_is_left_out(mlp_parties, tmp_path, digits, caplog):
    _, parties = mlp_parties
    x, y = digits
    odd = save_party_model(tmp_path / "odd.safetensors", MLP(64, (8, 16), 10))
    save_party_data(tmp_path / "odd_data.safetensors", x[:20], y[:20])
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"garbage")
    group = [*parties, PartyFiles("odd", odd, tmp_path / "odd_data.safetensors"),
             PartyFiles("broken", broken, tmp_path / "odd_data.safetensors")]
    res = run_fusion_inprocess(group, FusionConfig(epsilon=2.0))
    assert res.parties == ["p0", "p1", "p2"]
    reasons = {(e.party, e.step): e.reason for e in res.excluded}
    assert "architecture mlp(in_features=64, hidden=[8, 16], num_classes=10) differs" in reasons[("odd", "hello")]
    # the hub learns a fixed code and the step; the party's own log has the details (its file's path)
    assert reasons[(f"node {in_process_node_id(4)}", "hello")].endswith("party refused at step hello: party-error")
    assert "not a readable safetensors file" in caplog.text and "broken.safetensors" in caplog.text
    # the party's data must fit its model: a wrong data file is an error at the release step
    wrong = PartyFiles("wrongdata", parties[0].model, tmp_path / "wrong.safetensors")
    save_party_data(wrong.data, torch.zeros(4, 10))
    caplog.clear()
    res = run_fusion_inprocess([*parties[:2], wrong], FusionConfig(epsilon=2.0))
    assert [(e.party, e.step) for e in res.excluded] == [("wrongdata", "release")]
    assert res.excluded[0].reason.endswith("party refused at step release: party-error")
    assert "wrong.safetensors" not in res.excluded[0].reason and "[4, 10]" not in res.excluded[0].reason
    assert "wrong.safetensors: tensor 'x' has shape [4, 10]" in caplog.text


def test_cnn_parties_fuse_with_batchnorm_from_their_own_data(digits, tmp_path):
    x, y = digits
    models = []
    for k in range(2):
        torch.manual_seed(k)
        models.append(train_model(SmallCNN(1, (4, 8), 8, 10, 8), x[k * 100:(k + 1) * 100], y[k * 100:(k + 1) * 100],
                                  epochs=1, seed=k))
    parties = _write_parties(tmp_path, models, [x[:100], x[100:200]], [y[:100], y[100:200]])
    save_party_data(tmp_path / "calib.safetensors", x[400:])
    cfg = FusionConfig(epsilon=4.0, use_act_stats=True)
    res = run_fusion_inprocess(parties, cfg, out_dir=tmp_path / "hub", calib=tmp_path / "calib.safetensors")
    assert not res.excluded and res.model is not None
    assert not any(k.endswith("running_mean") for k in res.fused)  # never released under DP
    assert (tmp_path / "hub" / "fused.safetensors").exists()
    party0 = load_party_model(parties[0].fused_out)  # BatchNorm re-estimated on the party's own data
    assert not torch.equal(party0.stem_bn.running_mean, load_party_model(tmp_path / "hub" / "fused.safetensors")
                           .stem_bn.running_mean)
    res = run_fusion_inprocess(parties, cfg, out_dir=tmp_path / "hub2")  # no calibration file at the hub
    assert res.model is None and (tmp_path / "hub2" / "fused_tensors.safetensors").exists()


def test_parties_that_never_connect_are_left_out(mlp_parties):
    from pluribus.fusion.flower.apps import run_hub

    _, parties = mlp_parties
    cfg = FusionConfig(epsilon=2.0)
    res = run_hub(_grid(parties, cfg), cfg, num_parties=5, timeout_s=0.3, poll_s=None)
    assert res.parties == ["p0", "p1", "p2"]
    assert [(e.party, e.step) for e in res.excluded] == [("2 of 5 parties", "connect")]
    assert "only 3 of 5 nodes connected within 0.3 s" in res.excluded[0].reason

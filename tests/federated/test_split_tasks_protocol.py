"""Split model shapes, task suites, protocol encoding and byte counts, client state round trip."""

from __future__ import annotations

import pytest
import torch

from pluribus.errors import ConfigError, DataError, ShapeError
from pluribus.federated import (
    FedBoneConfig,
    GeneralModel,
    ModelConfig,
    PatchEmbedding,
    TokenEmbedding,
    build_suite,
)
from pluribus.federated.core.protocol import ByteMeter, Payload, decode_payload, encode_payload, payload_bytes
from pluribus.federated.core.runtime import FedBoneClient
from pluribus.federated.core.split import ClientModel, task_loss, task_metrics

TINY = ModelConfig(dim=16, depth=1, heads=2, patch=2, adapter_hidden=16)


@pytest.fixture(scope="module")
def digits():
    return build_suite("digits", ("digit", "parity", "segmentation", "reconstruction"), seed=0,
                       max_train_per_client=40)


def test_digits_suite_is_disjoint_and_typed(digits) -> None:
    kinds = {t.name: t.kind for t in digits}
    assert kinds == {"digit": "multiclass", "parity": "multiclass", "segmentation": "segmentation",
                     "reconstruction": "reconstruction"}
    assert all(t.num_train == 40 and t.input_shape == (1, 8, 8) for t in digits)
    # one part of the data per client: the test sets of two clients share no image
    a, b = digits[0].x_test.flatten(1), digits[1].x_test.flatten(1)
    assert not any(bool((a == row).all(1).any()) for row in b)
    recon = digits[3]
    assert not torch.equal(recon.x_train, recon.y_train)  # noisy input, clean target
    assert recon.lower_is_better and not digits[0].lower_is_better


def test_yeast_suite_groups() -> None:
    suite = build_suite("yeast", ("group0", "group3"), seed=1)
    assert suite[0].y_train.shape[1] == 4 and suite[1].y_train.shape[1] == 3
    assert suite[0].input_shape == (13, 8) and suite[0].kind == "multilabel"
    with pytest.raises(ConfigError, match="unknown task"):
        build_suite("yeast", ("digit",))


@pytest.mark.parametrize("index", [0, 2, 3])
def test_client_model_shapes(digits, index: int) -> None:
    task = digits[index]
    model = ClientModel(task, TINY)
    general = GeneralModel(TINY)
    z = model.embed(task.x_train[:5])
    assert z.shape == (5, 16, 16)
    out = model.output(general(z))
    expected = (5, 10) if index == 0 else (5, 1, 8, 8)
    assert out.shape == expected
    loss = task_loss(task.kind, out, task.y_train[:5])
    assert loss.ndim == 0 and torch.isfinite(loss)
    metrics = task_metrics(task.kind, out, task.y_train[:5])
    assert task.primary_metric in metrics


def test_embeddings_reject_wrong_shapes() -> None:
    with pytest.raises(ShapeError, match=r"client images has shape \[2, 1, 7, 7\]"):
        PatchEmbedding(8, 2, 1, 16)(torch.zeros(2, 1, 7, 7))
    with pytest.raises(ShapeError, match="client tokens"):
        TokenEmbedding(13, 8, 16)(torch.zeros(2, 13, 9))
    with pytest.raises(ConfigError, match="divide"):
        PatchEmbedding(8, 3, 1, 16)


def test_general_model_segments() -> None:
    g = GeneralModel(TINY)
    assert sum(g.segments()) == g.num_parameters() > 0


def test_payload_roundtrip_and_bytes() -> None:
    payload = Payload({"z": torch.randn(1, 4, 16, 16), "dz": torch.randn(3)}, {"step": 3, "loss": 0.5})
    back = decode_payload(encode_payload(payload))
    assert torch.equal(back.tensors["z"], payload.tensors["z"]) and back.scalars == payload.scalars
    assert payload.nbytes() == payload_bytes(payload.tensors) == (4 * 16 * 16 + 3) * 4
    meter = ByteMeter()
    meter.add("train", 0, payload)
    assert meter.by_category["train.embeddings"] == 4 * 16 * 16 * 4
    assert meter.total("train") == payload.nbytes() and meter.total("eval") == 0
    restored = ByteMeter()
    restored.load_dict(meter.as_dict())
    assert restored.as_dict() == meter.as_dict()
    from flwr.app import RecordDict

    with pytest.raises(DataError, match="tensors"):
        decode_payload(RecordDict())


def test_client_state_roundtrip(digits) -> None:
    cfg = FedBoneConfig(suite="digits", batch_size=8, model=TINY)
    a = FedBoneClient(digits[0], cfg, 0)
    from pluribus.federated.core.protocol import MSG_EMBED, MSG_HEAD

    z = a.handle(MSG_EMBED, Payload(scalars={"step": 0})).tensors["z"]
    a.handle(MSG_HEAD, Payload({"f": torch.randn_like(z)}))
    b = FedBoneClient(digits[0], cfg, 0)
    b.load_state_tensors(a.state_tensors())
    step1 = Payload({"dz": torch.randn_like(z)}, {"step": 1})
    za = a.handle(MSG_EMBED, step1).tensors["z"]
    zb = b.handle(MSG_EMBED, step1).tensors["z"]
    assert torch.equal(za, zb)
    with pytest.raises(ShapeError, match="client 0 features"):
        a.handle(MSG_HEAD, Payload({"f": torch.randn(2, 2, 16, 16)}))


def test_the_regime_puts_a_backbone_on_the_server_larger_than_any_client_part_or_small_model():
    from pluribus.federated.core.config import regime_models
    from pluribus.federated.core.split import regime_parameter_counts

    tasks = build_suite("digits", ("digit", "parity"), seed=0)
    small, large = regime_models()
    counts = regime_parameter_counts(tasks, small, large)
    assert counts["server_backbone"] > 5 * counts["fedbone_client_max"]  # FedBone's premise, by construction
    assert counts["server_backbone"] > 5 * counts["small_full_max"] > counts["small_backbone"]
    assert small.adapter_hidden == large.adapter_hidden  # the client's own part stays small in both

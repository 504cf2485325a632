"""The gradient cache (issue 24 §3): a micro-batch encoded in pieces gives the gradients of one full-batch step, with
exact in-batch negatives; the random state of each piece is replayed; training with pieces equals training without."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import make_backbone
from pluribus.encoder.backbone import word_tokenizer
from pluribus.encoder.config import EncoderConfig, LoraSettings, ScheduleConfig, TrainConfig
from pluribus.encoder.gradcache import grad_cache_backward, pieces
from pluribus.encoder.loss import info_nce
from pluribus.encoder.model import UserEncoder
from pluribus.encoder.pairs import build_pairs, pairs_vocabulary
from pluribus.encoder.train import contrastive_backward, train_encoder
from pluribus.errors import ConfigError


@pytest.fixture(scope="module")
def pairs():
    from pluribus.data.synthetic import make_synthetic_users

    return build_pairs(make_synthetic_users(24, seed=0), source="payments", positive="profile", max_events=8)


def _encoder(pairs, *, dropout: float = 0.0, layers: int = 2) -> UserEncoder:
    tok = word_tokenizer(pairs_vocabulary(pairs))
    cfg = EncoderConfig(model="tiny", projection=(16,), lora=LoraSettings(r=4, dropout=dropout), max_length=48)
    torch.manual_seed(0)
    return UserEncoder(cfg, backbone=make_backbone(len(tok), seed=0, layers=layers), tokenizer=tok).train()


def _grads(encoder: UserEncoder) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in encoder.named_parameters() if p.grad is not None}
    encoder.zero_grad(set_to_none=True)
    return out


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and len(a) > 4
    for name in a:  # float tolerance: summation order differs, so relative to the tensor's largest entry
        gap, scale = float((a[name] - b[name]).abs().max()), float(a[name].abs().max())
        assert gap <= 1e-5 * scale + 1e-7, (name, gap, scale)
    assert any(float(g.abs().max()) > 0 for g in a.values())


def test_pieces_cut_in_order():
    assert pieces([5, 1, 4, 2, 3], None) == [[5, 1, 4, 2, 3]]
    assert pieces([5, 1, 4, 2, 3], 2) == [[5, 1], [4, 2], [3]]
    assert pieces([5, 1], 8) == [[5, 1]]
    with pytest.raises(ConfigError, match="piece_size"):
        TrainConfig(piece_size=0)


@pytest.mark.parametrize("piece_size", [1, 3, 8])
@pytest.mark.parametrize("importance", [None, "hidden", "mask_grad", "embedding_grad"])
def test_pieces_give_the_gradients_of_one_full_batch_step(pairs, piece_size, importance):
    encoder = _encoder(pairs)
    idx = list(range(3, 11))  # 8 pairs; pieces of 3 leave a short last piece
    weight = 0.5  # a soft mask: the importance signals depend on it
    whole = TrainConfig(batch_size=8, fn_margin=0.1, temperature=0.05)
    loss_a, diag_a, found_a = contrastive_backward(encoder, pairs, idx, weight, whole, importance=importance)
    grads_a = _grads(encoder)
    cached = dataclasses.replace(whole, piece_size=piece_size)
    loss_b, diag_b, found_b = contrastive_backward(encoder, pairs, idx, weight, cached, importance=importance)
    grads_b = _grads(encoder)
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert diag_b == pytest.approx(diag_a, rel=1e-4, abs=1e-6)
    _assert_same(grads_a, grads_b)
    if importance is None:
        assert found_a == found_b == []
        return
    # the per-token importance of each piece is the full batch's, row for row
    assert len(found_b) == len(pieces(idx, piece_size))
    rows = 0
    for values, mask in found_b:
        length = mask.shape[1]
        assert torch.allclose(values * mask, found_a[0][0][rows : rows + len(values), :length] * mask,
                              rtol=1e-4, atol=1e-7)
        rows += len(values)
    assert rows == len(idx)


def test_a_wrong_slice_of_the_embedding_gradient_would_be_caught(pairs):
    """The equality above can fail: backpropagating each piece against its own piece-local loss (negatives from
    the piece only, as plain accumulation does) gives other gradients."""
    encoder = _encoder(pairs)
    idx = list(range(8))
    contrastive_backward(encoder, pairs, idx, 1.0, TrainConfig(batch_size=8, fn_margin=None))
    full = _grads(encoder)
    for group in pieces(idx, 4):
        contrastive_backward(encoder, pairs, group, 1.0, TrainConfig(batch_size=8, fn_margin=None, grad_accum=2))
    local = _grads(encoder)
    assert max(float((full[n] - local[n]).abs().max()) for n in full) > 1e-4


def test_each_pieces_random_state_is_replayed(pairs):
    """With LoRA dropout on, the cached step equals keeping every piece's graph (the same draws, piece by piece)."""
    encoder = _encoder(pairs, dropout=0.3)
    batches = [[encoder.tokenize([texts[i] for i in group]) for group in ([0, 1, 2], [3, 4])]
               for texts in (pairs.anchors, pairs.positives)]

    def loss_fn(embeddings):
        return info_nce(*embeddings, temperature=0.05, fn_margin=None)

    torch.manual_seed(7)
    towers = [torch.cat([encoder(b, 1.0) for b in tower]) for tower in batches]
    loss_fn(towers).backward()
    reference = _grads(encoder)
    after_reference = torch.rand(1)
    torch.manual_seed(7)
    seen = []
    grad_cache_backward(batches, lambda t, b: encoder(b, 1.0), loss_fn, after_piece=lambda t, k: seen.append((t, k)))
    assert torch.rand(1) == after_reference  # the generator ends where one pass would leave it
    _assert_same(reference, _grads(encoder))
    assert seen == [(0, 0), (0, 1), (1, 0), (1, 1)]
    torch.manual_seed(8)  # other draws: other gradients, so the replay is what made them equal
    grad_cache_backward(batches, lambda t, b: encoder(b, 1.0), loss_fn)
    other = _grads(encoder)
    assert max(float((reference[n] - other[n]).abs().max()) for n in reference) > 1e-5


def test_training_in_pieces_equals_training_in_one_pass(pairs):
    sched = ScheduleConfig(policy="ggsm", total_steps=3, warmup_steps=2, norm="zscore")
    base = TrainConfig(steps=3, batch_size=8, grad_accum=2, lr=5e-3, lr_warmup_ratio=0.0)
    results = {}
    for piece_size in (None, 3):
        encoder = _encoder(pairs)
        res, schedule = train_encoder(encoder, pairs, sched, dataclasses.replace(base, piece_size=piece_size),
                                      progress=False)
        results[piece_size] = (res, schedule, encoder.trainable_state_dict())
    (res_a, sched_a, state_a), (res_b, sched_b, state_b) = results[None], results[3]
    assert res_b.losses == pytest.approx(res_a.losses, rel=1e-4)
    assert torch.allclose(sched_a.importance, sched_b.importance, rtol=1e-3, atol=1e-6)
    assert all(torch.allclose(state_a[k], state_b[k], atol=1e-5) for k in state_a)
    assert res_a.memory is not None and res_b.memory is not None
    assert res_b.memory.rows == 3 and res_a.memory.rows == 2 * 8  # both towers of a micro-batch at once

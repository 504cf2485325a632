"""GG-SM importance signals (issue 24 §4): the faithful last-hidden-state gradient carries no token-level signal
under mean pooling; the mask-weight and input-embedding gradients vary per token and per key."""

from __future__ import annotations

import pytest
import torch

from conftest import make_backbone, make_tokenizer
from pluribus.encoder.config import EncoderConfig, LoraSettings, ScheduleConfig, TrainConfig
from pluribus.encoder.loss import info_nce
from pluribus.encoder.masks import per_key_weights
from pluribus.encoder.model import UserEncoder, UserInput
from pluribus.encoder.pairs import PairSet
from pluribus.encoder.train import embed_with_importance, train_encoder
from pluribus.errors import ConfigError

# four users of different lengths (11 to 23 tokens), words drawn so that no two tokens of a user are alike
ANCHORS = [" ".join(f"w{(7 * u + 3 * k) % 40}" for k in range(11 + 4 * u)) for u in range(4)]
POSITIVES = [" ".join(f"w{(5 * u + k) % 40}" for k in range(6)) for u in range(4)]


def _encoder(pooling: str = "mean", lora: int = 0, seed: int = 0) -> UserEncoder:
    tok = make_tokenizer()
    cfg = EncoderConfig(model="tiny", projection=(16,), lora=LoraSettings(r=lora), max_length=48, pooling=pooling)
    torch.manual_seed(seed)
    return UserEncoder(cfg, backbone=make_backbone(len(tok), seed=seed), tokenizer=tok)


def _signal(enc: UserEncoder, signal: str, weight: float | torch.Tensor = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token importance [B, L], attention mask) of one anchor batch after one backward pass."""
    anchors, positives = enc.tokenize(ANCHORS), enc.tokenize(POSITIVES)
    u, read = embed_with_importance(enc, anchors, weight, signal)
    a, _ = enc.embed(positives, weight)
    info_nce(u, a, temperature=0.1, fn_margin=None).backward()
    return read(), anchors.attention_mask


def _distinct(values: torch.Tensor) -> int:
    """Number of distinct values, up to a relative 1e-5 of the largest magnitude."""
    scale = float(values.abs().max()) or 1.0
    return len(set(torch.round(values / scale * 1e5).tolist()))


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_new_signals_vary_within_a_user_while_the_faithful_one_does_not(pooling):
    hidden, mask = _signal(_encoder(pooling), "hidden")
    for signal in ("mask_grad", "embedding_grad"):
        values, _ = _signal(_encoder(pooling), signal)
        for b in range(len(ANCHORS)):
            real = mask[b].bool()
            n = int(real.sum())
            assert n >= 11
            faithful, new = hidden[b][real], values[b][real]
            if pooling == "mean":  # dL/dh_t = dL/dpooled / n at every token: one value per user
                assert _distinct(faithful) == 1 and float(faithful.min()) > 0
            else:  # non-zero at the last real token only
                assert int((faithful != 0).sum()) == 1 and bool(faithful[-1] != 0)
            if signal == "mask_grad":
                # key position 0 is never a later key (no query before it): zero; every other key its own value
                assert float(new[0]) == 0.0
                assert _distinct(new[1:]) == n - 1 and bool((new[1:] != 0).all())
                assert bool((new[1:] > 0).any()) and bool((new[1:] < 0).any())  # opening helps some keys, hurts others
            else:
                assert _distinct(new) == n and float(new.min()) > 0


def test_mask_grad_is_the_true_gradient_and_leaves_the_forward_pass_unchanged():
    enc = _encoder()
    anchors, positives = enc.tokenize(ANCHORS), enc.tokenize(POSITIVES)
    weights = torch.linspace(0.2, 0.9, 64)  # GG-SM's warm-up form: one weight per key position
    u, read = embed_with_importance(enc, anchors, weights, "mask_grad")
    assert torch.allclose(u, enc.embed(anchors, weights)[0], atol=1e-6)
    a, _ = enc.embed(positives, weights)
    info_nce(u, a, temperature=0.1, fn_margin=None).backward()
    grad = -read()

    keys = per_key_weights(weights, anchors.attention_mask)
    length = keys.shape[1]

    def loss(k: torch.Tensor) -> float:
        with torch.no_grad():
            emb, _ = enc.embed(anchors, k[:, None, :].expand(-1, length, -1))
            return float(info_nce(emb, a.detach(), temperature=0.1, fn_margin=None))

    eps = 1e-3
    for b, j in ((0, 5), (2, 9), (3, int(anchors.attention_mask[3].sum()) - 1)):  # right-padded: index = position
        up, down = keys.clone(), keys.clone()
        up[b, j] += eps
        down[b, j] -= eps
        numeric = (loss(up) - loss(down)) / (2 * eps)
        assert numeric == pytest.approx(float(grad[b, j]), rel=2e-2, abs=1e-6)


def test_embedding_grad_with_frozen_embeddings_keeps_their_weights_frozen():
    enc = _encoder(lora=4)
    table = enc.backbone.get_input_embeddings().weight
    assert not table.requires_grad
    values, mask = _signal(enc, "embedding_grad")
    real = mask.bool()
    assert float(values[real].min()) > 0 and _distinct(values[0][real[0]]) == int(real[0].sum())
    assert table.grad is None


def test_training_with_each_signal_gives_w0_that_varies_per_position_only_for_the_new_ones():
    pairs = PairSet(user_ids=[str(u) for u in range(8)], anchors=[UserInput(ANCHORS[u % 4]) for u in range(8)],
                    positives=[UserInput(POSITIVES[u % 4] + f" w{u}") for u in range(8)])
    spread = {}
    for signal in ("hidden", "mask_grad", "embedding_grad"):
        sched = ScheduleConfig(policy="ggsm", total_steps=3, warmup_steps=2, norm="zscore", importance=signal)
        _, schedule = train_encoder(_encoder(), pairs, sched, TrainConfig(steps=3, batch_size=4, lr=1e-3),
                                    progress=False)
        assert schedule.n_updates == 2 and schedule.w0 is not None
        # positions 0..10: every anchor reaches them, so a per-user-constant signal gives one value there
        spread[signal] = _distinct(schedule.w0[:11])
    assert spread["hidden"] == 1
    assert spread["mask_grad"] >= 10 and spread["embedding_grad"] >= 10


def test_unknown_importance_signal_is_refused():
    with pytest.raises(ConfigError, match="schedule.importance must be one of hidden, mask_grad, embedding_grad"):
        ScheduleConfig(importance="attention")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="schedule.importance"):
        embed_with_importance(_encoder(), _encoder().tokenize(ANCHORS), 0.5, "attention")

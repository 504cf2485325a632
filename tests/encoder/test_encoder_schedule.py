from __future__ import annotations

import pytest
import torch

from pluribus.encoder.config import ScheduleConfig
from pluribus.encoder.schedule import MaskSchedule, linear_opening, normalise_importance, token_importance
from pluribus.errors import ConfigError


def test_importance_mean_does_not_scale_with_batch_size():
    norms = torch.rand(3, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    g1, seen = token_importance(norms, mask, pos, 8, loss_batch_size=3)
    # the same users twice: a batch-mean loss halves each user's gradient
    g2, _ = token_importance(torch.cat([norms, norms]) / 2, torch.cat([mask, mask]), torch.cat([pos, pos]), 8,
                             loss_batch_size=6)
    assert torch.allclose(g1, g2)
    s1, _ = token_importance(norms, mask, pos, 8, reduction="sum")
    s2, _ = token_importance(torch.cat([norms, norms]), torch.cat([mask, mask]), torch.cat([pos, pos]), 8,
                             reduction="sum")
    assert torch.allclose(s2, 2 * s1)  # the demo's batch sum grows with the batch
    assert seen.tolist() == [True] * 5 + [False] * 3
    assert g1[5:].eq(0).all()


def test_padding_is_zeroed_and_indexed_by_position():
    norms = torch.tensor([[9.0, 1.0, 2.0]])
    g, _ = token_importance(norms, torch.tensor([[0, 1, 1]]), torch.tensor([[0, 0, 1]]), 4, loss_batch_size=1)
    assert g.tolist() == [1.0, 2.0, 0.0, 0.0]


def test_normalisations():
    g = torch.tensor([1.0, 2.0, 3.0, 0.0])
    seen = torch.tensor([True, True, True, False])
    z = normalise_importance(g, seen, "zscore")
    assert abs(float(z[:3].mean())) < 1e-6 and z[3] == 0
    assert normalise_importance(g, seen, "max")[2] == 1.0
    # equal importance up to float rounding (every anchor of one length) carries no signal: zeros, not +-1
    flat = torch.tensor([0.1 + 0.2, 0.3, 0.3000000000000001, 0.0], dtype=torch.float64)
    assert normalise_importance(flat, seen, "zscore").tolist() == [0.0, 0.0, 0.0, 0.0]
    with pytest.raises(ConfigError):
        normalise_importance(g, seen, "bogus")


def test_warmup_start_weight_option():
    assert float(MaskSchedule(ScheduleConfig(total_steps=10)).future_weights().mean()) == 0.5
    causal_start = MaskSchedule(ScheduleConfig(total_steps=10, warmup_start_weight=0.0))
    assert float(causal_start.future_weights().max()) == 0.0
    assert not causal_start.wants_gradients()


def test_ggsm_warmup_freeze_and_linear_opening():
    cfg = ScheduleConfig(policy="ggsm", total_steps=10, warmup_steps=2, capacity=4, norm="zscore")
    s = MaskSchedule(cfg)
    mask = torch.ones(2, 4, dtype=torch.long)
    pos = torch.arange(4).expand(2, 4)
    for _ in range(2):
        assert s.wants_gradients()
        s.update_importance(torch.tensor([[1.0, 2.0, 3.0, 4.0]] * 2), mask, pos)
        s.advance()
    w0 = s.w0
    assert w0 is not None and w0[3] > w0[0]  # later keys got more gradient -> more weight
    assert torch.allclose(s.future_weights(), w0)
    assert not s.wants_gradients()
    for _ in range(4):
        s.advance()
    assert torch.allclose(s.future_weights(), 0.5 * w0 + 0.5)
    for _ in range(4):
        s.advance()
    assert torch.equal(s.future_weights(), torch.ones(4))


def test_fixed_and_scheduler_policies():
    assert MaskSchedule(ScheduleConfig(policy="causal")).future_weights() == 0.0
    assert MaskSchedule(ScheduleConfig(policy="bidirectional")).future_weights() == 1.0
    assert MaskSchedule(ScheduleConfig(policy="hybrid", hybrid_weight=0.3)).future_weights() == 0.3
    s = MaskSchedule(ScheduleConfig(policy="scheduler", total_steps=10, warmup_steps=0, scheduler_start=0.5))
    for _ in range(5):
        s.advance()
    assert s.future_weights() == pytest.approx(0.75)
    assert linear_opening(12, 2, 10, 0.0) == 1.0


def test_state_dict_roundtrip_resumes_exactly():
    cfg = ScheduleConfig(policy="ggsm", total_steps=6, warmup_steps=3, capacity=5, ema=0.5)
    a = MaskSchedule(cfg)
    mask = torch.ones(1, 5, dtype=torch.long)
    pos = torch.arange(5)[None]
    for _t in range(2):
        a.update_importance(torch.rand(1, 5), mask, pos)
        a.advance()
    b = MaskSchedule(cfg)
    b.load_state_dict(a.state_dict())
    grads = torch.rand(1, 5)
    for s in (a, b):
        s.update_importance(grads, mask, pos)
        s.advance()
        s.advance()
    assert torch.equal(a.future_weights(), b.future_weights())
    with pytest.raises(ConfigError, match="lacks"):
        b.load_state_dict({})


def test_bad_schedule_config():
    with pytest.raises(ConfigError, match="warmup_steps"):
        ScheduleConfig(total_steps=5, warmup_steps=9)
    with pytest.raises(ConfigError, match="ema"):
        ScheduleConfig(ema=1.0)

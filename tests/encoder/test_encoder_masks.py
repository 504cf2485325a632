from __future__ import annotations

import math

import pytest
import torch

from conftest import make_backbone, make_tokenizer
from pluribus.encoder.masks import (
    bidirectional_bias,
    causal_bias,
    hybrid_bias,
    position_ids_from_mask,
    require_bias_backend,
    soft_attention_bias,
)
from pluribus.errors import ConfigError, ShapeError


def test_causal_bias_blocks_future_and_padding():
    mask = torch.tensor([[1, 1, 1, 0]])
    bias = causal_bias(mask)[0, 0]
    lo = torch.finfo(torch.float32).min
    assert bias.shape == (4, 4)
    assert bias[2, 0] == 0 and bias[2, 2] == 0 and bias[1, 0] == 0
    assert bias[0, 1] == lo and bias[1, 2] == lo
    assert (bias[:, 3] == lo).all()  # padded key blocked from every query


def test_soft_weight_is_log_w_and_padding_still_blocked():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    bias = hybrid_bias(mask, 0.3)
    assert torch.isclose(bias[0, 0, 0, 2], torch.tensor(math.log(0.3)))
    assert bias[0, 0, 2, 0] == 0
    assert bias[1, 0, 0, 2] == torch.finfo(torch.float32).min
    assert (bidirectional_bias(mask)[0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_bias_uses_dtype_min_never_inf(dtype):
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    bias = soft_attention_bias(mask, torch.tensor([0.0, 1e-12, 0.5, 1.0]), dtype=dtype)
    assert bias.dtype == dtype
    assert torch.isfinite(bias).all()
    assert bias.min() == torch.finfo(dtype).min


def test_future_is_by_position_so_left_and_right_padding_agree():
    w = torch.tensor([1.0, 0.2, 0.7, 0.4])
    right = soft_attention_bias(torch.tensor([[1, 1, 1, 0]]), w)[0, 0]
    left = soft_attention_bias(torch.tensor([[0, 1, 1, 1]]), w)[0, 0]
    assert torch.equal(right[:3, :3], left[1:, 1:])
    assert torch.equal(position_ids_from_mask(torch.tensor([[0, 1, 1]])), torch.tensor([[0, 0, 1]]))


def test_bad_weights_and_shapes_raise():
    mask = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        soft_attention_bias(mask, 1.5)
    with pytest.raises(ShapeError, match="future_weight"):
        soft_attention_bias(mask, torch.ones(2))
    with pytest.raises(ShapeError, match="attention_mask"):
        soft_attention_bias(torch.ones(3, dtype=torch.long), 0.5)


def test_flash_attention_with_soft_mask_is_a_clear_error():
    with pytest.raises(ConfigError, match="FlashAttention"):
        require_bias_backend("flash_attention_2")
    require_bias_backend("sdpa")
    require_bias_backend("eager")


def test_all_ones_weight_equals_is_causal_false_with_padding(impl):
    model = make_backbone(50, impl)
    ids = torch.tensor([[3, 7, 9, 11, 0], [4, 6, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    pos = position_ids_from_mask(mask)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=soft_attention_bias(mask, 1.0), position_ids=pos).last_hidden_state
        model.config.is_causal = False
        try:
            ref = model(input_ids=ids, attention_mask=mask, position_ids=pos, is_causal=False).last_hidden_state
        finally:
            model.config.is_causal = True
    real = mask.bool()
    assert torch.allclose(ours[real], ref[real], atol=1e-5)


def test_fp16_bias_with_fully_blocked_rows_gives_finite_attention():
    mask = torch.tensor([[0, 0, 1, 1]])
    bias = causal_bias(mask, dtype=torch.float16)  # left-padded: pad query rows see no key at all
    scores = torch.randn(1, 1, 4, 4, dtype=torch.float16)
    probs = torch.softmax((scores + bias).float(), dim=-1)
    assert torch.isfinite(probs).all()
    assert probs[0, 0, 3, :2].max() == 0  # real queries never attend to pads
    assert make_tokenizer().pad_token == "[PAD]"


def test_demo_parity_option_leaves_pads_visible():
    mask = torch.tensor([[1, 1, 0]])
    visible = soft_attention_bias(mask, 1.0, block_padding=False)[0, 0]
    assert (visible == 0).all()
    assert (bidirectional_bias(mask)[0, 0, :, 2] == torch.finfo(torch.float32).min).all()


def test_user_span_shape_and_scope_value_are_checked():
    from pluribus.encoder.config import EncoderConfig

    mask = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(ShapeError, match="user_span"):
        hybrid_bias(mask, user_span=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ConfigError, match="future_scope"):
        EncoderConfig(future_scope="query")

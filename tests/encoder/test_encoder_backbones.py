"""The mask means what the policy says on 28 transformers family configurations, or the encoder refuses in one clear line.

Each family is a tiny random config built here (nothing downloaded). Outcomes, per family and backend:
``full``: every policy runs and the self-check passes; ``causal_layers``: convolutional / linear-attention / SSM /
recurrent layers cannot attend ahead, so a non-causal mask is refused unless ``allow_causal_layers``; ``causal_use``:
the model ignores a non-causal bias, so only causal use is accepted; ``refused``: the model cannot run the mask.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import pytest
import torch

from conftest import FAMILIES, OTHER_FAMILIES, make_backbone, make_tokenizer
from pluribus.encoder.config import EncoderConfig, LoraSettings
from pluribus.encoder.model import TokenBatch, UserEncoder
from pluribus.errors import ConfigError

HYBRIDS = ("lfm2", "qwen3_next", "jamba", "bamba", "recurrent_gemma", "falcon_h1")
EAGER_ONLY = ("mpt", "bloom", "gpt_neo", "gpt_oss", "gemma2")  # transformers has no sdpa path for them
OUTCOME = {
    **{f: "full" for f in FAMILIES},
    **{f: "full" for f in ("falcon", "gpt2", "opt", "granite", "mistral_window", "llama4", "gpt_oss", "gemma2",
                           "cohere2")},
    **{f: "causal_layers" for f in HYBRIDS},
    "mpt": "soft_refused", "bloom": "refused", "falcon_alibi": "refused", "gpt_neo": "causal_use",
}
CASES = [(f, i) for f in OUTCOME for i in ("sdpa", "eager") if not (i == "sdpa" and f in EAGER_ONLY)]
WINDOWED = {"gemma3": 16, "mistral_window": 8, "llama4": 8, "gpt_oss": 8, "gemma2": 8, "cohere2": 8,
            "recurrent_gemma": 16}


def build(family: str, impl: str, **fields) -> UserEncoder:
    tok = make_tokenizer()
    cfg = EncoderConfig(model=f"tiny-{family}", projection=(), lora=LoraSettings(r=0), attn_implementation=impl,
                        **{"max_length": 64, **fields})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return UserEncoder(cfg, backbone=make_backbone(len(tok) + 4, impl, family=family), tokenizer=tok)


@functools.cache
def built(family: str, impl: str, mask: str = "bidirectional", allow: bool = False) -> UserEncoder:
    return build(family, impl, inference_mask=mask, allow_causal_layers=allow)


def states(enc: UserEncoder, rows: list[list[int]], weight: float) -> torch.Tensor:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), 5, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    with torch.no_grad():
        return enc.hidden_states(TokenBatch(ids, mask), weight)[0]


def test_at_least_twenty_families_with_the_hard_ones():
    assert len(OUTCOME) >= 20 and len(FAMILIES) + len(OTHER_FAMILIES) == len(OUTCOME)
    assert {"mpt", "bloom", "falcon_alibi", "gpt_neo", "llama4"} <= set(OUTCOME) and len(HYBRIDS) >= 3


@pytest.mark.parametrize(("family", "impl"), CASES)
def test_each_family_runs_the_mask_or_refuses_in_one_line(family, impl):
    outcome = OUTCOME[family]
    where = rf"with attn_implementation='{impl}'"
    if outcome == "full":
        enc = built(family, impl)
        found = enc.mask_check_result
        assert found is not None and found["future_w0"] < 1e-5 and found["native_causal"] < 1e-4
        assert found["future_w1"] > 1e-3 and found["future_w0.5"] > 1e-3
        summary = enc.mask_check_summary()
        assert summary.startswith("passed for") and "w = 0.5" in summary
        # fractional weights act fractionally: w = 0.5 lies strictly between causal and bidirectional
        base, changed = [5, 9, 13, 17, 21, 25], [5, 9, 13, 17, 21, 30]
        moves = {w: (states(enc, [base], w) - states(enc, [changed], w))[0, :-1].norm().item() for w in (0.5, 1.0)}
        assert 0 < moves[0.5] and abs(moves[0.5] - moves[1.0]) > 1e-4, moves
        return
    if outcome == "refused":
        with pytest.raises(ConfigError, match=rf"{where}.*cannot run the encoder's attention mask"):
            build(family, impl)
        with pytest.raises(ConfigError, match=where):  # causal use runs the same probes: still one clear line
            build(family, impl, inference_mask="causal")
        return
    if outcome == "soft_refused":  # MPT (eager) turns the additive bias into a yes/no mask: w = 0.5 acts as w = 0
        with pytest.raises(ConfigError, match=rf"MptModel {where}.*soft \(w = 0.5\) mask a later token did not move"):
            build(family, impl)
    if outcome == "causal_use":  # GPT-Neo applies its own causal mask on top of any bias
        with pytest.raises(ConfigError, match=rf"GPTNeoModel {where}.*bidirectional \(w = 1\).*did not move"):
            build(family, impl)
    if outcome == "causal_layers":
        with pytest.raises(ConfigError, match=r"has layers that cannot attend to later tokens \(.*(conv|linear_"
                                              r"attention|hybrid).*allow_causal_layers"):
            build(family, impl)
        accepted = built(family, impl, allow=True)
        assert "accepted by encoder.allow_causal_layers" in accepted.mask_check_summary()
        assert states(accepted, [[5, 9, 13, 17]], 1.0).shape == (1, 4, 32)
    # a purely causal use is accepted, and refuses w > 0 with the reason when asked later (e.g. by training)
    causal = built(family, impl, "causal")
    assert causal.mask_check_result is not None and causal.mask_check_result["native_causal"] < 1e-4
    assert states(causal, [[5, 9, 13, 17]], 0.0).shape[1] == 4
    assert causal.future_attention_problem() is not None
    with pytest.raises(ConfigError, match="future weight > 0 refused"):
        states(causal, [[5, 9, 13, 17]], 0.5)
    with pytest.raises(ConfigError, match="future weight > 0 refused"):
        states(causal, [[5, 9, 13, 17]], torch.full((8,), 0.3))


@pytest.mark.parametrize("family", sorted(WINDOWED))
def test_windowed_layers_keep_their_window_and_inputs_are_not_capped(family):
    impl = "eager"
    enc = built(family, impl, allow=family in HYBRIDS)
    window = WINDOWED[family]
    assert enc.max_length == 64 and enc.layout.smallest_window == window
    assert "inputs are not capped" in enc.mask_check_summary()
    row = [5 + (k * 7) % 35 for k in range(window * 2 + 5)]  # longer than the window: the window matters
    ours = states(enc, [row], 0.0)[0]
    with torch.no_grad():
        ids = torch.tensor([row])
        theirs = enc.backbone(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_a_window_the_model_cannot_take_per_layer_type_is_a_one_line_refusal(monkeypatch):
    import pluribus.encoder.backbone as backbone_module

    real = backbone_module.backbone_layout

    def one_mask_only(model):
        return dataclasses.replace(real(model), takes_layer_masks=False)

    monkeypatch.setattr(backbone_module, "backbone_layout", one_mask_only)
    with pytest.raises(ConfigError, match=r"Gemma3TextModel.*sliding_attention: window 16.*max_length <= 16"):
        build("gemma3", "sdpa")
    assert build("gemma3", "sdpa", max_length=16).max_length == 16


def test_a_soft_mask_binarised_to_one_is_refused(monkeypatch):
    """A backbone that keeps any key the bias does not block (w = 0.5 acts as w = 1) fails the w = 0.5 probe."""
    enc = built("llama", "sdpa")
    original = type(enc.backbone).forward

    def yes_no(self, *args, attention_mask=None, **kwargs):
        lo = torch.finfo(attention_mask.dtype).min
        return original(self, *args, attention_mask=torch.where(attention_mask > lo / 2, 0.0, lo), **kwargs)

    monkeypatch.setattr(type(enc.backbone), "forward", yes_no)
    with pytest.raises(ConfigError, match="same states as w = 1.*silently binarised"):
        enc.check_mask()


def test_attention_probabilities_catch_a_wrongly_scaled_soft_weight(monkeypatch):
    """w applied as w**2: the hidden-state probes pass (0.25 still moves states, unlike w = 1), the first-layer
    attention probabilities against the hand reweighting of w = 1's do not."""
    enc = built("llama", "eager")
    original = type(enc.backbone).forward

    def squared(self, *args, attention_mask=None, **kwargs):
        lo = torch.finfo(attention_mask.dtype).min
        return original(self, *args, attention_mask=torch.where(attention_mask > lo / 2, 2 * attention_mask, lo),
                        **kwargs)

    monkeypatch.setattr(type(enc.backbone), "forward", squared)
    with pytest.raises(ConfigError, match="attention probabilities under w = 0.5 differ from the hand reweighting"):
        enc.check_mask()
    monkeypatch.undo()
    assert enc.check_mask()["attention_probs_w0.5"] < 1e-4


def test_probes_pad_with_a_token_whose_embedding_is_not_zero():
    from pluribus.encoder.model import _probe_ids

    enc = built("llama", "sdpa")
    weight = enc.backbone.get_input_embeddings().weight.detach().clone()
    ids = _probe_ids(enc.tokenizer, enc.new_token_ids, weight)
    weight[ids[8]] = 0.0
    again = _probe_ids(enc.tokenizer, enc.new_token_ids, weight)
    assert len(set(again)) == 9 and ids[8] not in again and all(weight[i].norm() > 0 for i in again)


def test_left_padding_leak_is_reported_not_refused_where_recurrent_layers_see_pads():
    """RecurrentGemma's recurrent blocks read left pads (the encoder pads right, where it is exact)."""
    enc = built("recurrent_gemma", "eager", allow=True)
    found = enc.mask_check_result
    assert found is not None and found["padding_w1"] < 1e-5 and found["padding_left_w0"] > 1e-3
    assert "left padding by" in enc.mask_check_summary()

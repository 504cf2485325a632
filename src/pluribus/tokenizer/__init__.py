"""U2QT: multi-view RQ-VAE user tokenizer (stage 1 text embeddings, stage 2 shared + specific codebooks).

Cheap to import: sentence-transformers and transformers load only when stage 1 runs.

Examples:
    Fit on two sources' embeddings (``xa``, ``xb``: float arrays ``[users, dim]``), encode, render tokens:

    >>> from pluribus.tokenizer import UserTokenizer, TokenizerConfig
    >>> tok = UserTokenizer(TokenizerConfig(epochs=50)).fit({"a": xa, "b": xb})   # doctest: +SKIP
    >>> codes = tok.encode({"a": xa, "b": xb})       # uint16 [users, sources, levels]   # doctest: +SKIP
    >>> tok.tokens(codes)[0][:2]                      # ['<sh_l0_c17>', '<sh_l1_c3>']    # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pluribus.lazy import lazy_getattr

if TYPE_CHECKING:
    from pluribus.tokenizer.config import EMPTY_CODE, EmbedConfig, TokenizerConfig, TokenizeRunConfig
    from pluribus.tokenizer.embed import embed_dataset, embed_texts
    from pluribus.tokenizer.estimator import UserTokenizer
    from pluribus.tokenizer.inputs import SourceEmbeddings
    from pluribus.tokenizer.vocab import TokenVocabulary, collision_suffix

_EXPORTS = {
    "EMPTY_CODE": "config",
    "EmbedConfig": "config",
    "TokenizerConfig": "config",
    "TokenizeRunConfig": "config",
    "embed_dataset": "embed",
    "embed_texts": "embed",
    "UserTokenizer": "estimator",
    "SourceEmbeddings": "inputs",
    "TokenVocabulary": "vocab",
    "collision_suffix": "vocab",
}

__getattr__ = lazy_getattr("pluribus.tokenizer", _EXPORTS)

__all__ = [
    "EMPTY_CODE",
    "EmbedConfig",
    "SourceEmbeddings",
    "TokenVocabulary",
    "TokenizeRunConfig",
    "TokenizerConfig",
    "UserTokenizer",
    "collision_suffix",
    "embed_dataset",
    "embed_texts",
]

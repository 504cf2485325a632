"""Quality metrics of a fitted tokenizer: reconstruction, residuals, codebook usage, collisions, size."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pluribus.errors import DataError, ShapeError
from pluribus.tokenizer.config import EMPTY_CODE
from pluribus.tokenizer.estimator import UserTokenizer
from pluribus.tokenizer.inputs import SourceEmbeddings, as_source_embeddings, stack_sources


def reconstruction(tok: UserTokenizer, data: Any) -> dict[str, dict[str, float]]:
    """Per source, over users that have it: MSE, mean cosine, and MSE relative to the per-dim variance."""
    emb = as_source_embeddings(data)
    decoded = tok.decode(tok.encode(emb))
    out = {}
    for name in tok.source_names_:
        mask = emb.present[name]
        x, y = emb.embeddings[name][mask], decoded.embeddings[name][mask]
        if len(x) == 0:
            continue
        cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1) + 1e-12)
        mse = float(((x - y) ** 2).mean())
        var = float(x.var(0).mean()) if len(x) > 1 else float("nan")
        out[name] = {"mse": mse, "cosine": float(cos.mean()), "relative_mse": mse / var if var > 0 else float("nan")}
    return out


def residual_norms(tok: UserTokenizer, data: Any) -> list[float]:
    """Mean ``||r^l||`` of the latent residual before each level, then after the last (length L + 1)."""
    emb = as_source_embeddings(data)
    model = tok._fitted()
    x, present = stack_sources(emb, tok.source_names_, tok.in_dims_)
    with torch.no_grad():
        z = model.encode_latent(x)
        q = model.quantizer(z, present, keep_residuals=True)
        final = z - q.quantized
    norms = [float(r.norm(dim=-1)[present].mean()) for r in [*q.residuals, final]]
    return norms


def _entropy_stats(counts: np.ndarray) -> tuple[float, float]:
    total = counts.sum()
    if total == 0:
        return 0.0, 0.0
    p = counts[counts > 0] / total
    h = float(-(p * np.log(p)).sum())
    return float(np.exp(h)), h / np.log(len(counts)) if len(counts) > 1 else 1.0


def codebook_usage(tok: UserTokenizer, codes: np.ndarray) -> list[dict[str, Any]]:
    """Per level and part (``shared`` or a source's own codes): size, used fraction, perplexity, entropy, dead codes."""
    tok._check_codes(codes)
    rows = []
    names = tok.source_names_
    for spec in tok.model_.quantizer.levels:
        lvl = spec.index
        level_codes = codes[:, :, lvl]
        for group in spec.groups:
            start, stop = group.rows
            size = stop - start
            values = []
            for s in group.sources:
                col = level_codes[:, s]
                col = col[col != EMPTY_CODE].astype(np.int64)
                allowed = tok.model_.quantizer.allowed(lvl)[s].numpy()
                table_rows = allowed[col]
                values.append(table_rows[(table_rows >= start) & (table_rows < stop)] - start)
            counts = np.bincount(np.concatenate(values), minlength=size) if values else np.zeros(size, int)
            perplexity, norm_entropy = _entropy_stats(counts)
            part = "shared" if group.name == "shared" else names[int(group.name.split(":")[1])]
            rows.append({
                "level": lvl, "kind": spec.kind, "part": part, "size": size,
                "usage": float((counts > 0).mean()), "perplexity": perplexity,
                "normalized_entropy": norm_entropy, "dead": int((counts == 0).sum()),
                "assignments": int(counts.sum()),
            })
    return rows


def collisions(codes: np.ndarray) -> dict[str, float]:
    """Full-tuple collisions over users: rate ``(N - unique) / N``, largest bucket, unique tuples."""
    n = codes.shape[0]
    if n == 0:
        return {"collision_rate": 0.0, "largest_bucket": 0, "unique": 0, "users": 0}
    _, counts = np.unique(codes.reshape(n, -1), axis=0, return_counts=True)
    return {
        "collision_rate": float((n - len(counts)) / n), "largest_bucket": int(counts.max()),
        "unique": int(len(counts)), "users": int(n),
    }


def bytes_per_user(tok: UserTokenizer) -> dict[str, float]:
    """Storage per user: uint16 codes (plus a 2-byte suffix when on) vs float32 and float16 source embeddings."""
    n_codes = len(tok.source_names_) * len(tok.level_sizes_)
    code_bytes = 2 * n_codes + (2 if tok.config.collision_suffix else 0)
    f32 = 4 * sum(tok.in_dims_)
    return {
        "codes": float(code_bytes), "float32": float(f32), "float16": float(f32 // 2),
        "ratio_float32": f32 / code_bytes, "ratio_float16": f32 / 2 / code_bytes,
    }


def token_features(tok: UserTokenizer, codes: np.ndarray, *, kind: str = "vectors") -> np.ndarray:
    """Features computed from codes only: ``vectors`` (quantised latents, concatenated) or ``onehot`` (bag of codes)."""
    if kind == "vectors":
        zq = tok.code_vectors(codes)
        return zq.reshape(zq.shape[0], -1)
    if kind != "onehot":
        raise ValueError(f"kind={kind!r}: expected 'vectors' or 'onehot'")
    present, local = tok._check_codes(codes)
    blocks = []
    for s in range(local.shape[0]):
        for lvl, size in enumerate(tok.level_sizes_):
            block = np.zeros((codes.shape[0], size), dtype=np.float32)
            users = np.flatnonzero(present[s].numpy())
            block[users, local[s, users, lvl].numpy()] = 1.0
            blocks.append(block)
    return np.concatenate(blocks, axis=1)


def tokenizer_report(tok: UserTokenizer, data: SourceEmbeddings | Any, *, usage_data: Any | None = None) -> dict[str, Any]:
    """Every metric of this module: reconstruction and residuals on ``data`` (use held-out users); codebook
    usage and collisions on ``usage_data`` (e.g. all users; default ``data``)."""
    emb = as_source_embeddings(data)
    codes = tok.encode(emb if usage_data is None else as_source_embeddings(usage_data))
    usage = codebook_usage(tok, codes)
    return {
        "reconstruction": reconstruction(tok, emb),
        "residual_norms": residual_norms(tok, emb),
        "codebook_usage": usage,
        "min_usage": min(r["usage"] for r in usage),
        "collisions": collisions(codes),
        "bytes_per_user": bytes_per_user(tok),
    }


def split_reports(tok: UserTokenizer, data: SourceEmbeddings | Any) -> dict[str, Any]:
    """``tokenizer_report`` on held-out and on training users of ``data`` apart (``tok.trained_on``).

    Returns ``{"split": "recorded", "users": {"heldout": n, "training": m}, "heldout": report or None,
    "training": report or None}``; a group with fewer than 2 users gets None. When the tokenizer does not know
    its training users (fitted on arrays without ids, or saved by an older pluribus), ``split`` is
    ``"unknown"`` and ``"all"`` holds the report over every user.
    """
    emb = as_source_embeddings(data)
    trained = tok.trained_on(emb.user_ids)
    if trained is None:
        return {"split": "unknown", "users": {"all": emb.n_users}, "all": tokenizer_report(tok, emb)}
    out: dict[str, Any] = {"split": "recorded", "users": {"heldout": int((~trained).sum()), "training": int(trained.sum())}}
    for name, mask in (("heldout", ~trained), ("training", trained)):
        rows = np.flatnonzero(mask)
        out[name] = tokenizer_report(tok, emb.subset(rows)) if len(rows) >= 2 else None
    return out


def code_churn(old_codes: np.ndarray, new_codes: np.ndarray, source_names: list[str] | None = None) -> dict[str, Any]:
    """How many users' codes changed between two tokenizers on the same users (rows in the same order).

    ``users``: fraction whose full tuple changed; ``per_level``: fraction whose code changed at that level in
    any source; ``per_source_level``: the same per source (users lacking the source there in both are not
    counted); ``prefix``: fraction whose first ``l + 1`` levels changed in some source (coarse-to-fine IDs).
    """
    old, new = np.asarray(old_codes), np.asarray(new_codes)
    if old.shape != new.shape or old.ndim != 3:
        raise ShapeError("new codes", new.shape, f"{list(old.shape)} (the old codes' shape, [users, sources, levels])")
    n, n_sources, n_levels = old.shape
    if n == 0:
        raise DataError("no users to compare", expected="codes of at least one user")
    names = source_names if source_names is not None else [str(s) for s in range(n_sources)]
    changed = old != new  # [U, S, L]
    both_empty = (old == EMPTY_CODE) & (new == EMPTY_CODE)
    per_source_level = {}
    for s, name in enumerate(names):
        rows = []
        for lvl in range(n_levels):
            counted = ~both_empty[:, s, lvl]
            rows.append(float(changed[counted, s, lvl].mean()) if counted.any() else 0.0)
        per_source_level[name] = rows
    prefix_changed = np.cumsum(changed.any(axis=1), axis=1) > 0  # [U, L]: some level <= l changed
    return {
        "users": float(changed.reshape(n, -1).any(axis=1).mean()),
        "per_level": [float(changed[:, :, lvl].any(axis=1).mean()) for lvl in range(n_levels)],
        "prefix": [float(prefix_changed[:, lvl].mean()) for lvl in range(n_levels)],
        "per_source_level": per_source_level,
        "codes": float(changed.mean()),
    }


def refit_churn(old_codes: np.ndarray, new_codes: np.ndarray, changed: np.ndarray,
                source_names: list[str] | None = None) -> dict[str, Any]:
    """``code_churn`` for users whose inputs did not change and for those whose inputs changed, apart.

    ``changed`` is a bool mask over the users (rows of both code arrays); a group with no user gets None.
    """
    mask = np.asarray(changed, dtype=bool)
    if mask.shape != (np.asarray(old_codes).shape[0],):
        raise ShapeError("changed", mask.shape, f"[{np.asarray(old_codes).shape[0]}] (one flag per user)")
    old, new = np.asarray(old_codes), np.asarray(new_codes)
    return {
        name: code_churn(old[rows], new[rows], source_names) if rows.any() else None
        for name, rows in (("unchanged", ~mask), ("changed", mask))
    } | {"users": {"unchanged": int((~mask).sum()), "changed": int(mask.sum())}}

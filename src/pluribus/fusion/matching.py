"""Layer-wise neuron matching from (perturbed) weights: Hungarian coordinate descent, OT, graph matching.

All solvers see only the tensors they are given (released, perturbed ones in PrivFusion), and return, for a
party ``other``, permutations (or soft maps for OT) that align its hidden units to a reference.

- ``hungarian``: Git Re-Basin style weight matching. For each permutation, holding the others fixed, the
  best one maximises ``<P, C>`` with ``C = sum over touched axes of A_ref B_other^T`` (the other axes of B
  already permuted), solved by ``scipy.optimize.linear_sum_assignment``; sweeps in random order until no
  permutation changes (at most ``max_sweeps``). Optional activation-statistic similarity is added.
- ``ot``: OTFusion-style one forward pass: per permutation (input side first), align the other model's
  incoming weights with the maps found so far, cost = squared euclidean distance, solve with POT
  (``ot.emd`` exact, or ``ot.sinkhorn`` when ``reg > 0``), map = ``n * T``.
- ``graph``: per permutation, a quadratic assignment with second-order edge affinities (pairs of units
  whose mutual similarity agrees across models), solved with pygmtools RRWM and a Hungarian projection,
  initialised and combined with the first-order term. Dense affinity: only for layers up to 64 units.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from pluribus.errors import ConfigError
from pluribus.fusion.spec import (
    Params,
    Perms,
    PermutationSpec,
    apply_perms,
    block_index,
    identity_perms,
    unit_view,
)

SOLVERS = ("hungarian", "ot", "graph", "identity")
GRAPH_MAX_UNITS = 64


def _other_axes_permuted(
    spec: PermutationSpec, tensor: torch.Tensor, param: str, skip_axis: int, perms: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    for name, ref in spec.param_axes(param):
        if ref.axis != skip_axis and name in perms:
            tensor = tensor.index_select(ref.axis, block_index(perms[name], ref.block))
    return tensor


def similarity_matrix(
    spec: PermutationSpec,
    name: str,
    ref: Mapping[str, torch.Tensor],
    other: Mapping[str, torch.Tensor],
    perms: Mapping[str, torch.Tensor],
) -> torch.Tensor:
    """``C[i, j]`` = inner product of ref unit i and other unit j over every axis ``name`` touches."""
    n = spec.sizes[name]
    c = torch.zeros(n, n, dtype=torch.float64)
    for axis_ref in spec.axes[name]:
        if axis_ref.param not in ref or axis_ref.param not in other:
            continue
        a = unit_view(ref[axis_ref.param].to(torch.float64), axis_ref)
        b_t = _other_axes_permuted(spec, other[axis_ref.param].to(torch.float64), axis_ref.param, axis_ref.axis, perms)
        c += a @ unit_view(b_t, axis_ref).T
    return c


def activation_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``-(a_i - b_j)^2``: a similarity of per-unit activation statistics."""
    a64, b64 = a.to(torch.float64).reshape(-1), b.to(torch.float64).reshape(-1)
    return -((a64[:, None] - b64[None, :]) ** 2)


def _scaled(extra: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    denom = float(extra.std())
    return extra * (float(like.std()) / denom) if denom > 0 else extra


def weight_matching(
    spec: PermutationSpec,
    ref: Mapping[str, torch.Tensor],
    other: Mapping[str, torch.Tensor],
    *,
    ref_acts: Mapping[str, torch.Tensor] | None = None,
    other_acts: Mapping[str, torch.Tensor] | None = None,
    act_weight: float = 1.0,
    max_sweeps: int = 100,
    seed: int = 0,
    init: Mapping[str, torch.Tensor] | None = None,
) -> Perms:
    """Re-Basin coordinate descent: permutations of ``other``'s units that best align it to ``ref``."""
    spec.validate(ref, what="reference")
    spec.validate(other, what="other model")
    perms = {k: v.clone() for k, v in (init or identity_perms(spec)).items()}
    extra: dict[str, torch.Tensor] = {}
    if ref_acts is not None and other_acts is not None and act_weight > 0:
        for name in spec.sizes:
            if name in ref_acts and name in other_acts:
                extra[name] = activation_similarity(ref_acts[name], other_acts[name])
    scales: dict[str, torch.Tensor] = {}
    rng = np.random.default_rng(seed)
    names = list(spec.order)
    for _ in range(max_sweeps):
        changed = False
        for idx in rng.permutation(len(names)):
            name = names[idx]
            c = similarity_matrix(spec, name, ref, other, perms)
            if name in extra:
                if name not in scales:
                    scales[name] = act_weight * _scaled(extra[name], c)
                c = c + scales[name]
            _, cols = linear_sum_assignment(c.numpy(), maximize=True)
            new = torch.as_tensor(cols, dtype=torch.long)
            rows = torch.arange(spec.sizes[name])
            if float(c[rows, new].sum()) > float(c[rows, perms[name]].sum()) + 1e-9 * float(c.abs().sum()):
                perms[name] = new
                changed = True
        if not changed:
            break
    return perms


def ot_maps(
    spec: PermutationSpec,
    ref: Mapping[str, torch.Tensor],
    other: Mapping[str, torch.Tensor],
    *,
    reg: float = 0.0,
) -> dict[str, torch.Tensor]:
    """OTFusion-style alignment maps ``n * T`` [n, n] per permutation, input side first (POT)."""
    import ot  # POT

    spec.validate(ref, what="reference")
    spec.validate(other, what="other model")
    maps: dict[str, torch.Tensor] = {}
    for name in spec.order:
        n = spec.sizes[name]
        rows_a, rows_b = [], []
        for axis_ref in spec.axes[name]:
            if axis_ref.axis != 0 or axis_ref.param not in ref or axis_ref.param not in other:
                continue  # incoming side only: the tensors whose output axis is this layer
            b = other[axis_ref.param].to(torch.float64)
            for prev, prev_ref in spec.param_axes(axis_ref.param):
                if prev_ref.axis != 0 and prev in maps:
                    moved = b.movedim(prev_ref.axis, 0)
                    shape = moved.shape
                    flat = maps[prev] @ moved.reshape(spec.sizes[prev], -1)
                    b = flat.reshape(shape).movedim(0, prev_ref.axis)
            rows_a.append(unit_view(ref[axis_ref.param].to(torch.float64), axis_ref))
            rows_b.append(unit_view(b, axis_ref))
        a_mat, b_mat = torch.cat(rows_a, dim=1).numpy(), torch.cat(rows_b, dim=1).numpy()
        cost = ot.dist(a_mat, b_mat)
        marg = np.full(n, 1.0 / n)
        if reg > 0:
            plan = ot.sinkhorn(marg, marg, cost / max(cost.max(), 1e-12), reg)
        else:
            plan = ot.emd(marg, marg, cost, numItermax=max(100_000, 50 * n * n))  # the default stops early past ~1k
        maps[name] = torch.as_tensor(plan * n, dtype=torch.float64)
    return maps


def graph_matching(
    spec: PermutationSpec,
    ref: Mapping[str, torch.Tensor],
    other: Mapping[str, torch.Tensor],
    *,
    max_units: int = GRAPH_MAX_UNITS,
    sweeps: int = 3,
) -> Perms:
    """Second-order (QAP) matching per layer with pygmtools RRWM; edges = unit-unit cosine similarity."""
    import pygmtools as pygm

    pygm.set_backend("numpy")
    too_big = {k: n for k, n in spec.sizes.items() if n > max_units}
    if too_big:
        raise ConfigError(f"graph matching builds a dense (n^2 x n^2) affinity; layers {too_big} exceed {max_units}")
    perms = identity_perms(spec)
    for _ in range(sweeps):
        for name in spec.order:
            n = spec.sizes[name]
            c = similarity_matrix(spec, name, ref, other, perms).numpy()
            feats_a, feats_b = [], []
            for axis_ref in spec.axes[name]:
                if axis_ref.param in ref and axis_ref.param in other:
                    feats_a.append(unit_view(ref[axis_ref.param].to(torch.float64), axis_ref))
                    b = _other_axes_permuted(
                        spec, other[axis_ref.param].to(torch.float64), axis_ref.param, axis_ref.axis, perms
                    )
                    feats_b.append(unit_view(b, axis_ref))
            fa = torch.nn.functional.normalize(torch.cat(feats_a, 1), dim=1).numpy()
            fb = torch.nn.functional.normalize(torch.cat(feats_b, 1), dim=1).numpy()
            ga, gb = fa @ fa.T, fb @ fb.T
            node = (c - c.mean()) / (c.std() + 1e-12)
            # K[(i,a),(j,b)] = exp(-|ga_ij - gb_ab|) for i != j, a != b; node terms on the diagonal
            edge = np.exp(-np.abs(ga[:, None, :, None] - gb[None, :, None, :]))
            mask = (1 - np.eye(n))[:, None, :, None] * (1 - np.eye(n))[None, :, None, :]
            k = (edge * mask).reshape(n * n, n * n) / n
            k[np.arange(n * n), np.arange(n * n)] = np.exp(node).reshape(-1)
            # pygmtools flattens (i, a) column-major: index = a * n + i
            k = k.reshape(n, n, n, n).transpose(1, 0, 3, 2).reshape(n * n, n * n)
            soft = pygm.rrwm(k, n, n)
            perms[name] = torch.as_tensor(linear_sum_assignment(soft, maximize=True)[1], dtype=torch.long)
    return perms


def align(
    spec: PermutationSpec,
    ref: Mapping[str, torch.Tensor],
    other: Mapping[str, torch.Tensor],
    *,
    solver: str = "hungarian",
    ref_acts: Mapping[str, torch.Tensor] | None = None,
    other_acts: Mapping[str, torch.Tensor] | None = None,
    act_weight: float = 1.0,
    max_sweeps: int = 100,
    ot_reg: float = 0.0,
    seed: int = 0,
) -> Params:
    """``other``'s tensors aligned to ``ref`` with the chosen solver."""
    from pluribus.fusion.spec import apply_transport

    if solver == "identity":
        return dict(other)
    if solver == "hungarian":
        perms = weight_matching(
            spec, ref, other, ref_acts=ref_acts, other_acts=other_acts, act_weight=act_weight,
            max_sweeps=max_sweeps, seed=seed,
        )
        return apply_perms(spec, other, perms)
    if solver == "graph":
        return apply_perms(spec, other, graph_matching(spec, ref, other))
    if solver == "ot":
        return apply_transport(spec, other, ot_maps(spec, ref, other, reg=ot_reg))
    raise ConfigError(f"unknown solver {solver!r}; choose one of {list(SOLVERS)}")


def average(params_list: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None) -> Params:
    """Weighted average of several aligned state dicts (uniform by default); integer buffers from the first."""
    if weights is None:
        weights = [1.0] * len(params_list)
    total = float(sum(weights))
    out: Params = {}
    for key, first in params_list[0].items():
        if not torch.is_floating_point(first):
            out[key] = first.clone()
            continue
        acc = torch.zeros_like(first, dtype=torch.float64)
        for w, p in zip(weights, params_list, strict=True):
            acc += (w / total) * p[key].to(torch.float64)
        out[key] = acc.to(first.dtype)
    return out


def match_many(
    spec: PermutationSpec,
    params_list: Sequence[Mapping[str, torch.Tensor]],
    *,
    solver: str = "hungarian",
    mode: str = "reference",
    acts_list: Sequence[Mapping[str, torch.Tensor] | None] | None = None,
    act_weight: float = 1.0,
    weights: Sequence[float] | None = None,
    max_sweeps: int = 100,
    rounds: int = 5,
    ot_reg: float = 0.0,
    seed: int = 0,
) -> list[Params]:
    """Align every party to party 0 (``reference``) or iteratively to the mean of the others (``mean``)."""
    if len(params_list) < 1:
        raise ConfigError("match_many needs at least one model")
    if mode not in ("reference", "mean"):
        raise ConfigError(f"unknown multi-model mode {mode!r}; choose 'reference' or 'mean'")
    acts = list(acts_list) if acts_list is not None else [None] * len(params_list)
    ref = params_list[0]
    aligned: list[Params] = [dict(ref)]
    for k in range(1, len(params_list)):
        aligned.append(
            align(spec, ref, params_list[k], solver=solver, ref_acts=acts[0], other_acts=acts[k],
                  act_weight=act_weight, max_sweeps=max_sweeps, ot_reg=ot_reg, seed=seed + k)
        )
    if mode == "mean" and solver in ("hungarian", "graph") and len(params_list) > 2:
        for r in range(rounds):
            changed = False
            for k in range(len(params_list)):
                others = [p for j, p in enumerate(aligned) if j != k]
                target = average(others, [w for j, w in enumerate(weights or [1.0] * len(aligned)) if j != k])
                new = align(spec, target, params_list[k], solver=solver, max_sweeps=max_sweeps,
                            seed=seed + 100 * (r + 1) + k)
                changed = changed or any(not torch.equal(new[key], aligned[k][key]) for key in new)
                aligned[k] = new
            if not changed:
                break
    return aligned

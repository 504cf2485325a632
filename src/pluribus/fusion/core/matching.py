"""Layer-wise neuron matching from (perturbed) weights: Hungarian coordinate descent, OT, graph matching.

All solvers see only the tensors they are given (released, perturbed ones in PrivFusion), and return, for a
party ``other``, permutations (or soft maps for OT) that align its hidden units to a reference.

- ``hungarian``: Git Re-Basin style weight matching. For each permutation, holding the others fixed, the
  best one maximises ``<P, C>`` with ``C = sum over touched axes of A_ref B_other^T`` (the other axes of B
  already permuted), solved by ``scipy.optimize.linear_sum_assignment``; sweeps in random order until no
  permutation changes (at most ``max_sweeps``). Optional activation-statistic similarity is added.
  :class:`WeightMatcher` runs it without rebuilding costs (constant terms once, low-rank updates, skipped
  solves whose cost cannot have changed) and returns what :func:`weight_matching_reference` returns; the
  descent starts from the identity (default) or, with ``start="forward"``, from one input-side pass.
- ``ot``: OTFusion-style one forward pass: per permutation (input side first), align the other model's
  incoming weights with the maps found so far, cost = squared euclidean distance, solve with POT
  (``ot.emd`` exact, or ``ot.sinkhorn`` when ``reg > 0``), map = ``n * T``.
- ``graph``: per permutation, a quadratic assignment with second-order edge affinities (pairs of units
  whose mutual similarity agrees across models), solved with pygmtools RRWM and a Hungarian projection,
  initialised and combined with the first-order term. Dense affinity: only for layers up to 64 units.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from pluribus.errors import ConfigError
from pluribus.fusion.core.spec import (
    AxisRef,
    Params,
    Perms,
    PermutationSpec,
    apply_perms,
    block_index,
    identity_perms,
    unit_view,
)

SOLVERS = ("hungarian", "ot", "graph", "identity")
STARTS = ("identity", "forward")
GRAPH_MAX_UNITS = 64


def max_assignment(c: np.ndarray) -> np.ndarray:
    """Columns of the assignment maximising ``sum_i c[i, p[i]]`` (``linear_sum_assignment``), on a reduced copy.

    Subtracting each row's maximum, then each column's minimum, changes every assignment's total by the
    same constant, so the optimum is the same; scipy's shortest-augmenting-path solver, which starts from zero
    duals, finds it about twice as fast on these dense similarity matrices from the reduced form.
    """
    d = np.subtract(c.max(axis=1, keepdims=True), c)
    d -= d.min(axis=0, keepdims=True)
    return np.asarray(linear_sum_assignment(d)[1])


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


@dataclass
class _AxisTerm:
    """One touched axis of one tensor whose other axes carry other permutations: a cached cost term."""

    ref: AxisRef
    deps: tuple[tuple[str, AxisRef], ...]  # the (perm, axis) pairs on the tensor's other axes
    term: torch.Tensor | None = None
    seen: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # dep perms ``term`` was built with


class WeightMatcher:
    """Re-Basin weight matching against one reference, with the reference-side work done once for all parties.

    The cost of a permutation, ``C_p = sum over touched axes of A_ref B_other^T``, splits into terms over
    tensors no other permutation touches (constant across sweeps: computed once per party) and terms over
    tensors that another permutation ``q`` also touches. Those are cached and, when ``q`` changed in a few
    units ``S`` since, updated by the rank-``|S|`` correction ``A[:, S] (B[:, q_new[S]] - B[:, q_old[S]])^T``
    instead of rebuilt (O(|S| n^2) instead of O(n^3)). A permutation none of whose inputs changed since its
    last solve gets the same cost matrix, hence the same assignment: its solve is skipped. The sweep order,
    the acceptance test and the stopping rule are those of :func:`weight_matching_reference`.
    """

    def __init__(self, spec: PermutationSpec, ref: Mapping[str, torch.Tensor],
                 ref_acts: Mapping[str, torch.Tensor] | None = None, *, dtype: torch.dtype = torch.float64) -> None:
        spec.validate(ref, what="reference")
        self.spec = spec
        self.dtype = dtype
        touched = {r.param for refs in spec.axes.values() for r in refs}
        self.ref64 = {k: ref[k].to(dtype) for k in touched if k in ref}
        self.views = {(r.param, r.axis): unit_view(self.ref64[r.param], r).contiguous()
                      for refs in spec.axes.values() for r in refs if r.param in self.ref64}
        self.ref_acts = ref_acts
        self.stats = {"solves": 0, "skipped": 0, "fresh_terms": 0, "updated_terms": 0, "start_solves": 0}

    def _fresh(self, t: _AxisTerm, other64: Mapping[str, torch.Tensor], perms: Perms) -> torch.Tensor:
        b = _other_axes_permuted(self.spec, other64[t.ref.param], t.ref.param, t.ref.axis, perms)
        self.stats["fresh_terms"] += 1
        return self.views[(t.ref.param, t.ref.axis)] @ unit_view(b, t.ref).T

    def _refresh(self, t: _AxisTerm, other64: Mapping[str, torch.Tensor], perms: Perms) -> bool:
        """Bring ``t.term`` up to the current perms; False when it already was."""
        changed = [] if t.term is None else [
            (q, qref) for q, qref in t.deps if not torch.equal(perms[q], t.seen[(q, qref.axis)])
        ]
        if t.term is not None and not changed:
            return False
        if t.term is not None and len(changed) == 1:
            q, qref = changed[0]
            old, new = t.seen[(q, qref.axis)], perms[q]
            moved = torch.nonzero(old != new).reshape(-1)
            if 4 * moved.numel() < 3 * new.numel():  # a rank-|S| correction costs ~|S|/n of a rebuild
                base = other64[t.ref.param] if len(t.deps) == 1 else _other_axes_permuted(
                    self.spec, other64[t.ref.param], t.ref.param, t.ref.axis, {k: v for k, v in perms.items() if k != q}
                )
                ax = qref.axis
                a_s = unit_view(self.ref64[t.ref.param].index_select(ax, block_index(moved, qref.block)), t.ref)
                b_new = unit_view(base.index_select(ax, block_index(new[moved], qref.block)), t.ref)
                b_old = unit_view(base.index_select(ax, block_index(old[moved], qref.block)), t.ref)
                t.term.addmm_(a_s, (b_new - b_old).T)  # in place: no n x n temporary
                t.seen[(q, ax)] = new.clone()
                self.stats["updated_terms"] += 1
                return True
        t.term = self._fresh(t, other64, perms)
        t.seen = {(q, qref.axis): perms[q].clone() for q, qref in t.deps}
        return True

    @staticmethod
    def _sum(const: torch.Tensor, terms: Sequence[_AxisTerm]) -> torch.Tensor:
        c = const.clone() if const.dtype == torch.float64 else const.to(torch.float64)
        for t in terms:
            assert t.term is not None
            c += t.term
        return c

    def cost(self, name: str, perms: Perms) -> torch.Tensor:
        """The weight cost of ``name`` for the last matched model under ``perms``, from the cached terms."""
        if not hasattr(self, "_last"):
            raise ConfigError("WeightMatcher.cost needs a match() first")
        other64, const, terms = self._last
        for t in terms[name]:
            self._refresh(t, other64, perms)
        return self._sum(const[name], terms[name])

    def match(
        self,
        other: Mapping[str, torch.Tensor],
        *,
        other_acts: Mapping[str, torch.Tensor] | None = None,
        act_weight: float = 1.0,
        max_sweeps: int = 100,
        seed: int = 0,
        init: Mapping[str, torch.Tensor] | None = None,
        start: str = "identity",
        tol: float = 0.0,
    ) -> Perms:
        """Permutations of ``other``'s units that best align it to the reference (coordinate descent).

        A solve's new permutation is accepted only if it raises that permutation's objective by more than
        ``max(1e-9 * sum|C|, tol * |current objective|)``; the descent stops after a sweep with no change.
        """
        if not (0.0 <= tol < 1.0):
            raise ConfigError(f"matching tolerance must lie in [0, 1), got {tol}")
        spec = self.spec
        spec.validate(other, what="other model")
        if start not in STARTS:
            raise ConfigError(f"unknown matching start {start!r}; choose one of {list(STARTS)}")
        perms = {k: v.clone() for k, v in (init or identity_perms(spec)).items()}
        other64 = {k: other[k].to(self.dtype) for k in self.ref64 if k in other}
        const: dict[str, torch.Tensor] = {}
        terms: dict[str, list[_AxisTerm]] = {}
        for name, refs in spec.axes.items():
            n = spec.sizes[name]
            const[name] = torch.zeros(n, n, dtype=self.dtype)
            terms[name] = []
            for r in refs:
                if r.param not in self.ref64 or r.param not in other64:
                    continue
                deps = tuple((q, qref) for q, qref in spec.param_axes(r.param) if qref.axis != r.axis and q in perms)
                if deps:
                    terms[name].append(_AxisTerm(r, deps))
                else:
                    const[name] += self.views[(r.param, r.axis)] @ unit_view(other64[r.param], r).T
        self._last = (other64, const, terms)
        extra: dict[str, torch.Tensor] = {}
        if self.ref_acts is not None and other_acts is not None and act_weight > 0:
            for name in spec.sizes:
                if name in self.ref_acts and name in other_acts:
                    extra[name] = activation_similarity(self.ref_acts[name], other_acts[name])
        scales: dict[str, torch.Tensor] = {}
        solved: set[str] = set()
        if start == "forward" and init is None:
            # one pass from the input side: each perm from the terms whose other perms are already placed
            placed: set[str] = set()
            for name in spec.order:
                c = const[name].to(torch.float64, copy=True)
                complete = True
                for t in terms[name]:
                    if all(q in placed for q, _ in t.deps):
                        self._refresh(t, other64, perms)
                        assert t.term is not None
                        c += t.term
                    else:
                        complete = False
                if name in extra:
                    scale = act_weight * _scaled(extra[name], c)
                    if complete:
                        scales[name] = scale
                    c += scale
                perms[name] = torch.from_numpy(max_assignment(c.numpy()).astype(np.int64, copy=False))
                placed.add(name)
                if complete:  # its cost held every term: the descent's first solve of it would repeat this one
                    solved.add(name)
                self.stats["start_solves"] += 1
        rows_of = {name: torch.arange(n) for name, n in spec.sizes.items()}
        rng = np.random.default_rng(seed)
        names = list(spec.order)
        for _ in range(max_sweeps):
            changed = False
            for idx in rng.permutation(len(names)):
                name = names[idx]
                fresh_inputs = [self._refresh(t, other64, perms) for t in terms[name]]
                if name in solved and not any(fresh_inputs):
                    self.stats["skipped"] += 1  # same cost matrix as at its last solve: same assignment
                    continue
                solved.add(name)
                c = self._sum(const[name], terms[name])
                if name in extra:
                    if name not in scales:
                        scales[name] = act_weight * _scaled(extra[name], c)
                    c = c + scales[name]
                self.stats["solves"] += 1
                new = torch.from_numpy(max_assignment(c.numpy()).astype(np.int64, copy=False))
                if torch.equal(new, perms[name]):
                    continue  # zero gain: the reference's acceptance test below would refuse it
                rows = rows_of[name]
                current = float(c[rows, perms[name]].sum())
                if float(c[rows, new].sum()) > current + max(1e-9 * float(torch.linalg.vector_norm(c, 1)),
                                                             tol * abs(current)):
                    perms[name] = new
                    changed = True
            if not changed:
                break
        return perms


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
    start: str = "identity",
    tol: float = 0.0,
) -> Perms:
    """Re-Basin coordinate descent: permutations of ``other``'s units that best align it to ``ref``.

    ``start="identity"`` with ``tol=0`` (the defaults here) is the original method; ``"forward"`` first places
    every permutation in one pass from the input side (OTFusion's order, with assignments), then runs the same
    descent from there. ``tol`` > 0 accepts a new permutation only when it raises that permutation's objective
    by more than ``tol`` of its current value. The fusion pipeline's defaults (``FusionConfig``) are
    ``start="forward"``, ``tol=1e-2``.

    Args:
        spec: the permutation spec.
        ref: the reference model's tensors.
        other: the tensors to align.
        ref_acts: the reference's activation statistics per permutation, or None.
        other_acts: the other's activation statistics, or None.
        act_weight: the weight of the activation term.
        max_sweeps: the most descent sweeps.
        seed: the seed of the sweep order.
        init: starting permutations, or None.
        start: ``identity`` or ``forward``.
        tol: the relative gain a change must bring.

    Raises:
        ConfigError: an unknown ``start`` or ``tol`` outside [0, 1).
    """
    return WeightMatcher(spec, ref, ref_acts).match(
        other, other_acts=other_acts, act_weight=act_weight, max_sweeps=max_sweeps, seed=seed, init=init,
        start=start, tol=tol,
    )


def weight_matching_reference(
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
    tol: float = 0.0,
) -> Perms:
    """The plain definition of :func:`weight_matching` (every cost from scratch): the oracle its fast path is pinned to."""
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
            current = float(c[rows, perms[name]].sum())
            if float(c[rows, new].sum()) > current + max(1e-9 * float(c.abs().sum()), tol * abs(current)):
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
    start: str = "identity",
    tol: float = 0.0,
) -> Params:
    """``other``'s tensors aligned to ``ref`` with the chosen solver.

    Args:
        spec: the permutation spec.
        ref: the reference model's tensors.
        other: the tensors to align.
        solver: ``hungarian`` (weight matching), ``ot``, ``graph`` or ``identity``.
        ref_acts: the reference's activation statistics, or None.
        other_acts: the other's activation statistics, or None.
        act_weight: the weight of the activation term.
        max_sweeps: the most descent sweeps (``hungarian``).
        ot_reg: the entropic regularisation (``ot``; 0 = exact).
        seed: the seed of the sweep order.
        start: ``identity`` or ``forward`` (``hungarian``).
        tol: the relative gain a change must bring (``hungarian``).

    Raises:
        ConfigError: an unknown solver or start, or layers too wide for graph matching.
    """
    from pluribus.fusion.core.spec import apply_transport

    if solver == "identity":
        return dict(other)
    if solver == "hungarian":
        perms = weight_matching(
            spec, ref, other, ref_acts=ref_acts, other_acts=other_acts, act_weight=act_weight,
            max_sweeps=max_sweeps, seed=seed, start=start, tol=tol,
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
    start: str = "identity",
    tol: float = 0.0,
) -> list[Params]:
    """Align every party to party 0 (``reference``) or iteratively to the mean of the others (``mean``).

    Args:
        spec: the permutation spec.
        params_list: every party's tensors; party 0 is the reference.
        solver: see :func:`align`.
        mode: ``reference`` or ``mean``.
        acts_list: each party's activation statistics, or None.
        act_weight: the weight of the activation term.
        weights: the parties' weights in the mean (``mean`` mode), or None for equal.
        max_sweeps: the most descent sweeps.
        rounds: the rounds of ``mean`` mode.
        ot_reg: the entropic regularisation (``ot``).
        seed: the seed of the sweep orders.
        start: ``identity`` or ``forward``.
        tol: the relative gain a change must bring.

    Raises:
        ConfigError: no models, or an unknown mode or solver.
    """
    if len(params_list) < 1:
        raise ConfigError("match_many needs at least one model")
    if mode not in ("reference", "mean"):
        raise ConfigError(f"unknown multi-model mode {mode!r}; choose 'reference' or 'mean'")
    acts = list(acts_list) if acts_list is not None else [None] * len(params_list)
    ref = params_list[0]
    aligned: list[Params] = [dict(ref)]
    # one matcher for every party: the reference side (float64 copies, unit views) is prepared once
    matcher = WeightMatcher(spec, ref, acts[0]) if solver == "hungarian" and len(params_list) > 1 else None
    for k in range(1, len(params_list)):
        if matcher is not None:
            perms = matcher.match(params_list[k], other_acts=acts[k], act_weight=act_weight,
                                  max_sweeps=max_sweeps, seed=seed + k, start=start, tol=tol)
            aligned.append(apply_perms(spec, params_list[k], perms))
            continue
        aligned.append(
            align(spec, ref, params_list[k], solver=solver, ref_acts=acts[0], other_acts=acts[k],
                  act_weight=act_weight, max_sweeps=max_sweeps, ot_reg=ot_reg, seed=seed + k, start=start, tol=tol)
        )
    if mode == "mean" and solver in ("hungarian", "graph") and len(params_list) > 2:
        for r in range(rounds):
            changed = False
            for k in range(len(params_list)):
                others = [p for j, p in enumerate(aligned) if j != k]
                target = average(others, [w for j, w in enumerate(weights or [1.0] * len(aligned)) if j != k])
                new = align(spec, target, params_list[k], solver=solver, max_sweeps=max_sweeps,
                            seed=seed + 100 * (r + 1) + k, start=start, tol=tol)
                changed = changed or any(not torch.equal(new[key], aligned[k][key]) for key in new)
                aligned[k] = new
            if not changed:
                break
    return aligned

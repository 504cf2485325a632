"""Multi-view residual-quantised VAE (U2QT stage 2), pure PyTorch, no I/O.

Tensors are source-major: inputs ``x`` are ``[S, B, D]`` (S sources, B users, inputs zero-padded to
the widest source D), ``present`` is ``[S, B]`` bool (a user lacks that source where False), latents
are ``[S, B, d]`` and codes ``[S, B, L]``.

Every level ``l`` keeps one flat table of code vectors, ``codebooks[l]`` of shape ``[N_l, d]``, and a
map ``allowed[l]`` of shape ``[S, K_l]`` from a source's local code (what is emitted) to a table row.
The layouts differ only in these maps:

- ``stacked`` shared level: ``N = K_s`` and every source maps code ``k`` to row ``k``;
- ``stacked`` specific level: ``N = S * K_u`` and source ``s`` owns rows ``s*K_u .. (s+1)*K_u - 1``;
- ``union`` level: ``N = K_s + S*K_u``; source ``s`` chooses among the shared rows and its own rows.

So one vectorised loop (one batched distance matmul per level for all sources) serves both layouts,
and EMA updates, usage counts and dead-code respawn work on table rows whatever the layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pluribus.tokenizer.config import TokenizerConfig


@dataclass(frozen=True)
class CodeGroup:
    """A set of table rows that compete for the same sources (the shared codes, or one source's own)."""

    name: str  # "shared" or the source index as "source:<s>"
    rows: tuple[int, int]  # [start, stop) in the level's table
    sources: tuple[int, ...]


@dataclass(frozen=True)
class LevelSpec:
    """One quantisation level: its table size, per-source code count and competing groups."""

    index: int
    kind: str  # "shared", "specific" or "union"
    table_rows: int
    codes_per_source: int
    groups: tuple[CodeGroup, ...]


def level_specs(config: TokenizerConfig, n_sources: int) -> list[LevelSpec]:
    """The levels a config describes for ``n_sources`` sources."""
    ks, ku, s_all = config.shared_size, config.specific_size, tuple(range(n_sources))
    specs = []
    for lvl in range(config.n_levels):
        if config.layout == "union":
            groups = (CodeGroup("shared", (0, ks), s_all),) + tuple(
                CodeGroup(f"source:{s}", (ks + s * ku, ks + (s + 1) * ku), (s,)) for s in s_all
            )
            specs.append(LevelSpec(lvl, "union", ks + n_sources * ku, ks + ku, groups))
        elif lvl < config.n_shared:
            specs.append(LevelSpec(lvl, "shared", ks, ks, (CodeGroup("shared", (0, ks), s_all),)))
        else:
            groups = tuple(CodeGroup(f"source:{s}", (s * ku, (s + 1) * ku), (s,)) for s in s_all)
            specs.append(LevelSpec(lvl, "specific", n_sources * ku, ku, groups))
    return specs


def _allowed_rows(spec: LevelSpec, n_sources: int) -> Tensor:
    rows = torch.empty(n_sources, spec.codes_per_source, dtype=torch.long)
    for s in range(n_sources):
        owned = [torch.arange(*g.rows) for g in spec.groups if s in g.sources]
        rows[s] = torch.cat(owned)
    return rows


class PerSourceMLP(nn.Module):
    """S independent MLPs (Linear, LayerNorm, LeakyReLU, dropout per hidden layer) run as one batched matmul."""

    def __init__(self, n_sources: int, widths: list[int], *, dropout: float = 0.0) -> None:
        super().__init__()
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.norm_weights = nn.ParameterList()
        self.norm_biases = nn.ParameterList()
        for d_in, d_out in zip(widths[:-1], widths[1:], strict=True):
            w = torch.empty(n_sources, d_in, d_out)
            bound = math.sqrt(6.0 / (d_in + d_out))  # xavier-uniform, as the official encoders
            nn.init.uniform_(w, -bound, bound)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.zeros(n_sources, 1, d_out)))
        for d_out in widths[1:-1]:
            self.norm_weights.append(nn.Parameter(torch.ones(n_sources, 1, d_out)))
            self.norm_biases.append(nn.Parameter(torch.zeros(n_sources, 1, d_out)))
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        """Map ``[S, B, widths[0]]`` to ``[S, B, widths[-1]]``."""
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            x = torch.baddbmm(b, x, w)
            if i < last:
                x = F.layer_norm(x, x.shape[-1:]) * self.norm_weights[i] + self.norm_biases[i]
                x = F.leaky_relu(x, 0.01)
                if self.dropout > 0:
                    x = F.dropout(x, self.dropout, self.training)
        return x


@dataclass
class QuantizerOutput:
    """What one pass through the residual quantiser gives."""

    codes: Tensor  # [S, B, L] long (local codes per source)
    quantized: Tensor  # [S, B, d], sum of chosen code vectors (detached: gradients go through the losses)
    loss: Tensor  # scalar: codebook + beta * commitment, summed over levels
    residuals: list[Tensor] = field(default_factory=list)  # L tensors [S, B, d], detached, r^l before level l


def pairwise_sq_dist(r: Tensor, table: Tensor) -> Tensor:
    """Squared distances between ``r [..., B, d]`` and ``table [..., K, d]`` via one matmul."""
    r_sq = (r * r).sum(-1, keepdim=True)
    t_sq = (table * table).sum(-1)
    if table.dim() == 2:
        return (r_sq - 2.0 * r @ table.T + t_sq).clamp_min_(0.0)
    return torch.baddbmm(r_sq + t_sq.unsqueeze(1), r, table.transpose(1, 2), alpha=-2.0).clamp_min_(0.0)


_ARGMIN_GROUP = 32


def argmin_last(scores: Tensor) -> Tensor:
    """``scores.argmin(-1)``, exactly (first index on ties), in two stages on the CPU.

    torch's CPU argmin over a short last dimension is slow (two thirds of the score matmul's time at K=256),
    while ``amin`` is vectorised and ~9x faster (benchmarks/tokenizer/nearest_profile.py). So: the minimum of each group of 32 scores (vectorised), the argmin
    over the K/32 group minima, then the argmin inside the winning group. The first group holding the minimum
    and the first index inside it is the first index overall, so ties resolve as in ``argmin``.
    """
    k = scores.shape[-1]
    if scores.device.type != "cpu" or k % _ARGMIN_GROUP or k < 4 * _ARGMIN_GROUP:
        return scores.argmin(-1)
    groups = k // _ARGMIN_GROUP
    flat = scores.reshape(-1, groups, _ARGMIN_GROUP)
    group = flat.amin(-1).argmin(-1)  # [n]
    winners = torch.arange(flat.shape[0], device=flat.device) * groups + group  # row of each winning group
    inside = flat.reshape(-1, _ARGMIN_GROUP).index_select(0, winners).argmin(-1)  # [n]
    return (group * _ARGMIN_GROUP + inside).reshape(scores.shape[:-1])


def nearest_code(r: Tensor, table: Tensor) -> Tensor:
    """Index of the nearest row of ``table`` for each row of ``r``: argmin of ``||t||^2 - 2 r.t`` (one fused matmul)."""
    t_sq = (table * table).sum(-1)
    if table.dim() == 2:
        flat = r.reshape(-1, r.shape[-1])
        return argmin_last(torch.addmm(t_sq, flat, table.T, alpha=-2.0)).reshape(r.shape[:-1])
    return argmin_last(torch.baddbmm(t_sq.unsqueeze(1), r, table.transpose(1, 2), alpha=-2.0))


def sinkhorn_codes(dist: Tensor, *, epsilon: float, iters: int) -> Tensor:
    """Balanced assignment (LC-Rec style): argmax of the Sinkhorn plan of ``exp(-dist/eps)`` for ``dist [B, K]``."""
    d = dist.double()
    spread = (d.max() - d.min()).clamp_min(1e-12)
    log_q = -(d - d.mean()) / spread / epsilon  # centre and scale so epsilon is relative
    n, k = log_q.shape
    for _ in range(iters):
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - math.log(k)  # each code gets 1/K
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - math.log(n)  # each row gets 1/B
    return log_q.argmax(dim=1)


def kmeans(x: Tensor, k: int, *, iters: int, generator: torch.Generator) -> Tensor:
    """k-means with k-means++ seeding (empty clusters re-drawn) on rows of ``x [N, d]``; returns ``[k, d]``."""
    n = x.shape[0]
    if n == 0:
        return torch.randn(k, x.shape[1], generator=generator, dtype=x.dtype)
    if n < k:  # too few points: repeat them with a little noise so every code starts distinct
        idx = torch.randint(0, n, (k,), generator=generator)
        noise = torch.randn(k, x.shape[1], generator=generator, dtype=x.dtype) * (x.std() * 0.01 + 1e-6)
        return x[idx] + noise
    centres = _kmeans_pp(x, k, generator)
    return lloyd_steps(x, centres, iters=iters, assign=argmin_last, generator=generator)


def lloyd_steps(x: Tensor, centres: Tensor, *, iters: int, assign: Callable[[Tensor], Tensor],
                generator: torch.Generator) -> Tensor:
    """``iters`` Lloyd iterations from ``centres [k, d]`` on rows ``x [n, d]`` (n >= 1): ``assign`` maps the
    squared distances ``[n, k]`` to a code per row; empty codes are re-drawn from the rows."""
    n, k = x.shape[0], centres.shape[0]
    for _ in range(iters):
        codes = assign(pairwise_sq_dist(x, centres))
        counts = torch.bincount(codes, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centres).index_add_(0, codes, x)
        empty = counts == 0
        centres = torch.where(empty[:, None], centres, sums / counts.clamp_min(1)[:, None])
        if empty.any():
            centres[empty] = x[torch.randint(0, n, (int(empty.sum()),), generator=generator)]
    return centres


def _kmeans_pp(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    n = x.shape[0]
    chosen = [int(torch.randint(0, n, (1,), generator=generator))]
    closest = pairwise_sq_dist(x, x[chosen[0]][None]).squeeze(1)
    for _ in range(1, k):
        total = closest.sum()
        if total <= 0:  # every point coincides with a centre: pick uniformly
            nxt = int(torch.randint(0, n, (1,), generator=generator))
        else:
            nxt = int(torch.multinomial(closest / total, 1, generator=generator))
        chosen.append(nxt)
        closest = torch.minimum(closest, pairwise_sq_dist(x, x[nxt][None]).squeeze(1))
    return x[chosen].clone()


def rotate_to(z: Tensor, q: Tensor) -> Tensor:
    """Rotation trick (Fifty et al. 2024): equals ``q`` forward, passes ``z``'s gradient through a rotation."""
    eps = 1e-8
    z_norm = z.norm(dim=-1, keepdim=True).clamp_min(eps)
    q_norm = q.norm(dim=-1, keepdim=True).clamp_min(eps)
    z_hat, q_hat = (z / z_norm).detach(), (q / q_norm).detach()
    r = F.normalize(z_hat + q_hat, dim=-1, eps=eps).detach()
    scale = (q_norm / z_norm).detach()
    rotated = z - 2.0 * r * (r * z).sum(-1, keepdim=True) + 2.0 * q_hat * (z_hat * z).sum(-1, keepdim=True)
    return scale * rotated


class MultiViewQuantizer(nn.Module):
    """Residual quantiser over shared and source-specific codebooks (see the module docstring)."""

    def __init__(self, config: TokenizerConfig, n_sources: int) -> None:
        super().__init__()
        self.config = config
        self.n_sources = n_sources
        self.levels = level_specs(config, n_sources)
        learnable = config.codebook_update == "loss"
        self.codebooks = nn.ParameterList(
            nn.Parameter(torch.randn(spec.table_rows, config.latent_dim), requires_grad=learnable)
            for spec in self.levels
        )
        for spec in self.levels:
            self.register_buffer(f"allowed_{spec.index}", _allowed_rows(spec, n_sources), persistent=False)
            self.register_buffer(f"usage_{spec.index}", torch.zeros(spec.table_rows), persistent=False)
            if not learnable:  # count 1 and sum = the initial vector, so unused codes keep their place
                self.register_buffer(f"ema_count_{spec.index}", torch.ones(spec.table_rows))
                self.register_buffer(f"ema_sum_{spec.index}", self.codebooks[spec.index].detach().clone())

    def allowed(self, level: int) -> Tensor:
        """``[S, K_l]`` map from local code to table row at ``level``."""
        return getattr(self, f"allowed_{level}")

    def usage(self, level: int) -> Tensor:
        """Assignment counts per table row since the last ``reset_usage``."""
        return getattr(self, f"usage_{level}")

    def reset_usage(self) -> None:
        """Zero the assignment counters."""
        for spec in self.levels:
            self.usage(spec.index).zero_()

    def candidates(self, level: int) -> Tensor:
        """Code vectors each source may choose at ``level``: ``[K, d]`` if all share them, else ``[S, K, d]``."""
        table = self.codebooks[level]
        if self.levels[level].kind == "shared":
            return table
        return table[self.allowed(level)]

    def forward(
        self, z: Tensor, present: Tensor, *, sinkhorn: bool = False, keep_residuals: bool = False
    ) -> QuantizerOutput:
        """Quantise latents ``z [S, B, d]``; ``present [S, B]`` masks users lacking a source out of losses and counts."""
        cfg = self.config
        with_loss = self.training or torch.is_grad_enabled()  # pure encoding skips the loss terms
        weight = present.to(z.dtype)
        n_present = weight.sum().clamp_min(1.0)
        r = z
        loss = z.new_zeros(())
        codes = []
        residuals = []
        for spec in self.levels:
            lvl = spec.index
            if keep_residuals:
                residuals.append(r.detach())
            cand = self.candidates(lvl)
            r_detached = r.detach()
            if sinkhorn and lvl == len(self.levels) - 1:
                code = self._sinkhorn(pairwise_sq_dist(r_detached, cand), present)
            else:
                code = nearest_code(r_detached, cand)  # [S, B]
            rows = code if spec.kind == "shared" else self.allowed(lvl).gather(1, code)  # [S, B] table rows
            e = self.codebooks[lvl].index_select(0, rows.reshape(-1)).view(*rows.shape, -1)  # [S, B, d]
            if self.training:
                self._count(lvl, rows, present)
                if cfg.codebook_update == "ema":
                    self._ema_update(lvl, rows, r_detached, present)
                    e = self.codebooks[lvl][rows]
            if with_loss:
                beta = cfg.first_level_beta if (lvl == 0 and cfg.first_level_beta is not None) else cfg.beta
                loss = loss + beta * (((r - e.detach()) ** 2).mean(-1) * weight).sum() / n_present
                if cfg.codebook_update == "loss":
                    loss = loss + (((r_detached - e) ** 2).mean(-1) * weight).sum() / n_present
            r = r - e.detach()
            codes.append(code)
        quantized = z.detach() - r.detach()  # = sum of the chosen code vectors, without L extra adds
        return QuantizerOutput(torch.stack(codes, -1), quantized, loss, residuals)

    def _sinkhorn(self, dist: Tensor, present: Tensor) -> Tensor:
        code = dist.argmin(-1)
        cfg = self.config
        if self.levels[-1].kind == "shared":  # one pool across sources
            flat_present = present.reshape(-1)
            flat = dist.reshape(-1, dist.shape[-1])[flat_present]
            if flat.shape[0] > 0:
                out = code.reshape(-1).clone()
                out[flat_present] = sinkhorn_codes(flat, epsilon=cfg.sinkhorn_epsilon, iters=cfg.sinkhorn_iters)
                code = out.reshape(code.shape)
            return code
        for s in range(dist.shape[0]):
            keep = present[s]
            if keep.any():
                code[s, keep] = sinkhorn_codes(dist[s, keep], epsilon=cfg.sinkhorn_epsilon, iters=cfg.sinkhorn_iters)
        return code

    @torch.no_grad()
    def _count(self, lvl: int, rows: Tensor, present: Tensor) -> None:
        self.usage(lvl).index_add_(0, rows[present], torch.ones(int(present.sum()), device=rows.device))

    @torch.no_grad()
    def _ema_update(self, lvl: int, rows: Tensor, r: Tensor, present: Tensor) -> None:
        decay = self.config.ema_decay
        count: Tensor = getattr(self, f"ema_count_{lvl}")
        total: Tensor = getattr(self, f"ema_sum_{lvl}")
        sel = rows[present]
        batch_count = torch.bincount(sel, minlength=count.shape[0]).to(count.dtype)
        batch_sum = torch.zeros_like(total).index_add_(0, sel, r[present])
        count.mul_(decay).add_(batch_count, alpha=1 - decay)
        total.mul_(decay).add_(batch_sum, alpha=1 - decay)
        n = count.sum()
        smoothed = (count + 1e-5) / (n + count.shape[0] * 1e-5) * n  # Laplace smoothing keeps rare codes finite
        self.codebooks[lvl].data.copy_(total / smoothed[:, None])

    def lookup(self, codes: Tensor) -> Tensor:
        """Sum of code vectors for local ``codes [S, B, L]`` (valid codes only) -> ``[S, B, d]``."""
        out = torch.zeros(*codes.shape[:2], self.config.latent_dim, device=codes.device)
        for spec in self.levels:
            rows = self.allowed(spec.index).gather(1, codes[..., spec.index])
            out = out + self.codebooks[spec.index][rows]
        return out

    @torch.no_grad()
    def init_kmeans(self, z: Tensor, present: Tensor, *, iters: int, generator: torch.Generator) -> None:
        """Initialise every level by k-means on the residuals it will see (groups fitted on their own sources)."""
        r = z.detach().clone()
        for spec in self.levels:
            table = self.codebooks[spec.index]
            for group in spec.groups:
                pool = torch.cat([r[s][present[s]] for s in group.sources])
                start, stop = group.rows
                table.data[start:stop] = kmeans(pool, stop - start, iters=iters, generator=generator)
            if self.config.codebook_update == "ema":
                getattr(self, f"ema_sum_{spec.index}").copy_(table.data)
                getattr(self, f"ema_count_{spec.index}").fill_(1.0)
            code = argmin_last(pairwise_sq_dist(r, self.candidates(spec.index)))
            rows = self.allowed(spec.index).gather(1, code)
            r = r - table.data[rows]

    @torch.no_grad()
    def respawn_dead(self, residuals: list[Tensor], present: Tensor, *, generator: torch.Generator) -> dict[int, int]:
        """Re-draw codes used less than ``respawn_threshold`` x their group's mean from that level's residuals."""
        cfg = self.config
        if cfg.respawn_levels == "none":
            return {}
        levels = self.levels[:1] if cfg.respawn_levels == "first" else self.levels
        replaced: dict[int, int] = {}
        for spec in levels:
            usage = self.usage(spec.index)
            table = self.codebooks[spec.index]
            r = residuals[spec.index]
            n_dead = 0
            for group in spec.groups:
                start, stop = group.rows
                counts = usage[start:stop]
                dead = counts < cfg.respawn_threshold * counts.mean()
                if not dead.any():
                    continue
                pool = torch.cat([r[s][present[s]] for s in group.sources])
                if pool.shape[0] == 0:
                    continue
                idx = torch.randint(0, pool.shape[0], (int(dead.sum()),), generator=generator)
                rows = torch.arange(start, stop, device=usage.device)[dead]
                table.data[rows] = pool[idx]
                if cfg.codebook_update == "ema":
                    getattr(self, f"ema_sum_{spec.index}")[rows] = pool[idx]
                    getattr(self, f"ema_count_{spec.index}")[rows] = 1.0
                n_dead += int(dead.sum())
            replaced[spec.index] = n_dead
        return replaced


@dataclass
class RQVAEOutput:
    """Forward pass of the whole model."""

    latent: Tensor  # [S, B, d] pre-quantisation
    codes: Tensor  # [S, B, L]
    recon: Tensor  # [S, B, D] in standardised input space
    recon_loss: Tensor
    vq_loss: Tensor
    residuals: list[Tensor]

    @property
    def loss(self) -> Tensor:
        """Total training loss."""
        return self.recon_loss + self.vq_loss


class MultiViewRQVAE(nn.Module):
    """Per-source encoders -> multi-view residual quantiser -> per-source decoders."""

    input_mean: Tensor
    input_scale: Tensor
    dim_mask: Tensor

    def __init__(self, config: TokenizerConfig, in_dims: list[int]) -> None:
        super().__init__()
        self.config = config
        self.in_dims = list(in_dims)
        n_sources, width = len(in_dims), max(in_dims)
        self.encoder = PerSourceMLP(
            n_sources, [width, *config.hidden_dims, config.latent_dim], dropout=config.dropout
        )
        self.decoder = PerSourceMLP(
            n_sources, [config.latent_dim, *reversed(config.hidden_dims), width], dropout=config.dropout
        )
        self.quantizer = MultiViewQuantizer(config, n_sources)
        dim_mask = torch.zeros(n_sources, width)
        for s, d in enumerate(in_dims):
            dim_mask[s, :d] = 1.0
        self.register_buffer("dim_mask", dim_mask, persistent=False)
        self.register_buffer("input_mean", torch.zeros(n_sources, width))
        self.register_buffer("input_scale", torch.ones(n_sources, width))

    @property
    def n_sources(self) -> int:
        """Number of sources."""
        return len(self.in_dims)

    @torch.no_grad()
    def fit_standardizer(self, x: Tensor, present: Tensor) -> None:
        """Set per-source centring and scaling from present rows of raw ``x [S, B, D]`` (see ``standardize``)."""
        mode = self.config.standardize
        if mode == "none":
            return
        for s, d in enumerate(self.in_dims):
            rows = x[s][present[s], :d]
            if rows.shape[0] == 0:
                continue
            std = rows.std(0, unbiased=False) if rows.shape[0] > 1 else torch.ones(d)
            per_dim = mode == "dim" or (mode == "auto" and d <= 32)
            scale = torch.where(std > 1e-6, std, torch.ones_like(std)) if per_dim else std.mean().clamp_min(1e-6).expand(d)
            self.input_mean[s, :d] = rows.mean(0)
            self.input_scale[s, :d] = scale

    def standardize(self, x: Tensor) -> Tensor:
        """Raw inputs -> model space."""
        return (x - self.input_mean[:, None, :]) / self.input_scale[:, None, :] * self.dim_mask[:, None, :]

    def unstandardize(self, y: Tensor) -> Tensor:
        """Model space -> raw inputs (padding dims stay zero)."""
        return (y * self.input_scale[:, None, :] + self.input_mean[:, None, :]) * self.dim_mask[:, None, :]

    def encode_latent(self, x: Tensor) -> Tensor:
        """Raw ``x [S, B, D]`` -> pre-quantisation latents ``[S, B, d]``."""
        return self.encoder(self.standardize(x))

    def forward(
        self, x: Tensor, present: Tensor, *, sinkhorn: bool = False, keep_residuals: bool = False
    ) -> RQVAEOutput:
        """Encode, quantise (with straight-through or rotation gradients), decode, and compute the losses."""
        cfg = self.config
        target = self.standardize(x)
        z = self.encoder(target)
        q = self.quantizer(z, present, sinkhorn=sinkhorn, keep_residuals=keep_residuals)
        if cfg.gradient == "rotation":
            z_q = rotate_to(z, q.quantized.detach())
        else:
            z_q = z + (q.quantized - z).detach()
        recon = self.decoder(z_q)
        sq = (recon - target) ** 2 * self.dim_mask[:, None, :]
        per_row = sq.sum(-1)
        if cfg.recon_reduction == "mean":
            per_row = per_row / torch.tensor(self.in_dims, dtype=sq.dtype, device=sq.device)[:, None]
        weight = present.to(sq.dtype)
        recon_loss = (per_row * weight).sum() / weight.sum().clamp_min(1.0)
        return RQVAEOutput(z, q.codes, recon, recon_loss, q.loss, q.residuals)

    @torch.no_grad()
    def decode_codes(self, codes: Tensor) -> Tensor:
        """Local codes ``[S, B, L]`` -> reconstructed raw inputs ``[S, B, D]``."""
        return self.unstandardize(self.decoder(self.quantizer.lookup(codes)))

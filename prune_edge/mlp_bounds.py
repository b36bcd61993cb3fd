"""Dual bounds over the linear regions of an MLP, computed through its shared weights.

Every region of an MLP gated from hidden layer k on has the SAME weights; only the ReLU masks differ.
With the masks m_i = (s_i > 0) of a region (gated layers numbered 0..G-1 from layer k), its gated
pre-activations and logits are affine in h (the input of layer k) with Jacobians

    J_0 = W_0,   J_i = W_i diag(m_{i-1}) J_{i-1},   J_f = W_out diag(m_{G-1}) J_{G-1},

so the two products of a dual step, J u and J^T nu, for every (region, objective) pair at once are a
chain of ordinary matrix products with the shared W_i and an elementwise mask in between. That reads
the weights (0.8 MB for the default MLP) instead of each region's (M, D) matrix (2.4 MB per region in
float64) and turns memory-bound batched products into dense GEMMs. The schedule and the float64
certificate are those of :mod:`prune_edge.bounds`; only how the products are computed differs.

Conv bases keep the generic path (:func:`prune_edge.bounds.dual_lower_bounds` on materialised rows).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from . import bounds as gen
from .models.nets import PreactNet

# Row norms of the deeper gated layers (per region) are estimated in float32 through the Gram matrix of
# the first gated layer (they only precondition the ascent); a row whose estimate is small against its
# region's largest, or not certainly within EST_REL, is recomputed directly in float64, so the
# negligible-row rule (bounds.NEGLIGIBLE, 1e-9) decides on float64 norms as the generic path does.
EST_SMALL = 1e-8  # squared norm below 1e-8 of the region's largest (|row| < 1e-4 of it): recomputed
EST_REL = 1e-2
# sum_j |A_ij| mag_j is computed as a chain of non-negative products (relative rounding < 1e-12):
# inflated by this factor it is an upper bound.
ABS_INFLATE = 1 + 1e-9
# The ascent skips LP variables that no constraint sees (see _scaled); False: it works on all of them.
SKIP_UNSEEN = True


def is_mlp(net: PreactNet) -> bool:
    """True when every layer is Linear: its regions then have the factored form used here."""
    return all(isinstance(layer, torch.nn.Linear) for layer in net.layers)


def forward_chain(weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], u: torch.Tensor) -> torch.Tensor:
    """[J_0 u, ..., J_{len(weights)-1} u] concatenated along the last axis, for u (B, K, D).

    ``masks[i]`` (B, 1, n_i) is the ReLU mask after layer i; pass ``weights`` with the logits layer
    appended to get J_f u as the last block too."""
    y = u @ weights[0].T
    outs = [y]
    for w, m in zip(weights[1:], masks):
        y = (y * m) @ w.T
        outs.append(y)
    return torch.cat(outs, dim=2) if len(outs) > 1 else y


def backward_chain(weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], nus: Sequence[torch.Tensor | None],
                   c: torch.Tensor | None = None) -> torch.Tensor:
    """c + sum_i J_i^T nu_i for ``nus[i]`` (B, K, n_i) (None: a zero block; the last must be given):
    one product per layer, from the last back to the first (the transpose of :func:`forward_chain`)."""
    t = nus[-1]
    for i in range(len(weights) - 1, 0, -1):
        t = (t @ weights[i]) * masks[i - 1]
        if nus[i - 1] is not None:
            t = t + nus[i - 1]
    if c is None:
        return t @ weights[0]
    return torch.addmm(c.reshape(-1, c.shape[-1]), t.reshape(-1, t.shape[-1]), weights[0]).view(c.shape)


def _split(v: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    return list(torch.split(v, list(sizes), dim=2))


@dataclass
class MLPRegions:
    """Linear regions of a batch of points of an MLP, kept factored: shared weights, per-region masks.

    The region of pattern s (the device's signs on the gated layers) is ``s_i (J_i h + off_i) >= 0``
    for every gated neuron i, with h in the box [lower, upper]: LP rows ``A = -s J``, ``b = s off``,
    the same LP as :func:`prune_edge.regions.region_lp` (which forms J through float64 masks; the
    masks here are the device's pattern itself, so the two agree up to a neuron at exactly 0)."""

    start: int
    weights: list[torch.Tensor]  # float64 W_i of the gated layers start.., then the logits layer
    signs: np.ndarray  # int8 (B, M)
    masks: list[torch.Tensor]  # float64 (B, 1, n_i) 0/1, one per gated layer
    off_z: torch.Tensor  # (B, M) float64 offsets of the gated pre-activations
    off_f: torch.Tensor  # (B, C) float64 offsets of the logits
    h: torch.Tensor  # (B, D) the points in LP-variable space
    lower: np.ndarray  # (D,) box of the LP variables
    upper: np.ndarray

    @property
    def sizes(self) -> list[int]:
        return [w.shape[0] for w in self.weights[:-1]]

    @property
    def hidden(self) -> list[torch.Tensor]:
        return self.weights[:-1]

    def subset(self, rows: np.ndarray) -> "MLPRegions":
        idx = torch.as_tensor(np.asarray(rows, dtype=np.int64), device=self.h.device)
        return MLPRegions(self.start, self.weights, self.signs[np.asarray(rows)], [m[idx] for m in self.masks],
                          self.off_z[idx], self.off_f[idx], self.h[idx], self.lower, self.upper)

    def jacobians(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(J_z (B, M, D), J_f (B, C, D)) materialised in float64 (tests; what the chain never forms)."""
        d = self.weights[0].shape[1]
        eye = torch.eye(d, dtype=torch.float64, device=self.h.device).expand(len(self.h), d, d)
        rows = forward_chain(self.weights, self.masks, eye).transpose(1, 2)
        m = sum(self.sizes)
        return rows[:, :m].contiguous(), rows[:, m:].contiguous()

    def objectives(self, specs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(P J_f (B, K, D), P off_f (B, K)) float64 for specification rows P (B, K, C)."""
        p = torch.from_numpy(np.asarray(specs, dtype=np.float64)).to(self.h.device)
        top = (p @ self.weights[-1]) * self.masks[-1]  # (B, K, n_last): P W_out diag(m_last)
        nus: list[torch.Tensor | None] = [None] * (len(self.masks) - 1) + [top]
        c = backward_chain(self.hidden, self.masks, nus)
        return c.cpu().numpy(), torch.einsum("bkc,bc->bk", p, self.off_f).cpu().numpy()


@torch.no_grad()
def mlp_regions(net: PreactNet, x: np.ndarray, start: int, signs: np.ndarray,
                device: str | torch.device = "cpu") -> MLPRegions:
    """The regions of the points ``x`` with activation patterns ``signs`` (B, M) on the hidden layers
    ``start..``, in the factored form (float64). Only masks and offsets are per region."""
    from .regions import interval_bounds

    if not is_mlp(net):
        raise ValueError("mlp_regions: expected a network of Linear layers only, found " +
                         ", ".join(type(layer).__name__ for layer in net.layers))
    dev = torch.device(device)
    weights = [layer.weight.detach().to(dev, torch.float64) for layer in net.layers]
    biases = [layer.bias.detach().to(dev, torch.float64) for layer in net.layers]
    sizes = [w.shape[0] for w in weights[start:-1]]
    signs = np.asarray(signs)
    if signs.ndim != 2 or signs.shape != (len(x), sum(sizes)):
        raise ValueError(f"signs: expected shape ({len(x)}, {sum(sizes)}), found {signs.shape}")
    h = torch.from_numpy(np.asarray(x, dtype=np.float64)).to(dev).flatten(1)
    for w, b in zip(weights[:start], biases[:start]):
        h = torch.relu(h @ w.T + b)
    s = torch.from_numpy(signs.astype(np.float64)).to(dev)
    masks = [(part > 0).to(torch.float64)[:, None, :] for part in torch.split(s, sizes, dim=1)]
    # offsets: the masked network at h = 0
    o = biases[start].expand(len(h), -1)
    offs = [o]
    for w, b, m in zip(weights[start + 1:], biases[start + 1:], masks):
        o = (o * m[:, 0]) @ w.T + b
        offs.append(o)
    if start:  # interval bounds of the features, as compute_regions has them
        lo, hi = interval_bounds(copy.deepcopy(net).cpu().double(), start, tuple(x.shape[1:]))
    else:
        lo, hi = torch.zeros(h.shape[1], dtype=torch.float64), torch.ones(h.shape[1], dtype=torch.float64)
    return MLPRegions(start, weights[start:], signs.astype(np.int8), masks, torch.cat(offs[:-1], dim=1), offs[-1], h,
                      lo.numpy(), hi.numpy())


class _ChainProducts(gen._Products):
    """The products of :class:`prune_edge.bounds._Products` through the chain (same contract).

    Works on (B K, n) matrices: the masks are expanded over the objectives once, so every layer is
    one plain 2-D product and one elementwise mask, and a layer's block of nu is a strided view that
    the product reads without a copy."""

    def __init__(self, regions: MLPRegions, dtype: torch.dtype, k: int, columns: torch.Tensor | None = None):
        """``columns``: the LP variables the products keep (all when None); see :func:`_scaled`."""
        self.dtype, self.sizes, self.k = dtype, regions.sizes, k
        hidden = list(regions.hidden)
        if columns is not None:
            hidden[0] = hidden[0][:, columns]
        self.w32 = [w.float() for w in hidden]
        expand = [m.expand(-1, k, -1).reshape(-1, m.shape[2]) for m in regions.masks]
        self.m32 = [m.float() for m in expand]
        low = dtype != torch.float32
        self.wlow = [w.to(dtype) for w in hidden] if low else self.w32
        self.mlow = [m.to(dtype) for m in expand] if low else self.m32
        self._all = (self.m32, self.mlow)  # the masks of every pair, for select

    def select(self, rows: torch.Tensor) -> "_ChainProducts":
        """The same products for the flat (region, objective) pairs ``rows`` alone: only the masks
        are per pair, so this picks their rows (the weights are shared)."""
        out = copy.copy(self)
        m32, mlow = self._all
        out.m32 = [m.index_select(0, rows) for m in m32]
        out.mlow = out.m32 if mlow is m32 else [m.index_select(0, rows) for m in mlow]
        return out

    def _fwd(self, u: torch.Tensor, ws: list[torch.Tensor], ms: list[torch.Tensor]) -> torch.Tensor:
        y = u.reshape(-1, u.shape[2]) @ ws[0].T
        outs = [y]
        for w, m in zip(ws[1:], ms):
            y = (y * m) @ w.T
            outs.append(y)
        return (torch.cat(outs, dim=1) if len(outs) > 1 else y).view(u.shape[0], u.shape[1], -1)

    def _bwd(self, nu: torch.Tensor, ws: list[torch.Tensor], ms: list[torch.Tensor],
             c: torch.Tensor | None) -> torch.Tensor:
        parts = torch.split(nu.reshape(-1, nu.shape[2]), self.sizes, dim=1)
        t = parts[-1]
        for i in range(len(ws) - 1, 0, -1):
            t = torch.addcmul(parts[i - 1], t @ ws[i], ms[i - 1])
        out = t @ ws[0] if c is None else torch.addmm(c.reshape(-1, c.shape[2]), t, ws[0])
        return out.view(nu.shape[0], nu.shape[1], -1)

    def rows(self, u: torch.Tensor) -> torch.Tensor:
        if u.dtype == torch.float32:
            return self._fwd(u, self.w32, self.m32)
        return self._fwd(u, self.wlow, self.mlow)

    def cols(self, nu: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self._bwd(nu, self.w32, self.m32, c)

    def cols_low(self, nu: torch.Tensor) -> torch.Tensor:
        return self._bwd(nu.to(self.dtype), self.wlow, self.mlow, None)


def _deep_rows(regions: MLPRegions) -> list[torch.Tensor]:
    """V_i (B, n_i, n_0) float64 for gated layers i >= 1: J_i = V_i W_0."""
    out: list[torch.Tensor] = []
    v = None
    for w, m in zip(regions.hidden[1:], regions.masks):
        wm = w * m  # (B, n_i, n_{i-1}): W_i diag(m_{i-1})
        v = wm if v is None else wm @ v
        out.append(v)
    return out


def row_norms(regions: MLPRegions, width: torch.Tensor) -> torch.Tensor:
    """(B, M) float64 |row of J diag(width)|: the first gated layer's exactly (shared), deeper ones through
    a float32 Gram matrix, recomputed in float64 where that estimate is small or uncertain."""
    bsz = len(regions.h)
    w0 = regions.weights[0] * width  # (n_0, D)
    first = w0.norm(dim=1).expand(bsz, -1)
    deep = _deep_rows(regions)
    if not deep:
        return first.contiguous()
    gram = (w0 @ w0.T).float()
    # |v^T G v - fl32(...)| <= gamma_n |v|^2 max_row_sum|G| (float32 rounding of v, G and the sums)
    gamma = 2 * (gram.shape[0] + 4) * 2.0**-24
    g_inf = float(gram.abs().sum(dim=1).max())
    ests, errs = [], []
    for v in deep:
        v32 = v.float()
        ests.append(((v32 @ gram) * v32).sum(dim=2).double())
        errs.append(gamma * g_inf * (v * v).sum(dim=2) * (1 + 1e-6))
    est, err = torch.cat(ests, dim=1), torch.cat(errs, dim=1)
    top = torch.maximum(first.amax(dim=1) ** 2, (est + err).amax(dim=1))[:, None]  # >= the largest norm^2
    redo = (est < EST_SMALL * top) | (err > EST_REL * est)
    norms = est.clamp(min=0).sqrt()
    if bool(redo.any()):
        b_idx, i_idx = torch.nonzero(redo, as_tuple=True)
        off = 0
        for v in deep:  # the rows of each layer picked where they are (no concatenated copy of every row)
            sel = (i_idx >= off) & (i_idx < off + v.shape[1])
            norms[b_idx[sel], i_idx[sel]] = (v[b_idx[sel], i_idx[sel] - off] @ w0).norm(dim=1)
            off += v.shape[1]
    return torch.cat([first, norms], dim=1)


@torch.no_grad()
def _scaled(regions: MLPRegions, c64: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> gen._Scaled:
    """:func:`prune_edge.bounds._scaled` for the factored LP (same scaling, same negligible-row rule).

    The ascent leaves out (SKIP_UNSEEN) the LP variables no constraint can see: those whose column of
    the first gated layer (times the box width) is negligible (bounds.NEGLIGIBLE of the largest). Every
    row of J is a combination of that layer's rows, so such a variable's reduced cost
    r_j = c_j + (A^T mu)_j does not depend on mu: its box term is a constant of the ascent and its entry
    of the supergradient A u* is ~0. The default MLP has 127 such pixels of 784 (never lit in the training
    data, their weights decayed to ~1e-22), so the ascent's products with the first layer and its
    elementwise work on r shrink by 16%. Only the ascent is affected; the float64 certificate
    (:func:`_certify`) evaluates every variable, so the bound is sound either way."""
    width = hi - lo  # (D,)
    col = (regions.weights[0] * width).norm(dim=0)
    seen = col > gen.NEGLIGIBLE * col.max().clamp(min=1e-300)
    columns = None if bool(seen.all()) or not SKIP_UNSEEN else torch.nonzero(seen)[:, 0]
    norms = row_norms(regions, width)
    live = norms > gen.NEGLIGIBLE * norms.amax(dim=1, keepdim=True).clamp(min=1e-300)
    row_scale = torch.where(live, 1.0 / torch.where(live, norms, 1.0), 0.0)
    s = torch.from_numpy(regions.signs.astype(np.float64)).to(c64.device)
    z = regions.off_z
    if bool(torch.any(lo != 0)):  # b - A lo = s (off + J lo)
        z = z + forward_chain(regions.hidden, regions.masks, lo.expand(len(z), 1, -1))[:, 0]
    obj = (c64 * width).norm(dim=2)
    obj_scale = torch.where(obj > 0, obj, 1.0)
    rs = row_scale.float()[:, None, :]
    c = c64 / obj_scale[:, :, None]
    if columns is not None:
        c, width = c[:, :, columns], width[columns]
    unit = bool(torch.all(width == 1))
    return gen._Scaled(
        ops=_ChainProducts(regions, gen._compute_dtype(c64.device), c64.shape[1], columns),
        c=c.float(),
        b=(row_scale * s * z).float()[:, None, :],
        width=None if unit else width.float().expand(len(z), 1, -1),
        row_scale=rs,
        signed_scale=-s.float()[:, None, :] * rs,
        obj_scale=obj_scale,
        row_norm=None,
    )


@torch.no_grad()
def _certify(mu: torch.Tensor, regions: MLPRegions, c64: torch.Tensor, lo: torch.Tensor,
             hi: torch.Tensor) -> torch.Tensor:
    """(B, N) float64 weak-duality bounds for mu (B, N, M) (clamped at 0) on the factored LP.

    r = c + A^T mu = c - J^T (s mu) through the chain in float64; its rounding error is at most
    n u (|c| + |W_0|^T (|nu_0| + m_0 |W_1|^T (...))) with n the chain's summation depth (< M + D + 4),
    and that absolute chain dotted with max(|lo|, |hi|) is exactly mu . row_l1 for row_l1 the same chain
    of |W_i| applied to max(|lo|, |hi|), which also bounds sum_j |A_ij| max(|lo_j|, |hi_j|)."""
    mu = mu.clamp(min=0)
    s = torch.from_numpy(regions.signs.astype(np.float64)).to(mu.device)[:, None, :]
    r = backward_chain(regions.hidden, regions.masks, _split(-s * mu, regions.sizes), c64)
    bsz, d = len(mu), lo.shape[0]
    mag = torch.maximum(lo.abs(), hi.abs())
    row_l1 = forward_chain([w.abs() for w in regions.hidden], regions.masks, mag.expand(bsz, 1, d))[:, 0] * ABS_INFLATE
    b64 = s[:, 0] * regions.off_z
    lo_b, hi_b = lo.expand(bsz, d), hi.expand(bsz, d)
    return gen.weak_duality_bound(mu, r, b64, c64, lo_b, hi_b, row_l1, mu.shape[2] + d + 4)


@torch.no_grad()
def chain_dual_lower_bounds(regions: MLPRegions, c: np.ndarray, *, steps: int = 300,
                            keep: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """(B, K) float64 sound lower bounds of min c.h over each region of ``regions`` (c: (B, K, D)).

    :func:`prune_edge.bounds.dual_lower_bounds` for MLP regions, without forming their constraint
    matrices: same scaling, same ascent, the same float64 weak-duality certificate (with the rounding
    slack of the chain). Deterministic (mu starts at 0).

    ``keep``: given the ascent's (B, K) estimates of these bounds so far (float32 dual values, not yet
    certified), which pairs still need tightening (bool); the others stop early (bounds.DROP_AT). Every
    bound returned is certified whatever ``keep`` says; stopped ones are just looser."""
    dev = regions.h.device
    c = np.ascontiguousarray(c, dtype=np.float64)
    bsz, d = len(regions.h), regions.weights[0].shape[1]
    if c.ndim != 3 or c.shape[0] != bsz or c.shape[2] != d:
        raise ValueError(f"c: expected shape ({bsz}, K, {d}), found {c.shape}")
    k = c.shape[1]
    c64 = torch.from_numpy(c).to(dev)
    lo = torch.from_numpy(np.asarray(regions.lower, dtype=np.float64)).to(dev)
    hi = torch.from_numpy(np.asarray(regions.upper, dtype=np.float64)).to(dev)
    m = sum(regions.sizes)
    if bsz == 0 or k == 0 or steps <= 0:  # the box bound (mu = 0)
        return _certify(torch.zeros(bsz, k, m, dtype=torch.float64, device=dev), regions, c64, lo, hi).cpu().numpy()
    s = _scaled(regions, c64, lo, hi)
    rule = None
    if keep is not None:
        def rule(vals: torch.Tensor) -> torch.Tensor:  # scaled dual values -> this LP's units
            return torch.from_numpy(np.asarray(keep((vals.double() * s.obj_scale).cpu().numpy()), dtype=bool)).to(vals.device)
    best, _ = gen._ascend(s, steps, rule)  # the best mu seen, the last one included
    mu = best.double() * (s.row_scale.double() * s.obj_scale[:, :, None])  # back to the original LP's multipliers
    return _certify(mu, regions, c64, lo, hi).cpu().numpy()

"""Sound lower bounds of many small LPs at once, by Lagrangian duality, with batched gradient steps.

For each region b and objective k the LP is ``min c[b,k].h  s.t.  A[b] h <= bvec[b],  lo <= h <= hi``.
Weak duality: for ANY mu >= 0, with r = c + A^T mu,

    min  >=  sum_j min(r_j lo_j, r_j hi_j) - mu.bvec

so every mu certifies a bound, and optimising mu only makes it tighter. The exact solver
(:meth:`prune_edge.lp.RegionLP._minimise`) runs one simplex per objective; here the multipliers of every
(region, objective) pair are improved together by projected supergradient ascent (Adam, clamp at 0),
two batched matrix products per step, and the bound is recomputed at the end in float64 from the best
mu seen. Whatever the optimiser did (float32 or bfloat16 products, a bad step), that last evaluation
is the proof.

Few steps suffice because the problem is scaled first (:func:`_scaled`): box [0, 1]^D, unit-norm rows,
unit-norm objectives, so one step-size schedule fits every region, objective and space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

# Adam on the scaled dual. The step size warms up linearly over WARMUP steps (the first supergradient
# points at every row the box corner violates; full steps on all of them overshoot: 5x smaller gap
# after 25 steps with the warm-up), then decays geometrically to lr_end(steps). Measured on the
# default MLP's regions, input and feature space.
LR_START = 0.2
WARMUP = 10
BETAS = (0.9, 0.99)
ADAM_EPS = 1e-8
# A row far below the largest of its region is numerically zero: its sign was decided by float64
# noise (a neuron whose Jacobian vanishes), and an exact solver's feasibility tolerance ignores it
# too. Such rows keep mu = 0. Leaving constraints out only loosens the bound, so this is sound, and
# the bound then stays valid if rounding flips such a row. (The default MLP's feature space has one
# row of norm 2e-11; using it gives bounds above HiGHS' own certified ones.)
NEGLIGIBLE = 1e-9
# float64 rounding slack as in RegionLP._minimise, plus a rigorous term for the rounding of the
# products r = c + A^T mu and mu.b themselves, which can cancel (so |r| does not bound their error).
ROUNDING_REL = 1e-12
UNIT_ROUNDOFF = 2.0**-53
# Dtype of A in the two products of a step: None picks per device (see _compute_dtype).
COMPUTE_DTYPE: torch.dtype | None = None
# With bfloat16 products, r = c + A^T mu is updated incrementally (A^T of the small change in mu,
# rounded to bf16) and recomputed exactly in float32 every REFRESH steps, so rounding never piles up
# (measured: the same bounds refreshing every 10, 20 or 40 steps; a refresh costs ~6 bf16 steps' products).
REFRESH = 20
# The best mu is tracked (the dual evaluated and compared each step) at mu = 0 (the box bound: the best for an
# objective the constraints cannot improve) and after this fraction of the steps: on real objectives the early
# iterates climb from the box bound and are never the best. Measured on the default MLP (40 and
# 256 regions, upper sides, 60 and 120 steps): bit-identical bounds tracking from 0, 0.25 or 0.5, and the
# ascent 4-5% faster from 0.5 (0.86 -> 0.82 s for 256 regions, three runs alternating).
TRACK_FROM = 0.5
# When the caller needs only some objectives tight (prune_edge.synth, --tighten largest: each region's
# largest upper bound, the rows clearly below it only sound), it is asked at these fractions of the steps which
# (region, objective) pairs still matter; the rest stop. On 1,000 regions of the default MLP (120 steps,
# synth's dominance rule) deciding at steps 20 and 40 leaves 15% of the pairs ascending, almost all of
# them after the first decision (docs/sets.md).
DROP_AT = (1 / 6, 1 / 3)


def lr_end(steps: int) -> float:
    """Final step size: smaller for longer runs. Fitted on the default MLP's regions (input and
    feature space, both sides): best near 2e-3 for 150 steps, 7e-4 for 300, 2.5e-4 for 600."""
    return min(0.01, 0.002 * (150 / max(steps, 1)) ** 1.5)


class _Products:
    """The two products of a dual step for a batch of LPs whose constraint matrices are J (B, M, D).

    ``rows(u)`` is J u for u (B, K, D) in ``dtype`` (the step's product dtype); ``cols(nu, c)`` is
    c + J^T nu in float32 and ``cols_low(nu)`` is J^T nu in ``dtype`` (both for nu (B, K, M) float32).
    This class holds J itself; :mod:`prune_edge.mlp_bounds` computes the same products through an
    MLP's shared weights without ever forming J."""

    def __init__(self, a: torch.Tensor, dtype: torch.dtype):
        self.dtype = dtype
        self.a = a.float()  # (B, M, D)
        self.low = None if dtype == torch.float32 else a.to(dtype)

    def rows(self, u: torch.Tensor) -> torch.Tensor:
        lhs = self.a if self.low is None else self.low
        return torch.bmm(u, lhs.transpose(1, 2))

    def cols(self, nu: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(c, nu, self.a)

    def cols_low(self, nu: torch.Tensor) -> torch.Tensor:
        return torch.bmm(nu.to(self.dtype), self.a if self.low is None else self.low)

    def select(self, rows: torch.Tensor) -> "_Products":
        """The products for the flat (region, objective) pairs ``rows`` only, as (1, R, .) batches."""
        raise NotImplementedError("stopping objectives early needs products that can select them (prune_edge.mlp_bounds)")


KeepRows = Callable[[torch.Tensor], torch.Tensor]  # (B, K) dual values so far, scaled -> (B, K) bool: keep ascending


@dataclass
class _Scaled:
    """The LPs seen by the optimiser: h = lo + w u with u in [0, 1]^D, rows and objectives of unit norm.

    The scaling is applied on the small side of each product (multipliers, reduced costs), never to A
    itself: a pass over A costs about as much as a step. The scaled multipliers map back to the
    original LP as mu = mu_s * row_scale * obj_scale; the certificate only needs mu >= 0. A is
    ``sign * J`` with J the matrix ``ops`` multiplies by (sign = 1 when ``ops`` holds A itself)."""

    ops: _Products  # products with J
    c: torch.Tensor  # (B, K, D) float32: c / obj_scale
    b: torch.Tensor  # (B, 1, M) float32: row_scale * (bvec - A lo)
    width: torch.Tensor | None  # (B, 1, D) float32 box widths; None when all are 1
    row_scale: torch.Tensor  # (B, 1, M) float32: 1 / |row of A diag(w)|, 0 for a negligible row
    signed_scale: torch.Tensor  # (B, 1, M) float32: sign * row_scale (A = sign * J)
    obj_scale: torch.Tensor  # (B, K) float64: |c diag(w)|
    row_norm: torch.Tensor | None  # (B, M) float64: |row of A| (generic path only)


def _as_box(v: np.ndarray, batch: int, dim: int, name: str) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    if v.shape == (dim,):
        v = np.broadcast_to(v, (batch, dim))
    if v.shape != (batch, dim):
        raise ValueError(f"{name}: expected shape ({dim},) or ({batch}, {dim}), found {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name}: the box must be finite")
    return v


def _cpu_has_bf16() -> bool:
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def _compute_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where the CPU multiplies it natively (AVX512-BF16 or AMX; on the 2-core dev machine a
    bf16 product is 4x faster, a whole run ~1.8x, with the same bounds per step), else float32. On
    CUDA these products are tiny and launch-bound, so float32. Products accumulate in float32 and
    u* is exactly 0/1 in any dtype; the rounding of A only perturbs the search direction."""
    if COMPUTE_DTYPE is not None:
        return COMPUTE_DTYPE
    if device.type == "cpu" and _cpu_has_bf16():
        return torch.bfloat16
    return torch.float32


@torch.no_grad()
def _scaled(a64: torch.Tensor, b64: torch.Tensor, c64: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> _Scaled:
    """Precondition so that one step-size schedule fits every region, objective and space.

    Input space has the box [0, 1] and rows of norm ~1; feature space has boxes up to ~20 wide (one of
    zero width) and objectives of other sizes. Scaled, the optimal multipliers are O(1) and the
    supergradient entries comparable, which Adam's per-coordinate steps then exploit."""
    width = hi - lo  # (B, D)
    unit = bool(torch.all(width == 1))
    row_norm = torch.einsum("bmd,bmd->bm", a64, a64).sqrt_()
    norms = row_norm if unit else torch.einsum("bmd,bmd,bd->bm", a64, a64, width * width).sqrt_()
    live = norms > NEGLIGIBLE * norms.amax(dim=1, keepdim=True).clamp(min=1e-300)
    row_scale = torch.where(live, 1.0 / torch.where(live, norms, 1.0), 0.0)
    b = b64 - torch.einsum("bmd,bd->bm", a64, lo) if bool(torch.any(lo != 0)) else b64
    obj = (c64 * width[:, None, :]).norm(dim=2)
    obj_scale = torch.where(obj > 0, obj, 1.0)
    rs = row_scale.float()[:, None, :]
    return _Scaled(
        ops=_Products(a64, _compute_dtype(a64.device)),
        c=(c64 / obj_scale[:, :, None]).float(),
        b=(row_scale * b).float()[:, None, :],
        width=None if unit else width.float()[:, None, :],
        row_scale=rs,
        signed_scale=rs,
        obj_scale=obj_scale,
        row_norm=row_norm,
    )


def _per_pair(x: torch.Tensor, bsz: int, k: int) -> torch.Tensor:
    """(B, 1 or K, n) -> (1, B K, n): one row per (region, objective), in region-major order."""
    return x.expand(bsz, k, x.shape[2]).reshape(1, bsz * k, x.shape[2])


@torch.no_grad()
def _ascend(s: _Scaled, steps: int, keep: KeepRows | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam on the scaled dual; returns (best mu seen, last mu), both (B, K, M) float32.

    ``keep`` (products that can :meth:`select` rows only) is asked at ``DROP_AT`` of the steps which
    (region, objective) pairs the caller still needs tightened, given every pair's dual value so far
    (B, K) in the scaled units; the others stop there (their best mu so far is returned, which still
    certifies a bound) and the remaining steps run on the rest alone.

    Scaled dual: g(mu) = sum_j min(r_j, 0) - mu.b with r = w (c + A^T (row_scale mu)). Its
    supergradient is row_scale (A (w u*)) - b with u*_j = 1 where r_j < 0, else 0 (the box minimiser),
    so no autograd is needed. Every step evaluates g at the current mu from the same r (cheap) and
    keeps the best mu per (region, objective): the ascent is not monotone.

    The Adam step is written out rather than taken by ``torch.optim.Adam``: any torch optimizer imports
    ``torch._dynamo`` when it is first built, 1.3 s per process on the 2-core machine (a 200-point
    build takes 1.6 s), and its fused kernel saved only 3% of an ascent (docs/sets.md)."""
    ops, c, b, w, rs = s.ops, s.c, s.b, s.width, s.signed_scale
    dt, exact = ops.dtype, ops.dtype == torch.float32
    neg_b, neg_rs = -b, -rs
    b_col = b.transpose(1, 2)  # (B, M, 1): mu.b for all objectives as one product
    mu = torch.zeros(c.shape[0], c.shape[1], b.shape[2], device=c.device)
    m1, m2 = torch.zeros_like(mu), torch.zeros_like(mu)
    best = mu.clone()
    best_val = torch.full(c.shape[:2], -math.inf, device=c.device)
    beta1, beta2 = BETAS
    decay = (lr_end(steps) / LR_START) ** (1.0 / max(1, steps - 1))
    r0 = c.clone()  # c + A^T (row_scale mu) at mu = 0
    # Elementwise work is most of a step once the products are cheap (prune_edge.mlp_bounds), so the
    # step avoids boolean tensors (their kernels are several times slower on CPU): r's negative part
    # gives g(mu), and its sign (-1 or 0) is -u*, the box minimiser, so the sign is folded into -rs.
    checks = {max(1, round(f * steps)) for f in DROP_AT} if keep is not None and steps > 1 else set()
    rows: torch.Tensor | None = None  # flat (region, objective) indices still ascending; None: all
    best_all = mu_all = None
    for t in range(1, steps + 2):
        rneg = r0.clamp(max=0) if w is None else (r0 * w).clamp_(max=0)
        if t == 1 or t > TRACK_FROM * steps or t in checks:  # mu = 0 too: never worse than the box bound
            mub = torch.bmm(mu, b_col)[:, :, 0] if rows is None else (mu * b).sum(dim=2)
            val = rneg.sum(dim=2) - mub
            better = (val > best_val).to(mu.dtype)[:, :, None]
            best_val = torch.maximum(val, best_val)
            best = torch.lerp(best, mu, better)  # exact for weights 0 and 1: best, or mu where it is better
        if t in checks:
            if rows is None:  # from here on one flat row per (region, objective), b, rs and w included
                bsz, k = c.shape[:2]
                rows = torch.arange(bsz * k, device=c.device)
                best_all, mu_all, vals = best.clone(), mu.clone(), best_val.clone()
                mu, m1, m2, best, r0, c, rneg, b, rs = (_per_pair(x, bsz, k) for x in (mu, m1, m2, best, r0, c, rneg, b, rs))
                best_val, w = best_val.reshape(1, -1), None if w is None else _per_pair(w, bsz, k)
            else:
                vals.view(-1)[rows] = best_val[0]
            best_all.view(-1, best.shape[2])[rows] = best[0]
            sel = torch.nonzero(keep(vals).reshape(-1)[rows])[:, 0]
            rows = rows[sel]
            ops = ops.select(rows)
            mu, m1, m2, best, best_val, r0, c, rneg, b, rs = (
                x.index_select(1, sel) for x in (mu, m1, m2, best, best_val, r0, c, rneg, b, rs))
            neg_b, neg_rs, w = -b, -rs, None if w is None else w.index_select(1, sel)
            if not len(rows):
                break
        if t > steps:  # the last update has been evaluated too
            break
        minus_u = rneg.sign_() if w is None else rneg.sign_().mul_(w)
        g = torch.addcmul(neg_b, ops.rows(minus_u.to(dt)), neg_rs)
        m1.lerp_(g, 1 - beta1)
        m2.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        lr = LR_START * decay ** (t - 1) * min(1.0, t / WARMUP)
        # Adam's bias corrections folded into the step and eps: sqrt(m2 / bc2) + eps = (sqrt(m2) + eps sqrt(bc2)) / sqrt(bc2)
        bc2 = math.sqrt(1 - beta2**t)
        denom = m2.sqrt().add_(ADAM_EPS * bc2)
        new = torch.addcdiv(mu, m1, denom, value=lr * bc2 / (1 - beta1**t)).clamp_(min=0)
        if exact or t % REFRESH == 0:
            r0 = ops.cols(new * rs, c)
        else:  # r0 moves by A^T (row_scale dmu): a bf16 product of a small change, refreshed above
            r0.add_(ops.cols_low((new - mu).mul_(rs)))
        mu = new
    if rows is not None:  # back to (B, K, M): stopped pairs keep what they had when they stopped
        best_all.view(-1, best.shape[2])[rows] = best[0]
        mu_all.view(-1, mu.shape[2])[rows] = mu[0]
        # a stopped pair's last mu is its best one (it certifies at least as well as any other we have)
        done = torch.ones(mu_all.shape[0] * mu_all.shape[1], dtype=torch.bool, device=mu.device)
        done[rows] = False
        mu_all.view(-1, mu.shape[2])[done] = best_all.view(-1, mu.shape[2])[done]
        return best_all, mu_all
    return best, mu


@torch.no_grad()
def _certify(
    mu: torch.Tensor,
    a64: torch.Tensor,
    b64: torch.Tensor,
    c64: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    row_l1: torch.Tensor,
) -> torch.Tensor:
    """(B, N) float64 weak-duality bounds for multipliers mu (B, N, M), clamped at 0 here.

    Same formula and slack as RegionLP._minimise, plus 2 n u (sum of |terms|) for the rounding of
    r = c + A^T mu, of mu.b and of sum_j min(r_j lo_j, r_j hi_j) (n terms per sum, unit roundoff u;
    the 1e-12 sum|r| term alone misses the last one once |lo|, |hi| exceed ~10). ``row_l1`` (B, M)
    must bound sum_j |A_ij| max(|lo_j|, |hi_j|) from above."""
    mu = mu.clamp(min=0)
    r = torch.baddbmm(c64, mu, a64)
    return weak_duality_bound(mu, r, b64, c64, lo, hi, row_l1, a64.shape[1] + a64.shape[2] + 4)


def weak_duality_bound(
    mu: torch.Tensor,
    r: torch.Tensor,
    b64: torch.Tensor,
    c64: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    row_l1: torch.Tensor,
    n: int,
) -> torch.Tensor:
    """The bound of :func:`_certify` from mu >= 0 (B, N, M) and r = c + A^T mu (B, N, D) computed in
    float64 by any means whose rounding error is at most n u (|c| + |A|^T mu) elementwise, with ``row_l1``
    (B, M) >= |A| max(|lo|, |hi|): the slack below then covers that error as well as the sums here."""
    mub = torch.einsum("bkm,bm->bk", mu, b64)
    bound = torch.minimum(r * lo[:, None, :], r * hi[:, None, :]).sum(dim=2) - mub
    slack = ROUNDING_REL * (r.abs().sum(dim=2) + mub.abs() + 1.0)
    mag = torch.maximum(lo.abs(), hi.abs())  # (B, D)
    terms = (
        torch.einsum("bkm,bm->bk", mu, row_l1 + b64.abs())
        + torch.einsum("bkd,bd->bk", c64.abs() + r.abs(), mag)
    )
    return bound - slack - 2 * n * UNIT_ROUNDOFF * terms


@torch.no_grad()
def dual_lower_bounds(
    A: np.ndarray,
    bvec: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    c: np.ndarray,
    *,
    steps: int = 300,
    device: str = "cpu",
    seed: int = 0,
) -> np.ndarray:
    """(B, K) float64 sound lower bounds of min c.h over {A h <= b, lo <= h <= hi}.

    A: (B, M, D), bvec: (B, M), c: (B, K, D), lo/hi: (D,) or (B, D), all finite float64. Each entry is
    a weak-duality bound evaluated in float64 with rounding slack, so it holds for any ``steps``
    (0 gives the plain box bound); more steps make it tighter. For an upper bound of max c.h, pass -c
    and negate. Deterministic: nothing is random (mu starts at 0), so ``seed`` is accepted for API
    stability and unused; the global torch RNG is left alone.
    """
    A = np.ascontiguousarray(A, dtype=np.float64)
    bvec = np.ascontiguousarray(bvec, dtype=np.float64)
    c = np.ascontiguousarray(c, dtype=np.float64)
    if A.ndim != 3 or bvec.shape != A.shape[:2] or c.ndim != 3 or c.shape[::2] != (A.shape[0], A.shape[2]):
        raise ValueError(
            f"shapes: A {A.shape}, bvec {bvec.shape}, c {c.shape}; expected (B, M, D), (B, M), (B, K, D)"
        )
    bsz, m, d = A.shape
    k = c.shape[1]
    lo_b, hi_b = _as_box(lo, bsz, d, "lo"), _as_box(hi, bsz, d, "hi")
    if np.any(hi_b < lo_b):
        raise ValueError("hi < lo somewhere")
    dev = torch.device(device)
    a64 = torch.from_numpy(A).to(dev)
    b64 = torch.from_numpy(bvec).to(dev)
    c64 = torch.from_numpy(c).to(dev)
    lo64 = torch.from_numpy(np.array(lo_b)).to(dev)
    hi64 = torch.from_numpy(np.array(hi_b)).to(dev)
    mag = torch.maximum(lo64.abs(), hi64.abs())
    if bsz == 0 or k == 0 or m == 0 or steps <= 0:  # the box bound (mu = 0)
        zero = torch.zeros(bsz, k, m, dtype=torch.float64, device=dev)
        no_rows = torch.zeros(bsz, m, dtype=torch.float64, device=dev)
        return _certify(zero, a64, b64, c64, lo64, hi64, no_rows).cpu().numpy()
    s = _scaled(a64, b64, c64, lo64, hi64)
    best, last = _ascend(s, steps)
    # Back to the original LP's multipliers; rounding here only changes which mu gets certified.
    to_orig = s.row_scale.double() * s.obj_scale[:, :, None]
    mus = torch.cat([best.double() * to_orig, last.double() * to_orig], dim=1)
    # sum_j |A_ij| mag_j <= |A_i|_2 |mag|_2 (Cauchy-Schwarz), inflated for the rounding of the norms.
    row_l1 = s.row_norm * mag.norm(dim=1, keepdim=True) * (1 + 1e-6)
    bounds = _certify(mus, a64, b64, torch.cat([c64, c64], dim=1), lo64, hi64, row_l1)
    return torch.maximum(bounds[:, :k], bounds[:, k:]).cpu().numpy()

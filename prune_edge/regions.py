"""Linear regions of a ReLU network: activation patterns, local affine maps, and LP bounds over them.

For a point x0 and a first gated hidden layer k, let h be the input of layer k (x itself when k = 0).
Fixing the signs s of the gated pre-activations z fixes the network: on the region
``R = {h in box : s_i * z_i(h) >= 0}`` both z and the logits f are affine in h, with the Jacobian at x0.
The box is [0, 1]^d in input space, or sound interval bounds of h (propagated from the input box)
in a hidden layer's feature space. Everything runs in float64 so the LP certificates are about the
network's real weights, not float32 round-off of them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from .activations import sign_pattern
from .lp import RegionLP
from .models.nets import PreactNet


def parse_gate_layers(spec: str, n_hidden: int) -> int:
    """``all`` -> 0; ``last:K`` -> n_hidden - K. Returns the first gated hidden layer."""
    if spec == "all":
        return 0
    if spec.startswith("last:"):
        try:
            k = int(spec.split(":", 1)[1])
        except ValueError:
            k = -1
        if 1 <= k <= n_hidden:
            return n_hidden - k
    raise ValueError(f"gate layers: expected 'all' or 'last:K' with 1 <= K <= {n_hidden}, found {spec!r}")


@torch.no_grad()
def interval_bounds(net: PreactNet, k: int, input_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sound elementwise bounds of the input of layer k over inputs in [0, 1] (interval arithmetic)."""
    lo = torch.zeros((1, *input_shape), dtype=torch.float64)
    hi = torch.ones_like(lo)
    for i in range(k):
        layer = net.layers[i]
        if isinstance(layer, torch.nn.Linear) and lo.dim() > 2:
            lo, hi = lo.flatten(1), hi.flatten(1)
        center, radius = (hi + lo) / 2, (hi - lo) / 2
        if isinstance(layer, torch.nn.Linear):
            mid = torch.nn.functional.linear(center, layer.weight, layer.bias)
            rad = torch.nn.functional.linear(radius, layer.weight.abs())
        else:
            mid = layer(center)
            rad = torch.nn.functional.conv2d(radius, layer.weight.abs(), None, layer.stride, layer.padding)
        lo, hi = torch.relu(mid - rad), torch.relu(mid + rad)
    return lo.flatten(), hi.flatten()


@dataclass
class Regions:
    """Linear regions of a batch of points, all gated from hidden layer ``start`` on."""

    start: int
    signs: np.ndarray  # int8 (B, M): +1 where the gated pre-activation is > 0, else -1
    jac_z: torch.Tensor  # (B, M, D) float64: gated pre-activations as affine maps of h
    off_z: torch.Tensor  # (B, M)
    jac_f: torch.Tensor  # (B, C, D): logits as affine maps of h
    off_f: torch.Tensor  # (B, C)
    h: torch.Tensor  # (B, D): the points in LP-variable space
    lower: np.ndarray  # (D,) box of the LP variables
    upper: np.ndarray


def _linear_part(layer: torch.nn.Module, v: torch.Tensor) -> torch.Tensor:
    """The layer without its bias, applied to a batch of (flattened-as-needed) vectors."""
    if isinstance(layer, torch.nn.Linear):
        return v.flatten(1) @ layer.weight.T
    return torch.nn.functional.conv2d(v, layer.weight, None, layer.stride, layer.padding)


@torch.no_grad()
def compute_regions(net: PreactNet, x: np.ndarray, start: int, device: str | torch.device = "cpu", chunk: int = 16) -> Regions:
    """Activation patterns and local affine maps of ``x``, vectorised over the batch (float64).

    The Jacobian is pushed forward through the layers with each point's ReLU mask fixed: the first
    gated layer's Jacobian is the same for every point (computed once), later ones are one batched
    product per layer, so a batch costs a handful of matrix products rather than one backward pass
    per output.
    """
    dev = torch.device(device)
    net64 = copy.deepcopy(net).to(device=dev, dtype=torch.float64).eval()
    input_shape = tuple(x.shape[1:])
    xt = torch.from_numpy(np.asarray(x, dtype=np.float64)).to(dev)
    h_nat = net64.features(xt, start)
    feat_shape = tuple(h_nat.shape[1:])
    d = int(np.prod(feat_shape))
    first_layer = net64.layers[start]
    if isinstance(first_layer, torch.nn.Linear):  # (D, out): shared by all points
        first = first_layer.weight.T.contiguous()
    else:  # a conv's Jacobian: the layer applied to the standard basis
        first = _linear_part(first_layer, torch.eye(d, dtype=torch.float64, device=dev).reshape(d, *feat_shape))
    jz_parts, jf_parts, out_parts = [], [], []
    for i in range(0, len(xt), chunk):
        h = h_nat[i : i + chunk]
        preacts, logits = net64.forward_from(start, h)
        b = len(h)
        jac = first.unsqueeze(0).expand(b, *first.shape)  # (B, D, *shape)
        rows = [jac.reshape(b, d, -1)]
        for li, z in zip(range(start + 1, len(net64.layers)), preacts):
            masked = (jac * (z > 0).unsqueeze(1)).reshape(b * d, *jac.shape[2:])
            jac = _linear_part(net64.layers[li], masked).reshape(b, d, *_out_shape(net64.layers[li], jac.shape[2:]))
            rows.append(jac.reshape(b, d, -1))
        jz_parts.append(torch.cat(rows[:-1], dim=2).transpose(1, 2))
        jf_parts.append(rows[-1].transpose(1, 2))
        out_parts.append(torch.cat([*(z.flatten(1) for z in preacts), logits], dim=1))
    jac_z, jac_f = torch.cat(jz_parts), torch.cat(jf_parts)
    out = torch.cat(out_parts)
    m = jac_z.shape[1]
    h_flat = h_nat.flatten(1)
    off_z = out[:, :m] - torch.einsum("bmd,bd->bm", jac_z, h_flat)
    off_f = out[:, m:] - torch.einsum("bcd,bd->bc", jac_f, h_flat)
    lo, hi = interval_bounds(net64.cpu(), start, input_shape)
    return Regions(
        start=start,
        signs=sign_pattern(out[:, :m].cpu().numpy()),
        jac_z=jac_z.cpu(),
        off_z=off_z.cpu(),
        jac_f=jac_f.cpu(),
        off_f=off_f.cpu(),
        h=h_flat.cpu(),
        lower=lo.numpy(),
        upper=hi.numpy(),
    )


def _out_shape(layer: torch.nn.Module, in_shape: tuple) -> tuple:
    if isinstance(layer, torch.nn.Linear):
        return (layer.out_features,)
    c, h, w = in_shape
    k, s, p = layer.kernel_size[0], layer.stride[0], layer.padding[0]
    return (layer.out_channels, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1)


def region_lp(regions: Regions, b: int) -> RegionLP:
    """The LP over the region of point ``b``: -s_i (J_i h) <= s_i c_i for every gated neuron."""
    s = regions.signs[b].astype(np.float64)
    return RegionLP(
        a_ub=-(s[:, None] * regions.jac_z[b].numpy()),
        b_ub=s * regions.off_z[b].numpy(),
        bounds=np.stack([regions.lower, regions.upper], axis=1),
        jac_f=regions.jac_f[b].numpy(),
        off_f=regions.off_f[b].numpy(),
    )

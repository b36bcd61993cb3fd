"""The training set seen through one base: gated pre-activations and logits, computed once.

Every unlearning request needs the same two things about the whole training set: the activation
pattern and logits of the points to forget (they are training points), and the gate violation of
every retained point (to choose gate widths). Both come from one forward pass over the training set
that does not depend on the request, so a server that keeps a base loaded pays it once, not per
request: a ``collapse`` request is then a few array lookups and one matrix product.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .models.nets import PreactNet
from .runtime.patchgraph import choose_scale_log2, quantize


@torch.no_grad()
def gated_forward(net: PreactNet, x: np.ndarray, start: int, batch: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, M) float32 gated pre-activations (layers start.., concatenated like the patch graph does)
    and the (N, C) logits, in batches."""
    zs, logits = [], []
    for i in range(0, len(x), batch):
        preacts, out = net.forward_all(torch.from_numpy(x[i : i + batch]))
        zs.append(torch.cat([z.flatten(1) for z in preacts[start:]], dim=1))
        logits.append(out)
    return torch.cat(zs), torch.cat(logits)


@dataclass(frozen=True)
class GatedView:
    """The training set's gated values for gates starting at one hidden layer."""

    z: np.ndarray  # (N, M) float32 pre-activations, layers start.. concatenated
    logits: np.ndarray  # (N, C) float32
    scale_log2: int  # the gate's quantization step 2^e, chosen from this training set
    q: np.ndarray  # (N, M) float32 holding the gate's integers (exact), for BLAS products
    l1: np.ndarray  # (N,) float32 |q|_1 (exact)

    def signs(self, rows: np.ndarray) -> np.ndarray:
        """Activation patterns (int8 +-1, zero counts as inactive) of the given training rows."""
        return np.where(self.z[rows] > 0, 1, -1).astype(np.int8)

    def violations(self, signs: np.ndarray) -> np.ndarray:
        """(N, P) violations sum_i relu(-s_i q_i) * delta of every training point against P sign rows,
        the quantity the device's gate sees (exact: integer sums below 2^24 in float32)."""
        v = self.l1[:, None] - self.q @ signs.astype(np.float32).T
        return v * np.float32(2.0**self.scale_log2 / 2)


class TrainActivations:
    """Lazily computed :class:`GatedView` per gate start layer, for one (base, training set) pair."""

    def __init__(self, net: PreactNet, x_train: np.ndarray):
        self.net = net.eval()
        self.x_train = x_train
        self._views: dict[int, GatedView] = {}

    def view(self, start: int) -> GatedView:
        if start not in self._views:
            z_t, logits_t = gated_forward(self.net, self.x_train, start)
            z = np.ascontiguousarray(z_t.numpy(), dtype=np.float32)
            e = choose_scale_log2(z)
            q = quantize(z, e).astype(np.float32)
            self._views[start] = GatedView(z=z, logits=logits_t.numpy().astype(np.float32), scale_log2=e, q=q,
                                           l1=np.abs(q).sum(1, dtype=np.float32))
        return self._views[start]

    @property
    def cached(self) -> tuple[int, ...]:
        """Start layers whose view is already in memory."""
        return tuple(sorted(self._views))

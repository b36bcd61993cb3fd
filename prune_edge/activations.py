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
from .runtime.patchgraph import dead_zone


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
    l1_keep: np.ndarray  # (N,) float32 (1 - rho) |z|_1, the first term of every violation
    logits: np.ndarray  # (N, C) float32

    def signs(self, rows: np.ndarray) -> np.ndarray:
        """Activation patterns (int8 +-1, zero counts as inactive) of the given training rows."""
        return np.where(self.z[rows] > 0, 1, -1).astype(np.int8)

    def violations(self, signs: np.ndarray) -> np.ndarray:
        """(N, P) effective violations of every training point against P sign vectors, in float32
        like the device: relu((1 - rho)|z|_1 - z s) / 2 = sum_i relu(-s_i z_i) less the dead zone."""
        s = signs.astype(np.float32).T
        return np.maximum(self.l1_keep[:, None] - self.z @ s, 0.0) * np.float32(0.5)


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
            keep = np.float32(1.0 - dead_zone(z.shape[1]))
            l1_keep = (np.abs(z).sum(1, dtype=np.float32) * keep).astype(np.float32)
            self._views[start] = GatedView(z=z, l1_keep=l1_keep, logits=logits_t.numpy().astype(np.float32))
        return self._views[start]

    @property
    def cached(self) -> tuple[int, ...]:
        """Start layers whose view is already in memory."""
        return tuple(sorted(self._views))

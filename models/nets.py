"""ReLU classifiers written as a chain of affine layers, so every hidden pre-activation has a name.

PRUNE needs three views of one network: the logits, every hidden pre-activation (the activation
pattern and the gates are read from them), and "the rest of the network from layer k on" (regions in
the feature space of a hidden layer). :class:`PreactNet` gives all three from one layer list, and both
architectures below are just layer lists.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

LOGITS_NAME = "logits"
INPUT_NAME = "input"


def preact_name(i: int) -> str:
    """Name of hidden layer ``i``'s pre-activation tensor, in torch outputs and in base.onnx."""
    return f"preact_{i}"


class PreactNet(nn.Module):
    """``x -> L_0 -> ReLU -> L_1 -> ReLU -> ... -> L_{n-1} = logits`` with L_i Linear or Conv2d.

    A Linear layer after a conv layer flattens its input first, so the chain needs no extra modules.
    """

    def __init__(self, layers: Sequence[nn.Module], arch: str, config: dict[str, Any]):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.arch = arch
        self.config = dict(config)

    @property
    def n_hidden(self) -> int:
        """Number of hidden (ReLU) layers; pre-activations ``preact_0 .. preact_{n_hidden-1}``."""
        return len(self.layers) - 1

    def _affine(self, i: int, h: torch.Tensor) -> torch.Tensor:
        layer = self.layers[i]
        if isinstance(layer, nn.Linear) and h.dim() > 2:
            h = h.flatten(1)
        return layer(h)

    def forward_from(self, k: int, h: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Run layers ``k..`` on ``h`` (the input of layer k); return (pre-activations k.., logits)."""
        preacts: list[torch.Tensor] = []
        for i in range(k, len(self.layers)):
            z = self._affine(i, h)
            if i == len(self.layers) - 1:
                return preacts, z
            preacts.append(z)
            h = torch.relu(z)
        raise AssertionError("unreachable: the last layer returns")

    def forward_all(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """All hidden pre-activations and the logits in one pass."""
        return self.forward_from(0, x)

    def features(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """The input of layer ``k`` (``x`` itself for k = 0, else the post-ReLU of layer k-1)."""
        h = x
        for i in range(k):
            h = torch.relu(self._affine(i, h))
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all(x)[1]


def mlp(input_shape: Sequence[int], n_classes: int, hidden: Sequence[int] = (256, 128)) -> PreactNet:
    """ReLU MLP on flattened images; the default (256, 128) is the method note's reference model."""
    dims = [int(torch.tensor(input_shape).prod())] + [int(h) for h in hidden] + [n_classes]
    layers = [nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])]
    return PreactNet(layers, "mlp", {"hidden": [int(h) for h in hidden]})


def cnn(
    input_shape: Sequence[int],
    n_classes: int,
    channels: Sequence[int] = (32, 64),
    hidden: Sequence[int] = (128,),
) -> PreactNet:
    """Small ReLU CNN: 3x3 stride-2 convs (no pooling, so the net stays piecewise affine in one
    chain), then a ReLU MLP head. PRUNE gates its head layers (``--gate-layers last:K``)."""
    c, h, w = (int(v) for v in input_shape)
    layers: list[nn.Module] = []
    for out_c in channels:
        layers.append(nn.Conv2d(c, int(out_c), kernel_size=3, stride=2, padding=1))
        c, h, w = int(out_c), (h + 1) // 2, (w + 1) // 2
    dims = [c * h * w] + [int(v) for v in hidden] + [n_classes]
    layers += [nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])]
    return PreactNet(
        layers, "cnn", {"channels": [int(v) for v in channels], "hidden": [int(v) for v in hidden]}
    )


ARCHITECTURES = {"mlp": mlp, "cnn": cnn}


def build_model(
    arch: str, input_shape: Sequence[int], n_classes: int, config: dict[str, Any] | None = None
) -> PreactNet:
    """Construct an architecture by name; ``config`` is what ``card.json`` stores under ``config``."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}: expected one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch](tuple(input_shape), int(n_classes), **(config or {}))

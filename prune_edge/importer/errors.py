"""The importer's one error: a model it cannot prove piecewise linear up to its logits."""

from __future__ import annotations

from ..runtime.errors import BaseModelError


class UnsupportedModelError(BaseModelError):
    """The model has a node the importer does not support (the message names op type and node), or
    a structure it cannot represent as one chain of affine layers and ReLUs. A bad input (exit 1)."""

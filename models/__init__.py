"""Model architectures (torch, server side). See ``models/README.md`` for their cards."""

from .nets import ARCHITECTURES, INPUT_NAME, LOGITS_NAME, PreactNet, build_model, cnn, mlp, preact_name

__all__ = [
    "ARCHITECTURES",
    "INPUT_NAME",
    "LOGITS_NAME",
    "PreactNet",
    "build_model",
    "cnn",
    "mlp",
    "preact_name",
]

"""Bring your own model: import a feed-forward ReLU classifier in ONNX as a prune-edge base.

:func:`inspect_model` reports what the importer finds (layers, Relu inputs, logits, input layout,
classifier tail) or refuses with one line naming the node; :func:`import_base` makes a base folder
holding the user's exact bytes; :func:`import_torch_module` does the same from a torch module and an
example input. See :mod:`.ops` for why this is a small evaluator rather than onnx2torch.
"""

from .errors import UnsupportedModelError
from .folder import LOGITS_ATOL, import_base, inspect_model
from .graph import ImportPlan
from .torch_module import import_torch_module

__all__ = ["LOGITS_ATOL", "ImportPlan", "UnsupportedModelError", "import_base", "import_torch_module", "inspect_model"]

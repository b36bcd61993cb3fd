"""The Python entry point for a torch ``nn.Module``: export it to ONNX, then import that file."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from ..runtime.fileio import PathLike


def export_module(module: torch.nn.Module, example: torch.Tensor, path: PathLike, dynamo: bool = False) -> Path:
    """Export ``module`` (eval mode, the example's batch axis dynamic) to ``path``.

    ``dynamo=False`` is torch's TorchScript exporter, ``True`` the torch.export one; both give
    graphs the importer reads. The file written is the base devices will run, byte for byte."""
    module = module.eval()
    path = Path(path)
    kwargs: dict[str, Any] = {"input_names": ["input"], "output_names": ["logits"], "dynamo": dynamo}
    if dynamo:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
        kwargs["verbose"] = False
        kwargs["external_data"] = False  # one self-contained file: its sha256 is the whole model
    else:
        kwargs["dynamic_axes"] = {"input": {0: "batch"}, "logits": {0: "batch"}}
    with torch.no_grad(), warnings.catch_warnings():
        # the TorchScript exporter is deprecated upstream; choosing it here is deliberate
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(module, (example,), str(path), **kwargs)
    return path


def import_torch_module(
    module: torch.nn.Module,
    example: torch.Tensor,
    dataset: str,
    out_dir: PathLike,
    dynamo: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Export ``module`` with the example input's layout and import it as a base folder (see
    :func:`~prune_edge.importer.import_base`); return the card. The dataset's ``x_train`` must have
    the module's input layout (the example's shape after the batch axis)."""
    from .folder import import_base

    with tempfile.TemporaryDirectory() as tmp:
        path = export_module(module, example, Path(tmp) / "model.onnx", dynamo=dynamo)
        return import_base(path, dataset, out_dir, overwrite=overwrite)

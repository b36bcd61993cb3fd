"""Pieces every ``prune-edge`` command module shares: input checks, JSON output, device options.

They live apart from :mod:`prune_edge.cli` (the entry point, which registers every command module) so
that command modules import them without importing the entry point back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import click
import numpy as np

from .runtime.errors import InputError


def emit_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, default=json_default))


def json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def jsonable(v: Any) -> Any:
    """A model output as JSON: arrays as lists, a ZipMap's dicts with string keys."""
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return jsonable(v.tolist()) if v.dtype == object else v.tolist()
    return json_default(v) if isinstance(v, (np.generic,)) else v


def require(path: str | None, what: str, folder: bool = False) -> None:
    """A missing input is bad input (exit 1, one line), not a usage error (2) nor a failed patch (3);
    commands call this for every input path before any slow work."""
    if path is None:
        return
    p = Path(path)
    if not p.exists():
        raise InputError(f"{path}: expected {what}, found no such {'folder' if folder else 'file'}")
    if folder and not p.is_dir():
        raise InputError(f"{path}: expected {what}, found a file")
    if not folder and p.is_dir():
        raise InputError(f"{path}: expected {what}, found a folder")


def require_device_inputs(base: str, patches: Sequence[str], card_path: str | None, policy_path: str | None) -> None:
    """The inputs every device command shares, checked in the order the command reads them."""
    require(policy_path, "a device policy JSON file")
    require(base, "a base model file (base.onnx)")
    require(card_path, "a base card JSON file")
    for p in patches:
        require(p, "a patch file (.pepatch)")


def policy_from(policy_path: str | None, max_gate_width: float | None):
    """The device policy: defaults, a JSON file, then the command-line override."""
    import dataclasses

    from .runtime.policy import DEFAULT_POLICY, DevicePolicy

    policy = DevicePolicy.load(policy_path) if policy_path else DEFAULT_POLICY
    if max_gate_width is not None:
        policy = dataclasses.replace(policy, max_gate_width=max_gate_width)
    return policy


def device_options(f):
    """--card, --policy, --max-gate-width: what the device trusts, shared by every device command."""
    f = click.option("--max-gate-width", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Widest gate allowed (1/gamma, pre-activation units). Default: the policy's (1.0).")(f)
    f = click.option("--policy", "policy_path", type=click.Path(), default=None,
                     help="Device policy JSON (caps on gate width, |T|, |t|, records).")(f)
    f = click.option("--card", "card_path", type=click.Path(), default=None,
                     help="Base card. Default: base.card.json beside the base model.")(f)
    return f

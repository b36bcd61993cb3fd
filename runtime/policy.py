"""What a device accepts from any patch author: bounds that hold whoever built the patch.

The certificate says what a patch does on its records' regions; these bounds say how far past them it
can reach and what it can cost, so a device (or an auditor) needs no trust in the server for either:
- ``max_gate_width``: a gate is open (> 0) only where the summed sign violation of the gated
  pre-activations is below 1/gamma; the policy caps 1/gamma. The default, 1.0, is about one median
  |z| of the default MLP: a gate reaches a neighbouring region only a little way past its boundary;
- ``max_abs_T`` / ``max_abs_t``: the correction ``g (T f + t)`` stays finite and bounded for any
  finite base logits, so no passing patch can make a logit infinite or NaN. They also cap an affine
  suppression margin's weights and bias (``w . f + b`` corrects the same logits; see patchgraph);
- record and patch counts: the gate work is O(records) per input, so they bound device latency and
  memory (a patch of 80,000 records would cost 24 s per 1,000 images).
(Format 4 has no tolerance for the certificate: the device checks the specification on the stored t itself.)
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .errors import InputError
from .fileio import PathLike


@dataclass(frozen=True)
class DevicePolicy:
    """Limits a device enforces on every patch it runs (see the module docstring)."""

    max_gate_width: float = 1.0
    max_abs_T: float = 16.0
    max_abs_t: float = 1.0e4
    max_records_per_patch: int = 4096
    max_records_total: int = 16384
    max_patches: int = 256

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise InputError(f"policy {f.name}: expected a positive finite number, found {value!r}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Any, source: str = "policy") -> "DevicePolicy":
        names = {f.name: f.type for f in fields(cls)}
        if not isinstance(doc, dict) or set(doc) - set(names):
            extra = sorted(set(doc) - set(names)) if isinstance(doc, dict) else type(doc).__name__
            raise InputError(f"{source}: expected an object with keys from {sorted(names)}, found {extra}")
        return cls(**doc)

    @classmethod
    def load(cls, path: PathLike) -> "DevicePolicy":
        p = Path(path)
        try:
            doc = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise InputError(f"{p}: expected a JSON device policy, found {exc}") from None
        return cls.from_json(doc, str(p))


DEFAULT_POLICY = DevicePolicy()

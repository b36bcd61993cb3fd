"""``PatchedModel``: a base ONNX model plus verified patches, run with onnxruntime."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnxruntime as ort

from .base import BaseGraph
from .compose import compose
from .fileio import PathLike
from .verify import VerifiedPatch, verify_patch


def make_session(
    model_bytes: bytes, threads: int | None = None, providers: Sequence[str] | None = None, spin: bool = True
) -> ort.InferenceSession:
    """An onnxruntime session with full graph optimisation (constant folding of the patch prologue).

    ``spin=False`` stops idle worker threads from busy-waiting after a run: right for a session used
    now and then inside other work (they would steal the cores that work needs), wrong for serving."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(model_bytes, sess_options=opts, providers=list(providers or ["CPUExecutionProvider"]))


class PatchedModel:
    """Verify every patch against the exact base, compose them, and serve logits and labels.

    A patch that fails any check raises a :class:`~prune_edge.runtime.errors.PatchVerificationError`
    from the constructor: nothing is ever composed from a refused patch.
    """

    def __init__(
        self,
        base_onnx_path: PathLike,
        patch_paths: Sequence[PathLike] = (),
        *,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
    ):
        self.base = BaseGraph.load(base_onnx_path)
        self.patches: list[VerifiedPatch] = [verify_patch(p, self.base) for p in patch_paths]
        self.model = compose(self.base.model, self.patches)
        self._threads, self._providers = threads, providers
        self.session = make_session(self.model.SerializeToString(), threads, providers)
        self._gate_session: ort.InferenceSession | None = None
        self._base_session: ort.InferenceSession | None = None

    @property
    def n_records(self) -> int:
        """Number of gated records (regions) over all patches."""
        return sum(len(p.manifest.records) for p in self.patches)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Patched logits for a float32 batch of shape (N, *input_shape)."""
        x = self.base.check_input(x)
        return self.session.run(None, {self.base.input_name: x})[0]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Patched labels (argmax of :meth:`logits`), int64."""
        return self.logits(x).argmax(axis=1).astype(np.int64)

    def base_logits(self, x: np.ndarray) -> np.ndarray:
        """Logits of the unchanged base alone (to show what a patch changed)."""
        x = self.base.check_input(x)
        if not self.patches:
            return self.logits(x)
        if self._base_session is None:
            self._base_session = make_session(self.base.data, self._threads, self._providers)
        return self._base_session.run(None, {self.base.input_name: x})[0]

    def gates(self, x: np.ndarray) -> list[np.ndarray]:
        """Per patch, the (N, records) gate values: 1 inside a record's region, 0 where it is closed."""
        return self.logits_and_gates(x)[1]

    def logits_and_gates(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Patched logits and every patch's gates from one run (the gates are extra graph outputs)."""
        x = self.base.check_input(x)
        if not self.patches:
            return self.logits(x), []
        if self._gate_session is None:
            model = compose(self.base.model, self.patches, expose_gates=True)
            self._gate_session = make_session(model.SerializeToString(), self._threads, self._providers)
        logits, *gates = self._gate_session.run(None, {self.base.input_name: x})
        return logits, gates

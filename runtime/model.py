"""``PatchedModel``: a base ONNX model plus verified patches, run with onnxruntime."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort

from .base import BaseGraph
from .compose import compose
from .errors import ProbeError
from .fileio import PathLike
from .policy import DEFAULT_POLICY, DevicePolicy
from .verify import VerifiedPatch, check_patch_set, verify_patch


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


def label_output(model: onnx.ModelProto, logits_name: str) -> str | None:
    """The model's label output: the first graph output, other than the logits, that is an integer
    or string tensor (what an ArgMax or an ``ai.onnx.ml`` label lookup produces); None if none."""
    kinds = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.STRING}
    for o in model.graph.output:
        if o.name != logits_name and o.type.HasField("tensor_type") and o.type.tensor_type.elem_type in kinds:
            return o.name
    return None


def compose_gate_names(session: ort.InferenceSession) -> list[str]:
    """The acting gate and record outputs :func:`compose` appends with ``expose_gates`` (the last two)."""
    return [o.name for o in session.get_outputs()[-2:]]


@dataclass(frozen=True)
class Coverage:
    """Which record acts on each input: its patch position and record index (-1 where none), gate."""

    patch: np.ndarray  # (N,) int64, -1 where every gate is 0
    record: np.ndarray  # (N,) int64
    gate: np.ndarray  # (N,) float32 in [0, 1]

    @property
    def covered(self) -> np.ndarray:
        return self.gate > 0


class PatchedModel:
    """Verify every patch against the exact base (its card and the device policy), check them as a
    set, compose them, and serve logits and labels.

    A patch that fails any check raises a :class:`~prune_edge.runtime.errors.PatchVerificationError`
    from the constructor: nothing is ever composed from a refused patch.

    ``screen=False`` composes the gates in the patch file's product form instead of the lookup
    (:func:`~.patchgraph.gate_nodes`): the same outputs, bit for bit; about 10 fewer small nodes, which
    is a little faster where inputs come one at a time and much slower for batches (docs/sets.md, "Format 8").
    """

    def __init__(
        self,
        base_onnx_path: PathLike,
        patch_paths: Sequence[PathLike | VerifiedPatch] = (),
        *,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
        policy: DevicePolicy = DEFAULT_POLICY,
        card_path: PathLike | None = None,
        base: BaseGraph | None = None,
        screen: bool = True,
    ):
        self.base = base if base is not None else BaseGraph.load(base_onnx_path, card_path)
        self.policy = policy
        # a VerifiedPatch (from verify_patch on this base) is not checked twice
        self.patches: list[VerifiedPatch] = [
            p if isinstance(p, VerifiedPatch) else verify_patch(p, self.base, policy) for p in patch_paths
        ]
        check_patch_set(self.patches, policy)
        composition = compose(self.base.model, self.patches, screen=screen)
        self.model = composition.model
        self.logits_name = composition.logits_name
        self.output_names = tuple(o.name for o in self.base.model.graph.output)  # the base's own outputs
        self._records = composition.records
        self._threads, self._providers, self._screen = threads, providers, screen
        self.session = make_session(self.model.SerializeToString(), threads, providers)
        self._gate_session: ort.InferenceSession | None = None
        self._base_session: ort.InferenceSession | None = None

    @classmethod
    def from_state(cls, state_dir: PathLike, **kwargs) -> "PatchedModel":
        """The model a device's state folder runs (``prune-edge update``): its base, card, policy and
        the active set's patches, each verified again here (the folder is storage, not trust)."""
        from .state import read_active  # the state folder layout: stdlib + runtime, no tuf

        active = read_active(state_dir)
        return cls(active.base, active.patches, card_path=active.card, policy=active.policy(), **kwargs)

    @property
    def n_records(self) -> int:
        """Number of gated records (regions) over all patches."""
        return len(self._records)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Patched logits for a float32 batch of shape (N, *input_shape), wherever they sit in the
        graph (the base's output, or the input of its classifier tail)."""
        x = self.base.check_input(x)
        return self.session.run([self.logits_name], {self.base.input_name: x})[0]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Patched labels (argmax of :meth:`logits`), int64."""
        return self.logits(x).argmax(axis=1).astype(np.int64)

    def outputs(self, x: np.ndarray) -> dict[str, object]:
        """The base's own outputs, by name, computed from the patched logits (a label, probabilities,
        a ZipMap's list of dicts: whatever the model's classifier tail makes of them)."""
        x = self.base.check_input(x)
        return dict(zip(self.output_names, self.session.run(list(self.output_names), {self.base.input_name: x})))

    def labels(self, x: np.ndarray) -> list:
        """Patched labels as the model itself reports them: its label output (:func:`label_output`,
        e.g. skl2onnx's ``output_label``) where it has one, else the argmax of the logits."""
        name = label_output(self.base.model, self.logits_name)
        if name is None:
            return self.predict(x).tolist()
        x = self.base.check_input(x)
        return np.asarray(self.session.run([name], {self.base.input_name: x})[0]).reshape(len(x), -1)[:, 0].tolist()

    def base_logits(self, x: np.ndarray) -> np.ndarray:
        """Logits of the unchanged base alone (to show what a patch changed)."""
        x = self.base.check_input(x)
        if not self.patches:
            return self.logits(x)
        if self._base_session is None:
            self._base_session = make_session(compose(self.base.model, []).model.SerializeToString(), self._threads, self._providers)
        return self._base_session.run([self.logits_name], {self.base.input_name: x})[0]

    def logits_and_coverage(self, x: np.ndarray) -> tuple[np.ndarray, Coverage]:
        """Patched logits and, per input, the record that acts on it and its gate (one run)."""
        x = self.base.check_input(x)
        n = len(x)
        if not self._records:  # no patch, or suppressions only: no gate anywhere
            none = np.full(n, -1, np.int64)
            return self.logits(x), Coverage(none, none.copy(), np.zeros(n, np.float32))
        if self._gate_session is None:
            model = compose(self.base.model, self.patches, expose_gates=True, screen=self._screen).model
            self._gate_session = make_session(model.SerializeToString(), self._threads, self._providers)
        gate_names = [self.logits_name, *compose_gate_names(self._gate_session)]
        logits, gate, k = self._gate_session.run(gate_names, {self.base.input_name: x})
        gate = gate.reshape(-1)
        table = np.array(self._records, dtype=np.int64).reshape(-1, 2)
        patch, record = table[k, 0], table[k, 1]
        closed = gate <= 0
        patch[closed], record[closed] = -1, -1
        return logits, Coverage(patch, record, gate)

    def coverage(self, x: np.ndarray) -> Coverage:
        return self.logits_and_coverage(x)[1]

    def probe(self, x: np.ndarray, max_open: float) -> float:
        """Fraction of the device's own inputs ``x`` on which any gate is open; raise
        :class:`ProbeError` above ``max_open`` (honest point patches open on almost none)."""
        covered = self.coverage(x).covered
        fraction = float(covered.mean()) if len(covered) else 0.0
        if not fraction <= max_open:
            raise ProbeError(
                f"gates open on {int(covered.sum())} of {len(covered)} probe inputs ({fraction:.1%}), "
                f"the device allows at most {max_open:.1%}"
            )
        return fraction

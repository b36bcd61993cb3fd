"""Device runtime: verify patch files, compose them with an unchanged base, run with onnxruntime.

Imports only numpy, onnx, onnxruntime and the standard library, so ``pip install prune-edge`` is
enough on a device. The patch-file format lives here, once; the server side imports it.
"""

from .base import BaseGraph
from .errors import (
    BaseModelError,
    CertificateError,
    DatasetError,
    IncompatibleBaseError,
    InputError,
    IntegrityError,
    InterferenceError,
    LocalityError,
    PatchFormatError,
    PatchVerificationError,
    ProbeError,
    PruneEdgeError,
    RequestError,
    StructureError,
)
from .basecard import BaseCard, card_path_for
from .manifest import FORMAT_VERSION, GatedTensor, Manifest, Record
from .model import Coverage, PatchedModel, make_session
from .policy import DEFAULT_POLICY, DevicePolicy
from .patchfile import GRAPH_NAME, MANIFEST_NAME, PATCH_SUFFIX, PatchFile, pack, read_patch_file, unpack
from .verify import CHECKS, PatchReport, VerifiedPatch, certify_patch, check_patch_set, verify_patch

__all__ = [
    "BaseCard",
    "BaseGraph",
    "Coverage",
    "DEFAULT_POLICY",
    "DevicePolicy",
    "InterferenceError",
    "LocalityError",
    "ProbeError",
    "card_path_for",
    "check_patch_set",
    "BaseModelError",
    "CHECKS",
    "CertificateError",
    "DatasetError",
    "FORMAT_VERSION",
    "GRAPH_NAME",
    "GatedTensor",
    "IncompatibleBaseError",
    "InputError",
    "IntegrityError",
    "MANIFEST_NAME",
    "Manifest",
    "PATCH_SUFFIX",
    "PatchFile",
    "PatchFormatError",
    "PatchReport",
    "PatchVerificationError",
    "PatchedModel",
    "PruneEdgeError",
    "Record",
    "RequestError",
    "StructureError",
    "VerifiedPatch",
    "certify_patch",
    "make_session",
    "pack",
    "read_patch_file",
    "unpack",
    "verify_patch",
]

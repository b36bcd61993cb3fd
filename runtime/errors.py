"""Every named error of prune-edge, in the lowest layer so devices and servers share them.

The tree mirrors how a caller reacts: ``PatchVerificationError`` and its children mean "an untrusted
patch file was refused, do not apply it"; ``DatasetError`` and ``InputError`` mean "the user's own input
is wrong". Each error subclasses a builtin (``ValueError``) so existing ``except ValueError`` code keeps
working, and each message says what was expected and what was found.
"""

from __future__ import annotations


class PruneEdgeError(Exception):
    """Base of all prune-edge errors; the CLI turns these into one-line messages."""


class InputError(PruneEdgeError, ValueError):
    """An input array, file or argument does not have the expected shape, dtype or content."""


class DatasetError(InputError):
    """A dataset name or file cannot be loaded (missing file, wrong magic, inconsistent sizes)."""


class RequestError(InputError):
    """A deletion request is malformed (empty, duplicate or out-of-range ids)."""


class BaseModelError(InputError):
    """A base-model folder or ONNX file is missing pieces or is inconsistent with its card."""


class PatchVerificationError(PruneEdgeError, ValueError):
    """An untrusted patch file failed a check; it must never be applied."""

    check = "verification"


class PatchFormatError(PatchVerificationError):
    """The container or manifest does not follow the patch-file format."""

    check = "format"


class IntegrityError(PatchVerificationError):
    """A digest recorded in the manifest does not match the bytes it covers."""

    check = "integrity"


class IncompatibleBaseError(PatchVerificationError):
    """The patch is bound to a different base model than the one given."""

    check = "binding"


class StructureError(PatchVerificationError):
    """The patch graph is not exactly the canonical gated-affine structure."""

    check = "structure"


class CertificateError(PatchVerificationError):
    """The certificate algebra of a patch record does not hold."""

    check = "certificate"


class LocalityError(PatchVerificationError):
    """A patch could act past what the base card and the device policy allow (gate step, gated
    tensors, gate width, size of its tensors, number of records)."""

    check = "locality"


class InterferenceError(PatchVerificationError):
    """Records of the patches a device runs together could break each other's certificates."""

    check = "interference"


class ProbeError(PatchVerificationError):
    """On the device's own probe inputs, more gates open than the device allows."""

    check = "probe"


__all__ = [
    "PruneEdgeError",
    "InputError",
    "DatasetError",
    "RequestError",
    "BaseModelError",
    "PatchVerificationError",
    "PatchFormatError",
    "IntegrityError",
    "IncompatibleBaseError",
    "StructureError",
    "CertificateError",
    "LocalityError",
    "InterferenceError",
    "ProbeError",
]

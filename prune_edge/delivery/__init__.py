"""Trustworthy delivery of patches: a TUF repository on the server, a TUF client on the device.

- :mod:`.publish` (server, needs ``tuf``): ``repo init``, ``repo publish``, ``repo rotate-root``;
- :mod:`.update` (device, needs ``tuf``): fetch through ``tuf.ngclient``, run every certify check,
  switch the active set atomically;
- the state folder layout lives in :mod:`prune_edge.runtime.state` (stdlib and runtime only, the
  lowest layer), so :meth:`~prune_edge.runtime.PatchedModel.from_state` and ``prune-edge status`` work
  on any install.

Nothing here is imported by ``prune_edge`` or ``prune_edge.cli`` at import time, so the plain install
(numpy, onnx, onnxruntime, click) keeps working without ``tuf``.
"""

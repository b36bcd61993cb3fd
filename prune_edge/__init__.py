"""prune-edge: certified machine unlearning (PRUNE) shipped to edge devices as verified ONNX patches.

Importing this package stays light (no torch): devices use :mod:`prune_edge.runtime`, servers import the
torch-backed modules (:mod:`prune_edge.train`, :mod:`prune_edge.synth`, ...) explicitly.
"""

__version__ = "0.1.0"

"""prune-edge: certified machine unlearning (PRUNE) shipped to edge devices as verified ONNX patches.

Importing this package stays light (no torch): devices use :mod:`prune_edge.runtime`, servers import the
torch-backed modules (:mod:`prune_edge.train`, :mod:`prune_edge.synth`, ...) explicitly.
"""

from pathlib import Path as _Path

__version__ = "0.1.0"

# In a source checkout, runtime/, exporters/ and models/ sit beside this folder and setuptools maps
# them to prune_edge.* (pyproject's package-dir). When Python imports this folder directly (e.g.
# `python -c ...` in the repository root), look for those sub-packages in the checkout root too, so
# the checkout behaves like the installed package. Installed copies have real sub-folders instead.
_root = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "runtime").is_dir() and (_root / "runtime" / "errors.py").is_file():
    __path__.append(str(_root))  # noqa: F821  (the package's own __path__)
del _Path, _root

"""Shared fixtures: one real base (mnist5k MLP, seed 0) and real patches, built once per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from prune_edge.basedir import load_base, train_base  # noqa: E402
from prune_edge.requests import random_forget_ids, write_forget_ids  # noqa: E402
from prune_edge.synth import SynthConfig  # noqa: E402
from prune_edge.unlearn import build_point_patch  # noqa: E402

N_FORGET = 20


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prune-edge")


@pytest.fixture(scope="session")
def mlp_base(workdir) -> Path:
    """The default base: mnist5k, MLP 256-128, seed 0."""
    out = workdir / "base-mlp"
    train_base("mnist5k", "mlp", out, seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def mlp_bundle(mlp_base):
    return load_base(mlp_base)


@pytest.fixture(scope="session")
def forget_ids(mlp_bundle) -> np.ndarray:
    return random_forget_ids(len(mlp_bundle.dataset.x_train), N_FORGET, seed=0)


@pytest.fixture(scope="session")
def forget_file(workdir, forget_ids) -> Path:
    path = workdir / "forget.txt"
    write_forget_ids(path, forget_ids)
    return path


PRUNE_BOUNDS = "dual"  # the default; tests that need the oracle build with bounds="exact"


@pytest.fixture(scope="session")
def patches(workdir, mlp_bundle, forget_ids) -> dict:
    """Real patches for the same 20 points in both modes, with their build reports."""
    out = {}
    for mode in ("prune", "collapse"):
        path = workdir / f"forget20-{mode}.pepatch"
        config = SynthConfig(mode=mode, seed=0, bounds=PRUNE_BOUNDS)
        report = build_point_patch(mlp_bundle, forget_ids, config, path, device="cpu", progress=False)
        out[mode] = (path, report)
    return out


@pytest.fixture(scope="session")
def second_ids(mlp_bundle) -> np.ndarray:
    """Another 20 random training points (seed 1), the request that arrives after the first."""
    return random_forget_ids(len(mlp_bundle.dataset.x_train), N_FORGET, seed=1)


@pytest.fixture(scope="session")
def chain(workdir, mlp_bundle, patches, second_ids) -> dict:
    """A second 20-point patch built --after the first (prune, then collapse): what a device runs next."""
    path = workdir / "second20-collapse.pepatch"
    report = build_point_patch(mlp_bundle, second_ids, SynthConfig(mode="collapse", seed=1), path, device="cpu",
                               progress=False, after=[patches["prune"][0]])
    return {"first": patches["prune"][0], "second": path, "report": report}


def ledger_record(patch_path) -> dict:
    """The server's ledger record of a patch: in ``ledger/`` of the base folder it was built from (found
    next to the patch or up to two folders above it), never beside the patch itself."""
    from prune_edge.ledger import ENTRY_SUFFIX, read_entry
    from prune_edge.runtime import read_patch_file

    path = Path(patch_path)
    assert not Path(str(path) + ".request.json").exists() and not Path(str(path) + ENTRY_SUFFIX).exists()
    pid = read_patch_file(path).manifest.patch_id
    for root in (path.parent, path.parent.parent, path.parent.parent.parent):
        hits = sorted(root.glob(f"**/ledger/{pid}{ENTRY_SUFFIX}"))
        if hits:
            return read_entry(hits[0])
    raise AssertionError(f"no ledger record of patch {pid} near {path}")

"""The command line as an operator meets it, in real subprocesses: overwrite refusal, quiet exports,
writing samples for the device commands (issue 14)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from prune_edge.cli import EXIT_FAILURE  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``prune-edge ARGS`` as a user runs it: a fresh interpreter, real stdout/stderr and exit code."""
    return subprocess.run([sys.executable, "-m", "prune_edge.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def digits_base(tmp_path_factory) -> Path:
    """A small real base (digits, 2 epochs) trained by the CLI in a subprocess, whose stderr the
    noise test reads."""
    root = tmp_path_factory.mktemp("operator")
    result = _cli("train-base", "--dataset", "digits", "--epochs", "2", "--out", "b", "--json", cwd=root)
    assert result.returncode == 0, result.stderr
    (root / "train.stderr").write_text(result.stderr)
    return root / "b"


def test_train_base_prints_no_exporter_noise(digits_base):
    """torch's exporter warns about torchvision ops it skips and about a pytree deprecation on every
    export; neither is the user's business, so train-base's stderr carries neither."""
    err = (digits_base.parent / "train.stderr").read_text()
    assert "torchvision" not in err and "FutureWarning" not in err and "Warning" not in err, err


def test_train_base_refuses_to_overwrite_a_base_unless_forced(digits_base):
    """An existing base is refused before any training (one line, exit 1, nothing written), naming the
    patches bound to it; --force overwrites it."""
    root = digits_base.parent
    (root / "f.txt").write_text("1\n2\n")
    built = _cli("build-patch", "--base", "b", "--forget", "f.txt", "--mode", "collapse", "--out", "p.pepatch",
                 "--json", cwd=root)
    assert built.returncode == 0, built.stderr
    # the request (ids + salt) goes to the base's ledger, not beside the file devices download
    assert not (root / "p.pepatch.request.json").exists()
    records = list((digits_base / "ledger").glob("*.request.json"))
    assert len(records) == 1 and json.loads(records[0].read_text())["ids"] == [1, 2]
    record_bytes = records[0].read_bytes()
    (digits_base / "copy.pepatch").write_bytes((root / "p.pepatch").read_bytes())
    (root / "junk.pepatch").write_bytes(b"not a zip")  # unreadable: not counted, not an error
    before = _digest(digits_base)

    refused = _cli("train-base", "--dataset", "digits", "--epochs", "2", "--out", "b", cwd=root)
    assert refused.returncode == EXIT_FAILURE
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr  # no progress bar either: refused before training
    assert lines[0].startswith("error: b: expected a new folder, found an existing base")
    assert "2 patch files bound to it" in lines[0] and "--force" in lines[0]
    assert refused.stdout == "" and _digest(digits_base) == before
    assert not [p for p in root.iterdir() if p.name.startswith(".b.")]  # no temp folder left

    forced = _cli("train-base", "--dataset", "digits", "--epochs", "3", "--out", "b", "--force", "--json", cwd=root)
    assert forced.returncode == 0, forced.stderr
    card = json.loads(forced.stdout)
    assert card["training"]["epochs"] == 3
    assert json.loads((digits_base / "card.json").read_text())["training"]["epochs"] == 3
    # the requests outlive the base they were made for: a retrained base keeps the ledger
    assert [p.read_bytes() for p in (digits_base / "ledger").glob("*.request.json")] == [record_bytes]


def test_train_base_names_no_patches_when_none_are_bound(tmp_path, digits_base):
    """A base with no patch beside it is still refused; the message then names none."""
    import shutil

    shutil.copytree(digits_base, tmp_path / "b", ignore=shutil.ignore_patterns("*.pepatch"))
    refused = _cli("train-base", "--dataset", "digits", "--out", "b", cwd=tmp_path)
    assert refused.returncode == EXIT_FAILURE
    assert refused.stderr.strip() == "error: b: expected a new folder, found an existing base; pass --force to overwrite it"


def test_dataset_sample_writes_one_model_input_and_prints_its_label(tmp_path):
    """dataset sample writes exactly the image every command uses, as the (1, C, H, W) batch the
    device commands take, and prints its label; a bad index writes nothing."""
    from click.testing import CliRunner

    from prune_edge.cli import main
    from prune_edge.data import load_dataset

    runner = CliRunner()
    ds = load_dataset("digits")
    out = tmp_path / "s.npy"
    result = runner.invoke(main, ["dataset", "sample", "digits", "--split", "test", "--index", "7", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    x = np.load(out)
    assert x.dtype == np.float32 and x.shape == (1, 1, 8, 8) and np.array_equal(x[0], ds.x_test[7])
    assert doc["label"] == int(ds.y_test[7]) and doc["shape"] == [1, 1, 8, 8] and doc["split"] == "test"
    table = runner.invoke(main, ["dataset", "sample", "digits", "--index", "3", "--out", str(out)])
    assert table.exit_code == 0 and table.stdout.splitlines()[0].split() == ["label", str(int(ds.y_train[3]))]

    for index in ("1437", "-1"):
        bad = tmp_path / f"bad{index}.npy"
        result = runner.invoke(main, ["dataset", "sample", "digits", "--index", index, "--out", str(bad)])
        assert result.exit_code == EXIT_FAILURE
        err = result.stderr.strip().splitlines()
        assert err == [f"error: digits: expected an index in [0, 1437) of the train split, found {index}"]
        assert not bad.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npy"]  # no temp files left


# One scheme for every command: 2 usage (an option missing or malformed), 1 bad input (a file missing,
# unreadable or of the wrong kind), 3 a patch that exists and failed verification; one line on stderr.
EXIT_CASES = [
    pytest.param(["certify", "--base", "{base}", "--patch", "missing.pepatch"], 1, "missing.pepatch: expected a patch file", id="certify-missing-patch"),
    pytest.param(["certify", "--base", "missing.onnx", "--patch", "{patch}"], 1, "missing.onnx: expected a base model file", id="certify-missing-base"),
    pytest.param(["certify", "--base", "{base}", "--patch", "{patch}", "--probe", "missing.npy"], 1, "missing.npy: expected a .npy", id="certify-missing-probe"),
    pytest.param(["certify", "--base", "{base}", "--patch", "{patch}", "--policy", "missing.json"], 1, "missing.json: expected a device policy", id="certify-missing-policy"),
    pytest.param(["certify", "--base", "{base}", "--patch", "."], 1, ".: expected a patch file (.pepatch), found a folder", id="certify-folder-as-patch"),
    pytest.param(["certify", "--base", "{base}", "--patch", "junk.pepatch"], 3, "junk.pepatch refused (format)", id="certify-junk-patch"),
    pytest.param(["certify", "--base", "{base}"], 2, "Missing option '--patch'", id="certify-no-patch-option"),
    pytest.param(["predict", "--base", "{base}", "--input", "missing.npy"], 1, "missing.npy: expected a .npy input", id="predict-missing-input"),
    pytest.param(["predict", "--base", "{base}", "--patch", "missing.pepatch", "--input", "x.npy"], 1, "missing.pepatch: expected a patch file", id="predict-missing-patch"),
    pytest.param(["predict", "--base", "{base}", "--patch", "junk.pepatch", "--input", "x.npy"], 3, "refused (format)", id="predict-junk-patch"),
    pytest.param(["verify-sample", "--base", "{base}", "--patch", "{patch}", "--sample", "missing.npy", "--label", "1"], 1, "missing.npy: expected a .npy sample", id="verify-missing-sample"),
    pytest.param(["verify-sample", "--base", "{base}", "--patch", "{patch}", "--sample", "x.npy", "--label", "1", "--card", "missing.json"], 1, "missing.json: expected a base card", id="verify-missing-card"),
    pytest.param(["verify-sample", "--base", "{base}", "--patch", "{patch}", "--sample", "x.npy"], 2, "Missing option '--label'", id="verify-no-label"),
    pytest.param(["inspect", "missing.pepatch"], 1, "missing.pepatch: expected a patch file", id="inspect-missing"),
    pytest.param(["inspect", "junk.pepatch"], 3, "refused (format)", id="inspect-junk"),
    pytest.param(["inspect"], 2, "Missing argument 'PATCH'", id="inspect-no-argument"),
    pytest.param(["build-patch", "--base", "missing-base", "--forget", "f.txt", "--out", "out.pepatch"], 1, "missing-base: expected a base folder", id="build-missing-base"),
    pytest.param(["build-patch", "--base", "{base}", "--forget", "f.txt", "--out", "out.pepatch"], 1, "expected a base folder (from `prune-edge train-base`), found a file", id="build-file-as-base"),
    pytest.param(["build-patch", "--base", "{base_dir}", "--forget", "missing.txt", "--out", "out.pepatch"], 1, "missing.txt: expected a forget file", id="build-missing-forget"),
    pytest.param(["build-patch", "--base", "{base_dir}", "--forget", "f.txt", "--after", "missing.pepatch", "--out", "out.pepatch"], 1, "missing.pepatch: expected a patch file", id="build-missing-after"),
    pytest.param(["build-patch"], 2, "Missing option '--base'", id="build-no-arguments"),
    pytest.param(["train-base"], 2, "Missing option '--out'", id="train-no-out"),
    pytest.param(["dataset", "sample", "digits", "--index", "1"], 2, "Missing option '--out'", id="sample-no-out"),
    pytest.param(["bench", "--base", "missing-base", "--out", "o"], 1, "missing-base: expected a base folder", id="bench-missing-base"),
    pytest.param(["--bogus"], 2, "No such option '--bogus'", id="unknown-option"),
]


@pytest.mark.parametrize("args, code, message", EXIT_CASES)
def test_exit_code_scheme(tmp_path, mlp_base, patches, args, code, message):
    """Each case in a real process: the documented code, exactly one line on stderr saying what was
    expected and found, nothing on stdout, nothing written."""
    (tmp_path / "junk.pepatch").write_bytes(b"not a zip")
    (tmp_path / "f.txt").write_text("1\n2\n")
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 28, 28), np.float32))
    before = sorted(p.name for p in tmp_path.iterdir())
    fill = {"base": str(mlp_base / "base.onnx"), "base_dir": str(mlp_base), "patch": str(patches["prune"][0])}
    result = _cli(*[a.format(**fill) for a in args], cwd=tmp_path)
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert result.stdout == "" or code == 3  # certify's table of checks goes to stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_build_patch_checks_the_request_before_loading_the_base(tmp_path, mlp_base, monkeypatch):
    """A bad forget file is refused from the card's training-set size, before the seconds of loading
    the base and its dataset."""
    from click.testing import CliRunner

    import prune_edge.basedir
    from prune_edge.cli import main

    def no_load(*a, **k):
        raise AssertionError("load_base called before the forget file was checked")

    monkeypatch.setattr(prune_edge.basedir, "load_base", no_load)
    (tmp_path / "f.txt").write_text("3\n4000\n")
    result = CliRunner().invoke(main, ["build-patch", "--base", str(mlp_base), "--forget", str(tmp_path / "f.txt"),
                                       "--out", str(tmp_path / "o.pepatch")])
    assert result.exit_code == EXIT_FAILURE, result.output
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'f.txt'}:2: expected an index in [0, 4000), found 4000"]


def test_outputs_follow_the_umask_and_the_ledger_stays_private(tmp_path):
    """Files and folders the CLI writes get the user's umask, like any tool's (atomic writes go
    through mkstemp/mkdtemp, which would make them 0600/0700); the ledger, which holds the salts that
    open a patch's id commitments, is 0700/0600 whatever the umask."""
    import os
    import stat

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "prune_edge.cli", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300, preexec_fn=lambda: os.umask(0o027))

    def mode(p: Path) -> int:
        return stat.S_IMODE(p.stat().st_mode)

    assert run("train-base", "--dataset", "digits", "--epochs", "1", "--out", "b", "--json").returncode == 0
    assert mode(tmp_path / "b") == 0o750
    assert {mode(p) for p in (tmp_path / "b").iterdir() if p.is_file()} == {0o640}
    assert run("dataset", "sample", "digits", "--index", "3", "--out", "s.npy").returncode == 0
    assert mode(tmp_path / "s.npy") == 0o640
    (tmp_path / "f.txt").write_text("3\n")
    built = run("build-patch", "--base", "b", "--forget", "f.txt", "--mode", "collapse", "--out", "p.pepatch", "--json")
    assert built.returncode == 0, built.stderr
    assert mode(tmp_path / "p.pepatch") == 0o640
    ledger = tmp_path / json.loads(built.stdout)["ledger_entry"]
    assert ledger.parent == tmp_path / "b" / "ledger"
    assert mode(ledger.parent) == 0o700 and mode(ledger) == 0o600
    # --ledger puts the record where the operator says (e.g. a folder only the service account reads)
    built = run("build-patch", "--base", "b", "--forget", "f.txt", "--mode", "collapse", "--out", "q.pepatch",
                "--ledger", "private/requests", "--json")
    assert built.returncode == 0, built.stderr
    assert (tmp_path / json.loads(built.stdout)["ledger_entry"]).parent == tmp_path / "private" / "requests"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "f.txt", "p.pepatch", "private", "q.pepatch", "s.npy"]

"""The ``prune-edge`` command line.

Data goes to stdout (``--json`` prints exactly one JSON document), diagnostics and progress to stderr.
Exit codes, in one place: 0 ok, 1 failure (bad input, not forgotten), 2 usage error, 3 a patch failed
verification. Device commands (predict, certify, verify-sample, inspect) never import torch; server
commands import the torch-backed modules only when they run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

import click
import numpy as np

from .report import pct as _pct
from .report import table as _table
from .runtime.errors import InputError, PatchVerificationError, PruneEdgeError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_VERIFY = 0, 1, 2, 3


class _Group(click.Group):
    """Turns prune-edge's named errors into one line on stderr and the documented exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PatchVerificationError as exc:
            click.echo(f"error: patch refused ({exc.check}): {exc}", err=True)
            ctx.exit(EXIT_VERIFY)
        except PruneEdgeError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(EXIT_FAILURE)


def _emit_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def _load_array(path: str) -> np.ndarray:
    try:
        x = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        raise InputError(f"{path}: expected a .npy array file (numpy.save), found unreadable or pickled data") from None
    if not isinstance(x, np.ndarray):
        raise InputError(f"{path}: expected a single .npy array, found an archive")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        # NaN reaches every logit and argmax reads it as the maximum: a label would be noise.
        raise InputError(f"{path}: expected finite values, found {int((~np.isfinite(x)).sum())} NaN or infinite")
    return x


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="prune-edge")
def main() -> None:
    """Certified machine unlearning (PRUNE) shipped to edge devices as verified ONNX patches."""


# ----------------------------------------------------------------------------- data
@main.group()
def dataset() -> None:
    """Inspect and export datasets (named: mnist5k, digits; or IDX / CIFAR-10 / .npz files)."""


@dataset.command("export")
@click.argument("name_or_path")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Destination .npz file.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def dataset_export(name_or_path: str, out: str, as_json: bool) -> None:
    """Write the exact arrays every command uses (x_train, y_train, x_test, y_test) to .npz."""
    from .data import load_dataset, save_npz

    ds = load_dataset(name_or_path)
    save_npz(ds, out)
    summary = {**ds.summary(), "out": out}
    if as_json:
        _emit_json(summary)
    else:
        click.echo(_table([(k, v) for k, v in summary.items()]))


# ----------------------------------------------------------------------------- server
@main.command("train-base")
@click.option("--dataset", "dataset_name", default="mnist5k", show_default=True, help="Named dataset or a path.")
@click.option("--arch", type=click.Choice(["mlp", "cnn"]), default="mlp", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Default: 15 (mlp), 12 (cnn).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Base folder to write.")
@click.option("--json", "as_json", is_flag=True, help="Print the card as JSON.")
def train_base_cmd(dataset_name: str, arch: str, seed: int, epochs: int | None, device: str, out: str, as_json: bool) -> None:
    """Train a ReLU base model and write base.onnx, weights.pt and card.json (atomically)."""
    from .basedir import train_base

    _check_device(device)
    card = train_base(dataset_name, arch, out, seed=seed, epochs=epochs, device=device, progress=not as_json)
    if as_json:
        _emit_json(card)
    else:
        click.echo(_card_table(card))


def _check_device(device: str) -> None:
    """--device cuda without a GPU is a usage error, caught before any work starts."""
    from .train import resolve_device

    try:
        resolve_device(device)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--device") from None


def _card_table(card: dict) -> str:
    t, m, o = card["training"], card["metrics"], card["onnx"]
    rows = [
        ("dataset", f"{card['dataset']['name']} ({card['dataset']['split']})"),
        ("arch", f"{card['arch']} {card['config']}"),
        ("seed / epochs", f"{t['seed']} / {t['epochs']}"),
        ("train accuracy (onnxruntime)", _pct(m["train_accuracy"])),
        ("test accuracy (onnxruntime)", _pct(m["test_accuracy"])),
        ("training seconds", f"{t['training_seconds']:.2f} on {t['device']}"),
        ("base.onnx sha256", o["sha256"]),
        ("opset / IR", f"{o['opset']} / {o['ir_version']}"),
        ("tensors", f"input {o['input']}, logits {o['logits']}, pre-activations {', '.join(o['preacts'])}"),
    ]
    return _table(rows)


@main.command("build-patch")
@click.option("--base", "base_dir", required=True, type=click.Path(exists=True, file_okay=False), help="Base folder (train-base).")
@click.option("--forget", "forget_path", required=True, type=click.Path(dir_okay=False), help="Training-split ids, one per line.")
@click.option("--mode", type=click.Choice(["prune", "collapse"]), default="prune", show_default=True)
@click.option("--gate-layers", default=None, help="'all' or 'last:K'. Default: all (mlp), last:1 (cnn).")
@click.option("--gamma", type=click.FloatRange(min=0, min_open=True), default=None, help="Fixed gate sharpness (default: widest safe gate per patch).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random confusing labels.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Patch file to write (.pepatch).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def build_patch_cmd(base_dir, forget_path, mode, gate_layers, gamma, seed, device, out, as_json) -> None:
    """Compute a certified PRUNE patch that makes the base forget the given training points."""
    from .basedir import load_base
    from .requests import read_forget_ids
    from .synth import SynthConfig
    from .unlearn import build_point_patch

    _check_device(device)
    bundle = load_base(base_dir)
    ids = read_forget_ids(forget_path, len(bundle.dataset.x_train))
    layers = gate_layers or ("all" if bundle.card["arch"] == "mlp" else "last:1")
    try:
        from .regions import parse_gate_layers

        parse_gate_layers(layers, bundle.net.n_hidden)
        config = SynthConfig(mode=mode, gate_layers=layers, gamma=gamma, seed=seed)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--gate-layers/--gamma") from None
    report = build_point_patch(bundle, ids, config, out, device=device, progress=not as_json)
    if as_json:
        _emit_json(report)
    else:
        click.echo(_build_table(report))


def _build_table(r: dict) -> str:
    ev = r["evaluation"]
    acc = ev["accuracy"]
    loc = ev["locality"]
    rows = [("points / records", f"{r['points']} / {r['records']}"), ("mode", f"{r['mode']}, gate layers {r['gate_layers']}")]
    rows += [(f"{k} accuracy", f"{_pct(v['before'])} -> {_pct(v['after'])}") for k, v in acc.items()]
    rows += [(f"{k} logits unchanged", f"{v['unchanged']}/{v['points']} (gates touched {v['gate_touched']})") for k, v in loc.items()]
    rows += [
        ("forget points on target label", f"{ev['forget_to_target']}/{ev['forget_points']}"),
        ("build seconds", f"{r['build_seconds']:.3f} (base training {r['base_training_seconds']:.2f})"),
        ("patch bytes", f"{r['patch_bytes']} ({_pct(r['patch_to_base'])} of base {r['base_bytes']})"),
        ("patch", f"{r['patch']} (id {r['patch_id']})"),
    ]
    return _table(rows)


# ----------------------------------------------------------------------------- device
def _patched(base: str, patches: Sequence[str]):
    from .runtime.model import PatchedModel

    return PatchedModel(base, list(patches))


@main.command()
@click.option("--base", required=True, type=click.Path(exists=True, dir_okay=False), help="base.onnx")
@click.option("--patch", "patches", multiple=True, type=click.Path(dir_okay=False), help="Patch file(s), applied in order.")
@click.option("--input", "input_path", required=True, type=click.Path(exists=True, dir_okay=False), help="float32 .npy of shape (N, C, H, W).")
@click.option("--logits-out", type=click.Path(dir_okay=False), default=None, help="Write the logits to this .npy.")
@click.option("--json", "as_json", is_flag=True, help="Print labels as JSON.")
def predict(base: str, patches: tuple[str, ...], input_path: str, logits_out: str | None, as_json: bool) -> None:
    """Run the base (plus verified patches) with onnxruntime and print labels."""
    model = _patched(base, patches)
    x = _load_array(input_path)
    logits = model.logits(x)
    if logits_out:
        from .runtime.fileio import atomic_path

        with atomic_path(logits_out) as tmp, open(tmp, "wb") as fh:
            np.save(fh, logits)
    labels = logits.argmax(1).tolist()
    if as_json:
        _emit_json({"labels": labels, "patches": [p.manifest.patch_id for p in model.patches]})
    else:
        click.echo("\n".join(map(str, labels)))


@main.command()
@click.option("--base", required=True, type=click.Path(exists=True, dir_okay=False), help="base.onnx the patches must be bound to.")
@click.option("--patch", "patches", multiple=True, required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
def certify(base: str, patches: tuple[str, ...], as_json: bool) -> None:
    """Check patch files (format, integrity, binding, structure, certificate); exit 0 only if all pass."""
    from .runtime.base import BaseGraph
    from .runtime.verify import certify_patch

    graph = BaseGraph.load(base)
    reports = [certify_patch(p, graph) for p in patches]
    ok = all(r.passed for r in reports)
    if as_json:
        _emit_json({"passed": ok, "base_sha256": graph.sha256, "patches": [r.to_json() for r in reports]})
    else:
        for r in reports:
            click.echo(f"{r.source}: {'PASS' if r.passed else 'FAIL'}")
            click.echo(_table([(f"  {c.name}", c.status, c.detail) for c in r.checks]))
    if not ok:
        for r in reports:
            if r.failure:
                click.echo(f"error: {r.source} refused ({r.failure.name}): {r.failure.detail}", err=True)
        sys.exit(EXIT_VERIFY)


@main.command("verify-sample")
@click.option("--base", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--patch", "patches", multiple=True, required=True, type=click.Path(dir_okay=False))
@click.option("--sample", required=True, type=click.Path(exists=True, dir_okay=False), help="float32 .npy: one sample (C,H,W) or (1,C,H,W).")
@click.option("--label", required=True, type=int, help="The sample's true label.")
@click.option("--json", "as_json", is_flag=True)
def verify_sample(base: str, patches: tuple[str, ...], sample: str, label: int, as_json: bool) -> None:
    """Check that your own sample is forgotten (patched label != its label) and which patch covers it.

    Exit 0 if forgotten, 1 if the patched model still predicts the label."""
    model = _patched(base, patches)
    x = _load_array(sample)
    if x.ndim == len(model.base.input_shape):
        x = x[None]
    if len(x) != 1:
        raise InputError(f"{sample}: expected one sample, found {len(x)}")
    base_logits = model.base_logits(x)
    if not 0 <= label < base_logits.shape[1]:
        # An impossible label would always read as "forgotten".
        raise InputError(f"--label: expected a class in [0, {base_logits.shape[1]}), found {label}")
    base_label = int(base_logits.argmax(1)[0])
    after = int(model.predict(x)[0])
    covering = []
    for vp, g in zip(model.patches, model.gates(x)):
        for k, v in enumerate(g[0]):
            if v > 0:
                covering.append({"patch_id": vp.manifest.patch_id, "record": k, "gate": float(v), "target": vp.manifest.records[k].target})
    forgotten = after != label
    doc = {"label": label, "base_prediction": base_label, "patched_prediction": after, "forgotten": forgotten, "covered_by": covering}
    if as_json:
        _emit_json(doc)
    else:
        rows = [("label", label), ("base prediction", base_label), ("patched prediction", after), ("forgotten", "yes" if forgotten else "NO")]
        rows += [("covered by", f"patch {c['patch_id']} record {c['record']} (gate {c['gate']:.3f}, target {c['target']})") for c in covering] or [("covered by", "no patch gate is open")]
        click.echo(_table(rows))
    if not forgotten:
        sys.exit(EXIT_FAILURE)


@main.command()
@click.argument("patch", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
def inspect(patch: str, as_json: bool) -> None:
    """Show a patch file's manifest (after checking its container and digest)."""
    from .runtime.patchfile import read_patch_file

    pf = read_patch_file(patch)
    m = pf.manifest
    if as_json:
        _emit_json({"size": pf.size, "manifest": m.to_json()})
        return
    rows = [
        ("patch id", m.patch_id),
        ("created", m.created),
        ("mode", m.mode),
        ("file bytes", pf.size),
        ("base sha256", m.base_sha256),
        ("base opset / IR", f"{m.base_opset} / {m.base_ir_version}"),
        ("reads", f"{m.logits_name}, " + ", ".join(f"{g.name}{list(g.shape)}" for g in m.gated)),
        ("records", len(m.records)),
        ("points", m.request.get("n_points", "?")),
        ("targets", " ".join(str(r.target) for r in m.records)),
        ("gamma range", f"{min(r.gamma for r in m.records):.4g} .. {max(r.gamma for r in m.records):.4g}"),
        ("specification", f"rows e_j - e_target in [{m.q_lower:g}, {m.q_upper:g}]"),
    ]
    click.echo(_table(rows))


# ----------------------------------------------------------------------------- demo
@main.command()
@click.option("--out", default="prune-edge-demo", show_default=True, type=click.Path(file_okay=False), help="Working folder.")
@click.option("--points", type=click.IntRange(min=1), default=20, show_default=True, help="Random training points to forget.")
@click.option("--mode", type=click.Choice(["prune", "collapse"]), default="prune", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def demo(out: str, points: int, mode: str, seed: int, device: str, as_json: bool) -> None:
    """The whole pipeline on mnist5k: train, forget random points, build, certify, compose, compare."""
    from .demo import run_demo

    _check_device(device)
    result = run_demo(Path(out), points=points, mode=mode, seed=seed, device=device, progress=not as_json)
    if as_json:
        _emit_json(result)
    else:
        click.echo(result["table"])


from .bench import bench  # noqa: E402  (torch is imported only when the command runs)

main.add_command(bench)


if __name__ == "__main__":  # pragma: no cover
    main()

"""The ``prune-edge`` command line.

Data goes to stdout (``--json`` prints exactly one JSON document), diagnostics and progress to stderr.
Exit codes, in one place: 0 ok, 1 failure (bad input: a file missing, unreadable or wrong, checked
before any slow work; not forgotten), 2 usage error (an option missing or malformed), 3 a patch that
exists failed verification. Every error is one line on stderr, usage errors included. Device
commands (predict, certify, verify-sample, inspect) never import torch; server
commands import the torch-backed modules only when they run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

import click
import numpy as np

from .cli_common import device_options as _device_options
from .cli_common import emit_json as _emit_json
from .cli_common import jsonable as _jsonable
from .cli_common import policy_from as _policy
from .cli_common import require as _require
from .cli_common import require_device_inputs as _require_device_inputs
from .report import pct as _pct
from .report import table as _table
from .runtime.errors import InputError, PatchVerificationError, PruneEdgeError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_VERIFY = 0, 1, 2, 3


class _OneLineUsageError(click.UsageError):
    """A usage error shown as one line on stderr (exit 2), like every other error, instead of click's
    usage block: what was wrong and where the help is."""

    def show(self, file: Any = None) -> None:
        hint = f" (see '{self.ctx.command_path} --help')" if self.ctx is not None else ""
        click.echo(f"error: {self.format_message()}{hint}", err=True)


_NO_ARGS_IS_HELP: Any = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2


def _one_line(exc: click.UsageError) -> click.UsageError:
    """The same usage error, shown on one line; bare `prune-edge` (or a bare group) still gets its help."""
    if isinstance(exc, (_OneLineUsageError, _NO_ARGS_IS_HELP)):
        return exc
    return _OneLineUsageError(exc.format_message(), exc.ctx)


class _Group(click.Group):
    """Turns prune-edge's named errors into one line on stderr and the documented exit code.

    One scheme everywhere: 2 usage (a missing or malformed option), 1 bad input (a file that is
    missing, unreadable or wrong), 3 a patch that exists and failed a verification check."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            raise _one_line(exc) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise _one_line(exc) from None
        except PatchVerificationError as exc:
            click.echo(f"error: patch refused ({exc.check}): {exc}", err=True)
            ctx.exit(EXIT_VERIFY)
        except PruneEdgeError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(EXIT_FAILURE)
        except KeyboardInterrupt:
            import signal

            # Leaving now (workers already stopped, nothing renamed into place): a second Ctrl-C must
            # not interrupt the exit with an atexit traceback.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            click.echo("interrupted", err=True)
            ctx.exit(130)


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


@dataset.command("sample")
@click.argument("name_or_path")
@click.option("--index", required=True, type=int, help="Index into the split (as in forget files).")
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Destination .npy file.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def dataset_sample(name_or_path: str, index: int, split: str, out: str, as_json: bool) -> None:
    """Write one image as float32 (1, C, H, W) in [0, 1] to .npy (atomically) and print its label:
    the input predict, certify --probe and verify-sample take, and the label verify-sample wants."""
    from .data import load_dataset
    from .runtime.fileio import atomic_path

    x, label = load_dataset(name_or_path).sample(index, split)
    with atomic_path(out) as tmp, open(tmp, "wb") as fh:
        np.save(fh, x)
    summary = {"label": label, "index": index, "split": split, "shape": list(x.shape), "dtype": str(x.dtype),
               "range": [float(x.min()), float(x.max())], "out": out}
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
@click.option("--force", is_flag=True, help="Overwrite an existing base folder (its patches stop verifying).")
@click.option("--json", "as_json", is_flag=True, help="Print the card as JSON.")
def train_base_cmd(dataset_name: str, arch: str, seed: int, epochs: int | None, device: str, out: str, force: bool,
                   as_json: bool) -> None:
    """Train a ReLU base model and write base.onnx, weights.pt and card.json (atomically).

    An existing base folder is refused unless --force: every patch is bound to the base's sha256, so
    a silent overwrite would orphan them all."""
    from .basedir import train_base

    _check_device(device)
    card = train_base(dataset_name, arch, out, seed=seed, epochs=epochs, device=device, progress=not as_json,
                      overwrite=force)
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
@click.option("--base", "base_dir", required=True, type=click.Path(), help="Base folder (train-base).")
@click.option("--forget", "forget_path", default=None, type=click.Path(), help="Training-split ids, one per line.")
@click.option("--forget-class", "forget_classes", multiple=True, type=click.IntRange(min=0),
              help="Forget every training point of this class (repeatable; instead of --forget).")
@click.option("--strategy", type=click.Choice(["points", "representatives", "suppress"]), default=None,
              help="How a set becomes records (default: points; see prune_edge.sets), or for --forget-class a "
                   "suppression patch (the class default; see prune_edge.suppress). Recorded in the manifest.")
@click.option("--margin", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="suppress: how far below the best other class the class's logit is kept.")
@click.option("--budget", type=click.IntRange(min=1), default=None, help="Most records the patch may hold.")
@click.option("--allow-partial", is_flag=True, help="Write the patch even if the budget leaves points uncertified.")
@click.option("--mode", type=click.Choice(["prune", "collapse"]), default="prune", show_default=True)
@click.option("--gate-layers", default=None, help="'all' or 'last:K'. Default: all (mlp, imported), last:1 (cnn).")
@click.option("--gamma", type=click.FloatRange(min=0, min_open=True), default=None, help="Fixed gate sharpness (default: widest safe gate per patch).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random confusing labels.")
@click.option("--bounds", type=click.Choice(["dual", "exact"]), default="dual", show_default=True,
              help="prune: sound Lagrangian dual bounds (torch, GPU when present) or exact HiGHS LPs.")
@click.option("--dual-steps", "dual_steps", type=click.IntRange(min=0), default=None,
              help="prune, dual bounds: ascent steps (default 120). Fewer build faster with looser bounds (a larger "
                   "shift); the certificate holds for any count, 0 gives the box bounds. See docs/sets.md.")
@click.option("--shift", type=click.Choice(["per-row", "common"]), default="per-row", show_default=True,
              help="prune: move each specification row by what its own upper bound needs (PRUNE's closed form) or every "
                   "row by what the region's largest needs (the target's logit raised; smaller files, more extreme "
                   "outputs on the forgotten regions). Both are certified. See docs/sets.md.")
@click.option("--tighten", type=click.Choice(["largest", "all"]), default="largest", show_default=True,
              help="prune, dual bounds of an MLP base: tighten each region's largest upper bound to the end and stop rows "
                   "clearly below it early (about 3x faster; those rows shift a little more than they need), or every "
                   "bound (what other bases always do).")
@click.option("--after", "after", multiple=True, type=click.Path(),
              help="A patch devices already run (repeatable): checked together with the new one.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Patch file to write (.pepatch).")
@click.option("--ledger", "ledger", type=click.Path(file_okay=False), default=None,
              help="Server-side folder recording the request (ids + salt). Default: BASE/ledger. Never ship it.")
@click.option("--target", "target", type=click.Choice(["confuse", "unseen"]), default="confuse", show_default=True,
              help="confuse: PRUNE's random wrong label; unseen: the calibrated output of models that never saw the "
                   "points (collapse-form records; implies --mode collapse; see prune_edge.targets). For a class "
                   "suppression, unseen fits a margin that follows the input, max(--margin, w . logits + b), on the "
                   "class's training points (prune_edge.targets.affine_suppression_margin).")
@click.option("--margin-rule", "margin_rule", type=click.Choice(["match", "median"]), default=None,
              help="suppress: the margin from the base's calibration (models trained without the class; no test "
                   "point) instead of --margin, for a suppression run after the class's --target unseen records "
                   "(pass that patch with --after; see prune_edge.targets.class_suppression_margin).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def build_patch_cmd(base_dir, forget_path, forget_classes, strategy, margin, budget, allow_partial, mode, gate_layers, gamma, seed, bounds, dual_steps, shift, tighten, after, device, out, ledger, target, margin_rule, as_json) -> None:
    """Compute a certified PRUNE patch that makes the base forget the given training points."""
    from .basedir import load_base, read_card
    from .requests import read_forget_ids
    from .synth import SynthConfig

    _check_device(device)
    _require(base_dir, "a base folder (from `prune-edge train-base`)", folder=True)
    if (forget_path is None) == (not forget_classes):
        raise click.UsageError("expected exactly one of --forget IDS.txt or --forget-class K")
    if strategy == "suppress" and not forget_classes:
        raise click.UsageError("--strategy suppress: expected --forget-class K (a suppression forgets whole classes)")
    if margin_rule and (not forget_classes or (strategy or "suppress") != "suppress"):
        raise click.UsageError(f"--margin-rule: expected --forget-class K with the suppress strategy, found "
                               f"{'--strategy ' + strategy if forget_classes else '--forget IDS.txt'}")
    if margin_rule and click.get_current_context().get_parameter_source("margin").name != "DEFAULT":
        raise click.UsageError("--margin-rule: expected no --margin (the rule computes the margin)")
    if margin_rule and target == "unseen":
        raise click.UsageError("--margin-rule: expected no --target unseen (its margin is fitted per input; --margin is its floor)")
    _require(forget_path, "a forget file of training-split ids")
    for p in after:
        _require(p, "a patch file (.pepatch) for --after")
    # The request is checked against the card's training-set size before the seconds of loading the base.
    n_train = read_card(base_dir).get("dataset", {}).get("n_train")
    if isinstance(n_train, int) and forget_path is not None:
        read_forget_ids(forget_path, n_train)
    bundle = load_base(base_dir)
    if forget_classes and (strategy or "suppress") == "suppress":  # the class default (prune_edge.suppress)
        from .suppress import build_class_suppression, suppress_table_rows

        if margin_rule:  # calibrated on the server's models without the class (cached in the base folder)
            from .targets import calibrated_suppression_margin

            margin = calibrated_suppression_margin(bundle, forget_classes, margin_rule, progress=not as_json)
        affine = None
        if target == "unseen":  # the margin a model without the class leaves, per input (cached calibration)
            from .targets import affine_suppression_margin

            affine = affine_suppression_margin(bundle, forget_classes, progress=not as_json)
        report = build_class_suppression(bundle, forget_classes, out, margin=margin, after=after, ledger=ledger, affine=affine)
        _emit_json(report) if as_json else click.echo(_table(suppress_table_rows(report)))
        return
    if forget_classes:
        from .sets import class_ids

        ids = class_ids(bundle.dataset.y_train, forget_classes, bundle.dataset.n_classes)
    else:
        ids = read_forget_ids(forget_path, len(bundle.dataset.x_train))
    layers = gate_layers or ("all" if bundle.card["arch"] in ("mlp", "imported") else "last:1")
    try:
        from .regions import parse_gate_layers

        parse_gate_layers(layers, bundle.net.n_hidden)
        if target == "unseen" and click.get_current_context().get_parameter_source("mode").name == "DEFAULT":
            mode = "collapse"
        steps = {} if dual_steps is None else {"dual_steps": dual_steps}
        config = SynthConfig(mode=mode, gate_layers=layers, gamma=gamma, seed=seed, bounds=bounds, target=target, shift=shift,
                             tighten=tighten, **steps)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--gate-layers/--gamma/--target") from None
    from .sets import DEFAULT_STRATEGY, SetConfig, build_set_patch

    sets = SetConfig(strategy=strategy or DEFAULT_STRATEGY, budget=budget, allow_partial=allow_partial)
    report = build_set_patch(bundle, ids, config, out, sets, device=device, progress=not as_json, after=after, ledger=ledger,
                             classes=list(forget_classes) if forget_classes else None)
    if as_json:
        _emit_json(report)
    elif report.get("answered_from_chain"):
        click.echo(f"all {report['points']} points are already forgotten by the chain given with --after; no patch written")
    else:
        click.echo(_build_table(report))


def _seconds(v: float | None) -> str:
    return "n/a (imported)" if v is None else f"{v:.2f}"


def _build_table(r: dict) -> str:
    ev = r["evaluation"]
    acc = ev["accuracy"]
    loc = ev["locality"]
    rows = [("points / records", f"{r['points']} / {r['records']}"), ("mode", f"{r['mode']}, gate layers {r['gate_layers']}")]
    if r["already_covered"]:
        rows.append(("already covered by --after", r["already_covered"]))
    if "strategy" in r:  # prune_edge.sets: how the set became records, and where every point ended
        syn = r["synthesis"]
        rows.append(("strategy / points certified", f"{r['strategy']} / {syn['certified']} of {syn['points'] - syn['already_covered']}"))
        if r["uncertified_ids"]:
            rows.append(("left uncertified (--allow-partial)", " ".join(map(str, r["uncertified_ids"]))))
    rows += [(f"{k} accuracy", f"{_pct(v['before'])} -> {_pct(v['after'])}") for k, v in acc.items()]
    rows += [(f"{k} logits unchanged", f"{v['unchanged']}/{v['points']} (gates touched {v['gate_touched']})") for k, v in loc.items()]
    rows += [
        ("forget points on target label", f"{ev['forget_to_target']}/{ev['forget_patched_here']}"),
        ("build seconds", f"{r['build_seconds']:.3f} (base training {_seconds(r['base_training_seconds'])})"),
        ("patch bytes", f"{r['patch_bytes']} ({_pct(r['patch_to_base'])} of base {r['base_bytes']})"),
        ("patch", f"{r['patch']} (id {r['patch_id']})"),
        ("request recorded in", f"{r['ledger_entry']} (server only)"),
    ]
    return _table(rows)


# ----------------------------------------------------------------------------- device
def _patched(base: str, patches: Sequence[str], card_path: str | None, policy):
    from .runtime.model import PatchedModel

    return PatchedModel(base, list(patches), card_path=card_path, policy=policy)


@main.command()
@click.option("--base", required=True, type=click.Path(), help="base.onnx")
@click.option("--patch", "patches", multiple=True, type=click.Path(), help="Patch file(s), applied in order.")
@click.option("--input", "input_path", required=True, type=click.Path(),
              help="float32 .npy in the model's input layout: (N, C, H, W) for trained bases.")
@click.option("--logits-out", type=click.Path(dir_okay=False), default=None,
              help="Write the (patched) logits to this .npy, wherever they sit in the graph.")
@click.option("--json", "as_json", is_flag=True, help="Print labels (and a classifier tail's outputs) as JSON.")
@_device_options
def predict(base, patches, input_path, logits_out, as_json, card_path, policy_path, max_gate_width) -> None:
    """Run the base (plus verified patches) with onnxruntime and print labels."""
    _require(input_path, "a .npy input array")
    _require_device_inputs(base, patches, card_path, policy_path)
    model = _patched(base, patches, card_path, _policy(policy_path, max_gate_width))
    x = _load_array(input_path)
    logits = model.logits(x)
    if logits_out:
        from .runtime.fileio import atomic_path

        with atomic_path(logits_out) as tmp, open(tmp, "wb") as fh:
            np.save(fh, logits)
    labels = model.labels(x)  # the model's own label output where it has one (a converter's tail)
    if as_json:
        doc = {"labels": labels, "patches": [p.manifest.patch_id for p in model.patches]}
        if model.output_names != (model.logits_name,):  # a classifier tail: every output, patched
            doc["outputs"] = _jsonable(model.outputs(x))
        _emit_json(doc)
    else:
        click.echo("\n".join(map(str, labels)))


@main.command()
@click.option("--base", required=True, type=click.Path(), help="base.onnx the patches must be bound to.")
@click.option("--patch", "patches", multiple=True, required=True, type=click.Path(), help="Patch file(s) the device runs together.")
@click.option("--probe", "probe_path", type=click.Path(), default=None,
              help="float32 .npy of the device's own inputs: measure on how many any gate opens.")
@click.option("--max-open", type=click.FloatRange(0, 1), default=0.01, show_default=True,
              help="With --probe: refuse if gates open on more than this fraction of the inputs.")
@click.option("--json", "as_json", is_flag=True)
@_device_options
def certify(base, patches, probe_path, max_open, as_json, card_path, policy_path, max_gate_width) -> None:
    """Check patch files (format, integrity, binding, structure, locality, certificate), then the set
    (interference) and, with --probe, how often gates open; exit 0 only if all pass, 3 if any fails."""
    from .runtime.base import BaseGraph
    from .runtime.errors import PatchVerificationError as Refused
    from .runtime.model import PatchedModel
    from .runtime.verify import certify_patch, check_patch_set

    _require(probe_path, "a .npy array of probe inputs")
    _require_device_inputs(base, patches, card_path, policy_path)
    policy = _policy(policy_path, max_gate_width)
    x_probe = graph_input = None
    if probe_path:
        x_probe = _load_array(probe_path)  # the user's input is checked before any patch work
    graph = BaseGraph.load(base, card_path)
    if x_probe is not None:
        graph_input = graph.check_input(x_probe)
    graph.card  # a missing or mismatched card is the device's own input error (exit 1), before any patch
    reports = [certify_patch(p, graph, policy) for p in patches]
    ok = all(r.passed for r in reports)
    set_checks: list[tuple[str, str, str]] = []
    failure: tuple[str, str] | None = None
    if ok:
        verified = [r.verified for r in reports]
        try:
            check_patch_set(verified, policy)
            set_checks.append(("interference", "pass", f"{sum(len(v.manifest.records) for v in verified)} records "
                                                       f"in {len(verified)} patches: no region shared by different targets"))
            if probe_path:
                model = PatchedModel(base, verified, base=graph, policy=policy)  # verified above: not checked twice
                fraction = model.probe(graph_input, max_open)
                set_checks.append(("probe", "pass", f"gates open on {fraction:.2%} of {len(graph_input)} probe inputs "
                                                    f"(limit {max_open:.2%})"))
        except Refused as exc:
            set_checks.append((exc.check, "fail", str(exc)))
            failure = (exc.check, str(exc))
    ok = ok and failure is None
    if as_json:
        _emit_json({
            "passed": ok, "base_sha256": graph.sha256, "policy": policy.to_json(),
            "patches": [r.to_json() for r in reports],
            "set": [{"name": n, "status": st, "detail": d} for n, st, d in set_checks],
        })
    else:
        for r in reports:
            click.echo(f"{_safe(r.source)}: {'PASS' if r.passed else 'FAIL'}")
            click.echo(_table([(f"  {c.name}", c.status, _safe(c.detail)) for c in r.checks]))
        if set_checks:
            click.echo("all patches together: " + ("PASS" if failure is None else "FAIL"))
            click.echo(_table([(f"  {n}", st, _safe(d)) for n, st, d in set_checks]))
    if not ok:
        for r in reports:
            if r.failure:
                click.echo(f"error: {_safe(r.source)} refused ({r.failure.name}): {_safe(r.failure.detail)}", err=True)
        if failure:
            click.echo(f"error: patch set refused ({failure[0]}): {_safe(failure[1])}", err=True)
        sys.exit(EXIT_VERIFY)


def _safe(text: Any) -> str:
    """Text from a patch file or the user, made safe for a terminal: control characters escaped."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(text))


@main.command("verify-sample")
@click.option("--base", required=True, type=click.Path())
@click.option("--patch", "patches", multiple=True, required=True, type=click.Path())
@click.option("--sample", required=True, type=click.Path(), help="float32 .npy: one sample (C,H,W) or (1,C,H,W).")
@click.option("--label", required=True, type=int, help="The sample's true label.")
@click.option("--json", "as_json", is_flag=True)
@_device_options
def verify_sample(base, patches, sample, label, as_json, card_path, policy_path, max_gate_width) -> None:
    """Check your own sample: is it covered by a patch (which record acts, with which gate), and is
    its patched label different from yours.

    Exit 0 only if a record's gate is fully open on it (its certificate covers the sample) and the
    label differs; 1 if no patch covers it ("not covered") or it still gets your label."""
    _require(sample, "a .npy sample")
    _require_device_inputs(base, patches, card_path, policy_path)
    model = _patched(base, patches, card_path, _policy(policy_path, max_gate_width))
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
    logits, cover = model.logits_and_coverage(x)
    after = int(logits.argmax(1)[0])
    gate = float(cover.gate[0])
    covering = None
    if cover.covered[0]:
        vp = model.patches[int(cover.patch[0])]
        k = int(cover.record[0])
        covering = {"patch_id": vp.manifest.patch_id, "record": k, "gate": gate, "target": vp.manifest.records[k].target,
                    "certified": gate == 1.0}
    suppressing = next((vp for vp in model.patches if vp.suppress is not None and label in vp.suppress.classes.tolist()), None)
    if covering is None and suppressing is not None:  # a class suppression covers every input of the class
        covering = {"patch_id": suppressing.manifest.patch_id, "record": None, "gate": None, "target": None,
                    "suppressed_class": label, "certified": True}
    differs = after != label
    status = "not covered" if covering is None else ("forgotten" if differs and covering["certified"] else
                                                     "covered, label differs" if differs else "covered, label unchanged")
    doc = {"label": label, "base_prediction": base_label, "patched_prediction": after, "label_differs": differs,
           "covered_by": covering, "status": status}
    if as_json:
        _emit_json(doc)
    else:
        rows = [("label", label), ("base prediction", base_label), ("patched prediction", after),
                ("label differs", "yes" if differs else "no")]
        if covering and covering.get("suppressed_class") is not None:
            rows.append(("covered by", f"patch {covering['patch_id']}: suppresses class {label} on every input"))
        elif covering:
            rows.append(("covered by", f"patch {covering['patch_id']} record {covering['record']} "
                                       f"(gate {gate:.3f}, target {covering['target']})"))
        else:
            rows.append(("covered by", "no patch: every gate is closed on this sample"))
        rows.append(("status", status))
        click.echo(_table(rows))
    if status != "forgotten":
        sys.exit(EXIT_FAILURE)


@main.command()
@click.argument("patch", type=click.Path())
@click.option("--json", "as_json", is_flag=True)
def inspect(patch: str, as_json: bool) -> None:
    """Show a patch file's manifest (after checking its container and digest)."""
    from .runtime.patchfile import read_patch_file

    _require(patch, "a patch file (.pepatch)")
    pf = read_patch_file(patch)
    m = pf.manifest
    if as_json:
        _emit_json({"size": pf.size, "manifest": m.to_json(), "max_gate_width": m.max_gate_width})
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
        ("gamma range", f"{min(r.gamma for r in m.records):.4g} .. {max(r.gamma for r in m.records):.4g}"
                        if m.records else "n/a (no records)"),
        ("max gate width", f"{m.max_gate_width:.4g} (1/gamma, pre-activation units; default device policy 1)"),
        ("gate step", f"2^{m.gate_step_log2}"),
        ("chain", f"position {m.chain['position']}, after {len(m.chain['after'])} patches"),
        ("specification", f"rows e_j - e_target in [{m.q_lower:g}, {m.q_upper:g}]"),
    ]
    if m.suppress is not None:
        rows.append(("suppresses", f"classes {m.suppress['classes']}, margin {m.suppress['margin']:g}"))
        if "affine" in m.suppress:
            aff = m.suppress["affine"]
            rows.append(("affine margin", f"max({m.suppress['margin']:g}, w . logits + b): bias {[round(b, 4) for b in aff['bias']]}, "
                                          f"max |w| {max(abs(v) for r in aff['weights'] for v in r):.4g}"))
    click.echo(_table([(k, _safe(v)) for k, v in rows]))


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


@main.command("export-sessions")
@click.option("--base", required=True, type=click.Path(), help="base.onnx the patches are bound to.")
@click.option("--patch", "patches", multiple=True, required=True, type=click.Path(), help="Patch file(s), in the order the device runs them.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write base.tapped.onnx, patch.onnx, io.json.")
@click.option("--json", "as_json", is_flag=True, help="Print the wiring as JSON.")
@_device_options
def export_sessions(base, patches, out, as_json, card_path, policy_path, max_gate_width) -> None:
    """Verify patches, then write them as two plain ONNX graphs for a device app in any language:
    the base with its tapped tensors as outputs, and one batched patch graph fed with them."""
    from .runtime.fileio import atomic_write_bytes
    from .runtime.split import split_sessions

    _require_device_inputs(base, patches, card_path, policy_path)
    model = _patched(base, patches, card_path, _policy(policy_path, max_gate_width))  # every check, or exit 3
    split = split_sessions(model.base, model.patches)
    folder = Path(out)
    atomic_write_bytes(folder / "base.tapped.onnx", split.base.SerializeToString())
    atomic_write_bytes(folder / "patch.onnx", split.patch.SerializeToString())
    atomic_write_bytes(folder / "io.json", (json.dumps(split.io(), indent=2) + "\n").encode())
    if as_json:
        _emit_json(split.io())
    else:
        click.echo(_table([
            ("patches verified", f"{len(model.patches)} ({model.n_records} records, one batched correction)"),
            ("session 1", f"{folder / 'base.tapped.onnx'}: input {split.input_name!r} -> {', '.join(split.feeds)}"),
            ("session 2", f"{folder / 'patch.onnx'}: {', '.join(split.feeds)} -> {split.logits_name!r}"),
        ]))


from .bench import bench  # noqa: E402  (torch is imported only when the command runs)

main.add_command(bench)

from .cli_delivery import register as _register_delivery  # noqa: E402  (repo, update, status, bench-update, leakage)

_register_delivery(main)

from .cli_sets import compact  # noqa: E402  (merge a chain into one patch; torch-free)

main.add_command(compact)

from .cli_import import import_base_cmd, inspect_base  # noqa: E402  (bring your own ONNX model)

main.add_command(import_base_cmd)
main.add_command(inspect_base)

from .cli_eval import evaluate_unlearning  # noqa: E402  (privacy and baselines, issue 11)

main.add_command(evaluate_unlearning)


if __name__ == "__main__":  # pragma: no cover
    main()

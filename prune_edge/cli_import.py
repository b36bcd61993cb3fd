"""``prune-edge import-base`` and ``inspect-base``: bring your own ONNX classifier (server side)."""

from __future__ import annotations

import click

from .cli_common import emit_json as _emit_json
from .cli_common import require as _require
from .report import pct, table


def _plan_table(s: dict) -> str:
    rows = [
        ("producer / IR / opsets", f"{s['producer'] or '?'} / {s['ir_version']} / "
                                   + ", ".join(f"{k} {v}" for k, v in s["opsets"].items())),
        ("input", f"{s['input']}: {s['input_layout']}"),
    ]
    for i, layer in enumerate(s["layers"]):
        shape = f"{layer['in_shape']} -> {layer['out_shape']}"
        end = f"Relu input {layer['output']!r}" if layer["relu"] else f"logits {layer['output']!r}"
        rows.append((f"layer {i}", f"{' '.join(layer['ops'])}  {shape}  ({end})"))
    rows += [
        ("ReLU layers", s["relu_count"]),
        ("logits", f"{s['logits']} ({s['n_classes']} classes)"),
        ("classifier tail", ", ".join(s["tail"]) or "none (the logits are the output)"),
        ("outputs", ", ".join(s["outputs"])),
    ]
    return table(rows)


@click.command("inspect-base")
@click.argument("model", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def inspect_base(model: str, as_json: bool) -> None:
    """Report what the importer finds in MODEL.onnx (layers, ReLUs, logits, input layout, tail), or
    why it is not supported (one line naming the node, exit 1)."""
    from .importer import inspect_model

    _require(model, "an ONNX model file")
    summary = inspect_model(model).summary()
    if as_json:
        _emit_json(summary)
    else:
        click.echo(_plan_table(summary))


@click.command("import-base")
@click.argument("model", type=click.Path())
@click.option("--dataset", "dataset_name", required=True,
              help="Named dataset or .npz whose x_train has the model's own input layout (flat, NCHW, NHWC).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Base folder to write.")
@click.option("--force", is_flag=True, help="Overwrite an existing base folder (its patches stop verifying).")
@click.option("--json", "as_json", is_flag=True, help="Print the card as JSON.")
def import_base_cmd(model: str, dataset_name: str, out: str, force: bool, as_json: bool) -> None:
    """Make a base folder from MODEL.onnx, a ReLU classifier prune-edge did not train.

    The folder keeps the file's exact bytes (patches bind to its sha256); the import is checked
    against onnxruntime on the whole dataset. Then `build-patch --base OUT` works as for trained bases."""
    from .basedir import check_base_out
    from .importer import import_base

    _require(model, "an ONNX model file")
    check_base_out(out, force)
    card = import_base(model, dataset_name, out, overwrite=force)
    if as_json:
        _emit_json(card)
        return
    o, imp, m = card["onnx"], card["import"], card["metrics"]
    click.echo(table([
        ("model", f"{imp['source_file']} ({imp['producer'] or '?'}), {imp['bytes']} bytes, copied byte for byte"),
        ("base.onnx sha256", o["sha256"]),
        ("opset / IR", f"{o['opset']} / {o['ir_version']}"),
        ("input layout", imp["input_layout"]),
        ("layers", " | ".join(imp["layers"])),
        ("tensors", f"logits {o['logits']}, Relu inputs {', '.join(o['preacts'])}"),
        ("classifier tail", ", ".join(imp["tail"]) or "none"),
        ("import vs onnxruntime", f"max |logit difference| {imp['max_abs_logit_diff_vs_onnxruntime']:.2g} on {imp['checked_points']} points"),
        ("train / test accuracy (onnxruntime)", f"{pct(m['train_accuracy'])} / {pct(m['test_accuracy'])}"),
        ("base folder", out),
    ]))

"""``prune-edge compact``: merge a chain of patches into one file (torch-free, like the device commands)."""

from __future__ import annotations

from pathlib import Path

import click

from .cli_common import device_options as _device_options
from .cli_common import emit_json as _emit_json
from .cli_common import policy_from as _policy
from .cli_common import require_device_inputs as _require_device_inputs
from .report import table as _table


@click.command()
@click.argument("patches", nargs=-1, required=True, type=click.Path())
@click.option("--base", required=True, type=click.Path(), help="base.onnx the chain is bound to.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The merged patch file to write.")
@click.option("--json", "as_json", is_flag=True)
@_device_options
def compact(patches, base, out, as_json, card_path, policy_path, max_gate_width) -> None:
    """Merge the chain PATCHES (in the order devices run them) into one patch with the same outputs,
    whose manifest names the patch ids it replaces. Every input patch and the set are checked first,
    and the result is checked like any patch (alone and as the set it replaces) before it is written."""
    from .exporters.compact import compact_patches
    from .runtime.base import BaseGraph
    from .runtime.fileio import atomic_write_bytes
    from .runtime.patchfile import unpack
    from .runtime.verify import check_patch_set, verify_patch

    _require_device_inputs(base, patches, card_path, policy_path)
    policy = _policy(policy_path, max_gate_width)
    graph = BaseGraph.load(base, card_path)
    chain = [verify_patch(p, graph, policy) for p in patches]
    check_patch_set(chain, policy)
    manifest, data = compact_patches(chain)
    merged = verify_patch(unpack(data, source=Path(out).name), graph, policy)
    check_patch_set([merged], policy)
    atomic_write_bytes(out, data)
    summary = {"patch": out, "patch_id": manifest.patch_id, "records": len(manifest.records),
               "replaces": manifest.chain["replaces"], "after": manifest.chain["after"], "bytes": len(data),
               "input_bytes": sum(Path(p).stat().st_size for p in patches)}
    if as_json:
        _emit_json(summary)
    else:
        click.echo(_table([(k, " ".join(v) if isinstance(v, list) else v) for k, v in summary.items()]))

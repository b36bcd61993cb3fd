"""CLI of delivery: ``prune-edge repo init|publish|rotate-root|keygen``, ``prune-edge update``, ``prune-edge status``.

``repo`` and ``update`` need the ``update`` extra (python-tuf); it is imported only when they run, so
the plain install keeps every other command. ``status`` reads the state folder without tuf.
Exit codes as everywhere: 1 bad input or repository unreachable, 2 usage, 3 an update refused.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from typing import Any, Sequence

import click

from .runtime.errors import InputError


def _emit_json(doc: Any) -> None:
    from .cli_common import emit_json as emit

    emit(doc)


def _need_tuf() -> None:
    try:
        import securesystemslib  # noqa: F401
        import tuf  # noqa: F401
    except ImportError:
        raise InputError("this command needs python-tuf: pip install 'prune-edge[update]'") from None


def _role_map(values: Sequence[str], option: str, cast=str) -> dict[str, list]:
    """``ROLE=VALUE`` options (repeatable) as {role: [values]}."""
    out: dict[str, list] = defaultdict(list)
    for v in values:
        role, sep, value = v.partition("=")
        if not sep or not role or not value:
            raise click.UsageError(f"{option}: expected ROLE=VALUE, found {v!r}")
        try:
            out[role].append(cast(value))
        except ValueError:
            raise click.UsageError(f"{option} {v}: expected a number after '='") from None
    return dict(out)


def _single(values: dict[str, list], option: str) -> dict:
    for role, vs in values.items():
        if len(vs) != 1:
            raise click.UsageError(f"{option}: expected one value for {role}, found {len(vs)}")
    return {role: vs[0] for role, vs in values.items()}


_KEY_HELP = "ROLE=FILE: an Ed25519 private key file (PEM) of ROLE (root, targets, snapshot, timestamp); repeatable."


@click.group("repo")
def repo() -> None:
    """Publish bases and patches through a TUF repository (server side; needs prune-edge[update])."""


@repo.command("keygen")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
def repo_keygen(path: str, as_json: bool) -> None:
    """Write a new Ed25519 private key to PATH (mode 0600; keep it off the repository host)."""
    _need_tuf()
    from .delivery.publish import generate_key

    keyid = generate_key(path)
    _emit_json({"path": path, "keyid": keyid}) if as_json else click.echo(f"{path}: key {keyid}")


@repo.command("init")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--key", "keys", multiple=True, required=True, help=_KEY_HELP)
@click.option("--threshold", "thresholds", multiple=True, help="ROLE=N signatures required (default 1).")
@click.option("--expires", "expires", multiple=True, help="ROLE=DAYS until that role's metadata expires "
              "(default root=365 targets=90 snapshot=7 timestamp=1).")
@click.option("--json", "as_json", is_flag=True)
def repo_init(directory: str, keys, thresholds, expires, as_json: bool) -> None:
    """Create a repository: root v1 with each role's keys, thresholds and expiry; empty targets."""
    _need_tuf()
    from .delivery.publish import init_repo

    out = init_repo(directory, _role_map(keys, "--key"), _single(_role_map(thresholds, "--threshold", int), "--threshold"),
                    _single(_role_map(expires, "--expires", float), "--expires"))
    _emit_json(out) if as_json else click.echo(f"{directory}: root v1, targets v{out['targets']}, timestamp v{out['timestamp']}")


@repo.command("publish")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--base", type=click.Path(dir_okay=False), default=None, help="base.onnx (its base.card.json beside it).")
@click.option("--patch", "patches", multiple=True, type=click.Path(dir_okay=False), help="Patch file(s) for that base.")
@click.option("--key", "keys", multiple=True, required=True, help=_KEY_HELP + " Needs targets, snapshot, timestamp.")
@click.option("--policy", "policy_path", type=click.Path(), default=None, help="Device policy the patches must pass.")
@click.option("--json", "as_json", is_flag=True)
def repo_publish(directory: str, base, patches, keys, policy_path, as_json: bool) -> None:
    """Add a base and patches (each certified against the base first), then re-sign targets, snapshot
    and timestamp. With no --base: only renew the metadata (run this before the timestamp expires)."""
    _need_tuf()
    from .cli_common import policy_from as _policy
    from .delivery.publish import publish

    out = publish(directory, _role_map(keys, "--key"), base, list(patches), policy=_policy(policy_path, None))
    if as_json:
        _emit_json(out)
    else:
        click.echo(f"{directory}: published {len(out['added'])} patch(es); targets v{out['targets']}, "
                   f"snapshot v{out['snapshot']}, timestamp v{out['timestamp']}")


@repo.command("rotate-root")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--root-key", "root_keys", multiple=True, required=True, type=click.Path(dir_okay=False),
              help="A key file of the current root (enough for its threshold).")
@click.option("--new-key", "new_keys", multiple=True, required=True,
              help="ROLE=FILE: the role's keys after rotation (its old keys are revoked); repeatable.")
@click.option("--key", "keys", multiple=True, help=_KEY_HELP + " Used to re-sign online roles right away.")
@click.option("--threshold", "thresholds", multiple=True, help="ROLE=N after rotation.")
@click.option("--json", "as_json", is_flag=True)
def repo_rotate_root(directory: str, root_keys, new_keys, keys, thresholds, as_json: bool) -> None:
    """Write the next root version with new keys for some roles, signed by the old and new root keys."""
    _need_tuf()
    from .delivery.publish import rotate_root

    out = rotate_root(directory, list(root_keys), _role_map(new_keys, "--new-key"), _role_map(keys, "--key"),
                      _single(_role_map(thresholds, "--threshold", int), "--threshold"))
    _emit_json(out) if as_json else click.echo(f"{directory}: root v{out['root_version']} (rotated {', '.join(out['rotated'])})")


@click.command("update")
@click.option("--metadata-url", required=True, help="Base URL of the repository's metadata/ folder.")
@click.option("--targets-url", required=True, help="Base URL of the repository's targets/ folder.")
@click.option("--state", "state_dir", required=True, type=click.Path(file_okay=False), help="The device's state folder.")
@click.option("--root", "root_json", type=click.Path(dir_okay=False), default=None,
              help="First run only: the trusted root shipped with the device.")
@click.option("--base", type=click.Path(dir_okay=False), default=None, help="First run only: the device's base.onnx.")
@click.option("--policy", "policy_path", type=click.Path(dir_okay=False), default=None,
              help="First run only: the device policy JSON.")
@click.option("--json", "as_json", is_flag=True)
def update(metadata_url: str, targets_url: str, state_dir: str, root_json, base, policy_path, as_json: bool) -> None:
    """Fetch new patches through TUF, certify each against the device's base and policy, switch the
    active set atomically. On any failure the previous set stays active and the reason is printed."""
    _need_tuf()
    from .runtime import state as st
    from .delivery.update import UpdateRefused, UpdateUnavailable
    from .delivery.update import update as run_update

    if root_json or base or policy_path:
        if not (root_json and base):
            raise click.UsageError("provisioning a state folder needs both --root and --base")
        st.provision(state_dir, root_json, base, policy=policy_path)
    try:
        out = run_update(state_dir, metadata_url, targets_url)
    except (UpdateRefused, UpdateUnavailable) as exc:
        active = st.read_active(state_dir).name or "the base alone"
        kind = "refused" if isinstance(exc, UpdateRefused) else "failed"
        click.echo(f"error: update {kind} ({exc.reason}): {exc}; still active: {active}", err=True)
        sys.exit(3 if isinstance(exc, UpdateRefused) else 1)
    if as_json:
        _emit_json(out)
    else:
        what = f"installed {out['active_set']}" if out["changed"] else "up to date"
        click.echo(f"{state_dir}: {what}; {len(out['patches'])} patch(es), {out['downloaded']} downloaded, "
                   f"{out['reused']} reused")


@click.command("status")
@click.option("--state", "state_dir", required=True, type=click.Path(file_okay=False), help="The device's state folder.")
@click.option("--json", "as_json", is_flag=True)
def status(state_dir: str, as_json: bool) -> None:
    """Show the active base, set, patches, metadata versions and expiry (no tuf needed)."""
    from .runtime.state import status as read_status
    from .report import table

    doc = read_status(state_dir)
    if as_json:
        _emit_json(doc)
        return
    rows = [("base sha256", doc["base_sha256"][:16] + "..."), ("active set", doc["active_set"] or "base alone")]
    rows += [(f"patch {i}", f"{p['patch_id']} position {p['position']}, {p['records']} records")
             for i, p in enumerate(doc["patches"])]
    rows += [(f"{role} metadata", f"v{m['version']}, expires {m['expires']}") for role, m in doc["metadata"].items()]
    last = doc["last_update"] or {}
    if last:
        rows.append(("last update", f"{last.get('time')}: " + ("ok" if last.get("ok") else
                                                              f"refused ({last.get('reason')}): {last.get('message', '')[:80]}")))
    click.echo(table(rows))


@click.command("bench-update")
@click.option("--base", "base_dir", required=True, type=click.Path(file_okay=False), help="Base folder (train-base).")
@click.option("--sizes", default="1,100", show_default=True, help="Chain lengths to measure, comma separated.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Fresh devices per size (median).")
@click.option("--out", default="bench-update", show_default=True, type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True)
def bench_update(base_dir: str, sizes: str, repeats: int, out: str, as_json: bool) -> None:
    """Device cost of one update through a TUF repository on loopback: metadata verification,
    download, certify, install; for a chain of each size (server and update extras)."""
    from pathlib import Path

    _need_tuf()
    try:
        counts = [int(s) for s in sizes.split(",")]
        if not counts or min(counts) < 1:
            raise ValueError
    except ValueError:
        raise click.BadParameter(f"expected positive integers separated by commas, found {sizes!r}", param_hint="--sizes") from None
    from .delivery.bench import run_bench

    doc = run_bench(Path(base_dir), Path(out), counts, repeats, progress=not as_json)
    if as_json:
        _emit_json({k: v for k, v in doc.items() if k != "table"})
    else:
        click.echo(doc["table"])
        click.echo(f"wrote {Path(out) / 'bench_update.json'} and {Path(out) / 'bench_update.png'}")


@click.command("leakage")
@click.option("--base", "base_dir", required=True, type=click.Path(file_okay=False), help="Base folder (train-base).")
@click.option("--patch", "patch", required=True, type=click.Path(dir_okay=False), help="A patch built for --forget.")
@click.option("--forget", "forget_path", required=True, type=click.Path(dir_okay=False), help="The ids it forgets.")
@click.option("--records", type=click.IntRange(min=1), default=None, help="Measure the LP on at most this many records.")
@click.option("--json", "as_json", is_flag=True)
def leakage(base_dir: str, patch: str, forget_path: str, records, as_json: bool) -> None:
    """What a published patch reveals about the points it forgets: membership (which candidates it
    covers) and reconstruction (the region's LP point vs the forgotten point). Server extra."""
    from .basedir import load_base
    from .delivery.leakage import measure_leakage
    from .report import table
    from .requests import read_forget_ids

    bundle = load_base(base_dir)
    ids = read_forget_ids(forget_path, len(bundle.dataset.x_train))
    doc = measure_leakage(bundle, patch, ids, records)
    if as_json:
        _emit_json(doc)
        return
    m, r = doc["membership"], doc["reconstruction"]
    click.echo(table([
        ("covered training points", f"{m['covered']} of {m['training_points']} ({m['requested']} requested)"),
        ("membership precision / recall", f"{m['precision']:.3f} / {m['recall']:.3f}"),
        ("LP points found (gate open on device)", f"{r['lp_found']} of {r['records_measured']}"),
        ("median LP distance / nearest-neighbour distance", f"{r['median_lp_over_nn']}"),
        ("median LP distance / distance from the mean", f"{r['median_lp_over_mean']}"),
        ("median rank of the forgotten point near the LP point", f"{r['median_rank_of_forgotten_point']}"),
    ]))


def register(main: click.Group) -> None:
    """Add the delivery commands to the ``prune-edge`` group."""
    for cmd in (repo, update, status, bench_update, leakage):
        main.add_command(cmd)

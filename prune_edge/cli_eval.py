"""``prune-edge evaluate-unlearning``: every unlearning method on one base and request, measured.

Torch-backed modules are imported only when the command runs, like the other server commands.
"""

from __future__ import annotations

from pathlib import Path

import click

QUICK = {"seeds": 1, "shadows": 4, "class_shadows": 2, "ulira_shadows": 4}
FULL = {"seeds": 3, "shadows": 16, "class_shadows": 4, "ulira_shadows": 8}
ULIRA_DEFAULT = "all but prune-confuse"


@click.command("evaluate-unlearning")
@click.option("--dataset", default="mnist5k", show_default=True, help="Named dataset or data file (see `dataset`).")
@click.option("--arch", type=click.Choice(["mlp", "cnn"]), default="mlp", show_default=True)
@click.option("--forget", "forget", multiple=True, help="random:N or class:K (repeatable). Default: random:200 and class:3.")
@click.option("--methods", default="all", show_default=True,
              help="Comma-separated: prune-confuse, collapse-confuse, prune-unseen, prune-unseen-pointcal, retrain, finetune, neggrad, neggrad+, "
                   "randlabel, salun, l1sparse, sisa; for class:K also prune-suppress, prune-suppress-cal, prune-suppress-unseen, "
                   "prune-suppress-unseen-median; or all.")
@click.option("--seeds", type=click.IntRange(min=1), default=None, help="Seeds (bases and requests). Default 3; 1 with --quick.")
@click.option("--shadows", type=click.IntRange(min=2), default=None,
              help="Attacker shadow models for LiRA (and as many server calibration shadows). Default 16; 4 with --quick.")
@click.option("--class-shadows", type=click.IntRange(min=1), default=None,
              help="prune-unseen on class:K: models trained without the class it is calibrated on. Default 4; 2 with --quick.")
@click.option("--ulira-shadows", type=click.IntRange(min=0), default=None,
              help="U-LiRA: attacker shadows unlearned by each --ulira-methods method (the first of --shadows; 0: none). "
                   "Default 8; 4 with --quick.")
@click.option("--ulira-methods", default=ULIRA_DEFAULT, show_default=True,
              help="Methods U-LiRA applies to its shadows (comma-separated, among --methods; 'none' for none). "
                   "prune-confuse is left out by default: tens of seconds per shadow patch.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Training epochs for every model (default: the recipe's).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Local processes (1: this process).")
@click.option("--ray-address", default=None, help="Run the tasks on a Ray cluster ('auto', 'ray://HOST:10001'; 'local' for a local Ray).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for bases, results.json, report.md, PNGs.")
@click.option("--quick", is_flag=True, help="A small run (1 seed, 4 shadows, 4 U-LiRA shadows) for smoke tests.")
def evaluate_unlearning(dataset, arch, forget, methods, seeds, shadows, class_shadows, ulira_shadows, ulira_methods, epochs, workers,
                        ray_address, out, quick) -> None:
    """Compare unlearning methods: accuracies, agreement with retraining, membership inference (loss
    threshold, the NeurIPS 2023 challenge's attack, LiRA, U-LiRA), cost; writes results.json, report.md and plots."""
    from .unlearning_eval.grid import ALL_METHODS, GridConfig, parse_forget

    chosen = tuple(ALL_METHODS) if methods.strip() == "all" else tuple(m.strip() for m in methods.split(",") if m.strip())
    bad = [m for m in chosen if m not in ALL_METHODS]
    if bad or not chosen:
        raise click.BadParameter(f"unknown method(s) {bad}; expected some of {', '.join(ALL_METHODS)}", param_hint="--methods")
    forget = tuple(forget) or ("random:200", "class:3")
    for f in forget:
        try:
            parse_forget(f)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--forget") from None
    from .unlearning_eval.grid import ULIRA_METHODS

    if ulira_methods.strip() in ("none", ULIRA_DEFAULT):
        u_methods = () if ulira_methods.strip() == "none" else ULIRA_METHODS
    else:
        u_methods = tuple(m.strip() for m in ulira_methods.split(",") if m.strip())
    bad = [m for m in u_methods if m not in ALL_METHODS]
    if bad:
        raise click.BadParameter(f"unknown method(s) {bad}; expected some of {', '.join(ALL_METHODS)}", param_hint="--ulira-methods")
    base = QUICK if quick else FULL
    cfg = GridConfig(dataset=dataset, arch=arch, forget=forget, methods=chosen, seeds=seeds or base["seeds"],
                     shadows=shadows or base["shadows"], epochs=epochs, workers=workers, ray_address=ray_address, quick=quick,
                     class_shadows=class_shadows or base["class_shadows"],
                     ulira_shadows=base["ulira_shadows"] if ulira_shadows is None else ulira_shadows, ulira_methods=u_methods)
    from .unlearning_eval.grid import run_grid
    from .unlearning_eval.report import console_table, write_report

    results = run_grid(cfg, Path(out))
    paths = write_report(results, Path(out))
    click.echo(console_table(results))
    for req, r in results["requests"].items():
        for key in [k for k in r if k.startswith("acceptance_")]:
            name = key[len("acceptance_"):].replace("_", "-")
            for k, v in (r.get(key) or {}).items():
                click.echo(f"{req} {name} {k}: {'holds' if v['holds'] else 'does NOT hold'}")
    click.echo("wrote " + ", ".join(paths.values()))

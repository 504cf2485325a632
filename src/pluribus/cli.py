"""The `pluribus` command: one sub-command group per system, plus `data` and `demo`."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import click
import typer
from rich.console import Console

from pluribus.errors import PluribusError

app = typer.Typer(
    help="pluribus: user representations and models across sources, tasks and institutions, privately.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

_GROUPS = (
    ("data", "pluribus.data.cli", "Fetch, inspect, validate and convert user data sets."),
    ("tokenize", "pluribus.tokenizer.cli", "U2QT: multi-view RQ-VAE user tokenizer."),
    ("encoder", "pluribus.encoder.cli", "GGSM: decoder-only LLM user encoder with soft attention masks."),
    ("fed", "pluribus.federated.cli", "FedBone: federated multi-task split learning on Flower."),
    ("fuse", "pluribus.fusion.cli", "PrivFusion: locally differentially private model fusion."),
)
for _name, _module, _help in _GROUPS:
    try:
        _group = importlib.import_module(_module).app
    except ModuleNotFoundError as _err:
        if _err.name is None or not _module.startswith(_err.name):  # a missing dependency: let it surface
            raise
        _group = typer.Typer(help=f"{_help} (no commands in this build)")
    app.add_typer(_group, name=_name, help=_help)


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Run folder (reruns resume from finished steps)."),
    data: str = typer.Option("movielens-100k", help="movielens-100k, synthetic[:N], a data set folder or .jsonl."),
    steps: str = typer.Option("all", help="Comma-separated subset of the chain's steps, or 'all'."),
    quick: bool = typer.Option(False, help="A smaller, faster run (CI's end-to-end test)."),
    engine: str = typer.Option("inprocess", help="Flower engine of the federate step: inprocess, simulation, deployment."),
) -> None:
    """Run the pluribus chain on real data and write report.md, metrics.json and plots."""
    from pluribus.demo import run_demo

    run_demo(out=out, data=data, steps=steps, quick=quick, engine=engine)


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the app; a PluribusError prints one line to stderr and exits 2 (no traceback)."""
    console = Console(stderr=True)
    try:
        app(args=argv, standalone_mode=False)
    except PluribusError as err:
        console.print(f"[bold red]error:[/bold red] {err}", highlight=False, soft_wrap=True)
        return 2
    except click.exceptions.Abort:
        console.print("aborted")
        return 130
    except click.exceptions.ClickException as err:
        err.show()
        return err.exit_code
    except click.exceptions.Exit as err:
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())

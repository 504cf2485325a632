"""The `pluribus` command: one sub-command group per system, plus `data` and `demo`."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path
from typing import Any

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from pluribus.demo.steps import STEP_NAMES
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
    ("federation", "pluribus.deploy.cli", "Host a secured federation (SuperLink) or join one (SuperNode) on Flower."),
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
    data: str = typer.Option("movielens-100k", help="movielens-100k, synthetic or synthetic:N (N generated users), "
                                                    "a data set folder or a .jsonl file."),
    steps: str = typer.Option("all", help=f"Comma-separated steps of the chain, in any order: {', '.join(STEP_NAMES)}; "
                                          "or 'all'."),
    quick: bool = typer.Option(False, help="A smaller, faster run (CI's end-to-end test)."),
    engine: str = typer.Option("inprocess", help="Flower engine of the federate and fuse steps: inprocess, simulation, deployment."),
    force: bool = typer.Option(False, help="Start the run folder over, even if it holds another run."),
) -> None:
    """Run the pluribus chain on real data and write report.md, metrics.json and plots."""
    from pluribus.demo import run_demo

    report = run_demo(out=out, data=data, steps=steps, quick=quick, engine=engine, force=force)
    typer.echo(str(report))


def _verbatim_help(command: click.Command) -> None:
    """Help text prints as written: console markup in it is escaped, so '[tokenizer]' stays visible."""
    for attr in ("help", "short_help", "epilog"):
        text = getattr(command, attr, None)
        if isinstance(text, str):
            setattr(command, attr, escape(text))
    for param in command.params:
        text = getattr(param, "help", None)
        if isinstance(text, str):
            param.help = escape(text)
    for sub in getattr(command, "commands", {}).values():
        _verbatim_help(sub)


#: Options that count things a run cannot have fewer than one of, whichever command declares them.
_AT_LEAST_ONE = ("threads", "num_cpus")


class _NumberNotNaN(click.types.FloatParamType):
    """A float option that refuses 'nan' (no option means it; 'inf' stays, e.g. epsilon=inf turns DP off)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if isinstance(number, float) and math.isnan(number):
            self.fail(f"{value!r} is not a number", param, ctx)
        return number


def _checked_numbers(command: click.Command) -> None:
    """--threads 0 (or -2) and --lr nan are usage errors naming the option, not a crash or a silent fix-up."""
    for param in command.params:
        if param.name in _AT_LEAST_ONE and param.type is click.INT:
            param.type = click.IntRange(min=1)
        elif param.type is click.FLOAT:
            param.type = _NumberNotNaN()
    for sub in getattr(command, "commands", {}).values():
        _checked_numbers(sub)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _error(text: str) -> None:
    # Text from the data (ids, field names) is printed verbatim: never parsed as console markup.
    Console(stderr=True, highlight=False).print(Text.assemble(("error:", "bold red"), " ", _one_line(text)),
                                                soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the app; bad input prints one line to stderr and exits 2 (no traceback)."""
    from pluribus.runs import command_session

    command = typer.main.get_command(app)
    _verbatim_help(command)
    _checked_numbers(command)
    try:
        with command_session():
            command.main(args=argv, prog_name="pluribus", standalone_mode=False)
    except PluribusError as err:
        _error(str(err))
        return 2
    except click.exceptions.Abort:
        Console(stderr=True).print("aborted")
        return 130
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted; rerun the same command to resume")
        return 130
    except click.exceptions.UsageError as err:
        where = f" (see '{err.ctx.command_path} --help')" if err.ctx is not None else ""
        _error(err.format_message() + where)
        return err.exit_code
    except click.exceptions.ClickException as err:
        _error(err.format_message())
        return err.exit_code
    except click.exceptions.Exit as err:
        return err.exit_code
    except OSError as err:  # the file system refused (full disk, permissions): say where, not a traceback
        where = f"{err.filename}: " if err.filename else ""
        _error(f"{where}{err.strerror or err}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

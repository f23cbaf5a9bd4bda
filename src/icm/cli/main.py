"""The `icm` command line. Every command is a thin layer over the library."""

from __future__ import annotations

import os

import typer

from icm import __version__
from icm.cli import data as data_cli
from icm.cli import demo as demo_cli
from icm.cli import eval as eval_cli
from icm.cli import policy as policy_cli
from icm.cli import train as train_cli
from icm.cli.chat import chat
from icm.cli.moderate import moderate
from icm.cli.serve import serve

app = typer.Typer(
    name="icm",
    help="Rule-based, explainable image content moderation with multimodal LLMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(policy_cli.app, name="policy")
app.add_typer(data_cli.app, name="data")
app.add_typer(eval_cli.app, name="eval")
app.add_typer(train_cli.app, name="train")
app.add_typer(demo_cli.app, name="demo")
app.command("moderate")(moderate)
app.command("serve")(serve)
app.command("chat")(chat)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"icm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    # The entry point, not the library, decides process-wide settings: the commands print their
    # own progress, so datasets' per-table bars are noise (a user's own setting wins).
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


if __name__ == "__main__":
    app()

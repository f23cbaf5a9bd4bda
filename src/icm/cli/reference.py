"""The manual's CLI reference (docs/cli.md), written from the Typer app itself.

``python -m icm.cli.reference > docs/cli.md`` regenerates the page;
tests/test_docs.py fails when the committed page differs from what this writes, so the
reference cannot drift from the commands.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import typer

HEADER = """# CLI reference

Every `icm` command, its arguments and options, as the Typer app declares them. This page is
generated: `python -m icm.cli.reference > docs/cli.md` rewrites it, and a test fails when it
is out of date. `icm COMMAND --help` prints the same in a terminal.
"""


def _param_line(param: Any, ctx: Any) -> str:
    """One Markdown bullet: the names and metavar, then the help with its [default: ...]."""
    record = param.get_help_record(ctx)
    if record is None:
        return ""
    names, help_text = record
    text = " ".join(help_text.split())
    return f"- `{names}`" + (f": {text}" if text else "")


def _command(cmd: Any, path: list[str], out: list[str], parent: Any = None) -> None:
    ctx = typer.Context(cmd, info_name=path[-1], parent=parent)
    level = "#" * min(len(path) + 1, 4)
    out.append(f"{level} `{' '.join(path)}`\n")
    if cmd.help:
        out.append(inspect.cleandoc(cmd.help).split("\f")[0].strip() + "\n")
    usage = " ".join(cmd.collect_usage_pieces(ctx))
    out.append(f"```\n{' '.join(path)} {usage}\n```\n")
    params = [p for p in cmd.get_params(ctx) if not getattr(p, "hidden", False) and p.name != "help"]
    if params:
        lines = [line for line in (_param_line(p, ctx) for p in params) if line]
        out.append("\n".join(lines) + "\n")
    if hasattr(cmd, "list_commands"):
        for name in sorted(cmd.list_commands(ctx)):
            sub = cmd.get_command(ctx, name)
            if sub is not None and not getattr(sub, "hidden", False):
                _command(sub, [*path, name], out, ctx)


def cli_reference(app: typer.Typer | None = None) -> str:
    """The Markdown of docs/cli.md for ``app`` (default: the ``icm`` command)."""
    if app is None:
        from icm.cli.main import app as icm_app

        app = icm_app
    out = [HEADER]
    _command(typer.main.get_command(app), ["icm"], out)
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(cli_reference())

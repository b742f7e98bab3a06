"""The `hf-compress` command line.

Each group of commands lives in `hf_compress.cli.<name>` and adds itself to an app through `register(app)`. The
groups are imported only when one of their commands runs or shows its help: their option defaults come from the
method configs, which import torch (seconds), while `hf-compress --help` lists the commands from their docstrings,
read from the sources without importing them.
"""

from __future__ import annotations

import ast
import functools
import importlib
import sys
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

COMMAND_MODULES = ("llm", "hub", "prune", "early_exit", "heal")
HELP = "Compress Hugging Face models and publish them as ordinary checkpoints."


@functools.cache
def command_index() -> dict[str, tuple[str, str]]:
    """`{command: (module, docstring)}` in listing order, read from each module's `register` without importing it.

    `register` adds commands as `app.command("NAME")(FUNCTION)`; a module whose commands cannot be read that way is
    imported instead (a slower `--help`, never a missing command).
    """
    index: dict[str, tuple[str, str]] = {}
    for module in COMMAND_MODULES:
        found = _read_commands(Path(__file__).with_name(f"{module}.py"))
        if not found:
            found = {name: command.help or "" for name, command in _load_commands(module).items()}
        index.update({name: (module, doc) for name, doc in found.items()})
    return index


def _read_commands(path: Path) -> dict[str, str]:
    """`{command: docstring}` of the `app.command("NAME")(FUNCTION)` calls in `register` of the module at `path`."""
    tree = ast.parse(path.read_text())
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    if "register" not in functions:
        return {}
    commands = {}
    for node in ast.walk(functions["register"]):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Call)
                and isinstance(node.func.func, ast.Attribute) and node.func.func.attr == "command"
                and len(node.func.args) == 1 and isinstance(node.func.args[0], ast.Constant)
                and len(node.args) == 1 and isinstance(node.args[0], ast.Name) and node.args[0].id in functions):
            commands[node.func.args[0].value] = ast.get_docstring(functions[node.args[0].id]) or ""
    return commands


def _load_commands(module: str) -> dict[str, Any]:
    """The click commands that `hf_compress.cli.<module>` registers."""
    group = typer.Typer()
    importlib.import_module(f"{__name__}.{module}").register(group)
    return dict(typer.main.get_group(group).commands)


class LazyGroup(TyperGroup):
    """The top-level group: a command's module is imported when the command is looked up to run or to show its own
    help; the top-level help lists every command from `command_index` without importing any."""

    _listing = False

    def list_commands(self, ctx: Any) -> list[str]:
        return list(command_index())

    def get_command(self, ctx: Any, cmd_name: str):
        if cmd_name not in self.commands and cmd_name in command_index():
            module, doc = command_index()[cmd_name]
            if self._listing and f"{__name__}.{module}" not in sys.modules:
                return TyperCommand(name=cmd_name, help=doc)
            self.commands.update(_load_commands(module))
        return self.commands.get(cmd_name)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False

    def resolve_command(self, ctx: Any, args: list[str]):
        if args and args[0] not in command_index():
            # A mistyped command: the "did you mean" suggestions are drawn from every loaded command.
            for module in COMMAND_MODULES:
                self.commands.update(_load_commands(module))
        return super().resolve_command(ctx, args)


app = typer.Typer(
    name="hf-compress",
    cls=LazyGroup,
    help=HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    # The commands are added by LazyGroup; a callback makes typer build a group even though none is registered here.
    pass


def main() -> None:
    from ..errors import HFCompressError

    try:
        app()
    except HFCompressError as err:
        typer.echo(f"hf-compress: error: {err}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

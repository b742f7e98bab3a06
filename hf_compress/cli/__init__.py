"""The `hf-compress` command line.

Each group of commands lives in `hf_compress.cli.<name>` and adds itself to the app through
`register(app)`; heavy imports happen inside the commands so `--help` stays fast.
"""

from __future__ import annotations

import importlib

import typer

COMMAND_MODULES = ("llm", "hub", "prune", "early_exit", "heal")

app = typer.Typer(
    name="hf-compress",
    help="Compress Hugging Face models and publish them as ordinary checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for _name in COMMAND_MODULES:
    importlib.import_module(f"hf_compress.cli.{_name}").register(app)


def main() -> None:
    from ..errors import HFCompressError

    try:
        app()
    except HFCompressError as err:
        typer.echo(f"hf-compress: error: {err}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

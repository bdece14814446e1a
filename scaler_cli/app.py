"""The typer app, its error handling and the entry point; command modules register on `app`.

Every command answers bad input with one line on stderr and exit code 2, never a traceback.
torch is imported only by the commands that run models (train, eval, bench).
"""

from __future__ import annotations

import sys

import typer

try:  # typer >= 0.25 vendors click; its exceptions are not the `click` package's
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover - older typer on top of click
    from click import exceptions as click_exc

from scaler.errors import ScalerError
from scaler.interrupts import stop_on_sigterm

CONTEXT = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings=CONTEXT,
    help="Architecture scaling compiler for adversarially robust CNNs.",
)


def _version(value: bool) -> None:
    if value:
        from scaler import __version__

        print(f"scaler {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Architecture scaling compiler for adversarially robust CNNs."""


COMMAND_MODULES = ("compiler_cmds", "training_cmds", "interop_cmds", "study_cmds", "analysis_cmds")
"""Bottom layer first: the order `scaler --help` lists the commands in."""


def _register() -> None:
    import importlib

    for name in COMMAND_MODULES:  # commands register on import
        importlib.import_module(f"scaler_cli.{name}")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; every error is one line on stderr and exit code 2."""
    _register()
    command = typer.main.get_command(app)
    try:
        with stop_on_sigterm():  # a scheduler's stop ends a command as Ctrl-C does
            result = command.main(args=argv, prog_name="scaler", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except ScalerError as exc:
        print(f"{exc.prefix}: {' '.join(str(exc).split())}", file=sys.stderr)  # always one line
        return exc.exit_code
    except click_exc.NoArgsIsHelpError as exc:  # bare `scaler` or group: show help
        print(exc.ctx.get_help() if exc.ctx else "", file=sys.stderr)
    except click_exc.UsageError as exc:
        print(f"error: {' '.join(exc.format_message().split())}", file=sys.stderr)
    except typer.Exit as exc:
        return getattr(exc, "exit_code", getattr(exc, "code", 0))
    except (typer.Abort, KeyboardInterrupt):  # typer itself turns Ctrl-C into exit 130
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as exc:  # a read-only or full disk, a path that is a file: one line, no traceback
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"error:{where}: {exc.strerror or exc}", file=sys.stderr)
    return 2


def entry() -> None:
    sys.exit(main())

"""What every command module of the CLI shares: the error handler, ``--json`` and its printer."""

from __future__ import annotations

import functools
import json
from typing import Annotated

import typer

from .errors import AtsDeployError

__all__ = ["JsonOpt", "handle_errors", "print_json"]

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document to stdout.")]


def _emit_error(exc: AtsDeployError) -> None:
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    typer.echo(f"error: {msg}", err=True)


def handle_errors(fn):
    """Turn library errors into one line on stderr and the error's exit code (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AtsDeployError as exc:
            _emit_error(exc)
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:  # a file the checks did not foresee (permissions, a vanished path, a full disk)
            where = f" {exc.filename}" if exc.filename else ""
            typer.echo(
                f"error: cannot access{where} ({exc.strerror or type(exc).__name__}); check the path, its "
                "permissions and free space",
                err=True,
            )
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("error: interrupted; outputs are renamed into place only when complete", err=True)
            raise typer.Exit(130) from None

    return wrapper


def print_json(data) -> None:
    from ._json import json_default

    typer.echo(json.dumps(data, indent=2, default=json_default))



"""The ``lorakit`` command line: train, eval, merge, generate, inspect, demo, bench, compare.

Every command is a thin layer over the Python API (:class:`lorakit.Trainer`, :func:`lorakit.load`,
:func:`lorakit.detach`...). Errors print one ``error: ...`` line and exit with status 1 (``--debug`` or
``LORAKIT_DEBUG=1`` adds the traceback); usage errors exit with 2; no arguments prints the help and exits 0;
an interrupted training run exits with 130 after saving a checkpoint.
"""

from __future__ import annotations

import os
import sys
import traceback

import typer

# each module registers its commands on ``app``; this order is the order of ``lorakit --help``
from lorakit.cli import adapters, experiments, serving  # noqa: F401, I001
from lorakit.cli.common import DEBUG_ENV, app, describe_os_error, say
from lorakit.errors import LorakitError


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit status.

    The one error boundary of every command: a lorakit error or an operating-system error (disk full,
    permission denied, missing file) prints one ``error: ...`` line and returns 1, any other error one line
    that says so; none prints a traceback unless ``--debug`` (anywhere on the line) or ``LORAKIT_DEBUG=1``
    asks for it. No arguments prints the help and returns 0.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get(DEBUG_ENV, "").strip().lower() in {"1", "true", "yes", "on"}
    args = [a for a in args if a != "--debug"]
    if not args:
        args = ["--help"]
    try:
        rv = app(args=args, prog_name="lorakit", standalone_mode=False)
    except typer.Exit as e:
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        say("aborted")
        return 130
    except typer.TyperException as e:  # usage errors (click's, vendored by typer)
        ctx = getattr(e, "ctx", None)
        if type(e).__name__ == "NoArgsIsHelpError" and ctx is not None:  # `lorakit tasks` alone: its help
            typer.echo(ctx.get_help())
            return 0
        e.show()  # type: ignore[attr-defined]
        return int(getattr(e, "exit_code", 2))
    except Exception as e:
        if debug:
            traceback.print_exc()
        if isinstance(e, LorakitError):
            say(f"error: {e}")
        elif isinstance(e, OSError):
            say(f"error: {describe_os_error(e)}")
        else:
            say(f"error: unexpected {type(e).__name__}: {e}" + ("" if debug else
                 f" (run again with --debug or {DEBUG_ENV}=1 for the traceback)"))
        return 1
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["DEBUG_ENV", "app", "describe_os_error", "main"]

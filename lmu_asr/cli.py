"""The ``lmuasr`` command: prep, train, eval, transcribe, bench, demo, plot.

Every subcommand turns user errors (:class:`lmu_asr.UserError`, bad config values, missing files) into one line on
stderr and exit status 2; ``--debug`` on the group shows the traceback instead. Heavy imports happen inside the
subcommands so ``lmuasr --help`` is instant.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from lmu_asr import UserError, __version__

EXIT_USER_ERROR = 2


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a subcommand, mapping expected failures to a one-line message and exit code 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (UserError, ValueError, FileNotFoundError, NotADirectoryError) as err:
            ctx = click.get_current_context(silent=True)
            if ctx is not None and ctx.find_root().obj and ctx.find_root().obj.get("debug"):
                raise
            msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            click.echo(f"error: {msg}", err=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lmuasr")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.option("--traceback", "show_traceback", is_flag=True, help="Show Python tracebacks for user errors.")
@click.pass_context
def main(ctx: click.Context, log_level: str, show_traceback: bool) -> None:
    """lmu-asr: prep GigaSpeech into shards, train an LMU-attention CTC model fast, and prove it with numbers."""
    logging.basicConfig(level=getattr(logging, log_level.upper()), format="%(levelname)s %(name)s: %(message)s")
    ctx.obj = {"debug": show_traceback}


if __name__ == "__main__":  # pragma: no cover
    main()

"""The command-line runner every entry point shares: `python -m tune_kd.<command> [flags]`.

The commands are search, train, prepare, export, report and demo. Each module gives only its own
flags and the call that does its job (`cli.run(...)` in its `main(argv)`); the runner adds what is
the same everywhere:

    --debug         show the traceback of an error the user can fix (else one line)
    logging         INFO lines with the time on stderr (a command may lower it, e.g. DDP ranks > 0)
    progress bars   transformers' bars off: a log wants one line per event
    UserError       (errors.py) printed as `error: <message>` on stderr, exit code 2
    Ctrl-C          one line on stderr, exit code 130 (no traceback; --debug shows it)

`add_config_argument` is the experiment-YAML flag of every command that takes one: --config, with
--space as its alias (the search's documented name).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from tune_kd.errors import UserError

DEFAULT_CONFIG = "search_spaces/kd.yaml"
# Every cache (tokenized data, teacher outputs, top_k auto's measurement) is written into a temporary
# folder or file and renamed into place only when complete, so an interrupted command leaves none half-made.
INTERRUPTED = ("interrupted: stopped by Ctrl-C; no half-written cache was kept, so the same command picks up "
               "from what was finished")
LOG_FORMAT = {"format": "%(asctime)s %(message)s", "datefmt": "%H:%M:%S"}


def add_config_argument(parser: argparse.ArgumentParser, default: str = DEFAULT_CONFIG) -> None:
    """--config FILE (alias --space): the experiment YAML."""
    parser.add_argument("--config", "--space", dest="config", default=default,
                        help="experiment YAML (default: %(default)s)")


def setup_logging(level: int = logging.INFO) -> None:
    """Log lines with the time to stderr; transformers' progress bars off."""
    logging.basicConfig(level=level, **LOG_FORMAT)
    from tune_kd.models import quiet_progress_bars

    quiet_progress_bars()


def run(name: str, doc: str, add_arguments: Callable[[argparse.ArgumentParser], None],
        command: Callable[[argparse.Namespace], int | None], argv: list[str] | None = None,
        log_level: Callable[[argparse.Namespace], int] | None = None) -> int:
    """Parse argv with the command's flags (plus --debug), set up logging and run command(args);
    returns the exit code: command's (None: 0), or 2 for a UserError (re-raised with --debug).

    name: the module under tune_kd (the usage line says `python -m tune_kd.<name>`); doc: its
    docstring, whose first line is the help's description; log_level: the logging level for these
    args (default INFO)."""
    parser = argparse.ArgumentParser(prog=f"python -m tune_kd.{name}", description=doc.split("\n")[0])
    add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    args = parser.parse_args(argv)
    setup_logging(log_level(args) if log_level is not None else logging.INFO)
    try:
        code = command(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(INTERRUPTED, file=sys.stderr)
        return 130      # the shell's code for a command ended by SIGINT
    return 0 if code is None else code

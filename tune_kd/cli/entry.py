"""What every command shares, under `tune-kd <command>` (cli/main.py) and `python -m tune_kd.<command>`.

The commands are search, train, prepare, export, report and demo, one module each in this package:
its own flags (`add_arguments`) and the call that does its job (`command`). This module adds what is
the same everywhere, in one parser (`configure`) and one error handler (`execute`):

    --debug         show the traceback of an error the user can fix (else one line)
    logging         INFO lines with the time on stderr (a command may lower it, e.g. DDP ranks > 0)
    progress bars   transformers' bars off: a log wants one line per event
    UserError       (config/errors.py) printed as `error: <message>` on stderr, exit code 2
    a full disk     a write that failed with ENOSPC / EDQUOT / EROFS where no stage named it
                    (config/files.py): one line, exit code 2
    Ctrl-C          one line on stderr, exit code 130 (no traceback; --debug shows it); a search
                    takes SIGTERM alike, and its line says how far it got and the command that
                    resumes it (search/interrupt.py's SearchInterrupted: a KeyboardInterrupt carrying
                    that line)

`add_config_argument` is the experiment-YAML flag of every command that takes one: --config, with
--space as its alias (the search's documented name).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from tune_kd.config.errors import UserError
from tune_kd.config.files import FIX, NO_ROOM, is_no_room, no_room_line
from tune_kd.model.hardware import setup_logging

DEFAULT_CONFIG = "search_spaces/kd.yaml"
# Every cache (tokenized data, teacher outputs, top_k auto's measurement) is written into a temporary
# folder or file and renamed into place only when complete, so an interrupted command leaves none half-made.
INTERRUPTED = ("interrupted: stopped by Ctrl-C; no half-written cache was kept, so the same command picks up "
               "from what was finished")

def add_config_argument(parser: argparse.ArgumentParser, default: str = DEFAULT_CONFIG) -> None:
    """--config FILE (alias --space): the experiment YAML."""
    parser.add_argument("--config", "--space", dest="config", default=default,
                        help="experiment YAML (default: %(default)s)")


def configure(parser: argparse.ArgumentParser, doc: str,
              add_arguments: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
    """A command's parser, the same under `tune-kd <command>` and `python -m tune_kd.<command>`:
    its description (doc's first line), its own flags, and --debug."""
    parser.description = doc.split("\n")[0]
    add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return parser


def execute(args: argparse.Namespace, command: Callable[[argparse.Namespace], int | None],
            log_level: Callable[[argparse.Namespace], int] | None = None) -> int:
    """Set up logging and run command(args); returns the exit code: command's (None: 0), 2 for a
    UserError, 130 for Ctrl-C (re-raised with --debug). log_level: the level for these args (INFO)."""
    setup_logging(log_level(args) if log_level is not None else logging.INFO)
    try:
        code = command(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if args.debug or not is_no_room(exc):
            raise
        where = no_room_line(exc.filename, exc) if exc.filename else f"a write failed: {NO_ROOM[exc.errno]}: {FIX}"
        print(f"error: {where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        if args.debug:
            raise
        print(str(exc) or INTERRUPTED, file=sys.stderr)   # a stopped search says what it kept (search/interrupt.py)
        return 130      # the shell's code for a command ended by SIGINT
    return 0 if code is None else code


def run(name: str, doc: str, add_arguments: Callable[[argparse.ArgumentParser], None],
        command: Callable[[argparse.Namespace], int | None], argv: list[str] | None = None,
        log_level: Callable[[argparse.Namespace], int] | None = None) -> int:
    """`python -m tune_kd.<name> [argv]`: parse argv with the command's parser and execute it."""
    parser = configure(argparse.ArgumentParser(prog=f"python -m tune_kd.{name}"), doc, add_arguments)
    return execute(parser.parse_args(argv), command, log_level)

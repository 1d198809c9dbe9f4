"""`tune-kd <command> [flags]`: one console command for every stage (pyproject's [project.scripts]).

    tune-kd search  --space FILE.yaml     the search (also `python -m tune_kd.search`)
    tune-kd prepare --config FILE.yaml    tokenize and build the caches before a search
    tune-kd train   [--config FILE] ...   one distillation run with the seed's flags
    tune-kd report  results/<name>        report.html from a results folder
    tune-kd export  results/<name> --out DIR
    tune-kd demo                          the embedded default's data, tokenizer and teacher

Each subcommand's parser is the one `python -m tune_kd.<command>` builds (entry.configure), and
both run through the same error handler (entry.execute).
"""

from __future__ import annotations

import argparse

from tune_kd.cli import demo, entry, export, prepare, report, search, train

COMMANDS = {"search": search, "prepare": prepare, "train": train, "report": report, "export": export, "demo": demo}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="tune-kd", description=__doc__.split("\n")[0])
    commands = top.add_subparsers(dest="command", required=True, metavar="command")
    for name, module in COMMANDS.items():
        entry.configure(commands.add_parser(name, help=module.__doc__.split("\n")[0]), module.__doc__,
                         module.add_arguments)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    module = COMMANDS[args.command]
    return entry.execute(args, module.command, getattr(module, "log_level", None))

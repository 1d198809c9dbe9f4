"""The errors a user can cause and fix: each is printed as one line with exit code 2 (cli/entry.py).

`UserError` is the root (bad YAML, a bad data line, a missing file); `ConfigError` carries one
line per problem of an experiment config, all found at once.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix: printed as one line, exit code 2, no traceback unless --debug."""


class ConfigError(UserError):
    """One or more problems in an experiment config; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems) if len(self.problems) == 1 else
                         f"{len(self.problems)} problems in the config:\n  " + "\n  ".join(self.problems))

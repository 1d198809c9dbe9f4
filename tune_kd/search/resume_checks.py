"""What `--resume` refuses, in one line each, before Ray starts: a search saved in another format,
and a YAML changed since the search began."""

from __future__ import annotations

import json
from pathlib import Path

from tune_kd.config.errors import UserError
from tune_kd.config.experiment import ExperimentConfig
from tune_kd.results import reading

# changes a resume takes as they are: how trials run, not what they compute or how they are ranked
RESUMABLE_CHANGES = ("resources.", "data.cache_dir")


def flat(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out = {}
    for key, value in tree.items():
        out.update(flat(value, f"{prefix}{key}."))
    return out


# The saved search's format: bumped whenever a resume of an older folder would fail (its pickled
# searcher, scheduler or trainable names modules by path). 2: the stage packages (tune_kd/search/, ...);
# folders before it carry no number.
SEARCH_FORMAT = 2


def check_resume_format(experiment_dir: Path) -> None:
    """Refuse, in one line, to resume a search saved in another format (experiment.json's
    search_format; none before format 2): Ray would fail unpickling it with a traceback."""
    path = experiment_dir / reading.EXPERIMENT_FILE
    if not path.is_file():
        return   # nothing to compare: run_search says there is nothing to resume
    saved = json.loads(path.read_text()).get("search_format", 1)
    if saved != SEARCH_FORMAT:
        raise UserError(f"{experiment_dir}: saved by a tune_kd whose search format is {saved}, this one reads "
                        f"{SEARCH_FORMAT}; it cannot be resumed: start over with --overwrite (the old folder is moved "
                        "aside, its trials and best_student kept), or finish it with the tune_kd version that began it")


def check_resume_config(cfg: ExperimentConfig, experiment_dir: Path) -> None:
    """Refuse, in one line, a resume whose config differs from the first run's (experiment.json):
    Tune resumes the searcher, scheduler and callbacks as first built, so a changed metric, space,
    num_samples or training setting would be half applied."""
    path = experiment_dir / reading.EXPERIMENT_FILE
    if not path.is_file():
        return   # nothing to compare: run_search says there is nothing to resume
    first = flat(json.loads(path.read_text())["config"])
    now = flat(json.loads(json.dumps(cfg.to_dict(), default=str)))
    shown = lambda v: v if isinstance(v, str) else json.dumps(v)  # noqa: E731
    changed = [f"{key}: {shown(first.get(key))} -> {shown(now.get(key))}" for key in sorted(first.keys() | now.keys())
               if first.get(key) != now.get(key) and not key.startswith(RESUMABLE_CHANGES)]
    if changed:
        raise UserError(f"{experiment_dir}: the config changed since this search started ({'; '.join(changed)}); a "
                        "resumed search keeps its first settings: undo the change, or start over with --overwrite")

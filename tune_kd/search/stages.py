"""Progressive distillation (seed 10.4): a chain of searches, large -> medium -> small.

`stages:` in the YAML lists the stages; each is a complete experiment (the file's sections with the
stage's changes merged in, validated at load). Stage 1 distils the file's teacher; every later
stage's teacher is the previous stage's exported best student. One command runs the chain:

    results/<name>/<stage>/      each stage's experiment folder (trials, trials.csv, best_student/)
    results/<name>/stages.json   per stage: its teacher, student, best trial and metric, export

With --resume a stage whose export exists is skipped, an interrupted one is resumed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tune_kd.config.experiment import ExperimentConfig, load_config
from tune_kd.results import export

log = logging.getLogger(__name__)


def run_stages(cfg: ExperimentConfig, source: str, run_search, storage: str | None = None, resume: bool = False,
               **search_options) -> list[dict]:
    """Run every stage of cfg in order; returns one summary row per stage (also in stages.json).
    run_search: search.run_search, passed in by the search (which imports this module, not the
    other way round)."""
    root = Path(storage or "results").resolve() / cfg.name
    rows, teacher = [], None
    for index, raw in enumerate(cfg.stages, start=1):
        # later stages carry a placeholder teacher path (stages.PREVIOUS_STAGE_EXPORT) until here
        overrides = {"teacher.path": str(teacher)} if teacher is not None else {}
        stage = load_config(raw=raw, overrides=overrides, storage=storage)
        experiment_dir = root / stage.name
        exported = experiment_dir / export.export_name(stage)
        if resume and exported.is_dir():
            log.info("stage %d/%d %s: already done (%s)", index, len(cfg.stages), stage.name, exported)
            best = json.loads((experiment_dir / "best.json").read_text())
        else:
            log.info("stage %d/%d %s: teacher %s -> student %s", index, len(cfg.stages), stage.name,
                     stage.teacher.path if stage.teacher else None, describe(stage))
            summary = run_search(stage, source, storage=str(root), resume=resume and experiment_dir.is_dir(),
                                 **search_options)
            best = summary["best"]
        if best is None or not exported.is_dir():
            raise RuntimeError(f"stage {stage.name} produced no exported student: the chain stops here "
                               f"(see {experiment_dir / 'trials.csv'})")
        rows.append({"stage": stage.name, "teacher": stage.teacher.path if stage.teacher else None,
                     "student": describe(stage), "best_trial": best["trial_id"],
                     f"best_{stage.metric.name}": best[f"best_{stage.metric.name}"], "export": str(exported)})
        (root / "stages.json").write_text(json.dumps(rows, indent=1))
        teacher = exported
    for row in rows:
        print(f"stage {row['stage']}: {row['student']}, best {row['best_trial']} -> {row['export']}")
    return rows


def describe(cfg: ExperimentConfig) -> str:
    """A short name for the stage's student: its directory, or its architecture's size."""
    spec = cfg.student
    if spec.path is not None:
        return spec.path
    arch = spec.arch
    return f"{spec.preset or 'built'} {arch.hidden_size}x{arch.num_hidden_layers}" if arch else spec.preset


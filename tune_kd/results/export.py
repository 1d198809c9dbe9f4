"""Best trial -> a Hugging Face model directory, verified by reloading it.

    python -m tune_kd.export results/<name> --out DIR [--trial ID | --front]

Scans every trial's result.json under the experiment folder for epochs that left a checkpoint,
picks the best by the experiment's metric over all trials and epochs (or the best epoch of
--trial), and writes model.safetensors, config.json, generation_config.json, tokenizer files,
tune_kd.json (trial id, config, metrics, versions) and a short model card. It reads only files on
disk, so it works on a finished experiment and on an interrupted one. --front (a size/quality
search) exports every student on the front into DIR/<rank>_trial_<id>/, cheapest first.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from tune_kd.config.errors import UserError
from tune_kd.model.checkpoint import MANIFEST, TRAINER_STATE, atomic_directory_write, is_complete
from tune_kd.results.reading import METRICS, best, read_experiment, trial_folders

log = logging.getLogger(__name__)

SKIP_FILES = {TRAINER_STATE, "progress.json", MANIFEST, ".is_checkpoint", ".metadata.pkl", ".tune_metadata"}


@dataclass
class Candidate:
    trial_id: str
    value: float
    metrics: dict
    config: dict
    path: Path


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for package in ("tune_kd", "torch", "transformers", "ray", "optuna"):
        try:
            out[package] = md.version(package)
        except md.PackageNotFoundError:
            pass
    return out


def checkpoint_candidates(experiment_dir: Path, metric: str, diverged: bool = True) -> list[Candidate]:
    """Every (trial, epoch) whose checkpoint is still on disk, with its metric value; diverged=False
    leaves out the trials that diverged (a search's best is never one: reading.rankable)."""
    found = []
    for trial_dir, params, reports in trial_folders(experiment_dir):
        if not diverged and reports and reports[-1].get("diverged"):
            continue
        for row in reports:
            # a Tune checkpoint (checkpoint_dir_name), or a Ray Train one (checkpoint_path, workers_per_trial > 1)
            name = row.get("checkpoint_dir_name") or row.get("checkpoint_path")
            value = row.get(metric)
            if not name or value is None or (isinstance(value, float) and not math.isfinite(value)):
                continue
            path = trial_dir / name   # an absolute checkpoint_path stays as it is
            if is_complete(path):   # a copy cut short (crash, full disk) is never exported
                metrics = {k: row[k] for k in METRICS if k in row}
                found.append(Candidate(str(row.get("trial_id")), float(value), metrics, params, path))
    return found


def best_candidate(experiment_dir: Path, trial_id: str | None = None) -> tuple[Candidate, dict]:
    experiment = read_experiment(experiment_dir)
    metric, mode = experiment["metric"]["name"], experiment["metric"]["mode"]
    candidates = checkpoint_candidates(experiment_dir, metric, diverged=trial_id is not None)
    if trial_id is not None:
        candidates = [c for c in candidates if c.trial_id == trial_id]
    if not candidates:
        which = f"trial {trial_id}" if trial_id else "any trial"
        raise UserError(f"{experiment_dir}: no checkpoint of {which} is on disk yet (has an epoch finished?)")
    return best(candidates, mode, key=lambda c: c.value), experiment


def export_name(cfg) -> str:
    """The export folder's name: best_student, or best_student_moe for a mixture-of-experts
    student (the seed marks MoE weights with _moe)."""
    from tune_kd.model.build import model_config, moe_settings

    spec = cfg.student
    moe = spec.arch is not None and spec.arch.num_experts is not None if spec.path is None \
        else moe_settings(model_config(spec, "student")) is not None
    return "best_student_moe" if moe else "best_student"


def size_and_speed(metrics: dict) -> str:
    """The model card's line on the student's size and measured speed ("" when the run did not report them)."""
    if not isinstance(metrics.get("student_params"), (int, float)):
        return ""
    speed = metrics.get("gen_tokens_per_s")
    measured = f"; greedy decoding {speed:,.1f} tokens/s at batch 1 on the trial's device" \
        if isinstance(speed, (int, float)) and math.isfinite(speed) else ""
    return (f"Size: {metrics['student_params']:,.0f} parameters ({metrics.get('student_embedding_params', 0):,.0f} "
            f"of them embeddings){measured}.\n\n")


def model_card(candidate: Candidate, experiment: dict, front_note: str = "") -> str:
    metrics = "\n".join(f"| {k} | {v:.6g} |" for k, v in candidate.metrics.items())
    chosen = front_note or (f"the best by `{experiment['metric']['name']}` ({experiment['metric']['mode']}) over all "
                            "trials and epochs")
    return (f"# {experiment['name']}: distilled student\n\n"
            f"Exported by tune_kd from trial `{candidate.trial_id}` (epoch {candidate.metrics.get('epoch')}), "
            f"{chosen}.\n\n{size_and_speed(candidate.metrics)}"
            f"Searched values: `{json.dumps(candidate.config)}`. Full configuration in `tune_kd.json`.\n\n"
            f"| metric | value |\n| --- | --- |\n{metrics}\n\n"
            "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "model = AutoModelForCausalLM.from_pretrained(\"<this directory>\")\n"
            "tokenizer = AutoTokenizer.from_pretrained(\"<this directory>\")\n```\n")


def verify_reload(exported: Path, source: Path) -> float:
    """Reload both directories; the exported model must give the checkpoint's logits exactly."""
    import torch
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval()
    ids = torch.randint(0, a.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (a(input_ids=ids).logits - b(input_ids=ids).logits).abs().max().item()
    if diff != 0.0:
        raise RuntimeError(f"export verification failed: reloaded logits differ from the checkpoint's by {diff}")
    return diff


def export(experiment_dir: str | Path, out: str | Path, trial_id: str | None = None, front_note: str = "") -> Candidate:
    """Export the best checkpoint (of `trial_id`, if given) of an experiment to `out`; front_note: why
    this student, for the model card (export_front's place on the front)."""
    experiment_dir, out = Path(experiment_dir), Path(out)
    candidate, experiment = best_candidate(experiment_dir, trial_id)

    def write(tmp: Path) -> None:
        for item in candidate.path.iterdir():
            if item.is_file() and item.name not in SKIP_FILES:
                shutil.copy2(item, tmp / item.name)
        meta = {"trial_id": candidate.trial_id, "metric": experiment["metric"], "metrics": candidate.metrics,
                "searched": candidate.config, "config": experiment.get("config"), "source": str(candidate.path),
                "versions": versions()}
        (tmp / "tune_kd.json").write_text(json.dumps(meta, indent=1, default=str))
        (tmp / "README.md").write_text(model_card(candidate, experiment, front_note))
        verify_reload(tmp, candidate.path)

    atomic_directory_write(out, write)
    log.info("exported trial %s epoch %s (%s %.6g) -> %s", candidate.trial_id, candidate.metrics.get("epoch"),
             experiment["metric"]["name"], candidate.value, out)
    return candidate


def export_front(experiment_dir: str | Path, out: str | Path) -> list[tuple[Candidate, Path]]:
    """Every student on a size/quality search's front (front.py), cheapest first, each to
    out/<rank>_trial_<id>/ with its size, speed and metric in its model card."""
    from tune_kd.results import front

    experiment_dir, out = Path(experiment_dir), Path(out)
    points, size_key, metric, _ = front.experiment_points(experiment_dir)
    if size_key is None:
        raise UserError(f"{experiment_dir}: --front needs a size/quality search (search.objectives: [{metric}, "
                        f"student_params]); export its best with --trial ID or no option")
    shape_front = front.experiment_front(experiment_dir)
    exported = []
    for rank, point in enumerate(shape_front, 1):
        note = (f"student {rank} of {len(shape_front)} on the search's size/quality front ({size_key} "
                f"{point.size:,.6g}, {metric} {point.value:.6g}; no other trial is both cheaper and better)")
        target = out / f"{rank:02d}_trial_{point.trial_id}"
        exported.append((export(experiment_dir, target, point.trial_id, note), target))
    return exported

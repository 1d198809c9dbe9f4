"""A few validation prompts answered by the teacher, the best student and the plain-SFT control.

report.build puts them in a table, so a person sees what distillation changed and not only its
numbers. The prompts are spread over the experiment's validation split (inputs.load_data: the split
every trial validated on), each example cut before its first assistant token, so a model sees the
chat exactly as training rendered it (template, system and user turns, assistant header). The
answers are greedy (do_sample=False), at most MAX_NEW_TOKENS, on the GPU when there is one (a large
teacher in fp32 on CPU would take minutes), else on CPU in fp32: seconds for small students.

A model that is not there (no teacher, no plain_sft arm, the export skipped) or does not load
leaves its column out with a note saying why: the report never fails over a sample.
"""

from __future__ import annotations

import dataclasses
import html
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from tune_kd.config.experiment import load_config
from tune_kd.results import export, reading
from tune_kd.results.arms import CONTROL_KEY, CONTROLS_DIR

log = logging.getLogger(__name__)

NUM_PROMPTS = 4
MAX_NEW_TOKENS = 48
EXPORT_NAMES = ("best_student", "best_student_moe")   # export.export_name's two answers
PLAIN_SFT = "plain_sft"


@dataclass
class Samples:
    prompts: list[str]                                       # the rendered prompt, special tokens left out
    references: list[str]                                    # the data's own first answer
    answers: dict[str, list[str]] = field(default_factory=dict)   # column -> one answer per prompt
    notes: list[str] = field(default_factory=list)           # why a column is missing


def experiment_config(meta: dict):
    """The ExperimentConfig experiment.json holds (its to_dict form, unset keys dropped)."""
    def prune(node):
        if isinstance(node, dict):
            return {k: prune(v) for k, v in node.items() if v is not None and v != [] and v != {}}
        return node

    return load_config(raw=prune(json.loads(json.dumps(meta["config"], default=str))))


def models_to_ask(cfg, experiment_dir: Path, metric: str, mode: str) -> tuple[dict[str, object], list[str]]:
    """(column -> ModelSpec of a model directory on disk, notes for the columns left out)."""
    specs, notes = {}, []
    if cfg.teacher is None:
        notes.append("teacher: none in this experiment (plain SFT)")
    elif cfg.teacher.path is None:
        notes.append("teacher: built from an architecture, not a saved model directory")
    elif not Path(cfg.teacher.path).is_dir():
        notes.append(f"teacher: {cfg.teacher.path} is not on this machine")
    else:
        specs["teacher"] = cfg.teacher
    exported = next((experiment_dir / n for n in EXPORT_NAMES if (experiment_dir / n).is_dir()), None)
    if exported is None:
        notes.append("best student: not exported (the search ran with --no-export, or stopped before its end)")
    else:
        specs["best student"] = dataclasses.replace(cfg.student, path=str(exported))
    arm = [c for c in export.checkpoint_candidates(experiment_dir / CONTROLS_DIR, metric)
           if c.config.get(CONTROL_KEY, {}).get("arm") == PLAIN_SFT]
    if not arm:
        notes.append("plain SFT: no checkpoint of the plain_sft control arm (controls.plain_sft off, or not run)")
    else:
        best = reading.best(arm, mode, key=lambda c: c.value)
        specs["plain SFT"] = dataclasses.replace(cfg.student, path=str(best.path))
    return specs, notes


def validation_prompts(cfg, count: int = NUM_PROMPTS):
    """(tokenizer, [(prompt ids, reference ids)]): `count` validation examples spread over the split."""
    import numpy as np

    from tune_kd.data import inputs

    tokenizer, _, val = inputs.load_data(cfg)
    picks = np.unique(np.linspace(0, len(val) - 1, min(count, len(val))).round().astype(int))
    pairs = []
    for i in picks:
        tokens, mask = val.example(int(i))
        first = int(np.argmax(mask))                           # the first assistant token
        end = first + (int(np.argmin(mask[first:])) if not mask[first:].all() else len(mask) - first)
        pairs.append((tokens[:first].astype(np.int64), tokens[first:end].astype(np.int64)))
    return tokenizer, pairs


def greedy_answers(model, tokenizer, prompts: list, pad_id: int) -> list[str]:
    """One greedy answer per prompt (ids, on the model's device), decoded without special tokens."""
    import torch

    limit = getattr(model.config, "max_position_embeddings", None)
    eos = model.generation_config.eos_token_id
    answers = []
    for ids in prompts:
        room = MAX_NEW_TOKENS if limit is None else min(MAX_NEW_TOKENS, limit - len(ids))
        if room < 1:
            answers.append("")
            continue
        inputs = torch.as_tensor(ids, device=model.device).unsqueeze(0)
        with torch.inference_mode():
            out = model.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=False, max_new_tokens=room,
                                 pad_token_id=pad_id, eos_token_id=eos if eos is not None else tokenizer.eos_token_id)
        answers.append(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip())
    return answers


def build_samples(experiment_dir: Path, meta: dict, count: int = NUM_PROMPTS) -> Samples:
    """The prompts table's content. Any failure (data moved, a model that does not load or generate)
    becomes a note: the report is the last step of a finished search and must not be lost to it."""
    import torch

    from tune_kd.data import tokenized
    from tune_kd.model import build, hardware

    try:
        cfg = experiment_config(meta)
        tokenizer, pairs = validation_prompts(cfg, count)
    except Exception as exc:   # a moved data file, a config this version reads otherwise: the table only
        log.warning("report: no sample answers (%s)", _first_line(exc))
        return Samples([], [], notes=[f"sample answers: the validation prompts could not be read ({_first_line(exc)})"])
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip()
    samples = Samples([decode(p) for p, _ in pairs], [decode(r) for _, r in pairs])
    specs, samples.notes = models_to_ask(cfg, experiment_dir, meta["metric"]["name"], meta["metric"]["mode"])
    device = hardware.resolve_device("auto")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    prompts = [p for p, _ in pairs]
    for column, spec in specs.items():
        try:
            model = build.load_model_dir(spec, column, dtype).to(device).eval()
            samples.answers[column] = greedy_answers(model, tokenizer, prompts, tokenized.padding_id(tokenizer))
        except Exception as exc:   # one broken model costs its column only
            samples.notes.append(f"{column}: {_first_line(exc)}")
    return samples


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def samples_html(samples: Samples) -> str:
    """The report's table (text escaped) and a note per column left out."""
    if not samples.prompts:
        return "".join(f"<p class='note'>{html.escape(note)}</p>" for note in samples.notes)
    columns = ["prompt", "reference (data)", *samples.answers]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    rows = ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
            for cells in zip(samples.prompts, samples.references, *samples.answers.values())]
    notes = "".join(f"<p class='note'>left out: {html.escape(note)}</p>" for note in samples.notes)
    return (f"<h2>Sample answers</h2><p>{len(samples.prompts)} validation prompts, greedy decoding (at most "
            f"{MAX_NEW_TOKENS} new tokens): what each model says, not only its metric.</p>"
            f"<table id='samples'><tr>{head}</tr>{''.join(rows)}</table>{notes}")

"""torch.compile for a trial: what is compiled, where inductor caches it, and when `compile: auto` compiles.

What: each decoder layer of both models, in place, with dynamic=True (regional compilation). The
layers of one model share their code, so dynamo traces one layer graph per model and mode
(student training, teacher inference, student evaluation) and reuses it for every layer and every
batch shape: compile time no longer grows with depth, and bucketed batches of new lengths reuse
the graph (tests/test_compiling.py counts the graphs). The models run with use_cache=False
(scored.ScoredLM): Hugging Face's KV cache makes each layer's index a guard, one recompile per
layer until dynamo's recompile limit drops back to eager.

Where: TORCHINDUCTOR_CACHE_DIR = <data.cache_dir>/compile/inductor, set in every trial before it
compiles, so the second trial with the same shapes reuses the first one's kernels (Triton's cache
lives under it too).

When: `train.compile` on / off force it. auto compiles on CUDA only, and only where it pays back
within the trial: the first steps run eager and are timed, then

    compile  <=>  steps left x eager step seconds x expected saving  >  expected compile seconds

with the compile seconds and the saving from <data.cache_dir>/compile/stats.json (what earlier
trials with the same shapes measured), else conservative defaults. A trial that compiles times its
first compiled steps (their time minus the steady compiled step's is the compile cost) and records
the cost and the saving there for the trials after it. Decision, reason and measurements go to the
trial log.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

log = logging.getLogger(__name__)

COMPILE_SUBDIR = "compile"           # under data.cache_dir: inductor/ and stats.json
STRATEGY = "per-layer dynamic v1"    # part of the stats key: another way of compiling is another cost
# No measurement yet for these shapes: assume compiling is expensive and saves little, so auto
# compiles only long trials until one has measured the real figures.
DEFAULT_COMPILE_S = 240.0
DEFAULT_SAVING = 0.2
EAGER_WARMUP_STEPS = 1               # the first step allocates, initialises cuBLAS, starts loaders
EAGER_TIMED_STEPS = 5
COMPILED_WARMUP_STEPS = 2            # the first compiles; the second shows a new shape does not
COMPILED_TIMED_STEPS = 5


# ----------------------------------------------------------------------------------------------
# What is compiled, and inductor's shared cache
# ----------------------------------------------------------------------------------------------

def compile_bodies(*lms, backend: str = "inductor") -> None:
    """torch.compile, in place, each decoder layer of every causal LM in `lms` (None skipped); a model
    without a `layers` list in its body gets its whole body compiled. In place keeps state-dict keys
    plain; dynamic=True because bucketed batches vary in length and the last batch in size."""
    for lm in lms:
        if lm is None:
            continue
        layers = getattr(lm.base_model, "layers", None)
        for module in layers if isinstance(layers, torch.nn.ModuleList) else [lm.base_model]:
            module.compile(dynamic=True, backend=backend)


def share_inductor_cache(cache_dir: str | Path) -> Path:
    """Point inductor's (and so Triton's) on-disk cache at <cache_dir>/compile/inductor, shared by
    every trial and run with this cache folder. Call before the process first compiles: inductor
    reads the variable then."""
    directory = (Path(cache_dir) / COMPILE_SUBDIR / "inductor").resolve()
    directory.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory)
    return directory


# ----------------------------------------------------------------------------------------------
# The stats file: what earlier trials measured, per model shapes
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CompileRecord:
    """What trials with one set of shapes measured (the latest measurement: the cache warms up)."""

    compile_s: float              # seconds spent compiling: first compiled steps minus their steady time
    saving: float | None          # share of an eager step's time compiled steps save (None: not measured,
                                  # compile: on has no eager baseline)
    trials: int = 1               # how many trials measured these shapes


def shapes_key(student, teacher, teacher_in_step: bool, device: torch.device, autocast_dtype) -> str:
    """The stats key: everything the compile cost and the saving depend on, readable in the file."""
    def shape(lm) -> str:
        c = lm.config
        return (f"{c.model_type} h{c.hidden_size} l{c.num_hidden_layers} a{c.num_attention_heads}/"
                f"{getattr(c, 'num_key_value_heads', c.num_attention_heads)} i{getattr(c, 'intermediate_size', '?')} "
                f"v{c.vocab_size}")
    teacher_part = "none" if teacher is None else f"{shape(teacher)} {'in the step' if teacher_in_step else 'eval only'}"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return (f"student {shape(student)} | teacher {teacher_part} | {where} | {autocast_dtype or 'fp32'} | "
            f"torch {torch.__version__} | {STRATEGY}")


def stats_path(cache_dir: str | Path) -> Path:
    return Path(cache_dir) / COMPILE_SUBDIR / "stats.json"


def read_record(path: Path, key: str) -> CompileRecord | None:
    """The record for `key`, or None (no file, no entry, or an unreadable file: then measure anew)."""
    try:
        entry = json.loads(path.read_text()).get(key)
        return CompileRecord(**entry) if entry else None
    except (OSError, ValueError, TypeError):
        return None


def record_measurement(path: Path, key: str, compile_s: float, saving: float | None) -> CompileRecord:
    """Store one trial's measurement under `key` (locked, atomically replaced: trials run at once);
    a missing saving keeps the one measured before. Returns the stored record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError):
            table = {}
        before = read_record(path, key)
        record = CompileRecord(compile_s=round(compile_s, 3),
                               saving=saving if saving is not None else before.saving if before else None,
                               trials=(before.trials if before else 0) + 1)
        table[key] = asdict(record)
        scratch = path.with_suffix(f".{os.getpid()}.tmp")
        scratch.write_text(json.dumps(table, indent=1, sort_keys=True))
        os.replace(scratch, path)
    return record


# ----------------------------------------------------------------------------------------------
# The decision (pure: tests give it fake timings)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CompileDecision:
    compile: bool
    reason: str


def decide(setting: str, device_type: str, steps_left: int, eager_step_s: float | None,
           record: CompileRecord | None) -> CompileDecision:
    """Whether to compile now. on / off force it; auto compiles on CUDA when
    steps_left x eager_step_s x saving > compile seconds, with saving and compile seconds from
    `record` (earlier trials) or DEFAULT_SAVING / DEFAULT_COMPILE_S. auto needs eager_step_s."""
    if setting in ("on", "off"):
        return CompileDecision(setting == "on", f"train.compile: {setting}")
    if device_type != "cuda":
        return CompileDecision(False, f"auto: not on {device_type} (inductor's CPU kernels take minutes to compile "
                                      "and rarely pay back; train.compile: on forces it)")
    if eager_step_s is None:
        raise ValueError("compile auto decides from a measured eager step time")
    cost = record.compile_s if record else DEFAULT_COMPILE_S
    saving = record.saving if record and record.saving is not None else DEFAULT_SAVING
    source = (f"measured by {record.trials} earlier trial(s) with these shapes" if record else
              "no trial has measured these shapes yet: conservative defaults")
    if record and record.saving is not None and record.saving <= 0:
        return CompileDecision(False, f"auto: compiled steps were not faster for these shapes ({source})")
    gain = steps_left * eager_step_s * saving
    verdict = ">" if gain > cost else "<="
    return CompileDecision(gain > cost, f"auto: {steps_left} steps left x {eager_step_s * 1000:.1f} ms eager x "
                                        f"{saving:.0%} saving = {gain:.0f} s {verdict} {cost:.0f} s compiling ({source})")


# ----------------------------------------------------------------------------------------------
# One trial's compile: decide, compile, measure, record
# ----------------------------------------------------------------------------------------------

class TrialCompile:
    """train.compile for one trial. Build it just before the first step; call after_step(epoch)
    after every optimizer step (it synchronises the device only while it is timing, about a
    dozen steps). Timed intervals that contain an epoch end (evaluation) are left out.

    off: nothing. on: compiles at once, then measures. auto (CUDA): times EAGER_TIMED_STEPS eager
    steps after EAGER_WARMUP_STEPS, decides (logged with its reason), and when it compiles, times
    COMPILED_WARMUP_STEPS + COMPILED_TIMED_STEPS compiled steps and records the compile seconds
    and the saving in the stats file (when `record`: one rank of a data-parallel trial).
    """

    def __init__(self, setting: str, device: torch.device, lms: Sequence, cache_dir: str | Path, key: str,
                 steps_left: int, epoch: int, record: bool = True, clock: Callable[[], float] = time.perf_counter,
                 compile_fn: Callable[..., None] = compile_bodies):
        self.device, self.lms, self.key, self.steps_left, self.record = device, tuple(lms), key, steps_left, record
        self.cache_dir, self.stats = cache_dir, stats_path(cache_dir)
        self.clock, self.compile_fn = clock, compile_fn
        self.eager: list[float] = []        # clean eager step seconds (after warm-up)
        self.first_compiled: list[float] = []
        self.compiled: list[float] = []     # clean steady compiled step seconds
        self.compile_interrupted = False    # an epoch end fell among the first compiled steps
        self.eager_seen = 0
        self.decision: CompileDecision | None = None   # auto: None until the eager steps are timed
        if setting == "auto" and device.type == "cuda":
            self.phase = "eager"
            log.info("compile auto: timing %d eager steps before deciding", EAGER_WARMUP_STEPS + EAGER_TIMED_STEPS)
        else:
            self._apply(decide(setting, device.type, steps_left, None, None))
        self.epoch, self.last = epoch, self.clock()

    def after_step(self, epoch: int) -> None:
        """Account for the optimizer step that just finished, in epoch `epoch` (0-based)."""
        self.steps_left -= 1
        if self.phase == "done":
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = self.clock()
        seconds, clean = now - self.last, epoch == self.epoch
        self.epoch, self.last = epoch, now
        if self.phase == "eager":
            self.eager_seen += 1
            if clean and self.eager_seen > EAGER_WARMUP_STEPS:
                self.eager.append(seconds)
            if len(self.eager) == EAGER_TIMED_STEPS:
                self._decide_auto()
        elif self.phase == "compiled_warmup":
            self.first_compiled.append(seconds)
            self.compile_interrupted |= not clean
            if len(self.first_compiled) == COMPILED_WARMUP_STEPS:
                self.phase = "compiled"
        elif self.phase == "compiled":
            if clean:
                self.compiled.append(seconds)
            if len(self.compiled) == COMPILED_TIMED_STEPS:
                self._finish_measurement()

    def _decide_auto(self) -> None:
        eager_s = sum(self.eager) / len(self.eager)
        self._apply(decide("auto", self.device.type, self.steps_left, eager_s, read_record(self.stats, self.key)))

    def _apply(self, decision: CompileDecision) -> None:
        self.decision = decision
        log.info("compile: %s (%s)", "on" if decision.compile else "off", decision.reason)
        if not decision.compile:
            self.phase = "done"
            return
        log.info("compile: inductor cache %s", share_inductor_cache(self.cache_dir))
        self.compile_fn(*self.lms)
        self.phase = "compiled_warmup"

    def _finish_measurement(self) -> None:
        self.phase = "done"
        compiled_s = sum(self.compiled) / len(self.compiled)
        eager_s = sum(self.eager) / len(self.eager) if self.eager else None
        saving = 1 - compiled_s / eager_s if eager_s else None
        against = f" vs {eager_s * 1000:.1f} ms eager ({eager_s / compiled_s:.2f}x, saving {saving:.0%})" \
            if eager_s else ""
        if self.compile_interrupted:
            log.info("compile: compiled steps %.1f ms%s; compile seconds not measured (an epoch end fell among the "
                     "first compiled steps)", compiled_s * 1000, against)
            return
        compile_s = max(0.0, sum(self.first_compiled) - len(self.first_compiled) * compiled_s)
        log.info("compile: took %.1f s; compiled steps %.1f ms%s", compile_s, compiled_s * 1000, against)
        if self.record:
            record = record_measurement(self.stats, self.key, compile_s, saving)
            log.info("compile: recorded in %s (%d trial(s) with these shapes)", self.stats, record.trials)

"""Everything a search does before its first trial: `python -m tune_kd.prepare --config FILE.yaml`.

`prepare_inputs(cfg, source)` validates the inputs (the embedded demo built when asked for, every
path, one tokenizer shared by teacher and student with a chat template tune_kd can use, both
models on the meta device), tokenizes the training and validation data into the shared
cache (streaming, ingest.py) and builds the teacher cache when it applies. The search calls the same
function, so a search after `prepare` finds every cache built and starts its trials at once; on a
cluster, prepare once with the search's --storage (data.cache_dir defaults to <storage>/cache, which
every node sees), then search.

The command prints, per data file, the conversations read and kept, tokens, assistant tokens,
truncated / dropped / skipped counts, the share of assistant tokens that are the tokenizer's
unknown token (a warning above 1%: the tokenizer cannot spell the data), the time, the size and the
cache folder; then the split and the teacher cache. A data.max_seq_len that keeps no assistant token
of the file's first conversations fails before the full tokenization (ingest.check_max_seq_len), in
one line that points at the key's line in the YAML.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from tune_kd.config.errors import ConfigError, UserError
from tune_kd.config.experiment import ExperimentConfig
from tune_kd.config.typed_yaml import key_location
from tune_kd.data import cross_tokens, ingest, inputs, tokenized

log = logging.getLogger(__name__)

@dataclass
class Prepared:
    """What prepare_inputs found or built; `lines` is its printed summary."""

    files: dict = field(default_factory=dict)        # "train" / "val" -> the data cache's meta.json (+ "cache")
    train_examples: int = 0
    val_examples: int = 0
    teacher_cache: object = None                      # a cache_store.TeacherCache, or None
    teacher_cache_why: str = ""
    seconds: float = 0.0
    lines: list = field(default_factory=list)

    def add_teacher_cache(self, directory: str | Path | None, why: str) -> None:
        """Record the teacher cache built (or found) for this run, wherever that happened."""
        from tune_kd.teacher.cache_store import TeacherCache

        self.teacher_cache, self.teacher_cache_why = (TeacherCache(directory) if directory else None), why
        if self.teacher_cache is None:
            self.lines.append(f"teacher cache: {why}")
            return
        meta = self.teacher_cache.meta
        auto = meta.get("auto")
        chosen = ""
        if auto and "seconds" in auto:   # what choosing k cost, against the build it chose for
            share = auto["seconds"] / max(auto["seconds"] + meta["build_seconds"], 1e-9)
            chosen = (f"; top_k auto measured {len(auto['errors'])} ks in {auto['seconds']:.1f} s, {100 * share:.0f}% "
                      "of the teacher cache's preparation")
        self.lines.append(f"teacher cache: {why}; {meta['positions']:,} positions, {self.teacher_cache.nbytes / 2**20:.1f} "
                          f"MB ({meta['bytes_per_position']:,} bytes per position), built in {meta['build_seconds']:.1f} s"
                          f"{chosen} -> {self.teacher_cache.directory}")


def describe_file(role: str, meta: dict, directory: Path) -> str:
    built = f"built in {meta['seconds']:.1f} s with {meta['workers']} worker(s)"
    return (f"{role} {meta['source']} ({meta['format']}): {meta['conversations']:,} conversations -> "
            f"{meta['examples']:,} examples, {meta['tokens']:,} tokens, {meta['assistant_tokens']:,} assistant tokens; "
            f"{meta['skipped_no_assistant']:,} skipped (no assistant turn), {meta['truncated']:,} truncated, "
            f"{meta['dropped_after_truncation']:,} dropped (max_seq_len {meta['max_seq_len']}); unknown token "
            f"{100 * tokenized.unknown_share(meta):.2f}% of assistant tokens; {built}; {meta['bytes'] / 2**20:.1f} MB -> {directory}")


def input_paths(cfg: ExperimentConfig) -> dict[str, str]:
    """Dotted key -> every input path the config names."""
    wanted = {"data.path": cfg.data.path, "data.val_path": cfg.data.val_path, "tokenizer": cfg.tokenizer,
              "teacher.path": cfg.teacher.path if cfg.teacher else None, "student.path": cfg.student.path,
              "teacher.tokenizer": cfg.teacher.tokenizer if cfg.teacher else None,
              "student.tokenizer": cfg.student.tokenizer}
    return {key: path for key, path in wanted.items() if path is not None}


def check_paths(cfg: ExperimentConfig, source: str, keys=None) -> None:
    """Every input path (of `keys`, default all) must exist before anything runs; all missing ones
    reported at once."""
    missing = [f"{source}: {key}: {path} does not exist (fix the path, or set embedded_demo: true for the demo)"
               for key, path in input_paths(cfg).items() if (keys is None or key in keys) and not Path(path).exists()]
    if missing:
        raise ConfigError(missing)


def build_demo_after_checks(cfg: ExperimentConfig, source: str) -> None:
    """Build the embedded demo when the config asks for it and it is not built yet, but first check
    the user's own inputs (paths outside the demo folder; their chat files read through): a bad line
    must cost seconds, not the minutes of training the demo teacher."""
    if not cfg.embedded_demo:
        return
    from tune_kd.data import chat_formats
    from tune_kd.search import demo

    if not demo.is_built():
        demo_root = demo.DEMO_DIR.resolve()
        own = {key for key, path in input_paths(cfg).items() if not Path(path).resolve().is_relative_to(demo_root)}
        check_paths(cfg, source, own)
        for key in sorted(own & {"data.path", "data.val_path"}):
            chat_formats.check_file(input_paths(cfg)[key], cfg.data.format)
    demo.prepare()


def prepare_inputs(cfg: ExperimentConfig, source: str, teacher_cache: bool = True) -> Prepared:
    """Validate, tokenize into the shared cache and build the teacher cache: the search's preflight.
    teacher_cache=False leaves the teacher cache to the caller (a search builds it where its trials
    run: resources.place_trials)."""
    from tune_kd.model import build
    from tune_kd.teacher import across

    started = time.perf_counter()
    build_demo_after_checks(cfg, source)
    check_paths(cfg, source)
    tokenizers = inputs.run_tokenizers(cfg)
    tokenizer = tokenizers.student
    try:   # model errors surface here, once, not in every trial
        across.check_settings(cfg, tokenizers.across)
        build.preflight(cfg, tokenizer, tokenizers.teacher)
    except UserError as exc:
        raise UserError(f"{source}: {exc}") from None
    out = Prepared()
    try:
        _, train_data, val_data = inputs.load_data(cfg, tokenizers, verify=True)
    except ingest.SeqLenError as exc:   # the fix is a key of the YAML: point at its line
        where = key_location(source, exc.key)
        raise UserError(f"{where}: {exc}" if where else str(exc)) from None
    for role, path in (("train", cfg.data.path), ("val", cfg.data.val_path)):
        if path is None:
            continue
        if tokenizers.across:   # both renderings and their alignment (data/cross_tokens.py)
            directory = cross_tokens.pair_cache_dir(path, tokenizer, tokenizers.teacher, cfg.data.max_seq_len,
                                                    cfg.data.cache_dir, cfg.data.format, cfg.data.system_turns)[0]
            out.lines.append(f"{role} data: {cross_tokens.alignment_summary(cross_tokens.pair_meta(directory))} -> "
                             f"{directory}")
            continue
        directory, _ = tokenized.cache_dir_for(path, tokenizer, cfg.data.max_seq_len, cfg.data.cache_dir,
                                          cfg.data.system_turns)
        out.files[role] = tokenized.cache_meta(directory)
        out.lines.append(describe_file(role, out.files[role], directory))
        warning = tokenized.unknown_token_warning(out.files[role])
        if warning:
            out.lines.append(warning)
    out.train_examples, out.val_examples = len(train_data), len(val_data)
    how = "data.val_path" if cfg.data.val_path else f"data.val_fraction {cfg.data.val_fraction:g} held out"
    subset = f", a fixed subset of data.max_train_examples {cfg.data.max_train_examples:,}" \
        if cfg.data.max_train_examples is not None and cfg.data.max_train_examples <= len(train_data) else ""
    out.lines.append(f"split: {out.train_examples:,} train / {out.val_examples:,} val ({how}{subset})")
    if teacher_cache:
        cache, why = prepare_teacher_rows(cfg, serve=False)[:2]
        out.add_teacher_cache(cache.directory if cache is not None else None, why)
    out.seconds = time.perf_counter() - started
    return out


def driver_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """cfg for a run the search's driver builds itself (the teacher cache here, the GPU memory probe),
    which is no trial: it holds the teacher itself (no served one runs yet), and a size budget
    (student.max_params) rejects trials, not the search."""
    return cfg.replace(teacher_server=dataclasses.replace(cfg.teacher_server, mode="off"),
                       student=dataclasses.replace(cfg.student, max_params=None))


class TeacherRows(NamedTuple):
    """prepare_teacher_rows's answer."""

    cache: object                 # the teacher cache (cache_store.TeacherCache) the trials read, or None
    why: str                      # the cache's plan, one line
    served_layout: object = None  # with serve: the rows a served teacher answers in (stored_rows.Layout)
    costs: object = None          # with serve under teacher_server auto: served.TeacherCosts, its cost rule's input


def prepare_teacher_rows(cfg: ExperimentConfig, serve: bool) -> TeacherRows:
    """Build the teacher cache before the trials start (the search's driver), on the device the
    trials will use, so no trial waits for another; with serve, also decide the rows a served
    teacher answers in (cache_plan.served_layout) and, under teacher_server auto where the trials
    would run the teacher live, price serving against a teacher per trial (teacher_choice.measure).
    The run is built as every trial builds it (train/run.build_run), so top_k auto measures against
    the trials' starting student and they all reuse this measurement."""
    import torch

    from tune_kd.teacher import cache_plan, served
    from tune_kd.train.run import build_run

    if cfg.teacher is None:
        return TeacherRows(None, "not used: no teacher")
    if cfg.teacher_server.url:
        return TeacherRows(None, cache_plan.decide(cfg, 0, 0, 0).why)
    if cfg.teacher_cache.mode == "off" and not serve:
        return TeacherRows(None, "off (teacher_cache: off)")
    run = build_run(driver_config(cfg), cache=False)   # the cache is left to the plan below
    # one measurer for the cache and the served rows: its inputs() hashes the teacher's weights once
    source = run.cache_source()
    measurer = cache_plan.make_measurer(source)
    cache, why = cache_plan.open_teacher_cache(source, measurer, verify=True)
    layout = cache_plan.served_layout(cfg, cache, measurer) if serve else None
    costs = None
    if serve and cfg.teacher_server.mode == "auto" and (cache is None or served.on_policy_searched_or_set(cfg)) \
            and not run.across:   # across tokenizers the served teacher is not priced (decide's rule without costs)
        from tune_kd.search import teacher_choice

        costs = teacher_choice.measure(run, layout)
    device = run.device
    del run
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return TeacherRows(cache, why, layout, costs)

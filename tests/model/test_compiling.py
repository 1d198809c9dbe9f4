"""compile auto: the payback rule on fake timings, the stats file, the shared inductor cache, one
trial's decide-compile-measure cycle on a fake clock, and that a compiled body does not recompile
for new batch lengths. On GPU: the decision reaches the trial log, the probe predicts a trial."""

import gc
import logging
import math
import os
from pathlib import Path

import pytest
import torch

from tune_kd.model import compiling
from tune_kd.model.compiling import CompileRecord, TrialCompile, decide
from tune_kd.search.prepare import prepare_teacher_rows

KEY = "student llama h64 | teacher none | test"


def test_auto_compiles_when_the_remaining_steps_pay_back_the_measured_compile():
    record = CompileRecord(compile_s=30.0, saving=0.4, trials=2)
    # 1000 steps x 0.1 s x 40% = 40 s saved > 30 s compiling
    decision = decide("auto", "cuda", steps_left=1000, eager_step_s=0.1, record=record)
    assert decision.compile
    assert "40 s > 30 s" in decision.reason and "2 earlier trial(s)" in decision.reason


def test_auto_stays_eager_when_the_trial_is_too_short_to_pay_back():
    record = CompileRecord(compile_s=30.0, saving=0.4, trials=1)
    # 500 steps x 0.1 s x 40% = 20 s saved <= 30 s compiling
    decision = decide("auto", "cuda", steps_left=500, eager_step_s=0.1, record=record)
    assert not decision.compile
    assert "20 s <= 30 s" in decision.reason


def test_without_stats_auto_uses_the_conservative_defaults():
    just_below = compiling.DEFAULT_COMPILE_S / (compiling.DEFAULT_SAVING * 0.1)   # steps that save exactly the cost
    assert not decide("auto", "cuda", int(just_below) - 1, 0.1, None).compile
    decision = decide("auto", "cuda", int(just_below) + 10, 0.1, None)
    assert decision.compile and "conservative defaults" in decision.reason


def test_stats_without_a_saving_use_the_default_saving_and_a_measured_loss_never_compiles():
    measured_by_compile_on = CompileRecord(compile_s=10.0, saving=None)
    # 600 steps x 0.1 s x DEFAULT_SAVING (20%) = 12 s > 10 s
    assert decide("auto", "cuda", 600, 0.1, measured_by_compile_on).compile
    slower = CompileRecord(compile_s=1.0, saving=-0.05)
    decision = decide("auto", "cuda", 10**6, 0.1, slower)
    assert not decision.compile and "not faster" in decision.reason


def test_on_and_off_force_and_auto_is_off_on_cpu():
    assert decide("on", "cpu", 1, None, None).compile
    assert not decide("off", "cuda", 10**9, 1.0, None).compile
    assert not decide("auto", "cpu", 10**9, 1.0, None).compile


def test_stats_file_round_trip_keeps_the_latest_figures_and_counts_trials(tmp_path):
    path = compiling.stats_path(tmp_path)
    assert compiling.read_record(path, KEY) is None
    compiling.record_measurement(path, KEY, compile_s=42.0, saving=0.3)
    assert compiling.read_record(path, KEY) == CompileRecord(compile_s=42.0, saving=0.3, trials=1)
    # a compile: on trial measures no saving: the earlier one stays; the warm cache's cost replaces the cold one
    compiling.record_measurement(path, KEY, compile_s=5.0, saving=None)
    assert compiling.read_record(path, KEY) == CompileRecord(compile_s=5.0, saving=0.3, trials=2)
    compiling.record_measurement(path, "other shapes", compile_s=9.0, saving=0.1)
    assert compiling.read_record(path, KEY).trials == 2 and compiling.read_record(path, "other shapes").trials == 1


def test_an_unreadable_stats_file_means_no_record(tmp_path):
    path = compiling.stats_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert compiling.read_record(path, KEY) is None
    compiling.record_measurement(path, KEY, compile_s=1.0, saving=0.5)   # and a measurement replaces it
    assert compiling.read_record(path, KEY).compile_s == 1.0


def test_inductor_cache_goes_under_the_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/else")
    directory = compiling.share_inductor_cache(tmp_path / "cache")
    assert directory == (tmp_path / "cache" / "compile" / "inductor").resolve() and directory.is_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(directory)
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert cache_dir() == str(directory)   # what inductor itself will use


class FakeClock:
    """perf_counter stand-in: each after_step advances it by the next planned step duration."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run_steps(trial: TrialCompile, clock: FakeClock, durations: list[float], epoch: int = 0) -> None:
    for seconds in durations:
        clock.now += seconds
        trial.after_step(epoch)


def auto_trial(tmp_path, steps_left: int, compiled: list, clock: FakeClock) -> TrialCompile:
    """compile: auto on a CUDA device (a torch.device needs no GPU; the tests stub out synchronize)."""
    return TrialCompile("auto", torch.device("cuda"), (), tmp_path, KEY, steps_left, epoch=0, clock=clock,
                        compile_fn=lambda *lms: compiled.append(lms))


def test_trial_times_eager_steps_decides_compiles_then_records_the_measured_cost(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "elsewhere"))
    clock, compiled = FakeClock(), []
    trial = auto_trial(tmp_path, steps_left=100_000, compiled=compiled, clock=clock)
    with caplog.at_level(logging.INFO, logger="tune_kd.model.compiling"):
        run_steps(trial, clock, [5.0] + [0.1] * compiling.EAGER_TIMED_STEPS)   # warm-up step, then timed ones
        assert trial.decision.compile and len(compiled) == 1
        # first compiled steps: 20 s of compiling on top of 0.06 s steps; then steady 0.06 s steps
        run_steps(trial, clock, [20.06, 0.06] + [0.06] * compiling.COMPILED_TIMED_STEPS)
    record = compiling.read_record(compiling.stats_path(tmp_path), KEY)
    assert record.compile_s == pytest.approx(20.0, abs=1e-6) and record.saving == pytest.approx(0.4)
    assert "compile: on (auto:" in caplog.text and "took 20.0 s" in caplog.text
    assert trial.phase == "done"


def test_trial_that_cannot_pay_back_stays_eager_and_records_nothing(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    clock, compiled = FakeClock(), []
    trial = auto_trial(tmp_path, steps_left=50, compiled=compiled, clock=clock)
    with caplog.at_level(logging.INFO, logger="tune_kd.model.compiling"):
        run_steps(trial, clock, [5.0] + [0.1] * compiling.EAGER_TIMED_STEPS + [0.1] * 20)
    assert not compiled and not trial.decision.compile
    assert "compile: off (auto:" in caplog.text
    assert not compiling.stats_path(tmp_path).exists()


def test_an_epoch_end_among_the_timed_steps_is_left_out(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    clock, compiled = FakeClock(), []
    trial = auto_trial(tmp_path, steps_left=100_000, compiled=compiled, clock=clock)
    run_steps(trial, clock, [5.0, 0.1, 0.1])
    run_steps(trial, clock, [30.0], epoch=1)           # this interval holds an evaluation
    run_steps(trial, clock, [0.1, 0.1, 0.1], epoch=1)
    assert trial.decision is not None and trial.eager == pytest.approx([0.1] * 5)   # no 30 s interval


def test_off_and_cpu_auto_never_compile_or_touch_the_inductor_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    for setting in ("off", "auto"):
        compiled = []
        trial = TrialCompile(setting, torch.device("cpu"), (), tmp_path, KEY, 10**6, epoch=0,
                             compile_fn=lambda *lms: compiled.append(lms))
        trial.after_step(0)
        assert not compiled and trial.phase == "done" and not trial.decision.compile
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ


@pytest.mark.slow
def test_compiled_layers_do_not_recompile_for_new_batch_lengths():
    """dynamic=True and no KV cache: one graph for the student's training layers and one for the
    teacher's inference layers, reused by every layer and every batch length (the eager backend
    traces exactly what inductor would be handed, without its compile time)."""
    from torch._dynamo.utils import counters
    from transformers import LlamaConfig, LlamaForCausalLM

    from tune_kd.kd.scored import ScoredLM

    torch._dynamo.reset()
    counters.clear()

    def llama(hidden, layers):
        return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=hidden, num_hidden_layers=layers,
                                            num_attention_heads=2, intermediate_size=2 * hidden,
                                            max_position_embeddings=64, attn_implementation="sdpa"))

    torch.manual_seed(0)
    student, teacher = llama(16, 3), llama(24, 3).eval().requires_grad_(False)
    compiling.compile_bodies(student, teacher, backend="eager")
    for length in (37, 12, 64, 5, 50):
        ids = torch.randint(0, 50, (3, length))
        positions = torch.ones_like(ids, dtype=torch.bool)
        with torch.inference_mode():
            ScoredLM(teacher)(ids, positions)
        out, _, _ = ScoredLM(student)(ids, positions)
        out.logits().sum().backward()
    assert counters["stats"]["unique_graphs"] == 2
    assert not counters["graph_break"]
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------
# On a GPU
# ----------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_compile_auto_logs_its_decision_on_gpu(tiny_config, caplog):
    from tune_kd.train.loop import train

    cfg = tiny_config(train={"device": "cuda", "dtype": "bfloat16", "epochs": 1, "compile": "auto"})
    with caplog.at_level(logging.INFO):
        result = train(cfg)
    decisions = [r.getMessage() for r in caplog.records if r.getMessage().startswith("compile: o")]
    assert len(decisions) == 1 and "(auto:" in decisions[0], decisions
    assert result.metrics["gpu_peak_gib"] > 0


@pytest.mark.gpu
def test_probe_is_within_25_percent_of_a_trials_real_peak_at_demo_sizes():
    from tune_kd.config.experiment import load_config
    from tune_kd.search import demo
    from tune_kd.search.resources import measure_trial_gpu_memory
    from tune_kd.train import loop

    demo.prepare()
    cfg = load_config(Path(__file__).resolve().parents[2] / "search_spaces" / "kd.yaml",
                      {"train.epochs": 1, "train.device": "cuda"})
    prepare_teacher_rows(cfg, serve=False)   # as the search's driver does before it probes
    probe_gib = measure_trial_gpu_memory(cfg) / 2**30
    gc.collect()
    torch.cuda.empty_cache()
    real_gib = loop.train(cfg).metrics["gpu_peak_gib"]
    assert math.isfinite(real_gib) and real_gib > 0
    assert probe_gib == pytest.approx(real_gib, rel=0.25), (probe_gib, real_gib)

"""The teacher-output cache: storage dtypes and sizes, exactness at k = V, fidelity, top_k auto,
invalidation, sharing."""

import json
import logging
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from tune_kd.config.errors import ConfigError, UserError
from tune_kd.config.experiment import load_config
from tune_kd.data import inputs, tokenized
from tune_kd.kd import losses, scoring
from tune_kd.kd.losses import KD_LOSSES
from tune_kd.kd.scored import Scored, ScoredLM
from tune_kd.model import hardware
from tune_kd.search.prepare import prepare_teacher_rows
from tune_kd.teacher import cache_fidelity, cache_plan, cache_store, stored_rows
from tune_kd.teacher.local import CacheReader, LiveTeacher
from tune_kd.train import loop, run, step
from tune_kd.train.run import build_run

from conftest import tiny_raw

SEARCHED_T = {"temperature": {"distribution": "uniform", "min": 1.0, "max": 5.0}}


def setup_run(cfg):
    """(tokenizer, train split, teacher ScoredLM, precision, teacher_cols, pad id, student
    ScoredLM) as loop.train has them: train/run.build_run's run, without its teacher cache."""
    built = build_run(cfg, cache=False)
    return built.tokenizer, built.train_data, built.teacher.scored, built.precision, built.teacher.columns, \
        built.pad_id, built.student


def whole(rows):
    """A batch's cache rows, every chunk at once."""
    return rows.chunk(0, rows.rows)


def source(cfg, tokenizer, train_data, teacher, precision, cols, pad, student):
    """setup_run's parts as the cache plan takes them."""
    return cache_plan.CacheSource(cfg, tokenizer, train_data, LiveTeacher(teacher, precision, cols), pad, student)


def open_cache(cfg, teacher_scale: float = 1.0):
    """(the cache cache_plan.open_teacher_cache opens for cfg, or None; train split; teacher). teacher_scale
    multiplies the teacher's output layer: above 1 a peakier teacher, below 1 a flatter one."""
    tokenizer, train_data, teacher, precision, cols, pad, student = setup_run(cfg)
    with torch.no_grad():
        teacher.lm.get_output_embeddings().weight.mul_(teacher_scale)
    return cache_plan.open_teacher_cache(source(cfg, tokenizer, train_data, teacher, precision, cols, pad, student))[0], train_data, teacher

def live_and_cached(cfg, cache, train_data, teacher, indices, temperature, kd_loss="forward_kl"):
    """The KD term and its gradient w.r.t. the student's logits, from the live teacher and from the cache,
    on the batch of `indices` (the same rows the loop would select)."""
    precision = hardware.resolve_precision("float32", torch.device("cpu"))
    batch = tokenized.collate(train_data, np.asarray(indices), 0)
    live = scoring.teacher_outputs(teacher, precision)(batch).logits()
    torch.manual_seed(0)
    student = torch.randn(live.shape) * 2.0
    out = []
    for teacher_side in (live, whole(cache.rows(batch["indices"]))):
        logits = student.clone().requires_grad_(True)
        parts = losses.distillation_loss(logits, teacher_side, torch.zeros(len(logits), dtype=torch.long), 0.0,
                                         temperature, 1.0, kd_loss, kd_options={"beta": 0.3} if kd_loss == "jsd" else {})
        parts.loss.backward()                                   # alpha 0: T^k x the KD term
        out.append((parts.kd.detach(), logits.grad / losses.kd_scale(kd_loss, temperature)))
    return out


def test_the_cache_holds_the_full_distribution_when_k_is_the_vocab(tiny_config):
    """k >= V stores whole rows as float32 logits in id order, whatever teacher_cache.dtype says (here
    the default float16): 4 bytes per logit, like a float16 value + uint16 id, and the live loss."""
    cfg = tiny_config(teacher_cache={"mode": "on", "top_k": 10_000})
    cache, train_data, teacher = open_cache(cfg)
    assert cache.tail is None and cache.ids is None and cache.meta["top_k"] == cache.meta["vocab"] == 103
    assert cache.values.dtype == np.float32 and cache.meta["bytes_per_position"] == 4 * 103
    for kd_loss in KD_LOSSES:
        for temperature in (0.7, 1.0, 2.6, 5.0, 12.0):
            (live, live_grad), (cached, cached_grad) = live_and_cached(cfg, cache, train_data, teacher, [3, 0, 7, 5],
                                                                       temperature, kd_loss)
            torch.testing.assert_close(cached, live, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(cached_grad, live_grad, rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Storage: dtypes, sizes, the round trip through disk
# ----------------------------------------------------------------------------------------------

RELATIVE_PRECISION = {"float16": 2**-11, "bfloat16": 2**-8, "float32": 2**-24}   # round to nearest


def synthetic_rows(vocab: int, hot_ids: slice):
    """teacher_rows for build(): seeded random logits (N, V), with the ids of `hot_ids` raised so
    they lead every row's top k; the logits of each batch are kept for the test to compare."""
    generator, seen = torch.Generator().manual_seed(0), []

    def rows(batch):
        count = int((batch["labels"][:, 1:] != tokenized.IGNORE_INDEX).sum())
        logits = 3.0 * torch.randn(count, vocab, generator=generator) + 20.0   # unshifted, far from 0
        logits[:, hot_ids] += 8.0
        seen.append(logits)
        return Scored.of_logits(logits)
    return rows, seen


@pytest.mark.parametrize("vocab, dtype, id_dtype", [(103, "float16", np.uint16), (103, "bfloat16", np.uint16),
                                                    (103, "float32", np.uint16), (70_000, "float16", np.uint32)])
def test_what_is_written_is_read_back(tiny_config, tmp_path, vocab, dtype, id_dtype):
    """ids exact (uint16 up to 65,536 ids, uint32 above, ids past 65,535 included), values and tail
    within the stored dtype's rounding, each row shifted by its largest logit."""
    cfg = tiny_config(data={"max_train_examples": 40})
    _, train_data, _ = inputs.load_data(cfg)
    lay = stored_rows.layout(16, vocab, dtype)
    rows, seen = synthetic_rows(vocab, slice(vocab - 20, vocab))
    cache_store.build(rows, train_data, 0, lay, tmp_path / "c", {})
    cache = cache_store.TeacherCache(tmp_path / "c")
    assert cache.ids.dtype == id_dtype and cache.meta["value_dtype"] == dtype
    assert cache.values.dtype.itemsize == (4 if dtype == "float32" else 2)
    assert cache.tail.dtype == (np.float32 if dtype == "float32" else np.float16)

    logits = torch.cat(seen)                                                   # (P, V) as the teacher gave them
    read = whole(cache.rows(np.arange(len(train_data))))
    assert read.values.dtype == torch.float32 and read.ids.dtype == torch.int64 and read.tail.dtype == torch.float32
    top = logits.topk(16, dim=1)
    assert torch.equal(read.ids, top.indices) and int(read.ids.max()) >= vocab - 20
    shifted = top.values - top.values[:, :1]
    torch.testing.assert_close(read.values, shifted, rtol=RELATIVE_PRECISION[dtype], atol=1e-6)
    assert (read.values[:, 0] == 0).all() and (read.values <= 0).all()
    rest = logits.scatter(1, top.indices, float("-inf")) - top.values[:, :1]
    expected_tail = torch.stack([torch.logsumexp(rest / t, 1) for t in stored_rows.TAIL_TEMPERATURES], 1)
    torch.testing.assert_close(read.tail, expected_tail, rtol=RELATIVE_PRECISION[cache.meta["tail_dtype"]], atol=1e-6)
    if dtype == "float16":   # and it is not just as coarse as bfloat16: fp16 keeps 3 more bits
        assert (read.values - shifted).abs().max() < 2**-9 * shifted.abs().max()


def test_bytes_per_position_halved_at_k_128():
    """Format 1 took 4 x (2k + 9) bytes (fp32 values, int32 ids, fp32 tail): 1,060 at k = 128."""
    format_1 = 4 * (2 * 128 + len(stored_rows.TAIL_TEMPERATURES))
    assert stored_rows.bytes_per_position(128, 6400, "float16") == format_1 // 2 == 530
    assert stored_rows.bytes_per_position(128, 6400, "bfloat16") == 530
    assert stored_rows.bytes_per_position(128, 6400, "float32") == 128 * 6 + 36
    assert stored_rows.bytes_per_position(128, 151_936, "float16") == 128 * 6 + 18      # int32 ids
    assert stored_rows.bytes_per_position(10_000, 6400, "float16") == 4 * 6400          # the full row
    assert stored_rows.planned_bytes(1000, 128, 6400) == 530_000


def test_the_built_files_take_what_bytes_per_position_says(tiny_config, tmp_path):
    cfg = tiny_config(data={"max_train_examples": 40})
    _, train_data, _ = inputs.load_data(cfg)
    for dtype in stored_rows.VALUE_DTYPES:
        lay = stored_rows.layout(32, 103, dtype)
        cache_store.build(synthetic_rows(103, slice(0, 4))[0], train_data, 0, lay, tmp_path / dtype, {})
        cache = cache_store.TeacherCache(tmp_path / dtype)
        positions = cache.meta["positions"]
        assert positions == int(train_data.target_counts.sum()) > 0
        assert cache.nbytes - cache.row_offsets.nbytes == positions * lay.bytes_per_position
        assert cache.meta["bytes_per_position"] == lay.bytes_per_position


# ----------------------------------------------------------------------------------------------
# Fidelity against the live teacher
# ----------------------------------------------------------------------------------------------

def parameter_fidelity(cfg, student_lm, teacher, train_data, lay, temperature) -> cache_fidelity.Fidelity:
    """cache_fidelity's errors at one temperature, w.r.t. the student's logits and parameters, on the
    first 128 training conversations (4 batches of 32)."""
    precision = hardware.resolve_precision("float32", torch.device("cpu"))
    student = ScoredLM(student_lm)
    meter = cache_fidelity.FidelityMeter([lay], [temperature], {cfg.train.kd_loss: {}}, list(student.parameters()))
    for lo in range(0, 128, 32):
        batch = tokenized.collate(train_data, np.arange(lo, lo + 32), 0)
        s_out, t_out, *_ = step.forward_pair(student, LiveTeacher(teacher, precision), batch, precision)
        meter.add(s_out.logits(), t_out.scored.logits())
    return meter.results()[lay]


@pytest.fixture(scope="module")
def students(world):
    """A fresh student and one trained for an epoch (closer to the teacher), as language models."""
    from tune_kd.train.loop import train

    cfg = load_config(raw=tiny_raw(world, train={"epochs": 1}, teacher_cache="off"))
    _, _, _, _, _, _, fresh = setup_run(cfg)
    return {"fresh": fresh.lm, "trained": train(cfg).student}


def test_a_top_k_below_the_vocab_is_close_at_low_temperature_and_drifts_as_t_grows(tiny_config, students):
    """k = 48 of 103 in float16: the estimated tail holds a growing share of the mass as T rises: the
    loss stays within 1%, the parameter gradient within 1% up to T = 3, and its error grows with T."""
    cfg = tiny_config()
    _, train_data, teacher, *_ = setup_run(cfg)
    lay = stored_rows.layout(48, 103, "float16")
    for student in students.values():
        errors = {t: parameter_fidelity(cfg, student, teacher, train_data, lay, t) for t in (1.0, 2.0, 3.0, 5.0)}
        assert max(e.loss for e in errors.values()) <= 0.01, errors
        assert all(errors[t].param_grad <= 0.01 for t in (1.0, 2.0, 3.0)), errors
        grads = [errors[t].param_grad for t in (1.0, 2.0, 3.0, 5.0)]
        assert grads == sorted(grads) and grads[0] < 1e-3, errors


def test_the_tail_term_is_exact_at_its_grid_temperatures(tiny_config):
    """log S(T) - m / T, read back at a grid temperature, is the teacher's (within float16 rounding)."""
    cfg = tiny_config(teacher_cache={"mode": "on", "top_k": 8})
    cache, train_data, teacher = open_cache(cfg)
    precision = hardware.resolve_precision("float32", torch.device("cpu"))
    batch = tokenized.collate(train_data, np.arange(4), 0)
    logits = scoring.teacher_outputs(teacher, precision)(batch).logits()
    cached = whole(cache.rows(batch["indices"]))
    row_max = logits.max(1, keepdim=True).values
    rest = logits.scatter(1, cached.ids, float("-inf")) - row_max
    for temperature in (1.0, 3.0):
        torch.testing.assert_close(cached.log_tail(temperature).squeeze(1), torch.logsumexp(rest / temperature, 1),
                                   rtol=RELATIVE_PRECISION["float16"], atol=1e-6)
    between = cached.log_tail(2.5).squeeze(1)   # a chord of a convex function: at or above the truth
    truth = torch.logsumexp(rest / 2.5, 1)
    assert (between >= truth - RELATIVE_PRECISION["float16"] * truth.abs() - 1e-6).all()


# ----------------------------------------------------------------------------------------------
# top_k auto
# ----------------------------------------------------------------------------------------------

def test_auto_keeps_fewer_logits_for_a_peakier_teacher(tiny_config):
    """The same data and student at T = 2: the trained teacher needs a k inside the ladder to stay
    within 1%; the same teacher with its logits tripled (much peakier) a smaller one."""
    cfg = tiny_config(teacher_cache="on")
    plain, _, _ = open_cache(cfg)
    peaky, _, _ = open_cache(cfg, teacher_scale=3.0)
    assert peaky.meta["top_k"] < plain.meta["top_k"] < 103
    for cache in (plain, peaky):
        auto = cache.meta["auto"]
        chosen = auto["errors"][str(auto["chosen_k"])]
        assert auto["chosen_k"] == cache.meta["top_k"] and auto["temperatures"] == [2.0]
        assert chosen["loss"] <= 0.01 and chosen["grad"] <= 0.01
        smaller = [e for k, e in auto["errors"].items() if int(k) < auto["chosen_k"]]
        assert all(e["loss"] > 0.01 or e["grad"] > 0.01 for e in smaller)   # the smallest that qualifies
    assert plain.directory != peaky.directory


def test_auto_keeps_the_full_row_when_no_smaller_k_is_within_1_percent(tiny_config):
    """Temperatures up to 20 give the (flattened) teacher's tail most of the mass: every k of the
    ladder below the vocabulary misses 1%, so auto stores full rows, which are exact."""
    cfg = tiny_config(teacher_cache="on", parameters={"temperature": {"distribution": "uniform", "min": 1.0,
                                                                      "max": 20.0}})
    cache, _, _ = open_cache(cfg, teacher_scale=0.5)
    auto = cache.meta["auto"]
    # the bisection over 8, 16, 32, 64 measures 32, then 64: both miss, so nothing below the vocabulary qualifies
    assert sorted(int(k) for k in auto["errors"]) == [32, 64] and auto["temperatures"][-1] == 20.0
    assert all(e["loss"] > 0.01 or e["grad"] > 0.01 for e in auto["errors"].values()), auto
    assert cache.meta["top_k"] == 103 and cache.ids is None and auto["chosen_k"] == 103


def test_auto_runs_live_when_the_k_it_needs_exceeds_max_gb(tiny_config, caplog):
    """A max_gb that holds top-16 but not the k auto needs: no cache, and one log line with the figures."""
    budget_gb = 0.0008   # 859 KB: top-16 (82 bytes x ~8,100 positions) fits, top-32 (146 bytes) does not
    cfg = tiny_config(teacher_cache={"max_gb": budget_gb}, parameters=SEARCHED_T)
    with caplog.at_level(logging.INFO, logger="tune_kd.train.run"):
        run.build_run(cfg)                                       # a run says it once
    assert len([r for r in caplog.records if "not used" in r.getMessage()]) == 1
    tokenizer, train_data, teacher, precision, cols, pad, student = setup_run(cfg)
    cache, why = cache_plan.open_teacher_cache(source(cfg, tokenizer, train_data, teacher, precision, cols, pad, student))
    assert cache is None
    lines = [why]
    match = re.search(r"not used: top_k auto needs top-(\d+) to stay within 1% \(loss error [\d.]+% \(T [\d.]+\), "
                      r"gradient [\d.]+% \(T [\d.]+\), worst over T 1, 2, 3, 4, 5 .*\), but it would take ([\d.]+) GiB, "
                      r"above teacher_cache.max_gb 0.0008; the largest k within it, top-(\d+), (measured|not measured "
                      r"\(top-\d+: )loss error", lines[0])
    assert match, lines[0]
    needed, gib, largest = int(match[1]), float(match[2]), int(match[3])
    positions = int(train_data.target_counts.sum())
    assert largest == 16 < needed and gib == pytest.approx(stored_rows.planned_bytes(positions, needed, 103) / 2**30,
                                                           rel=1e-2)


def test_auto_k_holds_for_the_parameter_gradient_of_the_starting_student(tiny_config, students):
    """auto measures w.r.t. the student's logits on its own sample; on other conversations the
    gradient w.r.t. the starting student's parameters is within 1% too, at every T of the range."""
    cfg = tiny_config(teacher_cache="on", parameters=SEARCHED_T)
    cache, train_data, teacher = open_cache(cfg)
    lay = stored_rows.layout(cache.meta["top_k"], 103, "float16")
    assert lay.k < 103
    for temperature in cache.meta["auto"]["temperatures"]:
        errors = parameter_fidelity(cfg, students["fresh"], teacher, train_data, lay, temperature)
        assert errors.loss <= 0.01 and errors.param_grad <= 0.01, (temperature, errors)


def test_the_searched_temperature_range_sets_what_auto_measures(tiny_config):
    assert cache_fidelity.temperatures_to_check(tiny_config()) == [2.0]
    assert cache_fidelity.temperatures_to_check(tiny_config(parameters=SEARCHED_T)) == [1.0, 2.0, 3.0, 4.0, 5.0]
    scheduled = tiny_config(train={"temperature_schedule": "linear", "temperature": 4.0, "final_temperature": 1.0})
    assert cache_fidelity.temperatures_to_check(scheduled) == [1.0, 1.75, 2.5, 3.25, 4.0]
    searched_loss = tiny_config(parameters={"kd_loss": {"distribution": "values", "values": ["jsd", "forward_kl"]}})
    assert cache_fidelity.kd_losses_to_check(searched_loss) == ["forward_kl", "jsd"]


def test_the_search_driver_measures_once_and_the_trials_reuse_it(world, tmp_path, monkeypatch):
    """prepare_teacher_cache (the driver) builds its student as train does, so a trial finds the
    driver's measurement on disk, picks the same k and reads the same cache."""
    calls = []
    original = cache_fidelity.measure_ladder
    monkeypatch.setattr(cache_fidelity, "measure_ladder", lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    cfg = load_config(raw=tiny_raw(world, train={"epochs": 1}, data={"cache_dir": str(tmp_path / "cache")},
                                   parameters=SEARCHED_T))
    driver_cache = prepare_teacher_rows(cfg, serve=False)[0]
    opened = []
    original_open = run.open_teacher_cache
    monkeypatch.setattr(run, "open_teacher_cache", lambda *a, **k: opened.append(original_open(*a, **k)) or opened[-1])
    loop.train(cfg)
    assert len(calls) == 1 and opened[0][0].directory == driver_cache.directory
    assert len(list((tmp_path / "cache" / "teacher").glob("auto-*.json"))) == 1


def test_a_changed_teacher_data_or_length_is_rebuilt_never_read(world, tmp_path, monkeypatch):
    builds = []
    original = cache_store.build
    monkeypatch.setattr(cache_store, "build", lambda *a, **k: (builds.append(a[4].name), original(*a, **k)))
    def raw(data=None, dtype="float16", **over):   # a cache folder of this test's own, so it counts every build
        return tiny_raw(world, teacher_cache={"mode": "on", "top_k": 8, "dtype": dtype},
                        data={"cache_dir": str(tmp_path / "cache"), **(data or {})}, **over)

    first, _, _ = open_cache(load_config(raw=raw()))
    again, _, _ = open_cache(load_config(raw=raw()))
    assert len(builds) == 1 and again.directory == first.directory

    other_teacher = tmp_path / "teacher"
    cfg = load_config(raw=raw())
    tokenizer, _, teacher, *_ = setup_run(cfg)
    with torch.no_grad():
        next(teacher.lm.parameters()).add_(1e-3)
    from tune_kd.model.checkpoint import save_student
    save_student(teacher.lm, tokenizer, other_teacher)
    keys = {first.directory.name}
    for changed in (raw(teacher={"path": str(other_teacher)}), raw(data={"max_train_examples": 1000}),
                    raw(data={"max_seq_len": 48}), raw(dtype="bfloat16")):
        cache, _, _ = open_cache(load_config(raw=changed))
        keys.add(cache.directory.name)
    assert len(builds) == 5 and len(keys) == 5

    # a cache folder that does not match its meta (cut short, edited) is rebuilt
    values = first.directory / "values.npy"
    np.save(values, np.zeros((3, 8), np.float16))
    rebuilt, _, _ = open_cache(load_config(raw=raw()))
    assert len(builds) == 6 and rebuilt.values.shape[0] == rebuilt.meta["positions"]


def test_the_same_weights_under_another_config_get_another_cache(world, tmp_path):
    """rope_theta and rms_norm_eps change the teacher's outputs, not its weights: the key holds its config."""
    def raw(**over):
        return tiny_raw(world, teacher_cache={"mode": "on", "top_k": 8}, data={"max_train_examples": 200}, **over)

    def rope_theta(config, value):   # transformers 5 keeps it in rope_parameters, older versions at the top
        config.update({"rope_parameters": {**config["rope_parameters"], "rope_theta": value}}
                      if "rope_parameters" in config else {"rope_theta": value})

    base, _, _ = open_cache(load_config(raw=raw()))
    for name, change in (("theta", lambda c: rope_theta(c, 50.0)), ("eps", lambda c: c.update(rms_norm_eps=0.5))):
        shutil.copytree(world["teacher"], tmp_path / name)
        config_file = tmp_path / name / "config.json"
        config = json.loads(config_file.read_text())
        change(config)
        config_file.write_text(json.dumps(config))
        cache, _, _ = open_cache(load_config(raw=raw(teacher={"path": str(tmp_path / name)})))
        assert cache.directory != base.directory
        assert not np.array_equal(cache.values, base.values)        # what a stale cache would have served


@pytest.mark.slow
def test_two_processes_build_once_and_read_the_same_rows(tiny_config, world):
    cfg = tiny_config(teacher_cache={"mode": "on", "top_k": 8}, data={"max_train_examples": 900})
    script = textwrap.dedent(f"""
        import json, os, sys
        import numpy as np
        sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parents[1])!r}]
        from test_teacher_cache import open_cache, whole
        from tune_kd.config.experiment import load_config
        cache, train_data, _ = open_cache(load_config(raw=json.loads(sys.argv[1])))
        order = np.random.default_rng(int(sys.argv[2])).permutation(len(train_data))
        total = sum(float(whole(cache.rows(order[i:i + 50])).values.double().sum()) for i in range(0, len(order), 50))
        print(json.dumps({{"built": cache.meta["built_by_pid"] == os.getpid(), "sum": total,
                          "dir": str(cache.directory)}}))
    """)
    raw = json.dumps(tiny_raw(world, teacher_cache={"mode": "on", "top_k": 8}, data={"max_train_examples": 900}))
    runs = [subprocess.Popen([sys.executable, "-c", script, raw, str(seed)], stdout=subprocess.PIPE, text=True)
            for seed in (1, 2)]
    outputs = [json.loads(run.communicate(timeout=300)[0].strip().splitlines()[-1]) for run in runs]
    assert all(run.returncode == 0 for run in runs)
    assert sorted(o["built"] for o in outputs) == [False, True]     # one built under the lock, one waited
    assert outputs[0]["dir"] == outputs[1]["dir"]
    expected = float(open_cache(cfg)[0].values.astype(np.float64).sum())
    assert outputs[0]["sum"] == pytest.approx(expected) and outputs[1]["sum"] == pytest.approx(expected)


def test_training_reads_the_cache_instead_of_running_the_teacher(tiny_config, monkeypatch):
    from tune_kd.train.loop import train

    calls = []
    original = step.forward_pair

    def recording(student, teacher, batch, precision, from_data=False):
        calls.append((torch.is_grad_enabled(), isinstance(teacher, CacheReader) and from_data))
        return original(student, teacher, batch, precision, from_data)

    monkeypatch.setattr(step, "forward_pair", recording)
    cached = train(tiny_config(train={"epochs": 1}, teacher_cache={"mode": "on", "top_k": 10_000}))
    assert {c for grad, c in calls if grad} == {True} and {c for grad, c in calls if not grad} == {False}
    calls.clear()
    live = train(tiny_config(train={"epochs": 1}, teacher_cache="off"))
    assert {c for _, c in calls} == {False}
    # k = V: the same run, up to float summation order
    assert cached.metrics["train_loss"] == pytest.approx(live.metrics["train_loss"], rel=1e-4)
    assert cached.metrics["val_ce"] == pytest.approx(live.metrics["val_ce"], rel=1e-4)


def test_when_auto_uses_the_cache(tiny_config):
    positions, vocab, free = 10_000, 103, 10 * 2**30
    decide = lambda cfg, free_bytes=free: cache_plan.decide(cfg, positions, vocab, free_bytes)  # noqa: E731
    fixed = {"top_k": 32}                      # a fixed k: decide measures nothing
    plan = decide(tiny_config(teacher_cache=fixed))
    assert plan.use and plan.layout == stored_rows.layout(32, vocab, "float16") and "146 bytes per position" in plan.why
    assert not decide(tiny_config(teacher_cache="off")).use
    plan = decide(tiny_config(train={"feature_weight": 0.5}))
    assert not plan.use and "hidden states" in plan.why
    assert not decide(tiny_config(train={"alpha": 1.0})).use
    plan = decide(tiny_config(teacher_cache={**fixed, "max_gb": 1e-6}))
    assert not plan.use and "above teacher_cache.max_gb 1e-06" in plan.why
    assert decide(tiny_config(teacher_cache={**fixed, "mode": "on", "max_gb": 1e-6})).use
    assert not decide(tiny_config(teacher_cache=fixed), free_bytes=1000).use
    with pytest.raises(UserError, match="teacher_cache: on needs"):
        decide(tiny_config(teacher_cache={**fixed, "mode": "on"}), free_bytes=1000)


def test_auto_takes_the_smallest_k_within_tolerance_from_the_measurement(tiny_config):
    """decide's rule on a given measurement: the first k within 1% on both errors, else the full row."""
    def ladder(errors):
        fidelities = {k: cache_fidelity.Fidelity(loss, grad, 5.0, 5.0) for k, (loss, grad) in errors.items()}
        return lambda: cache_fidelity.Ladder(fidelities, [1.0, 5.0], ["forward_kl"], 128, 900)

    cfg = tiny_config()
    plan = cache_plan.decide(cfg, 1000, 103, 2**40, ladder({8: (0.2, 0.3), 16: (0.005, 0.02), 32: (0.004, 0.009),
                                                              64: (0.001, 0.002)}))
    assert plan.use and plan.layout.k == 32 and plan.auto["chosen_k"] == 32
    assert "top-16: loss error 0.50% (T 5), gradient 2.00% (T 5)" in plan.why
    plan = cache_plan.decide(cfg, 1000, 103, 2**40, ladder({8: (0.2, 0.3), 64: (0.001, 0.011)}))
    assert plan.use and plan.layout.full and "exact (the full row)" in plan.why


def test_teacher_cache_in_yaml(world, tmp_path):
    path = tmp_path / "space.yaml"
    base = tiny_raw(world)
    import yaml

    for text, mode in (("off", "off"), ("on", "on"), ("auto", "auto")):
        path.write_text(yaml.safe_dump(base) + f"teacher_cache: {text}\n")
        assert load_config(path).teacher_cache.mode == mode           # YAML 1.1 reads on/off as booleans
        assert load_config(path).teacher_cache.top_k == "auto" and load_config(path).teacher_cache.dtype == "float16"
    path.write_text(yaml.safe_dump(base) + "teacher_cache: {top_k: 64, dtype: bfloat16}\n")
    assert (load_config(path).teacher_cache.top_k, load_config(path).teacher_cache.dtype) == (64, "bfloat16")
    path.write_text(yaml.safe_dump({**base, "train": {**base["train"], "feature_weight": 0.5}})
                    + "teacher_cache: {mode: 'on', top_k: 0}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "teacher_cache.top_k: must be auto or an integer >= 1, got 0" in str(error.value)
    assert "teacher_cache.mode: on cannot serve feature distillation" in str(error.value)
    path.write_text(yaml.safe_dump(base) + "teacher_cache:\n  top_k: many\n  dtype: fp8\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    line = len(yaml.safe_dump(base).splitlines()) + 1           # the teacher_cache: line
    assert sorted(error.value.problems) == [
        f"{path}:{line + 1}: teacher_cache.top_k: must be auto or an integer >= 1, got 'many'",
        f"{path}:{line + 2}: teacher_cache.dtype: 'fp8' is not allowed (allowed: float16, bfloat16, float32)"]


def test_top_k_auto_across_tokenizers_keeps_a_fixed_k_without_measuring(tiny_config):
    """Across tokenizers no student of the teacher's vocabulary exists to measure against: top_k auto
    keeps cache_plan.ACROSS_TOP_K (the full row where that is no smaller) and never calls measure()."""
    cfg = tiny_config(teacher_cache={"mode": "auto"})

    def measure():
        raise AssertionError("across tokenizers top_k auto must not measure")

    wide = cache_plan.decide(cfg, 1000, 151_646, 2**40, measure, across=True)
    assert wide.use and wide.layout.k == cache_plan.ACROSS_TOP_K and not wide.layout.full
    assert "top_k auto across tokenizers: top-1024 of 151646" in wide.why and "tail's mass" in wide.why
    narrow = cache_plan.decide(cfg, 1000, 103, 2**40, measure, across=True)
    assert narrow.use and narrow.layout.full and "whole: exact" in narrow.why
    assert not cache_plan.decide(tiny_config(teacher_cache={"mode": "auto", "max_gb": 0.001}), 10**6, 151_646, 2**40,
                                 measure, across=True).use

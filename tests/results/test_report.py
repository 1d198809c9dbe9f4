"""The end of a search a person reads: control-arm verdicts, progress lines, report.html.

The report tests build experiment folders by hand (the files a search leaves), so they run in
seconds; test_search.py::test_search_end_to_end checks the same on a real search."""

import copy
import csv
import html
import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from tune_kd.cli import main as cli
from tune_kd.config.experiment import load_config
from tune_kd.results import arms, figures, report
from tune_kd.search import controls
from tune_kd.search.progress import SearchProgress

from conftest import PARAMETERS, render_in_chromium, search_raw

# ----------------------------------------------------------------------------------------------
# Control arms
# ----------------------------------------------------------------------------------------------

def test_verdict_compares_the_best_distilled_student_with_plain_sft():
    line = arms.verdict("val_ce", "min", 1.0, 1.1, None)
    assert line.startswith("did distillation help? yes: val_ce 1.0000 (the best distilled student) vs 1.1000")
    assert "-0.1000, -9.1%" in line
    assert arms.verdict("val_ce", "min", 1.2, 1.1, None).startswith("did distillation help? no:")
    assert arms.verdict("val_acc", "max", 0.9, 0.8, None).startswith("did distillation help? yes:")
    assert arms.verdict("val_ce", "min", 1.0, None, None) is None     # no plain-SFT arm ran


def test_verdict_uses_the_seed_mean_and_calls_a_gap_inside_the_noise_inconclusive():
    noisy = {"n": 3, "mean": 1.05, "std": 0.05, "min": 1.0, "max": 1.1}
    line = arms.verdict("val_ce", "min", 0.9, 1.1, noisy)
    assert "within noise" in line and "1.0500 (the best config's mean over 3 seeds)" in line
    tight = dict(noisy, std=0.01)
    assert arms.verdict("val_ce", "min", 0.9, 1.1, tight).startswith("did distillation help? yes:")


def write_trial(directory: Path, trial_id: str, params: dict, values: list[float]) -> None:
    trial = directory / f"trial_{trial_id}"
    trial.mkdir(parents=True)
    (trial / "params.json").write_text(json.dumps(params))
    (trial / "result.json").write_text("".join(json.dumps({"trial_id": trial_id, "epoch": e, "val_ce": v}) + "\n"
                                               for e, v in enumerate(values, 1)))


def test_verdict_without_seed_arms_weighs_the_gap_against_the_noise_of_repeated_trials(tmp_path):
    same = {"learning_rate": 3e-3, "alpha": 0.5}
    write_trial(tmp_path, "a", same, [1.5, 1.10])
    write_trial(tmp_path, "b", same, [1.5, 1.14])
    write_trial(tmp_path, "c", same, [1.6])                                # stopped early: not a repeat
    write_trial(tmp_path, "d", {"learning_rate": 1e-3, "alpha": 0.5}, [1.4, 1.3])   # alone
    noise = arms.repeat_noise(tmp_path, "val_ce", "min", epochs=2)
    assert noise["trials"] == 2 and math.isclose(noise["std"], 0.04 / math.sqrt(2))
    bound = f"±{2 * 0.04 / math.sqrt(2):.4f}"
    within = arms.verdict("val_ce", "min", 1.10, 1.14, None, noise)
    assert within.startswith("did distillation help? within noise: val_ce 1.1000 (the best distilled student)")
    assert within.endswith(f"; within the seed noise as far as the trials show it ({bound}: 2 x the std of 2 "
                           "full-length trials repeating a config, same seed; a lower bound: "
                           "controls.seeds: 2 measures it)")
    beyond = arms.verdict("val_ce", "min", 1.00, 1.14, None, noise)
    assert beyond.startswith("did distillation help? yes:") and f"; beyond the seed noise as far as the trials " \
        f"show it ({bound}" in beyond


def test_verdict_says_when_the_seed_noise_cannot_be_estimated(tmp_path):
    write_trial(tmp_path, "a", {"learning_rate": 3e-3}, [1.2])
    write_trial(tmp_path, "b", {"learning_rate": 3e-3}, [1.2])   # a bit-identical repeat: deterministic
    write_trial(tmp_path, "c", {"learning_rate": 1e-3}, [1.3])
    assert arms.repeat_noise(tmp_path, "val_ce", "min", epochs=1) is None
    line = arms.verdict("val_ce", "min", 1.0, 1.1, None, None)
    assert line.startswith("did distillation help? yes:")
    assert line.endswith("; the seed noise is unknown (no full-length trials repeat a config): "
                         "set controls.seeds: 2 to measure it")


def test_arm_points_follow_the_controls_section(world):
    best = {"trial_id": "t1", "learning_rate": 0.004, "temperature": 3.0, "alpha": 0.2}
    cfg = load_config(raw=search_raw(world, controls={"plain_sft": True, "minimind_defaults": True, "seeds": 2},
                                     train={"seed": 7}))
    arms = controls.arm_points(cfg, best)
    sft = {"learning_rate": 0.004, "temperature": 3.0, "alpha": 1.0}
    distilled = {"learning_rate": 0.004, "temperature": 3.0, "alpha": 0.2}
    assert arms == {"plain_sft": sft, "minimind_defaults": {"learning_rate": 5e-6, "alpha": 0.0, "temperature": 1.0},
                    "best_seed_8": {**distilled, "seed": 8}, "plain_sft_seed_8": {**sft, "seed": 8},
                    "best_seed_9": {**distilled, "seed": 9}, "plain_sft_seed_9": {**sft, "seed": 9}}
    # each seed's pair is adjacent: two arms at a time train them together
    assert list(arms)[2:] == ["best_seed_8", "plain_sft_seed_8", "best_seed_9", "plain_sft_seed_9"]
    off = load_config(raw=search_raw(world, controls={"plain_sft": False, "minimind_defaults": False}))
    assert controls.arm_points(off, best) == {}
    no_sft = load_config(raw=search_raw(world, controls={"plain_sft": False, "seeds": 1}))
    assert controls.arm_points(no_sft, best) == {"best_seed_1": {**distilled, "seed": 1}}   # the spread alone


def seed_document(distilled: list, plain: list, metric="val_ce", mode="min", best_value=0.9) -> dict:
    """A controls.json document before judging: arms with (ranked value, val_acc) per run; plain[0]
    is the plain_sft arm itself (train.seed 0), the rest its re-trained seeds."""
    arms_ = {"plain_sft": {"settings": {}, "value": plain[0][0], "metrics": {"val_acc": plain[0][1]}}}
    for seed, (value, acc) in enumerate(distilled, 1):
        arms_[f"best_seed_{seed}"] = {"settings": {}, "value": value, "metrics": {"val_acc": acc}}
    for seed, (value, acc) in enumerate(plain[1:], 1):
        arms_[f"plain_sft_seed_{seed}"] = {"settings": {}, "value": value, "metrics": {"val_acc": acc}}
    return {"metric": metric, "mode": mode, "epochs": 3, "seed": 0, "arms": arms_,
            "best": {"trial_id": "t1", "value": best_value, "settings": {}}, "seeds_for_best": None, "repeat_noise": None}


def test_seed_gap_is_welchs_t_interval_of_the_two_sides_seed_noise():
    from scipy import stats

    distilled, plain = [1.00, 1.02], [1.10, 1.14, 1.12]
    gap = arms.seed_gap(distilled, plain, "min")
    share1, share2 = 0.0002 / 2, 0.0004 / 3                  # each side's sample variance / n
    freedom = (share1 + share2) ** 2 / (share1 ** 2 / 1 + share2 ** 2 / 2)
    assert gap["method"] == "Welch's t" and gap["df"] == pytest.approx(freedom)
    assert gap["gap"] == pytest.approx(1.01 - 1.12)
    assert gap["half_width"] == pytest.approx(stats.t.ppf(0.975, freedom) * math.sqrt(share1 + share2))
    # scipy's own Welch test agrees: the gap is outside the interval exactly when p < 0.05
    assert (stats.ttest_ind(distilled, plain, equal_var=False).pvalue < 0.05) == (gap["answer"] != "within noise")
    assert gap["answer"] == "yes"
    assert arms.seed_gap(plain, distilled, "min")["answer"] == "no"
    assert arms.seed_gap([1.00, 1.10], [1.05, 1.00, 1.10], "min")["answer"] == "within noise"
    assert arms.seed_gap([0.5, 0.52], [0.4, 0.41, 0.42], "max")["answer"] == "yes"   # higher is better
    # one distilled run: its variance is unknown, plain SFT's stands for both (pooled, n1 + n2 - 2 df)
    single = arms.seed_gap([1.0], [1.10, 1.12, 1.14], "min")
    assert single["method"] == "pooled t" and single["df"] == 2
    assert single["half_width"] == pytest.approx(stats.t.ppf(0.975, 2) * math.sqrt(0.0008 / 2) * math.sqrt(1 + 1 / 3))
    assert arms.seed_gap([1.0], [1.1], "min") is None                            # 2 runs: no noise to estimate


def test_the_verdict_carries_its_noise_and_the_task_metric_when_they_disagree():
    # val_ce says no (distilled 1.20 vs 1.10, tight), val_acc says yes (0.30 vs 0.20, tight)
    document = seed_document([(1.20, 0.30), (1.21, 0.31)], [(1.10, 0.20), (1.11, 0.21), (1.09, 0.19)])
    arms.judge(document)
    line = document["verdict"]
    assert line.startswith("did distillation help? no: val_ce 1.2050 ± 0.0071 (the best config re-trained, 2 seeds) "
                           "vs 1.1000 ± 0.0100 (plain SFT, 3 seeds) = +0.1050 (+9.5%); 95% interval of the gap ±")
    assert "(Welch's t, " in line and " df)" in line
    assert document["task_verdict"].startswith("on val_acc (the task's exact answers) the answer differs: yes: "
                                               "val_acc 0.3050")
    agreeing = seed_document([(1.20, 0.10), (1.21, 0.11)], [(1.10, 0.20), (1.11, 0.21), (1.09, 0.19)])
    assert arms.judge(agreeing)["task_verdict"] is None and agreeing["task_gaps"]["val_acc"]["answer"] == "no"
    # the search's own best (0.9: the winner's curse) is not one of the distilled runs
    assert document["seed_gap"]["distilled"]["n"] == 2


def test_a_teacher_no_better_than_plain_sft_is_named_as_the_reason():
    document = seed_document([(1.20, 0.30), (1.21, 0.31)], [(1.10, 0.20), (1.11, 0.21), (1.09, 0.19)])
    weak = {"val_ce": 1.35, "val_acc": 0.05, "val_kl": None, "student_params": 1000}
    line = arms.judge(document, weak)["verdict"]
    assert line.endswith("; the teacher itself reaches only val_ce 1.3500, no better than plain SFT's 1.1000: it has "
                         "little to transfer (use a stronger or longer-trained teacher, or a smaller student)")
    assert document["teacher"] == {"val_ce": 1.35, "val_acc": 0.05}
    strong = arms.judge(document, {"val_ce": 0.60, "val_acc": 0.9})["verdict"]
    assert strong.endswith("; the teacher itself: val_ce 0.6000") and "little to transfer" not in strong
    assert arms.judge(document, {"error": "out of memory"})["teacher"] is None   # a point not measured: no claim
    # without re-trained seeds the old line gets the same note
    single = seed_document([], [(1.10, 0.2)])
    assert "little to transfer" in arms.judge(single, weak)["verdict"]
    assert single["seed_gap"] is None and single["verdict"].startswith("did distillation help? yes: val_ce 0.9000")


def test_a_control_arm_point_reaches_the_trial_config(world):
    from tune_kd.search import space

    cfg = load_config(raw=search_raw(world))
    arm = space.apply_point(cfg, {"control": {"arm": "best_seed_3", "alpha": 1.0, "seed": 3}})
    assert (arm.train.alpha, arm.train.seed) == (1.0, 3)





# ----------------------------------------------------------------------------------------------
# Progress lines
# ----------------------------------------------------------------------------------------------

def test_progress_lines_and_time_left(capsys):
    progress = SearchProgress("val_ce", "min", num_trials=4, epochs=3, parallel=2, every_s=3600)
    a = SimpleNamespace(trial_id="a", status="RUNNING", config={"alpha": 0.25})
    b = SimpleNamespace(trial_id="b", status="RUNNING", config={"alpha": 0.75})
    progress.on_trial_result(0, [a, b], a, {"epoch": 1, "val_ce": 1.5, "time_this_iter_s": 10.0})
    progress.on_trial_result(0, [a, b], b, {"epoch": 1, "val_ce": 1.25, "time_this_iter_s": 10.0})
    a.status = "TERMINATED"
    progress.on_trial_complete(0, [a, b], a)   # stopped after 1 of 3 epochs
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "trial a epoch 1/3  val_ce 1.5000  (alpha 0.25)"
    # 2 trials not created yet, each expected to run 1 epoch as `a` did, 10 s an epoch, 2 at a time
    assert lines[2].startswith("search: 1/4 trials done (1 stopped early), 1 running | best val_ce 1.2500 (trial b) | ")
    assert lines[2].endswith(", ~10s left")
    assert len(lines) == 3   # no periodic line within every_s


def test_progress_counts_failures_and_long_durations(capsys, tmp_path):
    progress = SearchProgress("val_acc", "max", num_trials=2, epochs=2, parallel=1, label="controls")
    error_file = tmp_path / "error.txt"
    error_file.write_text("Traceback (most recent call last):\n  ...\nRuntimeError: boom\n\n")
    a = SimpleNamespace(trial_id="a", status="ERROR", config={"control": {"arm": "plain_sft", "alpha": 1.0}},
                        error_file=str(error_file))
    progress.on_trial_result(0, [a], a, {"epoch": 1, "val_acc": 0.5, "time_this_iter_s": 4000.0})
    progress.on_trial_error(0, [a], a)
    out = capsys.readouterr().out
    assert "arm plain_sft epoch 1/2  val_acc 0.5000  (alpha 1)" in out   # a control arm goes by its name
    assert f"trial a failed: RuntimeError: boom (full error: {error_file})" in out
    assert "controls: 1/2 trials done (1 failed), 0 running | best val_acc 0.5000 (arm plain_sft)" in out
    assert out.rstrip().endswith("~2h13m left")   # the other arm: 2 epochs x 4000 s


ACTOR_DIED = """Failure # {n} (occurred at 2026-12-07_01-20-14)
The actor died unexpectedly before finishing this task.
\tclass_name: distill_tiny_search
\tactor_id: 94903066a51074326374813201000000
\tpid: {pid}
\tnamespace: b8220604-48ff-4e83-bd0c-2f931fd8a630
\tip: 192.0.2.2
The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit detail: Worker \
unexpectedly exits with a connection error code 2. End of file. Some common causes include: (1) the process was killed \
by the OOM killer due to high memory usage, (2) ray stop --force was called, or (3) the worker crashed unexpectedly.
"""


def test_a_dead_worker_is_one_line_and_its_trial_counts_as_running_while_retried(capsys, tmp_path):
    """Ray's ActorDiedError (as Tune writes it to error.txt) becomes `worker died (...)`, retried from
    the epoch of the last checkpoint; the retried trial (PENDING in Tune) counts as running; when the
    retries are spent, the ERROR line says so."""
    error_file = tmp_path / "error.txt"
    error_file.write_text(ACTOR_DIED.format(n=1, pid=24745))
    progress = SearchProgress("val_ce", "min", num_trials=2, epochs=3, parallel=2, every_s=3600)
    a = SimpleNamespace(trial_id="a", status="RUNNING", config={"alpha": 0.5}, error_file=str(error_file),
                        num_failures=1, max_failures=1, latest_checkpoint_result=SimpleNamespace(metrics={"epoch": 1}))
    b = SimpleNamespace(trial_id="b", status="TERMINATED", config={"alpha": 0.25})
    progress.on_trial_result(0, [a, b], a, {"epoch": 1, "val_ce": 1.5, "time_this_iter_s": 10.0, "pid": 24745})
    a.status = "PENDING"   # Tune requeues it, then calls on_trial_recover
    progress.on_trial_recover(0, [a, b], a)
    assert progress.status_line([a, b]).startswith("search: 0/2 trials done, 1 running | ")
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == (f"trial a: worker died (pid 24745 exited unexpectedly: killed, out of memory or crashed); "
                         f"retrying from epoch 1 (retry 1 of 1; full error: {error_file})")
    progress.on_trial_result(0, [a, b], a, {"epoch": 2, "val_ce": 1.4, "time_this_iter_s": 10.0, "pid": 24800})
    a.status, a.num_failures = "ERROR", 2
    error_file.write_text(error_file.read_text() + ACTOR_DIED.format(n=2, pid=24800))
    progress.on_trial_error(0, [a, b], a)
    out = capsys.readouterr().out
    assert (f"trial a failed after 1 retry: worker died (pid 24800 exited unexpectedly: killed, out of memory or "
            f"crashed) (full error: {error_file})") in out
    assert "search: 1/2 trials done (1 failed), 0 running" in out


def test_tunes_failure_record_and_rays_note_on_a_dead_trial_worker_are_left_out(capsys):
    """What quiet_trial_failures installs: Tune's "Trial task failed" record (with its traceback) is
    dropped, and the raylet's paragraph on a dead worker only when the worker was a trial's."""
    from ray._private import worker

    from tune_kd.search import progress

    progress.quiet_trial_failures()
    progress.quiet_trial_failures()   # idempotent: one filter, one wrapper
    controller = logging.getLogger(progress.CONTROLLER_LOGGER)
    assert sum(isinstance(f, progress.TrialFailureFilter) for f in controller.filters) == 1
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append   # on the logger itself: Ray's loggers do not propagate to the root
    controller.addHandler(handler)
    try:
        try:
            raise RuntimeError("boom")
        except RuntimeError as exc:
            controller.error("Trial task failed for trial distill_x_a", exc_info=exc)
        controller.warning("something else")
    finally:
        controller.removeHandler(handler)
    assert [r.getMessage() for r in seen] == ["something else"]
    progress.SearchProgress("val_ce", "min", 1, 1, 1).on_trial_result(
        0, [], SimpleNamespace(trial_id="a", config={}), {"epoch": 1, "val_ce": 1.0, "pid": 4242})
    capsys.readouterr()
    note = "A worker died or was killed while executing a task by an unexpected system error. Worker PID: {} Worker"
    for pid in (4242, 5151):
        worker.print_to_stdstream({"lines": [note.format(pid)], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    out = capsys.readouterr().out
    assert "Worker PID: 5151" in out and "Worker PID: 4242" not in out


# ----------------------------------------------------------------------------------------------
# The report, from the files a search leaves
# ----------------------------------------------------------------------------------------------

CURVES = {  # trial -> (learning_rate, temperature, alpha), val_ce per epoch
    "t1": ((3e-3, 2.0, 0.5), [2.0, 1.6, 1.3]),
    "t2": ((1e-3, 4.0, 0.1), [2.4]),
    "t3": ((8e-3, 1.5, 0.9), [1.9, 1.5, 1.2]),
    "t4": ((2e-4, 3.0, 0.3), [2.6]),
    "t5": ((5e-3, 2.5, 0.6), [1.95, 1.7]),
    "t6": ((6e-4, 1.2, 0.8), [2.3]),
}


def write_experiment(directory: Path, curves: dict, finished: bool, with_controls: bool = False) -> Path:
    directory.mkdir(parents=True)
    config = {"train": {"epochs": 3}, "parameters": copy.deepcopy(PARAMETERS)}
    (directory / "experiment.json").write_text(json.dumps(
        {"name": "hand-made", "metric": {"name": "val_ce", "mode": "min"}, "config": config}))
    rows = []
    for trial_id, ((lr, temperature, alpha), values) in curves.items():
        trial = directory / f"trial_{trial_id}"
        trial.mkdir()
        params = {"learning_rate": lr, "temperature": temperature, "alpha": alpha}
        (trial / "params.json").write_text(json.dumps(params))
        (trial / "result.json").write_text("".join(
            json.dumps({"trial_id": trial_id, "epoch": epoch, "val_ce": value, "val_acc": 0.1}) + "\n"
            for epoch, value in enumerate(values, 1)))
        rows.append({"trial_id": trial_id, **params, "epochs": len(values), "best_val_ce": min(values),
                     "status": "COMPLETED" if len(values) == 3 else "STOPPED_EARLY", "error": ""})
    if finished:
        with (directory / "trials.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    if with_controls:
        arm = directory / "controls" / "plain_sft_c1"
        arm.mkdir(parents=True)
        (arm / "params.json").write_text(json.dumps({"control": {"arm": "plain_sft", "alpha": 1.0}}))
        (arm / "result.json").write_text("".join(
            json.dumps({"trial_id": "c1", "epoch": e, "val_ce": v}) + "\n" for e, v in ((1, 2.1), (2, 1.7), (3, 1.4))))
        (directory / "controls.json").write_text(json.dumps({
            "metric": "val_ce", "mode": "min", "epochs": 3, "seed": 0,
            "best": {"trial_id": "t3", "value": 1.2, "settings": {"alpha": 0.9}},
            "arms": {"plain_sft": {"settings": {"alpha": 1.0}, "value": 1.4}},
            "seeds_for_best": None, "verdict": arms.verdict("val_ce", "min", 1.2, 1.4, None)}))
    return directory


@pytest.mark.slow
def test_report_of_an_interrupted_experiment_renders_in_a_browser(tmp_path):
    experiment = write_experiment(tmp_path / "hand-made", CURVES, finished=False)
    page = report.build(experiment)
    assert page == experiment / "report.html"
    text = page.read_text()
    assert "has not finished" in text and "INCOMPLETE" in text and "STOPPED_EARLY" not in text
    dom = render_in_chromium(page)
    assert 'data-figures="4" data-rendered="4"' in dom and "failed to render" not in dom.split("<script")[0]
    for figure in ("curves", "params", "parallel", "importance"):
        assert f'id="{figure}"' in dom
        assert (experiment / "report" / f"{figure}.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_report_cli_rebuilds_with_statuses_and_control_arms(tmp_path, capsys):
    experiment = write_experiment(tmp_path / "hand-made", CURVES, finished=True, with_controls=True)
    assert cli.main(["report", str(experiment)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {experiment / 'report.html'}"
    loaded = report.load(experiment)
    assert {t.trial_id: t.status for t in loaded.trials}["t2"] == "STOPPED_EARLY"
    assert loaded.best_trial().trial_id == "t3" and loaded.control_curves == {"plain_sft": [[1, 2.1], [2, 1.7], [3, 1.4]]}
    dom = render_in_chromium(experiment / "report.html")
    assert 'data-figures="5" data-rendered="5"' in dom
    assert "did distillation help? yes: val_ce 1.2000" in dom and 'id="controls"' in dom


@pytest.mark.slow
def test_a_broken_figure_shows_a_warning_on_the_page(tmp_path):
    experiment = write_experiment(tmp_path / "hand-made", CURVES, finished=True)
    page = report.build(experiment)
    page.write_text(page.read_text().replace("data:image/png;base64,iVBOR", "data:image/png;base64,AAAA", 1))
    dom = render_in_chromium(page)
    assert 'data-figures="4" data-rendered="3"' in dom and "1 of 4 figures failed to render" in dom


def test_too_few_trials_leave_importances_out_and_say_so(tmp_path):
    few = {k: CURVES[k] for k in ("t1", "t3")}
    page = report.build(write_experiment(tmp_path / "hand-made", few, finished=True))
    text = page.read_text()
    assert "id='importance'" not in text and "Parameter importances need at least 4 trials" in text
    assert "id='parallel'" in text


def test_the_report_shows_the_teacher_and_the_seed_noise(tmp_path):
    """controls.png: the seed means with their std as error bars and the teacher's own bar; curves.png:
    the teacher's value as a line; the page: the teacher's row and every verdict line."""
    experiment = write_experiment(tmp_path / "hand-made", CURVES, finished=True, with_controls=True)
    document = seed_document([(1.20, 0.30), (1.23, 0.31)], [(1.10, 0.20), (1.14, 0.21), (1.09, 0.19)])
    arms.judge(document, {"val_ce": 0.95, "val_acc": 0.9})
    (experiment / "controls.json").write_text(json.dumps(document))
    (experiment / "teacher_point.json").write_text(json.dumps({"val_ce": 0.95, "val_acc": 0.9}))
    exp = report.load(experiment)
    rows = {label: (value, error) for label, value, error, _ in figures.control_rows(exp)}
    assert rows["best config: mean of 2 seeds"] == pytest.approx((1.215, math.sqrt(0.00045)))
    assert rows["plain SFT: mean of 3 seeds"][1] == pytest.approx(document["seed_gap"]["plain"]["std"])
    assert rows["teacher itself"] == (0.95, None) and rows["best_seed_2"] == (1.23, None)
    bars = figures.plot_controls(exp).axes[0]
    assert "did distillation help? no" in bars.get_title()
    assert [line.get_ydata()[0] for line in figures.plot_curves(exp).axes[0].lines
            if line.get_label().startswith("teacher itself")] == [0.95]
    text = report.build(experiment).read_text()
    assert "<td>teacher itself</td><td>0.9500</td>" in text
    assert html.escape(document["verdict"]) in text and html.escape(document["task_verdict"]) in text


def test_report_of_a_folder_that_is_no_experiment_is_one_line(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path}: not a tune_kd experiment folder")


def test_figures_compare_every_trial_at_the_epoch_all_reached(tmp_path):
    """ASHA stopped t2, t4, t6 after epoch 1; t1, t3 ran 3 epochs: params, parallel and importance
    all take epoch 1's values, and say so."""
    experiment = write_experiment(tmp_path / "hand-made", CURVES, finished=True)
    exp = report.load(experiment)
    first = sorted(values[0] for _, values in CURVES.values())
    study = figures.optuna_study(exp)
    assert sorted(t.value for t in study.trials) == first     # not each trial's best: 1.3, 1.2, 1.7
    assert exp.common_epoch == 1
    assert study.best_trial.params["learning_rate"] == 8e-3 and math.isclose(study.best_value, 1.9)
    params = figures.plot_params(exp)
    for ax in params.axes:
        assert sorted(float(y) for c in ax.collections for _, y in c.get_offsets()) == first
        assert ax.get_ylabel() == "val_ce at epoch 1"
    assert params._suptitle.get_text().startswith("val_ce at epoch 1 (reached by every trial)")
    importance = figures.plot_importance(exp, study).axes[0]
    assert "at epoch 1" in importance.get_title() and importance.get_title(loc="left") == ""   # one title, not two
    assert "at epoch 1" in figures.plot_parallel(exp, study).axes[0].get_title()
    text = report.build(experiment).read_text()
    for figure in ("params", "parallel", "importance"):
        caption = text.split(f"<figure id='{figure}'>")[1].split("<figcaption>")[1].split("</figcaption>")[0]
        assert "val_ce at epoch 1, the last epoch every trial reached" in caption


@pytest.mark.slow
def test_report_shows_the_answers_of_teacher_best_student_and_plain_sft(tmp_path, world):
    """The prompts table: validation prompts, the data's answer and three models' greedy answers,
    in a browser; without the plain_sft arm its column is left out with a note."""
    import shutil

    from tune_kd.data.tokenized import load_tokenizer
    from tune_kd.model.build import build_model
    from tune_kd.model.checkpoint import save_student

    experiment = write_experiment(tmp_path / "hand-made", CURVES, finished=True, with_controls=True)
    meta = json.loads((experiment / "experiment.json").read_text())
    meta["config"] = json.loads(json.dumps(load_config(raw=search_raw(world)).to_dict(), default=str))
    (experiment / "experiment.json").write_text(json.dumps(meta))
    shutil.copytree(world["teacher"], experiment / "best_student")
    arm = experiment / "controls" / "plain_sft_c1"
    cfg = load_config(raw=search_raw(world))
    save_student(build_model(cfg.student, load_tokenizer(world["tokenizer"]), "student"),
                 load_tokenizer(world["tokenizer"]), arm / "checkpoint_000000")
    (arm / "result.json").write_text(json.dumps({"trial_id": "c1", "epoch": 1, "val_ce": 2.1,
                                                 "checkpoint_dir_name": "checkpoint_000000"}) + "\n")
    dom = render_in_chromium(report.build(experiment))
    table = dom.split('<table id="samples">')[1].split("</table>")[0]
    assert [h.split("</th>")[0] for h in table.split("<th>")[1:]] == \
        ["prompt", "reference (data)", "teacher", "best student", "plain SFT"]
    rows = table.split("<tr>")[2:]
    questions = [t["content"] for c in map(json.loads, Path(world["val"]).read_text().splitlines())
                 for t in c["conversations"] if t["role"] == "user"]
    assert len(rows) == 4 and all(any(q in row for q in questions) for row in rows)
    assert "left out" not in dom

    shutil.rmtree(arm)
    text = report.build(experiment).read_text()
    assert "<th>plain SFT</th>" not in text and "<th>teacher</th>" in text
    assert "left out: plain SFT: no checkpoint of the plain_sft control arm" in text

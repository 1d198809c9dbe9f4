"""A size/quality search (search.objectives: [metric, size]): the front (front.py), the report's
section (report_front.py), the plain-SFT arms of the front's shapes, `export --front`, and one
real search end to end. Hand-made experiment folders keep the report tests to seconds."""

import copy
import json
from pathlib import Path

import pytest

from tune_kd.cli import main as cli
from tune_kd.config.errors import ConfigError
from tune_kd.config.experiment import load_config
from tune_kd.results import figures, front, report
from tune_kd.search import controls

from conftest import PARAMETERS, check_study_agrees, search_raw


def point(trial_id, value, size, **params):
    return front.Point(trial_id, value, size, params, {"student_params": size})


# ----------------------------------------------------------------------------------------------
# The front
# ----------------------------------------------------------------------------------------------

def test_the_front_keeps_what_no_trial_beats_on_both_objectives():
    points = [point("a", 1.0, 100), point("b", 0.8, 400), point("c", 0.9, 500), point("d", 0.7, 1600),
              point("e", 1.2, 100), point("f", 0.8, 400)]   # c: b is smaller and better; e: a; f ties b
    shape_front = front.pareto_front(points, "min", "min")
    assert [p.trial_id for p in shape_front] == ["a", "b", "d"]          # cheapest first
    # 5% of the best 0.7 is 0.735: only d; 20% is 0.84: b is the smallest within it
    assert front.smallest_within(shape_front, 5, "min").trial_id == "d"
    assert front.smallest_within(shape_front, 20, "min").trial_id == "b"
    assert front.smallest_within([], 5, "min") is None


def test_a_speed_front_prefers_the_faster_student_and_a_higher_metric_when_maximised():
    points = [point("slow", 0.9, 50.0), point("fast", 0.6, 400.0), point("mid", 0.5, 200.0), point("bad", 0.4, 100.0)]
    shape_front = front.pareto_front(points, "max", "max")
    assert [p.trial_id for p in shape_front] == ["fast", "slow"]         # fastest first; mid, bad: slow beats both
    assert front.smallest_within(shape_front, 50, "max").trial_id == "fast"   # 0.6 >= 0.9 - 0.45


def test_a_grid_point_is_covered_when_the_front_dominates_or_ties_it():
    shape_front = [point("a", 1.0, 100), point("b", 0.8, 400)]
    assert front.covered(point("g1", 1.1, 100), shape_front, "min", "min")        # dominated
    assert front.covered(point("g2", 0.8, 400), shape_front, "min", "min")        # tied
    assert not front.covered(point("g3", 0.9, 200), shape_front, "min", "min")    # better than a at twice a's size
    assert not front.covered(point("g4", 1.5, 50), shape_front, "min", "min")     # smaller than anything on it


@pytest.mark.parametrize("objectives, problem", [
    (["val_acc", "student_params"], "the first objective must be the metric, val_ce"),
    (["val_ce", "val_acc"], "the second objective must be the student's size, student_params or gen_tokens_per_s"),
    (["val_ce", "student_params", "gen_tokens_per_s"], "must be [val_ce] or [val_ce, student_params or"),
])
def test_objectives_are_checked_at_load(world, objectives, problem):
    with pytest.raises(ConfigError) as caught:
        load_config(raw=search_raw(world, search={"objectives": objectives}))
    assert f"search.objectives: {problem}" in str(caught.value)
    with pytest.raises(ConfigError, match="scheduler.size_bracket_ratio: must be > 1"):
        load_config(raw=search_raw(world, scheduler={"size_bracket_ratio": 0.5}))
    with pytest.raises(ConfigError, match="search.objectives: two objectives need search.algorithm: optuna"):
        load_config(raw=search_raw(world, search={"objectives": ["val_ce", "student_params"], "algorithm": "random"}))


def test_the_front_shapes_get_plain_sft_arms(world):
    raw = search_raw(world, controls={"plain_sft": True}, search={"objectives": ["val_ce", "student_params"]})
    raw["parameters"] = {"student.arch.hidden_size": {"values": [32, 64]}, **copy.deepcopy(PARAMETERS)}
    cfg = load_config(raw=raw)
    best = {"trial_id": "big", "student.arch.hidden_size": 64, "learning_rate": 1e-3, "temperature": 2.0, "alpha": 0.3}
    shape_front = [point("small", 1.2, 1000, **{"student.arch.hidden_size": 32, "learning_rate": 5e-3, "alpha": 0.1}),
                   point("big", 1.0, 4000, **{k: v for k, v in best.items() if k != "trial_id"})]
    arms = controls.arm_points(cfg, best, shape_front)
    assert arms["plain_sft"]["student.arch.hidden_size"] == 64
    assert arms["front_sft_small"] == {"student.arch.hidden_size": 32, "learning_rate": 5e-3, "alpha": 1.0}
    assert "front_sft_big" not in arms                                      # the best has its plain_sft arm
    assert set(controls.arm_points(cfg, best)) == {"plain_sft"}             # no front: as before


# ----------------------------------------------------------------------------------------------
# The report's section
# ----------------------------------------------------------------------------------------------

SHAPES = {  # trial -> (hidden size, parameters, val_ce per epoch)
    "s1": (32, 10_000, [2.0, 1.7, 1.6]),
    "s2": (48, 20_000, [1.9, 1.55, 1.45]),
    "s3": (64, 40_000, [1.8, 1.5, 1.40]),
    "s4": (64, 40_000, [2.2]),                # ASHA-stopped, dominated
    "s5": (96, 90_000, [1.85, 1.6, 1.5]),     # bigger and worse than s3: off the front
}


def write_shape_experiment(directory: Path, objectives: list | None, teacher_point: bool = True) -> Path:
    directory.mkdir(parents=True)
    parameters = {"student.arch.hidden_size": {"values": [32, 48, 64, 96]}, **copy.deepcopy(PARAMETERS)}
    config = {"train": {"epochs": 3}, "parameters": parameters,
              "search": {"objectives": objectives, "within_percent": 5.0}}
    (directory / "experiment.json").write_text(json.dumps(
        {"name": "shapes", "metric": {"name": "val_ce", "mode": "min"}, "config": config}))
    for trial_id, (hidden, size, values) in SHAPES.items():
        trial = directory / f"trial_{trial_id}"
        trial.mkdir()
        (trial / "params.json").write_text(json.dumps({"student.arch.hidden_size": hidden, "alpha": 0.5}))
        (trial / "result.json").write_text("".join(json.dumps(
            {"trial_id": trial_id, "epoch": epoch, "val_ce": value, "student_params": size,
             "student_embedding_params": size // 10, "gen_tokens_per_s": 1e6 / size}) + "\n"
            for epoch, value in enumerate(values, 1)))
    if teacher_point:
        (directory / "teacher_point.json").write_text(json.dumps(
            {"student_params": 400_000, "val_ce": 1.1, "val_kl": None, "gen_tokens_per_s": 2.5}))
    (directory / "controls.json").write_text(json.dumps({
        "metric": "val_ce", "mode": "min", "epochs": 3, "seed": 0,
        "best": {"trial_id": "s3", "value": 1.40, "settings": {"alpha": 0.5}},
        "arms": {"plain_sft": {"settings": {"alpha": 1.0}, "value": 1.52, "metrics": {"student_params": 40_000}},
                 "front_sft_s1": {"settings": {"alpha": 1.0}, "value": 1.75, "metrics": {"student_params": 10_000}}},
        "seeds_for_best": None, "verdict": "did distillation help? yes"}))
    return directory


def test_the_report_draws_the_front_with_the_teacher_and_plain_sft(tmp_path):
    experiment = write_shape_experiment(tmp_path / "shapes", ["val_ce", "student_params"])
    text = report.build(experiment).read_text()
    assert (experiment / "report" / "front.png").read_bytes().startswith(b"\x89PNG")
    table = text.split("<table id='front'>")[1].split("</table>")[0]
    assert [row.split("</td>")[1].removeprefix("<td>") for row in table.split("<tr>")[2:]] == ["s1", "s2", "s3"]
    assert "<td>1.6000</td><td>1.7500 (-0.1500)</td>" in table          # s1 distilled vs its shape's plain SFT
    assert "<td>1.4000</td><td>1.5200 (-0.1200)</td>" in table          # s3 vs plain_sft (the best's arm)
    assert "<td>10,000</td><td>1,000</td><td>100.0</td>" in table        # parameters, embeddings, tokens/s
    # 5% of 1.40 is 1.47: s2 (1.45, half s3's size) is the smallest within it
    assert "smallest student within 5% of the best val_ce (1.4000): trial s2, student_params 20,000" in text
    assert "teacher, measured as a student: student_params 400,000, val_ce 1.1000" in text
    view = report_front_view(experiment)
    figure = report_front_plot(view)
    labels = figure.axes[0].get_legend_handles_labels()[1]
    assert {"front", "teacher", "plain SFT, same shape", "smallest within 5% of the best"} <= set(labels)


def report_front_view(experiment):
    from tune_kd.results import report_front

    return report_front.load_front(experiment, json.loads((experiment / "controls.json").read_text()))


def report_front_plot(view):
    from tune_kd.results import report_front

    return report_front.plot_front(view, figures.pyplot())


def test_a_search_of_the_metric_alone_reads_as_before(tmp_path):
    """No size objective: no front figure, no size section, the same figures as ever."""
    experiment = write_shape_experiment(tmp_path / "shapes", None, teacher_point=False)
    text = report.build(experiment).read_text()
    assert "id='front'" not in text and "Size and quality" not in text and "smallest student" not in text
    assert not (experiment / "report" / "front.png").exists()
    assert {"curves.png", "params.png", "controls.png"} <= {f.name for f in (experiment / "report").iterdir()}


def test_export_front_refuses_a_search_of_the_metric_alone(tmp_path, capsys):
    experiment = write_shape_experiment(tmp_path / "shapes", None)
    assert cli.main(["export", str(experiment), "--front", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--front needs a size/quality search (search.objectives" in err[0]
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# One real search
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_size_quality_search_end_to_end(world, tmp_path):
    """Width and depth searched with lr: the study holds both objectives, the front's shapes get their
    plain-SFT arms, the teacher is measured as a student, and export --front writes every front student
    with its size, speed and metric in its model card."""
    from tune_kd.search import runner

    raw = search_raw(world, num_samples=5, train={"epochs": 2}, data={"max_train_examples": 256},
                     search={"objectives": ["val_ce", "student_params"]}, controls={"plain_sft": True})
    raw["parameters"] = {"student.arch.hidden_size": {"values": [16, 32, 64]},
                         "student.arch.num_hidden_layers": {"values": [1, 2]},
                         "learning_rate": {"distribution": "log_uniform_values", "min": 1e-3, "max": 1e-2}}
    summary = runner.run_search(load_config(raw=raw), "test", storage=str(tmp_path), num_cpus=2, dashboard_host=None)
    experiment = tmp_path / "tiny-search"
    check_study_agrees(experiment)
    import optuna

    study = optuna.load_study(study_name="tiny-search", storage=f"sqlite:///{experiment / 'optuna.db'}")
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert complete and all(len(t.values) == 2 and t.values[1] > 0 for t in complete)
    shape_front = front.experiment_front(experiment)
    assert shape_front and [p.size for p in shape_front] == sorted(p.size for p in shape_front)
    arms = summary["controls"]["arms"]
    assert {f"front_sft_{p.trial_id}" for p in shape_front if p.trial_id != summary["best"]["trial_id"]} \
        == {name for name in arms if name.startswith("front_sft_")}
    assert all(arm["settings"]["alpha"] == 1.0 and arm["value"] is not None for arm in arms.values())
    from transformers import AutoModelForCausalLM

    teacher = json.loads((experiment / "teacher_point.json").read_text())
    assert teacher["student_params"] == AutoModelForCausalLM.from_pretrained(world["teacher"]).num_parameters()
    assert teacher["val_ce"] < min(p.value for p in shape_front) and teacher["val_kl"] is None
    assert "<table id='front'>" in (experiment / "report.html").read_text()
    out = tmp_path / "front"
    assert cli.main(["export", str(experiment), "--front", "--out", str(out)]) == 0
    folders = sorted(out.iterdir())
    assert [f.name for f in folders] == [f"{rank:02d}_trial_{p.trial_id}" for rank, p in enumerate(shape_front, 1)]
    for folder, p in zip(folders, shape_front):
        card = (folder / "README.md").read_text()
        assert f"on the search's size/quality front (student_params {p.size:,.6g}, val_ce {p.value:.6g}" in card
        assert f"Size: {p.size:,.0f} parameters" in card and "tokens/s at batch 1" in card
        assert json.loads((folder / "tune_kd.json").read_text())["trial_id"] == p.trial_id


def test_a_size_quality_search_starts_with_the_yaml_student_then_the_smallest_one(world, tmp_path):
    from tune_kd.search import searcher

    raw = search_raw(world, search={"objectives": ["val_ce", "student_params"]})
    raw["parameters"] = {"student.arch.hidden_size": {"values": [64, 32, 48]},
                         "student.arch.num_hidden_layers": {"distribution": "int_uniform", "min": 1, "max": 3},
                         "learning_rate": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2}}
    built = searcher.make_searcher(load_config(raw=raw), tmp_path)   # the YAML's student is the smallest: once
    assert built._points_to_evaluate == [
        {"student.arch.hidden_size": 32, "student.arch.num_hidden_layers": 1, "learning_rate": 3e-3}]
    raw["student"] = {"arch": {**raw["student"]["arch"], "hidden_size": 64, "num_hidden_layers": 2}}
    built = searcher.make_searcher(load_config(raw=raw), tmp_path)
    assert built._points_to_evaluate == [
        {"student.arch.hidden_size": 64, "student.arch.num_hidden_layers": 2, "learning_rate": 3e-3},
        {"student.arch.hidden_size": 32, "student.arch.num_hidden_layers": 1, "learning_rate": 3e-3}]
    raw["parameters"].update({"student.arch.num_attention_heads": {"values": [6, 12]},
                              "student.arch.num_key_value_heads": {"values": [4, 6]}})
    raw["student"]["arch"].update(hidden_size=96, num_attention_heads=12, num_key_value_heads=6)
    built = searcher.make_searcher(load_config(raw=raw), tmp_path)   # 6 heads over 4 kv heads is no model: left out
    assert len(built._points_to_evaluate) == 1
    for key in ("student.arch.num_attention_heads", "student.arch.num_key_value_heads"):
        del raw["parameters"][key]
    raw["student"]["arch"].update(hidden_size=64, num_attention_heads=2, num_key_value_heads=2)
    raw["search"] = {**raw["search"], "objectives": None}      # the metric alone: the YAML's point only
    built = searcher.make_searcher(load_config(raw=raw), tmp_path)
    assert built._points_to_evaluate == [
        {"student.arch.hidden_size": 64, "student.arch.num_hidden_layers": 2, "learning_rate": 3e-3}]


def test_a_teacher_that_cannot_be_measured_costs_the_search_nothing(world, tmp_path, caplog):
    """The teacher's point runs after the trials: a teacher that fails there (here a weights file cut
    short) leaves its reason in teacher_point.json and a warning, the report says the point is
    missing, and nothing raises."""
    import logging
    import shutil

    import ray

    from tune_kd.search.teacher_point import write_teacher_point

    broken = tmp_path / "teacher"
    shutil.copytree(world["teacher"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    cfg = load_config(raw=search_raw(dict(world, teacher=str(broken)), search={"objectives": ["val_ce", "student_params"]}))
    experiment = write_shape_experiment(tmp_path / "shapes", ["val_ce", "student_params"], teacher_point=False)
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        with caplog.at_level(logging.WARNING):
            assert write_teacher_point(cfg, experiment, {"cpu": 1, "gpu": 0}) is None
    finally:
        ray.shutdown()
    reason = json.loads((experiment / "teacher_point.json").read_text())["error"]
    assert reason and "the teacher's own point was not measured" in caplog.text
    text = report.build(experiment).read_text()
    assert "The teacher's own point was not measured" in text and "teacher, measured as a student" not in text

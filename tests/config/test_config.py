"""Experiment YAML loading: every problem at once, located by file:line and dotted key."""

from pathlib import Path

import pytest

from tune_kd.config.errors import ConfigError
from tune_kd.config.experiment import load_config
from tune_kd.config.typed_yaml import key_location

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((REPO / "search_spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_every_search_space_yaml_loads(path):
    cfg = load_config(path)
    assert cfg.name and cfg.student is not None
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert f"# Run: python -m tune_kd.search --space search_spaces/{path.name}" in header   # says how to run it


def test_scientific_notation_is_a_float(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("train: {learning_rate: 5e-4, alpha: 1}\nteacher: null\n")
    assert load_config(path).train.learning_rate == 5e-4


def test_all_problems_reported_at_once_with_lines(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "name: x\n"
        "train:\n"
        "  alpha: 1.5\n"
        "  temperatur: 2.0\n"
        "  temperature: 0\n"
        "  epochs: two\n"
        "  learning_rate: -1.0\n"
        "data: {val_fraction: 1.5}\n"
        "teacher: {path: somewhere}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    problems = err.value.problems
    text = "\n".join(problems)
    assert f"{path}:3: train.alpha: must be in [0, 1]" in text
    assert f"{path}:4: train.temperatur: unknown key; did you mean 'temperature'?" in text
    assert f"{path}:5: train.temperature: must be > 0" in text
    assert f"{path}:6: train.epochs: expected an integer" in text
    assert f"{path}:7: train.learning_rate: must be > 0" in text
    assert "data.val_fraction: must be in (0, 1)" in text
    assert len(problems) == 6


@pytest.mark.parametrize("raw,message", [
    ([1, 2], "must be a mapping"),
    ({"train": {"dtype": "int8"}}, "train.dtype: 'int8' is not allowed (allowed: bfloat16, float16, float32)"),
    ({"teacher": None, "train": {"alpha": 0.5}}, "teacher: is required unless train.alpha is 1"),
    ({"student": {"path": "x", "preset": "minimind-student"}}, "student.path: a model comes from a path"),
    ({"train": {"device": "tpu"}}, "train.device: 'tpu' is not a device"),
    ({"train": {"accumulation_steps": 0}}, "train.accumulation_steps: must be >= 1"),
    ({"teacher": {"path": "t"}, "controls": {"seeds": -1}}, "controls.seeds: must be an integer from 0 (no noise measured) to 10, got -1"),
    ({"teacher": {"path": "t"}, "controls": {"seeds": 50}}, "controls.seeds: must be an integer from 0 (no noise measured) to 10, got 50"),
    ({"teacher": {"path": "t"}, "controls": {"seeds": 1.5}}, "controls.seeds: expected an integer"),
    ({"teacher": {"path": "t"}, "controls": {"seeds_for_best": -2}}, "controls.seeds: must be an integer from 0"),
])
def test_bad_values_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(raw=raw)
    assert message in str(err.value)


def test_overrides_apply_dotted_keys():
    cfg = load_config(raw={"teacher": None, "train": {"alpha": 1.0}}, overrides={"train.epochs": 2, "data.max_seq_len": 64})
    assert (cfg.train.epochs, cfg.data.max_seq_len, cfg.train.alpha) == (2, 64, 1.0)


def test_missing_file_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  alpha: [1, 2\n")
    with pytest.raises(ConfigError, match=f"{bad}:3: not valid YAML"):
        load_config(bad)


def test_stage_problems_name_the_stage_key_and_line(tmp_path):
    path = tmp_path / "stages.yaml"
    path.write_text("name: prog\n"
                    "teacher: {path: t}\n"
                    "train: {epochs: 2}\n"
                    "stages:\n"
                    "  - name: medium\n"
                    "    student: {arch: {hidden_size: 48}}\n"
                    "  - name: small\n"
                    "    train: {alpha: 1.5}\n"
                    "    teacher: {path: x}\n"
                    "    studnt: {}\n"
                    "  - name: small\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = "\n".join(err.value.problems)
    assert f"{path}:8: stages.1.train.alpha: must be in [0, 1]" in text
    assert f"{path}:9: stages.1.teacher: only the first stage names a teacher" in text
    assert f"{path}:10: stages.1.studnt: is not a section a stage can change; did you mean 'student'?" in text
    assert f"{path}:11: stages.2.name: needs a unique name" in text
    good = tmp_path / "good.yaml"
    good.write_text("name: prog\nteacher: {path: t}\ntrain: {epochs: 2}\nstages:\n  - name: a\n"
                    "  - {name: b, train: {epochs: 3}, student: {arch: {hidden_size: 32}}}\n")
    cfg = load_config(good)
    assert [s["name"] for s in cfg.stages] == ["a", "b"]
    assert cfg.stages[1]["train"]["epochs"] == 3 and cfg.stages[1]["student"] == {"arch": {"hidden_size": 32}}


def test_the_old_control_key_seeds_for_best_reads_as_seeds():
    assert load_config(raw={"teacher": {"path": "t"}, "controls": {"seeds_for_best": 3}}).controls.seeds == 3
    assert load_config(raw={"teacher": {"path": "t"}}).controls.seeds == 2   # the verdict's noise, by default


def test_the_old_control_key_seed_defaults_still_reads_as_minimind_defaults():
    old = load_config(raw={"teacher": {"path": "t"}, "controls": {"seed_defaults": False}})
    assert old.controls.minimind_defaults is False
    assert load_config(raw={"teacher": {"path": "t"}}).controls.minimind_defaults is True


def test_key_location_names_the_line_of_a_key_or_of_its_section(tmp_path):
    """For errors found after loading (data.max_seq_len against the data): the key's file:line, its
    section's when the file leaves the key to its default, the file alone, or nothing without one."""
    space = tmp_path / "space.yaml"
    space.write_text("name: x\ndata:\n  path: d.jsonl\n  max_seq_len: 8\ntrain: {epochs: 1}\n")
    assert key_location(space, "data.max_seq_len") == f"{space}:4"
    assert key_location(space, "train.batch_size") == f"{space}:5"
    assert key_location(space, "search.seed") == str(space)
    assert key_location(tmp_path / "gone.yaml", "data.max_seq_len") == str(tmp_path / "gone.yaml")
    assert key_location(None, "data.max_seq_len") == ""

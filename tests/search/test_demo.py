"""The embedded default's world: the student's own smaller set, where the teacher knows more."""

import collections
import json
from pathlib import Path

import yaml

from tune_kd.search import demo

REPO = Path(__file__).resolve().parents[2]


def reply_lengths(path) -> collections.Counter:
    """Digit-string length -> share of assistant replies in a chat JSONL file."""
    counts = collections.Counter(len(turn["content"]) for line in path.read_text().splitlines()
                                 for turn in json.loads(line)["conversations"] if turn["role"] == "assistant")
    total = sum(counts.values())
    return collections.Counter({length: n / total for length, n in counts.items()})


def test_the_student_set_is_smaller_and_holds_few_long_strings(tmp_path):
    demo.write_student_set(tmp_path)
    demo.write_jsonl(tmp_path / "data" / "val.jsonl", demo.make_conversations(2000, demo.DEMO_SEED + 1))
    student_file = tmp_path / "data" / "student.jsonl"
    assert len(student_file.read_text().splitlines()) == demo.STUDENT_CONVERSATIONS < demo.TRAIN_CONVERSATIONS
    student, whole = reply_lengths(student_file), reply_lengths(tmp_path / "data" / "val.jsonl")
    for length in (6, 7):   # weights 0.2 of 4.4: about 4.5% each, against 20% in the task
        assert 0.03 < student[length] < 0.07 and 0.17 < whole[length] < 0.23
    assert student[3] > whole[3] + 0.05
    # the default distribution is untouched: same seed, same conversations as before the weights existed
    assert demo.make_conversations(50, 7) == demo.make_conversations(50, 7, None)


def test_a_demo_built_before_the_student_set_gains_it_without_retraining(tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "teacher.json").write_text(json.dumps({"val_acc": 0.9, "val_ce": 0.1, "prepare_seconds": 1.0}))
    assert demo.prepare(tmp_path)["val_acc"] == 0.9      # the cached teacher, not a new one
    assert (tmp_path / "data" / "student.jsonl").is_file()


def test_kd_yaml_trains_the_student_on_its_own_set():
    raw = yaml.safe_load((REPO / "search_spaces" / "kd.yaml").read_text())
    assert raw["data"]["path"] == "results/demo/data/student.jsonl"
    assert raw["data"]["val_path"] == "results/demo/data/val.jsonl"

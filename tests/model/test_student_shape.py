"""The student's shape searched like a train key (student_shape.py, checks.STUDENT_SEARCHABLE,
space.apply_point): a shape that is no model, or over student.max_params, is rejected before it
trains (REJECTED, Optuna PRUNED), never a crash; every epoch reports the student's size and speed."""

import json

import pytest

from tune_kd.config.errors import ConfigError
from tune_kd.config.experiment import load_config
from tune_kd.model import student_shape
from tune_kd.search import space
from tune_kd.train import loop

from conftest import OPTUNA_STATE, TINY_ARCH, search_raw, tiny_raw


def test_the_shape_keys_are_searchable_and_checked_like_train_keys(world):
    raw = tiny_raw(world, parameters={"student.arch.hidden_size": {"values": [32, 48]},
                                      "student.arch.num_hidden_layers": {"distribution": "int_uniform", "min": 1, "max": 3},
                                      "student.init": {"values": ["random", "teacher"]},
                                      "learning_rate": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2}})
    cfg = load_config(raw=raw)
    assert space.fixed_point(cfg) == {"student.arch.hidden_size": 32, "student.arch.num_hidden_layers": 1,
                                      "student.init": "random", "learning_rate": 3e-3}
    trial = space.apply_point(cfg, {"student.arch.hidden_size": 48, "student.arch.num_hidden_layers": 2,
                                    "student.init": "teacher", "learning_rate": 1e-3})
    assert (trial.student.arch.hidden_size, trial.student.arch.num_hidden_layers, trial.student.init) == (48, 2, "teacher")
    assert trial.student.arch.intermediate_size == TINY_ARCH["intermediate_size"] and trial.train.learning_rate == 1e-3

    bad = dict(raw["parameters"], **{"student.arch.hidden_size": {"distribution": "uniform", "min": 32, "max": 64},
                                     "student.arch.num_attention_heads": {"values": [0, 2]},
                                     "student.init": {"values": ["random", "copy"]},
                                     "student.arch.rope_theta": {"values": [1.0]}})
    with pytest.raises(ConfigError) as caught:
        load_config(raw=tiny_raw(world, parameters=bad))
    text = str(caught.value)
    assert "parameters.student.arch.hidden_size.distribution: student.arch.hidden_size is an integer" in text
    assert "parameters.student.arch.num_attention_heads.values[0]: must be >= 1, got 0" in text
    assert "parameters.student.init.values[1]: 'copy' is not allowed" in text
    assert "parameters.student.arch.rope_theta: is not a searchable key" in text
    with pytest.raises(ConfigError, match="student.path loads a student of a fixed shape"):
        load_config(raw=tiny_raw(world, student={"path": world["teacher"]},
                                 parameters={"student.arch.hidden_size": {"values": [32, 64]}}))


@pytest.mark.parametrize("arch, reason", [
    ({"hidden_size": 48, "num_attention_heads": 5}, "hidden_size 48 is not divisible by num_attention_heads 5"),
    ({"num_attention_heads": 2, "num_key_value_heads": 3}, "num_attention_heads 2 is not divisible by num_key_value_heads 3"),
    ({"hidden_size": 36, "num_attention_heads": 4}, "the head dimension 36/4 = 9 is odd"),
])
def test_a_shape_that_is_no_model_is_rejected_before_anything_is_built(tiny_config, monkeypatch, arch, reason):
    from tune_kd.model import build

    monkeypatch.setattr(build, "make_models", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(student_shape.ShapeRejected, match=reason):
        loop.train(tiny_config(student={"arch": dict(TINY_ARCH, **arch)}))


def test_a_shape_the_teacher_cannot_initialise_is_rejected_not_crashed(tiny_config, monkeypatch):
    """init: teacher searched with the width: a sampled head_dim unlike the teacher's (64 / 2 heads = 32) is
    a REJECTED shape (the searcher learns from it), found before any weight is built or read."""
    from tune_kd.model import build

    monkeypatch.setattr(build, "make_models", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(student_shape.ShapeRejected, match="head_dim 16 .* differs from the teacher's 32"):
        loop.train(tiny_config(student={"arch": TINY_ARCH, "init": "teacher"}))
    with pytest.raises(student_shape.ShapeRejected, match="hidden_size 128 > the teacher's 64"):
        loop.train(tiny_config(student={"arch": dict(TINY_ARCH, hidden_size=128, num_attention_heads=4),
                                        "init": "teacher"}))


def test_max_params_rejects_a_shape_by_its_exact_count(tiny_config):
    """The meta-device count is the built model's: a budget of exactly that passes, one less rejects."""
    result = loop.train(tiny_config(train={"epochs": 1}, data={"max_train_examples": 64}))
    counted = result.metrics["student_params"]
    assert counted == sum(p.numel() for p in result.student.parameters())
    embedding = result.student.get_input_embeddings().weight.numel()
    tied = result.student.get_output_embeddings().weight is result.student.get_input_embeddings().weight
    assert result.metrics["student_embedding_params"] == embedding * (1 if tied else 2)
    assert result.metrics["gen_tokens_per_s"] > 0
    loop.train(tiny_config(train={"epochs": 1}, data={"max_train_examples": 64}, student={"arch": TINY_ARCH,
                                                                                          "max_params": counted}))
    with pytest.raises(student_shape.ShapeRejected, match=f"{counted:,} parameters, above student.max_params"):
        loop.train(tiny_config(student={"arch": TINY_ARCH, "max_params": counted - 1}))


@pytest.mark.slow
def test_a_shape_search_reports_rejected_trials_and_the_study_learns_they_were_bad(world, tmp_path):
    """Hidden size and heads searched on their own: the combinations that make no model end REJECTED
    (Optuna PRUNED, the worst value), the others train; nothing errors."""
    from tune_kd.search import runner

    raw = search_raw(world, num_samples=5, train={"epochs": 1}, data={"max_train_examples": 128},
                     scheduler={"grace_period": 1, "reduction_factor": 2})
    raw["parameters"] = {"student.arch.hidden_size": {"values": [32, 40]},
                         "student.arch.num_attention_heads": {"values": [2, 3]}}
    summary = runner.run_search(load_config(raw=raw), "test", storage=str(tmp_path), num_cpus=2, dashboard_host=None)
    rows = summary["rows"]
    statuses = {(r["student.arch.hidden_size"], r["student.arch.num_attention_heads"]): r["status"] for r in rows}
    assert all(s == "REJECTED" for (h, a), s in statuses.items() if h % a or (h // a) % 2), statuses
    assert all(s == "COMPLETED" for (h, a), s in statuses.items() if not (h % a or (h // a) % 2)), statuses
    assert any(s == "REJECTED" for s in statuses.values()) and "ERROR" not in statuses.values()
    # the study tells Optuna a rejected shape was pruned (check_study_agrees' rule; its best-trial check
    # needs distinct values, and 4 shapes over 5 trials repeat one)
    import optuna

    study = optuna.load_study(study_name="tiny-search", storage=f"sqlite:///{tmp_path / 'tiny-search' / 'optuna.db'}")
    latest = {t.user_attrs.get("tune_trial_id"): t for t in study.trials}
    assert all(latest[r["trial_id"]].state.name == OPTUNA_STATE[r["status"]] for r in rows)
    reports = [json.loads(line) for path in (tmp_path / "tiny-search").glob("trial_*/result.json")
               for line in path.read_text().splitlines()]
    assert all("not divisible" in r["rejected"] or "odd" in r["rejected"] for r in reports if "rejected" in r)
    assert all(r["student_params"] > 0 for r in reports if "rejected" not in r)


def test_a_searched_teacher_init_with_a_teacher_it_cannot_copy_is_one_error_before_the_search(world, tmp_path):
    """student.init searched over random and teacher, the teacher a mixture of experts: one line at
    preflight, instead of every init-teacher trial REJECTED for a reason no shape can fix."""
    from transformers import MixtralConfig

    from tune_kd.config.errors import UserError

    MixtralConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                  num_local_experts=4, vocab_size=64).save_pretrained(tmp_path / "moe")
    raw = search_raw(dict(world, teacher=str(tmp_path / "moe")))
    raw["parameters"] = {"student.init": {"values": ["random", "teacher"]}}
    with pytest.raises(UserError, match="teacher: a mixture-of-experts teacher .4 experts.: student.init: teacher"):
        student_shape.check_teacher_for_init(load_config(raw=raw))
    raw["parameters"] = {"student.init": {"values": ["random"]}}
    student_shape.check_teacher_for_init(load_config(raw=raw))           # never from the teacher: no check
    student_shape.check_teacher_for_init(load_config(raw=search_raw(world, student={"arch": TINY_ARCH,
                                                                                    "init": "teacher"})))


def test_the_search_builds_its_teacher_cache_whatever_the_yamls_own_student_weighs(tiny_config):
    """The driver's run is no trial: a YAML whose own student is over student.max_params (the search
    samples smaller ones) still gets its teacher cache; only a trial of that shape is rejected."""
    from tune_kd.search.prepare import prepare_teacher_rows

    cfg = tiny_config(student={"arch": TINY_ARCH, "max_params": 1000}, teacher_cache={"mode": "on", "top_k": 8})
    cache, why = prepare_teacher_rows(cfg, serve=False)[:2]
    assert cache is not None and why.startswith("on")
    with pytest.raises(student_shape.ShapeRejected, match="above student.max_params 1,000"):
        loop.train(cfg)
    served = tiny_config(teacher_server="on", teacher_cache={"mode": "on", "top_k": 8})   # no served teacher runs yet
    assert prepare_teacher_rows(served, serve=True)[0].directory == cache.directory

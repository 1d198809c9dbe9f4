"""The parameters block: Tune domains, the first (fixed) point, and that every searchable key
demonstrably changes the run."""

import pytest

from tune_kd.config.checks import SEARCHABLE, STUDENT_SEARCHABLE
from tune_kd.config.errors import ConfigError
from tune_kd.config.experiment import load_config
from tune_kd.search import space
from tune_kd.train.loop import train

# Two settings per searchable key; a run with each must differ.
KEY_VALUES = {"learning_rate": (1e-3, 8e-3), "temperature": (1.0, 4.0), "alpha": (0.1, 0.9),
              "weight_decay": (0.0, 0.5), "warmup_iters": (0, 30), "batch_size": (16, 48),
              "accumulation_steps": (1, 3), "grad_clip": (0.05, 5.0), "kd_loss": ("forward_kl", "reverse_kl"),
              "final_temperature": (1.0, 3.0), "temperature_schedule": ("constant", "cosine"),
              "jsd_beta": (0.1, 0.9), "skew": (0.05, 0.5), "feature_weight": (0.0, 2.0),
              "on_policy_fraction": (0.0, 1.0), "on_policy_start": (0.0, 0.5), "generation_temperature": (0.5, 2.0),
              "seq_kd": (False, True)}
# The train settings under which a key matters (a schedule's end needs a schedule, ...).
KEY_CONTEXT = {"final_temperature": {"temperature": 4.0, "temperature_schedule": "linear", "final_temperature": 2.0},
               "temperature_schedule": {"temperature": 4.0, "final_temperature": 1.0},
               "jsd_beta": {"kd_loss": "jsd"}, "skew": {"kd_loss": "skew_kl"},
               "on_policy_fraction": {"max_new_tokens": 8}, "seq_kd": {"max_new_tokens": 8},
               "generation_temperature": {"on_policy_fraction": 1.0, "max_new_tokens": 8},
               "on_policy_start": {"on_policy_fraction": 1.0, "max_new_tokens": 8}}
# The student's shape and start (checks.STUDENT_SEARCHABLE), with the arch they vary from;
# init_layers picks among the teacher's layers, and the tiny world's teacher has one
# (tests/test_student_init.py checks each rule).
STUDENT_VALUES = {"student.arch.hidden_size": (32, 48), "student.arch.num_hidden_layers": (1, 2),
                  "student.arch.intermediate_size": (64, 96), "student.arch.num_attention_heads": (2, 4),
                  "student.arch.num_key_value_heads": (1, 2), "student.arch.head_dim": (8, 16), "student.arch.num_experts": (2, 4),
                  "student.arch.num_experts_per_tok": (1, 2), "student.init": ("random", "teacher")}
STUDENT_CONTEXT = {"student.arch.num_experts": {"num_experts": 2}, "student.arch.num_experts_per_tok": {"num_experts": 4},
                   "student.init": {"num_attention_heads": 1}}


def test_every_searchable_key_has_a_case():
    assert set(KEY_VALUES) == set(SEARCHABLE)
    assert set(STUDENT_VALUES) | {"student.init_layers"} == set(STUDENT_SEARCHABLE)


@pytest.mark.parametrize("key", sorted(STUDENT_VALUES))
def test_each_searched_student_key_changes_the_student(tiny_config, key):
    from conftest import TINY_ARCH

    base = tiny_config(train={"epochs": 1}, data={"max_train_examples": 128},
                       student={"arch": dict(TINY_ARCH, **STUDENT_CONTEXT.get(key, {}))})
    low, high = (train(space.apply_point(base, {key: value})) for value in STUDENT_VALUES[key])
    assert low.metrics["train_loss"] != high.metrics["train_loss"]    # same seed: an ignored key trains bit for bit alike
    # heads only split q/k/v into more pieces (at kv heads = heads), and routing leaves the experts
    if key not in ("student.arch.num_attention_heads", "student.arch.num_experts_per_tok", "student.init"):
        assert low.metrics["student_params"] != high.metrics["student_params"]


@pytest.mark.parametrize("key", sorted(KEY_VALUES))
def test_each_searched_key_changes_the_run(tiny_config, key):
    base = tiny_config(train={"epochs": 1, "warmup_iters": 5, **KEY_CONTEXT.get(key, {})},
                       data={"max_train_examples": 300})
    low, high = (train(space.apply_point(base, {key: value})) for value in KEY_VALUES[key])
    assert getattr(space.apply_point(base, {key: KEY_VALUES[key][1]}).train, key) == KEY_VALUES[key][1]
    assert low.metrics["train_loss"] != pytest.approx(high.metrics["train_loss"], rel=1e-4)


def test_every_divergence_trains_and_a_categorical_search_over_them_works(tiny_config):
    from tune_kd.kd.losses import KD_LOSSES

    cfg = tiny_config(train={"epochs": 1}, data={"max_train_examples": 300},
                      parameters={"kd_loss": {"values": sorted(KD_LOSSES)}})
    assert set(space.tune_domains(cfg)["kd_loss"].categories) == set(KD_LOSSES)
    losses = {}
    for name in KD_LOSSES:
        result = train(space.apply_point(cfg, {"kd_loss": name}))
        losses[name] = result.metrics["train_loss"]
        unmeasured = ("gpu_peak_gib", "val_gen_acc", "val_gen_ce", "on_policy_s_per_batch")   # NaN here by design
        finite = {k: v for k, v in result.metrics.items() if k not in unmeasured and k != "phase_seconds"}
        finite.update({f"phase_seconds {k}": v for k, v in result.metrics["phase_seconds"].items()})
        assert all(v == v and abs(v) != float("inf") for v in finite.values()), (name, result.metrics)
    assert len({round(v, 6) for v in losses.values()}) == len(KD_LOSSES), losses


def test_domains_follow_the_sweep_syntax():
    from ray import tune

    cfg = load_config(raw={"teacher": {"path": "t"}, "parameters": {
        "learning_rate": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
        "batch_size": {"distribution": "int_uniform", "min": 8, "max": 9},
        "grad_clip": {"distribution": "q_uniform", "min": 0.5, "max": 2.0, "q": 0.5},
        "alpha": {"values": [0.2, 0.8]},
        "warmup_iters": {"value": 7}}})
    domains = space.tune_domains(cfg)
    assert isinstance(domains["learning_rate"], tune.search.sample.Float)
    samples = {domains["batch_size"].sample() for _ in range(200)}
    assert samples == {8, 9}                                    # W&B's max is inclusive
    assert {domains["grad_clip"].sample() for _ in range(200)} <= {0.5, 1.0, 1.5, 2.0}
    assert set(domains["alpha"].categories) == {0.2, 0.8}
    assert domains["warmup_iters"] == 7
    first = space.fixed_point(cfg)
    assert first == {"learning_rate": 5e-4, "batch_size": 9, "grad_clip": 1.0, "alpha": 0.2}


@pytest.mark.parametrize("parameters,message", [
    ({"alpha": {"distribution": "uniform", "min": 0.2, "max": 1.5}}, "parameters.alpha.max: must be in [0, 1]"),
    ({"temperature": {"distribution": "uniform", "min": 0.0, "max": 2.0}}, "parameters.temperature.min: must be > 0"),
    ({"learning_rate": {"distribution": "uniform", "min": 0.01, "max": 0.001}}, "parameters.learning_rate.min: min (0.01) must be below max"),
    ({"learning_rate": {"distribution": "log_uniform_values", "min": 0.0, "max": 0.1}}, "a log range must stay above 0"),
    ({"temprature": {"distribution": "uniform", "min": 1.0, "max": 2.0}}, "did you mean 'temperature'?"),
    ({"alpha": {"distribution": "normal", "min": 0.0, "max": 1.0}}, "'normal' is not a distribution"),
    ({"alpha": {"distribution": "uniform", "min": 0.0}}, "parameters.alpha.max: is required by uniform"),
    ({"alpha": {"distribution": "uniform", "min": 0.0, "max": 1.0, "mu": 3}}, "parameters.alpha.mu: is not a key of uniform"),
    ({"batch_size": {"distribution": "uniform", "min": 8, "max": 64}}, "use int_uniform or values"),
    ({"alpha": {"values": []}}, "parameters.alpha.values: must be a non-empty list"),
    ({"epochs": {"values": [1, 2]}}, "parameters.epochs: is not a searchable key"),
])
def test_bad_parameters_name_the_key(parameters, message):
    with pytest.raises(ConfigError) as err:
        load_config(raw={"teacher": {"path": "t"}, "parameters": parameters})
    assert message in str(err.value)


@pytest.mark.parametrize("raw,message", [
    ({"search": {"num_samples": 0}}, "search.num_samples: must be >= 1"),
    ({"scheduler": {"grace_period": 7}, "train": {"epochs": 3}}, "scheduler.grace_period: 7 is past train.epochs (3)"),
    ({"resources": {"gpu_per_trial": -1}}, "resources.gpu_per_trial: must be auto or a number >= 0"),
    ({"search": {"max_concurrent": "many"}}, "search.max_concurrent: must be auto or an integer >= 1"),
    ({"metric": {"name": "val_bleu"}}, "metric.name: 'val_bleu' is not allowed"),
])
def test_bad_search_sections_name_the_key(raw, message):
    with pytest.raises(ConfigError) as err:
        load_config(raw={"teacher": {"path": "t"}, **raw})
    assert message in str(err.value)

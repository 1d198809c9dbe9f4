"""The sampler search.sampler auto picks (samplers.sampler_choice), and the Gaussian-process sampler
taught by ASHA's stopped trials (search/gp_sampler.py)."""

import math

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.study import StudyDirection
from optuna.trial import TrialState, create_trial

from tune_kd.config.experiment import load_config
from tune_kd.search.gp_sampler import StoppedTrialsGP, imputed_trials
from tune_kd.search.samplers import GP_MAX_KEYS, make_sampler, sampler_choice, sampler_line

from conftest import search_raw
from search.test_searcher import FAKE_WORLD

# valid specs of searchable train keys, numeric first
NUMERIC = {"learning_rate": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
           "temperature": {"distribution": "uniform", "min": 1.0, "max": 4.0},
           "alpha": {"distribution": "uniform", "min": 0.0, "max": 1.0},
           "weight_decay": {"distribution": "uniform", "min": 0.0, "max": 0.1},
           "grad_clip": {"distribution": "uniform", "min": 0.5, "max": 2.0},
           "warmup_iters": {"distribution": "int_uniform", "min": 0, "max": 20},
           "jsd_beta": {"distribution": "uniform", "min": 0.1, "max": 0.9}}
KD_LOSS = {"kd_loss": {"values": ["forward_kl", "jsd"]}}
SCHEDULE = {"temperature_schedule": {"values": ["constant", "linear"]}}


def numeric(count: int) -> dict:
    return dict(list(NUMERIC.items())[:count])


def config(parameters: dict, **search):
    return load_config(raw={**search_raw(FAKE_WORLD, search={"sampler": "auto", **search}), "parameters": parameters})


def trial(state, values: dict, value=None, x=0.5):
    return create_trial(state=state, value=value, params={"x": x}, distributions={"x": FloatDistribution(0, 1)},
                        intermediate_values=values)


@pytest.mark.parametrize("parameters, search, expected, why", [
    (numeric(3), {}, "gp", "3 searched keys"),                                  # kd.yaml's space
    ({**numeric(4), **KD_LOSS}, {}, "gp", "5 searched keys"),                   # the recorded tables' space
    ({**numeric(3), "skew": {"value": 0.1}}, {}, "gp", "3 searched keys"),       # a constant is not searched
    (numeric(GP_MAX_KEYS + 1), {}, "tpe", f"more than {GP_MAX_KEYS}"),
    ({**numeric(2), **KD_LOSS, **SCHEDULE}, {}, "tpe", "2 categorical keys"),
    (numeric(2), {"objectives": ["val_ce", "student_params"]}, "tpe", "two objectives"),
    (numeric(3), {"sampler": "tpe"}, "tpe", "search.sampler tpe"),
    (numeric(7), {"sampler": "gp"}, "gp", "search.sampler gp"),
])
def test_auto_picks_the_gp_for_small_spaces_and_says_why(parameters, search, expected, why):
    cfg = config(parameters, **search)
    name, reason = sampler_choice(cfg)
    assert name == expected and why in reason
    assert isinstance(make_sampler(cfg), StoppedTrialsGP if expected == "gp" else optuna.samplers.TPESampler)
    assert why in sampler_line(cfg)


def test_a_stopped_trial_is_imputed_from_how_completed_trials_went_on():
    completed = [trial(TrialState.COMPLETE, {1: 3.0, 2: 2.5, 3: 2.0}, value=2.0),
                 trial(TrialState.COMPLETE, {1: 2.8, 2: 2.2, 3: 1.9}, value=1.9)]
    stopped_early = trial(TrialState.PRUNED, {1: 2.6})
    stopped_later = trial(TrialState.PRUNED, {1: 2.9, 2: 2.4})
    never_finite = trial(TrialState.PRUNED, {1: math.nan})
    beyond = trial(TrialState.PRUNED, {5: 1.0})                  # no completed trial reported epoch 5
    out = imputed_trials(completed, [stopped_early, stopped_later, never_finite, beyond], StudyDirection.MINIMIZE)
    assert [t.state for t in out] == [TrialState.COMPLETE] * 3
    # epoch 1 -> final: the completed ones dropped 1.0 and 0.9 (median 0.95); epoch 2: 0.5 and 0.3 (0.4)
    assert out[0].value == pytest.approx(2.6 - 0.95) and out[1].value == pytest.approx(2.4 - 0.4)
    assert out[2].value == 2.0                                     # the worst completed value
    assert stopped_early.state == TrialState.PRUNED                # the study's own trial is untouched
    # maximised (val_acc): the same, mirrored
    up = imputed_trials([trial(TrialState.COMPLETE, {1: 0.2}, value=0.5)], [trial(TrialState.PRUNED, {1: 0.1})],
                        StudyDirection.MAXIMIZE)
    assert up[0].value == pytest.approx(0.4)


def test_the_gp_models_from_stopped_trials_where_optunas_waits():
    """One completed trial and five ASHA stopped: Optuna's GPSampler sees 1 trial (< startup 3) and
    proposes at random; StoppedTrialsGP models all six and proposes near the good stopped ones."""
    study = optuna.create_study(direction="minimize")
    study.add_trial(trial(TrialState.COMPLETE, {1: 2.0, 2: 1.5}, value=1.5, x=0.5))
    for x in (0.05, 0.1, 0.15, 0.8, 0.9):   # stopped at epoch 1; the low corner did better there
        study.add_trial(trial(TrialState.PRUNED, {1: 1.6 + x}, x=x))
    space = {"x": FloatDistribution(0, 1)}
    asked = study.ask()
    assert optuna.samplers.GPSampler(seed=0, n_startup_trials=3).sample_relative(study, asked, space) == {}
    proposal = StoppedTrialsGP(seed=0, n_startup_trials=3).sample_relative(study, asked, space)
    assert set(proposal) == {"x"} and proposal["x"] < 0.5

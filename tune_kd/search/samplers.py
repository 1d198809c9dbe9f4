"""The sampler Optuna proposes with: chosen once, by the space (sampler_choice), and made here.

    tpe   Optuna's TPE, multivariate over grouped keys, a constant liar for concurrent asks
    gp    a Gaussian process: Optuna's GPSampler taught by ASHA's stopped trials (search/gp_sampler.py)

search.sampler: auto picks by the space, from the replay over recorded learning curves
(bench/search_replay.py; docs/search.md, "Does the search search well?"); tpe or gp overrides.
"""

from __future__ import annotations

import warnings

import optuna

from tune_kd.config.checks import searched_keys
from tune_kd.config.experiment import ExperimentConfig


def startup_trials(num_samples: int, setting: int | str = "auto") -> int:
    """Random proposals before TPE starts modelling: a quarter of the budget, at least 2, at most 10
    (Optuna's default of 10 alone would leave a 8-16 trial search random from start to end)."""
    return setting if setting != "auto" else min(10, max(2, num_samples // 4))


def make_sampler(cfg: ExperimentConfig) -> optuna.samplers.BaseSampler:
    """The sampler sampler_choice names, seeded by search.seed."""
    # TPE's `group` is marked experimental, and warn_independent_sampling deprecated (Optuna 4.9; its
    # default True logs a warning per parameter sampled independently): the search log need not say so
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return SAMPLERS[sampler_choice(cfg)[0]](cfg)


def tpe_sampler(cfg: ExperimentConfig) -> optuna.samplers.TPESampler:
    """TPE, modelling within the budgets users run. multivariate + group: one joint density over the
    parameters that appear together (lr x T x alpha interact; a kd_loss branch samples its own group).
    constant_liar: trials still running count as bad results, so concurrent asks spread out instead of
    piling onto one optimum. ASHA-stopped trials are PRUNED with their epochs' values: TPE ranks them
    after every completed trial, by how far they got and then by their last value (low-fidelity evidence).
    With two objectives Optuna's TPE reads no epoch values: it ranks the completed trials by Pareto
    rank, and its pruned trials tie (the earliest first)."""
    return optuna.samplers.TPESampler(seed=cfg.search.seed, multivariate=True, group=True, constant_liar=True,
                                      n_startup_trials=startup_trials(cfg.search.num_samples, cfg.search.startup_trials),
                                      warn_independent_sampling=False)


def gp_sampler(cfg: ExperimentConfig) -> optuna.samplers.GPSampler:
    """Gaussian-process Bayesian optimisation: Optuna's GPSampler (Matern 5/2 with a length scale per
    key, log expected improvement, running trials as pending points) taught by the ASHA-stopped trials
    too (search/gp_sampler.py). Its startup counts the trials it models."""
    from tune_kd.search.gp_sampler import StoppedTrialsGP

    return StoppedTrialsGP(seed=cfg.search.seed, warn_independent_sampling=False,
                           n_startup_trials=startup_trials(cfg.search.num_samples, cfg.search.startup_trials))


SAMPLERS = {"tpe": tpe_sampler, "gp": gp_sampler}


GP_MAX_KEYS = 5          # the most searched keys auto gives the GP: the largest space the replay measured it on
GP_MAX_CATEGORICAL = 1   # ... and the most categorical keys among them (kd_loss, in the recorded tables)


def sampler_choice(cfg: ExperimentConfig) -> tuple[str, str]:
    """(sampler name, why): search.sampler when set, else the replay's choice for the space
    (docs/search.md, "Does the search search well?"): the GP for a space of up to GP_MAX_KEYS keys with
    at most GP_MAX_CATEGORICAL categorical; TPE for a larger space, more categorical keys, or two
    objectives (the size/quality front was measured with TPE)."""
    setting = cfg.search.sampler
    if setting != "auto":
        return setting, f"search.sampler {setting}"
    searched = searched_keys(cfg.parameters)
    categorical = [name for name in searched if "values" in cfg.parameters[name]]
    if cfg.search.size_objective:
        return "tpe", "search.sampler auto: two objectives"
    if len(categorical) > GP_MAX_CATEGORICAL:
        return "tpe", f"search.sampler auto: {len(categorical)} categorical keys, more than {GP_MAX_CATEGORICAL}"
    if len(searched) > GP_MAX_KEYS:
        return "tpe", f"search.sampler auto: {len(searched)} searched keys, more than {GP_MAX_KEYS}"
    return "gp", f"search.sampler auto: {len(searched)} searched keys, at most {GP_MAX_KEYS}"


SAMPLER_NAMES = {"tpe": "Optuna's TPE", "gp": "a Gaussian process, Optuna's GPSampler taught by ASHA's stopped trials"}


def sampler_line(cfg: ExperimentConfig, grid: list | None = None) -> str:
    """The search's first line about its searcher: which sampler proposes, and why."""
    if grid is not None:
        return f"sampler: a grid of {len(grid)} points"
    if cfg.search.algorithm != "optuna":
        return f"sampler: Ray's random sampling (search.algorithm {cfg.search.algorithm})"
    name, why = sampler_choice(cfg)
    return f"sampler: {SAMPLER_NAMES[name]} ({why})"

"""The Gaussian-process sampler, taught by the trials ASHA stopped.

Optuna's GPSampler models COMPLETE trials only. Under ASHA most trials end PRUNED after an epoch or
two, so a GP search of 24 trials models a handful of points, and the replay measured it no better
than random search with ASHA (docs/search.md). StoppedTrialsGP gives the GP every stopped trial too,
its final value imputed from its learning curve:

    imputed = its value at the last epoch e it reached
              - the median, over completed trials that reported epoch e, of (their value at e - their final value)

i.e. it is assumed to improve from e as the median completed trial did. A trial stopped at epoch 1
is pessimistic evidence by construction: ASHA stopped it because it was behind its peers there.
Diverged trials with no finite value stay unseen. With no completed trial yet there is nothing to
impute from: the GP waits (its startup proposals are random). Two objectives: GPSampler's own
behaviour (pruned trials unseen).

The hook is Optuna's GPSampler._sample_relative_impl (Optuna 5.x, pinned in pyproject.toml); without
it the sampler is GPSampler unchanged, and says so once.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import statistics

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger(__name__)


class StoppedTrialsGP(optuna.samplers.GPSampler):
    """GPSampler that also models PRUNED trials (their final value imputed, as the module says)."""

    def sample_relative(self, study, trial: FrozenTrial, search_space: dict) -> dict:
        if not hasattr(self, "_sample_relative_impl"):
            if not getattr(self, "_warned", False):
                self._warned = True
                log.warning("this Optuna's GPSampler has no _sample_relative_impl: ASHA-stopped trials go unmodelled")
            return super().sample_relative(study, trial, search_space)
        if not search_space or len(study.directions) > 1:
            return super().sample_relative(study, trial, search_space)
        trials = study._get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING),
                                   use_cache=False)
        completed = [t for t in trials if t.state == TrialState.COMPLETE]
        imputed = imputed_trials(completed, [t for t in trials if t.state == TrialState.PRUNED
                                             and search_space.keys() <= t.params.keys()],
                                 study.direction)
        running = [t for t in trials if t.state == TrialState.RUNNING and search_space.keys() <= t.params.keys()]
        if not completed or len(completed) + len(imputed) < self._n_startup_trials:
            return {}
        import torch

        # as GPSampler does, a global default device of cuda must not reach its fits; but only then: the
        # device mode intercepts every torch call (~40% of a proposal on CPU)
        on_cpu = contextlib.nullcontext() if torch.get_default_device().type == "cpu" else torch.device("cpu")
        with on_cpu:
            return self._sample_relative_impl(study, completed + imputed, running, search_space)


def imputed_trials(completed: list[FrozenTrial], pruned: list[FrozenTrial], direction: StudyDirection) -> list[FrozenTrial]:
    """The pruned trials as COMPLETE copies with an imputed final value (module docstring); a trial
    without a finite intermediate value is left out."""
    if not completed:
        return []
    sign = 1.0 if direction == StudyDirection.MINIMIZE else -1.0   # in "lower is better" terms
    worst = max(sign * t.value for t in completed)
    out = []
    for stopped in pruned:
        reached = {e: v for e, v in stopped.intermediate_values.items() if math.isfinite(v)}
        if not reached:
            continue
        epoch = max(reached)
        drops = [sign * t.intermediate_values[epoch] - sign * t.value for t in completed
                 if math.isfinite(t.intermediate_values.get(epoch, math.nan))]
        value = sign * reached[epoch] - statistics.median(drops) if drops else worst
        told = copy.copy(stopped)
        told.state, told.values = TrialState.COMPLETE, [sign * value]
        out.append(told)
    return out

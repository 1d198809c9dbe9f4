"""Where a search's results go besides the terminal: Ray's JSON, CSV and TensorBoard loggers, and
a W&B run per trial."""

from __future__ import annotations

import logging
import os

from tune_kd.config.experiment import ExperimentConfig
from tune_kd.train.tracking import wandb_mode

log = logging.getLogger(__name__)


def trial_wandb_callback(project: str, group: str):
    """Ray's WandbLoggerCallback (one W&B run per trial, logged from a helper actor on the driver's
    node) that also works without credentials and across --resume; see the module docstring."""
    from ray.air.integrations.wandb import WandbLoggerCallback

    class TrialWandb(WandbLoggerCallback):
        def setup(self, *args, **kwargs):
            self.kwargs.pop("mode", None)
            if wandb_mode() in ("offline", "disabled"):
                # Ray asks the driver's environment for a key unless WANDB_MODE says offline, and its
                # logging actors get only the key, never WANDB_MODE: tell wandb.init itself.
                os.environ.setdefault("WANDB_MODE", wandb_mode())
                self.kwargs["mode"] = os.environ["WANDB_MODE"]
                log.info("wandb: no credentials configured, logging offline: one run per trial under "
                         "trial_<id>/wandb/ (upload later with `wandb sync <that folder>`)")
            super().setup(*args, **kwargs)

        def log_trial_end(self, trial, failed: bool = False):
            if trial not in self._trial_queues:   # its logging actor already ended (wandb.init failed)
                log.warning("wandb: trial %s logged nothing to W&B (its logging actor ended early)", trial.trial_id)
                return
            super().log_trial_end(trial, failed)

    TrialWandb.__qualname__ = TrialWandb.__name__
    return TrialWandb(project=project, group=group)


def make_callbacks(cfg: ExperimentConfig) -> list:
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback

    callbacks = [JsonLoggerCallback(), CSVLoggerCallback()]   # result.json feeds export and the summary
    if cfg.logging.tensorboard:
        callbacks.append(TBXLoggerCallback())
    if cfg.logging.wandb:
        callbacks.append(trial_wandb_callback(cfg.logging.wandb_project, cfg.name))
    return callbacks

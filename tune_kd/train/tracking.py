"""Where results go besides the terminal: for a search, Ray's JSON and CSV loggers (result.json
feeds the summary, export and report), TensorBoard, and W&B; for a single training run
(loop.train, logging.wandb), its own W&B run (start_wandb).

W&B without credentials logs offline: every trial writes its own run under
results/<name>/trial_<id>/wandb/offline-run-* (`wandb sync <that folder>` uploads it later). With an
API key in the environment or a `wandb login`, the runs go online. The decision is taken in the
callback's setup(), which Ray calls on every start, `--resume` included (a resumed Tuner uses the
callbacks pickled with the experiment, not new ones).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from tune_kd.config.experiment import ExperimentConfig

log = logging.getLogger(__name__)


def wandb_has_credentials() -> bool:
    """An API key in the environment or a wandb login in ~/.netrc."""
    netrc = Path.home() / ".netrc"
    return bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())


def wandb_mode() -> str:
    """WANDB_MODE when the user set it, else online with credentials and offline without."""
    return os.environ.get("WANDB_MODE") or ("online" if wandb_has_credentials() else "offline")


def start_wandb(cfg: ExperimentConfig):
    """wandb run, imported only when asked for; offline (with a sync hint) when no credentials exist."""
    import wandb

    mode = wandb_mode()
    run = wandb.init(project=cfg.logging.wandb_project, name=cfg.name, config=cfg.to_dict(), mode=mode)
    if mode == "offline":
        log.info("wandb: no credentials configured, logging offline; upload later with: wandb sync %s", run.dir)
    return run



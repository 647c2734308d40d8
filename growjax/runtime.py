"""What every training job does before and while it runs, whatever it trains: multi-process set-up,
workdir and batch-size checks, and stopping on a NaN loss."""
from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from growjax.errors import ConfigError, UserError

DEFAULT_CACHE = os.path.join(os.path.expanduser('~'), '.cache', 'growjax')  # datasets and source models built once


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def initialize_distributed(settings: ml_collections.ConfigDict) -> None:
    """jax.distributed.initialize, auto-detected on pods/clusters or explicit (e.g. on localhost)."""
    if jax.distributed.is_initialized():
        return
    if not settings.coordinator_address:
        jax.distributed.initialize()
        return
    jax.distributed.initialize(coordinator_address=settings.coordinator_address,
                               num_processes=settings.num_processes, process_id=settings.process_id)


def check_workdir(workdir: str) -> None:
    """A workdir must be a folder we can write, or creatable in one; checked before any work."""
    path = os.path.abspath(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f'workdir {workdir} is a file, not a folder: pass --workdir=A_FOLDER.')
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f'workdir {workdir} cannot be created: {existing} is a file.')
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f'workdir {workdir} is not writable ({existing} does not allow writing): pass another '
                        '--workdir or fix its permissions.')


def check_batch_sizes(config: ml_collections.ConfigDict, keys=('batch_size', 'eval_batch_size')) -> None:
    """config.train's batch sizes must split evenly over all devices."""
    devices = jax.device_count()
    for key in keys:
        if config.train[key] % devices:
            raise ConfigError(
                f'config.train.{key}={config.train[key]} is not divisible by the {devices} devices; '
                f'use a multiple of {devices}.')


def check_finite(metrics: list[dict], first_step: int, workdir: str) -> list[dict]:
    """Raises TrainingDiverged naming the first step whose loss is NaN or infinite."""
    for offset, values in enumerate(metrics):
        if not np.isfinite(values['loss']):
            raise TrainingDiverged(
                f'the training loss became {values["loss"]} at step {first_step + offset}; the last good checkpoint '
                f'is kept in {os.path.join(workdir, "checkpoints")}. Lower config.train.learning_rate or check the data.')
    return metrics

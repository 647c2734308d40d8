"""Orbax checkpoints of a run (train state + input pipeline position) and the final export.

A checkpoint holds everything needed to continue bit for bit: the train state and the data
iterator's state (JSON). The export holds only the model variables plus a JSON description, in a
form `grow_params` takes as the pretrained input of the next growth round.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

EXPORT_DIR = 'export'
EXPORT_VARIABLES = 'variables'
EXPORT_MODEL_JSON = 'model.json'


def checkpoint_manager(workdir: str, max_to_keep: int) -> ocp.CheckpointManager:
    """Asynchronous saves under workdir/checkpoints, keeping the newest `max_to_keep`."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=True,
                                           create=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'), options=options,
                                 item_names=('state', 'data'))


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict) -> None:
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               data=ocp.args.JsonSave(data_state)))


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """(step, state, data_state) of the latest checkpoint, restored into `abstract_state`'s
    shapes and shardings; None when there is none. A shape mismatch raises (no silent padding)."""
    step = manager.latest_step()
    if step is None:
        return None
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return step, restored['state'], restored['data']


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs with the shardings of `tree`, the restore target orbax needs."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)), tree)


def export(workdir: str, variables: dict, model_description: dict) -> str:
    """Writes workdir/export/{variables (orbax), model.json}; returns the export directory."""
    directory = os.path.join(os.path.abspath(workdir), EXPORT_DIR)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(directory, EXPORT_VARIABLES), variables, force=True)
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        with open(os.path.join(directory, EXPORT_MODEL_JSON), 'w') as f:
            json.dump(model_description, f, indent=2, sort_keys=True)
    return directory


def load_export(directory: str) -> tuple[dict, dict]:
    """(variables, model description) of an export written by `export` (or of its parent workdir)."""
    if os.path.isdir(os.path.join(directory, EXPORT_DIR)):
        directory = os.path.join(directory, EXPORT_DIR)
    variables_dir = os.path.join(directory, EXPORT_VARIABLES)
    if not os.path.isdir(variables_dir):
        raise FileNotFoundError(
            f'{directory} is not a growjax export (no {EXPORT_VARIABLES}/ in it): pass the workdir of a finished '
            'run of main.py, or its export/ folder.')
    variables = ocp.StandardCheckpointer().restore(os.path.abspath(variables_dir))
    description_path = os.path.join(directory, EXPORT_MODEL_JSON)
    description = {}
    if os.path.exists(description_path):
        with open(description_path) as f:
            description = json.load(f)
    return variables, description

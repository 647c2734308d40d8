"""Orbax checkpoints of a run (train state + input pipeline position) and the final export.

A checkpoint holds everything needed to continue bit for bit: the train state and the data
iterator's state (JSON). The export holds only the model variables plus a JSON description, in a
form `grow_params` takes as the pretrained input of the next growth round.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from growjax.errors import UserError

log = logging.getLogger('growjax')

EXPORT_DIR = 'export'
EXPORT_VARIABLES = 'variables'
EXPORT_MODEL_JSON = 'model.json'


def checkpoint_manager(workdir: str, max_to_keep: int) -> ocp.CheckpointManager:
    """Asynchronous saves under workdir/checkpoints, keeping the newest `max_to_keep`."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=True,
                                           create=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'), options=options,
                                 item_names=('state', 'data'))


def state_checksum(state: Any) -> list[int]:
    """One uint32 per leaf: the wrapping sum of its bits. Cheap (computed on device, one number per
    leaf comes back) and sensitive to any flipped bit that still decodes, which orbax itself does
    not detect."""
    def leaf_sum(leaf):
        bits = jax.lax.bitcast_convert_type(leaf, jnp.uint16 if leaf.dtype.itemsize == 2 else jnp.uint32)
        return jnp.sum(bits.astype(jnp.uint32), dtype=jnp.uint32)

    sums = jax.jit(lambda tree: [leaf_sum(leaf) for leaf in jax.tree_util.tree_leaves(tree)])(state)
    return [int(value) for value in jax.device_get(sums)]


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict) -> None:
    """Saves asynchronously; the JSON item carries the input position and the state's checksum."""
    meta = {'data': data_state, 'checksum': state_checksum(state)}
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(meta)))


class DamagedCheckpoint(UserError):
    """A checkpoint that cannot be read back exactly."""


def _restore_step(manager, step: int, abstract_state: Any) -> tuple[Any, dict]:
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except Exception as err:  # any read or decode failure means the same thing: not usable
        raise DamagedCheckpoint(f'checkpoint {step} cannot be read ({type(err).__name__}: {err})') from err
    meta = restored['data']
    if not isinstance(meta, dict) or meta.get('checksum') != state_checksum(restored['state']):
        raise DamagedCheckpoint(f'checkpoint {step} does not match the checksum saved with it')
    return restored['state'], meta['data']


def restore_latest(workdir: str, max_to_keep: int, abstract_state: Any | Callable[[int], Any]
                   ) -> tuple[ocp.CheckpointManager, tuple[int, Any, dict] | None]:
    """The run's checkpoint manager and (step, state, data_state) of the newest *good* checkpoint.

    A damaged checkpoint (unreadable, truncated, or not matching its checksum) is skipped with a
    warning and moved aside to '<step>.damaged-<time>' (kept for inspection, never reused), so the
    run resumes from the previous good one and later saves cannot collide with it. Shapes come
    from `abstract_state`, or from `abstract_state(step)` where the state's shapes depend on the step
    (a model that grows during training): a mismatch is damage too (no silent padding).
    """
    manager = checkpoint_manager(workdir, max_to_keep)
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            target = abstract_state(step) if callable(abstract_state) else abstract_state
            state, data_state = _restore_step(manager, step, target)
        except DamagedCheckpoint as err:
            log.warning('%s; resuming from an earlier checkpoint instead.', err)
            manager.close()
            _move_aside(manager.directory, step)
            manager = checkpoint_manager(workdir, max_to_keep)
            continue
        return manager, (step, state, data_state)
    return manager, None


def _move_aside(directory, step: int) -> None:
    if jax.process_index() == 0:
        source = os.path.join(str(directory), str(step))
        os.rename(source, f'{source}.damaged-{time.strftime("%Y%m%d-%H%M%S")}')
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f'growjax_move_aside_{step}')


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
        raise UserError(
            f'{directory} is not a growjax export (no {EXPORT_VARIABLES}/ in it): pass the workdir of a finished '
            'run of main.py, or its export/ folder.')
    try:
        checkpointer = ocp.StandardCheckpointer()
        path = os.path.abspath(variables_dir)
        # Restore replicated over *this* run's devices: the export may come from another topology.
        everywhere = NamedSharding(Mesh(np.array(jax.devices()), ('devices',)), PartitionSpec())
        target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=everywhere),
                                        checkpointer.metadata(path).item_metadata.tree)
        variables = checkpointer.restore(path, target)
    except Exception as err:  # a damaged file surfaces as many different exception types
        raise UserError(f'{variables_dir}: cannot read the pretrained variables ({type(err).__name__}: '
                        f'{str(err)[:200]}); the export is damaged: export it again or use another init.pretrained.'
                        ) from err
    description_path = os.path.join(directory, EXPORT_MODEL_JSON)
    description = {}
    if os.path.exists(description_path):
        with open(description_path) as f:
            description = json.load(f)
    return variables, description

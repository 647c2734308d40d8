"""Train state, optimiser groups and the data-parallel train / eval steps.

The trainable and frozen parameters live in separate trees, and the step differentiates the
trainable tree only: XLA then never computes a gradient for a frozen leaf (and, below the lowest
trainable layer, no backward pass at all). The optimiser state exists for trainable leaves only.
Frozen BatchNorm layers are frozen entirely: they normalise with their running averages, which
stay as pretrained (otherwise a "frozen" trunk would still drift with the target's batch statistics).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from growjax.grow import flatten, unflatten
from growjax.groups import NEW, PRETRAINED, merge, scale_by_group, split

PyTree = Any


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    trainable: PyTree
    frozen: PyTree
    batch_stats: PyTree
    opt_state: PyTree

    def variables(self) -> dict:
        """The model's variables, as `model.apply` takes them."""
        variables = {'params': merge(self.trainable, self.frozen)}
        if self.batch_stats:
            variables['batch_stats'] = self.batch_stats
        return variables


def create_state(variables: Mapping, trainable_mask: Mapping, optimizer: optax.GradientTransformation,
                 ) -> TrainState:
    """Splits `variables['params']` by `trainable_mask` and initialises the optimiser on the trainable part."""
    trainable, frozen = split(variables['params'], trainable_mask)
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
                      batch_stats=variables.get('batch_stats', {}), opt_state=optimizer.init(trainable))


def decay_mask(params: Mapping) -> dict:
    """Weight decay on kernels only: decaying biases, BatchNorm and NormScale scales would pull the
    learned per-unit scales towards zero, which undoes the normalisation."""
    return unflatten({path: path[-1] == 'kernel' for path in flatten(params)})


OPTIMIZERS = ('sgd', 'adamw')


def make_optimizer(trainable_labels: Mapping, *, learning_rate: optax.ScalarOrSchedule, momentum: float,
                   weight_decay: float, new_lr_multiplier: float, pretrained_lr_multiplier: float = 1.0,
                   kind: str = 'sgd') -> optax.GradientTransformation:
    """The paper's optimiser: SGD with momentum and weight decay, new layers at a higher learning rate.

    `trainable_labels` are the 'pretrained'/'new' labels of the trainable tree. kind='adamw' swaps
    SGD for AdamW (beta1 = momentum), which transformers need to train from scratch (the built-in
    ViT's source model); the per-group rates and the decayed leaves stay the same.
    """
    if kind == 'sgd':
        base = optax.chain(optax.add_decayed_weights(weight_decay, mask=decay_mask),
                           optax.sgd(learning_rate, momentum=momentum or None))
    elif kind == 'adamw':
        base = optax.adamw(learning_rate, b1=momentum, weight_decay=weight_decay, mask=decay_mask)
    else:
        raise ValueError(f'Unknown optimizer {kind!r}; expected one of {OPTIMIZERS}.')
    return optax.chain(
        base, scale_by_group(trainable_labels, {PRETRAINED: pretrained_lr_multiplier, NEW: new_lr_multiplier}))


def step_schedule(base_lr: float, total_steps: int, decay_at: tuple[float, ...], factor: float = 0.1,
                  warmup_steps: int = 0):
    """The paper's step schedule: the learning rate times `factor` at each fraction in `decay_at`,
    after an optional linear warm-up from 0 over `warmup_steps`."""
    steps = optax.piecewise_constant_schedule(
        base_lr, {max(1, int(round(fraction * total_steps))): factor for fraction in decay_at})
    if not warmup_steps:
        return steps
    return optax.join_schedules([optax.linear_schedule(0.0, base_lr, warmup_steps), lambda count: steps(count + warmup_steps)],
                                [warmup_steps])


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy, computed in float32 whatever the logits' dtype."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def frozen_batch_norms_use_running_averages(frozen: Mapping) -> nn.module.Interceptor:
    """A Flax method interceptor: BatchNorm layers whose parameters are in `frozen` run with
    use_running_average=True (no batch statistics, no update of their running averages).

    The models pass the mode at call time (a mode fixed in a BatchNorm's constructor cannot be
    overridden: such a frozen layer in training mode is an error, not a silent drift).
    """
    frozen_modules = {path[:-1] for path in flatten(frozen)}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if (isinstance(module, nn.BatchNorm) and context.method_name == '__call__'
                and tuple(module.path) in frozen_modules):
            if module.use_running_average is None:
                kwargs = {**kwargs, 'use_running_average': True}
            elif not module.use_running_average:
                raise ValueError(f"BatchNorm {'/'.join(module.path)} is frozen but fixes use_running_average=False "
                                 'in its constructor; pass the mode at call time so the step can freeze it.')
        return next_fun(*args, **kwargs)

    return interceptor


def make_train_step(model, optimizer: optax.GradientTransformation, dropout_rng: jax.Array) -> Callable:
    """A pure step (state, batch) -> (state, metrics); jit it with `shard_step`."""

    def loss_fn(trainable, state: TrainState, batch, rng):
        variables = {'params': merge(trainable, state.frozen)}
        mutable = []
        if state.batch_stats:
            variables['batch_stats'] = state.batch_stats
            mutable = ['batch_stats']
        with nn.intercept_methods(frozen_batch_norms_use_running_averages(state.frozen)):
            logits, model_updates = model.apply(variables, batch['image'], train=True, mutable=mutable,
                                                rngs={'dropout': rng})
        loss = cross_entropy(logits, batch['label'])
        return loss, (logits, model_updates.get('batch_stats', state.batch_stats))

    def train_step(state: TrainState, batch) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(dropout_rng, state.step)
        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.trainable, state, batch, rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        new_state = state.replace(step=state.step + 1, trainable=optax.apply_updates(state.trainable, updates),
                                  batch_stats=batch_stats, opt_state=opt_state)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
        return new_state, {'loss': loss, 'accuracy': accuracy}

    return train_step


def masked_sums(logits: jax.Array, batch: Mapping) -> dict[str, jax.Array]:
    """Summed loss, correct predictions and count over a batch's real examples: an eval batch is
    padded to a fixed size, with batch['mask'] 1 for real examples and 0 for padding."""
    mask = batch.get('mask', jnp.ones(batch['label'].shape, jnp.float32))
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch['label'])
    correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
    return {'loss_sum': (losses * mask).sum(), 'correct': (correct * mask).sum(), 'count': mask.sum()}


def make_eval_step(model) -> Callable:
    """(state, batch) -> `masked_sums` of the model's logits."""

    def eval_step(state: TrainState, batch) -> dict:
        return masked_sums(model.apply(state.variables(), batch['image'], train=False), batch)

    return eval_step


def summed_over(eval_step: Callable, state, batches) -> dict:
    """The eval step's sums (losses, counts, ...) added up over every batch on device and fetched once;
    closes the batch iterator. Every job's evaluation divides these."""
    totals = None
    for batch in batches:
        out = eval_step(state, batch)
        totals = out if totals is None else jax.tree_util.tree_map(jnp.add, totals, out)
    batches.close()
    return jax.device_get(totals)


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh over all devices of all processes: the batch is split over it, params replicated."""
    return Mesh(np.array(jax.devices() if devices is None else devices), ('data',))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P('data'))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_train_step(train_step: Callable, mesh: Mesh) -> Callable:
    """jit over the mesh: state replicated and donated (updated in place), batch split on 'data'."""
    return jax.jit(train_step, in_shardings=(replicated(mesh), batch_sharding(mesh)),
                   out_shardings=(replicated(mesh), replicated(mesh)), donate_argnums=0)


def shard_eval_step(eval_step: Callable, mesh: Mesh) -> Callable:
    return jax.jit(eval_step, in_shardings=(replicated(mesh), batch_sharding(mesh)), out_shardings=replicated(mesh))

"""An in-memory trainer for many small few-shot runs: one compile per (model, regime, dataset).

The paper comparison is hundreds of short runs of one small network. Through main.py each would
pay a process start, an input pipeline and its own compilation; here the splits sit in memory
(normalised as the eval pipeline serves them), batches are planned on the host as indices and crop
offsets (so every method sees exactly the same examples at a given seed), and the learning rate is
a traced argument. Runs whose lowest layer is frozen are vmapped over seeds x learning rates with
the frozen parameters and (per seed) the batch shared, so XLA computes the frozen trunk once per
batch, not once per run. Runs that train the convolutions go one at a time through the same
compiled step: vmapping them turns each conv into a grouped conv, which XLA:CPU ran 2x slower
per run than a plain loop. Steps are a Python loop, not `lax.scan`: XLA:CPU ran this step 8x
slower inside a while loop than jitted alone (jax 0.10.2).

Everything else is growjax itself: grow_params, groups.param_groups (labels, regime mask),
steps.make_optimizer (SGD, momentum, weight decay, new leaves at a higher rate), steps.make_train_step
and growjax.analysis for the evaluation.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from growjax import analysis, data, groups, steps
from growjax.grow import grow_params
from growjax.nn import scales_from_data as scales_from_data_


@dataclasses.dataclass(frozen=True)
class Split:
    images: np.ndarray  # float32 [N, H, W, C], normalised
    labels: np.ndarray  # int32 [N]


@dataclasses.dataclass(frozen=True)
class Task:
    """A target dataset in memory: the few-shot pool (train) and the validation and test splits."""
    dataset: str
    num_classes: int
    train: Split
    validation: Split
    test: Split


def load_task(config, dataset: str) -> Task:
    """Every split of `dataset`, as the eval pipeline serves them (resized, normalised)."""
    d = config.data
    meta = data.dataset_info(dataset, d.data_dir, d.image_size)
    splits = {split: Split(*data.split_arrays(dataset, split, d.data_dir, d.image_size, mean=d.mean, std=d.std))
              for split in ('train', 'validation', 'test')}
    return Task(dataset, meta.num_classes, **splits)


def batch_plan(labels: np.ndarray, shots: int, seed: int, num_steps: int, batch_size: int,
               crop_padding: int) -> tuple[np.ndarray, np.ndarray]:
    """(pool indices [steps, batch], crop offsets [steps, batch, 2]) of one seed's few-shot run.

    The few-shot draw is growjax.data.few_shot_indices (nested in `shots`; 0: the whole pool, as
    data.shots_per_class=0 means); batches walk through fresh permutations of it epoch after epoch,
    as the training pipeline does.
    """
    chosen = data.few_shot_indices(labels, shots, seed) if shots else np.arange(len(labels))
    rng = np.random.default_rng([seed, shots])
    epochs = -(-num_steps * batch_size // len(chosen))
    order = np.concatenate([rng.permutation(chosen) for _ in range(epochs)])[:num_steps * batch_size]
    offsets = rng.integers(0, 2 * crop_padding + 1, size=(num_steps, batch_size, 2))
    return order.reshape(num_steps, batch_size).astype(np.int32), offsets.astype(np.int32)


def random_crops(padded: jax.Array, ids: jax.Array, offsets: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Crops of `size` at `offsets` from the zero-padded pool images `ids` (the pipeline's crop)."""
    channels = padded.shape[-1]
    return jax.vmap(lambda i, o: jax.lax.dynamic_slice(padded[i], (o[0], o[1], 0), (*size, channels)))(ids, offsets)


# The vmap axes of a TrainState: everything per run except the frozen (pretrained) leaves.
_STATE_AXES = steps.TrainState(step=0, trainable=0, frozen=None, batch_stats=0, opt_state=0)


@dataclasses.dataclass
class RunCurves:
    """One run's record: evaluations over training on validation, and the final test evaluation."""
    seed: int
    learning_rate: float
    steps: list[int]  # 0, then every eval_every steps and the last step
    train_loss: list[float]  # mean training loss of the steps since the previous record (steps[1:])
    validation: list[dict[str, float]]  # accuracy, loss and the analyses at each step
    test: dict[str, float]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class Trainer:
    """Trains one (model, regime) on one task for any seeds, shot counts and learning rates.

    Init, train step and evaluation are compiled once per grid shape (seeds x learning rates) and
    reused by every `run`. Runs at one seed share the new units' initial values and the batches.

    num_steps=None (and eval_every=None) leaves the number of steps to each `run` call: the
    learning-rate schedule is then fed step by step from the host (the same values), so runs of
    any length share one compilation (the growth map scales steps with the data size).
    scales_from_data ('group' or 'first', growjax.nn.scales_from_data): after growth, NormScale's
    scales are set from the seed's first training batch instead of the constant scale_init.
    """

    def __init__(self, model, pretrained: dict | None, regime: str, task: Task, *, reinit: Sequence[str],
                 num_steps: int | None, batch_size: int, eval_every: int | None, crop_padding: int, momentum: float,
                 weight_decay: float, new_lr_multiplier: float, lr_decay_at: Sequence[float],
                 scales_from_data: str = ''):
        self.task = task
        self.num_steps, self.batch_size, self.eval_every = num_steps, batch_size, eval_every
        self.crop_padding = crop_padding
        self.lr_decay_at = tuple(lr_decay_at)
        self.scales_from_data = scales_from_data
        self._pretrained = pretrained
        image_shape = task.train.images.shape[1:]
        sample = jnp.zeros((1, *image_shape), jnp.float32)
        param_groups = groups.param_groups(model, None if pretrained is None else pretrained['params'], regime,
                                           sample, reinit=tuple(reinit))
        mask = param_groups.mask
        # Runs share the frozen layers' forward pass (vmapped) only where the lowest layer is frozen.
        self.vectorised = not param_groups.trains(param_groups.layer_order[0])
        schedule = None if num_steps is None else steps.step_schedule(1.0, num_steps, tuple(lr_decay_at))

        def optimizer(learning_rate, factor=None):
            """At `learning_rate` times the schedule's factor: its own (fixed steps) or `factor` (fed per step)."""
            rate = (lambda count: learning_rate * factor) if schedule is None else (
                lambda count: learning_rate * schedule(count))
            return steps.make_optimizer(param_groups.trainable_labels, learning_rate=rate,
                                        momentum=momentum, weight_decay=weight_decay,
                                        new_lr_multiplier=new_lr_multiplier)

        def init_one(key, pretrained, first_batch):
            if pretrained is None:
                variables = model.init(key, sample)
            else:
                variables = grow_params(pretrained, model, key, sample, reinit=tuple(reinit))
            if scales_from_data:
                variables = scales_from_data_(model, variables, first_batch, mode=scales_from_data)
            return steps.create_state(variables, mask, optimizer(1.0, 1.0))  # the optimiser state has no lr in it

        def repeat(state, num_lrs):
            """[seed] -> [seed, lr] states, and a copy of the initial trainable leaves (the state is donated)."""
            tile = lambda x: jnp.repeat(x[:, None], num_lrs, axis=1)
            runs = state.replace(step=tile(state.step), trainable=jax.tree_util.tree_map(tile, state.trainable),
                                 batch_stats=jax.tree_util.tree_map(tile, state.batch_stats),
                                 opt_state=jax.tree_util.tree_map(tile, state.opt_state))
            return runs, jax.tree_util.tree_map(jnp.copy, runs.trainable)

        def train_one(state, learning_rate, factor, padded_pool, pool_labels, ids, offsets, dropout_key):
            images = random_crops(padded_pool, ids, offsets, image_shape[:2])
            step = steps.make_train_step(model, optimizer(learning_rate, factor), dropout_key)
            state, metrics = step(state, {'image': images, 'label': pool_labels[ids]})
            return state, metrics['loss']

        def evaluate_one(state, initial_trainable, images, split_labels):
            reference = groups.merge(initial_trainable, state.frozen)
            return analysis.analyse(model, state.variables(), reference, images, split_labels)

        # Axes [seed, lr]: keys and batches vary by seed only, so the lr axis shares them.
        self._init = jax.jit(jax.vmap(init_one, in_axes=(0, None, 0), out_axes=_STATE_AXES))
        self._repeat = jax.jit(repeat, static_argnums=1)
        over_lrs = jax.vmap(train_one, in_axes=(_STATE_AXES, 0, None, None, None, None, None, None),
                            out_axes=(_STATE_AXES, 0))
        self._train = jax.jit(jax.vmap(over_lrs, in_axes=(_STATE_AXES, 0, None, None, None, 0, 0, 0),
                                       out_axes=(_STATE_AXES, 0)), donate_argnums=0)
        over_runs = jax.vmap(jax.vmap(evaluate_one, in_axes=(_STATE_AXES, 0, None, None)),
                             in_axes=(_STATE_AXES, 0, None, None))
        self._evaluate = jax.jit(over_runs)
        pad = ((0, 0), (crop_padding, crop_padding), (crop_padding, crop_padding), (0, 0))
        self._pool_host = np.pad(task.train.images, pad)
        self._pool = jnp.asarray(self._pool_host)
        self._pool_labels = jnp.asarray(task.train.labels)
        # Both splits are evaluated in chunks of one size (their gcd), so evaluation compiles once.
        chunk = math.gcd(len(task.validation.labels), len(task.test.labels))
        self._splits = {name: (jnp.asarray(split.images.reshape(-1, chunk, *image_shape)),
                               jnp.asarray(split.labels.reshape(-1, chunk)))
                        for name, split in (('validation', task.validation), ('test', task.test))}

    def _evaluate_split(self, state, initial, split: str) -> dict[str, jax.Array]:
        """Means over the split: every value is a mean over equally sized chunks (or the same in each)."""
        images, labels = self._splits[split]
        chunks = [self._evaluate(state, initial, images[i], labels[i]) for i in range(len(labels))]
        return jax.tree_util.tree_map(lambda *values: sum(values) / len(values), *chunks)

    def run(self, shots: int, seeds: Sequence[int], learning_rates: Sequence[float], *, num_steps: int | None = None,
            eval_every: int | None = None, pretrained: dict | None = None, keep_variables: bool = False,
            ) -> list[RunCurves] | list[tuple[RunCurves, dict]]:
        """Trains every (seed, learning rate) pair: one vectorised grid, or single runs in turn.

        shots=0 trains on the whole pool. num_steps / eval_every: this call's (required when the
        trainer was built without them). pretrained: start from these variables instead of the
        trainer's (same structure, e.g. one seed's model from an earlier task). keep_variables: return
        (curves, final variables) pairs.
        """
        num_steps = self.num_steps if num_steps is None else num_steps
        eval_every = self.eval_every if eval_every is None else eval_every
        if num_steps is None or eval_every is None:
            raise ValueError('Trainer.run: this trainer was built without num_steps/eval_every: pass them.')
        if self.num_steps is not None and num_steps != self.num_steps:
            raise ValueError(f'Trainer.run: num_steps={num_steps}, but this trainer\'s schedule is for {self.num_steps} '
                             'steps (build it with num_steps=None to vary them).')
        args = (shots, num_steps, eval_every, self._pretrained if pretrained is None else pretrained, keep_variables)
        if self.vectorised:
            found = self._run_grid(seeds, learning_rates, *args)
        else:
            found = [found for seed in seeds for lr in learning_rates for found in self._run_grid([seed], [lr], *args)]
        return found if keep_variables else [curves for curves, _ in found]

    def _first_batches(self, ids: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """The images of each seed's first training batch (crops included): [seeds, batch, H, W, C]."""
        height, width = self.task.train.images.shape[1:3]
        return np.stack([np.stack([self._pool_host[i, o0:o0 + height, o1:o1 + width] for i, (o0, o1) in zip(row, offs)])
                         for row, offs in zip(ids[:, 0], offsets[:, 0])])

    def _run_grid(self, seeds: Sequence[int], learning_rates: Sequence[float], shots: int, num_steps: int,
                  eval_every: int, pretrained: dict | None, keep_variables: bool) -> list[tuple[RunCurves, dict | None]]:
        plans = [batch_plan(self.task.train.labels, shots, seed, num_steps, self.batch_size, self.crop_padding)
                 for seed in seeds]
        ids_host = np.stack([plan[0] for plan in plans])
        offsets_host = np.stack([plan[1] for plan in plans])
        ids, offsets = jnp.asarray(ids_host), jnp.asarray(offsets_host)
        keys = jnp.stack([jax.random.key(seed) for seed in seeds])
        dropout_keys = jnp.stack([jax.random.fold_in(jax.random.key(seed), 1) for seed in seeds])
        lrs = jnp.asarray(np.tile(np.asarray(learning_rates, np.float32), (len(seeds), 1)))
        # Only scales_from_data reads the first batches (an empty stand-in otherwise, nothing gathered).
        first = jnp.asarray(self._first_batches(ids_host, offsets_host) if self.scales_from_data
                            else np.zeros((len(seeds), 0), np.float32))
        state, initial = self._repeat(self._init(keys, pretrained, first), len(learning_rates))
        # The schedule's factor at each step, for a trainer without a fixed number of steps (ignored otherwise).
        schedule = steps.step_schedule(1.0, num_steps, self.lr_decay_at)
        factors = np.asarray(schedule(jnp.arange(num_steps)), np.float32)
        record_steps, losses = [0], []
        validation = [self._evaluate_split(state, initial, 'validation')]
        window = []
        for step in range(1, num_steps + 1):
            state, loss = self._train(state, lrs, factors[step - 1], self._pool, self._pool_labels, ids[:, step - 1],
                                      offsets[:, step - 1], dropout_keys)
            window.append(loss)
            if step % eval_every == 0 or step == num_steps:
                record_steps.append(step)
                losses.append(jnp.mean(jnp.stack(window), axis=0))
                validation.append(self._evaluate_split(state, initial, 'validation'))
                window = []
        losses, validation, test = jax.device_get((losses, validation, self._evaluate_split(state, initial, 'test')))
        final = jax.device_get(state) if keep_variables else None
        runs = []
        for i, seed in enumerate(seeds):
            for j, lr in enumerate(learning_rates):
                pick = lambda values: {key: float(value[i, j]) for key, value in values.items()}
                curves = RunCurves(seed=int(seed), learning_rate=float(lr), steps=list(record_steps),
                                   train_loss=[float(loss[i, j]) for loss in losses],
                                   validation=[pick(v) for v in validation], test=pick(test))
                runs.append((curves, None if final is None else run_variables(final, i, j)))
        return runs


def run_variables(state: steps.TrainState, i: int, j: int) -> dict:
    """The variables of run (seed i, learning rate j) of a [seed, lr] grid state (frozen leaves are shared)."""
    pick = lambda tree: jax.tree_util.tree_map(lambda x: x[i, j], tree)
    variables = {'params': groups.merge(pick(state.trainable), state.frozen)}
    if state.batch_stats:
        variables['batch_stats'] = pick(state.batch_stats)
    return variables


def parameter_count(model, image_shape: tuple[int, ...]) -> int:
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *image_shape), jnp.float32))
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(shapes['params']))

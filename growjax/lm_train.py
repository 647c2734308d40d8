"""The language-model job that grows during training (issue 21): `python main.py --config=configs/lm_grow.py`.

It trains a small byte-level LM on the built-in corpus (growjax.data.text: the Python standard
library's source), grows it with growjax.expand at the fractions of the budget that growth.at names
(one stage per entry: the model's width and depth after it), and continues with the bigger model,
its optimiser state grown with it (expand_opt_state). Compute, not steps, is the fair axis when the
model changes size, so every metrics row carries the cumulative training FLOPs, counted exactly from
XLA's cost analysis of each stage's compiled train step.

Checkpoints hold the train state and the input position, as in growjax.train; the checkpoint at
step s holds the model of the stage that trains after step s (a growth after step g is saved with
step g), so a run killed before, during or after a growth resumes to the same numbers: the growth
is a pure function of the state and a key derived from the seed and the stage.

Nothing here names a model: the model is `growjax.models.get(config.model.name, ...)` with GPT-style
sizes (width, depth, num_heads, mlp_dim, max_len), and a family's module sets what is its own
(growjax.families.gpt: the modules a new block zeroes to start as the identity).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from growjax import checkpoint, data, lm, models, steps
from growjax.data import text
from growjax.errors import ConfigError
from growjax.expand import check_function, expand, expand_opt_state, expansion_plan
from growjax.outputs import MetricsWriter, ProgressBar, plot_loss_against_flops
from growjax.runtime import DEFAULT_CACHE, check_batch_sizes, check_finite, check_workdir, initialize_distributed

log = logging.getLogger('growjax')
LR_AFTER_GROWTH = ('continue', 'rewarm')
OPT_STATE_RULES = ('map', 'reset')  # growjax.expand.expand_opt_state's rules
NEW_LAYERS = ('zero', 'stack')  # growjax.expand's depth options


def base_config() -> ml_collections.ConfigDict:
    """The LM job's keys, each documented here; a model family completes them (growjax.families.gpt.config)."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.name = ''                 # a growjax.models name of a byte-level LM (the family sets it: 'gpt')
    c.model.width = 64                # the first stage's embedding width
    c.model.depth = 2                 # the first stage's number of blocks
    c.model.head_dim = 32             # kept through growth: a stage has width // head_dim heads (expand grows heads,
                                      # not head_dim, which would change attention's 1/sqrt(d))
    c.model.mlp_ratio = 4             # the MLP's hidden width is mlp_ratio x width
    c.model.dropout = 0.0
    c.model.dtype = 'float32'         # compute dtype: 'float32' or 'bfloat16' (params stay float32)

    c.growth = ml_collections.ConfigDict()
    c.growth.at = (0.5,)              # fractions of train.steps after which the model grows (one stage each; () none)
    c.growth.width = (128,)           # the width after each growth (a multiple of the width before: units duplicate)
    c.growth.depth = (4,)             # the number of blocks after each growth
    c.growth.new_layers = 'zero'      # 'zero': new blocks start as the identity (function-preserving), their
                                      # growth.zero modules at zero; 'stack': copies of the small blocks (G_stack)
    c.growth.zero = ''                # regex of the modules of a new block that start at zero (its residual branches'
                                      # last layers); the family sets it
    c.growth.noise = 0.1              # symmetry-breaking noise of the weight splits, relative (0: exact halves, whose
                                      # copies then stay twins forever)
    c.growth.opt_state = 'map'        # the grown optimiser state: 'map' (the state the duplicated network would hold)
                                      # or 'reset' (fresh moments)
    c.growth.lr = 'continue'          # learning rate after a growth: 'continue' the schedule, or 'rewarm' it
                                      # linearly from 0 over growth.rewarm_steps
    c.growth.rewarm_steps = 20
    c.growth.check = True             # check the grown model computes the small one's function (where claimed)

    c.data = ml_collections.ConfigDict()
    c.data.data_dir = os.path.join(DEFAULT_CACHE, 'tensorflow_datasets')  # TFDS data_dir of the built-in corpus
    c.data.seq_len = 128              # bytes per example (the model's max_len)
    c.data.max_bytes = 0              # cap on every split's bytes (0: the whole corpus; a small copy for tests)
    c.data.eval_examples = 256        # validation examples of every evaluation, the first of the split (0: all)

    c.train = ml_collections.ConfigDict()
    c.train.steps = 400
    c.train.batch_size = 32           # global, over all devices and processes
    c.train.learning_rate = 3e-3      # AdamW's peak rate
    c.train.warmup_steps = 40         # linear warm-up from 0
    c.train.final_lr_fraction = 0.1   # cosine decay to this fraction of the peak at train.steps
    c.train.weight_decay = 0.1        # decoupled, on kernels only
    c.train.beta1 = 0.9
    c.train.beta2 = 0.95
    c.train.grad_clip = 1.0           # global gradient norm clip (0: none)
    c.train.log_every = 20
    c.train.eval_every = 100
    c.train.checkpoint_every = 100    # and after every growth
    c.train.eval_batch_size = 64
    c.train.max_to_keep = 2
    c.train.progress = True           # a progress bar on stderr

    c.multihost = False               # call jax.distributed.initialize() (pods, multi-process)
    c.distributed = ml_collections.ConfigDict()  # explicit multi-process set-up; empty = auto-detect
    c.distributed.coordinator_address = ''
    c.distributed.num_processes = 0
    c.distributed.process_id = -1
    return c


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the key for values no run can use."""
    if 'at' not in config.growth:
        raise ConfigError(f'config.model.name={config.model.name!r} is trained by the LM job (growjax.lm_train), whose '
                          'config this is not: start from configs/lm_grow.py.')

    def need(condition, key, message):
        if not condition:
            raise ConfigError(f'config.{key}: {message}')

    m, g, t = config.model, config.growth, config.train
    need(m.name in models.names(), 'model.name', f'{m.name!r} is not one of {models.names()}.')
    for key in ('width', 'depth', 'head_dim', 'mlp_ratio'):
        need(m[key] > 0, f'model.{key}', f'must be positive, got {m[key]}.')
    need(m.width % m.head_dim == 0, 'model.width', f'{m.width} is not a multiple of model.head_dim={m.head_dim}.')
    need(m.dtype in ('float32', 'bfloat16'), 'model.dtype', f"must be 'float32' or 'bfloat16', got {m.dtype!r}.")
    need(0 <= m.dropout < 1, 'model.dropout', f'must be in [0, 1), got {m.dropout}.')
    fractions = tuple(g.at)
    need(all(0 < f < 1 for f in fractions) and list(fractions) == sorted(set(fractions)), 'growth.at',
         f'must be increasing fractions in (0, 1), got {fractions}.')
    for key in ('width', 'depth'):
        need(len(g[key]) == len(fractions), f'growth.{key}', f'needs one entry per growth.at ({len(fractions)}), '
             f'got {tuple(g[key])}.')
    growth_steps = [round(f * t.steps) for f in fractions]
    need(all(0 < s < t.steps for s in growth_steps) and len(set(growth_steps)) == len(growth_steps), 'growth.at',
         f'{fractions} of train.steps={t.steps} gives growth steps {growth_steps}: each must be a distinct step '
         'inside the run.')
    before = (m.width, m.depth)
    for i, (width, depth) in enumerate(zip(g.width, g.depth)):
        need(width % before[0] == 0 and width >= before[0] and width % m.head_dim == 0, 'growth.width',
             f'entry {i} is {width}: it must be a multiple of the width before it ({before[0]}) and of '
             f'model.head_dim={m.head_dim}.')
        need(depth >= before[1] and (width, depth) != before, 'growth.depth',
             f'entry {i}: {width}x{depth} does not grow {before[0]}x{before[1]}.')
        before = (width, depth)
    need(g.new_layers in NEW_LAYERS, 'growth.new_layers', f'must be one of {NEW_LAYERS}, got {g.new_layers!r}.')
    need(g.new_layers != 'zero' or g.zero or not g.at, 'growth.zero',
         "is empty, so new blocks would not start as the identity: set it (the family's config does) or "
         "growth.new_layers='stack'.")
    need(g.noise >= 0, 'growth.noise', f'must be >= 0, got {g.noise}.')
    need(g.opt_state in OPT_STATE_RULES, 'growth.opt_state', f'must be one of {OPT_STATE_RULES}, got {g.opt_state!r}.')
    need(g.lr in LR_AFTER_GROWTH, 'growth.lr', f'must be one of {LR_AFTER_GROWTH}, got {g.lr!r}.')
    need(g.rewarm_steps > 0, 'growth.rewarm_steps', f'must be positive, got {g.rewarm_steps}.')
    need(config.data.seq_len > 0, 'data.seq_len', f'must be positive, got {config.data.seq_len}.')
    need(config.data.max_bytes >= 0, 'data.max_bytes', f'must be >= 0 (0: no cap), got {config.data.max_bytes}.')
    need(config.data.eval_examples >= 0, 'data.eval_examples', f'must be >= 0 (0: all), got '
         f'{config.data.eval_examples}.')
    for key in ('steps', 'batch_size', 'log_every', 'eval_every', 'checkpoint_every', 'eval_batch_size', 'max_to_keep',
                'learning_rate'):
        need(t[key] > 0, f'train.{key}', f'must be positive, got {t[key]}.')
    need(0 <= t.warmup_steps < t.steps, 'train.warmup_steps', f'must be in [0, train.steps), got {t.warmup_steps}.')
    need(0 <= t.final_lr_fraction <= 1, 'train.final_lr_fraction', f'must be in [0, 1], got {t.final_lr_fraction}.')
    need(t.weight_decay >= 0, 'train.weight_decay', f'must be >= 0, got {t.weight_decay}.')
    need(t.grad_clip >= 0, 'train.grad_clip', f'must be >= 0 (0: none), got {t.grad_clip}.')
    for key in ('beta1', 'beta2'):
        need(0 <= t[key] < 1, f'train.{key}', f'must be in [0, 1), got {t[key]}.')


# ---------------------------------------------------------------------------------------------
# Stages: the model's sizes between growths


@dataclasses.dataclass(frozen=True)
class Stage:
    """One size of the model and the steps it trains: (start, end]."""
    index: int
    width: int
    depth: int
    start: int
    end: int

    def describe(self) -> str:
        return f'{self.width}x{self.depth}'


def stages(config: ml_collections.ConfigDict) -> list[Stage]:
    """The model's sizes in order; stage i trains steps (start, end], each growth happens after its end."""
    growth_steps = [round(f * config.train.steps) for f in config.growth.at]
    bounds = [0, *growth_steps, config.train.steps]
    sizes = [(config.model.width, config.model.depth), *zip(config.growth.width, config.growth.depth)]
    return [Stage(i, width, depth, bounds[i], bounds[i + 1]) for i, (width, depth) in enumerate(sizes)]


def stage_of_checkpoint(all_stages: Sequence[Stage], step: int) -> Stage:
    """The stage whose model a checkpoint at `step` holds: the one that trains step + 1 (a growth
    after step g is saved at g)."""
    return next(stage for stage in all_stages if stage.start <= step < stage.end or stage is all_stages[-1])


def build_model(config: ml_collections.ConfigDict, stage: Stage):
    m = config.model
    return models.get(m.name, num_classes=text.VOCAB_SIZE, width=stage.width, depth=stage.depth,
                      num_heads=stage.width // m.head_dim, mlp_dim=m.mlp_ratio * stage.width,
                      max_len=config.data.seq_len, dropout=m.dropout,
                      dtype=jnp.bfloat16 if m.dtype == 'bfloat16' else None)


def parameter_count(model, seq_len: int) -> int:
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, seq_len), jnp.int32))
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(shapes['params']))


# ---------------------------------------------------------------------------------------------
# Optimiser and steps


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Warm-up then cosine decay over the whole run; under growth.lr='rewarm', times a linear ramp
    from 0 over growth.rewarm_steps after each growth. A function of the update count only, so it is
    the same for every stage and continues through growth (the count is kept)."""
    t = config.train
    base = optax.warmup_cosine_decay_schedule(0.0, t.learning_rate, t.warmup_steps, t.steps,
                                              end_value=t.learning_rate * t.final_lr_fraction)
    growth_steps = [stage.start for stage in stages(config)[1:]]
    if config.growth.lr == 'continue' or not growth_steps:
        return base
    starts = jnp.asarray(growth_steps)
    ramp = config.growth.rewarm_steps

    def schedule(count):
        last = jnp.max(jnp.where(starts <= count, starts, -ramp))  # the latest growth at or before this update
        return base(count) * jnp.clip((count - last + 1) / ramp, 0.0, 1.0)

    return schedule


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW (decay on kernels only, as growjax.steps), after a global-norm clip; one for every stage."""
    t = config.train
    adamw = optax.adamw(learning_rate_schedule(config), b1=t.beta1, b2=t.beta2, weight_decay=t.weight_decay,
                        mask=steps.decay_mask)
    return optax.chain(optax.clip_by_global_norm(t.grad_clip), adamw) if t.grad_clip else adamw


def make_train_step(model, optimizer: optax.GradientTransformation, dropout_rng: jax.Array) -> Callable:
    """(state, batch) -> (state, {'loss', 'accuracy'}): next-byte cross-entropy, one optimiser update."""

    def loss_fn(params, batch, rng):
        logits = model.apply({'params': params}, batch['inputs'], train=True, rngs={'dropout': rng})
        return lm.next_token_cross_entropy(logits, batch['targets']), logits

    def train_step(state: steps.TrainState, batch) -> tuple[steps.TrainState, dict]:
        rng = jax.random.fold_in(dropout_rng, state.step)
        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable, batch, rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch['targets'])
        return state.replace(step=state.step + 1, trainable=optax.apply_updates(state.trainable, updates),
                             opt_state=opt_state), {'loss': loss, 'accuracy': accuracy}

    return train_step


def make_eval_step(model) -> Callable:
    """(state, batch) -> summed next-byte loss and the number of real bytes (padding masked out)."""

    def eval_step(state: steps.TrainState, batch) -> dict:
        logits = model.apply({'params': state.trainable}, batch['inputs'], train=False)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch['targets'])
        weights = jnp.broadcast_to(batch['mask'][:, None], losses.shape)
        return {'loss_sum': (losses * weights).sum(), 'count': weights.sum()}

    return eval_step


def new_state(model, optimizer, rng: jax.Array, seq_len: int) -> steps.TrainState:
    """A fresh state: every parameter trains (nothing frozen, no batch statistics)."""
    params = model.init(rng, jnp.zeros((1, seq_len), jnp.int32))['params']
    return steps.TrainState(step=jnp.zeros((), jnp.int32), trainable=params, frozen={}, batch_stats={},
                            opt_state=optimizer.init(params))


def abstract_state(model, optimizer, seq_len: int, sharding=None):
    """The state's shapes (with `sharding`), as a checkpoint restore needs them."""
    shapes = jax.eval_shape(lambda key: new_state(model, optimizer, key, seq_len), jax.random.key(0))
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


def train_step_flops(model, optimizer, config: ml_collections.ConfigDict) -> float:
    """FLOPs of one train step on a global batch: XLA's cost analysis of the step compiled for one
    device (so the count does not depend on how the batch is split)."""
    batch = {key: jax.ShapeDtypeStruct((config.train.batch_size, config.data.seq_len), jnp.int32)
             for key in ('inputs', 'targets')}
    step = make_train_step(model, optimizer, jax.random.key(0))
    cost = jax.jit(step).lower(abstract_state(model, optimizer, config.data.seq_len), batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost['flops'])


def cumulative_flops(all_stages: Sequence[Stage], flops: Sequence[float], step: int) -> float:
    """Training FLOPs of steps 1..step: each step at its stage's per-step count."""
    return sum(f * max(0, min(step, s.end) - s.start) for s, f in zip(all_stages, flops))


# ---------------------------------------------------------------------------------------------
# Growth


def growth_plan(config, small, big, sample: jax.Array):
    """How `big`'s leaves come from `small`'s: new blocks from the big init with `growth.zero` at zero
    (identities), or, with growth.new_layers='stack', copies of small blocks as they are (G_stack;
    zeroing their residual outputs would make the copies identities too)."""
    g = config.growth
    zero = (g.zero or None) if g.new_layers == 'zero' else None
    return expansion_plan(small, big, sample, zero=zero, depth=g.new_layers)


def grow(config, state: steps.TrainState, small, big, stage: Stage, sample: jax.Array, replicated
         ) -> steps.TrainState:
    """The state of `big` grown from that of `small` (parameters and optimiser state), under jit with
    the state's replicated sharding, so the grown state lies on the mesh as the old one did."""
    g = config.growth
    plan = growth_plan(config, small, big, sample)
    key = jax.random.fold_in(jax.random.key(config.seed), stage.index)

    def grown(params, opt_state, key):
        big_params = expand({'params': params}, small, big, sample, rng=key, noise=g.noise, check=False,
                                   plan=plan)['params']
        return big_params, expand_opt_state(opt_state, params, big_params, plan, rule=g.opt_state)

    params, opt_state = jax.jit(grown, out_shardings=replicated)(state.trainable, state.opt_state, key)
    if g.check and plan.preserving:
        check_function({'params': state.trainable}, small, {'params': params}, big, sample,
                              fused=plan.fused, guessed=plan.guessed)
    return state.replace(trainable=params, opt_state=opt_state)


# ---------------------------------------------------------------------------------------------
# The run


@dataclasses.dataclass
class Stepper:
    """What trains and evaluates one stage's model (compiled for the mesh)."""
    stage: Stage
    model: Any
    train_step: Callable
    eval_step: Callable


def evaluate(eval_step, state, batches) -> dict[str, float]:
    """Mean next-byte loss (nats) and bits per byte over every real byte of the batches."""
    totals = steps.summed_over(eval_step, state, batches)
    loss = float(totals['loss_sum']) / max(float(totals['count']), 1.0)
    return {'loss': loss, 'bits_per_byte': float(lm.bits_per_byte(loss)), 'bytes': int(totals['count'])}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, eval_hooks: Sequence = ()) -> dict[str, Any]:
    """Trains the LM, growing it on schedule; writes metrics.jsonl, curves.png, summary.json; returns the summary.

    Rerunning with the same workdir resumes from its latest checkpoint, in whichever stage it is.
    """
    validate(config)
    if eval_hooks:
        raise ConfigError('eval_hooks (config.train.analysis) are for the fine-tune job; the LM job takes none.')
    if config.multihost:
        initialize_distributed(config.distributed)
    check_batch_sizes(config)
    check_workdir(workdir)
    mesh = steps.data_mesh()
    replicated, batch_sharding = steps.replicated(mesh), steps.batch_sharding(mesh)
    d, t = config.data, config.train
    process = {'process_index': jax.process_index(), 'process_count': jax.process_count()}
    corpus = {'seq_len': d.seq_len, 'max_bytes': d.max_bytes or None}
    train_iter = text.make_lm_train_iterator(text.text_source(d.data_dir, 'train', **corpus),
                                             global_batch_size=t.batch_size, seed=config.seed, **process)
    validation = text.text_source(d.data_dir, 'validation', **corpus)
    eval_indices = range(min(d.eval_examples, len(validation))) if d.eval_examples else None

    def eval_batches():
        return data.device_prefetch(text.make_lm_eval_iterator(
            validation, global_batch_size=t.eval_batch_size, indices=eval_indices, **process), batch_sharding)

    all_stages = stages(config)
    optimizer = make_optimizer(config)
    stage_models = [build_model(config, stage) for stage in all_stages]
    flops = [train_step_flops(model, optimizer, config) for model in stage_models]
    sizes = [parameter_count(model, d.seq_len) for model in stage_models]
    dropout_rng = jax.random.fold_in(jax.random.key(config.seed), 1_000_003)
    sample = jnp.zeros((1, d.seq_len), jnp.int32)

    def stepper(stage: Stage) -> Stepper:
        model = stage_models[stage.index]
        return Stepper(stage, model, steps.shard_train_step(make_train_step(model, optimizer, dropout_rng), mesh),
                       steps.shard_eval_step(make_eval_step(model), mesh))

    os.makedirs(workdir, exist_ok=True)
    manager, restored = checkpoint.restore_latest(
        workdir, t.max_to_keep, lambda step: abstract_state(
            stage_models[stage_of_checkpoint(all_stages, step).index], optimizer, d.seq_len, replicated))
    if restored is None:
        start_step, data_state = 0, None
        state = jax.jit(lambda key: new_state(stage_models[0], optimizer, key, d.seq_len),
                        out_shardings=replicated)(jax.random.key(config.seed))
    else:
        start_step, state, data_state = restored
        log.info('Resumed from the checkpoint at step %d in %s.', start_step, workdir)
    current = stepper(stage_of_checkpoint(all_stages, start_step))
    if data_state is not None:
        train_iter.set_state(data_state)
    writer = MetricsWriter(workdir, resume_step=start_step)
    if start_step == 0:
        writer.write_config(config, dataset=text.text_info(d.data_dir, **corpus).name)
    batches = data.device_prefetch(train_iter, batch_sharding)
    progress = ProgressBar(t.steps, start_step, enabled=t.progress and jax.process_index() == 0,
                           description=os.path.basename(os.path.normpath(workdir)))
    schedule = learning_rate_schedule(config)
    unchecked, window, window_start = [], [], time.perf_counter()
    try:
        for step in range(start_step + 1, t.steps + 1):
            state, metrics = current.train_step(state, next(batches))
            unchecked.append(metrics)
            grow_now = step == current.stage.end and step != t.steps
            log_now = step % t.log_every == 0 or step == t.steps or grow_now
            save_now = step % t.checkpoint_every == 0 or step == t.steps or grow_now
            if log_now or save_now:  # fetching syncs with the device: only here; no state with a NaN is saved
                window += check_finite(jax.device_get(unchecked), first_step=step - len(unchecked) + 1,
                                       workdir=workdir)
                unchecked = []
            if log_now:
                means = {key: float(np.mean([m[key] for m in window])) for key in window[0]}
                bytes_per_second = len(window) * t.batch_size * d.seq_len / (time.perf_counter() - window_start)
                writer.write(step, 'train', {**means, 'bits_per_byte': float(lm.bits_per_byte(means['loss'])),
                                             'flops': cumulative_flops(all_stages, flops, step),
                                             'stage': current.stage.index, 'bytes_per_second': bytes_per_second,
                                             'learning_rate': float(schedule(step - 1))})
                progress.update(step, loss=means['loss'], stage=current.stage.index, bytes_s=bytes_per_second)
                window, window_start = [], time.perf_counter()
            if grow_now:
                before = evaluate(current.eval_step, state, eval_batches())
                small, current = current, stepper(all_stages[current.stage.index + 1])
                state = grow(config, state, small.model, current.model, current.stage, sample, replicated)
                after = evaluate(current.eval_step, state, eval_batches())
                writer.write(step, 'growth', {
                    'stage': current.stage.index, 'flops': cumulative_flops(all_stages, flops, step),
                    'width_before': small.stage.width, 'depth_before': small.stage.depth,
                    'params_before': sizes[small.stage.index], 'width_after': current.stage.width,
                    'depth_after': current.stage.depth, 'params_after': sizes[current.stage.index],
                    'loss_before': before['loss'], 'loss_after': after['loss']})
                log.info('Step %d: grew %s -> %s; validation loss %.4f -> %.4f.', step, small.stage.describe(),
                         current.stage.describe(), before['loss'], after['loss'])
            if step % t.eval_every == 0 and step != t.steps:
                writer.write(step, 'validation', {**evaluate(current.eval_step, state, eval_batches()),
                                                  'flops': cumulative_flops(all_stages, flops, step),
                                                  'stage': current.stage.index})
            if save_now:
                checkpoint.save(manager, step, state, batches.get_state())
        manager.wait_until_finished()
        final = evaluate(current.eval_step, state, eval_batches())
        total_flops = cumulative_flops(all_stages, flops, t.steps)
        writer.write(t.steps, 'validation', {**final, 'flops': total_flops, 'stage': current.stage.index})
    finally:
        progress.close()
        batches.close()
        manager.wait_until_finished()  # also on errors: an in-flight save of a good state completes
        manager.close()
        writer.close()
    summary = {'step': t.steps, 'workdir': os.path.abspath(workdir), 'model': config.model.name,
               'stages': [{'width': s.width, 'depth': s.depth, 'params': n, 'steps': s.end - s.start,
                           'flops_per_step': f} for s, n, f in zip(all_stages, sizes, flops)],
               'flops': total_flops, 'validation_loss': final['loss'],
               'validation_bits_per_byte': final['bits_per_byte'], 'validation_bytes': final['bytes']}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, 'summary.json'), 'w') as f:
            json.dump(summary, f, indent=2)
        plot_loss_against_flops(workdir)
    return summary

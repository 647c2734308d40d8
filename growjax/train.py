"""The grow-and-fine-tune job behind `main.py`: data, growth, sharded training, checkpoints, outputs."""
from __future__ import annotations

import dataclasses
import hashlib
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

from growjax import checkpoint, config_lib, data, families, groups, steps
from growjax.grow import GrownModel, grow_params
from growjax.outputs import MetricsWriter, ProgressBar, plot_curves
from growjax.runtime import (  # noqa: F401  (TrainingDiverged: train.TrainingDiverged, as before)
    TrainingDiverged, check_batch_sizes, check_finite, check_workdir, initialize_distributed)

log = logging.getLogger('growjax')


def build_model(config: ml_collections.ConfigDict, num_classes: int):
    """The (grown) model the config describes, built by its family (growjax.families)."""
    return families.build(config, num_classes)


def model_description(config: ml_collections.ConfigDict, num_classes: int) -> dict:
    """What the export's model.json records: enough to rebuild the architecture."""
    return {'name': config.model.name, 'num_classes': num_classes, 'width': config.model.width,
            'dropout_rate': config.model.dropout_rate, 'growth': config.growth.to_dict(),
            'image_size': config.data.image_size, **families.of(config).description(config)}


# ---------------------------------------------------------------------------------------------
# Pretrained weights


# Config keys that do not change what a run computes (the built-in datasets are deterministic, so
# their data_dir does not either); the source model's cache key leaves them out.
UNSHAPING_KEYS = {'train': ('progress', 'log_every', 'eval_every', 'checkpoint_every', 'max_to_keep', 'eval_batch_size',
                            'analysis'),
                  'data': ('data_dir',)}


def builtin_pretrained_dir(config: ml_collections.ConfigDict) -> str:
    """The cache folder of the built-in source model: a hash of everything that shapes it."""
    pretrain = config_lib.pretrain_config(config)
    shaping = {k: pretrain[k].to_dict() for k in ('model', 'growth', 'data', 'train')} | {'seed': pretrain.seed}
    for family in families.FAMILIES:  # e.g. the ViT's settings do not shape a CNN
        family.drop_unshaping(shaping['model'], pretrain.model.name)
    for section, keys in UNSHAPING_KEYS.items():  # how a run is watched or where its data sit: not its result
        for key in keys:
            shaping[section].pop(key, None)
    key = json.dumps(shaping, sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return os.path.join(config.init.cache_dir, 'pretrained', f'{config.model.name}_latin_{digest}')


def load_pretrained(config: ml_collections.ConfigDict, sharding: jax.sharding.Sharding | None = None) -> dict | None:
    """Pretrained variables for the config (None: train from scratch).

    'builtin' pretrains the plain model on the source task the first time and caches it (later
    runs reuse it); a file of published weights (.pth/.pt/.bin/.safetensors, big_vision's .npz: the
    suffixes the model's family reads) is converted by the family's loader (growjax.pretrained),
    placed leaf by leaf with `sharding` when given (the host then never holds
    the whole converted tree); anything else is the path of a growjax export (a finished run's workdir).
    """
    source = config.init.pretrained
    if not source:
        return None
    family = families.of(config)
    if source != 'builtin' and not os.path.exists(source):
        files = f", or a published weights file ({', '.join(family.weight_suffixes)})" if family.weight_suffixes else ''
        raise config_lib.ConfigError(f"config.init.pretrained: {source} does not exist. Pass 'builtin', the workdir "
                                     f"of a finished growjax run (its export/){files}.")
    if family.weight_suffixes and source.endswith(family.weight_suffixes):
        return family.load_published(config, source, sharding)
    if source == 'builtin':
        workdir = builtin_pretrained_dir(config)
        if not os.path.isdir(os.path.join(workdir, checkpoint.EXPORT_DIR)):
            log.info('Pretraining the built-in source model into %s (cached for later runs).', workdir)
            train_and_evaluate(config_lib.pretrain_config(config), workdir)
        source = workdir
    variables, description = checkpoint.load_export(source)
    trained_size = description.get('image_size')
    if trained_size is not None and trained_size != config.data.image_size:
        raise config_lib.ConfigError(
            f'config.data.image_size={config.data.image_size}, but the pretrained model in {source} was trained on '
            f'{trained_size}x{trained_size} images: set --config.data.image_size={trained_size}.')
    return variables


# ---------------------------------------------------------------------------------------------
# Data


def make_data(config: ml_collections.ConfigDict, mesh):
    """The train iterator (device-prefetched), eval iterator factories and dataset metadata."""
    d = config.data
    meta = data.dataset_info(d.name, d.data_dir, d.image_size)
    train_source = data.load_source(d.name, d.train_split, d.data_dir, d.image_size)
    indices = None
    if d.shots_per_class:
        # The few-shot draw depends on the seed only, so methods compared at one seed see the same examples.
        indices = data.few_shot_indices(data.read_labels(train_source), d.shots_per_class, seed=config.seed)
    process = {'process_index': jax.process_index(), 'process_count': jax.process_count()}
    normalise = {'image_size': d.image_size, 'mean': d.mean, 'std': d.std}
    train_iter = data.make_train_iterator(
        train_source, global_batch_size=config.train.batch_size, seed=config.seed, crop_padding=d.crop_padding,
        flip=d.flip, indices=indices, **normalise, **process)

    def eval_batches(split: str):
        source = data.load_source(d.name, split, d.data_dir, d.image_size)
        iterator = data.make_eval_iterator(source, global_batch_size=config.train.eval_batch_size, **normalise,
                                           **process)
        return data.device_prefetch(iterator, steps.batch_sharding(mesh))

    image_shape = (d.image_size, d.image_size, meta.image_shape[-1])
    return meta, train_iter, eval_batches, image_shape, 0 if indices is None else len(indices)


# ---------------------------------------------------------------------------------------------
# The run


def evaluate(eval_step, state, batches) -> dict[str, float]:
    """Exact loss and accuracy over a split (padding masked out)."""
    totals = steps.summed_over(eval_step, state, batches)
    count = max(float(totals['count']), 1.0)
    return {'loss': float(totals['loss_sum']) / count, 'accuracy': float(totals['correct']) / count,
            'examples': int(totals['count'])}


def init_state(config, model, pretrained, mesh, image_shape):
    """Grown (or fresh) variables, regime mask and optimiser, placed replicated on the mesh."""
    rng = jax.random.key(config.seed)
    init_rng, dropout_rng = jax.random.split(rng)
    sample = jnp.zeros((1, *image_shape), jnp.float32)
    replicated = steps.replicated(mesh)
    if pretrained is None:
        variables = jax.jit(model.init, out_shardings=replicated)(init_rng, sample)
    else:
        pretrained = jax.device_put(pretrained, replicated)  # wherever it was loaded, onto this mesh
        variables = jax.jit(
            lambda p, key: grow_params(p, model, key, sample, reinit=tuple(config.init.reinit), check=False,
                                       preserve_function=config.init.preserve_function),
            out_shardings=replicated)(pretrained, init_rng)
        if isinstance(model, GrownModel):  # what grow_params checks when it is not under jit, as here
            model.check_growth(variables, sample)
    try:
        param_groups = groups.param_groups(model, None if pretrained is None else pretrained['params'],
                                           config.train.regime, sample, reinit=tuple(config.init.reinit))
    except ValueError as err:
        raise config_lib.ConfigError(f'config.train.regime: {err}') from None
    optimizer = steps.make_optimizer(param_groups.trainable_labels, learning_rate=learning_rate_schedule(config),
                                     momentum=config.train.momentum, weight_decay=config.train.weight_decay,
                                     new_lr_multiplier=config.train.new_lr_multiplier, kind=config.train.optimizer)
    mask = param_groups.mask
    state = jax.jit(lambda v: steps.create_state(v, mask, optimizer), out_shardings=replicated)(variables)
    log.info('Parameters (layer, group, trains?, count):\n%s',
             groups.describe(param_groups.labels, mask, variables['params']))
    return state, optimizer, dropout_rng


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What an evaluation hook may use besides the state."""
    config: ml_collections.ConfigDict
    model: Any
    mesh: Any
    eval_batches: Callable[[str], Any]  # split name -> device-prefetched eval batches
    workdir: str


EvalHook = Callable[[int, steps.TrainState, RunContext], 'dict[str, float] | None']


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       eval_hooks: Sequence[EvalHook] = ()) -> dict[str, Any]:
    """Grows the pretrained model the config names, fine-tunes, evaluates; returns the summary.

    A model family with a job of its own (growjax.families: `Family.job`) runs that instead.

    Rerunning with the same workdir resumes from its latest checkpoint. `eval_hooks` run at step 0,
    at every evaluation during training and after the final one (e.g. `growjax.analysis.hooks()`,
    which main.py passes for config.train.analysis=True); what they return is written to
    metrics.jsonl with split 'analysis'. Evaluation during training reads the validation split
    only (none without one); the test split is evaluated once, at the end.
    """
    job = families.of(config).job
    if job is not None:  # a family with its own kind of run (the GPT grows during training)
        return job(config, workdir, eval_hooks)
    config_lib.validate(config)
    if config.train.analysis and not eval_hooks:
        raise config_lib.ConfigError('config.train.analysis=True, but no eval_hooks were passed: pass '
                                     'eval_hooks=growjax.analysis.hooks() (main.py does).')
    if not config.data.val_split:
        log.info('config.data.val_split is empty: no evaluation during training; the %s split is evaluated '
                 'once, at the end.', config.data.eval_split)
    if config.multihost:
        initialize_distributed(config.distributed)
    check_batch_sizes(config)
    check_workdir(workdir)
    mesh = steps.data_mesh()
    meta, train_iter, eval_batches, image_shape, train_examples = make_data(config, mesh)
    model = build_model(config, meta.num_classes)
    # Shapes only: a growth spec the model cannot apply fails here, before any pretraining.
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *image_shape)))
    pretrained = load_pretrained(config, steps.replicated(mesh))
    state, optimizer, dropout_rng = init_state(config, model, pretrained, mesh, image_shape)
    train_step = steps.shard_train_step(steps.make_train_step(model, optimizer, dropout_rng), mesh)
    eval_step = steps.shard_eval_step(steps.make_eval_step(model), mesh)

    os.makedirs(workdir, exist_ok=True)  # only now: a run that fails its checks leaves no workdir behind
    manager, restored = checkpoint.restore_latest(workdir, config.train.max_to_keep, checkpoint.abstract_like(state))
    start_step = 0
    if restored is not None:
        start_step, state, data_state = restored
        train_iter.set_state(data_state)
        log.info('Resumed from the checkpoint at step %d in %s.', start_step, workdir)
    writer = MetricsWriter(workdir, resume_step=start_step)
    if start_step == 0:
        writer.write_config(config, dataset=meta.name, num_classes=meta.num_classes, train_examples=train_examples)

    context = RunContext(config, model, mesh, eval_batches, workdir)

    def run_hooks(step, state):
        for hook in eval_hooks:
            values = hook(step, state, context)
            if values:
                writer.write(step, 'analysis', values)

    def evaluate_during_training(step, state):
        # Curves (and any choice made from them) see the validation split only; the test split is
        # evaluated once, at the end.
        if config.data.val_split:
            writer.write(step, config.data.val_split, evaluate(eval_step, state, eval_batches(config.data.val_split)))
        run_hooks(step, state)

    try:
        if start_step == 0:
            run_hooks(0, state)
        state = fit(config, workdir, state, train_step, train_iter, start_step, mesh, manager, writer,
                    evaluate_during_training)
        manager.wait_until_finished()
        summary = final_evaluation(config, workdir, writer, eval_step, state, eval_batches)
        run_hooks(config.train.steps, state)
        checkpoint.export(workdir, state.variables(), model_description(config, meta.num_classes))
    finally:
        manager.wait_until_finished()  # also on errors: an in-flight save of a good state completes
        manager.close()
        writer.close()
    if jax.process_index() == 0:
        plot_curves(workdir)
    return summary


def fit(config, workdir, state, train_step, train_iter, start_step, mesh, manager, writer, evaluate_during_training):
    """The training loop from `start_step`: logs, evaluates, checkpoints; returns the final state."""
    schedule = learning_rate_schedule(config)
    batches = data.device_prefetch(train_iter, steps.batch_sharding(mesh))
    progress = ProgressBar(config.train.steps, start_step, enabled=config.train.progress and jax.process_index() == 0,
                           description=os.path.basename(os.path.normpath(workdir)))
    unchecked, window, window_start = [], [], time.perf_counter()
    try:
        for step in range(start_step + 1, config.train.steps + 1):
            state, metrics = train_step(state, next(batches))
            unchecked.append(metrics)
            log_now = step % config.train.log_every == 0 or step == config.train.steps
            save_now = step % config.train.checkpoint_every == 0 or step == config.train.steps
            if log_now or save_now:
                # Fetching syncs with the device, so it happens only here; no state with a NaN is saved.
                window += check_finite(jax.device_get(unchecked), first_step=step - len(unchecked) + 1,
                                       workdir=workdir)
                unchecked = []
            if log_now:
                means = {key: float(np.mean([m[key] for m in window])) for key in window[0]}
                images_per_second = len(window) * config.train.batch_size / (time.perf_counter() - window_start)
                writer.write(step, 'train', {**means, 'images_per_second': images_per_second,
                                             'learning_rate': float(schedule(step))})
                progress.update(step, loss=means['loss'], acc=means['accuracy'], img_s=images_per_second)
                window, window_start = [], time.perf_counter()
            if step % config.train.eval_every == 0 and step != config.train.steps:
                evaluate_during_training(step, state)
            if save_now:
                checkpoint.save(manager, step, state, batches.get_state())
    finally:
        progress.close()
        batches.close()
    return state


def learning_rate_schedule(config) -> optax.Schedule:
    """The paper's step schedule of config.train (the optimiser's, and the one logged)."""
    return steps.step_schedule(config.train.learning_rate, config.train.steps, tuple(config.train.lr_decay_at),
                               warmup_steps=config.train.warmup_steps)


def final_evaluation(config, workdir, writer, eval_step, state, eval_batches) -> dict[str, Any]:
    """Evaluates on the validation and test splits and writes summary.json."""
    step = int(jax.device_get(state.step))
    summary = {'step': step, 'workdir': os.path.abspath(workdir), 'method': config.growth.method,
               'regime': config.train.regime, 'dataset': config.data.name}
    splits = [s for s in (config.data.val_split, config.data.eval_split) if s]
    for split in dict.fromkeys(splits):
        result = evaluate(eval_step, state, eval_batches(split))
        writer.write(step, split, result)
        summary[f'{split}_accuracy'] = result['accuracy']
        summary[f'{split}_loss'] = result['loss']
    summary['accuracy'] = summary[f'{config.data.eval_split}_accuracy']
    if jax.process_index() == 0:
        with open(os.path.join(workdir, 'summary.json'), 'w') as f:
            json.dump(summary, f, indent=2)
    return summary

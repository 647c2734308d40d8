"""Shared config defaults and validation for `main.py` experiments (ml_collections).

Every experiment file under configs/ starts from `base_config()` and changes a few keys; all keys
are documented here, in one place (the keys a model family owns, such as model.vit.*, in its module
under growjax/families/, whose `add_keys` adds them), and `validate` turns bad values into one-line
errors that name the key. Nothing here knows a model family by name: growjax.families does.
"""
from __future__ import annotations

import os

import ml_collections

from growjax import families, methods
from growjax.errors import ConfigError
from growjax.families.base import Family
from growjax.pretrained import IMAGENET_MEAN, IMAGENET_STD
from growjax.runtime import DEFAULT_CACHE
from growjax.steps import OPTIMIZERS

REQUIRED = 'required: '  # an init.pretrained value that asks the user for a path
DEFAULT_REINIT = Family.classifier  # the leaves a new task re-initialises (each family says its own)


def base_config() -> ml_collections.ConfigDict:
    """The defaults: WA-grow of the built-in small CNN, pretrained on Latin letters, on 5-shot Greek."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.name = 'small_cnn'        # growjax.models.get name
    c.model.width = 1.0               # multiplies every layer's size
    c.model.dropout_rate = 0.0
    c.model.dtype = 'float32'         # compute dtype: 'float32' or 'bfloat16' (params stay float32)

    c.growth = ml_collections.ConfigDict()
    c.growth.method = 'wa'            # a growjax.methods name; 'scratch' trains the plain model from random init
    c.growth.units = 256              # S: units added (WA/DWA/WWA: to fc7; DA/DWA: fc_a's width)
    c.growth.norm_scale = True        # the paper's "grow" (True) or "ori" (False)
    c.growth.scale_init = 10.0        # gamma's initial value
    c.growth.widen = ''               # extra 'layer=units,...', e.g. for ResNets 'stage4=128'
    c.growth.deepen = ''              # extra 'layer=size,...' (fc heads: units of fc_a; ResNets: blocks)
    c.growth.lora_rank = 8            # method 'lora': rank of the adapters (CNNs: fc6, fc7; ViT: attention)
    c.growth.blocks = 1               # ViT: how many top blocks grow (wa, heads) or how many blocks DA adds
    c.growth.heads = 2                # ViT, method 'heads': heads added to each grown block

    c.init = ml_collections.ConfigDict()
    c.init.pretrained = 'builtin'     # 'builtin' (pretrain on the source task, cached), a path, or ''
    c.init.reinit = DEFAULT_REINIT    # regexes of pretrained leaves to re-initialise (new task; ViT: '^head/')
    c.init.cache_dir = DEFAULT_CACHE  # where 'builtin' keeps its pretrained source models
    c.init.pretrain_steps = 1200      # training steps of the built-in source model
    c.init.source_dataset = 'growjax_latin'  # the built-in source task it is trained on
    c.init.preserve_function = False

    c.data = ml_collections.ConfigDict()
    c.data.name = 'growjax_greek'     # a TFDS dataset (growjax_* are built offline) or 'image_folder:ROOT'
    c.data.data_dir = os.path.join(DEFAULT_CACHE, 'tensorflow_datasets')  # TFDS data_dir
    c.data.image_size = 16
    c.data.train_split = 'train'     # TFDS split specs: 'train[:90%]', 'train+validation', ...
    c.data.eval_split = 'test'
    c.data.val_split = 'validation'   # '' for none
    c.data.shots_per_class = 5        # few-shot draw from the train split; 0 = use all of it
    c.data.crop_padding = 2
    c.data.flip = False               # letters must not be mirrored
    c.data.mean = (0.0,)              # per channel (or one value), in [0, 1] pixel units
    c.data.std = (1.0,)

    c.train = ml_collections.ConfigDict()
    c.train.regime = 'all'            # 'new', 'fc7_new', 'fc6_new', 'all' (or '<layer>_new')
    c.train.steps = 300
    c.train.batch_size = 32           # global, over all devices and processes
    c.train.learning_rate = 0.01
    c.train.optimizer = 'sgd'         # the paper's SGD with momentum, or 'adamw' (beta1 = momentum)
    c.train.momentum = 0.9
    c.train.weight_decay = 5e-4
    c.train.warmup_steps = 0          # linear warm-up of the learning rate from 0
    c.train.new_lr_multiplier = 10.0  # paper: new layers learn 10x faster
    c.train.lr_decay_at = (0.5, 0.8)  # fractions of training where the learning rate drops 10x
    c.train.log_every = 25
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
    c.train.eval_batch_size = 256
    c.train.max_to_keep = 2
    c.train.progress = True           # a progress bar on stderr
    c.train.analysis = False          # log the paper's analyses (growjax.analysis) at every evaluation

    c.multihost = False               # call jax.distributed.initialize() (pods, multi-process)
    c.distributed = ml_collections.ConfigDict()  # explicit multi-process set-up; empty = auto-detect (TPU pods, SLURM)
    c.distributed.coordinator_address = ''       # e.g. '127.0.0.1:12345'
    c.distributed.num_processes = 0
    c.distributed.process_id = -1
    for family in families.FAMILIES:  # the keys each family owns (model.fc_width, model.vit.*), documented there
        family.add_keys(c)
    return c


def family_config(model_name: str) -> ml_collections.ConfigDict:
    """The base config turned into the default experiment of model `model_name`'s family (e.g. for
    'vit': a 4-block, 64-wide ViT pretrained on the Latin letters, growing S = 128 units)."""
    c = base_config()
    families.get(model_name).defaults(c)
    return c


def pretrain_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The source-task run behind init.pretrained='builtin': the same plain architecture trained
    from scratch on all of the rendered Latin letters."""
    c = base_config()
    c.seed = 0
    c.model = config.model.copy_and_resolve_references()
    c.model.dtype = 'float32'
    c.growth.method = 'scratch'
    c.init.pretrained = ''
    c.data.name = config.init.source_dataset
    c.data.data_dir = config.data.data_dir
    c.data.image_size = config.data.image_size
    c.data.shots_per_class = 0
    c.data.val_split = ''
    c.train.steps = config.init.pretrain_steps
    c.train.batch_size = 128
    c.train.learning_rate = 0.05
    c.train.new_lr_multiplier = 1.0
    families.of(config).pretrain(c, config)  # e.g. a transformer trained from scratch needs Adam and a warm-up
    c.train.eval_every = max(1, config.init.pretrain_steps // 2)
    c.train.checkpoint_every = c.train.eval_every
    c.train.progress = config.train.progress
    c.init.cache_dir = config.init.cache_dir
    return c


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the key for values no run can use."""
    def need(condition, key, message):
        if not condition:
            raise ConfigError(f'config.{key}: {message}')

    need(config.growth.method in methods.METHODS, 'growth.method',
         f'{config.growth.method!r} is not one of {list(methods.METHODS)}.')
    families.check_method(families.of(config), config.growth.method)
    for family in families.FAMILIES:  # each checks the keys it owns, whichever model the config names
        family.validate(config, need)
    need(config.growth.units > 0, 'growth.units', f'must be a positive number of units, got {config.growth.units}.')
    need(config.growth.scale_init > 0, 'growth.scale_init', f'must be positive, got {config.growth.scale_init}.')
    need(config.growth.lora_rank > 0, 'growth.lora_rank', f'must be a positive rank, got {config.growth.lora_rank}.')
    for key in ('blocks', 'heads'):
        need(config.growth[key] > 0, f'growth.{key}', f'must be a positive number, got {config.growth[key]}.')
    need(config.model.dtype in ('float32', 'bfloat16'), 'model.dtype', f"must be 'float32' or 'bfloat16', got {config.model.dtype!r}.")
    need(config.model.width > 0, 'model.width', f'must be positive, got {config.model.width}.')
    need(0 <= config.model.dropout_rate < 1, 'model.dropout_rate', f'must be in [0, 1), got {config.model.dropout_rate}.')
    need(config.data.image_size > 0, 'data.image_size', f'must be positive, got {config.data.image_size}.')
    need(config.data.shots_per_class >= 0, 'data.shots_per_class', f'must be >= 0, got {config.data.shots_per_class}.')
    need(config.data.crop_padding >= 0, 'data.crop_padding', f'must be >= 0, got {config.data.crop_padding}.')
    need(all(s > 0 for s in config.data.std), 'data.std', f'must be positive, got {tuple(config.data.std)}.')
    for key in ('steps', 'batch_size', 'log_every', 'eval_every', 'checkpoint_every', 'eval_batch_size', 'max_to_keep'):
        need(config.train[key] > 0, f'train.{key}', f'must be positive, got {config.train[key]}.')
    for key in ('learning_rate', 'new_lr_multiplier'):
        need(config.train[key] > 0, f'train.{key}', f'must be positive, got {config.train[key]}.')
    need(0 <= config.train.momentum < 1, 'train.momentum', f'must be in [0, 1), got {config.train.momentum}.')
    need(config.train.weight_decay >= 0, 'train.weight_decay', f'must be >= 0, got {config.train.weight_decay}.')
    need(config.train.optimizer in OPTIMIZERS, 'train.optimizer', f'must be one of {OPTIMIZERS}, got '
         f'{config.train.optimizer!r}.')
    need(0 <= config.train.warmup_steps < config.train.steps, 'train.warmup_steps',
         f'must be in [0, train.steps), got {config.train.warmup_steps}.')
    need(all(0 < f < 1 for f in config.train.lr_decay_at), 'train.lr_decay_at',
         f'fractions must be in (0, 1), got {tuple(config.train.lr_decay_at)}.')
    need(not config.init.pretrained.startswith(REQUIRED), 'init.pretrained',
         f'{config.init.pretrained[len(REQUIRED):]}: pass --config.init.pretrained=PATH.')
    method = methods.METHODS[config.growth.method]
    need(method.pretrained or not config.init.pretrained, 'init.pretrained',
         f"growth.method={method.name!r} trains from random init: set init.pretrained='' (or pick another method).")
    need(not method.pretrained or config.init.pretrained, 'init.pretrained',
         f"growth.method={method.name!r} starts from a pretrained model: set init.pretrained to 'builtin' or a path.")


# Real settings of the paper (and today's ResNets). They need data and weights the user has:
# a TFDS data_dir with the dataset prepared, and published ImageNet weights (growjax.pretrained).
PRESET_DATASETS = {'flowers102': 'oxford_flowers102', 'caltech_birds2011': 'caltech_birds2011',
                   'sun397': 'sun397', 'mit67': 'mit67'}
def preset_names() -> list[str]:
    return [f'{model}_{data}' for model in families.published_weights() for data in PRESET_DATASETS]


def apply_preset(config: ml_collections.ConfigDict, preset: str | None) -> ml_collections.ConfigDict:
    """`configs/X.py:<model>_<dataset>`: the paper's real-data setting for that backbone and dataset."""
    if not preset:
        return config
    if preset not in preset_names():
        raise ConfigError(f'Unknown preset {preset!r}; available: {preset_names()}.')
    model, _, dataset = preset.partition('_')
    family = families.get(model)
    config.model.name = model
    config.model.dropout_rate = 0.0
    config.init.reinit = family.classifier
    config.growth.units = 1024
    if methods.METHODS[config.growth.method].pretrained:
        config.init.pretrained = REQUIRED + family.published[model]
    config.data.name = PRESET_DATASETS[dataset]
    config.data.data_dir = os.path.join(os.path.expanduser('~'), 'tensorflow_datasets')
    config.data.image_size = 224
    config.data.shots_per_class = 0
    config.data.crop_padding = 16
    config.data.flip = True
    config.data.mean, config.data.std = IMAGENET_MEAN, IMAGENET_STD
    family.preset(config, model)  # e.g. the ViT's sizes and its weights' [-1, 1] inputs
    config.data.val_split = ''
    config.train.batch_size = 32
    config.train.learning_rate = 0.001  # the paper's fine-tuning rate; new layers at 10x
    config.train.steps = 20000
    config.train.log_every = 50
    config.train.eval_every = 2000
    config.train.checkpoint_every = 1000
    config.train.eval_batch_size = 64
    return config

"""Pretraining on the source task (the built-in rendered Latin letters), from scratch.

`init.pretrained='builtin'` runs exactly this (with the target run's model settings) once and
caches it; run it yourself to inspect the source model or to pretrain a bigger one.

Run: python main.py --config=configs/pretrain.py --workdir=workdirs/pretrain
"""
from growjax import config_lib


def get_config(arg=None):
    if arg:
        raise config_lib.ConfigError('configs/pretrain.py takes no preset: it pretrains on the built-in source task.')
    return config_lib.pretrain_config(config_lib.base_config())

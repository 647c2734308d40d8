"""Training from scratch on the target task: the sanity baseline every growth method must beat.

Run: python main.py --config=configs/scratch.py --workdir=workdirs/scratch
"""
from growjax import config_lib


def get_config(arg=None):
    config = config_lib.base_config()
    config.growth.method = 'scratch'
    config.init.pretrained = ''
    config.train.new_lr_multiplier = 1.0  # every layer is new: one learning rate
    return config_lib.apply_preset(config, arg)

"""DA (the paper's "deeper"): a new layer fc_a of S units on top of fc7.

Run: python main.py --config=configs/deep.py --workdir=workdirs/deep
"""
from growjax import config_lib


def get_config(arg=None):
    config = config_lib.base_config()
    config.growth.method = 'da'
    return config_lib.apply_preset(config, arg)

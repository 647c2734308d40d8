"""DWA: widen fc7 by S units and put fc_a (S units) on top of [fc7, fc7+].

Run: python main.py --config=configs/wide_deep.py --workdir=workdirs/wide_deep
"""
from growjax import config_lib


def get_config(arg=None):
    config = config_lib.base_config()
    config.growth.method = 'dwa'
    return config_lib.apply_preset(config, arg)

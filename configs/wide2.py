"""WWA: widen fc6 by S/2 and fc7 by S units (fc7+ reads [fc6, fc6+]); the paper's best.

Run: python main.py --config=configs/wide2.py --workdir=workdirs/wide2
"""
from growjax import config_lib


def get_config(arg=None):
    config = config_lib.base_config()
    config.growth.method = 'wwa'
    return config_lib.apply_preset(config, arg)

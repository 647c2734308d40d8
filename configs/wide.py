"""WA (the paper's "wider"): widen fc7 by S new units with normalisation and adaptive scaling.

Run: python main.py --config=configs/wide.py --workdir=workdirs/wide
     python main.py --config=configs/wide.py --config.growth.norm_scale=False   # WA "ori"
     python main.py --config=configs/wide.py:vgg16_flowers102 --config.init.pretrained=/path/vgg16.pth
"""
from growjax import config_lib


def get_config(arg=None):
    config = config_lib.base_config()
    config.growth.method = 'wa'
    return config_lib.apply_preset(config, arg)

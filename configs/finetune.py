"""Classic fine-tuning, the baseline: the pretrained network with a new classifier, no growth.

Run: python main.py --config=configs/finetune.py --workdir=workdirs/finetune
"""
from growjax import config_lib


def get_config(arg=None):
    config = config_lib.base_config()
    config.growth.method = 'finetune'
    return config_lib.apply_preset(config, arg)

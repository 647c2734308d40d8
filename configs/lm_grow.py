"""Grow a byte-level GPT during training: 2 blocks x 64 wide, grown to 4 x 128 after half of the
400 steps (growjax.expand, function-preserving), on the Python standard library's source.

Run: python main.py --config=configs/lm_grow.py --workdir=workdirs/lm_grow
     two growths: --config.growth.at='(0.3,0.6)' --config.growth.width='(128,256)' --config.growth.depth='(4,4)'
     re-warm the learning rate after each growth: --config.growth.lr=rewarm
"""
from growjax.errors import ConfigError
from growjax.families import gpt


def get_config(arg=None):
    if arg:
        raise ConfigError('configs/lm_grow.py takes no preset.')
    return gpt.config()

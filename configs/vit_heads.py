"""More attention heads in the top block(s) of a ViT (growjax.methods: 'heads').

Run: python main.py --config=configs/vit_heads.py --workdir=workdirs/vit_heads
"""
from growjax import config_lib


def get_config(arg=None):
    config = config_lib.family_config('vit')
    config.growth.method = 'heads'
    return config_lib.apply_preset(config, arg)

"""DA on a ViT: new encoder block(s) on top, each starting as the identity (growjax.methods: 'da').

Run: python main.py --config=configs/vit_deep.py --workdir=workdirs/vit_deep
"""
from growjax import config_lib


def get_config(arg=None):
    config = config_lib.family_config('vit')
    config.growth.method = 'da'
    return config_lib.apply_preset(config, arg)

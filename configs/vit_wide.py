"""WA on a ViT: the MLP hidden layer of the top block(s) widened by S units, NormScale where old and
new units meet (growjax.methods: 'wa'). The source ViT is pretrained on the built-in Latin letters
(cached); the target is 5-shot Greek.

Run: python main.py --config=configs/vit_wide.py --workdir=workdirs/vit_wide
     python main.py --config=configs/vit_wide.py --config.growth.blocks=2 --config.growth.units=128
     python main.py --config=configs/vit_wide.py:vit_flowers102 --config.init.pretrained=/path/B_16.safetensors
"""
from growjax import config_lib


def get_config(arg=None):
    config = config_lib.family_config('vit')
    config.growth.method = 'wa'
    return config_lib.apply_preset(config, arg)

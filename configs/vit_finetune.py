"""Fine-tuning a ViT, the baseline (use --config.growth.method=lora for LoRA on its attention).

Run: python main.py --config=configs/vit_finetune.py --workdir=workdirs/vit_finetune
     python main.py --config=configs/vit_finetune.py --config.growth.method=lora --config.train.regime=new
"""
from growjax import config_lib


def get_config(arg=None):
    config = config_lib.family_config('vit')
    config.growth.method = 'finetune'
    return config_lib.apply_preset(config, arg)

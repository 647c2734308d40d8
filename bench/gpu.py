"""Images/s and MFU of grown ResNet-50, VGG16 and ViT-B/16 train steps (bfloat16 compute) on the default device.

    python3 -m bench.gpu                                   # accelerator: full size, 224px
    python3 -m bench.gpu --peak_tflops 989                 # e.g. H100 SXM: MFU against its datasheet peak
    python3 -m bench.gpu --tiny                            # CPU smoke run: every model at a tiny size
    python3 -m bench.gpu --models vit_b16_wa,vit_b16_da    # a subset

Models (grown, regime all, SGD with momentum, new leaves at 10x, bfloat16 compute with float32
parameters): `resnet50` (stage4 + 128 channels), `vgg16` (WA: fc7 + 1024 units), `vit_b16_wa`
(ViT-B/16 at 224 px, WA: the MLPs of the top 4 blocks + 768 units each, NormScale at fc2) and
`vit_b16_da` (ViT-B/16, DA: 2 new encoder blocks on top). The ViTs are built as the main job builds
them (config_lib.family_config('vit') with model.vit.variant 'B/16', growth.method, train.build_model).

MFU = XLA cost-analysis FLOPs per step / step time / peak. --peak_tflops 0 measures the peak with
a bf16 matmul (4096^3, or 512^3 with --tiny / --width < 1); give the datasheet value on GPUs
(e.g. H100 SXM dense bf16: 989).

--tiny: ResNet-50 and VGG16 at width 1/8, the ViTs at width 64, MLP 256, 2 heads, 4 blocks (DA adds
2, WA widens the top 2 by 64 units), 32 px, batch 8, 2 repeats of 2 steps: it checks that every
model builds, grows, compiles and steps; its numbers say nothing about an accelerator.
"""
import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from growjax import Growth, config_lib, groups, grow_params, models, steps, train
from bench.timing import matmul_peak

CNN_CASES = {'resnet50': Growth(widen={'stage4': 128}), 'vgg16': Growth.wa(1024)}
# ViT-B/16: (growth.method, growth.blocks, growth.units); --tiny scales them down (TINY_VIT).
VIT_CASES = {'vit_b16_wa': ('wa', 4, 768), 'vit_b16_da': ('da', 2, 0)}
TINY_VIT = {'width': 64, 'depth': 4, 'mlp_dim': 256, 'num_heads': 2, 'blocks': 2, 'units': 64}
MODELS = (*CNN_CASES, *VIT_CASES)


def cnn_setup(name, args):
    """(model, pretrained variables, reinit regex) of a grown CNN."""
    growth = CNN_CASES[name]
    x = jnp.zeros((1, args.size, args.size, 3))
    kw = dict(width=args.width, dtype=jnp.bfloat16)
    pre_model = models.get(name, num_classes=1000, **kw)
    pretrained = jax.jit(pre_model.init)(jax.random.key(0), x)
    if args.width != 1.0:  # scale the growth with the model
        growth = Growth(widen={k: max(1, int(v * args.width)) for k, v in growth.widen})
    return models.get(name, num_classes=100, growth=growth, **kw), pretrained, '^classifier/'


def vit_setup(name, args):
    """(model, pretrained variables, reinit regex) of a grown ViT-B/16, built as train.py builds it."""
    method, blocks, units = VIT_CASES[name]
    config = config_lib.family_config('vit')
    config.model.vit.update(variant='B/16', width=0, depth=0, mlp_dim=0, num_heads=0)  # 0: the variant's sizes
    if args.tiny:
        config.model.vit.update(width=TINY_VIT['width'], depth=TINY_VIT['depth'], mlp_dim=TINY_VIT['mlp_dim'],
                                num_heads=TINY_VIT['num_heads'])
        blocks, units = TINY_VIT['blocks'], TINY_VIT['units'] if units else 0
    config.model.dtype = 'bfloat16'
    config.data.image_size = args.size
    config.growth.method = 'finetune'
    pre_model = train.build_model(config, 1000)
    pretrained = jax.jit(pre_model.init)(jax.random.key(0), jnp.zeros((1, args.size, args.size, 3)))
    config.growth.method, config.growth.blocks = method, blocks
    if units:
        config.growth.units = units
    return train.build_model(config, 100), pretrained, tuple(config.init.reinit)


def bench(name, args):
    model, pretrained, reinit = (vit_setup if name in VIT_CASES else cnn_setup)(name, args)
    x = jnp.zeros((1, args.size, args.size, 3))
    variables = grow_params(pretrained, model, jax.random.key(1), x, reinit=reinit)
    labels = groups.param_labels(variables['params'], pretrained['params'], reinit=reinit)
    del pretrained
    mask = jax.tree.map(lambda _: True, labels)  # regime all
    opt = steps.make_optimizer(groups.split(labels, mask)[0], learning_rate=0.01, momentum=0.9,
                               weight_decay=5e-4, new_lr_multiplier=10.0)
    mesh = steps.data_mesh()
    state = jax.device_put(steps.create_state(variables, mask, opt), steps.replicated(mesh))
    del variables
    step = steps.shard_train_step(steps.make_train_step(model, opt, jax.random.key(2)), mesh)
    rng = np.random.default_rng(0)
    batch = jax.device_put({'image': rng.normal(size=(args.batch, args.size, args.size, 3)).astype(np.float32),
                            'label': rng.integers(0, 100, args.batch).astype(np.int32)}, steps.batch_sharding(mesh))
    compiled = step.lower(state, batch).compile()
    cost = compiled.cost_analysis()
    flops = float((cost[0] if isinstance(cost, (list, tuple)) else cost)['flops'])
    params = sum(leaf.size for leaf in jax.tree.leaves((state.trainable, state.frozen)))
    for _ in range(2):
        state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(args.reps):
        t = time.perf_counter()
        for _ in range(args.iters):
            state, m = compiled(state, batch)
        jax.block_until_ready(m)
        times.append((time.perf_counter() - t) / args.iters)
    return flops, statistics.median(times), params


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--models', default=','.join(MODELS), help=f'from {list(MODELS)}')
    ap.add_argument('--width', type=float, default=1.0, help='CNN width multiplier')
    ap.add_argument('--size', type=int, default=224)
    ap.add_argument('--batch', type=int, default=128)
    ap.add_argument('--reps', type=int, default=5)
    ap.add_argument('--iters', type=int, default=10)
    ap.add_argument('--peak_tflops', type=float, default=0.0)
    ap.add_argument('--tiny', action='store_true', help='CPU smoke run: tiny models, 32 px, batch 8, 2 x 2 steps')
    args = ap.parse_args()
    if args.tiny:
        args.width, args.size, args.batch, args.reps, args.iters = 0.125, 32, 8, 2, 2
    names = args.models.split(',')
    unknown = set(names) - set(MODELS)
    if unknown:
        raise SystemExit(f'--models: unknown {sorted(unknown)}; models: {list(MODELS)}')
    peak = args.peak_tflops * 1e12 or matmul_peak(512 if args.tiny or args.width < 1 else 4096, dtype=jnp.bfloat16)
    print(f'{jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}; bf16 compute, '
          f'{args.size}px, batch {args.batch}, CNN width {args.width}{", tiny ViTs" if args.tiny else ""}; '
          f'peak {peak / 1e12:.2f} TFLOP/s ({"given" if args.peak_tflops else "measured bf16 matmul"})\n')
    print('| model (grown) | params | img/s | ms/step | GFLOP/step | TFLOP/s | MFU |\n|---|---|---|---|---|---|---|')
    for name in names:
        flops, sec, params = bench(name, args)
        print(f'| {name} | {params / 1e6:.1f}M | {args.batch / sec:,.1f} | {sec * 1e3:.1f} | {flops / 1e9:.2f} | '
              f'{flops / sec / 1e12:.3f} | {flops / sec / peak:.1%} |', flush=True)


if __name__ == '__main__':
    main()

"""Images/s and MFU of a grown ResNet-50 and VGG16 train step (bfloat16 compute) on the default device.

    python3 bench/gpu.py                                   # accelerator: full size, 224px
    python3 bench/gpu.py --width 0.125 --size 32 --batch 8 --peak_tflops 0   # CPU smoke run

MFU = XLA cost-analysis FLOPs per step / step time / peak. --peak_tflops 0 measures the peak with
a bf16 matmul (4096^3, or 512^3 with --width < 1); give the datasheet value on GPUs
(e.g. H100 SXM dense bf16: 989).
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from growjax import Growth, groups, grow_params, models, steps  # noqa: E402

CASES = {'resnet50': Growth(widen={'stage4': 128}), 'vgg16': Growth.wa(1024)}


def measured_peak(n):
    a = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = []
    for _ in range(5):
        s = time.perf_counter()
        f(a).block_until_ready()
        t.append(time.perf_counter() - s)
    return 2 * n ** 3 / min(t)


def bench(name, growth, args):
    x = jnp.zeros((1, args.size, args.size, 3))
    kw = dict(width=args.width, dtype=jnp.bfloat16)
    pre_model = models.get(name, num_classes=1000, **kw)
    pretrained = jax.jit(pre_model.init)(jax.random.key(0), x)
    if args.width != 1.0:  # scale the growth with the model
        growth = Growth(widen={k: max(1, int(v * args.width)) for k, v in growth.widen})
    model = models.get(name, num_classes=100, growth=growth, **kw)
    variables = grow_params(pretrained, model, jax.random.key(1), x, reinit='^classifier/')
    labels = groups.param_labels(variables['params'], pretrained['params'], reinit='^classifier/')
    mask = groups.trainable_mask(labels, 'all', groups.forward_order(pre_model, jax.random.key(0), x))
    opt = steps.make_optimizer(groups.split(labels, mask)[0], learning_rate=0.01, momentum=0.9,
                               weight_decay=5e-4, new_lr_multiplier=10.0)
    state = steps.create_state(variables, mask, opt)
    step = steps.shard_train_step(steps.make_train_step(model, opt, jax.random.key(2)), steps.data_mesh())
    rng = np.random.default_rng(0)
    batch = {'image': jnp.asarray(rng.normal(size=(args.batch, args.size, args.size, 3)), jnp.float32),
             'label': jnp.asarray(rng.integers(0, 100, args.batch), jnp.int32)}
    cost = step.lower(state, batch).compile().cost_analysis()
    flops = float((cost[0] if isinstance(cost, (list, tuple)) else cost)['flops'])
    for _ in range(2):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(args.reps):
        t = time.perf_counter()
        for _ in range(args.iters):
            state, m = step(state, batch)
        jax.block_until_ready(m)
        times.append((time.perf_counter() - t) / args.iters)
    return flops, statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--width', type=float, default=1.0)
    ap.add_argument('--size', type=int, default=224)
    ap.add_argument('--batch', type=int, default=128)
    ap.add_argument('--reps', type=int, default=5)
    ap.add_argument('--iters', type=int, default=10)
    ap.add_argument('--peak_tflops', type=float, default=0.0)
    args = ap.parse_args()
    peak = args.peak_tflops * 1e12 or measured_peak(4096 if args.width >= 1 else 512)
    print(f'{jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}; bf16 compute, '
          f'{args.size}px, batch {args.batch}, width {args.width}; peak {peak / 1e12:.2f} TFLOP/s\n')
    print('| model (grown) | img/s | ms/step | GFLOP/step | TFLOP/s | MFU |\n|---|---|---|---|---|---|')
    for name, growth in CASES.items():
        flops, sec = bench(name, growth, args)
        print(f'| {name} | {args.batch / sec:,.1f} | {sec * 1e3:.1f} | {flops / 1e9:.2f} | {flops / sec / 1e12:.3f} | '
              f'{flops / sec / peak:.1%} |')


if __name__ == '__main__':
    main()

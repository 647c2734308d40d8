"""Train-step cost of grown models vs plain fine-tuning, and of frozen regimes vs forward-only.

    python3 -m bench.step_cost [--reps 5] [--batch 128]

Prints markdown tables: images/s (median of interleaved repeats), XLA cost-analysis FLOPs, the
time ratio vs the FLOP ratio (grown / plain fine-tuning), achieved FLOP/s and MFU against a
large f32 matmul timed in the same process.

Ratios are paired (bench/timing.py): in every repeat each variant runs right after the others, the ratio to the
baseline is taken within that repeat, and the table gives the median ratio and its interquartile
range over repeats (slow drifts of a shared machine's load cancel within a repeat). Besides wall
time, the process CPU time (all threads) is reported: it does not count time spent descheduled by
other jobs, so its ratio is the steadier one on a loaded machine.
"""
import argparse

import jax
import jax.numpy as jnp
import numpy as np

from growjax import Growth, groups, grow_params, models, steps
from bench.timing import Timed, fmt, matmul_peak, measure, paired

CASES = {  # backbone: (model name, width, image size)
    'small_cnn w1 16px': ('small_cnn', 1.0, 16),
    'vgg16 w1/8 32px': ('vgg16', 0.125, 32),
}
UNITS = {'small_cnn': 256, 'vgg16': 128}  # S: config default for small_cnn; VGG's 1024 scaled by 1/8
METHODS = ('finetune', 'wa', 'da', 'wwa')


def flops_of(jitted, *args):
    cost = jitted.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost['flops'])


class Step(Timed):
    """One jitted train step (or forward pass) with its own state, timed n iterations at a time."""

    def __init__(self, name, width, size, method, regime, batch, forward_only=False):
        super().__init__()
        x = jnp.zeros((1, size, size, 1))
        pre_model = models.get(name, num_classes=52, width=width)
        pretrained = pre_model.init(jax.random.key(0), x)
        units = UNITS[name]
        growth = None if method == 'finetune' else getattr(Growth, method)(units)
        model = models.get(name, num_classes=24, width=width, growth=growth)
        variables = grow_params(pretrained, model, jax.random.key(1), x, reinit='^classifier/')
        labels = groups.param_labels(variables['params'], pretrained['params'], reinit='^classifier/')
        mask = groups.trainable_mask(labels, regime, groups.forward_order(pre_model, jax.random.key(0), x))
        trainable_labels, _ = groups.split(labels, mask)
        opt = steps.make_optimizer(trainable_labels, learning_rate=0.01, momentum=0.9, weight_decay=5e-4,
                                   new_lr_multiplier=10.0)
        rng = np.random.default_rng(0)
        self.batch = {'image': jnp.asarray(rng.normal(size=(batch, size, size, 1)), jnp.float32),
                      'label': jnp.asarray(rng.integers(0, 24, batch), jnp.int32)}
        self.images = batch
        self.forward_only = forward_only
        if forward_only:
            self.variables = variables
            self.fn = jax.jit(lambda v, img: model.apply(v, img, train=False))
            self.flops = flops_of(self.fn, variables, self.batch['image'])
        else:
            mesh = steps.data_mesh(jax.devices()[:1])
            self.state = steps.create_state(variables, mask, opt)
            self.fn = steps.shard_train_step(steps.make_train_step(model, opt, jax.random.key(2)), mesh)
            self.flops = flops_of(self.fn, self.state, self.batch)
        self.run(2)  # compile + warm up

    def step(self):
        if self.forward_only:
            return self.fn(self.variables, self.batch['image'])
        self.state, out = self.fn(self.state, self.batch)
        return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--reps', type=int, default=5)
    ap.add_argument('--batch', type=int, default=128)
    ap.add_argument('--iters', type=int, default=10)
    args = ap.parse_args()
    peak = matmul_peak()
    print(f'jax {jax.__version__}, backend {jax.default_backend()}, batch {args.batch}, '
          f'{args.reps} interleaved repeats of {args.iters} steps (median); '
          f'measured f32 matmul peak (2048^3): {peak / 1e9:.1f} GFLOP/s\n')

    print('## Grown vs plain fine-tuning (regime all)\n')
    print('Ratios: median [quartiles] over repeats of the paired ratio to fine-tuning; time/FLOP uses the medians.\n')
    print('| backbone | method | img/s | ms/step | GFLOP/step | FLOP ratio | wall-time ratio | CPU-time ratio '
          '| wall time/FLOP | CPU time/FLOP | GFLOP/s | MFU |')
    print('|---|---|---|---|---|---|---|---|---|---|---|---|')
    for case, (name, width, size) in CASES.items():
        ss = {m: Step(name, width, size, m, 'all', args.batch) for m in METHODS}
        measure(ss.values(), args.reps, args.iters)
        base = ss['finetune']
        for m, s in ss.items():
            fr = s.flops / base.flops
            wall, cpu = paired(s, base, cpu=False), paired(s, base, cpu=True)
            print(f'| {case} | {m} | {args.batch / s.seconds:,.0f} | {s.seconds * 1e3:.2f} | {s.flops / 1e9:.3f} | '
                  f'{fr:.3f} | {fmt(wall)} | {fmt(cpu)} | {wall[0] / fr:.3f} | {cpu[0] / fr:.3f} | '
                  f'{s.flops / s.seconds / 1e9:.1f} | {s.flops / s.seconds / peak:.1%} |')

    print('\n## Frozen regimes vs forward-only (WA grown, NormScale)\n')
    print('| backbone | regime | img/s | ms/step | GFLOP/step | wall time / forward | CPU time / forward '
          '| FLOPs / forward | MFU |')
    print('|---|---|---|---|---|---|---|---|---|')
    for case, (name, width, size) in CASES.items():
        ss = {'forward-only': Step(name, width, size, 'wa', 'all', args.batch, forward_only=True)}
        for regime in ('new', 'fc7_new', 'all'):
            ss[regime] = Step(name, width, size, 'wa', regime, args.batch)
        measure(ss.values(), args.reps, args.iters)
        fwd = ss['forward-only']
        for r, s in ss.items():
            print(f'| {case} | {r} | {args.batch / s.seconds:,.0f} | {s.seconds * 1e3:.2f} | {s.flops / 1e9:.3f} | '
                  f'{fmt(paired(s, fwd, cpu=False))} | {fmt(paired(s, fwd, cpu=True))} | '
                  f'{s.flops / fwd.flops:.3f} | {s.flops / s.seconds / peak:.1%} |')


if __name__ == '__main__':
    main()

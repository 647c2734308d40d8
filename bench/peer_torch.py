"""PyTorch peer: the same fine-tuning train step in torch and in growjax, timed in one process.

    python3 -m bench.peer_torch [--reps 7] [--iters 5] [--batch 128] [--methods finetune,wa]

Models (as in bench/step_cost.py): `small_cnn` width 1 at 16x16x1 and `vgg16` width 1/8 at
32x32x1, fine-tuned from a 52-class source to the 24-class target (the built-in Greek letters),
regime `all`, SGD momentum 0.9, weight decay 5e-4 on kernels only, new layers at 10x the learning
rate, batch 128, float32. `wa` is the grown variant (fc7 + S units, NormScale before the classifier).

The growjax side is growjax's own code: `bench/step_cost.py`'s `Step` (models.get, grow_params,
groups, steps.make_optimizer, steps.make_train_step jitted by steps.shard_train_step). The torch
side is written here with the same layer shapes (asserted: equal parameter counts), NCHW, with
param groups that reproduce the optax chain exactly (decay kernels only, 10x lr on new leaves).

Repeats are interleaved (every variant of both frameworks once per repeat, order reversed on odd
repeats) and ratios are medians over repeats of the paired ratio (time / torch time in the same
repeat), so load from other jobs hits both alike; "best" columns use each row's fastest repeat.

Options: `--threads` (torch intra-op threads, default the core count) and `--torch_threads 1` (also
time torch with other thread counts); `--forward` (also the inference forward pass in both);
`--variants default,eigen_single,fast_math,xnnpack,onednn,dp2` (growjax compiled with XLA
DebugOptions via `lower().compile(compiler_options=...)`, or data parallel over 2 host devices,
which needs `--devices 2`); `--frameworks growjax` (no torch, e.g. a Python 3.12 venv without a CPU
torch wheel); `--baton IN,OUT [--baton_first]` (take turns rep by rep with another process through
two FIFOs, e.g. another jax version); `--json` (per-repeat times).
"""
import argparse
import json
import os
import statistics
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument('--reps', type=int, default=7)
ap.add_argument('--iters', type=int, default=5)
ap.add_argument('--batch', type=int, default=128)
ap.add_argument('--models', default='small_cnn,vgg16')
ap.add_argument('--methods', default='finetune,wa')
ap.add_argument('--threads', type=int, default=os.cpu_count(), help='torch intra-op threads (default: cores)')
ap.add_argument('--devices', type=int, default=1,
                help='host devices (sets --xla_force_host_platform_device_count); needed by the dp2 variant')
ap.add_argument('--variants', default='default',
                help='growjax variants, interleaved in this process: default,eigen_single,fast_math,xnnpack,onednn,dp2')
ap.add_argument('--torch_threads', default='', help='extra torch thread counts to time as well, e.g. 1')
ap.add_argument('--label', default='', help='printed with the table (e.g. the XLA flags tried)')
ap.add_argument('--frameworks', default='growjax,torch',
                help="'growjax' alone where torch is not installed (e.g. a Python 3.12 venv)")
ap.add_argument('--forward', action='store_true',
                help='also time the forward pass alone (inference: eval mode, no gradients) in both')
ap.add_argument('--baton', default='',
                help='IN,OUT named pipes: take turns with another process (e.g. another jax version) rep by rep: '
                     'wait for a byte on IN before each repeat, write one to OUT after it')
ap.add_argument('--baton_first', action='store_true', help='this process runs the first repeat without waiting')
ap.add_argument('--json', default='', help='also write the per-repeat times to this JSON file')
args = ap.parse_args()

if args.devices > 1:
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={args.devices}').strip()

import jax  # noqa: E402
import jaxlib  # noqa: E402
import numpy as np  # noqa: E402
USE_TORCH = 'torch' in args.frameworks.split(',')
if USE_TORCH:
    import torch
    import torch.nn as tnn
    import torch.nn.functional as F
    torch.set_num_threads(args.threads)
else:  # growjax only: the torch classes below are defined but never built
    import types
    torch, F = None, None
    tnn = types.SimpleNamespace(Module=object)

from bench import step_cost  # noqa: E402  (the growjax step, reused as is)
from bench.timing import TorchThreads, TorchTrainStep, paired  # noqa: E402
from growjax import steps  # noqa: E402

CASES = {  # name: (label, width, image size), as bench/step_cost.py
    'small_cnn': ('small_cnn w1 16px', 1.0, 16),
    'vgg16': ('vgg16 w1/8 32px', 0.125, 32),
}
NUM_CLASSES = 24  # the fine-tuning target of step_cost.Step (source: 52 classes)


# ----------------------------------------------------------------------------------------- torch

def _units(base, width):
    return max(1, int(round(base * width)))


class NormScale(tnn.Module):
    """growjax.NormScale: per-group L2 norm over the units, then a learned per-unit scale."""

    def __init__(self, sizes, scale_init=10.0):
        super().__init__()
        self.sizes = list(sizes)
        self.scales = tnn.ParameterList([tnn.Parameter(torch.full((s,), scale_init)) for s in sizes])

    def forward(self, groups):
        return [g * torch.rsqrt(g.square().sum(-1, keepdim=True).clamp_min(1e-12)) * s
                for g, s in zip(groups, self.scales)]


class Head(tnn.Module):
    """fc6 -> ReLU -> dropout -> fc7 -> ReLU -> dropout -> classifier; WA adds fc7_plus (fed by fc6)
    and NormScale on [fc7, fc7_plus] before the classifier, whose new fan-in has no bias."""

    def __init__(self, features, fc6, fc7, dropout, wa_units=0):
        super().__init__()
        self.fc6, self.fc7 = tnn.Linear(features, fc6), tnn.Linear(fc6, fc7)
        self.drop = tnn.Dropout(dropout) if dropout else tnn.Identity()
        self.classifier = tnn.Linear(fc7, NUM_CLASSES)
        self.wa = wa_units > 0
        if self.wa:
            self.fc7_plus = tnn.Linear(fc6, wa_units)
            self.norm = NormScale([fc7, wa_units])
            self.classifier_from_plus = tnn.Linear(wa_units, NUM_CLASSES, bias=False)

    def new_modules(self):
        return [self.classifier] + ([self.fc7_plus, self.norm, self.classifier_from_plus] if self.wa else [])

    def forward(self, x):
        h6 = self.drop(F.relu(self.fc6(x)))
        h7 = self.drop(F.relu(self.fc7(h6)))
        if not self.wa:
            return self.classifier(h7)
        h7p = self.drop(F.relu(self.fc7_plus(h6)))
        a, b = self.norm([h7, h7p])
        return self.classifier(a) + self.classifier_from_plus(b)


class TorchSmallCNN(tnn.Module):
    """growjax small_cnn: conv1 (3x3 SAME) -> ReLU -> pool -> conv2 -> ReLU -> pool -> head."""

    def __init__(self, width, size, wa_units=0):
        super().__init__()
        c1, c2 = _units(32, width), _units(64, width)
        self.conv1, self.conv2 = tnn.Conv2d(1, c1, 3, padding=1), tnn.Conv2d(c1, c2, 3, padding=1)
        side = size
        self.pool = []
        for _ in range(2):  # growjax skips a pool once the map is 2x2 or smaller
            self.pool.append(side > 2)
            side = side // 2 if side > 2 else side
        self.head = Head(c2 * side * side, _units(256, width), _units(256, width), 0.0, wa_units)

    def forward(self, x):
        for conv, pool in zip((self.conv1, self.conv2), self.pool):
            x = F.relu(conv(x))
            if pool:
                x = F.max_pool2d(x, 2)
        return self.head(torch.flatten(x, 1))


class TorchVGG16(tnn.Module):
    """torchvision vgg16 (configuration D, no BN) at `width`, 1 input channel, avg pool 7x7, head."""

    def __init__(self, width, wa_units=0):
        super().__init__()
        layers, cin = [], 1
        for channels, convs in ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)):
            for _ in range(convs):
                layers += [tnn.Conv2d(cin, _units(channels, width), 3, padding=1), tnn.ReLU(inplace=True)]
                cin = _units(channels, width)
            layers.append(tnn.MaxPool2d(2, 2))
        self.features = tnn.Sequential(*layers)
        self.avgpool = tnn.AdaptiveAvgPool2d((7, 7))
        self.head = Head(cin * 49, _units(4096, width), _units(4096, width), 0.5, wa_units)

    def forward(self, x):
        return self.head(torch.flatten(self.avgpool(self.features(x)), 1))


class TorchStep(TorchTrainStep):
    """The PyTorch twin's step (bench/timing.py's TorchTrainStep): weight decay on kernels only (as
    steps.decay_mask; biases and NormScale scales not), the head's new modules at 10x."""

    def __init__(self, name, method, batch_np, forward_only=False):
        _, width, size = CASES[name]
        wa = step_cost.UNITS[name] if method == 'wa' else 0
        torch.manual_seed(0)
        model = TorchSmallCNN(width, size, wa) if name == 'small_cnn' else TorchVGG16(width, wa)
        new = {id(p) for m in model.head.new_modules() for p in m.parameters()}
        super().__init__(model, batch_np, forward_only=forward_only, decays=lambda name, p: p.dim() > 1,
                         new=lambda name, p: id(p) in new)


# ------------------------------------------------------------------------------------------ jax

class JaxStep(step_cost.Step):
    """step_cost.Step (growjax's own train step), optionally compiled with XLA debug options or run
    data-parallel over several host devices (growjax's mesh over `devices` CPU devices)."""

    def __init__(self, name, method, batch, devices=1, compiler_options=None, forward_only=False):
        _, width, size = CASES[name]
        real = steps.data_mesh
        if devices > 1:
            steps.data_mesh = lambda _devices=None: real(jax.devices()[:devices])
        try:
            super().__init__(name, width, size, method, 'all', batch, forward_only=forward_only)
        finally:
            steps.data_mesh = real
        if compiler_options:  # the same jitted step, recompiled with these XLA DebugOptions
            args_ = (self.variables, self.batch['image']) if forward_only else (self.state, self.batch)
            self.fn = self.fn.lower(*args_).compile(compiler_options=compiler_options)
            self.run(2)
        tree = self.variables if forward_only else (self.state.trainable, self.state.frozen)
        self.n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# growjax variants: name -> (XLA DebugOptions given to compile, host devices of the data mesh).
# In one process, so they interleave with each other and with torch (XLA_FLAGS would need a process each).
JAX_VARIANTS = {
    'default': ({}, 1),
    'eigen_single': ({'xla_cpu_multi_thread_eigen': False}, 1),
    'fast_math': ({'xla_cpu_enable_fast_math': True}, 1),
    'xnnpack': ({'xla_cpu_use_xnnpack': True}, 1),
    'onednn': ({'xla_cpu_use_onednn': True}, 1),
    'dp2': ({}, 2),  # batch split over 2 host devices (--xla_force_host_platform_device_count=2)
}


def main():
    jax_variants = args.variants.split(',')
    unknown = set(jax_variants) - set(JAX_VARIANTS)
    if unknown or jax_variants[0] != 'default':
        raise SystemExit(f'--variants: the first must be default, others from {sorted(JAX_VARIANTS)}; got {unknown or jax_variants}')
    if max(JAX_VARIANTS[v][1] for v in jax_variants) > len(jax.devices()):
        raise SystemExit('a dp variant needs --devices N (host devices) before jax starts')
    torch_threads = [int(t) for t in args.torch_threads.split(',') if t] if USE_TORCH else []
    torch_info = (f'torch {torch.__version__}, torch threads {torch.get_num_threads()} (= --threads, default '
                  f'os.cpu_count() = {os.cpu_count()}){f"; also torch threads {torch_threads}" if torch_threads else ""}'
                  if USE_TORCH else 'torch not run')
    print(f'jax {jax.__version__}, jaxlib {jaxlib.__version__}, {torch_info}, Python {sys.version.split()[0]}; '
          f'host devices {len(jax.devices())}; XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}; batch {args.batch}; '
          f'{args.reps} interleaved repeats of {args.iters} steps; load average at start {os.getloadavg()[0]:.2f}')
    if args.label:
        print(f'label: {args.label}')
    cases = []  # (model, method label, [(framework, variant, runner)], flops)
    for name in args.models.split(','):
        for method in args.methods.split(','):
            for forward in ((False, True) if args.forward else (False,)):
                label = f'{method} (forward only)' if forward else method
                runners = []
                for v in (jax_variants if not forward else ['default']):
                    options, devices = JAX_VARIANTS[v]
                    t0 = time.perf_counter()
                    runners.append(('growjax', v, JaxStep(name, method, args.batch, devices, options, forward)))
                    print(f'{name} {label} growjax {v}: build+compile {time.perf_counter() - t0:.1f} s')
                js = runners[0][2]
                if USE_TORCH:
                    ts = TorchStep(name, method, {k: np.asarray(v) for k, v in js.batch.items()}, forward_only=forward)
                    assert js.n_params == ts.n_params, (name, method, js.n_params, ts.n_params)
                    runners.insert(0, ('PyTorch', f'threads {torch.get_num_threads()}', ts))
                    for t in torch_threads:
                        runners.insert(1, ('PyTorch', f'threads {t}', TorchThreads(ts, t)))
                print(f'{name} {label}: {js.n_params:,} parameters{" in both (asserted)" if USE_TORCH else ""}')
                cases.append((name, label, runners, js.flops))
    every = [r for _, _, runners, _ in cases for r in runners]
    baton_in, baton_out = ((os.open(path, os.O_RDWR) for path in args.baton.split(',')) if args.baton
                           else (None, None))  # O_RDWR: opening a FIFO does not block
    for rep in range(args.reps):  # interleaved; order reversed on odd repeats
        if baton_in is not None and (rep > 0 or not args.baton_first):
            os.read(baton_in, 1)
        for _, _, runner in (every if rep % 2 == 0 else every[::-1]):
            runner.time(args.iters)
        if baton_out is not None:
            os.write(baton_out, b'x')
    load = os.getloadavg()
    print(f'\nload average at end (1/5/15 min): {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}\n')
    print('Ratios are medians over repeats of the paired per-repeat ratio; "best" uses each row\'s fastest repeat.\n')
    print('| framework | variant | model | method | img/s (median) | ms/step (median) | ms/step (best) | '
          'GFLOP/step (XLA) | time / torch | best / torch best | time / growjax default |')
    print('|---|---|---|---|---|---|---|---|---|---|---|')
    record = {'jax': jax.__version__, 'python': sys.version.split()[0], 'xla_flags': os.environ.get('XLA_FLAGS', ''),
              'label': args.label, 'load_end': load, 'batch': args.batch, 'rows': []}

    for name, label, runners, flops in cases:
        ref = runners[0][2] if USE_TORCH else None
        jdef = next(r for fw, v, r in runners if fw == 'growjax' and v == 'default')
        for fw, v, r in runners:
            sec = statistics.median(r.times)
            vs_torch = f'{paired(r, ref)[0]:.2f}' if ref else '-'
            best_torch = f'{min(r.times) / min(ref.times):.2f}' if ref else '-'
            vs_jax = f'{paired(r, jdef)[0]:.2f}' if fw == 'growjax' else '-'
            print(f'| {fw} | {v} | {CASES[name][0]} | {label} | {args.batch / sec:,.0f} | {sec * 1e3:.1f} | '
                  f'{min(r.times) * 1e3:.1f} | {flops / 1e9:.3f} | {vs_torch} | {best_torch} | {vs_jax} |')
            record['rows'].append({'framework': fw, 'variant': v, 'model': name, 'method': label, 'times': r.times})
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(record, f, indent=1)


if __name__ == '__main__':
    main()

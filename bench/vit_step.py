"""Train-step cost of grown ViTs vs plain fine-tuning, bfloat16 vs float32, and compiles per run.

    python3 -m bench.vit_step [--reps 7] [--iters 3] [--cases builtin,S16_64] [--methods finetune,wa,da,heads,lora]
    python3 -m bench.vit_step --profile small96     # where a step's time goes (XLA:CPU trace, per layer kind)

Models are built as the main job builds them (`config_lib.family_config('vit')`, model.vit.* and
growth.* set, `train.build_model`), grown from the plain ViT's init with `grow_params`, with
`groups.param_groups`, `steps.make_optimizer` (SGD, momentum 0.9, weight decay 5e-4, new leaves at
10x) and `steps.make_train_step` under `steps.shard_train_step`. Cases (CASES): `builtin` is
`config_lib.family_config('vit')`'s ViT (4 blocks, width 64, MLP 256, 2 heads, 4x4 patches on 16x16
grayscale, batch 128; S = 128, 1 block grows, 2 heads added); `S16_64` is ViT-S/16 (12 blocks,
width 384, MLP 1536, 6 heads) on 64x64 RGB, batch 16 (S = 768, 6 heads added); `small96` (6 blocks,
width 96, 16x16 grayscale, batch 128) and `Ti16_224` (ViT-Ti/16 at 224 px, batch 4) are for
--profile and bench/peer_timm.py.

1. Grown vs fine-tuning, regimes `all` and `new`: time ratio / FLOP ratio (XLA cost analysis of
   the compiled steps), target <= 1.05. Ratios are paired as in bench/step_cost.py: every repeat
   runs every variant of a case once (order reversed on odd repeats), the ratio to fine-tuning is
   taken within the repeat, and the table gives the median [quartiles] over repeats, for wall time
   and for the process CPU time (which does not count time descheduled by other jobs).
2. bfloat16 compute (model.dtype='bfloat16', parameters float32) vs float32: paired step time, and
   after --bf16_steps steps from the same grown state on the same batches, the loss and the
   logits on a held-out batch.
3. One compile per run: a fresh jitted step (as train.py builds it) over --compile_steps steps,
   each on a new batch placed like the input pipeline places it; counts XLA compilations of
   `train_step` (jax.monitoring's backend-compile events) and the jit cache size.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import glob
import json
import math
import os
import re
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from growjax import config_lib, grow_params, groups, steps, train
from bench.timing import Timed, fmt, matmul_peak, measure, paired


@dataclasses.dataclass(frozen=True)
class Case:
    label: str
    variant: str  # big_vision's NAME/PATCH; the sizes below override it
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    size: int  # image side
    channels: int
    batch: int
    units: int  # growth.units (S): the MLP units WA adds
    heads: int  # growth.heads: the heads 'heads' adds
    blocks: int = 1  # growth.blocks: top blocks that grow (wa, heads), blocks DA adds


CASES = {
    'builtin': Case('built-in ViT 4x64 16px', 'Ti/4', 64, 4, 256, 2, 16, 1, 128, 128, 2),
    'S16_64': Case('ViT-S/16 64px', 'S/16', 384, 12, 1536, 6, 64, 3, 16, 768, 6),
    'small96': Case('ViT 6x96 16px', 'Ti/4', 96, 6, 384, 3, 16, 1, 128, 192, 3),
    'Ti16_224': Case('ViT-Ti/16 224px', 'Ti/16', 192, 12, 768, 3, 224, 3, 4, 384, 3),
}
METHODS = ('finetune', 'wa', 'da', 'heads', 'lora')
NUM_SOURCE, NUM_TARGET = 52, 24  # Latin letters -> Greek letters, as the built-in testbed
TARGET = 1.05  # grown time ratio / FLOP ratio


def config_for(case: Case, method: str, dtype: str = 'float32'):
    """The main job's config for this case: config_lib.family_config('vit') with model.vit.* and growth.* set."""
    c = config_lib.family_config('vit')
    c.model.vit.update(variant=case.variant, width=case.width, depth=case.depth, mlp_dim=case.mlp_dim,
                       num_heads=case.num_heads)
    c.model.dtype = dtype
    c.data.image_size = case.size
    c.growth.method = method
    c.growth.units, c.growth.heads, c.growth.blocks = case.units, case.heads, case.blocks
    return c


def sample(case: Case, batch: int | None = None):
    return jnp.zeros((batch or 1, case.size, case.size, case.channels), jnp.float32)


_PRETRAINED = {}


def pretrained_for(case: Case):
    """The plain ViT's initial variables (52 source classes), one per case: stands in for the
    pretrained model (the step's cost does not depend on the values)."""
    if case not in _PRETRAINED:
        model = train.build_model(config_for(case, 'finetune'), NUM_SOURCE)
        _PRETRAINED[case] = jax.jit(model.init)(jax.random.key(0), sample(case))
    return _PRETRAINED[case]


def make_batch(case: Case, seed: int = 0, batch: int | None = None) -> dict:
    rng = np.random.default_rng(seed)
    n = batch or case.batch
    return {'image': rng.normal(size=(n, case.size, case.size, case.channels)).astype(np.float32),
            'label': rng.integers(0, NUM_TARGET, n).astype(np.int32)}


def grown_state(case: Case, method: str, regime: str, dtype: str = 'float32', learning_rate: float = 0.01):
    """(model, optimizer, train state) as train.init_state makes them, on one device."""
    config = config_for(case, method, dtype)
    model = train.build_model(config, NUM_TARGET)
    pretrained = pretrained_for(case)
    x = sample(case)
    reinit = tuple(config.init.reinit)
    variables = grow_params(pretrained, model, jax.random.key(1), x, reinit=reinit)
    pg = groups.param_groups(model, pretrained['params'], regime, x, reinit=reinit)
    opt = steps.make_optimizer(pg.trainable_labels, learning_rate=learning_rate, momentum=0.9, weight_decay=5e-4,
                               new_lr_multiplier=10.0)
    # grow_params reuses the pretrained arrays; the step donates its state, so each state gets copies.
    return model, opt, steps.create_state(jax.tree.map(jnp.copy, variables), pg.mask, opt)


def jitted_step(model, opt):
    return steps.shard_train_step(steps.make_train_step(model, opt, jax.random.key(2)),
                                  steps.data_mesh(jax.devices()[:1]))


def flops_of(compiled) -> float:
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)['flops'])


class Step(Timed):
    """One compiled ViT train step with its own state, timed n iterations at a time."""

    def __init__(self, case: Case, method: str, regime: str, dtype: str = 'float32'):
        super().__init__()
        self.case, self.method, self.regime, self.dtype = case, method, regime, dtype
        t = time.perf_counter()
        self.model, opt, self.state = grown_state(case, method, regime, dtype)
        self.batch = jax.tree.map(jnp.asarray, make_batch(case))
        # The executable jit would compile (same shardings, state donated); cost analysis from it.
        self.fn = jitted_step(self.model, opt).lower(self.state, self.batch).compile()
        self.flops = flops_of(self.fn)
        self.params = sum(leaf.size for leaf in jax.tree.leaves((self.state.trainable, self.state.frozen)))
        self.trainable = sum(leaf.size for leaf in jax.tree.leaves(self.state.trainable))
        self.build_s = time.perf_counter() - t
        self.run(2)  # warm up

    def step(self):
        self.state, out = self.fn(self.state, self.batch)
        return out


def load() -> str:
    return '/'.join(f'{v:.1f}' for v in os.getloadavg())


# ---------------------------------------------------------------------------------------------
# 1. Grown vs fine-tuning


def grown_vs_finetune(cases, methods, regimes, args, peak):
    print('## 1. Grown vs plain fine-tuning\n')
    print('Paired ratios to fine-tuning in the same regime: median [quartiles] over repeats; time/FLOP uses the '
          f'medians; target: wall or CPU time/FLOP <= {TARGET}. In regimes other than all, fine-tuning in regime all '
          'runs in the same repeats as a second reference: "vs all" is time/FLOP relative to that full step (wall, '
          'CPU), i.e. whether the grown step costs what its FLOPs would cost in a full training step.\n')
    print('| case | regime | method | params (trainable) | img/s | ms/step | GFLOP/step | FLOP ratio | wall-time ratio '
          '| CPU-time ratio | wall time/FLOP | CPU time/FLOP | target | time/FLOP vs all (wall, CPU) | GFLOP/s | MFU |')
    print('|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|')
    for case_name in cases:
        case = CASES[case_name]
        for regime in regimes:
            runners = [Step(case, m, regime) for m in methods]
            reference = runners[0] if regime == 'all' else Step(case, methods[0], 'all')
            print(f'<!-- {case.label} {regime}: built and compiled in '
                  f'{", ".join(f"{r.method} {r.build_s:.0f} s" for r in runners)}; load {load()} -->', flush=True)
            measure(runners + ([] if reference is runners[0] else [reference]), args.reps, args.iters)
            base = runners[0]
            for r in runners:
                fr = r.flops / base.flops
                wall, cpu = paired(r, base, False), paired(r, base, True)
                met = 'base' if r is base else ('met' if min(wall[0], cpu[0]) / fr <= TARGET else 'missed')
                fa = r.flops / reference.flops
                vs_all = f'{paired(r, reference, False)[0] / fa:.3f}, {paired(r, reference, True)[0] / fa:.3f}'
                print(f'| {case.label} | {regime} | {r.method} | {r.params / 1e6:.2f}M ({r.trainable / 1e6:.2f}M) | '
                      f'{case.batch / r.seconds:,.0f} | {r.seconds * 1e3:.1f} | {r.flops / 1e9:.3f} | {fr:.3f} | '
                      f'{fmt(wall)} | {fmt(cpu)} | {wall[0] / fr:.3f} | {cpu[0] / fr:.3f} | {met} | {vs_all} | '
                      f'{r.flops / r.seconds / 1e9:.1f} | {r.flops / r.seconds / peak:.1%} |', flush=True)
            if reference is not runners[0]:
                r = reference
                print(f'| {case.label} | all (reference) | {r.method} | {r.params / 1e6:.2f}M ({r.trainable / 1e6:.2f}M) '
                      f'| {case.batch / r.seconds:,.0f} | {r.seconds * 1e3:.1f} | {r.flops / 1e9:.3f} | '
                      f'{r.flops / base.flops:.3f} | {fmt(paired(r, base, False))} | {fmt(paired(r, base, True))} | '
                      f'- | - | - | 1.000, 1.000 | {r.flops / r.seconds / 1e9:.1f} | {r.flops / r.seconds / peak:.1%} |')
            del runners, reference


# ---------------------------------------------------------------------------------------------
# 2. bfloat16


def bf16_vs_f32(cases, methods, args):
    print('\n## 2. bfloat16 compute vs float32 (regime all)\n')
    print(f'Time: paired ratio bf16 / f32. Accuracy: both from the same grown state, {args.bf16_steps} SGD steps '
          f'(learning rate {args.bf16_lr}, new leaves 10x) on the same batches; the loss at each step, and the logits '
          'of the final parameters on a held-out batch (relative difference = ||bf16 - f32|| / ||f32||).\n')
    print('| case | method | f32 ms/step | bf16 ms/step | bf16/f32 wall [quartiles] | bf16/f32 CPU [quartiles] | '
          'GFLOP/step f32, bf16 | max abs loss diff over steps | loss first -> last step, f32 | same, bf16 | '
          'logits max abs diff | logits relative diff | argmax agreement |')
    print('|---|---|---|---|---|---|---|---|---|---|---|---|---|')
    for case_name in cases:
        case = CASES[case_name]
        for method in methods:
            f32, bf16 = Step(case, method, 'all'), Step(case, method, 'all', 'bfloat16')
            measure([f32, bf16], args.reps, args.iters)
            acc = bf16_accuracy(case, method, args.bf16_steps, args.bf16_lr)
            print(f'| {case.label} | {method} | {f32.seconds * 1e3:.1f} | {bf16.seconds * 1e3:.1f} | '
                  f'{fmt(paired(bf16, f32, False))} | {fmt(paired(bf16, f32, True))} | '
                  f'{f32.flops / 1e9:.3f}, {bf16.flops / 1e9:.3f} | {acc["loss_diff"]:.2e} | '
                  f'{acc["float32"][0]:.4f} -> {acc["float32"][-1]:.4f} | {acc["bfloat16"][0]:.4f} -> '
                  f'{acc["bfloat16"][-1]:.4f} | {acc["logit_abs"]:.3e} | {acc["logit_rel"]:.3e} | '
                  f'{acc["agree"]:.1%} |', flush=True)


def bf16_accuracy(case: Case, method: str, n_steps: int, learning_rate: float) -> dict:
    losses, logits = {}, {}
    held_out = jnp.asarray(make_batch(case, seed=10_000, batch=min(case.batch, 64))['image'])
    for dtype in ('float32', 'bfloat16'):
        model, opt, state = grown_state(case, method, 'all', dtype, learning_rate)
        fn = jitted_step(model, opt)
        losses[dtype] = []
        for i in range(n_steps):
            state, metrics = fn(state, jax.tree.map(jnp.asarray, make_batch(case, seed=1 + i)))
            losses[dtype].append(float(metrics['loss']))
        logits[dtype] = np.asarray(jax.jit(model.apply)(state.variables(), held_out), np.float32)
    a, b = logits['float32'], logits['bfloat16']
    return {'loss_diff': max(abs(x - y) for x, y in zip(losses['float32'], losses['bfloat16'])),
            **losses,
            'logit_abs': float(np.abs(a - b).max()), 'logit_rel': float(np.linalg.norm(a - b) / np.linalg.norm(a)),
            'agree': float(np.mean(a.argmax(-1) == b.argmax(-1)))}


# ---------------------------------------------------------------------------------------------
# 3. Compiles per run


class CompileCounter:
    """Counts jit traces and XLA compilations of `train_step` (jax.monitoring's duration events, which
    name the function 'train_step' / 'jit(train_step)')."""
    TRACE, COMPILE = '/jax/core/compile/jaxpr_trace_duration', '/jax/core/compile/backend_compile_duration'

    def __init__(self):
        self.counts = collections.Counter()
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, duration, **kwargs):
        if kwargs.get('fun_name') in ('train_step', 'jit(train_step)') and event in (self.TRACE, self.COMPILE):
            self.counts[event] += 1

    def snapshot(self):
        return self.counts[self.TRACE], self.counts[self.COMPILE]


def compile_counts(cases, args):
    print(f'\n## 3. Compiles per run ({args.compile_steps} steps, a new batch each step)\n')
    print("The state is made by train.init_state (grown under jit, placed replicated on the mesh) and the step by "
          "steps.shard_train_step, as train.py does; each batch is a fresh host array placed with "
          "steps.batch_sharding (as the input pipeline's device_prefetch places it); the state is donated and fed "
          "back. The last row of each case makes the state with steps.create_state outside jit instead (not placed "
          "on the mesh).\n")
    print('| case | method | dtype | state | steps | jit traces of train_step | XLA compilations of train_step | '
          'jit cache size | first step s | second step s | steps 3.. ms (median) |')
    print('|---|---|---|---|---|---|---|---|---|---|---|')
    counter = CompileCounter()
    for case_name in cases:
        case = CASES[case_name]
        for method, dtype, placed in (('finetune', 'float32', True), ('wa', 'float32', True), ('wa', 'bfloat16', True),
                                      ('wa', 'float32', False)):
            mesh = steps.data_mesh(jax.devices()[:1])
            if placed:
                config = config_for(case, method, dtype)
                config.train.batch_size = case.batch
                model = train.build_model(config, NUM_TARGET)
                state, opt, dropout_rng = train.init_state(config, model, pretrained_for(case), mesh,
                                                           (case.size, case.size, case.channels))
            else:
                (model, opt, state), dropout_rng = grown_state(case, method, 'all', dtype), jax.random.key(2)
            fn = steps.shard_train_step(steps.make_train_step(model, opt, dropout_rng), mesh)
            sharding = steps.batch_sharding(mesh)
            before = counter.snapshot()
            times = []
            for i in range(args.compile_steps):
                host = make_batch(case, seed=100 + i)
                batch = {k: jax.make_array_from_process_local_data(sharding, v) for k, v in host.items()}
                t = time.perf_counter()
                state, metrics = fn(state, batch)
                jax.block_until_ready(metrics)
                times.append(time.perf_counter() - t)
            traces, compiles = (a - b for a, b in zip(counter.snapshot(), before))
            print(f'| {case.label} | {method} | {dtype} | {"train.init_state" if placed else "create_state, not placed"} '
                  f'| {args.compile_steps} | {traces} | {compiles} | {fn._cache_size()} | {times[0]:.1f} | '
                  f'{times[1]:.2f} | {statistics.median(times[2:]) * 1e3:.1f} |', flush=True)


# ---------------------------------------------------------------------------------------------
# --profile: where a step's time goes


def _shape(text):
    m = re.match(r'\s*\w+\[([\d,]*)\]', text)
    return [int(v) for v in m.group(1).split(',') if v] if m else None


def _dot_flops(lines, only=None) -> int:
    """2 * output elements * contraction size of each dot in an HLO computation's lines (or in the
    line `only` of them)."""
    shapes = {}
    for line in lines:
        m = re.match(r'\s*(?:ROOT )?%(\S+) = (\w+\[[\d,]*\])', line)
        if m:
            shapes[m.group(1)] = _shape(m.group(2))
    flops = 0
    for line in (lines if only is None else [only]):
        m = re.match(r'\s*(?:ROOT )?%\S+ = (\w+\[[\d,]*\])\S* dot\(%([^,]+), %[^)]+\)(.*)', line)
        if m:
            lhs = shapes.get(m.group(2))
            contracting = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', m.group(3))
            k = math.prod(lhs[int(i)] for i in contracting.group(1).split(',') if i) if lhs and contracting else 0
            flops += 2 * math.prod(_shape(m.group(1))) * k
    return flops


def _hlo_ops(hlo_text: str) -> dict:
    """The entry computation's instructions: name -> (jax op_name, dot FLOPs)."""
    computations, current = {}, None
    for line in hlo_text.split('\n'):
        m = re.match(r'^(ENTRY )?%(\S+) \(', line)
        if m and line.rstrip().endswith('{'):
            current = ('ENTRY' if m.group(1) else m.group(2))
            computations[current] = []
        elif current is not None:
            computations[current].append(line)
    ops = {}
    for line in computations['ENTRY']:
        m = re.match(r'\s*(?:ROOT )?%(\S+) = ', line)
        if not m:
            continue
        op_name = re.search(r'op_name="([^"]+)"', line)
        calls = re.search(r'calls=%([\w.\-]+)', line)
        flops = (_dot_flops(computations.get(calls.group(1), [])) if calls else
                 _dot_flops(computations['ENTRY'], only=line))
        ops[m.group(1)] = (op_name.group(1) if op_name else '', flops)
    return ops


def _category(op_name: str) -> tuple[str, str]:
    """(forward | backward | update, layer kind) of a jax op_name such as
    'jit(train_step)/transpose(jvp(ViT))/block3/mlp/fc1/dot_general'."""
    direction = 'backward' if 'transpose(' in op_name else 'forward' if 'jvp(' in op_name else 'update/other'
    if '/attention/' in op_name:
        kind = ('attention q/k/v' if re.search(r'/(query|key|value)/', op_name) else
                'attention out' if '/out/' in op_name else 'attention core (scores, softmax)')
    elif '/mlp/' in op_name:
        kind = 'mlp fc1' if '/fc1/' in op_name else 'mlp fc2' if '/fc2/' in op_name else 'mlp GELU'
    elif re.search(r'/(norm1|norm2|encoder_norm)/', op_name):
        kind = 'LayerNorm'
    elif '/embedding/' in op_name:
        kind = 'patch embedding'
    elif '/head/' in op_name:
        kind = 'head'
    elif direction == 'update/other':
        kind = 'optimizer update, copies'
    else:
        kind = 'residual adds, position embedding, loss'
    return direction, kind


def profile(case_name: str, args):
    """Traces --profile_steps steps with jax.profiler (perfetto JSON), joins each XLA:CPU thunk with
    its HLO instruction's jax op_name and dot FLOPs, and sums the time per layer kind."""
    case = CASES[case_name]
    step = Step(case, args.profile_method, 'all')
    ops = _hlo_ops(step.fn.as_text())
    untraced = [step.run(1) for _ in range(5)]
    folder = tempfile.mkdtemp(prefix='vit_step_trace_')
    with jax.profiler.trace(folder, create_perfetto_trace=True):
        for _ in range(args.profile_steps):
            step.run(1)
    trace = sorted(glob.glob(os.path.join(folder, 'plugins/profile/*/perfetto_trace.json.gz')))[-1]
    events = json.load(gzip.open(trace))
    events = events['traceEvents'] if isinstance(events, dict) else events
    per_op = collections.Counter()
    for e in events:
        if e.get('ph') == 'X' and e['name'] in ops:
            per_op[e['name']] += e['dur'] * 1e-6 / args.profile_steps
    rows = collections.defaultdict(lambda: [0.0, 0, 0])
    for name, seconds in per_op.items():
        op_name, flops = ops[name]
        key = (*_category(op_name), 'dot' if flops else 'elementwise / reduce / copy')
        rows[key][0] += seconds
        rows[key][1] += flops
        rows[key][2] += 1
    total = sum(v[0] for v in rows.values())
    dots = sum(v[1] for v in rows.values())
    print(f'## Profile: {case.label}, {args.profile_method}, regime all, batch {case.batch}\n')
    print(f'Untraced steps (wall ms, CPU ms): {[(round(w * 1e3), round(c * 1e3)) for w, c in untraced]}; XLA cost '
          f'analysis {step.flops / 1e9:.2f} GFLOP/step, of which dots {dots / 1e9:.2f}; traced ops sum to '
          f'{total * 1e3:.1f} ms/step ({args.profile_steps} steps; trace in {trace}); load {load()}.\n')
    print('| part | direction | kind | ms/step | share | XLA ops | dot GFLOP | dot GFLOP/s |')
    print('|---|---|---|---|---|---|---|---|')
    for (direction, kind, what), (seconds, flops, count) in sorted(rows.items(), key=lambda kv: -kv[1][0]):
        rate = f'{flops / seconds / 1e9:.1f}' if flops else ''
        print(f'| {kind} | {direction} | {what} | {seconds * 1e3:.1f} | {seconds / total:.1%} | {count} | '
              f'{flops / 1e9:.3f} | {rate} |')
    by_kind = collections.Counter()
    for (direction, kind, what), (seconds, _, _) in rows.items():
        by_kind[kind] += seconds
    print('\n| kind (forward + backward) | ms/step | share |\n|---|---|---|')
    for kind, seconds in by_kind.most_common():
        print(f'| {kind} | {seconds * 1e3:.1f} | {seconds / total:.1%} |')


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--reps', type=int, default=7)
    ap.add_argument('--iters', type=int, default=3)
    ap.add_argument('--cases', default='builtin,S16_64', help=f'from {list(CASES)}')
    ap.add_argument('--methods', default=','.join(METHODS), help='the first is the baseline')
    ap.add_argument('--regimes', default='all,new')
    ap.add_argument('--sections', default='grown,bf16,compile', help='any of grown,bf16,compile')
    ap.add_argument('--bf16_methods', default='finetune,wa')
    ap.add_argument('--bf16_steps', type=int, default=5)
    ap.add_argument('--bf16_lr', type=float, default=0.001, help='learning rate of the bf16 accuracy comparison')
    ap.add_argument('--compile_steps', type=int, default=20)
    ap.add_argument('--profile', default='', help='a case: trace its step and print where the time goes, then exit')
    ap.add_argument('--profile_method', default='finetune')
    ap.add_argument('--profile_steps', type=int, default=5)
    args = ap.parse_args()
    cases = args.cases.split(',')
    unknown = [c for c in cases + ([args.profile] if args.profile else []) if c not in CASES]
    if unknown:
        raise SystemExit(f'unknown case(s) {unknown}; cases: {list(CASES)}')
    print(f'jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs, load average {load()}\n')
    if args.profile:
        profile(args.profile, args)
        return
    peak = matmul_peak()
    print(f'{args.reps} interleaved repeats of {args.iters} steps; measured f32 matmul peak (2048^3): '
          f'{peak / 1e9:.1f} GFLOP/s\n')
    sections = args.sections.split(',')
    if 'grown' in sections:
        grown_vs_finetune(cases, args.methods.split(','), args.regimes.split(','), args, peak)
    if 'bf16' in sections:
        bf16_vs_f32(cases, args.bf16_methods.split(','), args)
    if 'compile' in sections:
        compile_counts(cases, args)
    print(f'\nload average at the end: {load()}')


if __name__ == '__main__':
    main()

"""Growing a GPT during training: the FLOPs to reach the big-from-scratch model's loss (issue 21).

    python -m experiments.growth --workdir=workdirs/growth                     # every scale, arm and seed
    python -m experiments.growth --workdir=workdirs/growth --only=w128 --max_minutes=60
    python -m experiments.growth --workdir=workdirs/growth --report_only       # the page from what is stored
    python -m experiments.growth --workdir=/tmp/growth_quick --quick           # smoke run, a few minutes

On the same data (the byte-level Python-stdlib corpus, growjax.data.text) and the same token budget
(steps x batch x seq_len), at each scale (SCALES) this trains the big GPT from scratch, the small GPT
alone, and grown arms (ARMS) that train a small GPT for a fraction of the steps, grow it with
growjax.expand (and the AdamW state with growjax.expand_opt_state) into the big configuration and
train on: width and depth grown (the default: depth 'zero', symmetry-breaking noise 0.1, optimiser
state mapped, the learning-rate schedule continued, growth at 25% of the budget), width only, depth
only (new blocks at zero vs stacked copies), both with stacked copies, no noise, noise 0.5,
optimiser state reset, re-warmed learning rate, Adam rate scales on split leaves
(growjax.expand.rate_scales), growth at 10% and 50%. Stage 2 adds seeds 1, 2 to the big model, to the
best grown arm at seed 0 and to the default grown arm. Scales: w32 (2x16 -> 4x32), w64 (2x32 -> 4x64)
and w128 (2x64 -> 4x128), all head_dim 16, 500 steps of 16 x 128 bytes.

FLOPs are XLA's cost analysis of each compiled train step (forward, backward and AdamW update; small
and big separately) and of the compiled growth (expand + expand_opt_state); evaluation is excluded.
Every run (scale x arm x seed) is one JSON under WORKDIR/runs with its curve (step, cumulative FLOPs,
training wall time, validation loss; the train loss of every step) and a fingerprint of everything it
depends on: a rerun reuses it. `--max_minutes` starts no run after that many minutes. The page
(docs/growth.md and docs/figures/growth_*.png; with --quick under WORKDIR/docs; or --page=PATH) is
rewritten from what is stored at the end of every invocation.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import growjax
from growjax import models
from growjax.expand import expansion_plan, rate_scales
from growjax.lm import next_token_cross_entropy

from experiments import invocations

VERSION = 1  # bump when what a run computes changes: stored runs of another version are not reused
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PAGE = os.path.join(ROOT, 'docs', 'growth.md')
ZERO = r'block_\d+/(attn/out|mlp/fc2)'  # the last layer of each residual branch: a new block is the identity
HEAD_DIM = 16


@dataclasses.dataclass(frozen=True)
class Scale:
    """One model scale: the small and big GPT (depth, width), and the training every arm shares."""
    name: str
    small: tuple[int, int]
    big: tuple[int, int]
    head_dim: int = HEAD_DIM
    seq_len: int = 128
    batch: int = 16
    steps: int = 500  # the token budget: steps x batch x seq_len
    warmup: int = 30
    lr: float = 2e-3
    min_lr: float = 0.1  # cosine decay to min_lr x lr at the last step
    weight_decay: float = 0.1
    eval_every: int = 50
    eval_examples: int = 128  # a fixed random subset of the validation split, the same for every run
    eval_batch: int = 128
    after_growth: tuple[int, ...] = (5, 10, 20, 30, 40)  # extra evaluations, steps after growth
    tail: int = 100  # and every tail_every steps over the last `tail` (where the target is crossed)
    tail_every: int = 20
    max_bytes: int | None = None  # cap on the corpus (the quick run)


@dataclasses.dataclass(frozen=True)
class Arm:
    """How a run trains: 'big' or 'small' from scratch, or 'grow': the small model `small` (default:
    the scale's) for `at` of the steps, then expanded into the big model."""
    name: str
    label: str
    kind: str = 'grow'
    small: tuple[int, int] | None = None
    at: float = 0.25
    depth: str = 'zero'
    noise: float = 0.1
    opt: str = 'map'
    lr: str = 'continue'
    rate_scales: bool = False

    def small_size(self, scale: Scale) -> tuple[int, int]:
        if self.small is None:
            return scale.small
        return tuple(self.small)


def arms_for(scale: Scale) -> list[Arm]:
    """Every arm at one scale: the baselines, the default grown arm and one change at a time."""
    (_, small_width), (big_depth, big_width) = scale.small, scale.big
    return [
        Arm('big', f'big {big_depth}x{big_width} from scratch', 'big'),
        Arm('small', f'small {scale.small[0]}x{small_width} alone', 'small'),
        Arm('grow', 'width+depth (default rules)'),
        Arm('width', f'width only ({big_depth}x{small_width} ->)', small=(big_depth, small_width)),
        Arm('depth_zero', f'depth only, new blocks at zero ({scale.small[0]}x{big_width} ->)',
            small=(scale.small[0], big_width)),
        Arm('depth_stack', f'depth only, stacked copies ({scale.small[0]}x{big_width} ->)',
            small=(scale.small[0], big_width), depth='stack'),
        Arm('stack', 'width+depth, stacked copies', depth='stack'),
        Arm('no_noise', 'width+depth, exact split (no symmetry breaking)', noise=0.0),
        Arm('noise_high', 'width+depth, split noise 0.5', noise=0.5),
        Arm('opt_reset', 'width+depth, optimiser state reset', opt='reset'),
        Arm('rewarm', 'width+depth, LR re-warmed', lr='rewarm'),
        Arm('rate_scales', 'width+depth, Adam rate 1/k on split leaves', rate_scales=True),
        Arm('at10', 'width+depth, growth at 10%', at=0.10),
        Arm('at50', 'width+depth, growth at 50%', at=0.50),
    ]


SCALES = {
    'w32': Scale('w32', small=(2, 16), big=(4, 32)),
    'w64': Scale('w64', small=(2, 32), big=(4, 64)),
    'w128': Scale('w128', small=(2, 64), big=(4, 128)),
}
QUICK_SCALES = {
    'quick': Scale('quick', small=(1, 16), big=(2, 32), head_dim=16, seq_len=32, batch=8, steps=40, warmup=4,
                   eval_every=10, eval_examples=32, eval_batch=32, after_growth=(2, 5), tail=10, tail_every=5,
                   max_bytes=300_000),
}


# ---------------------------------------------------------------------------------------------
# Data


@dataclasses.dataclass
class Corpus:
    """Training examples uint8 [N, seq_len + 1] and the fixed validation subset."""
    name: str
    train: np.ndarray
    val: np.ndarray

    def batch(self, seed: int, step: int, size: int) -> dict[str, np.ndarray]:
        """Batch `step` of the order of `seed` (a fresh permutation per epoch): the same for every arm."""
        n = len(self.train)
        epoch, position = divmod(step * size, n)
        ids = np.concatenate([np.random.default_rng([seed, epoch + e]).permutation(n) for e in range(2)])
        rows = self.train[ids[position:position + size]].astype(np.int32)
        return {'inputs': rows[:, :-1], 'targets': rows[:, 1:]}


def load_corpus(scale: Scale, data_dir: str) -> Corpus:
    from growjax.data import text
    from growjax.data.sources import read_examples
    name = text.prepare_stdlib(data_dir, scale.seq_len, max_bytes=scale.max_bytes)

    def rows(split):
        source = text.text_source(data_dir, split, scale.seq_len, max_bytes=scale.max_bytes)
        return np.stack([np.asarray(e['tokens'], np.uint8) for e in read_examples(source, range(len(source)))])

    val = rows('validation')
    subset = np.sort(np.random.default_rng(0).permutation(len(val))[:scale.eval_examples])
    return Corpus(name, rows('train'), val[subset])


# ---------------------------------------------------------------------------------------------
# Models, steps, FLOPs


def gpt(scale: Scale, size: tuple[int, int]):
    depth, width = size
    return models.get('gpt', num_classes=256, width=width, depth=depth, num_heads=width // scale.head_dim,
                      mlp_dim=4 * width, max_len=scale.seq_len)


def optimizer() -> optax.GradientTransformation:
    """Adam's direction (clipped gradients); the rate, per-leaf scales and decoupled weight decay are
    applied in the step, so one compiled step serves every learning rate and growth rule."""
    return optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(b1=0.9, b2=0.95, eps=1e-8))


def flops_of(compiled) -> float:
    """XLA's FLOP count of a compiled computation (cost_analysis is a dict or a list of dicts)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        return float(sum(a.get('flops', 0.0) for a in analysis))
    return float(analysis.get('flops', 0.0))


class Stepper:
    """The compiled AdamW train step of one model and its FLOPs."""

    def __init__(self, model, scale: Scale, params, opt_state, scales):
        tx = optimizer()
        decay = scale.weight_decay

        def step(params, opt_state, scales, lr, inputs, targets):
            def loss_fn(p):
                return next_token_cross_entropy(model.apply({'params': p}, inputs), targets)

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = jax.tree_util.tree_map(
                lambda p, u, s: p - lr * s * (u + decay * p if p.ndim >= 2 else u), params, updates, scales)
            return params, opt_state, loss

        batch = jnp.zeros((scale.batch, scale.seq_len), jnp.int32)
        self.compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
            params, opt_state, scales, jnp.float32(0), batch, batch).compile()
        self.flops = flops_of(self.compiled)

        def loss(params, inputs, targets):
            return next_token_cross_entropy(model.apply({'params': params}, inputs), targets)

        self.loss = jax.jit(loss)

    def __call__(self, params, opt_state, scales, lr, batch):
        return self.compiled(params, opt_state, scales, jnp.float32(lr), batch['inputs'], batch['targets'])

    def evaluate(self, params, val: np.ndarray, batch: int) -> float:
        rows = val.astype(np.int32)
        losses = [float(self.loss(params, rows[i:i + batch, :-1], rows[i:i + batch, 1:]))
                  for i in range(0, len(rows), batch)]
        sizes = [len(rows[i:i + batch]) for i in range(0, len(rows), batch)]
        return float(np.average(losses, weights=sizes))


def learning_rate(scale: Scale, arm: Arm, step: int, growth_step: int | None) -> float:
    """Linear warm-up then cosine to min_lr over the whole budget; 'rewarm' warms up again after growth."""
    warm = min(1.0, (step + 1) / scale.warmup)
    progress = min(1.0, max(0.0, (step - scale.warmup) / max(1, scale.steps - scale.warmup)))
    lr = scale.lr * warm * (scale.min_lr + (1 - scale.min_lr) * 0.5 * (1 + math.cos(math.pi * progress)))
    if arm.lr == 'rewarm' and growth_step is not None and step >= growth_step:
        lr *= min(1.0, (step - growth_step + 1) / scale.warmup)
    return lr


def ones_like_tree(params):
    return jax.tree_util.tree_map(lambda _: jnp.float32(1.0), params)


def growth_step_of(scale: Scale, arm: Arm) -> int | None:
    return round(arm.at * scale.steps) if arm.kind == 'grow' else None


class Grower:
    """expand + expand_opt_state for one arm, compiled once (their FLOPs counted)."""

    def __init__(self, scale: Scale, arm: Arm, small_model, big_model, params, opt_state):
        sample = jnp.zeros((1, scale.seq_len), jnp.int32)
        self.plan = expansion_plan(small_model, big_model, sample, zero=ZERO if arm.depth == 'zero' else None,
                                   depth=arm.depth)

        def grow(params, opt_state, key):
            big = growjax.expand({'params': params}, small_model, big_model, sample, rng=key, noise=arm.noise,
                                 check=False, plan=self.plan)['params']
            return big, growjax.expand_opt_state(opt_state, params, big, self.plan, rule=arm.opt)

        self.compiled = jax.jit(grow).lower(params, opt_state, jax.random.key(0)).compile()
        self.flops = flops_of(self.compiled)
        self.scales = (jax.tree_util.tree_map(jnp.float32, rate_scales(self.plan))
                       if arm.rate_scales else None)


# ---------------------------------------------------------------------------------------------
# One run


def fingerprint(scale: Scale, arm: Arm, seed: int, corpus_name: str) -> dict:
    return {'version': VERSION, 'scale': dataclasses.asdict(scale), 'arm': dataclasses.asdict(arm), 'seed': seed,
            'corpus': corpus_name, 'growjax': growjax.__version__}


def eval_steps(scale: Scale, growth_step: int | None) -> list[int]:
    steps = set(range(0, scale.steps + 1, scale.eval_every)) | {scale.steps}
    steps |= set(range(scale.steps - scale.tail, scale.steps, scale.tail_every))
    if growth_step is not None:
        steps |= {growth_step + s for s in scale.after_growth if growth_step + s <= scale.steps}
    return sorted(steps)


def train_run(scale: Scale, arm: Arm, seed: int, corpus: Corpus, log=print) -> dict:
    """Trains one arm for the scale's budget; returns the stored record (curve, FLOPs, wall time)."""
    growth_step = growth_step_of(scale, arm)
    size = scale.big if arm.kind == 'big' else arm.small_size(scale)
    model = gpt(scale, size)
    key = jax.random.key(seed)
    init_key, grow_key = jax.random.split(key)
    sample = jnp.zeros((1, scale.seq_len), jnp.int32)
    params = model.init(init_key, sample)['params']
    opt_state = optimizer().init(params)
    scales = ones_like_tree(params)
    started_compile = time.perf_counter()
    stepper = Stepper(model, scale, params, opt_state, scales)
    compile_seconds = time.perf_counter() - started_compile
    step_flops = {'small' if arm.kind != 'big' else 'big': stepper.flops}
    growth_flops = 0.0
    evals, train_losses = [], []
    flops, wall, eval_seconds = 0.0, 0.0, 0.0
    wanted = eval_steps(scale, growth_step)
    load = [os.getloadavg()[0]]

    def evaluate(step, phase):
        nonlocal eval_seconds
        started = time.perf_counter()
        val = stepper.evaluate(params, corpus.val, scale.eval_batch)
        eval_seconds += time.perf_counter() - started
        recent = train_losses[-scale.eval_every:]
        evals.append({'step': step, 'flops': flops, 'wall': wall, 'val': val, 'phase': phase,
                      'train': float(np.mean(recent)) if recent else None})

    for step in range(scale.steps + 1):
        if step == growth_step:
            evaluate(step, 'before_growth')
            big_model = gpt(scale, scale.big)
            started = time.perf_counter()
            grower = Grower(scale, arm, model, big_model, params, opt_state)
            compile_seconds += time.perf_counter() - started
            started = time.perf_counter()
            params, opt_state = grower.compiled(params, opt_state, grow_key)
            jax.block_until_ready(params)
            wall += time.perf_counter() - started
            growth_flops = grower.flops
            flops += growth_flops
            scales = grower.scales if grower.scales is not None else ones_like_tree(params)
            model = big_model
            started = time.perf_counter()
            stepper = Stepper(model, scale, params, opt_state, scales)
            compile_seconds += time.perf_counter() - started
            step_flops['big'] = stepper.flops
            evaluate(step, 'after_growth')
        elif step in wanted:
            evaluate(step, 'big' if growth_step is None or step > growth_step or arm.kind == 'big' else 'small')
        if step == scale.steps:
            break
        batch = corpus.batch(seed, step, scale.batch)
        lr = learning_rate(scale, arm, step, growth_step)
        started = time.perf_counter()
        params, opt_state, loss = stepper(params, opt_state, scales, lr, batch)
        loss = float(loss)
        wall += time.perf_counter() - started
        flops += stepper.flops
        train_losses.append(loss)
        if not math.isfinite(loss):
            log(f'  {scale.name}/{arm.name}/seed{seed}: loss {loss} at step {step}; stopping the run')
            break
    load.append(os.getloadavg()[0])
    return {'fingerprint': fingerprint(scale, arm, seed, corpus.name), 'scale': scale.name, 'arm': arm.name,
            'seed': seed, 'label': arm.label, 'small': list(arm.small_size(scale)) if arm.kind != 'big' else None,
            'big': list(scale.big), 'growth_step': growth_step, 'step_flops': step_flops,
            'growth_flops': growth_flops, 'total_flops': flops, 'wall': wall, 'eval_seconds': eval_seconds,
            'compile_seconds': compile_seconds, 'evals': evals, 'train_loss': train_losses,
            'tokens_per_step': scale.batch * scale.seq_len,
            'machine': {'cpus': os.cpu_count(), 'load_1min': load, 'platform': platform.platform(),
                        'jax': jax.__version__, 'backend': jax.default_backend()},
            'date': time.strftime('%Y-%m-%d %H:%M')}


# ---------------------------------------------------------------------------------------------
# Storage and the schedule of runs


def run_path(workdir: str, scale: str, arm: str, seed: int) -> str:
    return os.path.join(workdir, 'runs', scale, f'{arm}_seed{seed}.json')


def load_run(workdir: str, scale: Scale, arm: Arm, seed: int, corpus_name: str | None = None) -> dict | None:
    """The stored run if its fingerprint matches (corpus_name None: any corpus)."""
    path = run_path(workdir, scale.name, arm.name, seed)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        record = json.load(f)
    expected = fingerprint(scale, arm, seed, corpus_name or record['fingerprint'].get('corpus'))
    return record if json.loads(json.dumps(expected)) == record['fingerprint'] else None


def save_run(workdir: str, record: dict) -> str:
    path = run_path(workdir, record['scale'], record['arm'], record['seed'])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + '.tmp', 'w') as f:
        json.dump(record, f)
    os.replace(path + '.tmp', path)
    return path


def stored_runs(workdir: str, scales: Sequence[Scale], seeds: int = 3) -> dict[str, dict[str, list[dict]]]:
    """{scale: {arm: [runs by seed]}} of every stored run whose fingerprint matches the settings."""
    out = {}
    for scale in scales:
        per_arm = {}
        for arm in arms_for(scale):
            runs = [r for seed in range(seeds) if (r := load_run(workdir, scale, arm, seed)) is not None]
            if runs:
                per_arm[arm.name] = runs
        out[scale.name] = per_arm
    return out


@dataclasses.dataclass
class Filters:
    """--only: scale names, arm names, seed=N (within a kind any, across kinds all)."""
    scales: set = dataclasses.field(default_factory=set)
    arms: set = dataclasses.field(default_factory=set)
    seeds: set = dataclasses.field(default_factory=set)

    @classmethod
    def parse(cls, items: Sequence[str] | None, scale_names, arm_names) -> 'Filters':
        f = cls()
        for item in items or ():
            if item in scale_names:
                f.scales.add(item)
            elif item in arm_names:
                f.arms.add(item)
            elif item.startswith('seed=') and item[5:].isdigit():
                f.seeds.add(int(item[5:]))
            else:
                raise ValueError(f'--only: {item!r} is not a scale {sorted(scale_names)}, an arm {sorted(arm_names)} '
                                 'or seed=N.')
        return f

    def admit(self, scale: str, arm: str, seed: int) -> bool:
        return ((not self.scales or scale in self.scales) and (not self.arms or arm in self.arms)
                and (not self.seeds or seed in self.seeds))


def schedule(scale: Scale, workdir: str, seeds: int) -> list[tuple[Arm, int]]:
    """Stage 1: every arm at seed 0. Stage 2: seeds 1.. of 'big', of the best grown arm so far (from
    the stored seed-0 runs) and of the default 'grow'."""
    arms = arms_for(scale)
    order = [(arm, 0) for arm in arms]
    by_name = {arm.name: arm for arm in arms}
    extra = ['big']
    best = best_arm(stored_runs(workdir, [scale], 1).get(scale.name, {}))
    if best:
        extra.append(best)
    extra.append('grow')
    for name in dict.fromkeys(extra):
        order += [(by_name[name], seed) for seed in range(1, seeds)]
    return order


def run_all(scales: Sequence[Scale], workdir: str, data_dir: str, seeds: int, filters: Filters,
            max_seconds: float | None, log=print) -> tuple[int, bool]:
    """Trains every scheduled run not stored yet; returns (runs computed, stopped by max_seconds)."""
    started, computed = time.perf_counter(), 0
    for scale in scales:
        corpus = None
        position = 0
        while True:
            todo = [(arm, seed) for arm, seed in schedule(scale, workdir, seeds)
                    if filters.admit(scale.name, arm.name, seed)]
            if corpus is None and todo:
                corpus = load_corpus(scale, data_dir)
            todo = [(a, s) for a, s in todo if load_run(workdir, scale, a, s, corpus.name) is None]
            if not todo:
                break
            if max_seconds is not None and time.perf_counter() - started > max_seconds:
                return computed, True
            arm, seed = todo[0]
            run_started = time.perf_counter()
            record = train_run(scale, arm, seed, corpus, log)
            save_run(workdir, record)
            computed += 1
            position += 1
            last = record['evals'][-1]
            log(f'{scale.name}/{arm.name}/seed{seed}: val {last["val"]:.4f} at {record["total_flops"]:.3g} FLOPs, '
                f'{time.perf_counter() - run_started:.0f} s ({record["wall"]:.0f} s training)', flush=True)
    return computed, False


# ---------------------------------------------------------------------------------------------
# Analysis


def crossing(evals: Sequence[dict], target: float, axis: str = 'flops') -> float | None:
    """The `axis` value (flops or wall) where the validation loss first reaches `target`, linearly
    interpolated between the two evaluations around the crossing; None if it never does."""
    previous = None
    for point in evals:
        if point['val'] <= target:
            if previous is None or previous['val'] <= target:
                return float(point[axis])
            share = (previous['val'] - target) / (previous['val'] - point['val'])
            return float(previous[axis] + share * (point[axis] - previous[axis]))
        previous = point
    return None


def value_at(evals: Sequence[dict], x: float, axis: str = 'flops') -> float | None:
    """The validation loss at `axis` = x, interpolated; None outside the curve."""
    xs = [p[axis] for p in evals]
    if not evals or x < xs[0] or x > xs[-1]:
        return None
    return float(np.interp(x, xs, [p['val'] for p in evals]))


def final_val(run: dict) -> float:
    return run['evals'][-1]['val']


def target_of(big_runs: Sequence[dict]) -> float:
    """The target: the big-from-scratch model's final validation loss, averaged over its seeds."""
    return float(np.mean([final_val(r) for r in big_runs]))


def train_rise(run: dict, big: dict | None, before: int = 10, after: int = 30, window: int = 5) -> float | None:
    """The rise of the train loss over the big-from-scratch model's on the same batches: the highest
    `window`-step mean of (arm - big) in the `after` steps from growth, minus its mean over the `before`
    steps before growth. Batch difficulty cancels; a fast-falling loss does not hide the rise."""
    g = run.get('growth_step')
    if g is None or big is None or g < before:
        return None
    gap = np.asarray(run['train_loss']) - np.asarray(big['train_loss'])[:len(run['train_loss'])]
    if len(gap) < g + after:
        return None
    means = np.convolve(gap[g:g + after], np.ones(window) / window, mode='valid')
    return float(means.max() - gap[g - before:g].mean())


def spike(run: dict) -> dict | None:
    """The loss rise after growth: validation loss right before growth, right after, the highest in
    the evaluations that follow until the next regular one after growth + eval window, and the steps
    until it is back at or below the pre-growth value (None: not within the run)."""
    if run.get('growth_step') is None:
        return None
    g = run['growth_step']
    before = next(p['val'] for p in run['evals'] if p['phase'] == 'before_growth')
    after = next(p['val'] for p in run['evals'] if p['phase'] == 'after_growth')
    later = [p for p in run['evals'] if p['step'] > g]
    window = [p for p in later if p['step'] <= g + 50] or later[:1]
    peak = max([after] + [p['val'] for p in window])
    recovered = 0 if peak <= before else next((p['step'] - g for p in later if p['val'] <= before), None)
    losses = run['train_loss']
    train_before = float(np.mean(losses[max(0, g - 10):g])) if g else None
    train_after = float(np.max(losses[g:g + 10])) if len(losses) > g else None
    return {'before': before, 'after': after, 'peak': peak, 'rise': peak - before, 'recover_steps': recovered,
            'train_before': train_before, 'train_peak': train_after}


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student t interval of the mean; (x, nan, nan) for one value."""
    values = np.asarray(values, float)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, math.nan, math.nan
    from scipy import stats
    half = stats.t.ppf(0.5 + level / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def bootstrap_fraction(arm_runs: Sequence[dict], big_runs: Sequence[dict], samples: int = 4000,
                       seed: int = 0) -> tuple[float, float, float] | None:
    """(share of resamples where every resampled arm seed reaches the target, 2.5%, 97.5% percentiles
    of the mean FLOPs fraction): big seeds resampled (the target moves) and arm seeds resampled."""
    if len(arm_runs) < 2 or len(big_runs) < 1:
        return None
    rng = np.random.default_rng(seed)
    big_final = np.array([final_val(r) for r in big_runs])
    big_flops = float(np.mean([r['total_flops'] for r in big_runs]))
    fractions, reached = [], 0
    for _ in range(samples):
        target = big_final[rng.integers(len(big_final), size=len(big_final))].mean()
        picked = rng.integers(len(arm_runs), size=len(arm_runs))
        values = [crossing(arm_runs[i]['evals'], target) for i in picked]
        if all(v is not None for v in values):
            reached += 1
            fractions.append(np.mean(values) / big_flops)
    if not fractions:
        return reached / samples, math.nan, math.nan
    low, high = np.percentile(fractions, [2.5, 97.5])
    return reached / samples, float(low), float(high)


def summarise(arm_runs: Sequence[dict], big_runs: Sequence[dict]) -> dict:
    """Per arm: FLOPs and wall time to the target as fractions of the big model's, with intervals over
    seeds; the loss at equal FLOPs; the spike after growth."""
    target = target_of(big_runs)
    big_flops = float(np.mean([r['total_flops'] for r in big_runs]))
    big_wall = float(np.mean([r['wall'] for r in big_runs]))
    flops_to = [crossing(r['evals'], target) for r in arm_runs]
    wall_to = [crossing(r['evals'], target, 'wall') for r in arm_runs]
    reached = [f for f in flops_to if f is not None]
    out = {'seeds': len(arm_runs), 'reached': len(reached), 'target': target, 'label': arm_runs[0]['label'],
           'final': t_interval([final_val(r) for r in arm_runs]),
           'flops_total': float(np.mean([r['total_flops'] for r in arm_runs])) / big_flops,
           'flops_to_target': None, 'wall_to_target': None, 'bootstrap': None}
    if len(reached) == len(arm_runs):
        out['flops_to_target'] = t_interval([f / big_flops for f in flops_to])
        out['wall_to_target'] = t_interval([w / big_wall for w in wall_to])
        out['bootstrap'] = bootstrap_fraction(arm_runs, big_runs)
    elif reached:
        out['bootstrap'] = bootstrap_fraction(arm_runs, big_runs)
    # The loss at equal FLOPs: the arm's final loss against the big model's at the arm's total FLOPs.
    equal = []
    for run in arm_runs:
        big_there = [v for b in big_runs if (v := value_at(b['evals'], run['total_flops'])) is not None]
        if big_there:
            equal.append(final_val(run) - float(np.mean(big_there)))
    out['equal_flops_gap'] = t_interval(equal) if equal else None
    big_by_seed = {r['seed']: r for r in big_runs}
    spikes = [dict(s, train_rise=train_rise(r, big_by_seed.get(r['seed'])))
              for r in arm_runs if (s := spike(r)) is not None]
    out['spike'] = spikes[0] if len(spikes) == 1 else (
        {key: (float(np.mean([s[key] for s in spikes])) if all(s[key] is not None for s in spikes) else None)
         for key in spikes[0]} if spikes else None)
    return out


def best_arm(per_arm: dict[str, list[dict]]) -> str | None:
    """The grown arm with the fewest FLOPs to the target at seed 0 (if none reaches it, the lowest
    final loss); None before the big model and a grown arm are stored."""
    if 'big' not in per_arm:
        return None
    target = target_of(per_arm['big'])
    candidates = []
    for name, runs in per_arm.items():
        if name in ('big', 'small'):
            continue
        run = next((r for r in runs if r['seed'] == 0), None)
        if run is None:
            continue
        to = crossing(run['evals'], target)
        candidates.append((to is None, to if to is not None else final_val(run), name))
    return min(candidates)[2] if candidates else None


# ---------------------------------------------------------------------------------------------
# The page


def _fmt(interval, percent: bool = False, digits: int = 3) -> str:
    if interval is None:
        return '—'
    mean, low, high = interval
    scale = 100 if percent else 1
    unit = '%' if percent else ''
    if math.isnan(low):
        return f'{mean * scale:.{1 if percent else digits}f}{unit}'
    return (f'{mean * scale:.{1 if percent else digits}f}{unit} [{low * scale:.{1 if percent else digits}f}, '
            f'{high * scale:.{1 if percent else digits}f}]')


def figure_curves(scale: Scale, per_arm: dict, path: str) -> str | None:
    """Validation loss vs cumulative FLOPs, seed 0 of every arm (other seeds faint)."""
    if 'big' not in per_arm:
        return None
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    target = target_of(per_arm['big'])
    cmap = plt.get_cmap('tab20')
    for i, (name, runs) in enumerate(per_arm.items()):
        for run in runs:
            xs = [p['flops'] for p in run['evals']]
            ys = [p['val'] for p in run['evals']]
            style = {'lw': 2.2 if name in ('big', 'grow') else 1.2, 'color': 'black' if name == 'big' else cmap(i)}
            ax.plot(xs, ys, alpha=1.0 if run['seed'] == 0 else 0.3,
                    label=run['label'] if run['seed'] == 0 else None, **style)
    ax.axhline(target, color='gray', ls='--', lw=1, label='target: big model\'s final loss')
    ax.set_xlabel('cumulative training FLOPs (XLA cost analysis)')
    ax.set_ylabel('validation loss (nats/byte)')
    finals = [final_val(r) for runs in per_arm.values() for r in runs]
    ax.set_ylim(min(finals) - 0.05, min(finals) + 1.2)
    ax.set_title(f'{scale.name}: {scale.small[0]}x{scale.small[1]} -> {scale.big[0]}x{scale.big[1]}, '
                 f'{scale.steps} steps x {scale.batch * scale.seq_len} tokens')
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def figure_spike(scale: Scale, per_arm: dict, path: str) -> str | None:
    """Around growth, each grown arm's loss minus the big-from-scratch model's at the same step (seed 0):
    train loss on the same batches (5-step means; batch difficulty cancels) and validation loss."""
    grown = {name: next(r for r in runs if r['seed'] == 0) for name, runs in per_arm.items()
             if any(r['seed'] == 0 for r in runs) and runs[0].get('growth_step') is not None}
    big = next((r for r in per_arm.get('big', []) if r['seed'] == 0), None)
    if not grown or big is None:
        return None
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    cmap = plt.get_cmap('tab20')
    big_train = np.asarray(big['train_loss'])
    big_steps = [p['step'] for p in big['evals']]
    big_val = [p['val'] for p in big['evals']]
    for i, (name, run) in enumerate(grown.items()):
        g = run['growth_step']
        losses = np.asarray(run['train_loss'])
        n = min(len(losses), len(big_train))
        gap = np.convolve(losses[:n] - big_train[:n], np.ones(5) / 5, mode='valid')  # gap[j]: steps j..j+4
        lo, hi = max(0, g - 30), min(len(gap), g + 80)
        ax.plot(np.arange(lo, hi) + 2 - g, gap[lo:hi], color=cmap(i), lw=1, label=f'{run["label"]} (train)')
        points = [(p['step'] - g, p['val'] - float(np.interp(p['step'], big_steps, big_val)))
                  for p in run['evals'] if g - 30 <= p['step'] <= g + 80 and p['phase'] != 'before_growth']
        ax.plot(*zip(*points), 'o--', color=cmap(i), ms=3, lw=0.8)
    ax.axvline(0, color='gray', lw=1)
    ax.axhline(0, color='black', lw=0.8)
    ax.set_xlabel('steps after growth')
    ax.set_ylabel('loss - big from scratch at the same step (nats/byte)')
    ax.set_title(f'{scale.name}: around growth (lines: train, 5-step means; dots: validation)')
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def verdict(results: dict[str, dict], scales: Sequence[Scale]) -> str:
    """The sentence at the top of the page, from the numbers."""
    parts = []
    for scale in scales:
        summary = results.get(scale.name)
        if not summary:
            continue
        where = f'at {scale.name} ({scale.small[0]}x{scale.small[1]} -> {scale.big[0]}x{scale.big[1]})'
        grown = [name for name in summary if name not in ('big', 'small')]
        best = min(((s['flops_to_target'][0], name) for name, s in summary.items()
                    if name in grown and s['flops_to_target'] is not None), default=None)
        if best is None:
            parts.append(f'{where}, none of the {len(grown)} grown arms run reached the big-from-scratch model\'s final '
                         'validation loss within the same token budget, so none saved FLOPs')
            continue
        s = summary[best[1]]
        low, high = s['flops_to_target'][1:]
        interval = (f' (one seed)' if math.isnan(low) else
                    f' (95% t interval over {s["seeds"]} seeds: {low:.0%}–{high:.0%})')
        met = 'meets' if (high if not math.isnan(high) else best[0]) <= 0.6 else 'misses'
        reached = [summary[name]['label'] for name in grown if summary[name]['flops_to_target'] is not None]
        parts.append(f'{where}, the best grown arm ("{s["label"]}") reached the big-from-scratch model\'s final '
                     f'validation loss with {best[0]:.0%} of its FLOPs{interval}, {1 - best[0]:.0%} fewer: it {met} '
                     f'the target of at least 40% fewer FLOPs ({len(reached)} of {len(grown)} grown arms reached that '
                     f'loss at all: {"; ".join(reached)})')
    if not parts:
        return 'No results are stored yet.'
    return 'Verdict: ' + '; '.join(parts) + '.'


def across_scales(scales: Sequence[Scale], results: dict[str, dict]) -> str:
    """One row per arm, one column per scale: FLOPs to the target (or the final-loss gap to the big model)."""
    run = [scale for scale in scales if results.get(scale.name)]
    if len(run) < 2:
        return ''
    lines = ['## Across scales', '',
             'FLOPs to the big model\'s final loss as a fraction of its FLOPs (mean over seeds), or, where not '
             'reached, the arm\'s final validation loss minus the big model\'s.', '',
             '| arm | ' + ' | '.join(f'{s.name} ({s.small[0]}x{s.small[1]} -> {s.big[0]}x{s.big[1]})' for s in run) + ' |',
             '|---|' + '---|' * len(run)]
    for arm in arms_for(run[0]):
        if arm.name == 'big':
            continue
        cells = []
        for scale in run:
            s = results[scale.name].get(arm.name)
            if s is None:
                cells.append('not run')
            elif s['flops_to_target'] is not None:
                cells.append(f'{s["flops_to_target"][0]:.0%} ({s["seeds"]} seed{"s" if s["seeds"] > 1 else ""})')
            else:
                cells.append(f'not reached, {s["final"][0] - s["target"]:+.3f}')
        lines.append(f'| {"small model alone" if arm.name == "small" else arm.label.split(" (")[0]} | '
                     + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def write_page(scales: Sequence[Scale], workdir: str, page: str, *, seeds: int = 3, command: str = '',
               quick: bool = False) -> str:
    runs = stored_runs(workdir, scales, seeds)
    figures_dir = os.path.join(os.path.dirname(page), 'figures')
    results, sections = {}, []
    for scale in scales:
        per_arm = runs.get(scale.name, {})
        arms = {arm.name: arm for arm in arms_for(scale)}
        lines = [f'## {scale.name}: {scale.small[0]}x{scale.small[1]} -> {scale.big[0]}x{scale.big[1]} '
                 f'(depth x width, head_dim {scale.head_dim}, MLP 4x width)', '']
        if 'big' not in per_arm:
            lines += [f'Not run yet: no stored run of the big model from scratch, so nothing can be compared '
                      f'(`python -m experiments.growth --scales={scale.name}` runs this scale).', '']
            results[scale.name] = {}
            sections.append('\n'.join(lines))
            continue
        big = per_arm['big']
        summary = {name: summarise(r, big) for name, r in per_arm.items()}
        results[scale.name] = summary
        b0 = big[0]
        lines += [f'Budget: {scale.steps} steps x {scale.batch} x {scale.seq_len} bytes = '
                  f'{scale.steps * scale.batch * scale.seq_len:,} training bytes for every arm. '
                  f'Train-step FLOPs (XLA): small {per_arm.get("small", [{}])[0].get("step_flops", {}).get("small", math.nan):.3g}, '
                  f'big {b0["step_flops"]["big"]:.3g}; the big model\'s whole run {b0["total_flops"]:.3g} FLOPs. '
                  f'Target = the big model\'s final validation loss, mean over {len(big)} seed(s): '
                  f'**{summary["big"]["target"]:.4f}** nats/byte ({_fmt(summary["big"]["final"], digits=4)})'
                  + (f'; seed-to-seed std of that final loss {np.std([final_val(r) for r in big], ddof=1):.4f} '
                     '(single-seed gaps below about twice this are within seed noise)' if len(big) > 1 else '')
                  + '. "loss - big at equal FLOPs" < 0: the arm is better.', '']
        lines += ['| arm | seeds | growth FLOPs | FLOPs to target (fraction of big; 95% t) | bootstrap 95% | '
                  'wall to target (fraction) | run FLOPs (fraction) | final val loss | loss - big at equal FLOPs | '
                  'spike after growth (val) | steps to recover | train-loss rise vs big (same batches) |',
                  '|---|---|---|---|---|---|---|---|---|---|---|---|']
        for name, arm in arms.items():
            if name not in summary:
                lines.append(f'| {arm.label} | 0 | | not run yet | | | | | | | | |')
                continue
            s, run = summary[name], per_arm[name][0]
            if name == 'big':
                to, wall = 'the reference (100%; its seeds end around the target)', '—'
                s = dict(s, bootstrap=None)
            elif s['flops_to_target'] is not None:
                to = _fmt(s['flops_to_target'], percent=True)
                wall = _fmt(s['wall_to_target'], percent=True)
            else:
                to = f'not reached ({s["reached"]}/{s["seeds"]} seeds)'
                wall = '—'
            boot = s['bootstrap']
            boot_text = '—' if boot is None or math.isnan(boot[1]) else (
                f'{boot[1]:.0%}–{boot[2]:.0%}' + (f' (reached in {boot[0]:.0%} of resamples)' if boot[0] < 1 else ''))
            sp = s['spike']
            spike_text = '—' if sp is None else f'{sp["before"]:.3f} → {sp["after"]:.3f}, peak +{max(0.0, sp["rise"]):.3f}'
            recover = '—' if sp is None else ('not within the run' if sp['recover_steps'] is None
                                              else f'{sp["recover_steps"]:.0f}')
            growth = f'{run["growth_flops"]:.2g}' if run.get('growth_step') is not None else '—'
            rise_text = '—' if sp is None or sp.get('train_rise') is None else f'{sp["train_rise"]:+.3f}'
            lines.append(f'| {arm.label} | {s["seeds"]} | {growth} | {to} | {boot_text} | {wall} | '
                         f'{s["flops_total"]:.0%} | {_fmt(s["final"], digits=4)} | '
                         f'{"—" if name == "big" else _fmt(s["equal_flops_gap"], digits=3)} | {spike_text} | {recover} | '
                         f'{rise_text} |')
        missing = [arm.label for name, arm in arms.items() if name not in summary]
        lines.append('')
        if missing:
            lines += [f'Missing at this scale (not run in the time available): {", ".join(missing)}.', '']
        for kind, fig in (('curves', figure_curves(scale, per_arm, os.path.join(figures_dir, f'growth_{scale.name}.png'))),
                          ('spike', figure_spike(scale, per_arm, os.path.join(figures_dir, f'growth_{scale.name}_spike.png')))):
            if fig:
                caption = ('Validation loss vs cumulative training FLOPs' if kind == 'curves'
                           else 'Loss around growth minus the big model\'s at the same step')
                lines += [f'![{caption}, {scale.name}](figures/{os.path.basename(fig)})', '']
        loads = [x for runs_ in per_arm.values() for r in runs_ for x in r['machine']['load_1min']]
        lines += [f'Machine: {b0["machine"]["cpus"]} CPU cores ({b0["machine"]["backend"]}, jax {b0["machine"]["jax"]}), '
                  f'shared with other jobs: 1-minute load average {min(loads):.1f}–{max(loads):.1f} during these runs, '
                  'so wall times are noisy; FLOPs are the primary axis.', '']
        sections.append('\n'.join(lines))

    sections.append(across_scales(scales, results))
    log = invocations.read(workdir)
    header = [
        '# Growing a GPT during training: FLOPs to the big model\'s loss' + (' (quick smoke run)' if quick else ''),
        '',
        verdict(results, scales),
        '',
        'Generated by `experiments/growth.py` from the runs stored in its workdir; do not edit by hand. '
        'Commands that produced them:',
        '',
        '```bash',
        *(dict.fromkeys(entry['command'] for entry in log) if log else [command or 'python -m experiments.growth']),
        '```',
        '',
        '## What is measured',
        '',
        'Byte-level GPTs (growjax.models gpt: pre-LN, learned positions, untied head) on the Python standard '
        'library corpus (growjax.data.text, train split; validation: a fixed random subset of '
        f'{scales[0].eval_examples} sequences of {scales[0].seq_len} bytes of the validation split, the same for '
        'every run). Every arm sees the same batches in the same order for a seed and the same number '
        'of training bytes. AdamW (b2 0.95, clip 1.0, decoupled weight decay 0.1 on matrices), linear warm-up then '
        f'cosine to {scales[0].min_lr:.0%} over the whole budget ({scales[0].warmup} warm-up steps); the same peak '
        f'learning rate, {scales[0].lr:g}, for every arm and scale (not tuned, neither per arm nor per scale).',
        '',
        'A grown arm trains the small model for its share of the steps, then `growjax.expand` maps it into the big '
        'configuration (width: tiled/split copies, split noise 0.1 unless "exact split"; depth "zero": new blocks '
        f'from the big init with `{ZERO}` at zero, i.e. the identity; "stacked": G_stack copies, cycled), and '
        '`growjax.expand_opt_state` maps the AdamW moments (rule "map") or zeroes them ("reset"). "LR re-warmed": '
        'a new linear warm-up after growth on top of the schedule; "Adam rate 1/k": split leaves\' updates scaled '
        'by `growjax.expand.rate_scales` from growth on.',
        '',
        '- **FLOPs**: XLA\'s cost analysis of the compiled train step of each model (forward, backward and '
        'optimiser update), times the steps run with it, plus the compiled growth (expand + expand_opt_state). '
        'Evaluation is excluded. **Wall time**: training steps and growth only (no compilation, no evaluation).',
        '- **FLOPs to target**: the cumulative FLOPs where the validation curve first reaches the target (the '
        'big-from-scratch model\'s final validation loss, mean over its seeds), interpolated linearly between '
        'evaluations, as a fraction of the big model\'s whole run. "Not reached": not within the token budget. '
        'Intervals: 95% Student t over seeds (target fixed), and a bootstrap that resamples both the arm\'s seeds '
        'and the big model\'s (the target moves); with 3 seeds both are coarse.',
        '- **Loss at equal FLOPs**: the arm\'s final validation loss minus the big model\'s at the same cumulative '
        'FLOPs (interpolated; the big run is then mid-schedule, not annealed, which favours the arm).',
        '- **Spike**: validation loss right before growth → right after (equal when growth preserves the function) '
        'and the highest rise in the 50 steps after; steps to recover: the first evaluation after growth at or '
        'below the pre-growth loss (evaluations at growth + ' + ', '.join(str(s) for s in scales[0].after_growth) +
        ' steps, then every ' + str(scales[0].eval_every) + '). The validation loss falls fast at growth time and '
        'can hide a rise, so also: the train-loss rise against the big-from-scratch run of the same seed on the same '
        'batches (the highest 5-step mean of the difference in the 30 steps from growth, minus its mean over the 10 '
        'steps before).',
        '',
    ]
    text = '\n'.join(header + sections) + '\n'
    os.makedirs(os.path.dirname(os.path.abspath(page)), exist_ok=True)
    with open(page, 'w') as f:
        f.write(text)
    return page


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str]) -> int:
    from absl import flags
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    del argv
    f = flags.FLAGS
    scales_all = QUICK_SCALES if f.quick else SCALES
    names = list(f.scales or scales_all)
    unknown = [n for n in names if n not in scales_all]
    if unknown:
        print(f'error: --scales {unknown}: not among {list(scales_all)}.', file=sys.stderr)
        return 2
    scales = [scales_all[n] for n in names]
    arm_names = {arm.name for s in scales for arm in arms_for(s)}
    try:
        filters = Filters.parse(f.only, set(scales_all), arm_names)
    except ValueError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    seeds = 2 if f.quick and f.seeds is None else (f.seeds or 3)
    page = f.page or (os.path.join(f.workdir, 'docs', 'growth.md') if f.quick else DEFAULT_PAGE)
    typed = ' '.join(['python -m experiments.growth', *sys.argv[1:]]).strip()
    started = time.perf_counter()
    computed, stopped = 0, False
    if not f.report_only:
        try:
            computed, stopped = run_all(scales, f.workdir, f.data_dir, seeds, filters,
                                        None if f.max_minutes is None else 60 * f.max_minutes)
        finally:
            os.makedirs(f.workdir, exist_ok=True)
            invocations.record(f.workdir, {'command': typed, 'computed': computed, 'stopped': stopped,
                                           'minutes': (time.perf_counter() - started) / 60,
                                           'date': time.strftime('%Y-%m-%d %H:%M')})
    path = write_page(scales, f.workdir, page, seeds=seeds, command=typed, quick=f.quick)
    print(f'{path} written ({computed} runs computed{", stopped at --max_minutes" if stopped else ""}) in '
          f'{time.perf_counter() - started:.0f} s.')
    return 0


def define_flags() -> None:
    from absl import flags
    from growjax.config_lib import DEFAULT_CACHE
    flags.DEFINE_string('workdir', 'workdirs/growth', 'Where runs (runs/SCALE/ARM_seedN.json) and the log of '
                        'invocations are kept.')
    flags.DEFINE_string('page', None, 'The page to write (default: this checkout\'s docs/growth.md; with --quick '
                        'WORKDIR/docs/growth.md); figures go to figures/ beside it.')
    flags.DEFINE_bool('quick', False, 'Smoke run: tiny GPTs (1x16 -> 2x32), 40 steps, every arm, two seeds (a few '
                      'minutes, mostly compilation).')
    flags.DEFINE_list('scales', None, f'Scales to run and report (default all: {list(SCALES)}).')
    flags.DEFINE_list('only', None, 'Compute only these: scale names, arm names, seed=N.')
    flags.DEFINE_integer('seeds', None, 'Seeds of the stage-2 arms (default 3).')
    flags.DEFINE_float('max_minutes', None, 'Start no new run after this many minutes (then write the page).')
    flags.DEFINE_bool('report_only', False, 'Compute nothing: write the page from what is stored.')
    flags.DEFINE_string('data_dir', os.path.join(DEFAULT_CACHE, 'tensorflow_datasets'), 'TFDS data_dir of the corpus.')


if __name__ == '__main__':
    from absl import app
    define_flags()
    app.run(lambda argv: sys.exit(main(argv)))

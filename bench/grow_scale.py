"""Time and peak memory of grow_params on ~100M (and ~1B) parameter trees vs a plain copy.

    python3 -m bench.grow_scale [--sizes 100M,1B] [--reps 3]

A wide MLP (Dense 'fc0'..'fcN', W units) is grown by E units per layer: new 'fc{i}_plus' (W -> E)
and 'fc{i}_from_plus' (E -> W) beside every pretrained leaf, which keeps its path and shape.
Cases: `copy` (jit of tree_map(jnp.copy) over a tree of the grown shapes), `grow_jit`
(grow_params under jax.jit) and `grow_eager` (the plain call, as in the README).

Kernels use growjax.nn.lecun_normal_flat, as growjax's models do (Flax's default distribution and
values, drawn faster on CPU).

Time: one process per size, every case once per repeat (interleaved), medians after a first,
compiling call; a breakdown times drawing the new leaves' element count flat (threefry bits only,
uniform, truncated normal by jax.random as Flax's default init draws it, and by growjax.nn). Peak memory: one fresh process per case;
after its inputs exist, the kernel's RSS high-water mark is reset (/proc/self/clear_refs), then the
first call and the repeats run; reported as the peak above the RSS before any array was made.
Also grows a tree sharded over 8 virtual CPU devices under jax.jit(out_shardings=...).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {'100M': (4096, 6, 1024), '1B': (8192, 15, 1024)}  # (W, layers, E)
CASES = ('copy', 'grow_jit', 'grow_eager')


def proc_status(field):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1]) * 1024  # kB


def reset_peak():
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where not allowed (then ru_maxrss)."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def make_models(width, layers, extra):
    import flax.linen as nn
    import jax
    from growjax.nn import lecun_normal_flat

    class MLP(nn.Module):  # kernels drawn as growjax's models draw them (Flax's default distribution)
        grow: int = 0

        @nn.compact
        def __call__(self, x):
            h, hp = x, None
            for i in range(layers):
                out = nn.Dense(width, kernel_init=lecun_normal_flat, name=f'fc{i}')(h)
                if self.grow:
                    if hp is not None:
                        out = out + nn.Dense(width, use_bias=False, kernel_init=lecun_normal_flat,
                                             name=f'fc{i}_from_plus')(hp)
                    hp = jax.nn.relu(nn.Dense(self.grow, kernel_init=lecun_normal_flat, name=f'fc{i}_plus')(h))
                h = jax.nn.relu(out)
            return h

    return MLP(), MLP(grow=extra)


def nbytes(tree):
    import jax
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def setup(size):
    """Models, the pretrained tree, and functions for each case (inputs made, nothing run)."""
    import jax
    import jax.numpy as jnp
    from growjax import grow_params
    from growjax.grow import flatten, unflatten
    width, layers, extra = SIZES[size]
    pre_model, grown_model = make_models(width, layers, extra)
    x = jnp.zeros((1, width))
    pretrained = jax.block_until_ready(jax.jit(pre_model.init)(jax.random.key(0), x))
    grown_shapes = jax.eval_shape(grown_model.init, jax.random.key(1), x)
    pre_flat = flatten(pretrained)
    new = {p: s for p, s in flatten(grown_shapes).items() if p not in pre_flat}
    info = {'pre_bytes': nbytes(pretrained), 'grown_bytes': nbytes(grown_shapes),
            'new_params': sum(s.size for s in new.values())}
    fns = {
        'copy': lambda src: jax.tree.map(jnp.copy, src),
        'grow_jit': lambda p, k: grow_params(p, grown_model, k, x),
    }
    fns = {name: jax.jit(fn) for name, fn in fns.items()}
    fns['grow_eager'] = lambda p, k: grow_params(p, grown_model, k, x)  # noqa: E731

    def copy_source():  # a tree of the grown shapes: the pretrained leaves plus new ones of ones
        ones = jax.block_until_ready(jax.jit(lambda: {p: jnp.ones(s.shape, s.dtype) for p, s in new.items()})())
        return unflatten({**pre_flat, **ones})

    args = {'copy': lambda: (copy_source(),), 'grow_jit': lambda: (pretrained, jax.random.key(1)),
            'grow_eager': lambda: (pretrained, jax.random.key(1))}
    return info, fns, args


def breakdown_fns(n):
    """Drawing n float32 values flat, step by step: what initialising the new leaves costs."""
    import jax
    import jax.numpy as jnp
    from growjax.nn import truncated_normal_flat
    return {'draw new: threefry bits only (jax.random.bits)': jax.jit(lambda k: jax.random.bits(k, (n,), jnp.uint32)),
            'draw new: uniform (jax.random.uniform)': jax.jit(lambda k: jax.random.uniform(k, (n,), jnp.float32)),
            'draw new: truncated normal (jax.random, as Flax default init)':
                jax.jit(lambda k: jax.random.truncated_normal(k, -2.0, 2.0, (n,), jnp.float32)),
            'draw new: truncated normal (growjax.nn chunked, same values)':
                jax.jit(lambda k: truncated_normal_flat(k, n))}


def timing_child(size, reps):
    import jax
    info, fns, make_args = setup(size)
    args = {case: make_args[case]() for case in CASES}
    fns.update(breakdown_fns(info['new_params']))
    args.update({name: (jax.random.key(2),) for name in fns if name not in CASES})
    times = {name: [] for name in fns}
    for _ in range(reps + 1):  # the first round compiles
        for name, fn in fns.items():
            t = time.perf_counter()
            out = jax.block_until_ready(fn(*args[name]))
            times[name].append(time.perf_counter() - t)
            del out
    print(json.dumps({**info, 'median_s': {name: statistics.median(ts[1:]) for name, ts in times.items()}}))


def memory_child(case, size, reps):
    import jax
    import jax.numpy as jnp
    import growjax  # noqa: F401  (imported before the base is taken)
    jax.block_until_ready(jnp.zeros(1) + 1)  # start the runtime before measuring the base
    base = proc_status('VmRSS')
    info, fns, make_args = setup(size)
    args = make_args[case]()
    held = proc_status('VmRSS')
    peaks, times = [], []
    for calls in (1, reps):  # the first (compiling) call, then the repeats
        hwm = reset_peak()
        for _ in range(calls):
            t = time.perf_counter()
            out = jax.block_until_ready(fns[case](*args))
            times.append(time.perf_counter() - t)
            del out
        peaks.append(proc_status('VmHWM') if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps({**info, 'first_s': times[0], 'base': base, 'held': held, 'peak_first': peaks[0],
                      'peak_repeats': peaks[1], 'hwm_reset': hwm}))


def sharded_child():
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import numpy as np
    from growjax import grow_params
    width, layers, extra = SIZES['100M']
    pre_model, grown_model = make_models(width, layers, extra)
    x = jnp.zeros((1, width))
    mesh = Mesh(np.array(jax.devices()), ('d',))
    n = len(jax.devices())

    def spec(s):  # shard the last axis where it divides, else replicate
        return NamedSharding(mesh, P(*([None] * (s.ndim - 1)), 'd') if s.ndim and s.shape[-1] % n == 0 else P())

    pre_sh = jax.tree.map(spec, jax.eval_shape(pre_model.init, jax.random.key(0), x))
    grown_sh = jax.tree.map(spec, jax.eval_shape(grown_model.init, jax.random.key(1), x))
    pretrained = jax.jit(pre_model.init, out_shardings=pre_sh)(jax.random.key(0), x)
    fn = jax.jit(lambda p, k: grow_params(p, grown_model, k, x), out_shardings=grown_sh)
    jax.block_until_ready(fn(pretrained, jax.random.key(1)))
    t = time.perf_counter()
    grown = jax.block_until_ready(fn(pretrained, jax.random.key(1)))
    sec = time.perf_counter() - t
    per_dev = {}
    for leaf in jax.tree.leaves(grown):
        for shard in leaf.addressable_shards:
            per_dev[shard.device.id] = per_dev.get(shard.device.id, 0) + shard.data.nbytes
    stats = jax.devices()[0].memory_stats()
    print(json.dumps({'devices': n, 'total_bytes': nbytes(grown), 'per_device': per_dev, 'seconds': sec,
                      'memory_stats': bool(stats)}))


def run_child(argv, env=None):
    out = subprocess.run([sys.executable, '-m', 'bench.grow_scale', *argv], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, **(env or {})})
    if out.returncode:
        return {'error': out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f'rc {out.returncode}'}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--sizes', default='100M,1B')
    ap.add_argument('--reps', type=int, default=3)
    ap.add_argument('--child', nargs=2)
    ap.add_argument('--timing', metavar='SIZE')
    ap.add_argument('--sharded', action='store_true')
    args = ap.parse_args()
    if args.child:
        return memory_child(*args.child, args.reps)
    if args.timing:
        return timing_child(args.timing, args.reps)
    if args.sharded:
        return sharded_child()
    gb = 1 << 30
    sizes = args.sizes.split(',')
    print(f'Time (one process per size, cases interleaved, median of {args.reps} after a compiling round)\n')
    print('| tree | case | params (pretrained -> grown, new) | median s | time / copy |\n|---|---|---|---|---|')
    for size in sizes:
        r = run_child(['--timing', size, '--reps', str(args.reps)])
        if 'error' in r:
            print(f'| {size} | failed: {r["error"]} ||||')
            continue
        params = f"{r['pre_bytes'] / 4e6:.0f}M -> {r['grown_bytes'] / 4e6:.0f}M, {r['new_params'] / 1e6:.0f}M new"
        copy_s = r['median_s']['copy']
        for name, sec in r['median_s'].items():
            print(f'| {size} | {name} | {params} | {sec:.3f} | {sec / copy_s:.2f} |')
    print('\nPeak memory (one fresh process per case; peak RSS above the RSS before any array was made, during the '
          'first, compiling call and during the repeats; reference: pretrained + grown bytes, for copy its input + '
          'output = 2 x grown)\n')
    print('| tree | case | first call s (fresh process, compiles) | inputs held GiB | peak, first call GiB | '
          'peak, repeats GiB | reference GiB | peak / reference (first call, repeats) |')
    print('|---|---|---|---|---|---|---|---|')
    for size in sizes:
        for case in CASES:
            r = run_child(['--child', case, size, '--reps', str(args.reps)])
            if 'error' in r:
                print(f'| {size} | {case} | failed: {r["error"]} ||||||')
                continue
            ref = (2 * r['grown_bytes'] if case == 'copy' else r['pre_bytes'] + r['grown_bytes']) / gb
            first, rest = ((r[k] - r['base']) / gb for k in ('peak_first', 'peak_repeats'))
            note = '' if r['hwm_reset'] else ' (ru_maxrss: includes making the inputs)'
            print(f"| {size} | {case} | {r['first_s']:.2f} | {(r['held'] - r['base']) / gb:.2f} | {first:.2f}{note} | "
                  f"{rest:.2f} | {ref:.2f} | {first / ref:.2f}, {rest / ref:.2f} |")
    r = run_child(['--sharded'], {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'})
    print('\n| sharded grow (100M, 8 CPU devices, last axis sharded) | value |\n|---|---|')
    if 'error' in r:
        print(f'| failed | {r["error"]} |')
    else:
        per = list(r['per_device'].values())
        print(f"| grown tree total | {r['total_bytes'] / 1e6:.1f} MB |\n"
              f"| per-device addressable shard bytes (min / max) | {min(per) / 1e6:.1f} / {max(per) / 1e6:.1f} MB |\n"
              f"| per-device / total | {max(per) / r['total_bytes']:.3f} (ideal {1 / r['devices']:.3f}) |\n"
              f"| grow time (compiled) | {r['seconds']:.2f} s |\n"
              f"| device.memory_stats() available | {r['memory_stats']} |")


if __name__ == '__main__':
    main()

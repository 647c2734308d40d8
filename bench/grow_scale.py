"""Time and peak memory of grow_params on ~100M (and ~1B) parameter trees vs a plain copy.

    python3 bench/grow_scale.py [--sizes 100M,1B] [--reps 3]

Each case runs in its own subprocess; peak memory is that process's ru_maxrss. A wide MLP
(Dense 'fc0'..'fcN', W units) is grown by E units per layer: new 'fc{i}_plus' (W -> E) and
'fc{i}_from_plus' (E -> W) beside every pretrained leaf, which keeps its path and shape.
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SIZES = {'100M': (4096, 6, 1024), '1B': (8192, 15, 1024)}  # (W, layers, E)


def rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def make_models(width, layers, extra):
    import flax.linen as nn
    import jax

    class MLP(nn.Module):
        grow: int = 0

        @nn.compact
        def __call__(self, x):
            h, hp = x, None
            for i in range(layers):
                out = nn.Dense(width, name=f'fc{i}')(h)
                if self.grow:
                    if hp is not None:
                        out = out + nn.Dense(width, use_bias=False, name=f'fc{i}_from_plus')(hp)
                    hp = jax.nn.relu(nn.Dense(self.grow, name=f'fc{i}_plus')(h))
                h = jax.nn.relu(out)
            return h

    return MLP(), MLP(grow=extra)


def nbytes(tree):
    import jax
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def child(case, size, reps):
    import jax
    import jax.numpy as jnp
    from growjax import grow_params
    base_rss = rss_bytes()
    width, layers, extra = SIZES[size]
    pre_model, grown_model = make_models(width, layers, extra)
    x = jnp.zeros((1, width))
    pretrained = jax.jit(pre_model.init)(jax.random.key(0), x)
    grown_shapes = jax.eval_shape(grown_model.init, jax.random.key(1), x)
    pre_b, grown_b = nbytes(pretrained), nbytes(grown_shapes)
    if case == 'copy':  # a plain copy of the grown tree's bytes (input made first, then copied)
        src = jax.jit(lambda: jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), grown_shapes))()
        del pretrained
        fn = jax.jit(lambda t: jax.tree.map(jnp.copy, t))
        args = (src,)
        ref_b = 2 * grown_b  # input + output
    elif case == 'grow_jit':
        fn = jax.jit(lambda p, k: grow_params(p, grown_model, k, x))
        args = (pretrained, jax.random.key(1))
        ref_b = pre_b + grown_b
    else:  # grow_eager: the library call as the README shows it (init jitted inside, graft by reference)
        fn = lambda p, k: grow_params(p, grown_model, k, x)  # noqa: E731
        args = (pretrained, jax.random.key(1))
        ref_b = pre_b + grown_b
    times = []
    for i in range(reps + 1):  # the first call includes compilation
        t = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
        del out
    print(json.dumps({'case': case, 'size': size, 'params_pre': pre_b // 4, 'params_grown': grown_b // 4,
                      'first_s': times[0], 'median_s': statistics.median(times[1:]), 'peak': rss_bytes(),
                      'base_rss': base_rss, 'ref_bytes': ref_b, 'pre_bytes': pre_b, 'grown_bytes': grown_b}))


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
    out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    if out.returncode:
        return {'error': out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f'rc {out.returncode}'}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--sizes', default='100M,1B')
    ap.add_argument('--reps', type=int, default=3)
    ap.add_argument('--child', nargs=2)
    ap.add_argument('--sharded', action='store_true')
    args = ap.parse_args()
    if args.child:
        return child(*args.child, args.reps)
    if args.sharded:
        return sharded_child()
    gb = 1 << 30
    print('| tree | case | params (pretrained -> grown) | first call s | median s | time / copy | '
          'peak RSS GiB | peak - start GiB | (pretrained+grown) GiB | peak / (pre+grown) | (peak-start) / (pre+grown) |')
    print('|---|---|---|---|---|---|---|---|---|---|---|')
    for size in args.sizes.split(','):
        results = {c: run_child(['--child', c, size, '--reps', str(args.reps)]) for c in ('copy', 'grow_jit', 'grow_eager')}
        copy_s = results['copy'].get('median_s')
        for case, r in results.items():
            if 'error' in r:
                print(f'| {size} | {case} | failed: {r["error"]} |||||||||')
                continue
            pg = (r['pre_bytes'] + r['grown_bytes']) / gb
            print(f"| {size} | {case} | {r['params_pre'] / 1e6:.0f}M -> {r['params_grown'] / 1e6:.0f}M | "
                  f"{r['first_s']:.2f} | {r['median_s']:.2f} | {r['median_s'] / copy_s:.2f} | {r['peak'] / gb:.2f} | "
                  f"{(r['peak'] - r['base_rss']) / gb:.2f} | {pg:.2f} | {r['peak'] / gb / pg:.2f} | "
                  f"{(r['peak'] - r['base_rss']) / gb / pg:.2f} |")
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

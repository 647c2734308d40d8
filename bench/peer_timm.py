"""timm peer: the same ViT fine-tuning step in growjax (JAX) and in timm's VisionTransformer (PyTorch).

timm is not importable beside torch 2.13 (this repository's test pin); it is beside torch 2.14.1,
so this runs in its own virtual environment, outside the repository and outside CI, with jax
installed there too (the CUDA build of torch is the one PyPI serves for Python 3.11; ~5.5 GB):

    python3 -m venv /tmp/venv_timm
    /tmp/venv_timm/bin/pip install torch==2.14.1 torchvision==0.29.1 timm
    # growjax's runtime pins (jax 0.10.2, flax, optax, orbax, grain, ...), without torch and tensorflow:
    /tmp/venv_timm/bin/pip install -r <(grep -v -E '^(torch|tensorflow-cpu|pytest|hypothesis|-e)' requirements.txt)
    /tmp/venv_timm/bin/python -m bench.peer_timm [--reps 7] [--iters 3] [--cases builtin,small96,S16_64]
    /tmp/venv_timm/bin/python -m bench.peer_timm --profile small96   # torch's per-op times

What runs (cases: bench/vit_step.py's CASES): the fine-tuning train step of a ViT, regime `all`,
float32, forward + cross-entropy + backward + SGD (momentum 0.9, weight decay 5e-4 on kernels
only: not on LayerNorms, biases, the class token or the position embeddings; the new head at 10x
the learning rate). growjax: bench/vit_step.py's `Step` (config_lib.vit_config, train.build_model,
grow_params, groups.param_groups, steps.make_optimizer, steps.make_train_step under
steps.shard_train_step). timm: `timm.models.vision_transformer.VisionTransformer` with the same
sizes (class token, exact GELU, LayerNorm eps 1e-6, qkv bias, timm's default fused attention
`F.scaled_dot_product_attention`) and `torch.optim.SGD` with parameter groups reproducing the optax
chain. The script asserts equal parameter counts and that growjax's ViT, given timm's weights
(growjax.pretrained.from_torch), computes timm's logits.

Both run in one process; every runner runs once per repeat (order reversed on odd repeats); ratios
are medians of per-repeat paired ratios (time / timm with 2 threads in the same repeat); "best" uses
each row's fastest repeat. torch threads: --threads (default: the core count) and --torch_threads
(also timed, e.g. 1). GFLOP/s uses XLA's cost analysis of growjax's step for both (the same
arithmetic); torch's own FlopCounterMode count of its step (matmuls and attention only) is printed
beside it.
"""
import argparse
import os
import statistics
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument('--reps', type=int, default=7)
ap.add_argument('--iters', type=int, default=3)
ap.add_argument('--cases', default='builtin,small96,S16_64')
ap.add_argument('--threads', type=int, default=os.cpu_count(), help='torch intra-op threads (default: cores)')
ap.add_argument('--torch_threads', default='1', help='extra torch thread counts to time as well')
ap.add_argument('--forward', action='store_true', help='also time the inference forward pass in both')
ap.add_argument('--profile', default='', help='a case: print torch.profiler\'s per-op table of the timm step, exit')
args = ap.parse_args()

import jax
import jax.numpy as jnp
import numpy as np
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from bench import vit_step  # growjax's step, reused as is
from bench.timing import Timed, TorchThreads, TorchTrainStep, measure, paired
from growjax import models, pretrained

torch.set_num_threads(args.threads)


def timm_vit(case: vit_step.Case, num_classes: int) -> VisionTransformer:
    return VisionTransformer(img_size=case.size, patch_size=int(case.variant.split('/')[1]), in_chans=case.channels,
                             num_classes=num_classes, global_pool='token', embed_dim=case.width, depth=case.depth,
                             num_heads=case.num_heads, mlp_ratio=case.mlp_dim / case.width, qkv_bias=True,
                             class_token=True)


def same_function(case: vit_step.Case) -> float:
    """Max |logit difference| between timm's ViT and growjax's ViT given timm's (random) weights."""
    torch.manual_seed(0)
    model = timm_vit(case, vit_step.NUM_TARGET).eval()
    with torch.no_grad():  # random LayerNorm affines, class token and position embeddings: every tensor matters
        for name, p in model.named_parameters():
            if p.dim() == 1 or 'pos_embed' in name or 'cls_token' in name:
                p.normal_(0.0, 0.2 if p.dim() == 1 else 0.5)
                if name.endswith('norm1.weight') or name.endswith('norm2.weight') or name == 'norm.weight':
                    p.add_(1.0)
    variables = pretrained.from_torch({k: v.numpy() for k, v in model.state_dict().items()}, 'vit',
                                      num_heads=case.num_heads)
    ours = models.get('vit', num_classes=vit_step.NUM_TARGET, variant=case.variant, width=case.width,
                      depth=case.depth, mlp_dim=case.mlp_dim, num_heads=case.num_heads)
    x = np.random.default_rng(3).standard_normal((2, case.size, case.size, case.channels)).astype(np.float32)
    with torch.no_grad():
        reference = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    return float(np.abs(np.asarray(ours.apply(variables, jnp.asarray(x))) - reference).max())


class TimmStep(TorchTrainStep):
    """timm's ViT step (bench/timing.py's TorchTrainStep): weight decay on kernels only (as
    steps.decay_mask), the re-initialised classifier at 10x."""

    def __init__(self, case: vit_step.Case, batch_np: dict, forward_only: bool = False):
        torch.manual_seed(0)
        super().__init__(timm_vit(case, vit_step.NUM_TARGET), batch_np, forward_only=forward_only,
                         decays=lambda name, p: p.dim() > 1 and name not in ('cls_token', 'pos_embed'),
                         new=lambda name, p: name.startswith('head.'))

    def flops(self) -> float:
        from torch.utils.flop_counter import FlopCounterMode
        counter = FlopCounterMode(display=False)
        with counter:
            self.step()
        return float(counter.get_total_flops())


class JaxForward(Timed):
    """growjax's ViT inference forward pass (jit of model.apply), for --forward."""

    def __init__(self, step: vit_step.Step):
        super().__init__()
        variables = jax.tree.map(jnp.copy, step.state.variables())  # the train step donates its state
        self.variables, self.image = variables, step.batch['image']
        self.fn = jax.jit(lambda v, x: step.model.apply(v, x, train=False)).lower(variables, self.image).compile()
        self.flops = vit_step.flops_of(self.fn)
        self.run(2)

    def step(self):
        return self.fn(self.variables, self.image)


def torch_profile(case_name: str):
    case = vit_step.CASES[case_name]
    step = TimmStep(case, vit_step.make_batch(case))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step.step()
    print(f'## torch.profiler: timm step, {case.label}, batch {case.batch}, torch threads {torch.get_num_threads()} '
          f'(3 steps; times are totals over them)\n')
    print(prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=30))


def main():
    print(f'jax {jax.__version__}, torch {torch.__version__}, timm {timm.__version__}, Python '
          f'{sys.version.split()[0]}; torch threads {torch.get_num_threads()} (--threads; cores {os.cpu_count()}); '
          f'load average at start {os.getloadavg()[0]:.2f}')
    if args.profile:
        torch_profile(args.profile)
        return
    extra_threads = [int(t) for t in args.torch_threads.split(',') if t]
    cases = []
    for name in args.cases.split(','):
        case = vit_step.CASES[name]
        diff = same_function(case)
        assert diff < 1e-3, (name, diff)
        t0 = time.perf_counter()
        js = vit_step.Step(case, 'finetune', 'all')
        ts = TimmStep(case, vit_step.make_batch(case))
        assert js.params == ts.n_params, (name, js.params, ts.n_params)
        torch_flops = ts.flops()
        print(f'{case.label}: {js.params:,} parameters in both (asserted); growjax on timm\'s weights: max |logit '
              f'difference| {diff:.1e}; built in {time.perf_counter() - t0:.0f} s; GFLOP/step: XLA {js.flops / 1e9:.3f}, '
              f'torch FlopCounterMode {torch_flops / 1e9:.3f}', flush=True)
        runners = [('timm', f'threads {torch.get_num_threads()}', 'train', ts)]
        runners += [('timm', f'threads {t}', 'train', TorchThreads(ts, t)) for t in extra_threads]
        runners.append(('growjax', 'jax', 'train', js))
        flops = {'train': js.flops}
        if args.forward:
            tf = TimmStep(case, vit_step.make_batch(case), forward_only=True)
            jf = JaxForward(js)
            flops['forward'] = jf.flops
            runners += [('timm', f'threads {torch.get_num_threads()}', 'forward', tf)]
            runners += [('timm', f'threads {t}', 'forward', TorchThreads(tf, t)) for t in extra_threads]
            runners.append(('growjax', 'jax', 'forward', jf))
        cases.append((case, runners, flops))
    measure([r for _, runners, _ in cases for *_, r in runners], args.reps, args.iters)
    load = os.getloadavg()
    print(f'\nload average at end (1/5/15 min): {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}; '
          f'{args.reps} interleaved repeats of {args.iters} steps\n')
    print('| case | step | framework | threads | img/s (median) | ms/step (median) | ms/step (best) | CPU ms/step '
          '(median) | GFLOP/s (median) | GFLOP/s (best) | time / timm 2 threads (paired median [quartiles]) '
          '| best / timm best |')
    print('|---|---|---|---|---|---|---|---|---|---|---|---|')
    for case, runners, flops in cases:
        for kind in flops:
            ref = next(r for fw, _, k, r in runners if k == kind)
            for fw, threads, k, r in runners:
                if k != kind:
                    continue
                sec = r.seconds
                med, q1, q3 = paired(r, ref)
                print(f'| {case.label} | {kind} | {fw} | {threads} | {case.batch / sec:,.0f} | {sec * 1e3:.1f} | '
                      f'{min(r.times) * 1e3:.1f} | {statistics.median(r.cpu_times) * 1e3:.1f} | '
                      f'{flops[kind] / sec / 1e9:.1f} | {flops[kind] / min(r.times) / 1e9:.1f} | '
                      f'{med:.2f} [{q1:.2f}, {q3:.2f}] | {min(r.times) / min(ref.times):.2f} |')


if __name__ == '__main__':
    main()

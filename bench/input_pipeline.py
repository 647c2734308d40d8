"""Batches/s of the built-in input pipeline alone vs the train step's consumption rate.

    python3 -m bench.input_pipeline [--batch 128] [--batches 100]

Pipeline: growjax.data.make_train_iterator on growjax_latin 16px (train split), as the main job
builds it. Step: the small CNN (width 1) WA-grown train step, regime all, batch 128, fed one
fixed batch (so it measures consumption only).
"""
import argparse
import statistics
import time

import jax

from growjax import config_lib, data

from bench.step_cost import Step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--batch', type=int, default=128)
    ap.add_argument('--batches', type=int, default=100)
    ap.add_argument('--reps', type=int, default=3)
    ap.add_argument('--data_dir', default=config_lib.base_config().data.data_dir)
    args = ap.parse_args()
    source = data.load_source('growjax_latin', 'train', args.data_dir, 16)
    pipe, step_rates = [], []
    step = Step('small_cnn', 1.0, 16, 'wa', 'all', args.batch)
    for rep in range(args.reps):  # interleaved
        it = data.make_train_iterator(source, global_batch_size=args.batch, seed=rep, image_size=16)
        next(it)  # start-up (threads, first read) not counted
        t = time.perf_counter()
        for _ in range(args.batches):
            batch = next(it)
        pipe.append(args.batches / (time.perf_counter() - t))
        step_rates.append(1 / step.run(10))
    p, s = statistics.median(pipe), statistics.median(step_rates)
    print(f'jax {jax.__version__}; batch {args.batch}, image {batch["image"].shape[1:]}, {args.reps} interleaved '
          f'repeats (median)\n')
    print('| what | batches/s | images/s |\n|---|---|---|')
    print(f'| input pipeline alone (make_train_iterator, growjax_latin 16px) | {p:.1f} | {p * args.batch:,.0f} |')
    print(f'| train step consumption (small_cnn w1, WA, regime all) | {s:.1f} | {s * args.batch:,.0f} |')
    print(f'| headroom (pipeline / step) | {p / s:.1f}x | target >= 2x |')


if __name__ == '__main__':
    main()

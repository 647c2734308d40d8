"""Timing shared by the benchmarks: a step timed n iterations at a time (wall and process-CPU seconds
per step), variants interleaved repeat by repeat (so load from other jobs hits every variant alike),
and paired per-repeat ratios (a variant's time over a baseline's in the same repeat)."""
import statistics
import time

import jax
import numpy as np


class Timed:
    """A step to time: subclasses define `step()`, whose result is waited for before the clock stops
    (jax.block_until_ready; other frameworks' results pass through it unchanged)."""

    def __init__(self):
        self.times, self.cpu_times = [], []

    def step(self):
        raise NotImplementedError

    def run(self, n: int) -> tuple[float, float]:
        """(wall seconds, process CPU seconds) per step over n steps."""
        wall, cpu = time.perf_counter(), time.process_time()
        out = None
        for _ in range(n):
            out = self.step()
        jax.block_until_ready(out)
        return (time.perf_counter() - wall) / n, (time.process_time() - cpu) / n

    def time(self, n: int) -> None:
        wall, cpu = self.run(n)
        self.times.append(wall)
        self.cpu_times.append(cpu)

    @property
    def seconds(self) -> float:
        return statistics.median(self.times)


class TorchThreads(Timed):
    """A torch step timed with another intra-op thread count (set around its own timings only)."""

    def __init__(self, inner: Timed, threads: int):
        super().__init__()
        self.inner, self.threads = inner, threads

    def run(self, n: int) -> tuple[float, float]:
        import torch
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self.inner.run(n)
        finally:
            torch.set_num_threads(before)


class TorchTrainStep(Timed):
    """A torch model's step as growjax's train step: model.train(); forward, cross-entropy, backward, SGD
    with momentum (weight decay where `decays(name, param)`, `NEW_LR_MULT` x the rate where `new(name,
    param)`), and the accuracy; with forward_only, the inference forward pass."""
    LR, MOMENTUM, WEIGHT_DECAY, NEW_LR_MULT = 0.01, 0.9, 5e-4, 10.0  # as the growjax steps of bench/

    def __init__(self, model, batch_np: dict, *, decays, new, forward_only: bool = False):
        import torch  # here, not at the top: the jax-only benchmarks import this module without torch
        import torch.nn.functional as F
        super().__init__()
        self._no_grad, self._cross_entropy = torch.no_grad, F.cross_entropy  # kept out of the timed step
        self.model, self.forward_only = model, forward_only
        self.model.train(not forward_only)
        param_groups = {}
        for name, p in self.model.named_parameters():
            param_groups.setdefault((decays(name, p), new(name, p)), []).append(p)
        self.opt = torch.optim.SGD(
            [{'params': ps, 'weight_decay': self.WEIGHT_DECAY if decay else 0.0,
              'lr': self.LR * (self.NEW_LR_MULT if is_new else 1.0)} for (decay, is_new), ps in param_groups.items()],
            lr=self.LR, momentum=self.MOMENTUM)
        self.x = torch.from_numpy(np.array(batch_np['image'].transpose(0, 3, 1, 2), order='C'))
        self.y = torch.from_numpy(np.array(batch_np['label'], np.int64))
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.run(2)  # warm up (oneDNN primitive creation, momentum buffers)

    def step(self):
        if self.forward_only:
            with self._no_grad():
                return self.model(self.x)
        self.opt.zero_grad(set_to_none=True)
        logits = self.model(self.x)
        loss = self._cross_entropy(logits, self.y)
        loss.backward()
        self.opt.step()
        return loss.detach(), (logits.argmax(-1) == self.y).float().mean()


def measure(runners, reps: int, n: int) -> None:
    """Interleaved: every runner once per repeat, the order reversed on odd repeats."""
    runners = list(runners)
    for rep in range(reps):
        for r in (runners if rep % 2 == 0 else runners[::-1]):
            r.time(n)


def paired(variant: Timed, base: Timed, cpu: bool = False) -> tuple[float, float, float]:
    """Median and quartiles over repeats of variant time / base time within the same repeat."""
    a, b = (variant.cpu_times, base.cpu_times) if cpu else (variant.times, base.times)
    q1, median, q3 = np.percentile(np.asarray(a) / np.asarray(b), [25, 50, 75])
    return float(median), float(q1), float(q3)


def fmt(ratio: tuple[float, float, float]) -> str:
    median, q1, q3 = ratio
    return f'{median:.3f} [{q1:.3f}, {q3:.3f}]'


def matmul_peak(n: int = 2048, reps: int = 5, dtype=np.float32) -> float:
    """FLOP/s of an n x n matmul, best of `reps`: the peak the machine gives right now (for MFU)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / min(times)

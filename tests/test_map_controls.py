"""The growth map's controls (issue 23): the NormScale-only arm, sweeps widened until the chosen
rate is interior, and runs that collapsed named and kept out of means and tests."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import map as growth_map
from experiments import map_report, protocol, runner
from growjax import config_lib, methods, models, train
from growjax.errors import UserError
from growjax.models.growth import Growth, GrowthError

# ---------------------------------------------------------------------------------------------
# NormScale only: WA-grow's rescaling of the old units, without its new units


def _classifier_input(model, variables, x):
    _, state = model.apply(variables, x, mutable=['intermediates'])
    return state['intermediates']['classifier_in_fc7'][0]


def test_normscale_only_reads_fc7_rescaled_exactly_as_wa_grow_reads_its_old_units():
    """The control isolates one of WA-grow's two changes: its classifier sees the old fc7 units exactly
    as WA-grow's classifier sees them (gamma * fc7 / ||fc7||), and nothing is added."""
    x = jax.random.normal(jax.random.key(1), (3, 16, 16, 1))
    plain = models.get('small_cnn', num_classes=5, width=0.25)
    control = models.get('small_cnn', num_classes=5, width=0.25, growth=Growth.norm_only())
    wa = models.get('small_cnn', num_classes=5, width=0.25, growth=Growth.wa(8))
    base = plain.init(jax.random.key(0), x)
    variables = control.init(jax.random.key(0), x)
    assert set(variables['params']) - set(base['params']) == {'classifier_norm'}
    assert variables['params']['classifier']['kernel'].shape == base['params']['classifier']['kernel'].shape
    # The pretrained layers as the plain model has them: the control reads them through NormScale.
    grafted = {'params': {**base['params'], 'classifier_norm': variables['params']['classifier_norm']}}
    fc7 = _classifier_input(plain, base, x)
    expected = 10.0 * fc7 / jnp.linalg.norm(fc7, axis=-1, keepdims=True)
    np.testing.assert_allclose(_classifier_input(control, grafted, x), expected, rtol=1e-5, atol=1e-6)
    wa_variables = wa.init(jax.random.key(0), x)
    wa_variables = {'params': {**wa_variables['params'], **{k: v for k, v in base['params'].items()
                                                            if k != 'classifier'}}}
    np.testing.assert_allclose(_classifier_input(wa, wa_variables, x), expected, rtol=1e-5, atol=1e-6)


def test_normscale_method_reaches_the_model_and_refuses_what_it_cannot_be():
    config = config_lib.base_config()
    config.model.width = 0.25
    config.growth.method = 'normscale'
    model = train.build_model(config, 5)
    assert model.growth == Growth(classifier_norm=True, scale_init=config.growth.scale_init)
    assert not methods.get('normscale').grows  # a control: it adds no unit
    config.growth.norm_scale = False  # NormScale only without NormScale: a contradiction, not a plain fine-tune
    with pytest.raises(UserError, match=r'config\.growth\.norm_scale: must be True'):
        config_lib.validate(config)
    with pytest.raises(GrowthError, match=r'growth\.norm_scale'):  # the model refuses it too
        train.build_model(config, 5)
    config.growth.norm_scale, config.model.name = True, 'resnet18'
    with pytest.raises(UserError, match=r'config\.growth\.method: .normscale.*resnet18 has no fc6/fc7 head'):
        config_lib.validate(config)
    resnet = models.get('resnet18', num_classes=5, width=0.125, growth=Growth.norm_only())
    with pytest.raises(GrowthError, match='classifier_norm.*fc6/fc7 head'):
        resnet.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    vit = config_lib.base_config()
    vit.model.name = 'vit'
    vit.growth.method = 'normscale'
    with pytest.raises(UserError, match="growth.method='normscale'"):
        config_lib.validate(vit)


# ---------------------------------------------------------------------------------------------
# Sweeps widened until the chosen rate is interior


class PeakTrainer:
    """Validation accuracy peaks at `peak` (log scale); records what it was asked to run."""
    vectorised = False

    def __init__(self, peak: float):
        self.peak, self.calls = peak, []

    def run(self, shots, seeds, learning_rates, **kwargs):
        self.calls.append((list(seeds), list(learning_rates)))
        return [runner.RunCurves(seed, lr, [0], [1.0], [{'accuracy': 1 - abs(math.log10(lr / self.peak)) / 10}],
                                 {'accuracy': 0.5}) for seed in seeds for lr in learning_rates]


SETTINGS = protocol.Settings(tasks=(), methods=(), regimes=(), seeds=3, sweep_seeds=2,
                             learning_rates=(0.001, 0.003, 0.01, 0.03), steps=0, batch_size=8, eval_every=0,
                             units=8, lora_small_rank=0)


def test_a_rate_chosen_at_the_edge_widens_the_sweep_until_it_is_interior():
    # Without the ladder (the map before issue 23) the best rate is outside the grid: chosen at its edge.
    narrow = protocol.run_protocol(PeakTrainer(1e-4), 1, SETTINGS)
    assert narrow['chosen_lr'] == 0.001
    trainer = PeakTrainer(1e-4)
    group = protocol.run_protocol(trainer, 1, SETTINGS, ladder=protocol.RATE_LADDER)
    assert group['chosen_lr'] == 1e-4 and group['rates'] == [3e-5, 1e-4, 3e-4, 0.001, 0.003, 0.01, 0.03]
    # The sweep seeds run one rate further at a time; the other seeds run the chosen rate only.
    assert trainer.calls == [([0, 1], [0.001, 0.003, 0.01, 0.03]), ([0, 1], [3e-4]), ([0, 1], [1e-4]),
                             ([0, 1], [3e-5]), ([2], [1e-4])]
    swept = protocol.sweep(group['runs'], [0, 1], SETTINGS.learning_rates, protocol.RATE_LADDER)
    assert swept == protocol.Sweep(tuple(group['rates']), 1e-4) and not swept.at_edge
    assert growth_map.complete(group, SETTINGS, (), protocol.RATE_LADDER)
    assert not growth_map.complete(narrow, SETTINGS, (), protocol.RATE_LADDER)  # the narrow group is topped up
    # Runs at another rate (a shared rate every seed ran) do not change the replayed sweep.
    shared = PeakTrainer(1e-4).run(1, [0, 1, 2], [1e-5])
    assert protocol.sweep(group['runs'] + [r.to_json() for r in shared], [0, 1], SETTINGS.learning_rates,
                          protocol.RATE_LADDER) == swept


class PlateauTrainer(PeakTrainer):
    """Validation accuracy 0.9 at every rate up to 0.003, lower above."""

    def run(self, shots, seeds, learning_rates, **kwargs):
        runs = super().run(shots, seeds, learning_rates, **kwargs)
        for run in runs:
            run.validation = [{'accuracy': 0.9 if run.learning_rate <= 0.003 else 0.5}]
        return runs


def test_a_validation_plateau_at_the_edge_ends_the_widening():
    """Ties go to the lower rate: without the plateau rule a flat curve walked the sweep down the ladder
    to 1e-5, one rate at a time, and chose the ladder's end."""
    trainer = PlateauTrainer(1.0)
    group = protocol.run_protocol(trainer, 1, SETTINGS, ladder=protocol.RATE_LADDER)
    assert group['chosen_lr'] == 0.001 and group['rates'] == [0.001, 0.003, 0.01, 0.03]
    swept = protocol.sweep(group['runs'], [0, 1], SETTINGS.learning_rates, protocol.RATE_LADDER)
    assert swept.plateau and not swept.at_edge and len(trainer.calls) == 2


def test_a_sweep_stops_at_the_ladder_end_and_says_it_is_at_an_edge():
    group = protocol.run_protocol(PeakTrainer(3.0), 1, SETTINGS, ladder=protocol.RATE_LADDER)
    assert group['chosen_lr'] == 1.0 and group['rates'][-1] == 1.0
    swept = protocol.sweep(group['runs'], [0, 1], SETTINGS.learning_rates, protocol.RATE_LADDER)
    assert swept.at_edge and swept.next_rate is None
    # An interrupted widening is read as unfinished: the report shows no chosen rate for it yet.
    partial = [r for r in group['runs'] if not (r['learning_rate'] == 1.0 and r['seed'] == 1)]
    assert protocol.sweep(partial, [0, 1], SETTINGS.learning_rates, protocol.RATE_LADDER).next_rate == 1.0


# ---------------------------------------------------------------------------------------------
# Collapsed runs: named, counted, kept out of means and tests


def _run(seed, accuracy, loss=1.0, lr=0.01):
    return {'seed': seed, 'learning_rate': lr, 'train_loss': [2.0, loss], 'test': {'accuracy': accuracy}}


def test_chance_limit_and_what_counts_as_collapsed():
    limit = protocol.chance_limit(10, 1000)
    assert limit == pytest.approx(0.1 + 3 * math.sqrt(0.09 / 1000))
    assert protocol.collapsed(_run(0, 0.9, loss=float('nan')), limit, 10)  # diverged, whatever it scored
    assert protocol.collapsed(_run(0, 0.12), limit, 10) and not protocol.collapsed(_run(0, 0.2), limit, 10)
    # Blew up and landed a little above chance (seen on digits at rate 0.03: test 0.36, training loss 2.44):
    # its training loss is above a uniform guess's, log(10) = 2.30.
    assert protocol.collapsed(_run(0, 0.36, loss=2.44), limit, 10)
    assert not protocol.collapsed(_run(0, 0.36, loss=2.2), limit, 10)


def test_collapsed_runs_are_left_out_of_means_and_tests_and_counted():
    limit = protocol.chance_limit(10, 1000)
    method = {'chance_limit': limit, 'num_classes': 10, 'runs': [_run(0, 0.80), _run(1, 0.10), _run(2, 0.84), _run(3, 0.09),
                                              _run(4, 0.82)]}
    reference = {'chance_limit': limit, 'num_classes': 10, 'runs': [_run(s, a) for s, a in enumerate((0.78, 0.70, 0.80, 0.74, 0.79))]}
    arm, ref = map_report.Arm(method, 0.01), map_report.Arm(reference, 0.01)
    assert arm.values == {0: 0.80, 2: 0.84, 4: 0.82} and arm.collapsed == [1, 3] and arm.stored == 5
    assert map_report.arm_text(arm, 5) == '82.0 ± 5.0 (2 of 5 seeds collapsed, left out)'
    d = map_report.paired(arm, ref, 5)
    assert (d.n, d.left_out) == (3, 2) and d.mean == pytest.approx(np.mean([0.02, 0.04, 0.03]))
    assert d.text().endswith('(2 collapsed, left out)')
    # The report's accuracy for the cell is the mean of the seeds that did not collapse (82.0), where
    # averaging every run (as the map did before) gave 53.0: a 23-point loss against fine-tuning's 76.2.
    assert map_report.mean_half(arm.values)[0] == pytest.approx(82.0)
    # With fewer than two seeds left there is no test: the cell names what collapsed instead.
    method['runs'][0]['train_loss'][-1] = float('inf')
    method['runs'][2]['test']['accuracy'] = 0.05
    assert map_report.paired(arm, ref, 5) is None
    assert map_report.gain_cell(arm, ref, 5, ('WA-grow', 'fine-tune')) == \
        'collapsed: WA-grow 4 of 5 seeds diverged or at chance'
    assert map_report.gain_cell(map_report.Arm(method, 0.03), ref, 5, ('WA-grow', 'fine-tune')) == ''  # not run


# ---------------------------------------------------------------------------------------------
# The decomposition: WA-grow − fine-tune = (NormScale only − fine-tune) + (WA-grow − NormScale only)


def test_decomposition_adds_up_over_the_seeds_no_arm_lost():
    limit = 0.2
    group = lambda accuracies: {'chance_limit': limit, 'num_classes': 10, 'runs': [_run(s, a) for s, a in enumerate(accuracies)]}
    wa = map_report.Arm(group((0.80, 0.75, 0.90, 0.70, 0.85)), 0.01)
    normscale = map_report.Arm(group((0.78, 0.74, 0.10, 0.69, 0.80)), 0.01)  # seed 2 collapsed
    finetune = map_report.Arm(group((0.70, 0.72, 0.88, 0.60, 0.79)), 0.01)
    d = map_report.decompose(wa, normscale, finetune, 5)
    assert d.total.n == d.rescaling.n == d.units.n == 4 and d.total.left_out == 1
    assert d.total.mean == pytest.approx(d.rescaling.mean + d.units.mean)
    assert d.units.mean == pytest.approx(np.mean([0.02, 0.01, 0.01, 0.05]))
    assert map_report.decompose(wa, map_report.Arm(group((0.8,) * 4), 0.01), finetune, 5) is None  # incomplete


# ---------------------------------------------------------------------------------------------
# Cached models are kept apart by target


def test_cached_models_of_two_targets_with_one_fingerprint_are_kept_apart(tmp_path):
    """A run's fingerprint does not hold its target (the group's path does): Greek and digits at 5 shots
    train 60 steps each, so at one rate the forgetting axis read Greek's cached model for digits
    (10 of 165 retrained seeds then missed their stored runs)."""
    base = config_lib.base_config()
    m = growth_map.Map(base, growth_map.FULL, str(tmp_path))
    greek = growth_map.Cell('growjax_greek', 5, m.width, growth_map.make_method('wa', base, 128, 24), 60, 15)
    digits = dataclasses.replace(greek, dataset='growjax_digits')
    assert m.expected(greek) == m.expected(digits)  # why the key must hold the target
    assert m.model_path(greek, 0, 0.01) != m.model_path(digits, 0, 0.01)
    assert m.model_path(greek, 0, 0.01) == m.model_path(dataclasses.replace(greek), 0, 0.01)


# ---------------------------------------------------------------------------------------------
# Hurried mistakes with the new pieces end in a right result or a clear error


def test_a_ladder_given_out_of_order_widens_the_same_way():
    group = protocol.run_protocol(PeakTrainer(1e-4), 1, SETTINGS, ladder=protocol.RATE_LADDER[::-1])
    assert group['chosen_lr'] == 1e-4 and group['rates'] == [3e-5, 1e-4, 3e-4, 0.001, 0.003, 0.01, 0.03]


class DriftingTrainer(PeakTrainer):
    """Returns its runs at a rate a hair off the one asked for (e.g. a rate recomputed in float32)."""

    def run(self, shots, seeds, learning_rates, **kwargs):
        runs = super().run(shots, seeds, learning_rates, **kwargs)
        for run in runs:
            if run.learning_rate < 0.001:
                run.learning_rate *= 1 + 1e-7
        return runs


def test_a_trainer_that_alters_the_rate_is_an_error_not_an_endless_sweep():
    with pytest.raises(RuntimeError, match='asked twice for rate 0.0003'):
        protocol.run_protocol(DriftingTrainer(1e-4), 1, SETTINGS, ladder=protocol.RATE_LADDER)


def test_a_group_read_without_its_chance_limit_raises_instead_of_averaging_collapsed_runs():
    group = {'runs': [_run(0, 0.1, loss=float('nan')), _run(1, 0.8)]}  # not through experiments.map.with_choice
    with pytest.raises(KeyError, match='chance_limit'):
        map_report.values(group, 0.01)

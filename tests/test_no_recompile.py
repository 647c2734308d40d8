"""A run of the main job compiles its train step and its eval step exactly once each.

A second compile would mean that some input changed shape, dtype, sharding or committedness
between calls (e.g. the state after donation, the last eval batch, a restored checkpoint): on a
real model every recompile costs minutes.
"""
from growjax import steps, train


def test_train_and_eval_steps_compile_once(tiny_config, tmp_path, monkeypatch):
    jitted = {}

    def capture(name, make):
        def wrapper(*args, **kwargs):
            jitted[name] = make(*args, **kwargs)
            return jitted[name]
        return wrapper

    monkeypatch.setattr(steps, 'shard_train_step', capture('train', steps.shard_train_step))
    monkeypatch.setattr(steps, 'shard_eval_step', capture('eval', steps.shard_eval_step))
    config = tiny_config('wa')
    train.train_and_evaluate(config, str(tmp_path / 'run'))
    assert set(jitted) == {'train', 'eval'}
    # 12 train steps, evaluations at step 8 and at the end on two splits: one executable each.
    assert jitted['train']._cache_size() == 1, 'the train step was compiled more than once'
    assert jitted['eval']._cache_size() == 1, 'the eval step was compiled more than once'

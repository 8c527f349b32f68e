"""Optimizer construction, schedules, per-run learning rates, exact accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.optim import (
    OptimConfig,
    accumulate,
    current_learning_rate,
    make_optimizer,
    schedule_shape,
    set_learning_rate,
)


def test_schedule_shapes_closed_form():
    lin = schedule_shape(
        OptimConfig(schedule="linear", warmup_steps=4, decay_steps=10, end_lr_ratio=0.1)
    )
    np.testing.assert_allclose(
        [lin(c) for c in (0, 3, 4, 9, 14, 50)], [0.25, 1.0, 1.0, 1 - 0.9 * 0.5, 0.1, 0.1], rtol=1e-6
    )
    cos = schedule_shape(OptimConfig(schedule="cosine", decay_steps=10, end_lr_ratio=0.0))
    np.testing.assert_allclose([cos(0), cos(5), cos(10)], [1.0, 0.5, 0.0], atol=1e-6)


def test_sgd_step_uses_array_learning_rate_and_vmaps():
    opt = make_optimizer(OptimConfig(name="sgd", learning_rate=1.0, max_grad_norm=None))
    params = {"w": jnp.ones(3)}
    grads = {"w": jnp.array([1.0, 2.0, 3.0])}
    states = jax.vmap(lambda lr: set_learning_rate(opt.init(params), lr))(jnp.array([0.1, 0.3]))
    updates = jax.vmap(lambda s: opt.update(grads, s, params)[0])(states)
    np.testing.assert_allclose(updates["w"], [[-0.1, -0.2, -0.3], [-0.3, -0.6, -0.9]], rtol=1e-6)


def test_adamw_matches_optax_adamw():
    cfg = OptimConfig(learning_rate=3e-3, weight_decay=0.1, max_grad_norm=None)
    ours, ref = make_optimizer(cfg), __import__("optax").adamw(3e-3, weight_decay=0.1)
    params = {"w": jnp.linspace(-1, 1, 5)}
    s1, s2 = ours.init(params), ref.init(params)
    for i in range(3):
        g = {"w": jnp.sin(jnp.arange(5.0) + i)}
        u1, s1 = ours.update(g, s1, params)
        u2, s2 = ref.update(g, s2, params)
        np.testing.assert_allclose(u1["w"], u2["w"], rtol=1e-5, atol=1e-8)
    assert float(current_learning_rate(cfg, s1)) == pytest.approx(3e-3)


def test_accumulate_equals_full_batch_token_mean():
    def loss(params, batch):
        x, m = batch
        per = jnp.tanh(x * params["w"]) ** 2 * m
        return per.sum(), (m.sum(), {"loss_sum": per.sum()})

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)
    m = jnp.asarray(rng.random((8, 5)) < 0.6, jnp.float32)  # uneven counts per microbatch
    params = {"w": jnp.asarray(rng.normal(size=5), jnp.float32)}
    g1, c1, m1 = accumulate(loss, params, (x, m), 1)
    g4, c4, m4 = accumulate(loss, params, (x, m), 4)
    expected = jax.grad(lambda p: loss(p, (x, m))[0] / m.sum())(params)
    np.testing.assert_allclose(g1["w"], expected["w"], rtol=1e-5)
    np.testing.assert_allclose(g4["w"], expected["w"], rtol=1e-5)
    assert float(c4) == float(m.sum()) and float(m4["loss_sum"]) == pytest.approx(
        float(m1["loss_sum"]), rel=1e-5
    )


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"name": "rmsprop"}, "optim.name"),
        ({"schedule": "step"}, "optim.schedule"),
        ({"learning_rate": 0.0}, "optim.learning_rate"),
        ({"grad_accum_steps": 0}, "grad_accum_steps"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        OptimConfig(**kwargs)

"""rlhf_jax.returns against float64 loop references (tests/reference_loops.py) and closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_loops as ref
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_jax import returns, rewards
from rlhf_jax.presets import Conventions

MASK = np.array(
    [
        [1, 1, 1, 0, 0, 0, 0],
        [1, 0, 1, 1, 0, 1, 0],  # holes
        [1, 1, 1, 1, 1, 1, 1],  # truncated
        [0, 0, 0, 0, 0, 0, 0],  # empty
        [1, 1, 1, 1, 1, 0, 0],
    ],
    np.int32,
)


def _rv(seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(0, 1, MASK.shape), rng.normal(0, 1, MASK.shape)


def _steps(position):
    return np.array([ref.steps_row(row, position) for row in MASK])


@pytest.mark.parametrize("holes", ["skip", "zero"])
@pytest.mark.parametrize("position", ["last_token", "after_stop", "last_fixed"])
def test_gae_matches_loop(holes, position):
    r, v = _rv(1)
    opts = Conventions(score_position=position, mask_holes=holes)
    adv, ret = returns.gae(jnp.float32(r), jnp.float32(v), MASK, 0.97, 0.9, options=opts)
    want_a, want_r = ref.gae(r, v, _steps(position), 0.97, 0.9, holes)
    np.testing.assert_allclose(adv, want_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, want_r, rtol=1e-5, atol=1e-5)


def test_gae_lambda_gamma_one_is_reward_to_go_minus_value():
    r, v = _rv(2)
    adv, ret = returns.gae(r, v, MASK, 1.0, 1.0)
    rtg = ref.reward_to_go(r, MASK)
    np.testing.assert_allclose(adv, (rtg - v) * MASK, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, rtg, rtol=1e-5, atol=1e-5)


def test_score_slot_matters_only_when_lambda_below_one():
    """Score on the stop token vs one slot after it (docs/formulas.md §1): the same advantages on
    real tokens when gamma = lam = 1, different ones when lam < 1."""
    rng = np.random.default_rng(3)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], np.int32)
    scores = rng.normal(0, 2, 2)
    lp, rp = rng.normal(-1, 0.5, (2, 2, 5))
    values = rng.normal(0, 1, (2, 5))
    out = {}
    for pos in ("last_token", "after_stop"):
        opts = Conventions(score_position=pos)
        r, _ = rewards.shape_rewards(scores, lp, rp, mask, 0.1, options=opts)
        for lam in (1.0, 0.8):
            out[pos, lam] = np.asarray(returns.gae(r, values, mask, 1.0, lam, options=opts)[0])
    np.testing.assert_allclose(
        out["last_token", 1.0] * mask, out["after_stop", 1.0] * mask, rtol=1e-5, atol=1e-5
    )
    assert np.max(np.abs((out["last_token", 0.8] - out["after_stop", 0.8]) * mask)) > 1e-2


@pytest.mark.parametrize("holes", ["skip", "zero"])
def test_discounted_returns(holes):
    r, _ = _rv(4)
    got = returns.discounted_returns(r, MASK, 0.9, mask_holes=holes)
    want, _ = ref.gae(r, np.zeros_like(r), MASK, 0.9, 1.0, holes)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("shift_mean", [False, True])
def test_whiten_matches_loop(unbiased, shift_mean):
    x, _ = _rv(5)
    x = x * 3 + 2
    got = returns.whiten(jnp.float32(x), MASK, shift_mean=shift_mean, unbiased=unbiased)
    want = ref.whiten(x, MASK, shift_mean=shift_mean, unbiased=unbiased)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_whiten_unmasked_relation_and_empty():
    x, _ = _rv(6)
    n = x.size
    biased = np.asarray(returns.whiten(x), np.float64)  # LMHP: all elements, biased
    unb = np.asarray(returns.whiten(x, unbiased=True), np.float64)  # TRL with an all-ones mask
    np.testing.assert_allclose(unb, biased * np.sqrt((n - 1) / n), rtol=1e-4, atol=1e-5)
    assert abs(biased.mean()) < 1e-5 and abs(biased.std() - 1) < 1e-4
    empty = returns.whiten(x, np.zeros_like(x), unbiased=True)
    assert bool(jnp.all(empty == 0))
    one = np.zeros_like(x)
    one[0, 0] = 1
    assert bool(jnp.all(jnp.isfinite(returns.whiten(x, one, unbiased=True))))


PIPELINES = [
    dict(),
    dict(score_position="last_fixed", kl_on="all", whiten_rewards=True, unbiased_variance=False),
    dict(score_position="after_stop", mask_holes="zero", whiten_rewards=True),
    dict(whiten_advantages=False),
]


@pytest.mark.parametrize("case", PIPELINES, ids=[str(c) for c in PIPELINES])
def test_ppo_advantages_pipeline(case):
    opts = Conventions(**case)
    r, v = _rv(7)
    adv, ret = returns.ppo_advantages(r, v, MASK, 1.0, 0.95, options=opts)
    steps = _steps(opts.score_position)
    pmask = np.ones_like(MASK) if opts.score_position == "last_fixed" else MASK
    rr = r * steps
    if opts.whiten_rewards:
        rr = ref.whiten(r, steps, shift_mean=False, unbiased=opts.unbiased_variance)
    want_a, want_r = ref.gae(rr, v, steps, 1.0, 0.95, opts.mask_holes)
    if opts.whiten_advantages:
        want_a = ref.whiten(want_a, pmask, unbiased=opts.unbiased_variance)
    np.testing.assert_allclose(adv, want_a * pmask, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ret, want_r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "method,scale", [("grpo", "group"), ("grpo", "batch"), ("grpo", "none"), ("rloo", "group")]
)
def test_group_advantages_match_loop(method, scale):
    rng = np.random.default_rng(8)
    r = rng.normal(0, 2, 12)
    got = returns.group_advantages(jnp.float32(r), 4, method=method, scale=scale)
    np.testing.assert_allclose(got, ref.group_advantages(r, 4, method, scale), rtol=1e-5, atol=1e-5)


def test_rloo_is_scaled_group_mean_baseline():
    r = np.array([1.0, 2.0, 4.0, -1.0, 0.0, 7.0])
    g = 3
    got = returns.group_advantages(r, g, method="rloo")
    grp = r.reshape(2, 3)
    np.testing.assert_allclose(
        got, (g / (g - 1) * (grp - grp.mean(1, keepdims=True))).ravel(), rtol=1e-6
    )


def test_group_errors():
    with pytest.raises(ValueError, match="divide the number of rewards"):
        returns.group_advantages(jnp.zeros(5), 2)
    with pytest.raises(ValueError, match="method='ppo'"):
        returns.group_advantages(jnp.zeros(4), 2, method="ppo")
    with pytest.raises(ValueError, match="needs >= 2 samples"):
        returns.group_advantages(jnp.zeros(4), 1, method="rloo")


def test_jit_vmap_grad_and_all_masked():
    r, v = _rv(9)
    opts = Conventions(score_position="after_stop")

    def f(v_, gamma, lam):
        a, ret = returns.ppo_advantages(r, v_, MASK, gamma, lam, options=opts)
        return jnp.sum(a) + jnp.sum(jnp.square(ret))

    jf = jax.jit(f)
    np.testing.assert_allclose(jf(v, 0.9, 0.8), f(v, 0.9, 0.8), rtol=1e-5)
    lams = jnp.array([0.5, 0.9, 1.0])
    swept = jax.vmap(jf, in_axes=(None, None, 0))(jnp.float32(v), 1.0, lams)
    np.testing.assert_allclose(swept, [jf(v, 1.0, float(x)) for x in lams], rtol=1e-5)
    g = jax.jit(jax.grad(f))(jnp.float32(v), 1.0, 0.95)
    assert bool(jnp.all(jnp.isfinite(g)))
    z = np.zeros_like(MASK)
    gw = jax.grad(lambda x: jnp.sum(returns.whiten(x, z, unbiased=True)))(jnp.float32(v))
    assert bool(jnp.all(jnp.isfinite(gw)))
    z = jnp.zeros((2, 4), jnp.int32)
    for name in ("last_token", "after_stop"):
        a, ret = returns.ppo_advantages(
            jnp.ones((2, 4)),
            jnp.ones((2, 4)),
            z,
            1.0,
            0.95,
            options=Conventions(score_position=name),
        )
        assert bool(jnp.all(a == 0)) and bool(jnp.all(ret == 0))
    a = returns.group_advantages(jnp.ones(4), 2)  # constant group: std 0 -> 0 advantages
    assert bool(jnp.all(a == 0))
    ab = returns.gae(jnp.bfloat16(r), jnp.bfloat16(v), MASK, 1.0, 0.9)[0]
    assert ab.dtype == jnp.float32


@settings(max_examples=10, deadline=None, derandomize=True)
@given(st.sampled_from([1, 6]), st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_property_lambda_one_is_discounted_return_minus_value(t, gamma, seed):
    """GAE(lam = 1) = discounted return - V for any gamma and any hole pattern ('skip')."""
    rng = np.random.default_rng(seed)
    mask = rng.integers(0, 2, (3, t))
    r, v = rng.normal(0, 1, (2, 3, t))
    adv, ret = returns.gae(r, v, mask, gamma, 1.0)
    g = returns.discounted_returns(r, mask, gamma)
    np.testing.assert_allclose(adv, (np.asarray(g) - v) * mask, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ret, g, rtol=1e-4, atol=1e-5)


def _all_returns(x):
    """Every function of rlhf_jax.returns on inputs derived from x [B, T], as one scalar."""
    v = jnp.roll(x, 1, axis=1)
    zero = Conventions(mask_holes="zero", score_position="after_stop", whiten_rewards=True)
    a1, r1 = returns.gae(x, v, MASK, 0.99, 0.9, options=zero)
    a2, r2 = returns.ppo_advantages(x, v, MASK, 0.99, 0.9, options=zero)
    g = returns.discounted_returns(x, MASK, 0.9)
    w = returns.whiten(x, MASK, shift_mean=False, unbiased=True)
    ga = returns.group_advantages(x[:4, 0], 2) + returns.group_advantages(
        x[:4, 1], 2, method="rloo"
    )
    gb = returns.group_advantages(x[:, 2], 5, scale="batch")
    return (
        jnp.sum(a1 * r1)
        + jnp.sum(a2 * r2)
        + jnp.sum(g**2)
        + jnp.sum(w**3)
        + jnp.sum(ga**2)
        + jnp.sum(gb**2)
    )


def test_every_function_under_jit_vmap_grad():
    rng = np.random.default_rng(18)
    xs = jnp.float32(rng.normal(0, 1, (2, *MASK.shape)))
    jitted = jax.jit(_all_returns)
    single = [float(jitted(x)) for x in xs]
    np.testing.assert_allclose(single[0], float(_all_returns(xs[0])), rtol=1e-5)  # eager
    np.testing.assert_allclose(jax.jit(jax.vmap(_all_returns))(xs), single, rtol=1e-5)
    g = jax.jit(jax.grad(_all_returns))(xs[0])
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0

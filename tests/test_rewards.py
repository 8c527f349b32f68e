"""rlhf_jax.rewards against float64 loop references (tests/reference_loops.py) and closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_loops as ref
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_jax import rewards
from rlhf_jax.presets import Conventions

# Responses that stop at different lengths, one with a hole, one truncated (full), one empty.
MASK = np.array(
    [
        [1, 1, 1, 0, 0, 0],
        [1, 0, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1],
        [0, 0, 0, 0, 0, 0],
        [1, 0, 0, 0, 0, 0],
    ],
    np.int32,
)
TRUNCATED = np.array([False, False, True, False, False])


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    b, t = MASK.shape
    lp = rng.normal(-1.5, 0.7, (b, t))
    rp = lp + rng.normal(0, 0.4, (b, t))
    scores = rng.normal(0, 3, b)
    return scores, lp, rp


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "abs"])
def test_kl_estimate_matches_loop(estimator):
    _, lp, rp = _inputs()
    got = rewards.kl_estimate(jnp.float32(lp), jnp.float32(rp), MASK, estimator=estimator)
    want = np.array(
        [
            [ref.kl(lp[b, t], rp[b, t], estimator) * MASK[b, t] for t in range(lp.shape[1])]
            for b in range(lp.shape[0])
        ]
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_k1_and_k3_agree_in_expectation():
    """E_p[k1] = E_p[k3] = KL(p || q), computed exactly over the vocabulary."""
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(11))
    q = rng.dirichlet(np.ones(11))
    logp, logq = np.log(p), np.log(q)
    kl_exact = float(np.sum(p * (logp - logq)))
    for est in ("k1", "k3"):
        k = np.asarray(rewards.kl_estimate(logp[None], logq[None], estimator=est), np.float64)[0]
        assert abs(float(np.sum(p * k)) - kl_exact) < 1e-5
    k3 = rewards.kl_estimate(logp[None], logq[None], estimator="k3")
    assert bool(jnp.all(k3 >= 0))


def test_unknown_estimator_error():
    with pytest.raises(ValueError, match="estimator='k4'"):
        rewards.kl_estimate(jnp.zeros((1, 2)), jnp.zeros((1, 2)), estimator="k4")


CASES = [
    dict(),
    dict(score_position="after_stop"),
    dict(score_position="last_fixed", kl_on="all"),
    dict(score_position="after_stop", kl_on="all", score_clip=1.5),
    dict(kl_estimator="k3", reward_clip=0.8),
    dict(kl_estimator="k2", missing_stop_penalty=2.0, missing_stop_mode="subtract"),
    dict(kl_estimator="abs", missing_stop_penalty=-1.0, missing_stop_mode="replace"),
]


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_shape_rewards_matches_loop(case):
    scores, lp, rp = _inputs(2)
    opts = Conventions(**case)
    beta = 0.13
    got, metrics = rewards.shape_rewards(
        jnp.float32(scores), jnp.float32(lp), jnp.float32(rp), MASK, beta, options=opts,
        truncated=TRUNCATED,
    )  # fmt: skip
    want = ref.shape_rewards(
        scores, lp, rp, MASK, beta,
        estimator=opts.kl_estimator, position=opts.score_position, kl_on=opts.kl_on,
        score_clip=opts.score_clip, reward_clip=opts.reward_clip,
        penalty=opts.missing_stop_penalty, penalty_mode=opts.missing_stop_mode,
        truncated=TRUNCATED,
    )  # fmt: skip
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    kl = np.asarray(metrics["kl"])
    np.testing.assert_allclose(metrics["kl_sum"], kl.sum(1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(metrics["non_score_reward"], -beta * kl.sum(1), rtol=1e-5, atol=1e-5)


def test_missing_stop_penalty_needs_truncated():
    scores, lp, rp = _inputs()
    with pytest.raises(ValueError, match="truncated="):
        rewards.shape_rewards(
            scores, lp, rp, MASK, 0.1, options=Conventions(missing_stop_penalty=1.0)
        )


def test_kl_coef_must_be_scalar():
    scores, lp, rp = _inputs()
    with pytest.raises(ValueError, match="kl_coef must be a scalar"):
        rewards.shape_rewards(scores, lp, rp, MASK, jnp.ones(3))


def test_shape_costs_flips_the_kl_sign():
    costs, lp, rp = _inputs(3)
    opts = Conventions(reward_clip=0.9)
    got, m = rewards.shape_costs(costs, lp, rp, MASK, 0.2, options=opts)
    # c_t = clip(+beta k1_t + c [t = t*], +-0.9) on the steps, from the loop of the reward.
    want = -ref.shape_rewards(-costs, lp, rp, MASK, 0.2, reward_clip=0.9)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m["scores"], costs, rtol=1e-6)


def test_sequence_kl_reward_rloo():
    scores, lp, rp = _inputs(4)
    got = rewards.sequence_kl_reward(scores, lp, rp, MASK, 0.05)
    want = [
        scores[b] - 0.05 * sum((lp[b, t] - rp[b, t]) * MASK[b, t] for t in range(6))
        for b in range(5)
    ]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_reward_normalisation_hits_targets():
    rng = np.random.default_rng(5)
    s = rng.normal(3.0, 2.5, 64)
    valid = np.ones(64)
    valid[-4:] = 0
    s[-4:] = 1e6  # padding rows must not count
    gain, bias = rewards.reward_norm_params(s, 1.0, 0.5, mask=valid)
    out = np.asarray(rewards.normalize_scores(s[:60], gain, bias), np.float64)
    assert abs(out.mean() - 1.0) < 1e-4 and abs(out.std() - 0.5) < 1e-4
    np.testing.assert_allclose(gain, 0.5 / s[:60].std(), rtol=1e-5)


def test_kl_controllers():
    # Ziegler et al.: beta * (1 + clip(KL/target - 1, -0.2, 0.2) * n / horizon), in float64.
    for kl_now in (1.0, 5.0, 6.3, 30.0):
        err = min(max(kl_now / 6.0 - 1.0, -0.2), 0.2)
        want = 0.15 * (1.0 + err * 512 / 10000.0)
        got = rewards.adaptive_kl_update(0.15, kl_now, 512, target=6.0, horizon=10000.0)
        assert abs(float(got) - want) < 1e-7
    assert float(rewards.fixed_kl_update(0.3, 100.0, 512)) == pytest.approx(0.3)
    # Pure and traceable: jit and vmap over a sweep of betas and targets.
    f = jax.jit(
        jax.vmap(lambda b, tg: rewards.adaptive_kl_update(b, 7.0, 64, target=tg, horizon=1e4))
    )
    out = f(jnp.array([0.1, 0.2]), jnp.array([6.0, 8.0]))
    np.testing.assert_allclose(
        out, [0.1 * (1 + 1 / 6 * 64e-4), 0.2 * (1 - 0.125 * 64e-4)], rtol=1e-6
    )


def test_jit_vmap_grad_and_bf16():
    scores, lp, rp = _inputs(6)
    opts = Conventions(score_position="after_stop", kl_estimator="k3")

    def total(lp_, beta):
        r, _ = rewards.shape_rewards(scores, lp_, rp, MASK, beta, options=opts)
        return jnp.sum(r)

    f = jax.jit(total)
    np.testing.assert_allclose(f(lp, 0.1), total(lp, 0.1), rtol=1e-5)
    betas = jnp.array([0.0, 0.1, 0.2])
    swept = jax.vmap(f, in_axes=(None, 0))(jnp.float32(lp), betas)
    np.testing.assert_allclose(swept, [total(lp, float(b)) for b in betas], rtol=1e-5, atol=1e-5)
    # d/dlogp of -beta * k3 = -beta * (1 - exp(ref - logp)), only on charged tokens.
    g = jax.grad(total)(jnp.float32(lp), 0.1)
    want = -0.1 * (1 - np.exp(rp - lp)) * MASK
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-5)
    # bf16 inputs are computed in float32.
    lb, rb = jnp.bfloat16(lp), jnp.bfloat16(rp)
    out, _ = rewards.shape_rewards(jnp.bfloat16(scores), lb, rb, MASK, 0.1, options=opts)
    assert out.dtype == jnp.float32
    want = ref.shape_rewards(
        np.float64(jnp.bfloat16(scores).astype(jnp.float32)), np.float64(lb.astype(jnp.float32)),
        np.float64(rb.astype(jnp.float32)), MASK, 0.1, estimator="k3", position="after_stop",
    )  # fmt: skip
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_all_masked_rows_are_finite():
    z = np.zeros((2, 4), np.int32)
    for pos in ("last_token", "after_stop", "last_fixed"):
        r, m = rewards.shape_rewards(
            jnp.ones(2), jnp.zeros((2, 4)), jnp.ones((2, 4)), z, 0.1,
            options=Conventions(score_position=pos),
        )  # fmt: skip
        assert bool(jnp.all(jnp.isfinite(r)))
        if pos != "last_fixed":
            assert float(jnp.abs(r).sum()) == 0.0


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    st.integers(1, 6),
    st.integers(0, 6),
    st.floats(-5, 5),
    st.floats(0, 1),
    st.sampled_from(["k1", "k2", "k3", "abs"]),
)
def test_property_reward_sum(t, length, score, beta, est):
    """For a right-padded response, sum_t r_t = score - beta * sum_t KL_t (no clips)."""
    length = min(length, t)
    mask = (np.arange(t) < length).astype(np.int32)[None]
    rng = np.random.default_rng(t * 7 + length)
    lp = rng.normal(-1, 1, (1, t))
    rp = rng.normal(-1, 1, (1, t))
    for pos in ("last_token", "after_stop"):
        r, m = rewards.shape_rewards(
            np.array([score]),
            lp,
            rp,
            mask,
            beta,
            options=Conventions(kl_estimator=est, score_position=pos),
        )
        kls = [ref.kl(lp[0, i], rp[0, i], est) for i in range(length)]
        want = (score if length else 0.0) - beta * sum(kls)
        assert math.isclose(float(jnp.sum(r)), want, rel_tol=1e-4, abs_tol=1e-4)
        if est in ("k2", "k3", "abs"):
            assert bool(jnp.all(m["kl"] >= 0))


def _all_rewards(x):
    """Every function of rlhf_jax.rewards on inputs derived from x [B, T], as one scalar."""
    scores, lp, rp = x[:, 0] * 3, x, jnp.roll(x, 1, axis=1)
    after = Conventions(score_position="after_stop", kl_on="all", score_clip=1.0, reward_clip=2.0)
    pen = Conventions(missing_stop_penalty=1.0, kl_estimator="k3")
    r1, m1 = rewards.shape_rewards(scores, lp, rp, MASK, 0.1, options=after)
    r2, _ = rewards.shape_rewards(scores, lp, rp, MASK, 0.1, options=pen, truncated=TRUNCATED)
    c, _ = rewards.shape_costs(scores, lp, rp, MASK, 0.1, options=after)
    gain, bias = rewards.reward_norm_params(scores, 0.0, 1.0)
    beta = rewards.adaptive_kl_update(0.1, jnp.mean(m1["kl_sum"]), 5, target=1.0, horizon=100.0)
    return (
        jnp.sum(r1) + jnp.sum(r2) + jnp.sum(c)
        + jnp.sum(rewards.normalize_scores(scores, gain, bias) ** 3)
        + jnp.sum(rewards.sequence_kl_reward(scores, lp, rp, MASK, 0.05))
        + jnp.sum(rewards.kl_estimate(lp, rp, MASK, estimator="k2"))
        + beta + rewards.fixed_kl_update(0.2)
    )  # fmt: skip


def test_every_function_under_jit_vmap_grad():
    rng = np.random.default_rng(17)
    xs = jnp.float32(rng.normal(-1, 0.5, (2, *MASK.shape)))
    jitted = jax.jit(_all_rewards)
    single = [float(jitted(x)) for x in xs]
    np.testing.assert_allclose(single[0], float(_all_rewards(xs[0])), rtol=1e-5)  # eager
    np.testing.assert_allclose(jax.jit(jax.vmap(_all_rewards))(xs), single, rtol=1e-5)
    g = jax.jit(jax.grad(_all_rewards))(xs[0])
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0

"""PPO-Lagrangian (Safe RLHF): the multiplier's update and window by hand, lambda's direction,
the cost-model loss on a hand-checked batch, the first update as the gradient of the documented
loss, and a tiny run whose share of unsafe responses falls under its limit."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models
from rlhf_jax.algorithms import ppo
from rlhf_jax.algorithms import reward_model as rm_lib
from rlhf_jax.optim import OptimConfig

WORDS = ["<pad>", "<eos>", "a", "dog", "cat", "is", "furry", "."]
B, P, R = 4, 3, 5

MODEL = models.ModelConfig(
    arch="gpt2",
    vocab_size=len(WORDS),
    hidden_size=16,
    num_layers=1,
    num_heads=2,
    max_position_embeddings=16,
)


@pytest.fixture(scope="module")
def sft():
    return models.init_model(MODEL, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def reward_model():
    return models.init_model(MODEL, jax.random.PRNGKey(1), lm_head=False, score_head=True)


@pytest.fixture(scope="module")
def cost_model():
    return models.init_model(MODEL, jax.random.PRNGKey(2), lm_head=False, score_head=True)


@pytest.fixture(scope="module")
def prompts():
    tokens = jnp.array([[0, 2, 3], [2, 4, 5], [0, 0, 3], [6, 3, 5]], jnp.int32)
    mask = (jnp.arange(P)[None, :] >= jnp.array([1, 0, 2, 0])[:, None]).astype(jnp.int32)
    return tokens, mask


# ------------------------------------------------------------------------------------------
# 1. The multiplier: window, SGD step in log space, delay, ceiling, combined advantage
# ------------------------------------------------------------------------------------------


def _experience(costs, adv_r, adv_c, mask):
    n, r = adv_r.shape
    zeros = jnp.zeros((n, r), jnp.float32)
    return ppo.Experience(
        tokens=jnp.zeros((n, r + 1), jnp.int32),
        mask=jnp.ones((n, r + 1), jnp.int32),
        response_mask=jnp.asarray(mask, jnp.int32),
        old_logprobs=zeros,
        old_values=zeros,
        advantages=jnp.asarray(adv_r, jnp.float32),
        returns=zeros,
        ref_logprobs=zeros,
        scores=jnp.zeros((n,), jnp.float32),
        rewards=zeros,
        kl=zeros,
        truncated=jnp.zeros((n,), bool),
        costs=jnp.asarray(costs, jnp.float32),
        old_cost_values=zeros,
        cost_returns=zeros,
        cost_advantages=jnp.asarray(adv_c, jnp.float32),
    )


def _state(cfg, log_lambda, window, filled, step=0):
    hp = ppo.PPOHParams.from_config(cfg)
    lag = ppo.Lagrange(
        log_lambda=jnp.float32(log_lambda),
        costs=jnp.asarray(window, jnp.float32),
        filled=jnp.int32(filled),
    )
    return ppo.PPOState(
        params=None,
        opt_state=None,
        step=jnp.int32(step),
        key=jax.random.PRNGKey(0),
        kl_coef=jnp.float32(0.1),
        hparams=hp,
        lagrange=lag,
    )


def _safe_cfg(**safety):
    return ppo.PPOConfig(response_length=R, stop_tokens=(1, 7), safety=ppo.SafetyConfig(**safety))


def test_lagrange_step_by_hand():
    cfg = _safe_cfg(threshold=0.5, lambda_lr=0.2, lambda_init=2.0, cost_window=4)
    # a window of 4 holding 2 real costs (1.0, 3.0); the rollout brings 3 more
    state = _state(cfg, math.log(2.0), [0.0, 0.0, 1.0, 3.0], filled=2)
    rng = np.random.default_rng(0)
    adv_r, adv_c = rng.normal(size=(3, R)), rng.normal(size=(3, R))
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    lag, exp, metrics = ppo.lagrange_step(
        cfg, state, _experience([2.0, -1.0, 0.5], adv_r * mask, adv_c * mask, mask)
    )
    # the window keeps the last 4 episodes: 3.0, 2.0, -1.0, 0.5 (all real now)
    np.testing.assert_allclose(np.asarray(lag.costs), [3.0, 2.0, -1.0, 0.5])
    assert int(lag.filled) == 4
    j_c = (3.0 + 2.0 - 1.0 + 0.5) / 4
    want = math.log(2.0) + 0.2 * (j_c - 0.5) * 2.0  # log l + lr (J_C - d) l
    assert float(lag.log_lambda) == pytest.approx(want, abs=1e-6)
    lam = math.exp(want)
    np.testing.assert_allclose(
        np.asarray(exp.advantages), (adv_r - lam * adv_c) / (1 + lam) * mask, rtol=1e-5, atol=1e-6
    )
    assert float(metrics["lambda"]) == pytest.approx(lam, rel=1e-6)
    assert float(metrics["cost/episode"]) == pytest.approx(j_c, rel=1e-6)


def test_partial_window_mean_and_unsafe_share():
    cfg = _safe_cfg(threshold=0.25, lambda_lr=1.0, cost_window=8, constraint="unsafe_share")
    state = _state(cfg, 0.0, np.zeros(8), filled=0)
    mask = np.ones((3, R))
    lag, _, metrics = ppo.lagrange_step(
        cfg, state, _experience([2.0, -1.0, 0.5], np.zeros((3, R)), np.zeros((3, R)), mask)
    )
    # 3 of 8 slots filled; two of three episodes are unsafe (cost > 0)
    assert int(lag.filled) == 3
    assert float(metrics["cost/episode"]) == pytest.approx(2 / 3, rel=1e-6)
    assert float(lag.log_lambda) == pytest.approx(1.0 * (2 / 3 - 0.25) * 1.0, rel=1e-6)


def test_lambda_rises_above_the_threshold_falls_below_and_respects_delay_and_ceiling():
    cfg = _safe_cfg(threshold=0.0, lambda_lr=0.5, cost_window=2, lambda_delay=2, lambda_max=3.0)
    state = _state(cfg, 0.0, np.zeros(2), filled=0)
    mask = np.ones((2, R))
    lambdas = []
    for step, cost in enumerate([1.0] * 8 + [-1.0] * 12):
        exp = _experience([cost, cost], np.zeros((2, R)), np.zeros((2, R)), mask)
        lag, _, _ = ppo.lagrange_step(cfg, state.replace(step=jnp.int32(step)), exp)
        state = state.replace(lagrange=lag)
        lambdas.append(math.exp(float(lag.log_lambda)))
    assert lambdas[0] == lambdas[1] == 1.0  # the delay: two iterations before lambda moves
    rising, falling = np.diff(lambdas[1:8]), np.diff(lambdas[8:])
    assert np.all(rising >= 0) and rising[0] > 0
    assert max(lambdas) == pytest.approx(3.0, rel=1e-6)  # clamped at lambda_max
    assert np.all(falling < 0)  # the window holds -1 from the first step below the threshold


# ------------------------------------------------------------------------------------------
# 2. The cost model's loss on safety rows
# ------------------------------------------------------------------------------------------


def test_cost_model_loss_on_a_hand_checked_batch(cost_model):
    rng = np.random.default_rng(3)
    n = 4
    batch = {
        "prompt_tokens": np.array([[0, 2, 3], [2, 4, 5], [0, 0, 3], [6, 3, 5]], np.int32),
        "prompt_mask": np.array([[0, 1, 1], [1, 1, 1], [0, 0, 1], [1, 1, 1]], np.int32),
        "response_tokens": rng.integers(2, 8, size=(n, 2, R)).astype(np.int32),
        "response_mask": np.ones((n, 2, R), np.int32),
        "better": np.array([0, 1, 0, 1], np.int32),
        "safer": np.array([1, 1, 0, 0], np.int32),
        "safe": np.array([[0, 1], [1, 1], [1, 0], [0, 0]], np.int32),
    }
    batch["response_mask"][0, 1, 3:] = 0
    # each response's cost scored on its own, in file order
    cost = np.zeros((n, 2))
    for i in range(n):
        for k in range(2):
            tokens = np.concatenate([batch["prompt_tokens"][i], batch["response_tokens"][i, k]])
            mask = np.concatenate([batch["prompt_mask"][i], batch["response_mask"][i, k]])
            cost[i, k] = float(
                models.scores(cost_model.graphdef, cost_model.params, tokens[None], mask[None])[0]
            )
    cfg = rm_lib.RewardModelConfig(loss="cost", l2_coef=0.1)
    total, (count, sums) = rm_lib.rm_loss(
        cost_model.graphdef, cost_model.params, jax.tree.map(jnp.asarray, batch), cfg
    )
    # -log sig(c_unsafer - c_safer) - log sig(-s c) for both + 0.1 * (c_s^2 + c_u^2) / 2
    log_sig = lambda x: -np.log1p(np.exp(-x))  # noqa: E731
    want, correct, sign_ok = 0.0, 0, 0.0
    for i in range(n):
        s, u = batch["safer"][i], 1 - batch["safer"][i]
        cs, cu = cost[i, s], cost[i, u]
        sign_s, sign_u = 2 * batch["safe"][i, s] - 1, 2 * batch["safe"][i, u] - 1
        want += -log_sig(cu - cs) - log_sig(-sign_s * cs) - log_sig(-sign_u * cu)
        want += 0.1 * 0.5 * (cs**2 + cu**2)
        correct += cu > cs
        sign_ok += 0.5 * (int(-sign_s * cs > 0) + int(-sign_u * cu > 0))
    assert float(total) == pytest.approx(want, rel=1e-5)
    assert float(count) == n
    summary = rm_lib._summary(count, sums)
    assert float(summary["accuracy"]) == pytest.approx(correct / n)
    assert float(summary["sign_accuracy"]) == pytest.approx(sign_ok / n)
    # the reward model reads the same rows by their better_response_id, better first
    ranking = rm_lib.as_ranking(batch)
    for i in range(n):
        np.testing.assert_array_equal(
            ranking["response_tokens"][i, 0], batch["response_tokens"][i, batch["better"][i]]
        )


def test_cost_normalisation_rescales_and_keeps_zero(cost_model):
    raw = np.array([-2.0, -1.0, 0.5, 3.0])
    gain, bias = models.score_gain_bias(cost_model.params)
    params = rm_lib.normalize_params(cost_model.params, raw, target_std=1.0, shift=False)
    new_gain, new_bias = models.score_gain_bias(params)
    scale = 1.0 / raw.std()
    np.testing.assert_allclose(np.asarray(new_gain), np.asarray(gain) * scale, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new_bias), np.asarray(bias) * scale, rtol=1e-6)
    with pytest.raises(ValueError, match="target_mean"):
        rm_lib.normalize_params(cost_model.params, raw, target_mean=1.0, shift=False)


# ------------------------------------------------------------------------------------------
# 3. The first update is the gradient of the documented loss
# ------------------------------------------------------------------------------------------

SGD_CFG = ppo.PPOConfig(
    response_length=R,
    stop_tokens=(1, 7),
    num_epochs=1,
    num_minibatches=1,
    critic="separate",
    old_logprobs="recompute",
    optim=OptimConfig(name="sgd", learning_rate=0.1, max_grad_norm=None),
    kl_coef=0.1,
    temperature=0.9,
    vf_coef=0.3,
    safety=ppo.SafetyConfig(threshold=-1.0, lambda_init=0.5, lambda_lr=0.3),
)


def test_first_update_is_the_gradient_of_the_documented_loss(
    sft, reward_model, cost_model, prompts
):
    cfg = SGD_CFG
    static, params, frozen = ppo.make_models(cfg, sft, reward_model, cost_model=cost_model)
    plain_cfg = dataclasses.replace(cfg, safety=None)
    plain_static, plain_params, plain_frozen = ppo.make_models(plain_cfg, sft, reward_model)
    state = ppo.init_state(cfg, params)
    plain_state = ppo.init_state(plain_cfg, plain_params)
    tokens, mask = prompts

    @jax.jit
    def check(state, plain_state, frozen, plain_frozen, tokens, mask):
        sampled = ppo.generate(cfg, static, state, tokens, mask)
        exp = ppo.score(cfg, static, state, frozen, tokens, mask, sampled)
        plain = ppo.score(plain_cfg, plain_static, plain_state, plain_frozen, tokens, mask, sampled)
        lag, exp, _ = ppo.lagrange_step(cfg, state, exp)
        m = exp.response_mask.astype(jnp.float32)

        def documented_loss(p):
            lp = models.token_logprobs(
                static.policy, p["policy"], exp.tokens, exp.mask, start=P, temperature=0.9
            )
            v = models.values(static.critic, p["critic"], exp.tokens, exp.mask, start=P)
            vc = models.values(static.cost, p["cost_critic"], exp.tokens, exp.mask, start=P)
            ratio = jnp.exp(lp - exp.old_logprobs)
            pg = -jnp.sum(exp.advantages * ratio * m) / jnp.sum(m)
            vf = 0.5 * jnp.sum(jnp.square(v - exp.returns) * m) / jnp.sum(m)
            vfc = 0.5 * jnp.sum(jnp.square(vc - exp.cost_returns) * m) / jnp.sum(m)
            return pg + 0.3 * (vf + vfc)

        loss, grads = jax.value_and_grad(documented_loss)(state.params)
        expected = jax.tree.map(lambda p, g: p - 0.1 * g, state.params, grads)
        new_state, metrics = ppo.update(cfg, static, state, exp)
        return exp, plain, lag, loss, expected, new_state, metrics

    exp, plain, lag, loss, expected, new_state, metrics = check(
        state, plain_state, frozen, plain_frozen, tokens, mask
    )
    # kl_share 1: the reward side is plain PPO's; the combined advantage uses the new lambda
    lam = math.exp(float(lag.log_lambda))
    assert lam > 0.5  # the untrained cost model's mean cost is above the threshold -1
    want = (np.asarray(plain.advantages) - lam * np.asarray(exp.cost_advantages)) / (1 + lam)
    np.testing.assert_allclose(np.asarray(exp.advantages), want, rtol=1e-5, atol=1e-6)
    # the cost side: +beta KL per token and the cost at the last real token; the critic values
    # are the cost model's own per-token scores at the start
    for leaf_a, leaf_b in zip(
        jax.tree.leaves(new_state.params), jax.tree.leaves(expected), strict=True
    ):
        np.testing.assert_allclose(np.asarray(leaf_a), np.asarray(leaf_b), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)
    assert float(metrics["skipped"]) == 0.0


# ------------------------------------------------------------------------------------------
# 4. A tiny run: the share the cost model calls unsafe falls under its limit
# ------------------------------------------------------------------------------------------


def test_tiny_run_brings_the_unsafe_share_under_its_limit(sft, reward_model, cost_model, prompts):
    tokens, mask = prompts
    tokens, mask = jnp.tile(tokens, (4, 1)), jnp.tile(mask, (4, 1))
    base_cfg = ppo.PPOConfig(
        response_length=R,
        stop_tokens=(1, 7),
        num_samples=2,
        num_epochs=2,
        num_minibatches=2,
        optim=OptimConfig(learning_rate=1e-2),
        kl_coef=0.01,
        temperature=1.0,
        safety=ppo.SafetyConfig(
            constraint="unsafe_share", threshold=0.2, lambda_lr=0.5, lambda_max=20.0
        ),
    )
    static, params, frozen = ppo.make_models(base_cfg, sft, reward_model, cost_model=cost_model)
    state = ppo.init_state(base_cfg, params)
    sampled = ppo.generate(base_cfg, static, state, tokens, mask)
    costs = ppo.score(base_cfg, static, state, frozen, tokens, mask, sampled).costs
    # shift the cost model so that 60% of the start policy's responses cost more than 0
    gain, bias = models.score_gain_bias(cost_model.params)
    shifted = cost_model.replace(
        params=models.set_score_gain_bias(
            cost_model.params, gain, bias - float(np.quantile(np.asarray(costs), 0.4))
        )
    )
    static, params, frozen = ppo.make_models(base_cfg, sft, reward_model, cost_model=shifted)
    iterate = ppo.make_iteration(base_cfg, static)
    state = ppo.init_state(base_cfg, params)
    history = []
    for _ in range(40):
        state, metrics = iterate(state, frozen, tokens, mask)
        history.append({k: float(v) for k, v in metrics.items()})
    first = np.mean([h["cost/unsafe"] for h in history[:3]])
    last = np.mean([h["cost/unsafe"] for h in history[-5:]])
    assert first > 0.4, first  # the limit binds at the start
    assert last <= 0.2, (first, last)
    lambdas = [h["lambda"] for h in history]
    assert max(lambdas) > 1.0  # lambda rose while the share was too high
    assert lambdas[-1] < 0.8 * max(lambdas)  # and fell once it was under the limit

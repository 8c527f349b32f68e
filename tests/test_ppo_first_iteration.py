"""At the first PPO iteration the policy *is* the reference: the KL charged is 0, the ratio 1 and
the approximate KL 0, under every source preset and both ways of taking the old log-probs.

The presets that charge KL on every slot (lm-human-preferences, deepspeed-chat) or take the
ratio on every slot (lm-human-preferences) read the policy's log-probs after the stop token too;
the sampler's own log-probs are zero there, so the iteration must fill them from a forward pass.
Many stop tokens make every response stop early, so padding is always present.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models, presets
from rlhf_jax.algorithms import ppo

V, P, R = 12, 3, 6
MODEL = models.ModelConfig(
    arch="gpt2", vocab_size=V, hidden_size=16, num_layers=1, num_heads=2, max_position_embeddings=16
)


@pytest.fixture(scope="module")
def setup():
    sft = models.init_model(MODEL, jax.random.PRNGKey(0))
    rm = models.init_model(MODEL, jax.random.PRNGKey(1), lm_head=False, score_head=True)
    tokens = jnp.array([[0, 2, 3], [2, 4, 5], [0, 0, 3], [6, 3, 5]], jnp.int32)
    mask = (jnp.arange(P)[None, :] >= jnp.array([1, 0, 2, 0])[:, None]).astype(jnp.int32)
    return sft, rm, tokens, mask


@pytest.mark.parametrize("old_logprobs", ["rollout", "recompute"])
@pytest.mark.parametrize("preset", sorted(presets.PRESETS))
def test_first_iteration_kl_zero_ratio_one(setup, preset, old_logprobs):
    sft, rm, tokens, mask = setup
    cfg = ppo.PPOConfig(
        response_length=R,
        num_samples=2,
        num_epochs=1,
        num_minibatches=1,
        preset=preset,
        old_logprobs=old_logprobs,
        stop_tokens=tuple(range(6, V)),  # half the vocabulary stops: short responses, padding
        temperature=1.0,
    )
    static, params, frozen = ppo.make_models(cfg, sft, rm)
    state = ppo.init_state(cfg, params)
    _, metrics = jax.jit(ppo.iteration_fn(cfg, static))(state, frozen, tokens, mask)
    m = {k: float(v) for k, v in metrics.items()}
    assert m["response/length"] < R, "no response stopped early: the test needs padding"
    np.testing.assert_allclose(m["kl/response"], 0.0, atol=1e-4)
    np.testing.assert_allclose(m["policy/ratio"], 1.0, atol=1e-4)
    np.testing.assert_allclose(m["policy/approx_kl"], 0.0, atol=1e-6)


def test_both_old_logprob_modes_agree_on_the_shaped_rewards(setup):
    """Under lm-human-preferences (KL and ratio on every slot) the two modes give the same
    experience: the sampler's log-probs on real tokens equal a forward pass's, and the padding
    slots come from the forward pass in both."""
    sft, rm, tokens, mask = setup
    base = ppo.PPOConfig(
        response_length=R,
        num_epochs=1,
        preset="lm-human-preferences",
        stop_tokens=tuple(range(6, V)),
        temperature=1.0,
    )
    out = {}
    for mode in ("rollout", "recompute"):
        cfg = dataclasses.replace(base, old_logprobs=mode)
        static, params, frozen = ppo.make_models(cfg, sft, rm)
        state = ppo.init_state(cfg, params)
        sampled = ppo.generate(cfg, static, state, tokens, mask)
        out[mode] = ppo.score(cfg, static, state, frozen, tokens, mask, sampled)
    np.testing.assert_allclose(out["rollout"].rewards, out["recompute"].rewards, atol=1e-5)
    np.testing.assert_allclose(
        out["rollout"].old_logprobs, out["recompute"].old_logprobs, atol=1e-5
    )

"""Scalar heads on the transformer trunk: the PPO value head and the reward/cost score head.

``ValueHead`` (``value_head/{kernel [D, 1], bias [1]}``) is zero-initialised, so a fresh critic
predicts 0 everywhere and the first value loss is the plain return variance (TRL's
``AutoModelForCausalLMWithValueHead`` initialises its ``v_head`` with small normal weights; a zero
head changes nothing downstream of the first update and keeps the initial policy loss exact).

``ScoreHead`` (``score_head/{kernel [D, 1], bias [1], reward_gain [], reward_bias []}``) is the
reward model of lm-human-preferences (``lm_human_preferences/rewards.py``)::

    score(h) = reward_gain * (h . kernel + bias) + reward_bias

``kernel`` starts as ``N(0, 1 / (D + 1))`` (LMHP ``init_std=1/sqrt(D+1)``), ``bias`` 0, and the
normalisation parameters ``reward_gain = 1``, ``reward_bias = 0``. The gain and the bias are set
by reward normalisation (``rlhf_jax.algorithms.reward_model``; LMHP ``train_reward.py``
``normalize``), never by gradient descent: the forward pass reads them through
``jax.lax.stop_gradient``, so their gradient is exactly zero (keep them out of weight decay).

Per-token application of the score head gives the critic initialised from a reward model
(DeepSpeed-Chat / Safe RLHF initialise the critic from the reward model).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


class ValueHead(nnx.Module):
    """``v(h) = h . kernel + bias`` with zero init; ``[..., D] -> [...]`` float32."""

    def __init__(self, hidden_size: int, *, param_dtype=jnp.float32):
        self.kernel = nnx.Param(jnp.zeros((hidden_size, 1), param_dtype))
        self.bias = nnx.Param(jnp.zeros((1,), param_dtype))

    def __call__(self, hidden: jax.Array) -> jax.Array:
        out = jnp.einsum(
            "...d,do->...o",
            hidden,
            self.kernel[...].astype(hidden.dtype),
            preferred_element_type=jnp.float32,
        )
        return (out + self.bias[...].astype(jnp.float32))[..., 0]


class ScoreHead(nnx.Module):
    """``r(h) = gain * (h . kernel + bias) + shift``; ``[..., D] -> [...]`` float32."""

    def __init__(self, hidden_size: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        std = 1.0 / math.sqrt(hidden_size + 1)
        init = nnx.initializers.normal(std)
        self.kernel = nnx.Param(init(rngs.params(), (hidden_size, 1), param_dtype))
        self.bias = nnx.Param(jnp.zeros((1,), param_dtype))
        self.reward_gain = nnx.Param(jnp.ones((), jnp.float32))
        self.reward_bias = nnx.Param(jnp.zeros((), jnp.float32))

    def __call__(self, hidden: jax.Array) -> jax.Array:
        raw = jnp.einsum(
            "...d,do->...o",
            hidden,
            self.kernel[...].astype(hidden.dtype),
            preferred_element_type=jnp.float32,
        )
        raw = (raw + self.bias[...].astype(jnp.float32))[..., 0]
        gain = jax.lax.stop_gradient(self.reward_gain[...].astype(jnp.float32))
        shift = jax.lax.stop_gradient(self.reward_bias[...].astype(jnp.float32))
        return gain * raw + shift

"""Returns and advantages: GAE over masked responses, whitening, group baselines (GRPO, RLOO).

Indexing (docs/formulas.md §3): ``rewards[b, t]`` is the reward after the t-th response token,
``values[b, t]`` the critic's value of the state *before* it (``rlhf_jax.models.values``), so
``V_T := 0`` (no bootstrap past the last column, as in every source) and

    delta_t = r_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lam A_{t+1},   R_t = A_t + V_t.

Which slots are time steps comes from the conventions (:func:`rlhf_jax.masks.value_mask`):
the response mask, the response mask plus the slot after the stop token (TRL-PPO, DSCHAT), or all
T slots (LMHP). ``gamma`` and ``lam`` may be traced scalars. Everything is computed in float32
(float64 under x64) whatever the input dtype.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
from jax import lax

from rlhf_jax.masks import as_float, as_scalar, policy_mask, value_mask
from rlhf_jax.presets import DEFAULT, MASK_HOLES, Conventions

__all__ = [
    "gae",
    "discounted_returns",
    "whiten",
    "ppo_advantages",
    "group_advantages",
]

GROUP_METHODS = ("grpo", "rloo")
GROUP_SCALES = ("group", "batch", "none")


def _reverse_scan(step, carry, xs):
    """``lax.scan`` backwards over time for [B, T] inputs (scanned as [T, B])."""
    xs_t = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), xs)
    _, out = lax.scan(step, carry, xs_t, reverse=True)
    return jnp.swapaxes(out, 0, 1)


def _holes(mask_holes: str) -> None:
    if mask_holes not in MASK_HOLES:
        raise ValueError(f"mask_holes={mask_holes!r}: choose one of {MASK_HOLES}")


@functools.partial(jax.jit, static_argnames="mask_holes")
def _gae_masked(rewards, values, steps, gamma, lam, mask_holes):
    """GAE over the time steps ``steps`` [B, T] (0/1 float); see :func:`gae`.

    Jitted so that eager callers reuse one compiled scan per shape (inside a jit it inlines).
    """
    r = rewards * steps
    v = values * steps
    # 'zero': a 0 inside the mask is a step with r = V = 0 (TRL-legacy, SAFE multiply by the mask).
    # 'skip': a 0 is not a step; the carry (V_{t+1}, A_{t+1}) passes through it unchanged.
    live = steps if mask_holes == "skip" else jnp.ones_like(steps)

    def step(carry, x):
        next_v, next_a = carry
        r_t, v_t, m_t = x
        a_t = r_t + gamma * next_v - v_t + gamma * lam * next_a
        keep = m_t > 0
        carry = (jnp.where(keep, v_t, next_v), jnp.where(keep, a_t, next_a))
        return carry, jnp.where(keep, a_t, 0.0)

    zeros = jnp.zeros(r.shape[:1], r.dtype)
    adv = _reverse_scan(step, (zeros, zeros), (r, v, live)) * steps
    return adv, (adv + v) * steps


def gae(
    rewards, values, mask, gamma, lam, *, options: Conventions = DEFAULT
) -> tuple[jax.Array, jax.Array]:
    """Generalized advantage estimation (Schulman et al. 2016) over masked responses.

        delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1},  R_t = A_t + V_t

    with ``V_T = A_T = 0``. The time steps are :func:`rlhf_jax.masks.value_mask` of ``mask``
    under ``options.score_position``: with ``'after_stop'`` (TRL-PPO, DSCHAT) the slot after the
    stop token is a step of its own, which holds the score; with ``'last_fixed'`` (LMHP) all T
    slots are. Outside the steps, rewards and values are ignored and A = R = 0.
    ``options.mask_holes`` says what a 0 *inside* the mask is: ``'skip'`` (not a step: the
    recursion jumps over it, gamma is applied once between the real tokens on either side) or
    ``'zero'`` (a step with r = V = 0, as TRL-legacy and SAFE compute by multiplying by the
    mask). Both agree on right-padded masks.

    Closed form: with gamma = lam = 1, A_t = sum_{u >= t} r_u - V_t (reward-to-go minus value).

    Args:
      rewards: [B, T] per-token rewards (:func:`rlhf_jax.rewards.shape_rewards`).
      values: [B, T] critic values V_t of the state before token t (the rollout's old values).
      mask: [B, T] 0/1 response mask (real tokens through the first stop token).
      gamma: scalar discount (traceable). lam: scalar GAE lambda (traceable).
      options: conventions (static).

    Returns:
      ``(advantages, returns)``, both [B, T] float32, 0 outside the steps. Not whitened: see
      :func:`ppo_advantages` for the whole per-convention pipeline.
    """
    chex.assert_rank(rewards, 2)
    chex.assert_equal_shape([rewards, values, mask])
    steps = value_mask(mask, options=options)
    _holes(options.mask_holes)
    return _gae_masked(
        as_float(rewards),
        as_float(values),
        steps,
        as_scalar("gamma", gamma),
        as_scalar("lam", lam),
        options.mask_holes,
    )


def discounted_returns(rewards, mask, gamma, *, mask_holes: str = "skip") -> jax.Array:
    """Reward-to-go ``G_t = r_t + gamma G_{t+1}`` over the masked steps, ``G_T = 0``.

    This is GAE with V = 0 and lam = 1. ``mask_holes`` as in :func:`gae`.

    Args:
      rewards: [B, T]; mask: [B, T] 0/1 steps; gamma: scalar (traceable).

    Returns:
      [B, T] float32 returns, 0 outside the mask.
    """
    chex.assert_rank(rewards, 2)
    chex.assert_equal_shape([rewards, mask])
    r = as_float(rewards)
    steps = (jnp.asarray(mask) != 0).astype(r.dtype)
    _holes(mask_holes)
    adv, _ = _gae_masked(
        r, jnp.zeros_like(r), steps, as_scalar("gamma", gamma), jnp.ones((), r.dtype), mask_holes
    )
    return adv


def whiten(x, mask=None, *, shift_mean: bool = True, unbiased: bool = False, eps: float = 1e-8):
    """Masked whitening ``(x - mean) / sqrt(var + eps)`` with statistics over the masked entries.

    * LMHP ``utils/core.py:whiten``: no mask, **biased** variance (``tf.nn.moments``).
    * TRL ``masked_whiten``: ``mean = sum(x m) / sum(m)``, **unbiased** variance
      (``var * n / (n - 1)``, n = sum(m)), the same eps 1e-8.
    * ``shift_mean=False`` adds the mean back (used for rewards, LMHP and TRL).

    The statistics are global over all leading axes (one mean for the whole batch). Entries where
    ``mask`` is 0 are returned as 0. With ``n <= 1`` (e.g. an all-masked batch) the Bessel factor
    is taken as 1 instead of dividing by zero, so the result stays finite.

    Args:
      x: [...] values (e.g. [B, T] advantages). mask: optional 0/1 of x's shape.

    Returns:
      whitened x, float32 (float64 under x64), 0 where masked.
    """
    x = as_float(x)
    m = jnp.ones_like(x) if mask is None else (jnp.asarray(mask) != 0).astype(x.dtype)
    if mask is not None:
        chex.assert_equal_shape([x, mask])
    n = jnp.sum(m)
    mean = jnp.sum(x * m) / jnp.maximum(n, 1.0)
    var = jnp.sum(jnp.square(x - mean) * m) / jnp.maximum(n, 1.0)
    if unbiased:
        var = var * n / jnp.maximum(n - 1.0, 1.0)
    out = (x - mean) * lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def ppo_advantages(
    rewards, values, mask, gamma, lam, *, options: Conventions = DEFAULT
) -> tuple[jax.Array, jax.Array]:
    """The advantage pipeline of one convention: reward whitening, GAE, advantage whitening.

    1. if ``options.whiten_rewards``: rewards whitened over the GAE steps with the mean kept
       (LMHP default, over all B x T; TRL ``whiten_rewards`` over ``~padding_mask_p1``);
    2. ``advantages, returns = gae(...)`` (returns from the un-whitened advantages: every source);
    3. if ``options.whiten_advantages``: advantages whitened (mean removed) over
       :func:`rlhf_jax.masks.policy_mask` (LMHP over B x T, TRL over real tokens);
       DSCHAT and SAFE do not whiten;
    4. advantages set to 0 outside the policy mask (TRL-PPO zero-fills padding).

    Variance is unbiased when ``options.unbiased_variance`` (TRL), else biased (LMHP).

    Args:
      rewards, values, mask: [B, T]; gamma, lam: scalars (traceable); options: conventions.

    Returns:
      ``(advantages [B, T], returns [B, T])`` float32; returns are 0 outside the GAE steps.
    """
    chex.assert_equal_shape([rewards, values, mask])
    if options.whiten_rewards:
        rewards = whiten(
            rewards,
            value_mask(mask, options=options),
            shift_mean=False,
            unbiased=options.unbiased_variance,
        )
    advantages, returns = gae(rewards, values, mask, gamma, lam, options=options)
    pmask = policy_mask(mask, options=options)
    if options.whiten_advantages:
        advantages = whiten(advantages, pmask, shift_mean=True, unbiased=options.unbiased_variance)
    return advantages * pmask, returns


def group_advantages(
    rewards, group_size: int, *, method: str = "grpo", scale: str = "group", eps: float = 1e-4
) -> jax.Array:
    """Critic-free advantages from G samples per prompt (contiguous rows, TRL ``view(-1, G)``).

    * ``method='grpo'`` (Shao et al. 2024; TRL ``grpo_trainer.py``, docs/formulas.md §7):
      ``A_i = (r_i - mean_g(r)) / (std + eps)``, with ``scale`` choosing the std:
      ``'group'`` unbiased std within the group (TRL default), ``'batch'`` unbiased std over all
      rows, ``'none'`` no division (Dr. GRPO).  TRL's eps is 1e-4.
    * ``method='rloo'`` (Ahmadian et al. 2024; TRL ``rloo_trainer.py``): the leave-one-out
      baseline ``A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean_g(r))``; ``scale`` and
      ``eps`` are ignored (TRL's optional batch whitening is :func:`whiten` with
      ``unbiased=True``).

    The advantage is per sequence; broadcast it over the response tokens.

    Args:
      rewards: [N] sequence rewards, N = num_prompts * group_size, each prompt's G samples
        contiguous.
      group_size: G (static); >= 2 for ``'rloo'`` and for a group std.

    Returns:
      [N] float32 advantages.
    """
    chex.assert_rank(rewards, 1)
    if method not in GROUP_METHODS:
        raise ValueError(f"method={method!r}: choose one of {GROUP_METHODS}")
    if scale not in GROUP_SCALES:
        raise ValueError(f"scale={scale!r}: choose one of {GROUP_SCALES}")
    n = rewards.shape[0]
    if group_size < 1 or n % group_size:
        raise ValueError(
            f"group_size={group_size}: must be >= 1 and divide the number of rewards ({n}); "
            "the G samples of each prompt must be contiguous rows"
        )
    if group_size < 2 and (method == "rloo" or scale == "group"):
        raise ValueError(
            f"group_size={group_size}: method={method!r} scale={scale!r} needs >= 2 samples per "
            "prompt (use scale='batch' or 'none' for G = 1 with GRPO)"
        )
    if scale == "batch" and method == "grpo" and n < 2:
        raise ValueError(f"scale='batch' needs >= 2 rewards for an unbiased std, got {n}")
    r = as_float(rewards).reshape(n // group_size, group_size)
    mean = jnp.mean(r, axis=1, keepdims=True)
    if method == "rloo":
        return (group_size / (group_size - 1) * (r - mean)).reshape(n)
    centered = r - mean
    if scale == "group":
        centered = centered / (jnp.std(r, axis=1, keepdims=True, ddof=1) + eps)
    elif scale == "batch":
        centered = centered / (jnp.std(r, ddof=1) + eps)
    return centered.reshape(n)

"""Per-token rewards for PPO on language models: KL estimators, score placement, KL control.

The *feedback* phase of RLHF turns a sequence-level score ``s`` (from a reward model or a rule)
and the log-probs of the sampled tokens under the policy and the frozen reference into a reward
per response token (``docs/formulas.md`` §1):

    r_t = -beta * KL_t * [KL charged at t] + s * [t = t*]

Indexing: ``logprobs[b, t] = log pi(a_t | s_t)`` for the t-th response token, ``mask[b, t]`` is 1
on real tokens (through the first stop token) and 0 on padding; responses are right-padded to a
static length T. Which KL estimator, where ``t*`` is and where the KL is charged are convention
options (:class:`rlhf_jax.presets.Conventions`), one per public implementation; the slot ``t*``
and the masks derived from ``mask`` are :mod:`rlhf_jax.masks`.

All functions are pure, jittable and vmappable; ``kl_coef`` and the controller's numbers may be
traced arrays (a sweep vmaps over them). Inputs of any float dtype are computed in float32 (or
float64 when x64 is on).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from rlhf_jax.masks import as_float, as_scalar, score_slot, value_mask

# Re-exported only for callers not yet switched to rlhf_jax.masks (algorithms/ppo.py,
# tests/test_presets.py); these functions live in rlhf_jax.masks. Remove when they are gone.
from rlhf_jax.masks import policy_mask as policy_mask
from rlhf_jax.masks import value_loss_mask as value_loss_mask
from rlhf_jax.presets import DEFAULT, KL_ESTIMATORS, Conventions

__all__ = [
    "kl_estimate",
    "shape_rewards",
    "shape_costs",
    "sequence_kl_reward",
    "reward_norm_params",
    "normalize_scores",
    "fixed_kl_update",
    "adaptive_kl_update",
]


def kl_estimate(logprobs, ref_logprobs, mask=None, *, estimator: str = "k1") -> jax.Array:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi.

    With ``d_t = logprobs - ref_logprobs`` and ``r_t = pi_ref / pi = exp(-d_t)`` (Schulman,
    "Approximating KL divergence", 2020; docs/formulas.md §1):

    * ``'k1'``:  d_t                         unbiased, can be negative per token (LMHP, DSCHAT,
      SAFE, TRL-PPO default, TRL RLOO summed per sequence)
    * ``'k2'``:  d_t^2 / 2                   biased, low variance (TRL-legacy ``kl_penalty='mse'``)
    * ``'k3'``:  (r_t - 1) - log r_t         unbiased and >= 0 (TRL-PPO ``kl_estimator='k3'``,
      TRL GRPO in the loss)
    * ``'abs'``: |d_t|                       (TRL-legacy ``kl_penalty='abs'``)

    Args:
      logprobs: [B, T] log pi(a_t | s_t) of the sampled tokens.
      ref_logprobs: [B, T] the same under the reference policy.
      mask: optional [B, T] 0/1; the estimate is set to 0 where it is 0.
      estimator: one of ``'k1' 'k2' 'k3' 'abs'`` (static).

    Returns:
      [B, T] float32 estimate.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator={estimator!r}: choose one of {KL_ESTIMATORS}")
    chex.assert_equal_shape([logprobs, ref_logprobs])
    d = as_float(logprobs) - as_float(ref_logprobs)
    if estimator == "k1":
        kl = d
    elif estimator == "k2":
        kl = 0.5 * jnp.square(d)
    elif estimator == "k3":
        kl = jnp.expm1(-d) + d  # (r - 1) - log r with log r = -d; expm1 keeps small d accurate
    else:
        kl = jnp.abs(d)
    if mask is not None:
        chex.assert_equal_shape([logprobs, mask])
        kl = jnp.where(jnp.asarray(mask) != 0, kl, 0.0)
    return kl


def shape_rewards(
    scores,
    logprobs,
    ref_logprobs,
    mask,
    kl_coef,
    *,
    options: Conventions = DEFAULT,
    truncated=None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-token rewards ``r_t = -beta * KL_t + s' * [t = t*]``, clipped per the conventions.

    The steps, in the order the sources apply them (docs/formulas.md §1, §9.1-9.3, 9.7):

    1. ``KL_t = kl_estimate(logprobs, ref_logprobs)`` (``options.kl_estimator``), charged where
       ``mask`` is 1 (``kl_on='real'``: TRL, SAFE) or on every slot (``'all'``: LMHP, DSCHAT);
    2. missing stop token (``truncated``): ``s' = s - p`` (``'subtract'``, TRL-PPO
       ``missing_eos_penalty``) or ``s' = p`` (``'replace'``, LMHP ``penalty_reward_value``);
    3. ``s' = clip(s', -c, c)`` with ``c = options.score_clip`` (DSCHAT ``clip_reward_value=5``);
    4. ``r_t = -beta * KL_t + s' * onehot(t*)``, t* from :func:`rlhf_jax.masks.score_slot`;
    5. ``r_t = clip(r_t, -c, c)`` with ``c = options.reward_clip`` (SAFE ``clip_range_score=50``);
    6. ``r_t = 0`` outside :func:`rlhf_jax.masks.value_mask` (slots that never reach GAE:
       TRL-PPO, DSCHAT and SAFE zero them before GAE).

    Args:
      scores: [B] sequence scores s from the reward model or a reward function.
      logprobs: [B, T] log-probs of the sampled response tokens under the policy (at rollout).
      ref_logprobs: [B, T] the same under the frozen reference policy.
      mask: [B, T] 0/1 response mask (1 on real tokens through the first stop token).
      kl_coef: scalar beta (float or traced 0-d array).
      options: the conventions (static).
      truncated: [B] bool, True for responses that never sampled a stop token; required when
        ``options.missing_stop_penalty`` is set, ignored otherwise.

    Returns:
      ``(rewards [B, T] float32, metrics)`` where metrics holds arrays, not scalars:
      ``'kl'`` [B, T] the KL estimate as charged (0 where not charged, and outside
      :func:`rlhf_jax.masks.value_mask`, whose slots never reach GAE), ``'kl_sum'`` [B] its sum
      per response (what the adaptive controller averages), ``'scores'`` [B] the score s' as
      added (after the penalty and the clip), ``'non_score_reward'`` [B] = -beta * kl_sum.
    """
    chex.assert_rank([scores, logprobs], [1, 2])
    chex.assert_equal_shape([logprobs, ref_logprobs, mask])
    chex.assert_equal_shape_prefix([scores, logprobs], 1)
    beta = as_scalar("kl_coef", kl_coef)
    kl = kl_estimate(
        logprobs,
        ref_logprobs,
        mask if options.kl_on == "real" else None,
        estimator=options.kl_estimator,
    )
    s = as_float(scores)
    if options.missing_stop_penalty is not None:
        if truncated is None:
            raise ValueError(
                "shape_rewards: options.missing_stop_penalty is set, so pass truncated= (a [B] "
                "bool, True where the response has no stop token; rollout.Rollout.truncated)"
            )
        chex.assert_shape(truncated, s.shape)
        truncated = jnp.asarray(truncated).astype(bool)
        p = jnp.asarray(options.missing_stop_penalty, s.dtype)
        s = jnp.where(truncated, s - p if options.missing_stop_mode == "subtract" else p, s)
    if options.score_clip is not None:
        s = jnp.clip(s, -options.score_clip, options.score_clip)
    steps = value_mask(mask, options=options)
    kl = kl * steps  # 'all' charges every slot that reaches GAE (LMHP: all T; DSCHAT: +1 slot)
    rewards = -beta * kl + s[:, None] * score_slot(mask, options=options)
    if options.reward_clip is not None:
        rewards = jnp.clip(rewards, -options.reward_clip, options.reward_clip)
    rewards = rewards * steps
    kl_sum = jnp.sum(kl, axis=1)
    metrics = {"kl": kl, "kl_sum": kl_sum, "scores": s, "non_score_reward": -beta * kl_sum}
    return rewards, metrics


def shape_costs(
    costs, logprobs, ref_logprobs, mask, kl_coef, *, options: Conventions = DEFAULT
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-token costs for Safe RLHF's cost critic: ``c_t = +beta * KL_t + c * [t = t*]``.

    SAFE ``ppo_lag/trainer.py:add_kl_divergence_regularization`` (l.258-287; docs/formulas.md
    §1, §8) adds the KL penalty to the cost with the opposite sign of the reward's, at the same
    slot, with the same ±``reward_clip`` clamp. This is ``-shape_rewards(-costs, ...)``; the
    missing-stop penalty is not applied to costs.

    Args and returns as :func:`shape_rewards` (``costs`` [B] in place of ``scores``); the metric
    ``'scores'`` holds the costs as added.
    """
    neg, metrics = shape_rewards(
        -as_float(costs),
        logprobs,
        ref_logprobs,
        mask,
        kl_coef,
        options=options.replace(missing_stop_penalty=None),
    )
    metrics = dict(
        metrics, scores=-metrics["scores"], non_score_reward=-metrics["non_score_reward"]
    )
    return -neg, metrics


def reward_norm_params(
    scores, target_mean=0.0, target_std=1.0, mask=None
) -> tuple[jax.Array, jax.Array]:
    """Gain and bias that map the reward model's scores to a target mean and std.

    LMHP ``rewards.py:RewardModelTrainer.set_reward_norm`` (Ziegler et al. 2019, §2.2): after the
    reward model is trained, score a sample of policy responses, then set

        gain = target_std / std(s),     bias = target_mean - gain * mean(s),

    so ``gain * s + bias`` has the target mean and std on that sample (LMHP: 0 and 1 before PPO).
    ``std`` is the population (biased) standard deviation, as ``np.std`` in LMHP.

    Args:
      scores: [N] raw scores of a sample of responses.
      target_mean, target_std: scalars (may be traced).
      mask: optional [N] 0/1 marking the valid scores (e.g. the real rows of a padded batch).

    Returns:
      ``(gain, bias)`` float32 scalars. The std is clamped at 1e-8, so a constant or all-masked
      sample gives a large finite gain rather than inf.
    """
    chex.assert_rank(scores, 1)
    s = as_float(scores)
    m = jnp.ones_like(s) if mask is None else (jnp.asarray(mask) != 0).astype(s.dtype)
    n = jnp.maximum(jnp.sum(m), 1.0)
    mean = jnp.sum(s * m) / n
    std = jnp.sqrt(jnp.sum(jnp.square(s - mean) * m) / n)
    gain = as_scalar("target_std", target_std) / jnp.maximum(std, 1e-8)
    bias = as_scalar("target_mean", target_mean) - gain * mean
    return gain, bias


def normalize_scores(scores, gain, bias) -> jax.Array:
    """``gain * scores + bias`` ([B] float32), the LMHP normalised reward head."""
    return as_float(gain) * as_float(scores) + as_float(bias)


def fixed_kl_update(kl_coef, current_kl=None, n_steps=None) -> jax.Array:
    """The fixed KL controller: beta is unchanged (LMHP/TRL ``FixedKLController.update`` no-op).

    Takes the adaptive controller's arguments so that a trainer can switch between the two.
    """
    del current_kl, n_steps
    return as_scalar("kl_coef", kl_coef)


def adaptive_kl_update(
    kl_coef, current_kl, n_steps, *, target, horizon, max_error: float = 0.2
) -> jax.Array:
    """Ziegler et al. (2019) proportional KL controller, one update per rollout batch.

    LMHP ``train_policy.py:AdaptiveKLController.update`` and TRL-legacy
    ``trainer/utils.py:AdaptiveKLController.update`` (identical; docs/formulas.md §2):

        e = clip(KL_cur / KL_target - 1, -0.2, 0.2)
        beta <- beta * (1 + e * n_steps / horizon)

    Called once per rollout batch *after* its PPO epochs; the beta that shaped the batch's rewards
    is the one from before the update.

    Args:
      kl_coef: scalar current beta.
      current_kl: scalar batch mean of the per-response *summed* KL (``mean_b sum_t kl[b, t]``;
        ``shape_rewards`` metrics ``'kl_sum'`` averaged over the batch).
      n_steps: number of episodes (responses) in the batch, all processes together.
      target: scalar target KL per response (nats; LMHP and TRL-legacy 6.0).
      horizon: scalar horizon in episodes (10000 in both).
      max_error: the clip of the proportional error (0.2 in both).

    Returns:
      The new beta, a float32 scalar (pure: the caller stores it in its state).
    """
    beta = as_scalar("kl_coef", kl_coef)
    error = jnp.clip(as_scalar("current_kl", current_kl) / target - 1.0, -max_error, max_error)
    return beta * (1.0 + error * as_float(n_steps) / as_float(horizon))


def sequence_kl_reward(scores, logprobs, ref_logprobs, mask, kl_coef) -> jax.Array:
    """Sequence-level reward with the KL folded in: ``s - beta * sum_t m_t (logp_t - ref_t)``.

    TRL ``rloo_trainer.py`` (1.16.0 l.1669-1673; docs/formulas.md §7): the k1 estimate summed
    over the response and subtracted from the scalar reward, before the leave-one-out baseline.

    Args:
      scores: [B]; logprobs, ref_logprobs, mask: [B, T]; kl_coef: scalar beta.

    Returns:
      [B] float32 rewards.
    """
    chex.assert_rank([scores, logprobs], [1, 2])
    chex.assert_equal_shape_prefix([scores, logprobs], 1)
    kl = kl_estimate(logprobs, ref_logprobs, mask, estimator="k1")
    return as_float(scores) - as_scalar("kl_coef", kl_coef) * jnp.sum(kl, axis=1)

"""Losses of RLHF: PPO policy and value, entropy, reward models, DPO family, GRPO, Safe RLHF.

Every loss returns ``(loss_sum, count, metrics)``: the caller divides once, ``sum / count``, after
summing both over microbatches and devices, so a mean is exact however the batch is split
(``rlhf_jax.optim.accumulate``). ``metrics`` are sums too, each with its own denominator stated in
the docstring (token metrics divide by ``metrics['token_count']``, per-example metrics by
``metrics['example_count']``); all are float32 scalars.

Indexing: ``logprobs[b, t] = log pi(a_t | s_t)`` of the t-th response token, ``mask[b, t]`` 1 on
the tokens that count. Equations and the source of each convention are in the docstrings and in
``docs/formulas.md`` (§4 PPO, §5 reward models, §6 DPO, §7 GRPO/RLOO, §8 Safe
RLHF). Inputs of any float dtype are computed in float32 (float64 under x64). Every function is
jittable, vmappable and differentiable; hyperparameters (clip ranges, beta, coefficients) may be
traced scalars, options and loss types are static.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jax import lax

from rlhf_jax.masks import as_float, as_scalar
from rlhf_jax.presets import AGGREGATIONS, DEFAULT, Conventions

__all__ = [
    "aggregate",
    "ppo_policy_loss",
    "value_loss",
    "entropy",
    "pairwise_rm_loss",
    "ranking_rm_loss",
    "sequence_logps",
    "dpo_loss",
    "grpo_loss",
    "cost_model_loss",
    "lagrangian_advantages",
    "log_lambda_update",
    "DPO_LOSS_TYPES",
    "RANKING_MODES",
]

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "cdpo")
RANKING_MODES = ("pairs", "best_of_k")


def _mask(mask, like) -> jax.Array:
    return (jnp.asarray(mask) != 0).astype(like.dtype)


def aggregate(
    per_token, mask, mode: str = "token_mean", *, max_len: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """``(sum, count)`` of a per-token loss under an aggregation mode; the loss is sum / count.

    With ``l`` [B, T] and ``m`` [B, T] (docs/formulas.md §4, §7, §9.5):

    * ``'token_mean'`` / ``'dapo'``: ``(sum l m, sum m)``, the global masked token mean (LMHP
      with an all-ones mask, TRL-legacy, TRL-PPO, DSCHAT; TRL GRPO ``dapo`` normalises by the
      global token count of the generation batch, which is what summing both does).
    * ``'seq_mean_token_mean'`` / ``'grpo'``: ``(sum_b sum_t l m / max(sum_t m, 1), B)``, the mean
      over sequences of per-sequence token means (SAFE ``masked_mean``, TRL GRPO ``grpo``).
    * ``'dr_grpo'``: ``(sum l m, B * max_len)``, ``max_len`` = T unless given
      (TRL ``max_completion_length``; Liu et al. 2025).
    * ``'bnpo'``: ``(sum l m / max(sum m, 1), 1)``: each call's (microbatch's) token mean, and the
      caller's ``sum / count`` averages those means over microbatches (TRL GRPO ``bnpo``).

    An all-masked row adds 0 to the sum; its count is 0 (token modes) or 1 (sequence modes, as in
    TRL, whose ``clamp(min=1)`` makes an empty row a zero-loss sequence).

    Args:
      per_token: [B, T] loss per token. mask: [B, T] 0/1. mode: static (above).

    Returns:
      ``(sum, count)``, float32 scalars.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"aggregation mode {mode!r}: choose one of {AGGREGATIONS}")
    chex.assert_rank(per_token, 2)
    chex.assert_equal_shape([per_token, mask])
    x = as_float(per_token)
    m = _mask(mask, x)
    masked = jnp.where(m > 0, x, 0.0)  # not x * m: a NaN/inf on a masked slot must not leak
    if mode in ("token_mean", "dapo"):
        return jnp.sum(masked), jnp.sum(m)
    if mode in ("seq_mean_token_mean", "grpo"):
        per_seq = jnp.sum(masked, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
        return jnp.sum(per_seq), jnp.asarray(x.shape[0], x.dtype)
    if mode == "dr_grpo":
        length = x.shape[1] if max_len is None else max_len
        return jnp.sum(masked), jnp.asarray(x.shape[0] * length, x.dtype)
    return jnp.sum(masked) / jnp.maximum(jnp.sum(m), 1.0), jnp.ones((), x.dtype)


def _log_ratio(logprobs, old_logprobs, m, level: str) -> jax.Array:
    """[B, T] log importance ratio per token for the ratio level (0 on masked tokens)."""
    d = jnp.where(m > 0, logprobs - old_logprobs, 0.0)  # DSCHAT: masked before the exp
    if level == "token":
        return d
    per_seq = jnp.sum(d, axis=1, keepdims=True)
    if level == "sequence_mean":
        per_seq = per_seq / jnp.maximum(jnp.sum(m, axis=1, keepdims=True), 1.0)
    return jnp.broadcast_to(per_seq, d.shape) * m


def _policy_terms(logprobs, old_logprobs, advantages, mask, clip_eps, clip_eps_high, options):
    """Per-token clipped surrogate and its metrics (shared by PPO and GRPO)."""
    chex.assert_rank(logprobs, 2)
    chex.assert_equal_shape([logprobs, old_logprobs, mask])
    lp, old = as_float(logprobs), as_float(old_logprobs)
    m = _mask(mask, lp)
    adv = as_float(advantages)
    if adv.ndim == 1:
        chex.assert_equal_shape_prefix([adv, lp], 1)
        adv = jnp.broadcast_to(adv[:, None], lp.shape)
    chex.assert_equal_shape([adv, lp])
    eps_lo = as_scalar("clip_eps", clip_eps)
    eps_hi = eps_lo if clip_eps_high is None else as_scalar("clip_eps_high", clip_eps_high)
    ratio = jnp.exp(_log_ratio(lp, old, m, options.ratio_level))
    clipped = jnp.clip(ratio, 1.0 - eps_lo, 1.0 + eps_hi)
    pg1 = -adv * ratio
    pg2 = -adv * clipped
    loss = jnp.maximum(pg1, pg2)
    metrics = {}
    if options.dual_clip is not None:
        bound = -options.dual_clip * adv  # loss <= c |A| for A < 0 (Ye et al. 2020, Eq. 5)
        dual = (adv < 0) & (loss > bound)
        loss = jnp.where(adv < 0, jnp.minimum(loss, bound), loss)
        metrics["dual_clip_frac"] = jnp.sum(dual * m)
    diff = jnp.where(m > 0, lp - old, 0.0)
    metrics.update(
        {
            "approx_kl": jnp.sum(0.5 * jnp.square(diff) * m),
            "policy_kl": jnp.sum(-diff * m),
            "clip_frac": jnp.sum((pg2 > pg1) * m),
            "clip_frac_low": jnp.sum(((ratio < 1.0 - eps_lo) & (adv < 0)) * m),
            "clip_frac_high": jnp.sum(((ratio > 1.0 + eps_hi) & (adv > 0)) * m),
            "ratio": jnp.sum(ratio * m),
            "token_count": jnp.sum(m),
        }
    )
    return loss, m, metrics


def _entropy_bonus(loss, m, metrics, entropies, entropy_coef, logprobs):
    """``loss - coef * H`` and the ``entropy`` metric (sum over masked tokens), when given."""
    if entropies is None:
        return loss
    chex.assert_equal_shape([entropies, logprobs])
    ent = jnp.where(m > 0, as_float(entropies), 0.0)
    metrics["entropy"] = jnp.sum(ent)
    return loss - as_scalar("entropy_coef", entropy_coef) * ent


def ppo_policy_loss(
    logprobs,
    old_logprobs,
    advantages,
    mask,
    clip_eps,
    *,
    clip_eps_high=None,
    entropies=None,
    entropy_coef=0.0,
    options: Conventions = DEFAULT,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Clipped surrogate policy loss (Schulman et al. 2017), per convention.

    With the ratio ``rho_t = exp(logprobs_t - old_logprobs_t)`` (docs/formulas.md §4):

        l_t = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps_lo, 1 + eps_hi))

    * asymmetric clip: ``eps_hi = clip_eps_high`` (DAPO "clip-higher", TRL ``epsilon_high``),
      default ``clip_eps``;
    * ``options.dual_clip = c``: for A_t < 0, ``l_t = min(l_t, -c A_t)`` (Ye et al. 2020);
    * ``options.ratio_level``: ``'token'`` (PPO); ``'sequence_mean'``, one ratio per sequence
      ``exp(mean_t m (logp - old))`` (GSPO, TRL GRPO ``importance_sampling_level='sequence'``);
      ``'sequence_sum'``, ``exp(sum_t m (logp - old))`` (TRL RLOO, whose loss is one term per
      sequence: use it with ``'seq_mean_token_mean'`` aggregation). The log-ratio is masked
      before the exp, so masked tokens have ratio 1 (DSCHAT, TRL-PPO);
    * aggregation: :func:`aggregate` with ``options.loss_aggregation`` over ``mask``.

    Args:
      logprobs: [B, T] log-probs under the current policy (differentiated).
      old_logprobs: [B, T] log-probs at rollout time (constants).
      advantages: [B, T], or [B] per-sequence (GRPO, RLOO), broadcast over tokens.
      mask: [B, T] 0/1 policy mask (:func:`rlhf_jax.masks.policy_mask`).
      clip_eps: scalar eps (eps_lo). clip_eps_high: optional scalar eps_hi.
      entropies: optional [B, T] per-token entropies (:func:`entropy`), logged as ``entropy``;
        with ``entropy_coef`` != 0 also a bonus ``l_t -= entropy_coef * H_t`` (no PPO source
        uses one; TRL GRPO's ``entropy_coef``).
      options: conventions (static).

    Returns:
      ``(sum, count, metrics)``; metrics are sums over the masked tokens, divide by
      ``metrics['token_count']``: ``approx_kl`` = 0.5 (logp - old)^2 (LMHP, TRL),
      ``policy_kl`` = old - logp (TRL-legacy), ``clip_frac`` (pg2 > pg1, LMHP/TRL),
      ``clip_frac_low`` / ``clip_frac_high`` (ratio clipped below with A < 0 / above with A > 0,
      TRL GRPO), ``ratio``, ``entropy`` when given, and ``dual_clip_frac`` when dual clipping is
      on.
    """
    loss, m, metrics = _policy_terms(
        logprobs, old_logprobs, advantages, mask, clip_eps, clip_eps_high, options
    )
    loss = _entropy_bonus(loss, m, metrics, entropies, entropy_coef, logprobs)
    total, count = aggregate(loss, m, options.loss_aggregation)
    return total, count, metrics


def value_loss(
    values, old_values, returns, mask, value_clip, *, options: Conventions = DEFAULT
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Critic loss ``0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)``.

    Every PPO source clips (c = 0.2; SAFE c = 5) and halves (docs/formulas.md §4, §9.4).
    ``options.clip_value=False`` gives the unclipped ``0.5 (V - R)^2``. Aggregated with
    ``options.loss_aggregation`` over ``mask``, which should be
    :func:`rlhf_jax.masks.value_mask` (it includes the post-stop slot under ``'after_stop'``,
    TRL-PPO ``~padding_mask_p1``).

    Args:
      values: [B, T] new values (differentiated). old_values: [B, T] values at rollout time.
      returns: [B, T] targets R_t (:func:`rlhf_jax.returns.gae`). mask: [B, T] 0/1.
      value_clip: scalar c (traceable; ignored when ``options.clip_value`` is False).
      options: conventions (static).

    Returns:
      ``(sum, count, metrics)``; metrics are token sums (divide by ``token_count``):
      ``value_clip_frac`` (clipped term larger, LMHP/TRL ``vf_clipfrac``), ``value_error``
      ((V - R)^2), ``value`` (V).
    """
    chex.assert_rank(values, 2)
    chex.assert_equal_shape([values, old_values, returns, mask])
    v, old, ret = as_float(values), as_float(old_values), as_float(returns)
    m = _mask(mask, v)
    vf1 = jnp.square(v - ret)
    if options.clip_value:
        c = as_scalar("value_clip", value_clip)
        vf2 = jnp.square(jnp.clip(v, old - c, old + c) - ret)
        per_token = 0.5 * jnp.maximum(vf1, vf2)
        clip_frac = jnp.sum((vf2 > vf1) * m)
    else:
        per_token = 0.5 * vf1
        clip_frac = jnp.zeros((), v.dtype)
    total, count = aggregate(per_token, m, options.loss_aggregation)
    metrics = {
        "value_clip_frac": clip_frac,
        "value_error": jnp.sum(vf1 * m),
        "value": jnp.sum(v * m),
        "token_count": jnp.sum(m),
    }
    return total, count, metrics


def entropy(logits, mask=None) -> jax.Array:
    """Per-token entropy of the categorical over the vocabulary: ``logsumexp(z) - sum p z``.

    TRL-legacy ``core.py:entropy_from_logits`` and TRL-PPO (the same quantity as current TRL's
    ``-(exp(logp) logp).sum(-1)``). Computed in float32 for bf16 logits.

    Args:
      logits: [B, T, V] (already divided by the temperature if the policy samples with one).
      mask: optional [B, T] 0/1; the entropy is 0 where it is 0.

    Returns:
      [B, T] float32 entropies (aggregate with :func:`aggregate`; no source puts an entropy bonus
      in the PPO loss, TRL GRPO's ``entropy_coef`` is in :func:`grpo_loss`).
    """
    chex.assert_rank(logits, 3)
    z = as_float(logits)
    p = jax.nn.softmax(z, axis=-1)
    ent = jax.nn.logsumexp(z, axis=-1) - jnp.sum(p * z, axis=-1)
    if mask is not None:
        chex.assert_equal_shape([ent, mask])
        ent = jnp.where(jnp.asarray(mask) != 0, ent, 0.0)
    return ent


def pairwise_rm_loss(
    chosen, rejected, *, margin=None, center_coef=0.0
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Bradley-Terry reward-model loss on pairs (TRL ``RewardTrainer.compute_loss``).

        l_i = -log sigmoid(r_c - r_r - margin_i) + center_coef * (r_c + r_r)^2

    The margin is optional and per example (TRL's dataset ``margin`` column); the centering term
    (Eisenstein et al. 2023, TRL ``center_rewards_coefficient``, suggested 0.01) keeps rewards
    near zero. ``sum / count`` is TRL's ``mean``.

    Args:
      chosen: [N] scores of the preferred responses. rejected: [N] of the other ones.
      margin: optional [N] (or scalar) margins. center_coef: scalar (traceable).

    Returns:
      ``(sum, count = N, metrics)``; per-pair sums, divide by ``example_count``: ``accuracy``
      (r_c > r_r), ``margin`` (r_c - r_r), ``chosen``, ``rejected``.
    """
    chex.assert_rank(chosen, 1)
    chex.assert_equal_shape([chosen, rejected])
    rc, rr = as_float(chosen), as_float(rejected)
    diff = rc - rr
    logits = diff if margin is None else diff - as_float(margin)
    per_pair = -jax.nn.log_sigmoid(logits) + as_scalar("center_coef", center_coef) * jnp.square(
        rc + rr
    )
    n = jnp.asarray(rc.shape[0], rc.dtype)
    metrics = {
        "accuracy": jnp.sum((diff > 0).astype(rc.dtype)),
        "margin": jnp.sum(diff),
        "chosen": jnp.sum(rc),
        "rejected": jnp.sum(rr),
        "example_count": n,
    }
    return jnp.sum(per_pair), n, metrics


def ranking_rm_loss(
    rewards, *, mode: str = "pairs", mask=None, best=None, l2_coef=0.0
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """K-wise reward-model losses over K ranked responses of one prompt.

    * ``'pairs'`` (InstructGPT, Ouyang et al. 2022, Eq. 1; OASST ``RMLoss``): responses sorted
      best -> worst; every one of the C(K, 2) pairs i < j is a comparison, and one prompt is one
      example:

          l = mean_{i<j} [ -log sigmoid(r_i - r_j) + l2_coef * 0.5 * (r_i^2 + r_j^2) ]

      (OASST ``beta=0.001`` is ``l2_coef``; 0 gives Eq. 1). With ``mask`` [N, K] only pairs of
      valid responses count (variable K per prompt); a prompt with no valid pair is left out of
      the count. K = 2 is :func:`pairwise_rm_loss`.
    * ``'best_of_k'`` (LMHP ``label_types.py:PickBest.loss``): softmax cross-entropy of the K
      rewards against the index of the labeller's pick, ``best`` [N] (default 0: the first is the
      best). Invalid responses get -inf logits. K = 2 is again the pairwise loss.

    Args:
      rewards: [N, K] scores. mode: ``'pairs'`` or ``'best_of_k'`` (static).
      mask: optional [N, K] 0/1 valid responses. best: optional [N] int index (best_of_k).
      l2_coef: scalar (pairs; traceable).

    Returns:
      ``(sum, count, metrics)``; ``count`` is the number of prompts that count. Metrics (sums
      over those prompts, divide by ``example_count``): ``accuracy`` (pairs: fraction of pairs
      ordered correctly; best_of_k: argmax = best).
    """
    if mode not in RANKING_MODES:
        raise ValueError(f"ranking mode {mode!r}: choose one of {RANKING_MODES}")
    chex.assert_rank(rewards, 2)
    r = as_float(rewards)
    n, k = r.shape
    valid = jnp.ones_like(r) if mask is None else _mask(mask, r)
    if mask is not None:
        chex.assert_equal_shape([rewards, mask])
    if mode == "best_of_k":
        idx = jnp.zeros((n,), jnp.int32) if best is None else jnp.asarray(best, jnp.int32)
        chex.assert_shape(idx, (n,))
        logits = jnp.where(valid > 0, r, -jnp.inf)
        logp = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(logp, idx[:, None], axis=1)[:, 0]
        ok = jnp.take_along_axis(valid, idx[:, None], axis=1)[:, 0] * (jnp.sum(valid, 1) >= 2)
        per_prompt = jnp.where(ok > 0, -picked, 0.0)
        acc = jnp.where(ok > 0, jnp.argmax(logits, axis=1) == idx, False).astype(r.dtype)
        count = jnp.sum(ok)
        return jnp.sum(per_prompt), count, {"accuracy": jnp.sum(acc), "example_count": count}
    if k < 2:
        raise ValueError(f"ranking_rm_loss: need K >= 2 responses per prompt, got K={k}")
    i, j = jnp.triu_indices(k, k=1)  # all C(K, 2) pairs, i better than j
    ri, rj = r[:, i], r[:, j]  # [N, P]
    pair_ok = valid[:, i] * valid[:, j]
    l2 = as_scalar("l2_coef", l2_coef) * 0.5 * (jnp.square(ri) + jnp.square(rj))
    per_pair = -jax.nn.log_sigmoid(ri - rj) + l2
    num = jnp.sum(pair_ok, axis=1)
    has = (num > 0).astype(r.dtype)
    per_prompt = jnp.sum(jnp.where(pair_ok > 0, per_pair, 0.0), 1) / jnp.maximum(num, 1.0)
    acc = jnp.sum((ri > rj) * pair_ok, 1) / jnp.maximum(num, 1.0)
    count = jnp.sum(has)
    return jnp.sum(per_prompt * has), count, {"accuracy": jnp.sum(acc), "example_count": count}


def sequence_logps(token_logps, mask) -> jax.Array:
    """[N] ``sum_t m_t logp_t``: the log-probability of each completion (TRL ``_compute_loss``)."""
    chex.assert_rank(token_logps, 2)
    chex.assert_equal_shape([token_logps, mask])
    return jnp.sum(jnp.where(jnp.asarray(mask) != 0, as_float(token_logps), 0.0), axis=1)


def dpo_loss(
    policy_chosen,
    policy_rejected,
    ref_chosen,
    ref_rejected,
    beta,
    *,
    loss_type: str = "sigmoid",
    label_smoothing=0.0,
    chosen_length=None,
    rejected_length=None,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """The DPO loss family (Rafailov et al. 2023), as TRL 1.16.0 ``DPOTrainer`` computes it.

    With sequence log-probs (:func:`sequence_logps`) and
    ``Delta = (pi_c - ref_c) - (pi_r - ref_r)`` (docs/formulas.md §6):

    * ``'sigmoid'``: ``-log sigmoid(beta Delta)`` (TRL default);
    * ``'hinge'``: ``relu(1 - beta Delta)`` (SLiC, Zhao et al. 2023);
    * ``'ipo'``: ``(Delta_c / |c| - Delta_r / |r| - 1 / (2 beta))^2`` with the log-ratios
      averaged per completion token, ``|c|`` = ``chosen_length`` clamped >= 1 (Azar et al. 2023;
      TRL's normalisation, confirmed by the IPO authors);
    * ``'robust'``: ``(-(1-e) log sigmoid(beta Delta) + e log sigmoid(-beta Delta)) / (1 - 2e)``,
      ``e = label_smoothing`` in [0, 0.5) (Chowdhury et al. 2024);
    * ``'cdpo'``: ``-(1-e) log sigmoid(beta Delta) - e log sigmoid(-beta Delta)`` (conservative
      DPO, Mitchell 2023; TRL <= 0.2x ``sigmoid`` with ``label_smoothing``).

    At Delta = 0 the sigmoid loss is log 2 and IPO's is 1 / (4 beta^2).

    Args:
      policy_chosen, policy_rejected: [N] sequence log-probs under the policy (differentiated).
      ref_chosen, ref_rejected: [N] the same under the reference (constants).
      beta: scalar (traceable). loss_type: static. label_smoothing: scalar e (robust, cdpo).
      chosen_length, rejected_length: [N] completion token counts, required for ``'ipo'``.

    Returns:
      ``(sum, count = N, metrics)``; per-pair sums (divide by ``example_count``) of the implicit
      rewards ``beta (logp - ref)``: ``rewards_chosen``, ``rewards_rejected``,
      ``rewards_accuracy`` (chosen > rejected), ``rewards_margin``.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: choose one of {DPO_LOSS_TYPES}")
    chex.assert_rank(policy_chosen, 1)
    chex.assert_equal_shape([policy_chosen, policy_rejected, ref_chosen, ref_rejected])
    b = as_scalar("beta", beta)
    d_c = as_float(policy_chosen) - as_float(ref_chosen)
    d_r = as_float(policy_rejected) - as_float(ref_rejected)
    z = b * (d_c - d_r)
    if loss_type == "sigmoid":
        per = -jax.nn.log_sigmoid(z)
    elif loss_type == "hinge":
        per = jax.nn.relu(1.0 - z)
    elif loss_type == "ipo":
        if chosen_length is None or rejected_length is None:
            raise ValueError(
                "dpo_loss(loss_type='ipo') needs chosen_length= and rejected_length= ([N] "
                "completion token counts, e.g. mask.sum(1)): IPO averages log-ratios per token"
            )
        chex.assert_equal_shape([policy_chosen, chosen_length, rejected_length])
        lc = jnp.maximum(as_float(chosen_length), 1.0)
        lr = jnp.maximum(as_float(rejected_length), 1.0)
        per = jnp.square(d_c / lc - d_r / lr - 1.0 / (2.0 * b))
    else:
        e = as_scalar("label_smoothing", label_smoothing)
        pos, neg = jax.nn.log_sigmoid(z), jax.nn.log_sigmoid(-z)
        if loss_type == "robust":
            per = (-(1.0 - e) * pos + e * neg) / (1.0 - 2.0 * e)
        else:
            per = -(1.0 - e) * pos - e * neg
    rc, rr = lax.stop_gradient(b * d_c), lax.stop_gradient(b * d_r)
    n = jnp.asarray(d_c.shape[0], d_c.dtype)
    metrics = {
        "rewards_chosen": jnp.sum(rc),
        "rewards_rejected": jnp.sum(rr),
        "rewards_accuracy": jnp.sum((rc > rr).astype(rc.dtype)),
        "rewards_margin": jnp.sum(rc - rr),
        "example_count": n,
    }
    return jnp.sum(per), n, metrics


def grpo_loss(
    logprobs,
    old_logprobs,
    ref_logprobs,
    advantages,
    mask,
    clip_eps,
    beta,
    *,
    clip_eps_high=None,
    entropies=None,
    entropy_coef=0.0,
    options: Conventions = DEFAULT,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """GRPO loss (Shao et al. 2024) as TRL 1.16.0 ``GRPOTrainer._compute_loss`` computes it.

        l_t = max(-A rho_t, -A clip(rho_t, 1 - eps_lo, 1 + eps_hi))
              + beta * (exp(ref_t - logp_t) - (ref_t - logp_t) - 1)  -  entropy_coef * H_t

    The KL term is the k3 estimator *in the loss* (not in the reward), >= 0 per token
    (docs/formulas.md §7). Ratio level, dual clip and aggregation (``'dapo'`` = ``'token_mean'``
    is TRL's default; ``'grpo'``, ``'bnpo'``, ``'dr_grpo'``) come from ``options``. With one
    iteration per generation, ``old_logprobs`` is ``stop_gradient(logprobs)`` and rho = 1.

    Args:
      logprobs, old_logprobs, ref_logprobs, mask: [B, T]. advantages: [B] or [B, T]
        (:func:`rlhf_jax.returns.group_advantages`). clip_eps, beta: scalars (traceable).
      clip_eps_high: optional eps_hi (TRL ``epsilon_high``). entropies: optional [B, T]
        (:func:`entropy`), used with ``entropy_coef`` (TRL default 0).

    Returns:
      ``(sum, count, metrics)``; the metrics of :func:`ppo_policy_loss` plus ``kl`` (the k3 sum
      over tokens) and ``entropy`` when given, all divided by ``token_count``.
    """
    chex.assert_equal_shape([logprobs, ref_logprobs])
    loss, m, metrics = _policy_terms(
        logprobs, old_logprobs, advantages, mask, clip_eps, clip_eps_high, options
    )
    d = jnp.where(m > 0, as_float(ref_logprobs) - as_float(logprobs), 0.0)
    k3 = jnp.expm1(d) - d
    loss = loss + as_scalar("beta", beta) * k3
    metrics["kl"] = jnp.sum(k3 * m)
    loss = _entropy_bonus(loss, m, metrics, entropies, entropy_coef, logprobs)
    total, count = aggregate(loss, m, options.loss_aggregation)
    return total, count, metrics


def cost_model_loss(
    safer_costs, unsafer_costs, safer_sign, unsafer_sign, *, reg_coef=0.0
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Safe RLHF cost-model loss (``values/cost/trainer.py:CostTrainer.loss``, sequence-wise).

    With ``s`` = +1 for a safe and -1 for an unsafe response and the cost sign ``-s``
    (docs/formulas.md §8):

        l_i = -log sig(c_unsafer - c_safer) - log sig(-s_safer c_safer)
              - log sig(-s_unsafer c_unsafer) + reg_coef * (c_safer^2 + c_unsafer^2) / 2

    a Bradley-Terry term on the costs plus a sign classifier (safe costs below 0, unsafe above);
    SAFE's regulariser ``reg * mean(stack([c_safer, c_unsafer])^2)`` is the last term.

    Args:
      safer_costs, unsafer_costs: [N] costs of the safer and the less safe response.
      safer_sign, unsafer_sign: [N] safety signs, +1 safe / -1 unsafe.
      reg_coef: scalar (traceable).

    Returns:
      ``(sum, count = N, metrics)``; sums over pairs (divide by ``example_count``):
      ``accuracy`` (c_unsafer > c_safer), ``sign_accuracy`` (sign(c) = -s, averaged over both
      responses).
    """
    chex.assert_rank(safer_costs, 1)
    chex.assert_equal_shape([safer_costs, unsafer_costs, safer_sign, unsafer_sign])
    cs, cu = as_float(safer_costs), as_float(unsafer_costs)
    ss, su = as_float(safer_sign), as_float(unsafer_sign)
    per = (
        -jax.nn.log_sigmoid(cu - cs)
        - jax.nn.log_sigmoid(-ss * cs)
        - jax.nn.log_sigmoid(-su * cu)
        + as_scalar("reg_coef", reg_coef) * 0.5 * (jnp.square(cs) + jnp.square(cu))
    )
    n = jnp.asarray(cs.shape[0], cs.dtype)
    sign_ok = 0.5 * ((-ss * cs > 0).astype(cs.dtype) + (-su * cu > 0).astype(cs.dtype))
    metrics = {
        "accuracy": jnp.sum((cu > cs).astype(cs.dtype)),
        "sign_accuracy": jnp.sum(sign_ok),
        "example_count": n,
    }
    return jnp.sum(per), n, metrics


def lagrangian_advantages(reward_advantages, cost_advantages, log_lambda) -> jax.Array:
    """Safe RLHF's PPO-Lagrangian advantage ``(A_r - lambda A_c) / (1 + lambda)``.

    ``lambda = exp(log_lambda)`` is a constant for the actor (SAFE ``multiplier =
    log_lambda.exp().item()``; ``ppo_lag/trainer.py`` l.289-310), so no gradient flows into it.

    Args:
      reward_advantages, cost_advantages: [B, T] (or any equal shapes). log_lambda: scalar.

    Returns:
      float32 advantages of the same shape, for :func:`ppo_policy_loss`.
    """
    chex.assert_equal_shape([reward_advantages, cost_advantages])
    ll = lax.stop_gradient(as_scalar("log_lambda", log_lambda))
    # 1 / (1 + lambda) = sigmoid(-log lambda) and lambda / (1 + lambda) = sigmoid(log lambda):
    # the same weights, finite for any log lambda (a huge lambda gives -A_c, not inf / inf)
    return jax.nn.sigmoid(-ll) * as_float(reward_advantages) - jax.nn.sigmoid(ll) * as_float(
        cost_advantages
    )


def log_lambda_update(log_lambda, episode_cost, threshold, lr, *, log_lambda_max=None) -> jax.Array:
    """One SGD step of Safe RLHF's Lagrange multiplier, in log space (``ppo_lag/trainer.py``).

    SAFE minimises ``-(J_C - d) * exp(log_lambda)`` with plain SGD once per RL step, then clamps:

        log_lambda <- min(log_lambda + lr * (J_C - d) * exp(log_lambda), log_lambda_max)

    ``J_C`` is the mean episode cost over SAFE's window of the last 128 episodes (the caller keeps
    that window), ``d`` the threshold (default 0), ``lr`` = ``lambda_lr`` (0.1); ``lambda_init``
    1.0 means ``log_lambda = 0``.

    Args:
      log_lambda, episode_cost, threshold, lr: scalars (traceable).
      log_lambda_max: optional float upper clamp (SAFE ``log(lambda_max)``; None = none).

    Returns:
      the new log lambda, a float32 scalar.
    """
    ll = as_scalar("log_lambda", log_lambda)
    gap = as_scalar("episode_cost", episode_cost) - as_scalar("threshold", threshold)
    new = ll + as_scalar("lr", lr) * gap * jnp.exp(ll)
    if log_lambda_max is not None:
        new = jnp.minimum(new, log_lambda_max)
    return new

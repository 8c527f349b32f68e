"""Each preset reproduces its source's numbers on random inputs.

For every source, ``_source_*`` below is an independent numpy float64 transcription of what the
source computes for one PPO batch, written in the source's own layout and indexing (token ids with
padding after the stop token, the sources' masks, slices and in-place edits), from
``docs/formulas.md`` §1-§4 and §8:

* LMHP ``train_policy.py``: ``compute_rewards``, ``PPOTrainer.loss``, ``utils/core.py:whiten``;
* TRL-PPO ``trl/experimental/ppo/ppo_trainer.py:train`` (``first_true_indices``,
  ``INVALID_LOGPROB``, ``padding_mask`` / ``padding_mask_p1``, ``masked_whiten``);
* DSCHAT ``dschat/rlhf/ppo_trainer.py``: ``compute_rewards``, ``train_rlhf``,
  ``get_advantages_and_returns``, ``actor_loss_fn``, ``critic_loss_fn`` (prompt + answer layout);
* SAFE ``ppo/trainer.py:add_kl_divergence_regularization``, ``rl_trainer.py:
  get_advantages_and_returns``, ``utils.py:masked_mean`` (prompt + answer layout).

The rlhf-jax side runs the public pipeline a trainer runs (``shape_rewards`` ->
``ppo_advantages`` -> ``ppo_policy_loss`` / ``value_loss``) with nothing but the preset changed.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses, presets, returns, rewards
from rlhf_jax.presets import Conventions, get_preset

B, R, P = 5, 8, 3  # batch, response length, prompt length
PAD, EOS = 0, 2
EOS_AT = np.array([2, 5, -1, 0, 6])  # response index of the stop token; -1: truncated (no EOS)


def _batch(seed, score_scale=3.0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 20, (B, R))
    for b, e in enumerate(EOS_AT):
        if e >= 0:
            tokens[b, e] = EOS
            tokens[b, e + 1 :] = PAD
    mask = np.array([[1 if e < 0 or t <= e else 0 for t in range(R)] for e in EOS_AT], np.int32)
    return dict(
        tokens=tokens,
        mask=mask,
        truncated=EOS_AT < 0,
        scores=rng.normal(0.5, score_scale, B),
        logprobs=rng.normal(-2.0, 0.8, (B, R)),
        ref_logprobs=rng.normal(-2.0, 0.8, (B, R)),
        values=rng.normal(0.0, 1.0, (B, R)),
        new_logprobs=None,
        new_values=rng.normal(0.0, 1.0, (B, R)),
        rng=rng,
    )


def _fill(rng):
    """Prompt-side log-probs and values for the prompt + answer layouts of DSCHAT and SAFE."""
    return dict(
        prompts=rng.integers(3, 20, (B, P)),
        lp=rng.normal(-2, 0.8, (B, P - 1)),
        ref=rng.normal(-2, 0.8, (B, P - 1)),
        values=rng.normal(0, 1, (B, P - 1)),
    )


def _finish(batch):
    rng = batch.pop("rng")
    batch["new_logprobs"] = batch["logprobs"] + rng.normal(0, 0.3, (B, R))
    return batch


@dataclasses.dataclass(frozen=True)
class HP:
    kl_coef: float
    gamma: float = 0.99
    lam: float = 0.95
    clip_eps: float = 0.2
    value_clip: float = 0.2


@functools.cache
def _pipeline(conv: Conventions, hp: HP):
    """The pipeline a PPO trainer runs with these conventions, jitted once per preset."""

    @jax.jit
    def run(scores, lp, ref, values, new_lp, new_v, mask, truncated, beta, gamma, lam):
        rew, rm = rewards.shape_rewards(
            scores, lp, ref, mask, beta, options=conv, truncated=truncated
        )
        adv, ret = returns.ppo_advantages(rew, values, mask, gamma, lam, options=conv)
        pmask = rewards.policy_mask(mask, options=conv)
        vmask = rewards.value_loss_mask(mask, options=conv)
        pg_s, pg_c, pgm = losses.ppo_policy_loss(new_lp, lp, adv, pmask, hp.clip_eps, options=conv)
        vf_s, vf_c, vfm = losses.value_loss(new_v, values, ret, vmask, hp.value_clip, options=conv)
        return dict(
            rewards=rew,
            steps=rewards.value_mask(mask, options=conv),
            advantages=adv,
            returns=ret,
            pg_loss=pg_s / pg_c,
            vf_loss=vf_s / vf_c,
            approx_kl_sum=pgm["approx_kl"],
            clip_frac=pgm["clip_frac"] / pgm["token_count"],
            vf_clip_frac=vfm["value_clip_frac"] / vfm["token_count"],
            kl_sum=rm["kl_sum"],
        )

    return run


def _rlhf_jax(conv: Conventions, hp: HP, x):
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    out = _pipeline(conv, hp)(
        f32(x["scores"]), f32(x["logprobs"]), f32(x["ref_logprobs"]), f32(x["values"]),
        f32(x["new_logprobs"]), f32(x["new_values"]), x["mask"], x["truncated"],
        hp.kl_coef, hp.gamma, hp.lam,
    )  # fmt: skip
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


def _gae_loop(rewards_, values, gamma, lam, start=0):
    """The GAE loop every source writes (docs/formulas.md §3)."""
    length = rewards_.shape[1]
    lastgaelam = 0.0
    rev = []
    for t in reversed(range(start, length)):
        nextvalues = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards_[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        rev.append(lastgaelam)
    return np.stack(rev[::-1], axis=1)


# ---------------------------------------------------------------------------------------------
# LMHP (openai/lm-human-preferences, train_policy.py)


def _source_lmhp(x, hp: HP, penalty_reward_value=-1.0):
    def whiten(values, shift_mean=True):  # utils/core.py: tf.nn.moments over all axes
        mean, var = values.mean(), values.var()
        whitened = (values - mean) / np.sqrt(var + 1e-8)
        if not shift_mean:
            whitened += mean
        return whitened

    # make_score_fn.penalize: responses without the truncation token score penalty_reward_value
    valid = np.any(x["tokens"] == EOS, axis=1)
    scores = np.where(valid, x["scores"], penalty_reward_value)
    # compute_rewards
    kl = x["logprobs"] - x["ref_logprobs"]
    non_score_reward = -hp.kl_coef * kl
    rewards_ = non_score_reward.copy()
    rewards_[:, -1] += scores
    # PPOTrainer.loss
    rewards_w = whiten(rewards_, shift_mean=False)  # whiten_rewards=True
    values = x["values"]
    advantages = _gae_loop(rewards_w, values, hp.gamma, hp.lam)
    returns_ = advantages + values
    advantages = whiten(advantages)
    vpred = x["new_values"]
    vpredclipped = np.clip(vpred, values - hp.value_clip, values + hp.value_clip)
    vf_losses1 = np.square(vpred - returns_)
    vf_losses2 = np.square(vpredclipped - returns_)
    vf_loss = 0.5 * np.mean(np.maximum(vf_losses1, vf_losses2))
    vf_clipfrac = np.mean(vf_losses2 > vf_losses1)
    logprob = x["new_logprobs"]
    ratio = np.exp(logprob - x["logprobs"])
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * np.clip(ratio, 1.0 - hp.clip_eps, 1.0 + hp.clip_eps)
    pg_loss = np.mean(np.maximum(pg_losses, pg_losses2))
    pg_clipfrac = np.mean(pg_losses2 > pg_losses)
    approxkl = 0.5 * np.mean(np.square(logprob - x["logprobs"]))
    return dict(
        rewards=rewards_w, advantages=advantages, returns=returns_, pg_loss=pg_loss,
        vf_loss=vf_loss, clip_frac=pg_clipfrac, vf_clip_frac=vf_clipfrac, approxkl=approxkl,
        mean_kl=np.mean(np.sum(kl, 1)),
    )  # fmt: skip


def test_lm_human_preferences():
    x = _finish(_batch(0))
    preset = presets.PRESETS["lm-human-preferences"]
    hp = HP(kl_coef=preset.defaults.kl_coef)
    ours = _rlhf_jax(preset.conventions, hp, x)
    src = _source_lmhp(x, hp)
    # LMHP whitens the rewards before GAE: our rewards are shaped, the whitening is in the
    # advantage pipeline, so compare the whitened ones through the advantages and returns.
    np.testing.assert_allclose(ours["advantages"], src["advantages"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours["returns"], src["returns"], rtol=1e-4, atol=1e-4)
    for k in ("pg_loss", "vf_loss", "clip_frac", "vf_clip_frac"):
        assert abs(ours[k] - src[k]) < 1e-4, k
    assert abs(ours["approx_kl_sum"] / (B * R) - src["approxkl"]) < 1e-5
    # Adaptive controller input: mean over the batch of the summed KL (train_policy.py l.221).
    assert abs(ours["kl_sum"].mean() - src["mean_kl"]) < 1e-4
    # Unwhitened rewards: the score (penalised) on the last slot, KL everywhere.
    raw, _ = rewards.shape_rewards(
        x["scores"], x["logprobs"], x["ref_logprobs"], x["mask"], hp.kl_coef,
        options=preset.conventions, truncated=x["truncated"],
    )  # fmt: skip
    valid = np.any(x["tokens"] == EOS, 1)
    want = -hp.kl_coef * (x["logprobs"] - x["ref_logprobs"])
    want[:, -1] += np.where(valid, x["scores"], -1.0)
    np.testing.assert_allclose(raw, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# TRL-PPO (huggingface/trl trl/experimental/ppo/ppo_trainer.py, v1.9.0)

INVALID_LOGPROB = 1.0


def _first_true_indices(bools, dtype=np.int64):
    row_len = bools.shape[-1]
    zero_or_index = row_len * (~bools).astype(dtype) + np.arange(row_len, dtype=dtype) * bools
    return zero_or_index.min(-1)


def _masked_mean(values, mask):
    return (values * mask).sum() / mask.sum()


def _masked_var(values, mask, unbiased=True):
    mean = _masked_mean(values, mask)
    variance = _masked_mean(np.square(values - mean), mask)
    if unbiased:
        mask_sum = mask.sum()
        variance = variance * (mask_sum / (mask_sum - 1))
    return variance


def _masked_whiten(values, mask, shift_mean=True):
    mean, var = _masked_mean(values, mask), _masked_var(values, mask)
    whitened = (values - mean) / np.sqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def _source_trl_ppo(x, hp: HP, kl_estimator="k1", missing_eos_penalty=None, whiten_rewards=False):
    responses = x["tokens"]
    sequence_lengths = _first_true_indices(responses == PAD) - 1
    response_idxs = np.arange(R)[None].repeat(B, 0)
    padding_mask = response_idxs > sequence_lengths[:, None]
    logprobs = np.where(padding_mask, INVALID_LOGPROB, x["logprobs"])
    ref_logprobs = np.where(padding_mask, INVALID_LOGPROB, x["ref_logprobs"])
    sequence_lengths_p1 = sequence_lengths + 1
    padding_mask_p1 = response_idxs > sequence_lengths_p1[:, None]
    values = np.where(padding_mask_p1, 0.0, x["values"])
    scores = x["scores"].copy()
    if missing_eos_penalty is not None:
        contain_eos_token = np.any(responses == EOS, axis=-1)
        scores[~contain_eos_token] -= missing_eos_penalty
    logr = ref_logprobs - logprobs
    kl = -logr if kl_estimator == "k1" else (np.exp(logr) - 1) - logr
    non_score_reward = -hp.kl_coef * kl
    rewards_ = non_score_reward.copy()
    actual_start = np.arange(B)
    actual_end = np.where(sequence_lengths_p1 < R, sequence_lengths_p1, sequence_lengths)
    rewards_[actual_start, actual_end] += scores
    if whiten_rewards:
        rewards_ = _masked_whiten(rewards_, ~padding_mask_p1, shift_mean=False)
        rewards_ = np.where(padding_mask_p1, 0, rewards_)
    advantages = _gae_loop(rewards_, values, hp.gamma, hp.lam)
    returns_ = advantages + values
    advantages = _masked_whiten(advantages, ~padding_mask)
    advantages = np.where(padding_mask, 0, advantages)
    # one minibatch of the PPO epoch
    new_logprobs = np.where(padding_mask, INVALID_LOGPROB, x["new_logprobs"])
    vpred = np.where(padding_mask_p1, 0, x["new_values"])
    vpredclipped = np.clip(vpred, values - hp.value_clip, values + hp.value_clip)
    vf_losses1 = np.square(vpred - returns_)
    vf_losses2 = np.square(vpredclipped - returns_)
    vf_loss = 0.5 * _masked_mean(np.maximum(vf_losses1, vf_losses2), ~padding_mask_p1)
    vf_clipfrac = _masked_mean((vf_losses2 > vf_losses1).astype(float), ~padding_mask_p1)
    logprobs_diff = new_logprobs - logprobs
    ratio = np.exp(logprobs_diff)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * np.clip(ratio, 1.0 - hp.clip_eps, 1.0 + hp.clip_eps)
    pg_loss = _masked_mean(np.maximum(pg_losses, pg_losses2), ~padding_mask)
    pg_clipfrac = _masked_mean((pg_losses2 > pg_losses).astype(float), ~padding_mask)
    approxkl = 0.5 * np.mean(np.square(logprobs_diff))  # unmasked (docs/formulas.md §9.10)
    return dict(
        rewards=rewards_, advantages=advantages, returns=returns_, pg_loss=pg_loss,
        vf_loss=vf_loss, clip_frac=pg_clipfrac, vf_clip_frac=vf_clipfrac, approxkl=approxkl,
        steps=(~padding_mask_p1).astype(float),
    )  # fmt: skip


@pytest.mark.parametrize(
    "variant",
    [dict(), dict(kl_estimator="k3", missing_eos_penalty=1.5, whiten_rewards=True)],
    ids=["defaults", "k3-penalty-whiten"],
)
def test_trl_ppo(variant):
    x = _finish(_batch(1))
    preset = presets.PRESETS["trl-ppo"]
    conv = preset.conventions.replace(
        kl_estimator=variant.get("kl_estimator", "k1"),
        missing_stop_penalty=variant.get("missing_eos_penalty"),
        whiten_rewards=variant.get("whiten_rewards", False),
    )
    hp = HP(kl_coef=preset.defaults.kl_coef * 4)  # a larger beta makes the KL visible
    ours = _rlhf_jax(conv, hp, x)
    src = _source_trl_ppo(x, hp, **variant)
    np.testing.assert_array_equal(ours["steps"], src["steps"])
    if not variant:
        np.testing.assert_allclose(ours["rewards"], src["rewards"] * src["steps"], atol=1e-5)
    np.testing.assert_allclose(ours["advantages"], src["advantages"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours["returns"], src["returns"] * src["steps"], rtol=1e-4, atol=1e-4)
    for k in ("pg_loss", "vf_loss", "clip_frac", "vf_clip_frac"):
        assert abs(ours[k] - src[k]) < 1e-4, k
    # TRL-PPO averages approxkl over all B x T slots (padding diffs are 0): the same sum.
    assert abs(ours["approx_kl_sum"] / (B * R) - src["approxkl"]) < 1e-5


# ---------------------------------------------------------------------------------------------
# DeepSpeed-Chat (microsoft/DeepSpeedExamples dschat/rlhf/ppo_trainer.py @ 83757d9)


def _source_dschat(x, hp: HP, prompt_fill, clip_reward_value=5.0):
    prompts = prompt_fill["prompts"]  # [B, P], no padding
    seq = np.concatenate([prompts, x["tokens"]], axis=1)  # [B, P + R]
    attention_mask = (seq != PAD).astype(np.int64)
    # log-probs and values in the shifted layout [B, P + R - 1]: slot i scores seq[:, i + 1]
    log_probs = np.concatenate([prompt_fill["lp"], x["logprobs"]], axis=1)
    ref_log_probs = np.concatenate([prompt_fill["ref"], x["ref_logprobs"]], axis=1)
    values = np.concatenate([prompt_fill["values"], x["values"]], axis=1)
    new_log_probs = np.concatenate([prompt_fill["lp"], x["new_logprobs"]], axis=1)
    new_values = np.concatenate([prompt_fill["values"], x["new_values"]], axis=1)
    reward_score = x["scores"]

    start = prompts.shape[1] - 1
    action_mask = attention_mask[:, 1:]
    # compute_rewards
    kl_divergence_estimate = -hp.kl_coef * (log_probs - ref_log_probs)
    rewards_ = kl_divergence_estimate
    ends = start + action_mask[:, start:].sum(1) + 1
    reward_clip = np.clip(reward_score, -clip_reward_value, clip_reward_value)
    for j in range(B):
        rewards_[j, start : ends[j]][-1] += reward_clip[j]
    # train_rlhf
    old_values = values.copy()
    old_rewards = rewards_
    for i in range(B):
        old_rewards[i, ends[i] :] = 0
        old_values[i, ends[i] :] = 0
    advantages = _gae_loop(old_rewards, old_values, hp.gamma, hp.lam, start)
    returns_ = advantages + old_values[:, start:]
    mask = action_mask[:, start:]
    # actor_loss_fn
    log_ratio = (new_log_probs[:, start:] - log_probs[:, start:]) * mask
    ratio = np.exp(log_ratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * np.clip(ratio, 1.0 - hp.clip_eps, 1.0 + hp.clip_eps)
    pg_loss = np.sum(np.maximum(pg_loss1, pg_loss2) * mask) / mask.sum()
    # critic_loss_fn
    v = new_values[:, start:]
    ov = old_values[:, start:]
    values_clipped = np.clip(v, ov - hp.value_clip, ov + hp.value_clip)
    vf_loss1 = np.square(v - returns_)
    vf_loss2 = np.square(values_clipped - returns_)
    vf_loss = 0.5 * np.sum(np.maximum(vf_loss1, vf_loss2) * mask) / mask.sum()
    steps = (np.arange(R)[None] < (ends - start)[:, None]).astype(float)
    return dict(
        rewards=old_rewards[:, start:], advantages=advantages, returns=returns_,
        pg_loss=pg_loss, vf_loss=vf_loss, steps=steps,
    )  # fmt: skip


def test_deepspeed_chat():
    x = _batch(2, score_scale=6.0)  # scores beyond +-5 exercise the clip
    fill = _fill(x["rng"])
    x = _finish(x)
    assert np.any(np.abs(x["scores"]) > 5)
    preset = presets.PRESETS["deepspeed-chat"]
    hp = HP(kl_coef=preset.defaults.kl_coef)
    ours = _rlhf_jax(preset.conventions, hp, x)
    src = _source_dschat(x, hp, fill)
    np.testing.assert_array_equal(ours["steps"], src["steps"])
    np.testing.assert_allclose(ours["rewards"], src["rewards"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours["advantages"] * x["mask"], src["advantages"] * x["mask"],
                               rtol=1e-4, atol=1e-4)  # fmt: skip
    np.testing.assert_allclose(ours["returns"], src["returns"] * src["steps"], rtol=1e-4, atol=1e-4)
    for k in ("pg_loss", "vf_loss"):
        assert abs(ours[k] - src[k]) < 1e-4, k


# ---------------------------------------------------------------------------------------------
# Safe RLHF (PKU-Alignment/safe-rlhf, ppo/trainer.py, ppo_lag/trainer.py, rl_trainer.py)


def _safe_masked_mean(x, mask):  # safe_rlhf/utils.py:masked_mean
    return ((x * mask).sum(axis=-1) / mask.sum(axis=-1)).mean()


def _source_safe(x, hp: HP, prompt_fill, clip_range_score=50.0, cost=False):
    prompts = prompt_fill["prompts"]
    seq = np.concatenate([prompts, x["tokens"]], axis=1)
    attention_mask = seq != PAD
    sequence_mask = attention_mask[:, 1:].astype(float)
    log_probs = np.concatenate([prompt_fill["lp"], x["logprobs"]], axis=1)
    ref_log_probs = np.concatenate([prompt_fill["ref"], x["ref_logprobs"]], axis=1)
    values = np.concatenate([prompt_fill["values"], x["values"]], axis=1)
    new_log_probs = np.concatenate([prompt_fill["lp"], x["new_logprobs"]], axis=1)
    new_values = np.concatenate([prompt_fill["values"], x["new_values"]], axis=1)
    start = prompts.shape[1] - 1
    # add_kl_divergence_regularization
    end_index = np.array([m.nonzero()[0][-1] for m in sequence_mask])
    kl_divergence_estimate = log_probs - ref_log_probs
    sign = 1.0 if cost else -1.0  # ppo_lag: costs get +kl_coeff * KL
    rewards_ = sign * hp.kl_coef * kl_divergence_estimate
    np.add.at(rewards_, (np.arange(B), end_index), x["scores"])  # scatter_add
    rewards_ = np.clip(rewards_, -clip_range_score, clip_range_score)
    # get_advantages_and_returns
    values_m = values * sequence_mask
    rewards_m = rewards_ * sequence_mask
    advantages = _gae_loop(rewards_m, values_m, hp.gamma, hp.lam, start)
    returns_ = advantages + values_m[:, start:]
    mask = sequence_mask[:, start:]
    # actor_loss_fn
    ratio = np.exp(new_log_probs[:, start:] - log_probs[:, start:])
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * np.clip(ratio, 1.0 - hp.clip_eps, 1.0 + hp.clip_eps)
    pg_loss = _safe_masked_mean(np.maximum(pg_loss1, pg_loss2), mask)
    # critic_loss_fn
    v = new_values[:, start:]
    ov = values[:, start:]
    values_clipped = np.clip(v, ov - hp.value_clip, ov + hp.value_clip)
    vf_loss1 = np.square(v - returns_)
    vf_loss2 = np.square(values_clipped - returns_)
    vf_loss = 0.5 * _safe_masked_mean(np.maximum(vf_loss1, vf_loss2), mask)
    return dict(
        rewards=rewards_m[:, start:], advantages=advantages, returns=returns_, pg_loss=pg_loss,
        vf_loss=vf_loss,
    )  # fmt: skip


def test_safe_rlhf():
    x = _batch(3, score_scale=40.0)  # scores beyond +-50 exercise the clamp
    fill = _fill(x["rng"])
    x = _finish(x)
    assert np.any(np.abs(x["scores"]) > 50)
    preset = presets.PRESETS["safe-rlhf"]
    d = preset.defaults
    hp = HP(kl_coef=d.kl_coef * 10, value_clip=d.value_clip)
    ours = _rlhf_jax(preset.conventions, hp, x)
    src = _source_safe(x, hp, fill)
    m = x["mask"]
    np.testing.assert_allclose(ours["rewards"], src["rewards"], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(ours["advantages"] * m, src["advantages"] * m, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(ours["returns"] * m, src["returns"] * m, rtol=1e-4, atol=1e-3)
    for k in ("pg_loss", "vf_loss"):
        assert abs(ours[k] - src[k]) < 1e-4 * max(1.0, abs(src[k])), k
    # PPO-Lag costs: +beta KL plus the cost at the same slot, clamped the same way.
    costs, _ = rewards.shape_costs(
        x["scores"], x["logprobs"], x["ref_logprobs"], m, hp.kl_coef, options=preset.conventions
    )
    src_c = _source_safe(x, hp, fill, cost=True)
    np.testing.assert_allclose(costs, src_c["rewards"], rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# The comparisons discriminate: no other preset reproduces a source.


def test_only_the_own_preset_reproduces_a_source():
    x = _batch(4, score_scale=30.0)
    fill = _fill(x["rng"])
    x = _finish(x)
    hp = HP(kl_coef=0.1)
    sources = {
        "lm-human-preferences": _source_lmhp(x, hp),
        "trl-ppo": _source_trl_ppo(x, hp),
        "deepspeed-chat": _source_dschat(x, hp, fill),
        "safe-rlhf": _source_safe(x, hp, fill),
    }
    m = x["mask"]

    def matches(ours, src):
        return (
            abs(ours["pg_loss"] - src["pg_loss"]) < 1e-4
            and abs(ours["vf_loss"] - src["vf_loss"]) < 1e-4
            and np.allclose(ours["advantages"] * m, src["advantages"] * m, atol=1e-4)
        )

    for name in presets.PRESETS:
        ours = _rlhf_jax(get_preset(name), hp, x)
        for source, src in sources.items():
            assert matches(ours, src) == (name == source), (name, source)


# ---------------------------------------------------------------------------------------------
# The registry


def test_registry_and_errors():
    assert set(presets.PRESETS) == {
        "lm-human-preferences", "trl-ppo", "deepspeed-chat", "safe-rlhf", "rlhf-jax",
    }  # fmt: skip
    assert get_preset("rlhf-jax") == presets.DEFAULT == Conventions()
    assert presets.get is get_preset
    for name, p in presets.PRESETS.items():
        assert p.name == name and isinstance(get_preset(name), Conventions)
        hash(p.conventions)  # static: usable as a jit static argument
    with pytest.raises(ValueError, match=r"unknown convention preset 'trl'.*'trl-ppo'"):
        get_preset("trl")
    bad = [
        (dict(kl_estimator="k4"), "kl_estimator"),
        (dict(score_position="eos"), "score_position"),
        (dict(loss_aggregation="mean"), "loss_aggregation"),
        (dict(score_clip=-1.0), "score_clip"),
        (dict(dual_clip=0.5), "dual_clip"),
        (dict(whiten_rewards="yes"), "whiten_rewards"),
        (dict(value_loss_on="all"), "value_loss_on"),
    ]
    for kwargs, field in bad:
        with pytest.raises(ValueError, match=f"Conventions.{field}"):
            Conventions(**kwargs)
    with pytest.raises(ValueError, match="kl_controller"):
        presets.SourceDefaults(kl_coef=0.1, kl_controller="pid")

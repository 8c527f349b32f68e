"""Critic-free policy gradient: GRPO, Dr. GRPO, RLOO and REINFORCE++, one compiled iteration.

``n = GRPOConfig.num_samples`` responses per prompt (contiguous rows, ``N = B * n``), scored by
the reward sources, baselined within their group or the batch; no critic, no GAE. One iteration is
one ``jax.jit`` function, sharing PPO's rollout and scoring code (:mod:`rlhf_jax.scoring`)::

    rollout     scoring.generate(policy, prompts)          tokens, mask, old log-probs   [N, R]
    reference   scoring.reference_logprobs(ref)            ref log-probs (KL on)          [N, R]
    feedback    scoring.score(sources)                     sum_k w_k s_k                  [N]
    KL          kl='reward': r = s - beta sum_t (old - ref)   (k1 in the reward, TRL RLOO)
    baseline    returns.group_advantages / batch whitening  advantages                    [N]
    masks       dynamic sampling (groups with equal rewards), truncated responses: rows of 0
    update      E epochs x M minibatches (lax.scan) of losses.grpo_loss (clipped ratio, k3 KL in
                the loss when kl='loss', asymmetric eps), aggregated by loss_aggregation

**Baselines** (``baseline``; ``docs/formulas.md`` §7):

- ``'grpo'``: ``A_i = (r_i - mean_g r) / (std_g r + 1e-4)``, unbiased group std (Shao et al.
  2024; TRL ``scale_rewards='group'``);
- ``'dr_grpo'``: ``A_i = r_i - mean_g r``, no std; with the ``'dr_grpo'`` aggregation (sum over
  tokens / (N * R)), no length normalisation either (Liu et al. 2025);
- ``'rloo'``: leave-one-out ``A_i = r_i - mean_{j != i} r_j`` (Ahmadian et al. 2024; TRL RLOO);
- ``'reinforce++'``: the batch-normalised REINFORCE++ (Hu 2025): ``A_i = (r_i - mean_batch r) /
  (std_batch r + 1e-4)``, no group baseline (unbiased std over all ``N`` responses).

**KL** (``kl``): ``'loss'`` the k3 estimator in the loss, ``beta (e^{ref - logp} - (ref - logp) -
1)`` per token (GRPO, :func:`rlhf_jax.losses.grpo_loss`); ``'reward'`` the k1 estimate summed over
the response and subtracted from the reward before the baseline
(:func:`rlhf_jax.rewards.sequence_kl_reward`; TRL RLOO, REINFORCE++); ``'off'`` neither, and the
reference is not run (TRL GRPO's default ``beta=0``).

**Clipping and aggregation.** ``clip_eps`` and ``clip_eps_high`` (DAPO "clip-higher"; default
``clip_eps``); ``loss_aggregation`` ``'token_mean'``/``'dapo'`` (the global token mean, TRL GRPO
default), ``'seq_mean_token_mean'``/``'grpo'``, ``'dr_grpo'``, ``'bnpo'`` (:func:`rlhf_jax.losses
.aggregate`), None = the baseline's own (``'dr_grpo'`` for Dr. GRPO, ``'seq_mean_token_mean'``
for RLOO, else ``'token_mean'``). ``ratio_level`` ``'token'``, ``'sequence_mean'`` (GSPO) or
``'sequence_sum'`` (TRL RLOO's one ratio per response), None = ``'sequence_sum'`` for RLOO, else
``'token'``.

**Dynamic sampling** (DAPO, Yu et al. 2025): with ``dynamic_sampling=True`` the groups whose
rewards are all equal (no learning signal) are masked out of the loss: their rows' mask is 0, the
shapes do not change, and ``groups/kept`` reports the share kept. ``mask_truncated=True`` drops
responses without a stop token from the loss (TRL ``mask_truncated_completions``).

**What is static, what is an array.** :class:`GRPOConfig` holds what changes the program;
:class:`GRPOHParams` (beta, learning rate, the two clip epsilons, temperature, seed) are scalar
arrays in the state, so ``jax.vmap(iteration_fn(cfg, static), in_axes=(0, None, None, None))`` over
a stacked state runs N experiments in one program.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from rlhf_jax import losses, models, parallel, presets, returns, rewards, scoring
from rlhf_jax.data.formats import DataConfig
from rlhf_jax.optim import OptimConfig
from rlhf_jax.train import (
    LoopConfig,
    TrainState,
    epoch_updates,
    hparam_arrays,
    prompt_step,
    seeded_state,
    stack_states,
)

__all__ = [
    "BASELINES",
    "KL_MODES",
    "GRPOConfig",
    "GRPOExperience",
    "GRPOFrozen",
    "GRPOHParams",
    "GRPOModels",
    "GRPOStage",
    "GRPOState",
    "advantages",
    "experience",
    "init_state",
    "iteration_fn",
    "make_iteration",
    "make_step",
    "prepare",
    "stack_states",
    "update",
]

BASELINES = ("grpo", "dr_grpo", "rloo", "reinforce++")
KL_MODES = ("loss", "reward", "off")
_AGGREGATION = {"dr_grpo": "dr_grpo", "rloo": "seq_mean_token_mean"}  # else token_mean
_EPS = 1e-4  # TRL's std epsilon


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Critic-free policy gradient. Static fields change the program; the last group are the
    defaults of :class:`GRPOHParams`, carried as arrays at run time."""

    baseline: str = "grpo"  # grpo | dr_grpo | rloo | reinforce++ (batch-normalised)
    kl: str = "loss"  # "loss": k3 in the loss (GRPO) | "reward": k1 in the reward (RLOO) | "off"
    num_samples: int = 4  # n (G): responses per prompt, contiguous rows
    response_length: int = 48  # R: new tokens per response
    num_epochs: int = 1  # E: passes over the rollout batch (TRL num_iterations)
    num_minibatches: int = 1  # M: updates per epoch; N = B * n must be divisible by M
    loss_aggregation: str | None = None  # token_mean | seq_mean_token_mean | dr_grpo | bnpo | ...
    ratio_level: str | None = None  # token | sequence_mean (GSPO) | sequence_sum; None = baseline's
    dynamic_sampling: bool = False  # mask groups whose rewards are all equal (DAPO)
    mask_truncated: bool = False  # drop responses without a stop token from the loss
    stop_tokens: tuple[int, ...] = ()  # token ids that end a response
    pad_token_id: int = 0  # written after the stop token
    top_k: int = 0  # sampling top-k; 0 = off
    top_p: float = 1.0  # sampling nucleus mass; 1 = off
    optim: OptimConfig = OptimConfig(learning_rate=1e-6)  # AdamW (TRL GRPO lr 1e-6)
    loop: LoopConfig = LoopConfig(max_steps=100)  # iterations, evaluation, stopping
    # --- GRPOHParams defaults (arrays at run time; the learning rate is optim.learning_rate) ---
    kl_coef: float = 0.04  # beta of the KL term (in the loss or in the reward)
    clip_eps: float = 0.2  # epsilon_low of the clipped ratio
    clip_eps_high: float | None = None  # epsilon_high (DAPO clip-higher 0.28); None = clip_eps
    temperature: float = 1.0  # sampling temperature, also applied to the learner's log-probs
    seed: int = 0  # run seed: rollouts and minibatch permutations

    def __post_init__(self):
        def need(ok: bool, message: str):
            if not ok:
                raise ValueError(f"grpo.trainer.{message}")

        need(self.baseline in BASELINES, f"baseline={self.baseline!r}: choose one of {BASELINES}")
        need(self.kl in KL_MODES, f"kl={self.kl!r}: choose one of {KL_MODES}")
        need(self.num_samples >= 1, f"num_samples={self.num_samples}: must be >= 1")
        need(
            self.num_samples >= 2 or self.baseline == "reinforce++",
            f"num_samples={self.num_samples}: baseline={self.baseline!r} needs >= 2 samples per "
            "prompt (a group)",
        )
        need(self.response_length >= 1, f"response_length={self.response_length}: must be >= 1")
        need(self.num_epochs >= 1, f"num_epochs={self.num_epochs}: must be >= 1")
        need(self.num_minibatches >= 1, f"num_minibatches={self.num_minibatches}: must be >= 1")
        need(
            self.loss_aggregation is None or self.loss_aggregation in presets.AGGREGATIONS,
            f"loss_aggregation={self.loss_aggregation!r}: choose one of {presets.AGGREGATIONS}",
        )
        need(
            self.ratio_level is None or self.ratio_level in presets.RATIO_LEVELS,
            f"ratio_level={self.ratio_level!r}: choose one of {presets.RATIO_LEVELS}",
        )
        need(self.top_k >= 0, f"top_k={self.top_k}: must be >= 0 (0 = off)")
        need(0 < self.top_p <= 1, f"top_p={self.top_p}: must be in (0, 1]")
        need(self.kl_coef >= 0, f"kl_coef={self.kl_coef}: must be >= 0")
        need(self.clip_eps > 0, f"clip_eps={self.clip_eps}: must be > 0")
        need(
            self.clip_eps_high is None or self.clip_eps_high > 0,
            f"clip_eps_high={self.clip_eps_high}: must be > 0 (or null = clip_eps)",
        )
        need(self.temperature > 0, f"temperature={self.temperature}: must be > 0")

    @property
    def conventions(self) -> presets.Conventions:
        """The aggregation and ratio level in force (the baseline's defaults unless set)."""
        agg = self.loss_aggregation or _AGGREGATION.get(self.baseline, "token_mean")
        level = self.ratio_level or ("sequence_sum" if self.baseline == "rloo" else "token")
        return presets.DEFAULT.replace(loss_aggregation=agg, ratio_level=level)

    @property
    def uses_reference(self) -> bool:
        return self.kl != "off"

    def sampling_spec(self) -> scoring.SamplingSpec:
        return scoring.SamplingSpec(
            response_length=self.response_length,
            num_samples=self.num_samples,
            stop_tokens=self.stop_tokens,
            pad_token_id=self.pad_token_id,
            top_k=self.top_k,
            top_p=self.top_p,
        )


@flax.struct.dataclass
class GRPOHParams:
    """The numbers a sweep may vary, as scalar arrays (stack them to ``jax.vmap`` over runs)."""

    kl_coef: jax.Array
    learning_rate: jax.Array
    clip_eps: jax.Array
    clip_eps_high: jax.Array
    temperature: jax.Array
    seed: jax.Array  # int32

    @classmethod
    def from_config(cls, cfg: GRPOConfig, **overrides: Any) -> GRPOHParams:
        """Scalar arrays from ``cfg`` (``overrides`` replace single fields, e.g. ``seed=3``)."""
        high = cfg.clip_eps if cfg.clip_eps_high is None else cfg.clip_eps_high
        values = {
            "kl_coef": cfg.kl_coef,
            "learning_rate": cfg.optim.learning_rate,
            "clip_eps": cfg.clip_eps,
            "clip_eps_high": high,
            "temperature": cfg.temperature,
            "seed": cfg.seed,
        }
        return hparam_arrays(cls, values, overrides, "GRPO")


@flax.struct.dataclass
class GRPOState:
    """What an iteration updates (donated): the policy's ``params``, ``opt_state``, ``step``
    (int32 iterations), the run's base ``key`` (from the seed) and the ``hparams``."""

    params: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array
    hparams: GRPOHParams


@flax.struct.dataclass
class GRPOFrozen:
    """What the iteration reads and never trains (a separate, non-donated argument)."""

    reference: Any = None  # reference params; None when kl='off'
    rewards: tuple = ()  # each reward source's params (None for a function)


@dataclasses.dataclass(frozen=True, eq=False)
class GRPOModels:
    """The static half: graph definitions and the reward sources (:mod:`rlhf_jax.scoring`)."""

    policy: Any
    reference: Any = None  # None when kl='off'
    sources: tuple = ()


@flax.struct.dataclass
class GRPOExperience:
    """One scored rollout batch (``N = B * n`` rows) with its advantages.

    Attributes:
      tokens, mask: [N, P+R] prompt + response. response_mask: [N, R] the loss mask (the sampled
        mask, with the rows of dropped groups / truncated responses zeroed).
      old_logprobs, ref_logprobs: [N, R] (ref zeros when kl='off'). advantages: [N].
      scores: [N] the sources' weighted sum; rewards: [N] after the KL (kl='reward').
      kl: [N] k1 KL per response (sum over tokens of old - ref). kept: [N] 1 where a row counts.
      truncated: [N] bool, no stop token.
    """

    tokens: jax.Array
    mask: jax.Array
    response_mask: jax.Array
    old_logprobs: jax.Array
    ref_logprobs: jax.Array
    advantages: jax.Array
    scores: jax.Array
    rewards: jax.Array
    kl: jax.Array
    kept: jax.Array
    truncated: jax.Array


def init_state(cfg: GRPOConfig, params: Any, hparams: GRPOHParams | None = None) -> GRPOState:
    """A fresh state: a *copy* of ``params`` and a new optimizer state at ``hparams``' rate."""
    hparams = GRPOHParams.from_config(cfg) if hparams is None else hparams
    return seeded_state(GRPOState, params, cfg.optim, hparams)


# ------------------------------------------------------------------------------------------
# Advantages
# ------------------------------------------------------------------------------------------


def advantages(rewards_: jax.Array, group_size: int, baseline: str) -> jax.Array:
    """[N] advantages of [N] sequence rewards (``group_size`` contiguous rows per prompt).

    ``'grpo'``: group mean and unbiased group std; ``'dr_grpo'``: group mean only; ``'rloo'``:
    leave-one-out mean (:func:`rlhf_jax.returns.group_advantages`); ``'reinforce++'``: the batch
    mean and unbiased batch std (one group of all ``N`` rows; ``N = 1`` gives 0).
    """
    if baseline == "grpo":
        return returns.group_advantages(rewards_, group_size, method="grpo", scale="group")
    if baseline == "dr_grpo":
        return returns.group_advantages(rewards_, group_size, method="grpo", scale="none")
    if baseline == "rloo":
        return returns.group_advantages(rewards_, group_size, method="rloo")
    if baseline == "reinforce++":
        n = rewards_.shape[0]
        if n < 2:
            return jnp.zeros_like(rewards_, jnp.float32)
        return returns.group_advantages(rewards_, n, method="grpo", scale="group", eps=_EPS)
    raise ValueError(f"baseline={baseline!r}: choose one of {BASELINES}")


def equal_groups(rewards_: jax.Array, group_size: int) -> jax.Array:
    """[N] bool: the row's group has all rewards equal (DAPO dynamic sampling drops these)."""
    r = rewards_.reshape(-1, group_size)
    same = jnp.all(r == r[:, :1], axis=1)
    return jnp.repeat(same, group_size)


# ------------------------------------------------------------------------------------------
# Phases
# ------------------------------------------------------------------------------------------


def experience(
    cfg: GRPOConfig,
    static: GRPOModels,
    state: GRPOState,
    frozen: GRPOFrozen,
    rows: scoring.Responses,
    sampled: Any,
) -> GRPOExperience:
    """Feedback: reference log-probs, scores, the KL in the reward, advantages and loss masks."""
    hp = state.hparams
    response_mask = sampled.mask
    m = response_mask.astype(jnp.float32)
    old = lax.stop_gradient(sampled.learner_logprobs)
    if static.reference is not None:
        ref = scoring.reference_logprobs(static.reference, frozen.reference, rows, hp.temperature)
        ref = jnp.where(m > 0, ref, 0.0)
    else:
        ref = old
    scores, _ = scoring.score(static.sources, frozen.rewards, rows)
    kl = jnp.sum(jnp.where(m > 0, old - ref, 0.0), -1)  # k1 per response
    if cfg.kl == "reward":
        reward = rewards.sequence_kl_reward(scores, old, ref, response_mask, hp.kl_coef)
    else:
        reward = scores
    adv = advantages(reward, cfg.num_samples, cfg.baseline)
    kept = jnp.ones_like(reward)
    if cfg.dynamic_sampling:
        kept = kept * (1.0 - equal_groups(reward, cfg.num_samples).astype(jnp.float32))
    if cfg.mask_truncated:
        kept = kept * (1.0 - sampled.truncated.astype(jnp.float32))
    loss_mask = (response_mask * kept[:, None].astype(response_mask.dtype)).astype(jnp.int32)
    return GRPOExperience(
        tokens=rows.tokens,
        mask=rows.mask,
        response_mask=loss_mask,
        old_logprobs=old,
        ref_logprobs=ref,
        advantages=adv,
        scores=scores,
        rewards=reward,
        kl=kl,
        kept=kept,
        truncated=sampled.truncated,
    )


def _loss(cfg: GRPOConfig, static: GRPOModels, params, batch: GRPOExperience, hp: GRPOHParams):
    prompt_len = batch.tokens.shape[1] - batch.response_mask.shape[1]
    logprobs = models.token_logprobs(
        static.policy,
        params,
        batch.tokens,
        batch.mask,
        start=prompt_len,
        temperature=hp.temperature,
    )
    beta = hp.kl_coef if cfg.kl == "loss" else 0.0
    return losses.grpo_loss(
        logprobs,
        batch.old_logprobs,
        batch.ref_logprobs,
        batch.advantages,
        batch.response_mask,
        hp.clip_eps,
        beta,
        clip_eps_high=hp.clip_eps_high,
        options=cfg.conventions,
    )


def update(
    cfg: GRPOConfig,
    static: GRPOModels,
    state: GRPOState,
    exp: GRPOExperience,
    perm_key: jax.Array,
    *,
    mesh: jax.sharding.Mesh | None = None,
    mode: str = "jit",
) -> tuple[GRPOState, dict[str, jax.Array]]:
    """Learn: E epochs x M minibatches of :func:`rlhf_jax.losses.grpo_loss`
    (:func:`rlhf_jax.train.epoch_updates`, PPO's learn phase).

    Each minibatch is one optimizer update, its gradient accumulated exactly over
    ``optim.grad_accum_steps`` microbatches (each loss divided by the whole minibatch's count
    for the aggregation mode, as PPO), in the ``mode`` form on ``mesh`` (``parallel.step``:
    ``'jit'`` or the per-device ``'shard_map'``, :func:`rlhf_jax.parallel.accumulate`). A
    non-finite update is dropped (``skipped``).
    """
    hp = state.hparams
    agg = cfg.conventions.loss_aggregation
    ok = jnp.all(jnp.isfinite(exp.advantages)) & jnp.all(jnp.isfinite(exp.ref_logprobs))

    def count_of(mb, pieces):  # the whole minibatch's denominator, summed over its row blocks
        mask = mb.response_mask
        parts = mask.reshape(pieces, mask.shape[0] // pieces, mask.shape[1])
        per = jax.vmap(lambda x: losses.aggregate(jnp.zeros(x.shape), x, agg)[1])(parts)
        return jnp.sum(per)

    def objective(params, mb_and_count):
        mb, count = mb_and_count
        total, _, mets = _loss(cfg, static, params, mb, hp)
        loss = total / jnp.maximum(count[0], 1.0)
        tokens = mets["token_count"]
        sums = {
            "policy/clip_frac": (mets["clip_frac"], tokens),
            "policy/clip_frac_low": (mets["clip_frac_low"], tokens),
            "policy/clip_frac_high": (mets["clip_frac_high"], tokens),
            "policy/ratio": (mets["ratio"], tokens),
            "kl/token_k3": (mets["kl"], tokens),
        }
        return loss, (sums, {"loss": loss})

    train = TrainState(params=state.params, opt_state=state.opt_state, step=state.step)
    train, metrics = epoch_updates(
        cfg.optim,
        train,
        exp,
        objective,
        count_of,
        num_epochs=cfg.num_epochs,
        num_minibatches=cfg.num_minibatches,
        perm_key=perm_key,
        ok=ok,
        mesh=mesh,
        mode=mode,
    )
    return state.replace(params=train.params, opt_state=train.opt_state), metrics


def rollout_metrics(exp: GRPOExperience, group_size: int) -> dict[str, jax.Array]:
    """Scalar statistics of a scored rollout batch (before the update)."""
    full = (exp.mask[:, -exp.response_mask.shape[1] :] > 0).astype(jnp.float32)
    lengths = jnp.sum(full, -1)
    kept = exp.kept.reshape(-1, group_size)[:, 0]
    return {
        "score/mean": jnp.mean(exp.scores),
        "score/std": jnp.std(exp.scores),
        "reward/mean": jnp.mean(exp.rewards),
        "kl/response": jnp.mean(exp.kl),
        "advantages/mean": jnp.mean(exp.advantages),
        "advantages/std": jnp.std(exp.advantages),
        "response/length": jnp.mean(lengths),
        "response/truncated": jnp.mean(exp.truncated.astype(jnp.float32)),
        "entropy/sampled": -jnp.sum(exp.old_logprobs * full) / jnp.maximum(jnp.sum(full), 1.0),
        "groups/kept": jnp.mean(kept),
    }


# ------------------------------------------------------------------------------------------
# The iteration
# ------------------------------------------------------------------------------------------


def iteration_fn(
    cfg: GRPOConfig,
    static: GRPOModels,
    *,
    mesh: jax.sharding.Mesh | None = None,
    mode: str = "jit",
) -> Callable[..., tuple[GRPOState, dict[str, jax.Array]]]:
    """The pure iteration ``(state, frozen, prompts, prompt_mask, prompt_index=None)``:
    sample -> score -> learn; vmap it over runs before jitting (:func:`make_iteration`).
    ``mode`` is the update's gradient form on ``mesh`` (:func:`update`)."""
    keep = (lambda tree: tree) if mesh is None else (lambda t: parallel.constrain_batch(t, mesh))
    spec = cfg.sampling_spec()

    def iteration(state, frozen, prompts, prompt_mask, prompt_index=None):
        prompts, prompt_mask, prompt_index = keep((prompts, prompt_mask, prompt_index))
        sample_key, perm_key = scoring.iteration_keys(state.key, state.step)
        sampled = scoring.generate(
            spec,
            static.policy,
            state.params,
            prompts,
            prompt_mask,
            sample_key,
            state.hparams.temperature,
            prompt_index,
        )
        rows = keep(scoring.Responses.of(prompts, prompt_mask, sampled))
        exp = keep(experience(cfg, static, state, frozen, rows, sampled))
        metrics = rollout_metrics(exp, cfg.num_samples)
        new_state, upd = update(cfg, static, state, exp, perm_key, mesh=mesh, mode=mode)
        return new_state.replace(step=state.step + 1), {**metrics, **upd}

    return iteration


def make_iteration(
    cfg: GRPOConfig,
    static: GRPOModels,
    *,
    mesh: jax.sharding.Mesh | None = None,
    state_shardings: Any = None,
    frozen_shardings: Any = None,
    mode: str = "jit",
) -> Callable:
    """The compiled iteration ``(state, frozen, prompts, prompt_mask, prompt_index=None)``
    ``-> (state, metrics)``, the state donated (as PPO's ``make_iteration``, ``mode`` too)."""
    if mesh is None:
        return jax.jit(iteration_fn(cfg, static), donate_argnums=0)
    rows = parallel.batch_sharding(mesh)
    jitted = parallel.jit_step(
        iteration_fn(cfg, static, mesh=mesh, mode=mode),
        mesh,
        state_shardings,
        arg_shardings=(frozen_shardings, rows, rows, rows),
    )

    def iterate(state, frozen, prompts, prompt_mask, prompt_index=None):
        with jax.set_mesh(mesh):
            return jitted(state, frozen, prompts, prompt_mask, prompt_index)

    iterate.jitted = jitted  # type: ignore[attr-defined]
    return iterate


def make_step(
    cfg: GRPOConfig,
    static: GRPOModels,
    frozen: GRPOFrozen,
    *,
    mesh: jax.sharding.Mesh | None = None,
    state_shardings: Any = None,
    frozen_shardings: Any = None,
    mode: str = "jit",
) -> Callable:
    """``step(state, batch, key) -> (state, metrics)`` for :func:`rlhf_jax.train.run_loop`;
    ``batch`` has ``prompt_tokens``, ``prompt_mask`` and optionally ``prompt_index``. ``key`` is
    unused (randomness from the state's seed and step: vmappable, exactly resumable).
    ``mode``: the update's gradient form (:func:`make_iteration`)."""
    iterate = make_iteration(
        cfg,
        static,
        mesh=mesh,
        state_shardings=state_shardings,
        frozen_shardings=frozen_shardings,
        mode=mode,
    )
    return prompt_step(iterate, frozen)


# ------------------------------------------------------------------------------------------
# The pipeline stage
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GRPOStage:
    """Critic-free policy gradient (GRPO, Dr. GRPO, RLOO, REINFORCE++) from a policy."""

    policy: str | None = None  # HF directory the policy starts from; None = this run's sft/final
    reference: str | None = None  # the frozen KL anchor; None = the policy's starting point
    prompts_file: str = ""  # rows {prompt} or {messages} (other fields are ignored)
    data: DataConfig = DataConfig(kind="prompt", max_prompt_length=64)  # prompt length P
    # reward sources, each "model:<HF dir>" or "fn:<module:function>", optionally "@<weight>"
    # at the end (a weighted sum); () = this run's rm/final
    rewards: tuple[str, ...] = ()
    # reward functions see the stop token and other special tokens in the decoded responses
    # (the toy task's gold_reward needs them: its stop token "." is special)
    decode_special_tokens: bool = False
    batch_size: int = 16  # prompts per iteration (each answered trainer.num_samples times)
    trainer: GRPOConfig = GRPOConfig()  # baseline, KL, clipping, aggregation, optimizer, loop
    eval_prompts_file: str | None = None  # held-out prompts to sample on; None = no evaluation
    eval_prompts: int = 256  # prompts of eval_prompts_file (the first ones)
    eval_samples_per_prompt: int = 1  # responses per evaluation prompt
    evaluator: str | None = None  # "module:function" (prompts, responses) -> {name: [B] values}
    win_rate_metric: str | None = "gold"  # evaluator metric of the win rate vs the reference
    log_samples: int = 4  # evaluation samples written to samples.jsonl
    stop_at_eos: bool = True  # add the tokenizer's EOS to trainer.stop_tokens
    save_every: int = 50  # checkpoint every N iterations (also at the end and on SIGTERM)

    def __post_init__(self):
        if self.data.kind != "prompt":
            raise ValueError(f"grpo.data.kind={self.data.kind!r}: GRPO reads 'prompt' rows")
        if self.batch_size < 1 or self.save_every < 0 or self.eval_prompts < 1:
            raise ValueError("grpo.batch_size, grpo.eval_prompts must be >= 1, save_every >= 0")
        if self.eval_samples_per_prompt < 1 or self.log_samples < 0:
            raise ValueError("grpo.eval_samples_per_prompt must be >= 1, log_samples >= 0")


def prepare(ctx: Any) -> Any:
    """The ``grpo`` stage: load the policy, the reference (unless kl='off'), the prompts and the
    reward sources; check the batch splits; return the Plan."""
    from rlhf_jax import pipeline
    from rlhf_jax.algorithms.dpo import eval_config
    from rlhf_jax.stages import check_minibatches, same_tokenizer

    st = ctx.section
    cfg = st.trainer
    check_minibatches(ctx, st, "grpo")
    policy_dir = ctx.model_dir(st.policy, "grpo.policy", "sft")
    policy = ctx.load_model(policy_dir)
    tokenizer = ctx.load_tokenizer(policy_dir, policy)
    reference = policy
    if st.reference:
        ref_dir = ctx.model_dir(st.reference, "grpo.reference", None)
        reference = ctx.load_model(ref_dir)
        same_tokenizer(tokenizer, ctx.load_tokenizer(ref_dir, reference), "grpo.reference")
    stop = pipeline.stop_tokens(tokenizer, cfg.stop_tokens, at_eos=st.stop_at_eos)
    cfg = dataclasses.replace(
        cfg,
        seed=ctx.seed,
        stop_tokens=stop,
        pad_token_id=pipeline.pad_id(tokenizer, cfg.pad_token_id),
    )
    prompts = ctx.dataset(st.prompts_file, "grpo.prompts_file", tokenizer, st.data, policy)
    batches = ctx.batches(
        prompts, st.batch_size, "grpo.batch_size", rename={"index": "prompt_index"}
    )
    sources, source_params = scoring.load_sources(
        ctx, st.rewards, "grpo.rewards", tokenizer, prompts, special_tokens=st.decode_special_tokens
    )
    use_ref = cfg.uses_reference
    static = GRPOModels(
        policy=policy.graphdef, reference=reference.graphdef if use_ref else None, sources=sources
    )
    frozen = GRPOFrozen(reference=reference.params if use_ref else None, rewards=source_params)
    frozen_shardings = parallel.state_shardings(frozen, ctx.mesh, ctx.cfg.parallel.preset)
    frozen = jax.device_put(frozen, frozen_shardings)
    eval_fn = None
    if st.eval_prompts_file:
        eval_fn = scoring.sampled_evaluator(
            ctx,
            eval_config(st),
            st.data.max_prompt_length,
            policy,
            reference,
            sources,
            source_params,
            tokenizer,
            temperature=cfg.temperature,
            response_length=cfg.response_length,
            stop=stop,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
        )

    def make_step_(shardings):
        return make_step(
            cfg,
            static,
            frozen,
            mesh=ctx.mesh,
            state_shardings=shardings,
            frozen_shardings=frozen_shardings,
            mode=ctx.cfg.parallel.step,
        )

    def finish(state, result):
        return pipeline.Outputs(policy.replace(params=state.params), tokenizer)

    return pipeline.Plan(
        finish=finish,
        state=init_state(cfg, policy.params),
        make_step=make_step_,
        batches=batches,
        loop=cfg.loop,
        eval_fn=eval_fn,
        tokenizer=tokenizer,
        save_every=st.save_every,
    )

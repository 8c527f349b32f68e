"""PPO for language models with a KL penalty to a frozen reference: one compiled iteration.

The loop the seed documents call *sample -> feedback -> learn* (Ziegler et al. 2019,
"Fine-Tuning Language Models from Human Preferences"; Ouyang et al. 2022, InstructGPT). One
**iteration** is one ``jax.jit`` function, with no host round trip inside (control flow of
``vwxyzjn/lm-human-preference-details`` ``train_policy_jax.py`` and ``purejaxrl`` ``ppo.py``)::

    rollout      rollout.sample(policy, prompts)            tokens, mask, old log-probs  [N, R]
    scoring      token_logprobs(reference)                  ref log-probs                [N, R]
                 values(critic) / value head                old values                   [N, R]
                 scores(reward model)  or a reward function scores                       [N]
                 rewards.shape_rewards (-beta KL + score)   per-token rewards            [N, R]
                 returns.ppo_advantages (GAE, whitening)    advantages, returns          [N, R]
    update       E epochs x M minibatches (lax.scan over permuted indices) of
                 loss = ppo_policy_loss + c_vf * value_loss      (sums / counts, exact accumulation)
    KL control   adaptive_kl_update(beta, KL per response)  (Ziegler et al.; "fixed" keeps beta)

``N = B * n`` (``n = PPOConfig.num_samples`` responses per prompt, contiguous), ``P`` the static
prompt length (left-padded), ``R = PPOConfig.response_length`` (right-padded, 1 on real tokens
through the stop token). The formulas and the conventions each source uses are in
``docs/formulas.md``; the convention options come from :mod:`rlhf_jax.presets`
(``PPOConfig.preset``), and the math lives in :mod:`rlhf_jax.rewards`, :mod:`rlhf_jax.returns` and
:mod:`rlhf_jax.losses` — this module only composes them. Sampling, the reference log-probs and
the reward sources are :mod:`rlhf_jax.scoring`, shared with GRPO and online DPO.

**What is static, what is an array.** :class:`PPOConfig` holds what changes the program (shapes,
epochs, minibatches, critic mode, conventions, the KL-controller kind). :class:`PPOHParams` holds
every number a sweep may vary — beta, learning rate, clip epsilon, value clip, gamma, lambda,
temperature, c_vf, seed — as scalar arrays inside the state, so
``jax.vmap(iteration_fn(cfg, static), in_axes=(0, None, None, None))`` over a stacked state
(:func:`stack_states`) runs N experiments in one program.

**Critic.** ``critic="shared"``: a value head on the policy trunk, one trunk pass gives log-probs
and values (lm-human-preferences). ``critic="separate"``: a second model initialised from the
reward model (InstructGPT, TRL, DeepSpeed-Chat); its score head is the value head. In both modes
policy and critic are updated together by one optimizer on ``policy_loss + c_vf * value_loss``
(as TRL's ``PolicyAndValueWrapper``), so the gradient-norm clip is over both.

**PPO-Lagrangian** (Safe RLHF, ``PPOConfig.safety``; ``docs/formulas.md`` §8). The same
iteration with a cost model and a cost critic: scoring adds the costs, the per-token costs
(:func:`rlhf_jax.rewards.shape_costs`) and their GAE; :func:`lagrange_step` moves the Lagrange
multiplier from the window of recent episode costs and combines the advantages as
``(A_r - lambda A_c) / (1 + lambda)``; the update adds the cost critic's value loss. The threshold,
lambda's initial value and its learning rate are :class:`PPOHParams` arrays like the rest.

**Frozen models.** The reference *is* the SFT parameter pytree and the reward model's parameters
are its own pytree; both are passed to the iteration as :class:`FrozenParams`, a separate argument
that is never donated. The trainable policy and critic start as *copies* (the state is donated).

**LoRA** (``PPOConfig.lora``, :mod:`rlhf_jax.lora`). The state holds adapters instead of models:
the policy is ``merge(reference, adapters)`` (plus its value head with ``critic="shared"``), so
the reference is the base with the adapters off and PPO holds one copy of it; a separate critic
is ``merge(reward model, adapters)`` with its score head trained in full. Both merges happen inside
the compiled iteration (:func:`model_params`), from the frozen argument. The cost critic of
PPO-Lagrangian stays fully trainable.

**Randomness.** The iteration's key is ``fold_in(PRNGKey(seed), step)``; the rollout folds in each
prompt's global index and sample index (:func:`rlhf_jax.rollout.sample`), the minibatch
permutation of epoch ``e`` uses ``fold_in(perm_key, e)``. A run therefore repeats exactly, and is
independent of how the prompts were batched.

**Non-finite values.** When a score, a reward, an advantage, a loss or a gradient is NaN/inf, the
update that would use it is dropped inside the step (the old parameters and optimizer state are
kept, :func:`rlhf_jax.train.apply_update`), the KL controller is left alone, and ``skipped = 1``
is reported; :func:`rlhf_jax.train.run_loop` then stops with a message or carries on, by
``PPOConfig.loop.on_nonfinite``.

**A Python reward function** (``PPOConfig.reward_fn = "module:function"``) replaces the reward
model: the responses are decoded with the tokenizer and scored on the host through one
``jax.pure_callback`` per iteration (:mod:`rlhf_jax.reward_fn`). That is the only host round trip,
and only on that path.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from rlhf_jax import lora as lora_lib
from rlhf_jax import losses, models, parallel, presets, returns, rewards, rollout, scoring
from rlhf_jax.optim import OptimConfig
from rlhf_jax.reward_fn import RewardFunction
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
    "PPOConfig",
    "PPOHParams",
    "SafetyConfig",
    "Lagrange",
    "lagrange_step",
    "PPOState",
    "PPOModels",
    "FrozenParams",
    "Experience",
    "make_models",
    "model_params",
    "init_state",
    "stack_states",
    "generate",
    "score",
    "update",
    "ppo_loss",
    "loss_counts",
    "check_stop_tokens",
    "kl_control",
    "rollout_metrics",
    "iteration_fn",
    "make_iteration",
    "make_step",
]

_CRITICS = ("shared", "separate")
_KL_CONTROLLERS = ("fixed", "adaptive")
_OLD_LOGPROBS = ("rollout", "recompute")


@dataclasses.dataclass(frozen=True)
class SafetyConfig:
    """PPO-Lagrangian (Safe RLHF, Dai et al. 2023): a cost model and a Lagrange multiplier.

    The first three numbers are defaults of :class:`PPOHParams` (arrays at run time, so a sweep
    can vary them); the rest change the program. Costs are the cost model's scores (positive =
    unsafe, its sign boundary at 0); the constraint is ``J_C <= threshold`` with ``J_C`` the mean
    over the last ``cost_window`` episodes of the episode cost (``constraint="mean_cost"``, Safe
    RLHF) or of the cost model's unsafe flag, cost > 0 (``"unsafe_share"``: the threshold is then
    the share of unsafe responses allowed).
    """

    # J_C, what the threshold limits: "mean_cost" the mean episode cost (Safe RLHF; cost-model
    # units) | "unsafe_share" the share of episodes the cost model calls unsafe (cost > 0)
    constraint: str = "mean_cost"
    threshold: float = 0.0  # d: the limit on J_C (SAFE 0; a share in [0, 1] for unsafe_share)
    lambda_init: float = 1.0  # lambda at the first iteration (SAFE 1.0)
    lambda_lr: float = 0.1  # eta: SGD step of log lambda (SAFE 0.1)
    lambda_max: float | None = None  # ceiling on lambda (SAFE None; its ppo-lag script 5.0)
    lambda_delay: int = 0  # iterations before lambda starts to move (SAFE 0)
    cost_window: int = 128  # episodes in J_C, the mean episode cost (SAFE 128)
    # share of the KL penalty beta * KL charged to the reward and (with the opposite sign) to the
    # cost. 1.0 (the Safe RLHF code): the combined advantage (A_r - lambda A_c) / (1 + lambda)
    # carries beta * KL whatever lambda is; 0.5 halves it
    kl_share: float = 1.0

    def __post_init__(self):
        def need(ok: bool, message: str):
            if not ok:
                raise ValueError(f"ppo.trainer.safety.{message}")

        need(
            self.constraint in ("mean_cost", "unsafe_share"),
            f"constraint={self.constraint!r}: choose 'mean_cost' or 'unsafe_share'",
        )
        if self.constraint == "unsafe_share":
            need(0 <= self.threshold < 1, f"threshold={self.threshold}: a share, in [0, 1)")
        need(self.lambda_init > 0, f"lambda_init={self.lambda_init}: must be > 0")
        need(self.lambda_lr >= 0, f"lambda_lr={self.lambda_lr}: must be >= 0")
        need(
            self.lambda_max is None or self.lambda_max >= self.lambda_init,
            f"lambda_max={self.lambda_max}: must be >= lambda_init={self.lambda_init} (or null)",
        )
        need(self.lambda_delay >= 0, f"lambda_delay={self.lambda_delay}: must be >= 0")
        need(self.cost_window >= 1, f"cost_window={self.cost_window}: must be >= 1")
        need(0 < self.kl_share <= 1, f"kl_share={self.kl_share}: must be in (0, 1]")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO with a KL penalty. Static fields change the program; the numbers a sweep varies are
    the defaults of :class:`PPOHParams` (the last group), carried as arrays at run time."""

    response_length: int = 48  # R: new tokens sampled per response (static; responses right-padded)
    num_samples: int = 1  # n: responses per prompt (contiguous rows), so N = B * n
    num_epochs: int = 4  # E: passes over the rollout batch per iteration
    num_minibatches: int = 1  # M: minibatches per epoch; N must be divisible by M
    critic: str = "separate"  # "separate": critic from the reward model | "shared": value head
    preset: str = "rlhf-jax"  # convention preset (rlhf_jax.presets): score slot, KL, whitening
    conventions_override: presets.Conventions | None = None  # a whole bundle instead of preset
    kl_controller: str = "fixed"  # "fixed" beta | "adaptive" (Ziegler et al. 2019, LMHP)
    kl_target: float = 6.0  # adaptive: target KL per response, nats (LMHP default 6)
    kl_horizon: float = 10000.0  # adaptive: horizon in samples (LMHP default 10000)
    stop_tokens: tuple[int, ...] = ()  # token ids that end a response; () = always R tokens
    pad_token_id: int = 0  # written after the stop token in the response
    top_k: int = 0  # sampling top-k (static); 0 = off
    top_p: float = 1.0  # sampling nucleus mass; 1 = off (filtering changes the sampled policy)
    old_logprobs: str = "rollout"  # "rollout": sampler's learner log-probs | "recompute": forward
    reward_fn: str | None = None  # "module:function" rule-based reward instead of the reward model
    # PPO-Lagrangian (Safe RLHF): a cost model, a cost critic and a Lagrange multiplier; None = off
    safety: SafetyConfig | None = None
    # LoRA (rlhf_jax.lora): train adapters on the policy (the reference is its base) and on the
    # separate critic's reward-model trunk, + the value / score head; None = full training
    lora: lora_lib.LoRAConfig | None = None
    optim: OptimConfig = OptimConfig(learning_rate=1e-5, eps=1e-5)  # AdamW (LMHP eps 1e-5)
    loop: LoopConfig = LoopConfig(max_steps=100)  # iterations, evaluation, stopping
    # --- PPOHParams defaults (arrays at run time; the learning rate is optim.learning_rate) ---
    kl_coef: float = 0.05  # beta: initial KL coefficient (the adaptive controller moves it)
    clip_eps: float = 0.2  # epsilon of the clipped policy ratio
    value_clip: float = 0.2  # value clip range around the old values (all sources: 0.2)
    gamma: float = 1.0  # discount (LMHP, TRL: 1)
    lam: float = 0.95  # GAE lambda (LMHP, TRL: 0.95)
    temperature: float = 0.7  # sampling temperature, also applied to the learner's log-probs
    vf_coef: float = 0.1  # c_vf: weight of the value loss (LMHP, TRL: 0.1)
    seed: int = 0  # run seed: rollouts and minibatch permutations

    def __post_init__(self):
        def need(ok: bool, message: str):
            if not ok:
                raise ValueError(f"ppo.{message}")

        need(self.response_length >= 1, f"response_length={self.response_length}: must be >= 1")
        need(self.num_samples >= 1, f"num_samples={self.num_samples}: must be >= 1")
        need(self.num_epochs >= 1, f"num_epochs={self.num_epochs}: must be >= 1")
        need(self.num_minibatches >= 1, f"num_minibatches={self.num_minibatches}: must be >= 1")
        need(self.critic in _CRITICS, f"critic={self.critic!r}: choose one of {_CRITICS}")
        need(
            self.preset in presets.PRESETS,
            f"preset={self.preset!r}: choose one of {tuple(presets.PRESETS)}",
        )
        need(
            self.kl_controller in _KL_CONTROLLERS,
            f"kl_controller={self.kl_controller!r}: choose one of {_KL_CONTROLLERS}",
        )
        need(self.kl_target > 0, f"kl_target={self.kl_target}: must be > 0")
        need(self.kl_horizon > 0, f"kl_horizon={self.kl_horizon}: must be > 0")
        need(
            self.old_logprobs in _OLD_LOGPROBS,
            f"old_logprobs={self.old_logprobs!r}: choose one of {_OLD_LOGPROBS}",
        )
        need(self.top_k >= 0, f"top_k={self.top_k}: must be >= 0 (0 = off)")
        need(0 < self.top_p <= 1, f"top_p={self.top_p}: must be in (0, 1]")
        need(self.kl_coef >= 0, f"kl_coef={self.kl_coef}: must be >= 0")
        need(self.clip_eps > 0, f"clip_eps={self.clip_eps}: must be > 0")
        need(self.value_clip > 0, f"value_clip={self.value_clip}: must be > 0")
        need(0 <= self.gamma <= 1, f"gamma={self.gamma}: must be in [0, 1]")
        need(0 <= self.lam <= 1, f"lam={self.lam}: must be in [0, 1]")
        need(self.temperature > 0, f"temperature={self.temperature}: must be > 0")
        need(self.vf_coef >= 0, f"vf_coef={self.vf_coef}: must be >= 0")
        if self.conventions_override is not None and self.preset != "rlhf-jax":
            raise ValueError(
                f"ppo.preset={self.preset!r} and ppo.conventions_override are both set: the "
                "override is a whole bundle (unset fields take the rlhf-jax defaults), so set "
                "one; for a preset with one change pass "
                "presets.get_preset(name).replace(field=value) as the override"
            )
        if self.reward_fn is not None and self.critic == "separate":
            raise ValueError(
                "ppo.critic='separate' initialises the critic from the reward model, but "
                "ppo.reward_fn replaces the reward model: use ppo.critic='shared'"
            )

    @property
    def conventions(self) -> presets.Conventions:
        """The conventions in force (static): ``conventions_override`` if set, else the bundle
        of ``preset`` (e.g. ``get_preset("trl-ppo").replace(kl_estimator="k3")`` as override)."""
        if self.conventions_override is not None:
            return self.conventions_override
        return presets.get_preset(self.preset)


@flax.struct.dataclass
class PPOHParams:
    """The numbers a sweep may vary, as scalar arrays (stack them to ``jax.vmap`` over runs).

    All float32 except ``seed`` (int32). Built from a config by :meth:`from_config`.
    """

    kl_coef: jax.Array  # initial beta (the state's ``kl_coef`` is the controller's current value)
    learning_rate: jax.Array  # peak learning rate (written into the optimizer state at init)
    clip_eps: jax.Array  # policy ratio clip
    value_clip: jax.Array  # value clip
    gamma: jax.Array  # discount
    lam: jax.Array  # GAE lambda
    temperature: jax.Array  # sampling and learner temperature
    vf_coef: jax.Array  # value-loss weight
    seed: jax.Array  # int32 run seed
    # PPO-Lagrangian (SafetyConfig; unused when safety is off)
    cost_threshold: jax.Array  # d, the limit on the mean episode cost
    lambda_init: jax.Array  # the multiplier's initial value
    lambda_lr: jax.Array  # its learning rate

    @classmethod
    def from_config(cls, cfg: PPOConfig, **overrides: Any) -> PPOHParams:
        """Scalar arrays from ``cfg`` (``overrides`` replace single fields, e.g. ``seed=3``)."""
        safety = cfg.safety or SafetyConfig()
        values = {
            "kl_coef": cfg.kl_coef,
            "learning_rate": cfg.optim.learning_rate,
            "clip_eps": cfg.clip_eps,
            "value_clip": cfg.value_clip,
            "gamma": cfg.gamma,
            "lam": cfg.lam,
            "temperature": cfg.temperature,
            "vf_coef": cfg.vf_coef,
            "seed": cfg.seed,
            "cost_threshold": safety.threshold,
            "lambda_init": safety.lambda_init,
            "lambda_lr": safety.lambda_lr,
        }
        return hparam_arrays(cls, values, overrides, "PPO")


@flax.struct.dataclass
class PPOState:
    """Everything an iteration updates (donated to the compiled iteration).

    ``params`` is ``{"policy": ..., "critic": ...}``: the policy's parameters (with its value head
    when ``critic="shared"``) and the separate critic's (``None`` when shared). One optimizer state
    covers both. ``step`` counts iterations (int32), ``key`` is the run's base PRNG key (from the
    seed), ``kl_coef`` the KL controller's current beta (float32). With ``safety``, ``params`` also
    holds ``"cost_critic"`` and ``lagrange`` the multiplier's state (None otherwise).
    """

    params: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array
    kl_coef: jax.Array
    hparams: PPOHParams
    lagrange: Lagrange | None = None


@flax.struct.dataclass
class Lagrange:
    """PPO-Lagrangian's multiplier and the window of recent episode costs it is updated from.

    ``log_lambda`` float32 scalar (lambda = exp(log_lambda)); ``costs`` [W] float32, the last W
    episode costs, newest last; ``filled`` int32, how many of them are real (W once full).
    """

    log_lambda: jax.Array
    costs: jax.Array
    filled: jax.Array


@flax.struct.dataclass
class FrozenParams:
    """Models PPO reads but never trains; a separate, non-donated argument of the iteration."""

    reference: Any  # the SFT parameters (the KL anchor), never copied or mutated
    reward: Any = None  # reward-model parameters; None when a reward function scores responses
    cost: Any = None  # cost-model parameters (PPO-Lagrangian); None when safety is off
    sources: tuple = ()  # the parameters of PPOModels.reward_sources (None for a function)
    # LoRA: the policy's frozen base when it is not the reference (a separate ppo.reference);
    # None = the reference is the base (one copy)
    policy_base: Any = None

    def policy_base_params(self) -> Any:
        """The parameters the LoRA policy merges from: ``policy_base``, else the reference."""
        return self.reference if self.policy_base is None else self.policy_base

    def critic_base_params(self, static: PPOModels) -> Any:
        """The reward model the LoRA critic merges from (``static.critic_source``)."""
        i = static.critic_source
        return self.reward if i is None else self.sources[i]

    def reward_params(self) -> tuple[Any, ...]:
        """The parameters of each reward source, in :meth:`PPOModels.sources` order."""
        return self.sources if self.sources else (self.reward,)


@dataclasses.dataclass(frozen=True, eq=False)
class PPOModels:
    """The static half of the models (graph definitions) and the reward function, if any."""

    policy: Any  # policy graphdef (with a value head when critic="shared")
    reference: Any  # reference (SFT) graphdef
    reward: Any = None  # reward-model graphdef (score head); None with a reward function
    critic: Any = None  # critic graphdef (critic="separate"); None when shared
    reward_fn: RewardFunction | None = None  # host reward function (one pure_callback), or None
    cost: Any = None  # cost-model graphdef (score head; PPO-Lagrangian), also the cost critic's
    # reward sources of rlhf_jax.scoring (reward models, functions, an LM judge; weighted sum),
    # given instead of `reward` / `reward_fn`; their parameters are FrozenParams.sources
    reward_sources: tuple = ()
    # LoRA with critic="separate": the index in reward_sources of the reward model the critic
    # merges from (None: FrozenParams.reward)
    critic_source: int | None = None

    def sources(self, conv: presets.Conventions) -> tuple[Any, ...]:
        """The reward sources (:mod:`rlhf_jax.scoring`): ``reward_sources`` if given, else the
        reward model (read the preset's way) or the function."""
        if self.reward_sources:
            return self.reward_sources
        if self.reward_fn is not None:
            return (scoring.RewardFunctionSource(self.reward_fn),)
        return (scoring.RewardModelSource(self.reward, read=conv.score_read),)

    def cost_sources(self, conv: presets.Conventions) -> tuple[Any, ...]:
        """The cost source of PPO-Lagrangian: the cost model, read like the reward model."""
        return (scoring.RewardModelSource(self.cost, read=conv.score_read, name="cost_model"),)


@flax.struct.dataclass
class Experience:
    """One rollout batch, scored and with advantages: what the PPO epochs train on.

    Attributes:
      tokens: [N, P+R] int32 prompt + response.
      mask: [N, P+R] int32 attention mask (prompt mask, then the response mask).
      response_mask: [N, R] int32, 1 on real response tokens through the stop token.
      old_logprobs: [N, R] float32 log-probs of the sampled tokens when sampled (temperature T).
      old_values: [N, R] float32 critic values before each response token.
      advantages: [N, R] float32 (whitened per the preset), 0 where ``response_mask == 0``.
      returns: [N, R] float32 value targets (advantages before whitening + old values).
      ref_logprobs: [N, R] float32 reference log-probs (for metrics).
      scores: [N] float32 reward-model (or reward-function) scores.
      rewards: [N, R] float32 shaped per-token rewards.
      kl: [N, R] float32 per-token KL estimate (the preset's estimator), 0 on padding.
      truncated: [N] bool, no stop token within R tokens.

    With ``safety`` (PPO-Lagrangian; None otherwise): ``costs`` [N] the cost model's scores,
    ``old_cost_values``, ``cost_returns``, ``cost_advantages`` [N, R] the cost critic's values,
    targets and GAE advantages; ``advantages`` is then the combined
    ``(A_r - lambda A_c) / (1 + lambda)`` (:func:`lagrange_step`).
    """

    tokens: jax.Array
    mask: jax.Array
    response_mask: jax.Array
    old_logprobs: jax.Array
    old_values: jax.Array
    advantages: jax.Array
    returns: jax.Array
    ref_logprobs: jax.Array
    scores: jax.Array
    rewards: jax.Array
    kl: jax.Array
    truncated: jax.Array
    costs: jax.Array | None = None
    old_cost_values: jax.Array | None = None
    cost_returns: jax.Array | None = None
    cost_advantages: jax.Array | None = None


# ------------------------------------------------------------------------------------------
# Construction
# ------------------------------------------------------------------------------------------


def make_models(
    cfg: PPOConfig,
    sft: Any,
    reward_model: Any = None,
    *,
    reference: Any = None,
    reward_fn: RewardFunction | None = None,
    cost_model: Any = None,
    sources: tuple[Any, ...] = (),
    source_params: tuple[Any, ...] = (),
    key: jax.Array | None = None,
) -> tuple[PPOModels, Any, FrozenParams]:
    """The static models, the initial trainable parameters and the frozen parameters.

    Args:
      cfg: the config.
      sft: the model record the policy starts from (:class:`rlhf_jax.models.Model`:
        ``graphdef``, ``params``, ``config``), usually the SFT model; it is also the reference
        (its params, as they are) unless ``reference`` is given.
      reference: the frozen KL anchor's record, when it is not ``sft`` (e.g. an instruct model
        as the start and its base as the anchor). Same vocabulary.
      reward_model: the reward-model record (score head); required unless ``reward_fn`` is given.
        With ``critic="separate"`` the critic starts as a copy of it.
      reward_fn: a loaded :class:`rlhf_jax.reward_fn.RewardFunction` replacing the reward model.
      cost_model: the cost model's record (score head; positive = unsafe), required exactly when
        ``cfg.safety`` is set: it scores the costs and the cost critic starts as a copy of it.
      sources, source_params: reward sources of :mod:`rlhf_jax.scoring` and their parameters
        (:func:`rlhf_jax.scoring.load_sources`: reward models, ``module:function`` rewards, an LM
        judge), whose weighted sum is the score, instead of ``reward_model`` / ``reward_fn``.
        With ``critic="separate"`` the critic starts as a copy of the first reward model among
        them.
      key: initialises the shared value head (zero-initialised by the models module, so the key
        only matters if that changes). Default ``PRNGKey(0)``.

    Returns:
      ``(models, params, frozen)``: ``params = {"policy", "critic"}`` is what :func:`init_state`
      copies into a state; ``frozen`` holds the reference and reward parameters by reference.
    """
    if len(sources) != len(source_params):
        raise ValueError(f"{len(sources)} reward sources but {len(source_params)} parameter sets")
    if (reward_model is not None) + (reward_fn is not None) + bool(sources) != 1:
        raise ValueError("give exactly one of reward_model, reward_fn and sources")
    critic_index = None
    if sources and cfg.critic == "separate":  # the critic starts from the first reward model
        first = next(
            (
                (src, p, i)
                for i, (src, p) in enumerate(zip(sources, source_params, strict=True))
                if isinstance(src, scoring.RewardModelSource)
            ),
            None,
        )
        if first is None:
            raise ValueError(
                "critic='separate' initialises the critic from a reward model, but no reward "
                "source is one: use critic='shared' or add a 'model:' source"
            )
        critic_source = (first[0].graphdef, first[1])
        critic_index = first[2]
    else:
        critic_source = (
            None if reward_model is None else (reward_model.graphdef, reward_model.params)
        )
    if (cfg.safety is None) != (cost_model is None):
        raise ValueError("ppo.trainer.safety (PPO-Lagrangian) and a cost model go together")
    check_stop_tokens(cfg)
    if cfg.critic == "separate" and critic_source is None:
        raise ValueError("critic='separate' initialises the critic from the reward model")
    key = jax.random.PRNGKey(0) if key is None else key
    if cfg.critic == "shared":
        policy_graphdef, policy_params = models.with_value_head(sft, key)
        critic_graphdef, critic_params = None, None
    else:
        policy_graphdef, policy_params = sft.graphdef, sft.params
        critic_graphdef, critic_params = critic_source
    reference = sft if reference is None else reference
    if reference.config.vocab_size != sft.config.vocab_size:
        raise ValueError(
            f"the reference's vocabulary ({reference.config.vocab_size}) differs from the "
            f"policy's ({sft.config.vocab_size})"
        )
    static = PPOModels(
        policy=policy_graphdef,
        reference=reference.graphdef,
        reward=None if reward_model is None else reward_model.graphdef,
        critic=critic_graphdef,
        reward_fn=reward_fn,
        cost=None if cost_model is None else cost_model.graphdef,
        reward_sources=tuple(sources),
        critic_source=critic_index if cfg.lora is not None else None,
    )
    frozen = FrozenParams(
        reference=reference.params,
        reward=None if reward_model is None else reward_model.params,
        cost=None if cost_model is None else cost_model.params,
        sources=tuple(source_params),
        policy_base=None if cfg.lora is None or reference is sft else sft.params,
    )
    if cfg.lora is not None:  # adapters (+ heads) instead of copies of the models
        policy_params = _lora_params(cfg.lora, sft.params, policy_params, "value_head", key, 0)
        if critic_params is not None:
            critic_params = _lora_params(
                cfg.lora, critic_params, critic_params, "score_head", key, 1
            )
    params = {"policy": policy_params, "critic": critic_params}
    if cost_model is not None:
        params["cost_critic"] = cost_model.params  # copied by init_state, like the critic
    return static, params, frozen


def _lora_params(cfg: lora_lib.LoRAConfig, base, full, head: str, key, i: int) -> dict:
    """``{"adapters", "heads"}``: adapters on ``base``'s kernels (A from ``fold_in(key, i)``)
    and, trained in full, ``full``'s ``head`` (a value or score head) and the groups of
    ``cfg.modules_to_save`` (None if there are none)."""
    from flax import nnx

    missing = [m for m in cfg.modules_to_save if m not in full]
    if missing:
        raise ValueError(
            f"lora.modules_to_save {missing}: not top-level parameter groups of this model "
            f"(it has {sorted(full)})"
        )
    names = [n for n in (head, *cfg.modules_to_save) if n in full]
    heads = nnx.State({n: full[n] for n in names}) if names else None
    adapters = lora_lib.init_adapters(base, cfg, jax.random.fold_in(key, i))
    return {"adapters": adapters, "heads": heads}


def model_params(cfg: PPOConfig, static: PPOModels, frozen: FrozenParams, params: Any) -> Any:
    """The trainable models' full parameters from the state's ``params``.

    Without LoRA, ``params`` itself. With ``cfg.lora``: ``"policy"`` is
    :func:`rlhf_jax.lora.merge` of :meth:`FrozenParams.policy_base_params` (the reference unless
    a separate one was given) with the policy adapters and value head, and ``"critic"`` (when
    separate) the merge of its reward model with the critic adapters and score head. Pure: the
    iteration calls it inside ``jax.jit``, so the merged kernels exist only there.
    """
    if cfg.lora is None:
        return params

    def merged(base, p):
        return lora_lib.merge(base, p["adapters"], cfg.lora, heads=p["heads"])

    out = dict(params)
    out["policy"] = merged(frozen.policy_base_params(), params["policy"])
    if params.get("critic") is not None:
        out["critic"] = merged(frozen.critic_base_params(static), params["critic"])
    return out


def check_stop_tokens(cfg: PPOConfig) -> None:
    """Refuse conventions that penalise a missing stop token when there is no stop token.

    Checked when the models are built rather than in :class:`PPOConfig`, because the pipeline
    adds the tokenizer's EOS to ``stop_tokens`` after the config is read (``ppo.stop_at_eos``).
    """
    if cfg.conventions.missing_stop_penalty is not None and not cfg.stop_tokens:
        raise ValueError(
            f"the conventions penalise responses without a stop token "
            f"(missing_stop_penalty={cfg.conventions.missing_stop_penalty}), but "
            "ppo.trainer.stop_tokens is empty, so every response would be penalised: set "
            "ppo.trainer.stop_tokens or keep ppo.stop_at_eos=true with a tokenizer that has an EOS"
        )


def init_state(cfg: PPOConfig, params: Any, hparams: PPOHParams | None = None) -> PPOState:
    """A fresh state: *copies* of ``params``, a new optimizer state with ``hparams.learning_rate``.

    Traceable, so ``jax.vmap(lambda hp: init_state(cfg, params, hp))(stacked_hparams)`` builds N
    runs' states at once (or use :func:`stack_states`).
    """
    hparams = PPOHParams.from_config(cfg) if hparams is None else hparams
    kl_coef = jnp.asarray(hparams.kl_coef, jnp.float32)
    lagrange = None
    if cfg.safety is not None:
        lagrange = Lagrange(
            log_lambda=jnp.log(jnp.asarray(hparams.lambda_init, jnp.float32)),
            costs=jnp.zeros((cfg.safety.cost_window,), jnp.float32),
            filled=jnp.zeros((), jnp.int32),
        )
    return seeded_state(PPOState, params, cfg.optim, hparams, kl_coef=kl_coef, lagrange=lagrange)


# ------------------------------------------------------------------------------------------
# The phases (pure; each is jittable alone, the iteration composes them)
# ------------------------------------------------------------------------------------------


def sampling_config(cfg: PPOConfig, hparams: PPOHParams) -> rollout.SamplingConfig:
    """The rollout's sampling config: the (array) temperature, static top-k, top-p."""
    return rollout.SamplingConfig(temperature=hparams.temperature, top_p=cfg.top_p, top_k=cfg.top_k)


def sampling_spec(cfg: PPOConfig) -> scoring.SamplingSpec:
    """The static half of the rollout (:func:`rlhf_jax.scoring.generate`)."""
    return scoring.SamplingSpec(
        response_length=cfg.response_length,
        num_samples=cfg.num_samples,
        stop_tokens=cfg.stop_tokens,
        pad_token_id=cfg.pad_token_id,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
    )


def iteration_keys(state: PPOState) -> tuple[jax.Array, jax.Array]:
    """``(sample_key, permutation_key)`` of this iteration: ``fold_in(base key, step)`` split."""
    return scoring.iteration_keys(state.key, state.step)


def generate(
    cfg: PPOConfig,
    static: PPOModels,
    state: PPOState,
    prompts: jax.Array,
    prompt_mask: jax.Array,
    prompt_index: jax.Array | None = None,
    frozen: FrozenParams | None = None,
) -> rollout.Rollout:
    """Phase 1, rollout: ``n`` responses per prompt from the current policy.

    Args:
      prompts: [B, P] int32 left-padded; prompt_mask: [B, P]; prompt_index: [B] global indices
        (default ``arange(B)``), which fix each response's key.
      frozen: the frozen parameters; needed only with ``cfg.lora`` (the policy's base).

    Returns:
      :class:`rlhf_jax.rollout.Rollout` with ``N = B * n`` rows.
    """
    sample_key, _ = iteration_keys(state)
    return scoring.generate(
        sampling_spec(cfg),
        static.policy,
        model_params(cfg, static, frozen, state.params)["policy"],
        prompts,
        prompt_mask,
        sample_key,
        state.hparams.temperature,
        prompt_index,
    )


def _policy_forward(cfg, static, params, tokens, mask, prompt_len, temperature):
    """Policy log-probs [N, R] and values [N, R] (value head or separate critic)."""
    if cfg.critic == "shared":
        return models.logprobs_and_values(
            static.policy, params["policy"], tokens, mask, start=prompt_len, temperature=temperature
        )
    logprobs = models.token_logprobs(
        static.policy, params["policy"], tokens, mask, start=prompt_len, temperature=temperature
    )
    values = models.values(static.critic, params["critic"], tokens, mask, start=prompt_len)
    return logprobs, values


def score(
    cfg: PPOConfig,
    static: PPOModels,
    state: PPOState,
    frozen: FrozenParams,
    prompts: jax.Array,
    prompt_mask: jax.Array,
    sampled: rollout.Rollout,
) -> Experience:
    """Phase 2, feedback: reference log-probs, values, scores, shaped rewards and GAE.

    Per-token reward (``docs/formulas.md`` §1):
    ``r_t = -beta * KL_t + score * [t = t*]``, the estimator, the slot ``t*`` and the masking by
    the preset (:func:`rlhf_jax.rewards.shape_rewards`); then :func:`rlhf_jax.returns.gae` with
    the state's gamma and lambda, and advantage whitening when the preset says so.
    """
    conv = cfg.conventions
    hp = state.hparams
    params = model_params(cfg, static, frozen, state.params)
    prompt_len = prompts.shape[1]
    rows = scoring.Responses.of(prompts, prompt_mask, sampled)
    tokens, mask = rows.tokens, rows.mask  # [N, P+R]
    response_mask = sampled.mask
    if cfg.old_logprobs == "recompute" or cfg.critic == "shared" or reads_padding(conv):
        logprobs, old_values = _policy_forward(
            cfg, static, params, tokens, mask, prompt_len, hp.temperature
        )
        if cfg.old_logprobs == "rollout":
            # The sampler's log-probs cover the real tokens only (0 after the stop token); a
            # preset that charges KL or takes the ratio on the padding reads the forward pass
            # there, so both modes give the same KL and ratio (0 and 1 at the first iteration).
            logprobs = jnp.where(response_mask > 0, sampled.learner_logprobs, logprobs)
    else:
        logprobs = sampled.learner_logprobs
        old_values = models.values(static.critic, params["critic"], tokens, mask, start=prompt_len)
    ref_logprobs = scoring.reference_logprobs(
        static.reference, frozen.reference, rows, hp.temperature
    )
    scores, _ = scoring.score(static.sources(conv), frozen.reward_params(), rows)
    logprobs, ref_logprobs, old_values, scores = jax.tree.map(
        lax.stop_gradient, (logprobs, ref_logprobs, old_values, scores)
    )
    # PPO-Lagrangian charges kl_share of beta * KL to the reward and to the cost
    beta = state.kl_coef if cfg.safety is None else state.kl_coef * cfg.safety.kl_share
    shaped, shaping = rewards.shape_rewards(
        scores,
        logprobs,
        ref_logprobs,
        response_mask,
        beta,
        options=conv,
        truncated=sampled.truncated,
    )
    advantages, value_targets = returns.ppo_advantages(
        shaped, old_values, response_mask, hp.gamma, hp.lam, options=conv
    )
    cost_fields = {}
    if cfg.safety is not None:  # the same pipeline for the cost: score, shaping, critic, GAE
        costs, _ = scoring.score(static.cost_sources(conv), (frozen.cost,), rows)
        cost_values = models.values(
            static.cost, state.params["cost_critic"], tokens, mask, start=prompt_len
        )
        cost_values = lax.stop_gradient(cost_values)
        shaped_costs, _ = rewards.shape_costs(
            costs, logprobs, ref_logprobs, response_mask, beta, options=conv
        )
        cost_advantages, cost_targets = returns.ppo_advantages(
            shaped_costs, cost_values, response_mask, hp.gamma, hp.lam, options=conv
        )
        cost_fields = dict(
            costs=costs,
            old_cost_values=cost_values,
            cost_returns=cost_targets,
            cost_advantages=cost_advantages,
        )
    return Experience(
        tokens=tokens,
        mask=mask,
        response_mask=response_mask,
        old_logprobs=logprobs,
        old_values=old_values,
        advantages=advantages,
        returns=value_targets,
        ref_logprobs=ref_logprobs,
        scores=scores,
        rewards=shaped,
        kl=shaping["kl"],
        truncated=sampled.truncated,
        **cost_fields,
    )


def reads_padding(conv: presets.Conventions) -> bool:
    """Whether the conventions use policy log-probs on slots after the stop token: KL charged on
    every slot (``kl_on='all'``) or every slot a policy step (``score_position='last_fixed'``)."""
    return conv.kl_on == "all" or conv.score_position == "last_fixed"


def loss_masks(cfg: PPOConfig, response_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(policy_mask, value_loss_mask)`` [N, R] of the preset (:mod:`rlhf_jax.rewards`).

    They differ under ``score_position='after_stop'`` (the post-stop slot is a value step) and
    ``'last_fixed'`` (every slot is a step), so the two losses have their own denominators.
    """
    conv = cfg.conventions
    return (
        rewards.policy_mask(response_mask, options=conv),
        rewards.value_loss_mask(response_mask, options=conv),
    )


def loss_counts(cfg: PPOConfig, response_mask: jax.Array, num_micro: int) -> jax.Array:
    """``[2]`` denominators (policy, value) of a minibatch whose loss is computed on
    ``num_micro`` equal row blocks (the microbatches; in the ``shard_map`` form, every device's).

    The sum over blocks of :func:`rlhf_jax.losses.aggregate`'s count, so every aggregation
    mode (token mean, sequence mean, ``bnpo``'s one per microbatch, ...) is exact.
    """
    conv = cfg.conventions
    masks = loss_masks(cfg, response_mask)
    micro = [m.reshape(num_micro, m.shape[0] // num_micro, m.shape[1]) for m in masks]

    def count(m):
        return losses.aggregate(jnp.zeros_like(m), m, conv.loss_aggregation)[1]

    return jnp.stack([jnp.sum(jax.vmap(count)(m)) for m in micro])


def ppo_loss(
    cfg: PPOConfig,
    static: PPOModels,
    params: Any,
    batch: Experience,
    hparams: PPOHParams,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``(policy_sum, value_sum, metric_sums)`` of a (micro)batch of experience.

    The policy loss is :func:`rlhf_jax.losses.ppo_policy_loss` (clipped ratio, epsilon
    ``hparams.clip_eps``) over the preset's policy mask; the value loss
    :func:`rlhf_jax.losses.value_loss` (``0.5 max((V-R)^2, (clip(V, V_old +- c) - R)^2)``, c =
    ``hparams.value_clip``) over its value-loss mask; both aggregated the preset's way
    (``loss_aggregation``). The objective of a minibatch is
    ``policy_sum / policy_count + c_vf * value_sum / value_count`` with the counts of the whole
    minibatch (:func:`loss_counts`). With ``safety`` the cost critic's value loss (same form, on
    the cost returns) is added to ``value_sum``: the two critics share ``c_vf``, as in Safe RLHF.
    ``metric_sums`` maps each metric's name (written only here)
    to ``(sum, count)``: sums and counts add over microbatches and updates, and the reported
    value is one division at the end.
    """
    conv = cfg.conventions
    prompt_len = batch.tokens.shape[1] - batch.response_mask.shape[1]
    logprobs, values = _policy_forward(
        cfg, static, params, batch.tokens, batch.mask, prompt_len, hparams.temperature
    )
    pmask, vmask = loss_masks(cfg, batch.response_mask)
    pg_sum, _, pg_metrics = losses.ppo_policy_loss(
        logprobs, batch.old_logprobs, batch.advantages, pmask, hparams.clip_eps, options=conv
    )
    vf_sum, _, vf_metrics = losses.value_loss(
        values, batch.old_values, batch.returns, vmask, hparams.value_clip, options=conv
    )
    p_tokens, v_tokens = pg_metrics["token_count"], vf_metrics["token_count"]
    metric_sums = {
        "policy/approx_kl": (pg_metrics["approx_kl"], p_tokens),
        "policy/clip_frac": (pg_metrics["clip_frac"], p_tokens),
        "policy/ratio": (pg_metrics["ratio"], p_tokens),
        "value/clip_frac": (vf_metrics["value_clip_frac"], v_tokens),
        "value/error": (vf_metrics["value_error"], v_tokens),
    }
    if cfg.safety is not None:  # the cost critic's loss, on the same mask, adds to the value sum
        cost_values = models.values(
            static.cost, params["cost_critic"], batch.tokens, batch.mask, start=prompt_len
        )
        cost_sum, _, cost_metrics = losses.value_loss(
            cost_values,
            batch.old_cost_values,
            batch.cost_returns,
            vmask,
            hparams.value_clip,
            options=conv,
        )
        vf_sum = vf_sum + cost_sum
        metric_sums["cost_value/clip_frac"] = (cost_metrics["value_clip_frac"], v_tokens)
        metric_sums["cost_value/error"] = (cost_metrics["value_error"], v_tokens)
    return pg_sum, vf_sum, metric_sums


def _all_finite(tree: Any) -> jax.Array:
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def update(
    cfg: PPOConfig,
    static: PPOModels,
    state: PPOState,
    exp: Experience,
    frozen: FrozenParams | None = None,
    *,
    mesh: jax.sharding.Mesh | None = None,
    mode: str = "jit",
) -> tuple[PPOState, dict[str, jax.Array]]:
    """Phase 3, learn: E epochs x M minibatches of the PPO loss (``train.epoch_updates``).

    ``frozen`` is needed only with ``cfg.lora``: the loss is then taken on
    :func:`model_params` (base merged with the adapters), so the gradient reaches the adapters
    and heads in the state, never the base. ``mesh`` and ``mode`` (``parallel.step``: ``'jit'``
    or the per-device ``'shard_map'``) pick the gradient's form
    (:func:`rlhf_jax.parallel.accumulate`); both give the same update.

    Epoch ``e`` permutes the ``N`` rows with ``fold_in(permutation_key, e)`` and cuts them into
    ``M`` equal minibatches; each minibatch is one optimizer update of
    ``policy_loss + c_vf * value_loss`` (:func:`ppo_loss`), its gradient accumulated over
    ``optim.grad_accum_steps`` microbatches exactly (each loss divided by its whole-minibatch
    count, :func:`loss_counts`). An update whose experience, loss or gradient is not finite is
    dropped (:func:`rlhf_jax.train.apply_update`) and ``skipped`` reports it.

    Returns:
      The new state (``step`` unchanged) and metrics over all E x M updates: ``loss``,
      ``policy_loss``, ``value_loss`` (means of the per-update losses), ``policy/approx_kl``,
      ``policy/clip_frac``, ``policy/ratio``, ``value/clip_frac``, ``value/error`` (token means
      over all updates), ``grad_norm`` (mean), ``lr`` and ``skipped`` (1 if any update was
      dropped).
    """
    hparams = state.hparams
    exp_ok = _all_finite(
        (exp.advantages, exp.returns, exp.old_logprobs, exp.old_values)
        + (exp.cost_returns, exp.old_cost_values)  # None (no leaves) without safety
    )
    _, perm_key = iteration_keys(state)

    def objective(params, mb_and_counts):
        # this microbatch's share of policy_sum / P + c_vf * value_sum / V (whole-minibatch P, V)
        mb, counts = mb_and_counts
        full = model_params(cfg, static, frozen, params)
        pg_sum, vf_sum, sums = ppo_loss(cfg, static, full, mb, hparams)
        counts = jnp.maximum(counts[0], 1.0)  # the same [2] for every microbatch
        policy, value = pg_sum / counts[0], vf_sum / counts[1]
        loss = policy + hparams.vf_coef * value
        return loss, (sums, {"loss": loss, "policy_loss": policy, "value_loss": value})

    train = TrainState(params=state.params, opt_state=state.opt_state, step=state.step)
    train, metrics = epoch_updates(
        cfg.optim,
        train,
        exp,
        objective,
        lambda mb, pieces: loss_counts(cfg, mb.response_mask, pieces),
        num_epochs=cfg.num_epochs,
        num_minibatches=cfg.num_minibatches,
        perm_key=perm_key,
        ok=exp_ok,
        mesh=mesh,
        mode=mode,
    )
    return state.replace(params=train.params, opt_state=train.opt_state), metrics


def kl_control(cfg: PPOConfig, state: PPOState, exp: Experience, ok: jax.Array) -> jax.Array:
    """The next beta: unchanged (``fixed``) or Ziegler et al.'s proportional controller.

    ``adaptive``: :func:`rlhf_jax.rewards.adaptive_kl_update` with the batch's mean KL per response
    (sum over response tokens of the rollout's KL estimate), ``n_steps = N`` samples, the config's
    target and horizon (LMHP ``train_policy.py:AdaptiveKLController``). Left alone when ``ok`` is
    false (a non-finite batch).
    """
    if cfg.kl_controller == "fixed":
        return state.kl_coef
    kl_per_response = jnp.mean(jnp.sum(exp.kl, -1))  # the KL as charged (rewards.shape_rewards)
    new = rewards.adaptive_kl_update(
        state.kl_coef,
        kl_per_response,
        n_steps=exp.tokens.shape[0],
        target=cfg.kl_target,
        horizon=cfg.kl_horizon,
    )
    return jnp.where(ok & jnp.isfinite(new), new, state.kl_coef)


def lagrange_step(
    cfg: PPOConfig, state: PPOState, exp: Experience
) -> tuple[Lagrange, Experience, dict[str, jax.Array]]:
    """PPO-Lagrangian's multiplier update and the combined advantage (Safe RLHF's order).

    1. The rollout's episode costs (the cost model's scores, ``exp.costs``, or with
       ``constraint="unsafe_share"`` their unsafe flags ``cost > 0``) enter the window of the last
       ``cost_window`` episodes; ``J_C`` is the window's mean.
    2. From iteration ``lambda_delay`` on, one SGD step in log space
       (:func:`rlhf_jax.losses.log_lambda_update`): ``log lambda += lr * (J_C - d) * lambda``,
       clamped at ``log(lambda_max)``. It rises while ``J_C`` exceeds the threshold ``d`` and
       falls below it. A non-finite result keeps the old value.
    3. ``advantages = (A_r - lambda A_c) / (1 + lambda)`` with the new lambda, a constant for the
       policy gradient (:func:`rlhf_jax.losses.lagrangian_advantages`).

    Returns the new :class:`Lagrange`, the experience with the combined advantages (the reward
    advantages stay in ``returns``' GAE; ``cost_advantages`` are kept), and metrics.
    """
    sc, lag, hp = cfg.safety, state.lagrange, state.hparams
    window = sc.cost_window
    costs = exp.costs.astype(jnp.float32)
    if sc.constraint == "unsafe_share":
        costs = (costs > 0).astype(jnp.float32)
    buffer = jnp.concatenate([lag.costs, costs])[-window:]
    filled = jnp.minimum(lag.filled + costs.shape[0], window)
    valid = jnp.arange(window) >= window - filled
    episode_cost = jnp.sum(jnp.where(valid, buffer, 0.0)) / jnp.maximum(filled, 1)
    log_max = None if sc.lambda_max is None else math.log(sc.lambda_max)
    stepped = losses.log_lambda_update(
        lag.log_lambda, episode_cost, hp.cost_threshold, hp.lambda_lr, log_lambda_max=log_max
    )
    move = (state.step >= sc.lambda_delay) & jnp.isfinite(stepped)
    log_lambda = jnp.where(move, stepped, lag.log_lambda)
    combined = losses.lagrangian_advantages(exp.advantages, exp.cost_advantages, log_lambda)
    pmask = rewards.policy_mask(exp.response_mask, options=cfg.conventions)
    exp = exp.replace(advantages=combined * pmask)
    metrics = {
        "lambda": jnp.exp(log_lambda),
        "cost/episode": episode_cost,
        "cost/threshold": hp.cost_threshold,
    }
    return Lagrange(log_lambda=log_lambda, costs=buffer, filled=filled), exp, metrics


def rollout_metrics(exp: Experience, kl_coef: jax.Array) -> dict[str, jax.Array]:
    """Scalar statistics of a scored rollout batch (before the update)."""
    rmask = exp.response_mask.astype(jnp.float32)
    n_tokens = jnp.maximum(jnp.sum(rmask), 1.0)
    lengths = jnp.sum(rmask, -1)
    adv_mean = jnp.sum(exp.advantages * rmask) / n_tokens
    adv_var = jnp.sum(jnp.square(exp.advantages - adv_mean) * rmask) / n_tokens
    return {
        "score/mean": jnp.mean(exp.scores),
        "score/std": jnp.std(exp.scores),
        "kl/response": jnp.mean(jnp.sum(exp.kl, -1)),
        "kl/token": jnp.sum(exp.kl * rmask) / n_tokens,
        "reward/response": jnp.mean(jnp.sum(exp.rewards, -1)),
        "response/length": jnp.mean(lengths),
        "response/truncated": jnp.mean(exp.truncated.astype(jnp.float32)),
        "entropy/sampled": -jnp.sum(exp.old_logprobs * rmask) / n_tokens,
        "advantages/mean": adv_mean,
        "advantages/std": jnp.sqrt(adv_var),
        "returns/mean": jnp.sum(exp.returns * rmask) / n_tokens,
        "values/mean": jnp.sum(exp.old_values * rmask) / n_tokens,
        "beta": kl_coef,
    } | ({} if exp.costs is None else cost_metrics(exp))


def cost_metrics(exp: Experience) -> dict[str, jax.Array]:
    """PPO-Lagrangian's rollout statistics: mean cost, the share the cost model calls unsafe
    (cost > 0), and the cost critic's values and advantages."""
    rmask = exp.response_mask.astype(jnp.float32)
    n_tokens = jnp.maximum(jnp.sum(rmask), 1.0)
    return {
        "cost/mean": jnp.mean(exp.costs),
        "cost/unsafe": jnp.mean((exp.costs > 0).astype(jnp.float32)),
        "cost_values/mean": jnp.sum(exp.old_cost_values * rmask) / n_tokens,
        "cost_advantages/std": jnp.sqrt(
            jnp.sum(jnp.square(exp.cost_advantages) * rmask) / n_tokens
        ),
    }


# ------------------------------------------------------------------------------------------
# The iteration
# ------------------------------------------------------------------------------------------


def iteration_fn(
    cfg: PPOConfig,
    static: PPOModels,
    *,
    mesh: jax.sharding.Mesh | None = None,
    mode: str = "jit",
) -> Callable[..., tuple[PPOState, dict[str, jax.Array]]]:
    """The pure (un-jitted) iteration ``(state, frozen, prompts, prompt_mask, prompt_index=None)``.

    Use it to ``jax.vmap`` over runs before jitting; :func:`make_iteration` is the jitted one.
    With ``mesh``, the prompts and the scored experience are kept split over ``('data', 'fsdp')``
    (:func:`rlhf_jax.parallel.constrain_batch`), and ``mode`` is the update's gradient form
    (:func:`update`).
    """
    keep = (lambda tree: tree) if mesh is None else (lambda t: parallel.constrain_batch(t, mesh))

    def iteration(state, frozen, prompts, prompt_mask, prompt_index=None):
        prompts, prompt_mask, prompt_index = keep((prompts, prompt_mask, prompt_index))
        sampled = generate(cfg, static, state, prompts, prompt_mask, prompt_index, frozen)
        exp = keep(score(cfg, static, state, frozen, prompts, prompt_mask, sampled))
        lagrange, lagrange_metrics = None, {}
        if cfg.safety is not None:  # advantages/* below are then the combined ones
            lagrange, exp, lagrange_metrics = lagrange_step(cfg, state, exp)
        metrics = rollout_metrics(exp, state.kl_coef) | lagrange_metrics
        new_state, update_metrics = update(cfg, static, state, exp, frozen, mesh=mesh, mode=mode)
        ok = update_metrics["skipped"] == 0
        new_state = new_state.replace(
            step=state.step + 1, kl_coef=kl_control(cfg, state, exp, ok), lagrange=lagrange
        )
        metrics.update(update_metrics)
        return new_state, metrics

    return iteration


def make_iteration(
    cfg: PPOConfig,
    static: PPOModels,
    *,
    mesh: jax.sharding.Mesh | None = None,
    state_shardings: Any = None,
    frozen_shardings: Any = None,
    mode: str = "jit",
) -> Callable:
    """The compiled iteration ``(state, frozen, prompts, prompt_mask, prompt_index=None)``.

    ``-> (state, metrics)``; the state is donated, ``frozen`` (reference and reward-model params)
    is not. Metrics are scalars: ``score/mean``, ``kl/response``, ``policy/clipfrac``,
    ``value/clipfrac``, ``value_loss``, ``policy/approxkl``, ``entropy/sampled``,
    ``response/length``, ``advantages/mean``, ``advantages/std``, ``lr``, ``beta``, ``loss``,
    ``skipped`` and more (see :func:`rollout_metrics` and :func:`update`).

    With ``mesh``: compiled by :func:`rlhf_jax.parallel.jit_step`, the state in and out on
    ``state_shardings``, ``frozen`` on ``frozen_shardings`` (its own rules), the prompts over
    ``('data', 'fsdp')``; called under ``jax.set_mesh(mesh)`` so the rollout's KV cache and
    tokens follow the batch; ``mode`` (``parallel.step``) is the update's gradient form,
    ``'jit'`` or the per-device ``'shard_map'`` (:func:`update`). The jax.jit object is the
    returned function's ``jitted``.
    """
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
    cfg: PPOConfig,
    static: PPOModels,
    frozen: FrozenParams,
    *,
    mesh: jax.sharding.Mesh | None = None,
    state_shardings: Any = None,
    frozen_shardings: Any = None,
    mode: str = "jit",
) -> Callable:
    """``step(state, batch, key) -> (state, metrics)`` for :func:`rlhf_jax.train.run_loop`.

    ``batch`` is a dict with ``prompt_tokens`` [B, P], ``prompt_mask`` [B, P] and optionally
    ``prompt_index`` [B]. ``key`` is unused: PPO's randomness comes from the state's seed and step
    (module docstring), which is what makes runs vmappable over seeds and exactly resumable.
    ``mesh``, the shardings and ``mode`` as in :func:`make_iteration` (``frozen`` placed on them
    already).
    """
    iterate = make_iteration(
        cfg,
        static,
        mesh=mesh,
        state_shardings=state_shardings,
        frozen_shardings=frozen_shardings,
        mode=mode,
    )
    return prompt_step(iterate, frozen)

"""Convention options of the RLHF math, and one named preset per public implementation.

Public RLHF implementations agree on the outline of PPO for language models and disagree on a
dozen details (``docs/formulas.md`` §9). :class:`Conventions` names every one of
those details as a field; the functions of :mod:`rlhf_jax.rewards`, :mod:`rlhf_jax.returns` and
:mod:`rlhf_jax.losses` take it as their keyword ``options`` and read the fields they need, so a
trainer passes one bundle straight through. A :class:`Conventions` is frozen and hashable: it is
static configuration (it changes the program), never traced. The numbers a sweep varies (beta,
gamma, lambda, clip ranges) are arguments of the functions, never fields here.

Presets (:data:`PRESETS`, :func:`get_preset`):

====================== ==================================================================
``lm-human-preferences`` OpenAI LMHP @ cbfd210 (Ziegler et al. 2019), TF1
``trl-ppo``              TRL ``trl/experimental/ppo`` (the "PPOv2" lineage, v1.9.0)
``deepspeed-chat``       DeepSpeed-Chat ``dschat/rlhf/ppo_trainer.py`` @ 83757d9
``safe-rlhf``            PKU Safe RLHF ``safe_rlhf/algorithms/ppo{,_lag}``
``rlhf-jax``             this library's default, justified in ``docs/conventions.md``
====================== ==================================================================

Each preset also carries the source's default hyperparameters (:class:`SourceDefaults`) so that an
experiment can start from "what the source does" in one line; the trainers keep their own
hyperparameter defaults and only read these when asked.
"""

from __future__ import annotations

import dataclasses

__all__ = [
    "KL_ESTIMATORS",
    "SCORE_POSITIONS",
    "KL_ON",
    "MISSING_STOP_MODES",
    "MASK_HOLES",
    "VALUE_LOSS_ON",
    "AGGREGATIONS",
    "RATIO_LEVELS",
    "SCORE_READS",
    "KL_CONTROLLERS",
    "Conventions",
    "SourceDefaults",
    "Preset",
    "DEFAULT",
    "PRESETS",
    "get_preset",
    "get",
]

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")
SCORE_POSITIONS = ("last_token", "after_stop", "last_fixed")
KL_ON = ("real", "all")
MISSING_STOP_MODES = ("subtract", "replace")
MASK_HOLES = ("skip", "zero")
VALUE_LOSS_ON = ("steps", "response")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "grpo", "bnpo", "dr_grpo", "dapo")
RATIO_LEVELS = ("token", "sequence_mean", "sequence_sum")
SCORE_READS = ("last_nonpad", "last")
KL_CONTROLLERS = ("fixed", "adaptive")


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"Conventions.{name}={value!r}: choose one of {allowed}")


def _positive_or_none(name: str, value) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"Conventions.{name}={value!r}: must be > 0, or None to switch it off")


@dataclasses.dataclass(frozen=True)
class Conventions:
    """Every convention on which the public implementations disagree (docs/formulas.md §9).

    Reward shaping (:func:`rlhf_jax.rewards.shape_rewards`), §1 and §9.1-9.3, 9.7:

    * ``kl_estimator``: per-token KL estimate charged in the reward, with ``d = logp - ref``:
      ``'k1'`` = d (LMHP, DSCHAT, SAFE, TRL default), ``'k2'`` = d^2/2 (TRL-legacy ``mse``),
      ``'k3'`` = (e^-d - 1) + d (TRL-PPO ``k3``), ``'abs'`` = |d| (TRL-legacy ``abs``).
    * ``score_position``: the slot t* that receives the score: ``'last_token'`` the last real
      token, i.e. the stop token when one was sampled (TRL-legacy, SAFE); ``'after_stop'`` one slot
      after it, the first padding slot, or the last slot when there is none (TRL-PPO, DSCHAT; that
      extra slot is then kept in GAE and in the value loss); ``'last_fixed'`` slot T-1 of the
      fixed-length response, always (LMHP; every slot is a step).
    * ``kl_on``: ``'real'`` charges the KL only where the response mask is 1 (TRL, SAFE, GRPO);
      ``'all'`` on every GAE step (:func:`rlhf_jax.masks.value_mask`): all T slots with
      ``'last_fixed'`` (LMHP), the response plus the post-stop slot with ``'after_stop'``
      (DSCHAT charges the KL of that slot too).
    * ``score_clip``: clip the score to ±c before adding it (DSCHAT c=5), None = off.
    * ``reward_clip``: clamp every per-token reward to ±c after adding the score (SAFE c=50).
    * ``missing_stop_penalty`` / ``missing_stop_mode``: for responses that never sampled a stop
      token, ``'subtract'`` the penalty from the score (TRL-PPO ``missing_eos_penalty``) or
      ``'replace'`` the score by it (LMHP ``penalty_reward_value=-1``); None = off.

    Returns (:mod:`rlhf_jax.returns`), §3 and §9.6:

    * ``mask_holes``: how GAE treats a 0 inside the mask (a token that is not an action, e.g. a
      tool output): ``'skip'`` it is not a time step, the recursion passes through it unchanged;
      ``'zero'`` it is a time step with reward and value 0 (TRL-legacy and SAFE multiply rewards
      and values by the mask before the usual recursion). Both agree on right-padded masks.
    * ``whiten_rewards``: whiten the per-token rewards before GAE, mean kept (LMHP default True).
    * ``whiten_advantages``: whiten the advantages over the policy mask (LMHP, TRL).
    * ``unbiased_variance``: Bessel-corrected variance in whitening (TRL) or biased (LMHP).

    Losses (:mod:`rlhf_jax.losses`), §4 and §9.4-9.5:

    * ``loss_aggregation``: ``'token_mean'`` global masked token mean (LMHP with an all-ones
      mask, TRL, DSCHAT; TRL GRPO ``dapo`` is the same, ``'dapo'`` is accepted as its name);
      ``'seq_mean_token_mean'`` mean over sequences of per-sequence token means (SAFE; TRL GRPO
      ``grpo``, also accepted as ``'grpo'``); ``'dr_grpo'`` token sum over B * T; ``'bnpo'`` the
      token mean of each microbatch, averaged over microbatches.
    * ``clip_value``: clip the new values around the old ones in the value loss (every source).
    * ``value_loss_on``: the tokens of the value loss (:func:`rlhf_jax.masks.value_loss_mask`):
      ``'steps'`` every GAE step, including the post-stop slot under ``'after_stop'`` (TRL-PPO
      ``~padding_mask_p1``); ``'response'`` the policy mask only (DSCHAT ``critic_loss_fn`` gets
      ``action_mask``, so the post-stop value is used in GAE but never trained).
    * ``dual_clip``: the dual-clip constant c > 1 (Ye et al. 2020) bounding the loss of negative
      advantages by -c A, None = off.
    * ``ratio_level``: ``'token'`` ratio per token (PPO); ``'sequence_mean'`` one ratio per
      sequence, exp of the masked mean log-ratio (GSPO, TRL GRPO ``importance_sampling_level=
      'sequence'``); ``'sequence_sum'`` exp of the summed log-ratio (TRL RLOO).
    * ``score_read``: where the reward model reads its score, for :func:`rlhf_jax.models.scores`:
      ``'last_nonpad'`` (HF, TRL, SAFE) or ``'last'`` (LMHP).
    """

    kl_estimator: str = "k1"
    score_position: str = "last_token"
    kl_on: str = "real"
    score_clip: float | None = None
    reward_clip: float | None = None
    missing_stop_penalty: float | None = None
    missing_stop_mode: str = "subtract"
    mask_holes: str = "skip"
    whiten_rewards: bool = False
    whiten_advantages: bool = True
    unbiased_variance: bool = True
    loss_aggregation: str = "token_mean"
    clip_value: bool = True
    value_loss_on: str = "steps"
    dual_clip: float | None = None
    ratio_level: str = "token"
    score_read: str = "last_nonpad"

    def __post_init__(self):
        _choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _choice("score_position", self.score_position, SCORE_POSITIONS)
        _choice("kl_on", self.kl_on, KL_ON)
        _choice("missing_stop_mode", self.missing_stop_mode, MISSING_STOP_MODES)
        _choice("mask_holes", self.mask_holes, MASK_HOLES)
        _choice("loss_aggregation", self.loss_aggregation, AGGREGATIONS)
        _choice("value_loss_on", self.value_loss_on, VALUE_LOSS_ON)
        _choice("ratio_level", self.ratio_level, RATIO_LEVELS)
        _choice("score_read", self.score_read, SCORE_READS)
        _positive_or_none("score_clip", self.score_clip)
        _positive_or_none("reward_clip", self.reward_clip)
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise ValueError(
                f"Conventions.dual_clip={self.dual_clip!r}: must be > 1 (Ye et al. use 3), "
                "or None to switch it off"
            )
        for name in ("whiten_rewards", "whiten_advantages", "unbiased_variance", "clip_value"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Conventions.{name}={getattr(self, name)!r}: must be True/False")

    def replace(self, **changes) -> Conventions:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


DEFAULT = Conventions()


@dataclasses.dataclass(frozen=True)
class SourceDefaults:
    """The source's default hyperparameters (docs/formulas.md §2-§4, §8), for reference runs."""

    kl_coef: float
    kl_controller: str = "fixed"  # 'fixed' | 'adaptive' (Ziegler et al.)
    kl_target: float | None = None  # adaptive: target KL per response (nats)
    kl_horizon: float | None = None  # adaptive: horizon in episodes
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2
    value_clip: float = 0.2
    vf_coef: float | None = 0.1  # None: separate critic optimizer (no coefficient)

    def __post_init__(self):
        _choice("kl_controller", self.kl_controller, KL_CONTROLLERS)


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named convention bundle: ``conventions`` plus the source's ``defaults``."""

    name: str
    conventions: Conventions
    defaults: SourceDefaults
    source: str  # the repository, version and files it reproduces


PRESETS: dict[str, Preset] = {
    "lm-human-preferences": Preset(
        name="lm-human-preferences",
        conventions=Conventions(
            kl_estimator="k1",
            score_position="last_fixed",
            kl_on="all",
            missing_stop_penalty=-1.0,
            missing_stop_mode="replace",
            mask_holes="zero",
            whiten_rewards=True,
            whiten_advantages=True,
            unbiased_variance=False,
            loss_aggregation="token_mean",
            clip_value=True,
            score_read="last",
        ),
        defaults=SourceDefaults(
            kl_coef=0.15, kl_controller="adaptive", kl_target=6.0, kl_horizon=10000.0
        ),
        source="openai/lm-human-preferences@cbfd210 train_policy.py, utils/core.py, launch.py",
    ),
    "trl-ppo": Preset(
        name="trl-ppo",
        conventions=Conventions(
            kl_estimator="k1",
            score_position="after_stop",
            kl_on="real",
            missing_stop_mode="subtract",
            mask_holes="zero",
            whiten_rewards=False,
            whiten_advantages=True,
            unbiased_variance=True,
            loss_aggregation="token_mean",
            clip_value=True,
            score_read="last_nonpad",
        ),
        defaults=SourceDefaults(kl_coef=0.05),
        source="huggingface/trl v1.9.0 trl/experimental/ppo/ppo_trainer.py, ppo_config.py",
    ),
    "deepspeed-chat": Preset(
        name="deepspeed-chat",
        conventions=Conventions(
            kl_estimator="k1",
            score_position="after_stop",
            kl_on="all",
            score_clip=5.0,
            mask_holes="zero",
            value_loss_on="response",
            whiten_rewards=False,
            whiten_advantages=False,
            loss_aggregation="token_mean",
            clip_value=True,
            score_read="last_nonpad",
        ),
        defaults=SourceDefaults(kl_coef=0.1, vf_coef=None),
        source="microsoft/DeepSpeedExamples@83757d9 dschat/rlhf/ppo_trainer.py",
    ),
    "safe-rlhf": Preset(
        name="safe-rlhf",
        conventions=Conventions(
            kl_estimator="k1",
            score_position="last_token",
            kl_on="real",
            reward_clip=50.0,
            mask_holes="zero",
            whiten_rewards=False,
            whiten_advantages=False,
            loss_aggregation="seq_mean_token_mean",
            clip_value=True,
            score_read="last_nonpad",
        ),
        defaults=SourceDefaults(kl_coef=0.02, value_clip=5.0, vf_coef=None),
        source="PKU-Alignment/safe-rlhf (copy in dbtmddn41/safe-completion@79a44c8) "
        "safe_rlhf/algorithms/ppo{,_lag}/trainer.py, trainers/rl_trainer.py, utils.py",
    ),
    "rlhf-jax": Preset(
        name="rlhf-jax",
        conventions=DEFAULT,
        defaults=SourceDefaults(kl_coef=0.05),
        source="rlhf-jax default (docs/conventions.md)",
    ),
}


def get_preset(name: str) -> Conventions:
    """The :class:`Conventions` of the preset ``name`` (one of :data:`PRESETS`).

    Raises:
      ValueError: ``name`` is not a preset; the message lists the valid names.
    """
    if name not in PRESETS:
        raise ValueError(
            f"unknown convention preset {name!r}: choose one of {tuple(PRESETS)} "
            "(or build a rlhf_jax.presets.Conventions yourself)"
        )
    return PRESETS[name].conventions


get = get_preset

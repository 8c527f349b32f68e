"""Reward model: an LM trunk with a scalar score head, trained from human comparisons.

The trunk starts from the SFT model (InstructGPT, lm-human-preferences, TRL, DeepSpeed-Chat all
initialise the reward model from the supervised policy) and a fresh scalar head reads the score at
one position of prompt + response (:func:`rlhf_jax.models.scores`, ``read="last_nonpad"`` by
default; ``"last"`` is lm-human-preferences' fixed last position, see ``docs/formulas.md`` §5).

Three losses, all from :mod:`rlhf_jax.losses` (this module does not re-derive them):

- ``"pairwise"`` — Bradley-Terry on (chosen, rejected) pairs, ``-log sigmoid(r_c - r_r - margin)``
  with an optional per-example margin and optional reward centering ``c * (r_c + r_r)^2`` (TRL
  ``RewardTrainer``): :func:`rlhf_jax.losses.pairwise_rm_loss`.
- ``"ranking"`` — K-wise rankings of one prompt: all C(K, 2) pairs of the group in one batch
  element, averaged within the group (InstructGPT Eq. 1; optional OASST L2 term):
  :func:`rlhf_jax.losses.ranking_rm_loss` ``mode="pairs"``. For K = 2 it equals the pairwise loss.
- ``"best_of_k"`` — softmax cross-entropy of the K scores against the best response
  (lm-human-preferences ``PickBest``): ``ranking_rm_loss(mode="best_of_k")``.
- ``"cost"`` — Safe RLHF's **cost model** on safety rows (PKU-SafeRLHF: two responses, the safer
  one's id and a safe/unsafe flag per response; data kind ``"safety"``): a Bradley-Terry term
  that ranks the less safe response's cost above the safer one's, plus a sign classifier that
  pushes safe responses' costs below 0 and unsafe ones' above
  (:func:`rlhf_jax.losses.cost_model_loss`; ``l2_coef`` is its score regulariser). A positive
  cost means unsafe. The other losses read safety rows by their ``better_response_id``.

A batch is the dict :func:`rlhf_jax.data.toy.ranking_batch` (and the general data path) builds::

    prompt_tokens, prompt_mask      [N, P]     left-padded
    response_tokens, response_mask  [N, K, R]  right-padded, ranked best -> worst along K

or, for pairs, ``chosen_tokens/chosen_mask`` and ``rejected_tokens/rejected_mask`` ``[N, R]``
(:func:`rlhf_jax.data.toy.pairwise_batch`), optionally with ``margin [N]``; a pair batch is read
as a ranking with K = 2.

**Accuracy** is the share of the batch's ranked pairs (all C(K, 2) per group) whose better-ranked
response scores strictly higher; on held-out comparisons it is the number to report.

**Accuracy** of a cost model is the share of pairs whose less safe response has the higher cost;
``sign_accuracy`` the share of responses whose cost has the sign of their flag (> 0 unsafe).

**Normalisation** (lm-human-preferences ``train_reward.py``, "normalize before/after"): after
training, the score head's gain and bias are set so the scores of responses *sampled from the SFT
policy* have mean ``target_mean`` (0) and standard deviation ``target_std`` (1), so a KL coefficient
β means the same thing whatever the reward model's scale: :func:`normalize_params`. A cost model's
0 is its safe/unsafe boundary, so its normalisation only rescales (``shift=False``): the SFT
samples' costs get standard deviation ``target_std`` about their mean, and 0 stays 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax import losses, models, parallel
from rlhf_jax.optim import OptimConfig, make_optimizer
from rlhf_jax.train import LoopConfig, TrainState, apply_update

__all__ = [
    "RewardModelConfig",
    "as_cost_pairs",
    "as_ranking",
    "group_scores",
    "init_reward_model",
    "init_state",
    "make_eval",
    "make_step",
    "normalize_params",
    "pair_accuracy",
    "rm_loss",
    "score_stats",
]

_LOSSES = ("pairwise", "ranking", "best_of_k", "cost")
_READS = ("last_nonpad", "last")


@dataclasses.dataclass(frozen=True)
class RewardModelConfig:
    """A scalar reward model trained from pairwise or K-wise comparisons."""

    # "pairwise" (K=2) | "ranking" (all C(K,2) pairs) | "best_of_k" (LMHP) | "cost" (Safe RLHF
    # cost model on "safety" rows: pairwise on the safer id + sign classifier on the flags)
    loss: str = "ranking"
    center_coef: float = 0.0  # pairwise: centering c * mean((r_c + r_r)^2); TRL suggests 0.01
    l2_coef: float = 0.0  # ranking, cost: + l2_coef * 0.5 * (r_i^2 + r_j^2) per pair (OASST 0.001)
    use_margin: bool = True  # subtract the batch's per-pair "margin" when the batch has one
    read: str = "last_nonpad"  # score position: "last_nonpad" (TRL, SAFE) | "last" (LMHP)
    optim: OptimConfig = OptimConfig(name="adamw", learning_rate=5e-5)  # optimizer and schedule
    loop: LoopConfig = LoopConfig(max_steps=1000)  # steps, evaluation, stopping, non-finite policy
    batch_size: int = 32  # comparison groups (prompts) per optimizer step
    # after training, set gain/bias so SFT samples score mean 0, std 1 (cost: rescale only)
    normalize: bool = True
    target_mean: float = 0.0  # mean of the normalised scores of SFT samples
    target_std: float = 1.0  # standard deviation of the normalised scores of SFT samples

    def __post_init__(self):
        if self.loss not in _LOSSES:
            raise ValueError(f"reward_model.loss={self.loss!r}: choose one of {_LOSSES}")
        if self.read not in _READS:
            raise ValueError(f"reward_model.read={self.read!r}: choose one of {_READS}")
        if self.center_coef < 0 or self.l2_coef < 0:
            raise ValueError("reward_model.center_coef and reward_model.l2_coef must be >= 0")
        if not self.target_std > 0:
            raise ValueError(f"reward_model.target_std={self.target_std}: must be > 0")
        if self.loss == "cost" and self.target_mean != 0:
            raise ValueError(
                f"reward_model.target_mean={self.target_mean} with loss='cost': a cost model's 0 "
                "is its safe/unsafe boundary, so its normalisation only rescales; set 0"
            )
        if self.batch_size < 1 or self.batch_size % self.optim.grad_accum_steps:
            raise ValueError(
                f"reward_model.batch_size={self.batch_size} must be >= 1 and divisible by "
                f"optim.grad_accum_steps={self.optim.grad_accum_steps}"
            )


# ------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------


def init_reward_model(sft_model: Any, key: jax.Array) -> Any:
    """A reward model whose trunk is a copy of ``sft_model``'s and whose score head is fresh.

    Args:
      sft_model: the :class:`rlhf_jax.models.Model` record of the SFT policy.
      key: PRNG key of the score head's initialisation.

    Returns:
      A Model record with ``lm_head=False, score_head=True``: every trunk parameter (embeddings,
      blocks, final norm) is the SFT value; the head is initialised by the models module.
    """
    fresh = models.init_model(sft_model.config, key, lm_head=False, score_head=True)
    sft_flat = dict(nnx.to_flat_state(sft_model.params))
    flat = nnx.to_flat_state(fresh.params)
    copied = []
    for path, var in flat:
        if path in sft_flat:
            source = sft_flat[path]
            if source.get_value().shape != var.get_value().shape:
                raise ValueError(
                    f"SFT parameter {path} has shape {source.get_value().shape}, "
                    f"the reward model's {var.get_value().shape}"
                )
            copied.append((path, var.replace(jnp.array(source.get_value()))))
        else:
            copied.append((path, var))
    params = nnx.from_flat_state(copied)
    return fresh.replace(params=params)


# ------------------------------------------------------------------------------------------
# Batches, scores, accuracy
# ------------------------------------------------------------------------------------------


def _reorder(batch: Mapping[str, Any], first: Any) -> dict[str, Any]:
    """A safety batch's two responses as a ranking (K = 2), response ``first[n]`` first."""
    xp = jnp if isinstance(batch["response_tokens"], jax.Array) else np
    order = xp.stack([first, 1 - first], axis=1).astype(np.int32)  # [N, 2]
    return {
        "prompt_tokens": batch["prompt_tokens"],
        "prompt_mask": batch["prompt_mask"],
        "response_tokens": xp.take_along_axis(batch["response_tokens"], order[:, :, None], 1),
        "response_mask": xp.take_along_axis(batch["response_mask"], order[:, :, None], 1),
    }


def as_ranking(batch: Mapping[str, Any]) -> dict[str, Any]:
    """A comparison batch as a ranking batch, best first: pairs (``chosen_*``/``rejected_*``)
    and safety rows (by ``better``, the better response's id) with K = 2; rankings as is."""
    if "better" in batch:
        return _reorder(batch, batch["better"])
    if "response_tokens" in batch:
        return dict(batch)
    xp = jnp if isinstance(batch["chosen_tokens"], jax.Array) else np
    out = {
        "prompt_tokens": batch["prompt_tokens"],
        "prompt_mask": batch["prompt_mask"],
        "response_tokens": xp.stack([batch["chosen_tokens"], batch["rejected_tokens"]], axis=1),
        "response_mask": xp.stack([batch["chosen_mask"], batch["rejected_mask"]], axis=1),
    }
    if "margin" in batch:
        out["margin"] = batch["margin"]
    return out


def as_cost_pairs(batch: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """A safety batch as ``(ranking with the less safe response first, signs [N, 2])``.

    The signs are +1 for a response flagged safe and -1 for one flagged unsafe, in the ranking's
    order; a ranking's "better" response is here the one that should cost more.
    """
    if "safer" not in batch:
        raise ValueError(
            "reward_model.loss='cost' needs safety rows (data kind 'safety': response_0, "
            "response_1, safer_response_id, is_response_0_safe, is_response_1_safe)"
        )
    xp = jnp if isinstance(batch["response_tokens"], jax.Array) else np
    unsafer = 1 - batch["safer"]
    ranking = _reorder(batch, unsafer)
    order = xp.stack([unsafer, batch["safer"]], axis=1).astype(np.int32)
    signs = 2 * xp.take_along_axis(batch["safe"], order, 1).astype(np.float32) - 1
    return ranking, signs


def group_scores(
    graphdef: nnx.GraphDef, params: Any, batch: Mapping[str, jax.Array], *, read: str
) -> jax.Array:
    """Scores ``[N, K]`` of every response of a ranking batch, in one trunk pass of ``N*K`` rows."""
    prompt, pmask = batch["prompt_tokens"], batch["prompt_mask"]  # [N, P]
    resp, rmask = batch["response_tokens"], batch["response_mask"]  # [N, K, R]
    n, k, r = resp.shape
    p = prompt.shape[1]
    tokens = jnp.concatenate([jnp.broadcast_to(prompt[:, None], (n, k, p)), resp], axis=-1)
    mask = jnp.concatenate([jnp.broadcast_to(pmask[:, None], (n, k, p)), rmask], axis=-1)
    flat = models.scores(
        graphdef, params, tokens.reshape(n * k, p + r), mask.reshape(n * k, p + r), read=read
    )
    return flat.reshape(n, k).astype(jnp.float32)


def pair_accuracy(scores: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(correct, pairs)``: ranked pairs (i < j, i better) with ``scores[i] > scores[j]``.

    Args:
      scores: ``[N, K]``, ranked best -> worst along K.
    """
    k = scores.shape[-1]
    upper = jnp.triu(jnp.ones((k, k), bool), 1)  # i < j
    wins = (scores[:, :, None] > scores[:, None, :]) & upper  # [N, K, K]
    return jnp.sum(wins).astype(jnp.float32), jnp.float32(scores.shape[0] * k * (k - 1) // 2)


def rm_loss(
    graphdef: nnx.GraphDef, params: Any, batch: Mapping[str, jax.Array], cfg: RewardModelConfig
) -> tuple[jax.Array, tuple[jax.Array, dict[str, jax.Array]]]:
    """The configured comparison loss, as ``(sum, (count, metric_sums))`` for ``accumulate``.

    ``metric_sums`` holds ``loss`` (the sum again), ``correct``/``pairs`` (for the accuracy) and
    ``score_sum``/``score_sq_sum``/``scores`` (count of scores) for the mean and spread.
    """
    signs = None
    if cfg.loss == "cost":  # ranked [less safe, safer]: the first should cost more
        batch, signs = as_cost_pairs(batch)
    else:
        batch = as_ranking(batch)
    scores = group_scores(graphdef, params, batch, read=cfg.read)  # [N, K]
    extra = {}
    if cfg.loss == "cost":
        total, count, cost_metrics = losses.cost_model_loss(
            scores[:, 1], scores[:, 0], signs[:, 1], signs[:, 0], reg_coef=cfg.l2_coef
        )
        extra["sign_correct"] = cost_metrics["sign_accuracy"]
    elif cfg.loss == "pairwise":
        if scores.shape[1] != 2:
            raise ValueError(
                f"reward_model.loss='pairwise' needs pairs (K = 2), got K = {scores.shape[1]}; "
                "use loss='ranking' for K-wise data"
            )
        margin = batch.get("margin") if cfg.use_margin else None
        total, count, _ = losses.pairwise_rm_loss(
            scores[:, 0], scores[:, 1], margin=margin, center_coef=cfg.center_coef
        )
    elif cfg.loss == "ranking":
        total, count, _ = losses.ranking_rm_loss(scores, mode="pairs", l2_coef=cfg.l2_coef)
    else:  # best_of_k: the labeller's pick is the first (best) response
        total, count, _ = losses.ranking_rm_loss(scores, mode="best_of_k")
    correct, pairs = pair_accuracy(scores)
    sums = {
        "loss": total,
        "correct": correct,
        "pairs": pairs,
        "score_sum": jnp.sum(scores),
        "score_sq_sum": jnp.sum(scores**2),
        "scores": jnp.float32(scores.size),
        **extra,
    }
    return total, (jnp.asarray(count, jnp.float32), sums)


def _summary(count: jax.Array, sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    mean = sums["score_sum"] / jnp.maximum(sums["scores"], 1.0)
    var = sums["score_sq_sum"] / jnp.maximum(sums["scores"], 1.0) - mean**2
    return {
        "loss": sums["loss"] / jnp.maximum(count, 1.0),
        "accuracy": sums["correct"] / jnp.maximum(sums["pairs"], 1.0),
        "score_mean": mean,
        "score_std": jnp.sqrt(jnp.maximum(var, 0.0)),
    } | (
        {"sign_accuracy": sums["sign_correct"] / jnp.maximum(count, 1.0)}
        if "sign_correct" in sums
        else {}
    )


# ------------------------------------------------------------------------------------------
# State, step, eval
# ------------------------------------------------------------------------------------------


def init_state(params: Any, cfg: RewardModelConfig) -> TrainState:
    """The reward-model state: a copy of ``params`` and a fresh optimizer state."""
    return TrainState.create(params, cfg.optim)


def make_step(
    graphdef: nnx.GraphDef,
    cfg: RewardModelConfig,
    *,
    mesh: jax.sharding.Mesh | None = None,
    state_shardings: Any = None,
    mode: str = "jit",
) -> Callable:
    """The compiled step ``step(state, batch, key) -> (state, metrics)`` (state donated).

    Metrics: ``loss``, ``accuracy`` (ranked pairs ordered right), ``score_mean``, ``score_std``,
    ``grad_norm``, ``lr``, ``skipped``. ``key`` is unused (no dropout). ``mesh``,
    ``state_shardings`` and ``mode`` as in :func:`rlhf_jax.algorithms.sft.make_step`.
    """
    optimizer = make_optimizer(cfg.optim)
    loss_fn = lambda params, batch: rm_loss(graphdef, params, batch, cfg)  # noqa: E731

    def step(state: TrainState, batch, key):
        del key
        grads, count, sums = parallel.accumulate(
            loss_fn, state.params, batch, cfg.optim.grad_accum_steps, mesh=mesh, mode=mode
        )
        metrics = _summary(count, sums)
        state, update_metrics = apply_update(optimizer, state, grads, metrics["loss"], cfg.optim)
        return state, {**metrics, **update_metrics}

    return parallel.jit_step(step, mesh, state_shardings)


def make_eval(graphdef: nnx.GraphDef, cfg: RewardModelConfig) -> Callable:
    """Compiled ``eval(params, batch) -> {loss, accuracy, score_mean, score_std}`` (held out)."""

    @jax.jit
    def evaluate(params, batch):
        _, (count, sums) = rm_loss(graphdef, params, batch, cfg)
        return _summary(count, sums)

    return evaluate


# ------------------------------------------------------------------------------------------
# Normalisation
# ------------------------------------------------------------------------------------------


def score_stats(scores: Any) -> tuple[float, float]:
    """``(mean, std)`` (population std, as lm-human-preferences) of a set of scores."""
    s = np.asarray(scores, np.float64).reshape(-1)
    if s.size < 2:
        raise ValueError(f"normalisation needs at least 2 scores, got {s.size}")
    return float(s.mean()), float(s.std())


def normalize_params(
    params: Any,
    scores: Any,
    *,
    target_mean: float = 0.0,
    target_std: float = 1.0,
    shift: bool = True,
) -> Any:
    """Set the score head's gain and bias: ``scores`` get mean ``target_mean``, std ``target_std``.

    The head computes ``score = gain * h + bias``; with the measured mean ``mu`` and std ``sigma``
    of ``scores`` (computed with the current gain and bias) the new values are

        gain' = gain * target_std / sigma,   bias' = (bias - mu) * target_std / sigma + target_mean,

    so ``score' = (score - mu) * target_std / sigma + target_mean`` exactly (lm-human-preferences
    ``train_reward.py`` ``normalize``). With ``shift=False`` (a cost model, whose 0 is the
    safe/unsafe boundary) only the scale changes: ``score' = score * target_std / sigma``
    (``target_mean`` must then be 0). The rest of ``params`` is unchanged.

    Args:
      params: reward-model parameters with a score head (:mod:`rlhf_jax.models`).
      scores: the scores of SFT-policy samples under ``params``, any shape.
    """
    mu, sigma = score_stats(scores)
    if not sigma > 0:
        raise ValueError("the scores to normalise are all equal (std 0): sample more responses")
    scale = target_std / sigma
    gain, bias = models.score_gain_bias(params)
    if not shift:
        if target_mean != 0:
            raise ValueError("normalize_params(shift=False) keeps 0 fixed: target_mean must be 0")
        return models.set_score_gain_bias(params, gain * scale, bias * scale)
    return models.set_score_gain_bias(params, gain * scale, (bias - mu) * scale + target_mean)

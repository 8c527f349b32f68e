"""Direct preference optimisation (Rafailov et al. 2023) and its loss family, offline and online.

**Offline** (``DPOConfig.online = False``): a batch is ``B`` preference pairs
(:mod:`rlhf_jax.data.formats` kind ``preference``: ``prompt_tokens``/``prompt_mask`` [B, P],
``chosen_tokens``/``chosen_mask``/``rejected_tokens``/``rejected_mask`` [B, R]). One step is one
compiled function::

    rows        [chosen; rejected]                          prompt + completion     [2B, P+R]
    policy      sum_t m_t log pi(y_t | ...)                 sequence log-probs      [2B]
    reference   the same under pi_ref, on the fly, or precomputed once ([B] ref_chosen,
                ref_rejected in the batch; DPOConfig.reference = "precomputed")
    loss        losses.dpo_loss (sigmoid, ipo, hinge, robust, cdpo) or simpo_loss
    update      AdamW on the pair mean, gradient accumulated exactly over microbatches

**Online** (``online = True``; Guo et al. 2024, TRL ``OnlineDPOTrainer``): a batch is ``B``
prompts; the iteration samples two responses per prompt from the *current* policy
(:func:`rlhf_jax.scoring.generate`), scores both with the reward sources (a reward model, a
``module:function``, or a weighted sum; :func:`rlhf_jax.scoring.score`), takes the higher-scored
one as chosen (ties: the first sample, as TRL's ``>=``), and takes one DPO step on those ``B``
pairs, all in one compiled function. A *pairwise* LM judge as the only source
(``rewards: ["judge:<judge YAML, mode: pairwise>"]``, :mod:`rlhf_jax.judge`) labels each pair
itself instead: chosen is the sample the judge prefers, ``P(first > second) >= 1/2`` averaged
over both orders (online AI feedback, Guo et al. 2024), compiled into the same function. The
log-probs of the DPO loss are at temperature 1 (the policy itself), whatever the sampling
temperature.

**Losses** (``docs/formulas.md`` §6): ``'sigmoid'`` (DPO, TRL default), ``'ipo'``, ``'hinge'``,
``'robust'``, ``'cdpo'`` are :func:`rlhf_jax.losses.dpo_loss`; ``'simpo'`` is the
reference-free SimPO (Meng et al. 2024; TRL ``CPOTrainer`` with ``loss_type='simpo'``), written
here (:func:`simpo_loss`): no reference model is loaded or run. ``rpo_alpha > 0`` adds the
chosen completions' negative log-likelihood per token, averaged over pairs, times ``rpo_alpha``
(RPO, Pang et al. 2024; TRL ``rpo_alpha``, which averages over the batch's chosen tokens): it
keeps the chosen responses likely while the margin grows.

**Metrics** with TRL's names and meanings (means over pairs): ``rewards/chosen`` and
``rewards/rejected`` the implicit rewards ``beta (log pi - log pi_ref)`` (SimPO: ``beta`` times the
per-token mean log-prob), ``rewards/margins`` their difference, ``rewards/accuracies`` the share
with chosen > rejected, ``logps/chosen`` and ``logps/rejected`` the policy's sequence log-probs,
``nll/chosen`` the chosen completions' per-token NLL;
and ``loss``, ``grad_norm``, ``lr``, ``skipped``. Online adds ``score/mean``, ``score/chosen``,
``score/rejected``, ``score/<source>``, ``response/length``, ``response/truncated``, ``kl/response``
(the k1 estimate of the sampled responses, summed per response).

**What is static, what is an array.** :class:`DPOConfig` holds what changes the program;
:class:`DPOHParams` (beta, learning rate, label smoothing, SimPO gamma, RPO alpha, sampling
temperature, seed) are scalar arrays in the state, so ``jax.vmap(step_fn(...))`` over a stacked
state runs N experiments in one program (:func:`stack_states`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rlhf_jax import losses, models, parallel, scoring
from rlhf_jax.data.formats import DataConfig
from rlhf_jax.masks import as_float, as_scalar
from rlhf_jax.optim import OptimConfig, make_optimizer
from rlhf_jax.train import LoopConfig, apply_update, hparam_arrays, seeded_state, stack_states

__all__ = [
    "DPOConfig",
    "DPOFrozen",
    "DPOHParams",
    "DPOModels",
    "DPOStage",
    "DPOState",
    "LOSS_TYPES",
    "eval_config",
    "label_file",
    "REFERENCE_MODES",
    "dpo_objective",
    "init_state",
    "make_eval",
    "make_step",
    "online_pairs",
    "pair_logps",
    "precompute_reference",
    "prepare",
    "simpo_loss",
    "stack_states",
    "step_fn",
]

LOSS_TYPES = (*losses.DPO_LOSS_TYPES, "simpo")
REFERENCE_MODES = ("on_the_fly", "precomputed")
_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """DPO. Static fields change the program; the last group are the defaults of
    :class:`DPOHParams`, carried as arrays at run time."""

    loss_type: str = "sigmoid"  # sigmoid | ipo | hinge | robust | cdpo | simpo (reference-free)
    reference: str = "on_the_fly"  # "on_the_fly" | "precomputed" (once, before training; offline)
    batch_size: int = 32  # pairs per step (offline) / prompts per iteration (online)
    optim: OptimConfig = OptimConfig(learning_rate=1e-6)  # AdamW (TRL default lr 1e-6)
    loop: LoopConfig = LoopConfig(max_steps=1000)  # steps, evaluation, stopping
    online: bool = False  # sample two responses per prompt from the policy, label, DPO step
    response_length: int = 64  # online: R, new tokens per response
    stop_tokens: tuple[int, ...] = ()  # online: token ids that end a response
    pad_token_id: int = 0  # online: written after the stop token
    top_k: int = 0  # online: sampling top-k; 0 = off
    top_p: float = 1.0  # online: sampling nucleus mass; 1 = off
    # --- DPOHParams defaults (arrays at run time; the learning rate is optim.learning_rate) ---
    beta: float = 0.1  # beta (TRL 0.1; SimPO uses ~2)
    label_smoothing: float = 0.0  # epsilon of 'robust' and 'cdpo' (and SimPO's smoothing)
    simpo_gamma: float = 0.5  # SimPO target margin gamma (TRL CPOConfig.simpo_gamma 0.5)
    rpo_alpha: float = 0.0  # weight of the chosen completions' NLL added to the loss (RPO); 0 = off
    temperature: float = 1.0  # online: sampling temperature
    seed: int = 0  # run seed: online samples

    def __post_init__(self):
        def need(ok: bool, message: str):
            if not ok:
                raise ValueError(f"dpo.trainer.{message}")

        need(
            self.loss_type in LOSS_TYPES,
            f"loss_type={self.loss_type!r}: choose one of {LOSS_TYPES}",
        )
        need(
            self.reference in REFERENCE_MODES,
            f"reference={self.reference!r}: choose one of {REFERENCE_MODES}",
        )
        need(self.batch_size >= 1, f"batch_size={self.batch_size}: must be >= 1")
        need(
            self.batch_size % self.optim.grad_accum_steps == 0,
            f"batch_size={self.batch_size} is not divisible by optim.grad_accum_steps="
            f"{self.optim.grad_accum_steps}",
        )
        need(self.response_length >= 1, f"response_length={self.response_length}: must be >= 1")
        need(self.beta > 0, f"beta={self.beta}: must be > 0")
        need(
            0 <= self.label_smoothing < 0.5,
            f"label_smoothing={self.label_smoothing}: must be in [0, 0.5)",
        )
        need(self.temperature > 0, f"temperature={self.temperature}: must be > 0")
        need(self.rpo_alpha >= 0, f"rpo_alpha={self.rpo_alpha}: must be >= 0")
        need(self.top_k >= 0, f"top_k={self.top_k}: must be >= 0 (0 = off)")
        need(0 < self.top_p <= 1, f"top_p={self.top_p}: must be in (0, 1]")
        need(
            not (self.online and self.reference == "precomputed"),
            "reference='precomputed' needs fixed data: online DPO samples new responses, "
            "use reference='on_the_fly'",
        )

    @property
    def uses_reference(self) -> bool:
        """SimPO is reference-free: no reference model is loaded or run."""
        return self.loss_type != "simpo"

    def sampling_spec(self) -> scoring.SamplingSpec:
        """Online sampling: two responses per prompt."""
        return scoring.SamplingSpec(
            response_length=self.response_length,
            num_samples=2,
            stop_tokens=self.stop_tokens,
            pad_token_id=self.pad_token_id,
            top_k=self.top_k,
            top_p=self.top_p,
        )


@flax.struct.dataclass
class DPOHParams:
    """The numbers a sweep may vary, as scalar arrays (stack them to ``jax.vmap`` over runs)."""

    beta: jax.Array
    learning_rate: jax.Array
    label_smoothing: jax.Array
    simpo_gamma: jax.Array
    rpo_alpha: jax.Array
    temperature: jax.Array
    seed: jax.Array  # int32

    @classmethod
    def from_config(cls, cfg: DPOConfig, **overrides: Any) -> DPOHParams:
        """Scalar arrays from ``cfg`` (``overrides`` replace single fields, e.g. ``seed=3``)."""
        values = {
            "beta": cfg.beta,
            "learning_rate": cfg.optim.learning_rate,
            "label_smoothing": cfg.label_smoothing,
            "simpo_gamma": cfg.simpo_gamma,
            "rpo_alpha": cfg.rpo_alpha,
            "temperature": cfg.temperature,
            "seed": cfg.seed,
        }
        return hparam_arrays(cls, values, overrides, "DPO")


@flax.struct.dataclass
class DPOState:
    """What a step updates (donated): the policy's ``params``, ``opt_state``, ``step`` (int32),
    the run's base ``key`` (from the seed: online samples) and the ``hparams``."""

    params: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array
    hparams: DPOHParams


@flax.struct.dataclass
class DPOFrozen:
    """What DPO reads and never trains (a separate, non-donated argument)."""

    reference: Any = None  # reference params; None for SimPO or a precomputed reference
    rewards: tuple = ()  # online: each reward source's params (None for a function)


@dataclasses.dataclass(frozen=True, eq=False)
class DPOModels:
    """The static half: graph definitions and the online reward sources."""

    policy: Any  # policy graphdef
    reference: Any = None  # reference graphdef (None when not run)
    sources: tuple = ()  # online: rlhf_jax.scoring reward sources, in DPOFrozen.rewards order


def init_state(cfg: DPOConfig, params: Any, hparams: DPOHParams | None = None) -> DPOState:
    """A fresh state: a *copy* of ``params`` and a new optimizer state at ``hparams``' rate.
    Traceable, so ``jax.vmap`` over stacked hparams builds N runs' states."""
    hparams = DPOHParams.from_config(cfg) if hparams is None else hparams
    return seeded_state(DPOState, params, cfg.optim, hparams)


# ------------------------------------------------------------------------------------------
# The loss
# ------------------------------------------------------------------------------------------


def simpo_loss(
    policy_chosen,
    policy_rejected,
    chosen_length,
    rejected_length,
    beta,
    gamma,
    *,
    label_smoothing=0.0,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """SimPO (Meng et al. 2024), reference-free, as TRL ``CPOTrainer`` (``loss_type='simpo'``).

    With the *length-normalised* log-probs ``a_c = log pi(c) / |c|``, ``a_r = log pi(r) / |r|``
    (``|y|`` the completion token count clamped >= 1) and ``z = beta (a_c - a_r) - gamma``::

        loss = -(1 - e) log sigmoid(z) - e log sigmoid(-z)

    (TRL: ``logits = pi_logratios - gamma / beta``, ``-logsigmoid(beta * logits)``, so
    ``gamma = simpo_gamma`` is the target margin in reward units; ``e = label_smoothing``). The
    implicit rewards logged are ``beta a_c`` and ``beta a_r``. At ``a_c = a_r`` and ``gamma = 0``
    the loss is ``log 2``.

    Args:
      policy_chosen, policy_rejected: [N] sequence log-probs (summed over completion tokens).
      chosen_length, rejected_length: [N] completion token counts.
      beta, gamma, label_smoothing: scalars (traceable).

    Returns:
      ``(sum, count = N, metrics)`` as :func:`rlhf_jax.losses.dpo_loss`.
    """
    a_c = as_float(policy_chosen) / jnp.maximum(as_float(chosen_length), 1.0)
    a_r = as_float(policy_rejected) / jnp.maximum(as_float(rejected_length), 1.0)
    b, e = as_scalar("beta", beta), as_scalar("label_smoothing", label_smoothing)
    z = b * (a_c - a_r) - as_scalar("gamma", gamma)
    per = -(1.0 - e) * jax.nn.log_sigmoid(z) - e * jax.nn.log_sigmoid(-z)
    rc, rr = lax.stop_gradient(b * a_c), lax.stop_gradient(b * a_r)
    n = jnp.asarray(a_c.shape[0], a_c.dtype)
    metrics = {
        "rewards_chosen": jnp.sum(rc),
        "rewards_rejected": jnp.sum(rr),
        "rewards_accuracy": jnp.sum((rc > rr).astype(rc.dtype)),
        "rewards_margin": jnp.sum(rc - rr),
        "example_count": n,
    }
    return jnp.sum(per), n, metrics


def pair_logps(graphdef, params, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """``(logps [2B], lengths [2B])``: sequence log-probs of ``[chosen; rejected]`` (temperature 1).

    ``logps[i] = sum_t m_t log pi(y_t | x, y_<t)`` over the completion tokens (TRL
    ``_compute_loss``: prompt and padding excluded). One forward on the stacked ``2B`` rows.
    """
    pt, pm = batch["prompt_tokens"], batch["prompt_mask"]
    comp = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]], 0)
    cmask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], 0)
    tokens = jnp.concatenate([jnp.tile(pt, (2, 1)), comp], 1)
    mask = jnp.concatenate([jnp.tile(pm, (2, 1)), cmask], 1)
    lp = models.token_logprobs(graphdef, params, tokens, mask, start=pt.shape[1])  # [2B, R]
    m = cmask.astype(jnp.float32)
    return jnp.sum(jnp.where(m > 0, lp, 0.0), -1), jnp.sum(m, -1)


def dpo_objective(
    cfg: DPOConfig,
    static: DPOModels,
    frozen: DPOFrozen,
    hparams: DPOHParams,
    params: Any,
    batch: Mapping[str, jax.Array],
) -> tuple[jax.Array, tuple[jax.Array, dict[str, jax.Array]]]:
    """``(loss_sum, (pair_count, metric_sums))`` of a (micro)batch of pairs, for
    :func:`rlhf_jax.optim.accumulate`: the loss is the sum over pairs, the count the pairs."""
    logps, lengths = pair_logps(static.policy, params, batch)
    b = batch["prompt_tokens"].shape[0]
    pc, pr, lc, lr = logps[:b], logps[b:], lengths[:b], lengths[b:]
    if cfg.loss_type == "simpo":
        total, count, m = simpo_loss(
            pc,
            pr,
            lc,
            lr,
            hparams.beta,
            hparams.simpo_gamma,
            label_smoothing=hparams.label_smoothing,
        )
    else:
        if "ref_chosen" in batch:
            rc, rr = batch["ref_chosen"], batch["ref_rejected"]
        else:
            ref, _ = pair_logps(static.reference, frozen.reference, batch)
            rc, rr = ref[:b], ref[b:]
        rc, rr = lax.stop_gradient(rc), lax.stop_gradient(rr)
        total, count, m = losses.dpo_loss(
            pc,
            pr,
            rc,
            rr,
            hparams.beta,
            loss_type=cfg.loss_type,
            label_smoothing=hparams.label_smoothing,
            chosen_length=lc,
            rejected_length=lr,
        )
    # RPO (Pang et al. 2024; TRL rpo_alpha): + alpha * the chosen completion's per-token NLL,
    # averaged over pairs (TRL averages over the batch's chosen tokens)
    nll = jnp.sum(-pc / jnp.maximum(lc, 1.0))
    total = total + hparams.rpo_alpha * nll
    sums = {
        "loss": lax.stop_gradient(total),
        "nll/chosen": lax.stop_gradient(nll),
        "rewards/chosen": m["rewards_chosen"],
        "rewards/rejected": m["rewards_rejected"],
        "rewards/margins": m["rewards_margin"],
        "rewards/accuracies": m["rewards_accuracy"],
        "logps/chosen": lax.stop_gradient(jnp.sum(pc)),
        "logps/rejected": lax.stop_gradient(jnp.sum(pr)),
    }
    return total, (count, sums)


# ------------------------------------------------------------------------------------------
# Online: two samples per prompt, labelled by the reward sources
# ------------------------------------------------------------------------------------------


def pairwise_judge(static: DPOModels) -> Any:
    """The pairwise judge that labels online DPO's pairs on its own, or None (scored sources)."""
    sources = static.sources
    return sources[0] if len(sources) == 1 and getattr(sources[0], "pairwise", False) else None


def online_pairs(
    cfg: DPOConfig,
    static: DPOModels,
    state: DPOState,
    frozen: DPOFrozen,
    prompts: jax.Array,
    prompt_mask: jax.Array,
    prompt_index: jax.Array | None = None,
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """``(pairs, metrics)``: a preference batch from two samples per prompt of the current policy.

    Sample ``2B`` responses (:func:`rlhf_jax.scoring.generate`, keys from the state's seed and
    step), score them (:func:`rlhf_jax.scoring.score`), and per prompt make the higher-scored one
    ``chosen`` (ties: the first, TRL ``OnlineDPOTrainer``'s ``>=``). With a pairwise judge
    (:func:`pairwise_judge`) the pair's "scores" are ``(p, 1 - p)``, ``p`` the judge's
    position-debiased ``P(first > second)``.
    """
    sample_key, _ = scoring.iteration_keys(state.key, state.step)
    sampled = scoring.generate(
        cfg.sampling_spec(),
        static.policy,
        state.params,
        prompts,
        prompt_mask,
        sample_key,
        state.hparams.temperature,
        prompt_index,
    )
    rows = scoring.Responses.of(prompts, prompt_mask, sampled)
    judge = pairwise_judge(static)
    if judge is not None:  # P(first > second), debiased over both orders: [B, 2] = (p, 1 - p)
        p = lax.stop_gradient(judge.preferences(frozen.rewards[0], rows).astype(jnp.float32))
        s, each = jnp.stack([p, 1.0 - p], 1), {}
    else:
        scores, each = scoring.score(static.sources, frozen.rewards, rows)
        s = scores.reshape(-1, 2)  # [B, 2]
    first = s[:, 0] >= s[:, 1]  # [B]
    tok = sampled.tokens.reshape(-1, 2, sampled.tokens.shape[1])
    msk = sampled.mask.reshape(-1, 2, sampled.mask.shape[1])
    pick = lambda x, i: x[:, i]  # noqa: E731
    chosen = jnp.where(first[:, None], pick(tok, 0), pick(tok, 1))
    rejected = jnp.where(first[:, None], pick(tok, 1), pick(tok, 0))
    chosen_mask = jnp.where(first[:, None], pick(msk, 0), pick(msk, 1))
    rejected_mask = jnp.where(first[:, None], pick(msk, 1), pick(msk, 0))
    pairs = {
        "prompt_tokens": prompts,
        "prompt_mask": prompt_mask,
        "chosen_tokens": chosen,
        "chosen_mask": chosen_mask,
        "rejected_tokens": rejected,
        "rejected_mask": rejected_mask,
    }
    rmask = sampled.mask.astype(jnp.float32)
    metrics = {
        "score/mean": jnp.mean(s),
        "score/chosen": jnp.mean(jnp.max(s, 1)),
        "score/rejected": jnp.mean(jnp.min(s, 1)),
        "score/ties": jnp.mean((s[:, 0] == s[:, 1]).astype(jnp.float32)),
        "response/length": jnp.mean(jnp.sum(rmask, -1)),
        "response/truncated": jnp.mean(sampled.truncated.astype(jnp.float32)),
    }
    if len(static.sources) > 1:
        metrics.update({f"score/{k}": jnp.mean(v) for k, v in each.items()})
    if static.reference is not None:
        ref = scoring.reference_logprobs(static.reference, frozen.reference, rows, 1.0)
        own = models.token_logprobs(
            static.policy, state.params, rows.tokens, rows.mask, start=rows.prompt_length
        )
        kl = jnp.where(rmask > 0, lax.stop_gradient(own) - ref, 0.0)
        metrics["kl/response"] = jnp.mean(jnp.sum(kl, -1))
    return pairs, metrics


# ------------------------------------------------------------------------------------------
# The step
# ------------------------------------------------------------------------------------------


def step_fn(
    cfg: DPOConfig,
    static: DPOModels,
    *,
    mesh: jax.sharding.Mesh | None = None,
    mode: str = "jit",
) -> Callable[..., tuple[DPOState, dict[str, jax.Array]]]:
    """The pure (un-jitted) step ``(state, frozen, batch) -> (state, metrics)``.

    ``batch`` holds preference pairs (offline) or prompts (online: ``prompt_tokens``,
    ``prompt_mask``, optionally ``prompt_index``). Use it to ``jax.vmap`` over runs before
    jitting; :func:`make_step` is the compiled one.
    """
    optimizer = make_optimizer(cfg.optim)
    keep = (lambda tree: tree) if mesh is None else (lambda t: parallel.constrain_batch(t, mesh))

    def step(state: DPOState, frozen: DPOFrozen, batch: Mapping[str, jax.Array]):
        metrics = {}
        if cfg.online:
            pairs, metrics = online_pairs(
                cfg,
                static,
                state,
                frozen,
                batch["prompt_tokens"],
                batch["prompt_mask"],
                batch.get("prompt_index"),
            )
            batch = keep(pairs)
        else:
            batch = {k: v for k, v in batch.items() if k not in ("index", "margin")}
        loss_fn = functools.partial(dpo_objective, cfg, static, frozen, state.hparams)
        grads, count, sums = parallel.accumulate(
            loss_fn, state.params, batch, cfg.optim.grad_accum_steps, mesh=mesh, mode=mode
        )
        denom = jnp.maximum(count, 1.0)
        means = {k: v / denom for k, v in sums.items()}
        train, upd = apply_update(optimizer, state, grads, means["loss"], cfg.optim)
        return train, {**metrics, **means, **upd}

    return step


def make_step(
    cfg: DPOConfig,
    static: DPOModels,
    frozen: DPOFrozen,
    *,
    mesh: jax.sharding.Mesh | None = None,
    state_shardings: Any = None,
    frozen_shardings: Any = None,
    mode: str = "jit",
) -> Callable:
    """``step(state, batch, key) -> (state, metrics)`` for :func:`rlhf_jax.train.run_loop`.

    The state is donated, ``frozen`` (reference and reward params, placed on
    ``frozen_shardings`` already) is not. ``key`` is unused: online samples come from the state's
    seed and step, so runs are vmappable over seeds and resume exactly. With ``mesh`` compiled by
    :func:`rlhf_jax.parallel.jit_step` (state on ``state_shardings``, batch over
    ``('data', 'fsdp')``); ``mode`` is the gradient's form (:func:`rlhf_jax.parallel.accumulate`).
    """
    pure = step_fn(cfg, static, mesh=mesh, mode=mode)
    if mesh is None:
        jitted = jax.jit(pure, donate_argnums=0)
    else:
        rows = parallel.batch_sharding(mesh)
        jitted = parallel.jit_step(
            pure, mesh, state_shardings, arg_shardings=(frozen_shardings, rows)
        )

    def step(state, batch, key):
        del key
        if mesh is None:
            return jitted(state, frozen, batch)
        with jax.set_mesh(mesh):
            return jitted(state, frozen, batch)

    step.jitted = jitted  # type: ignore[attr-defined]
    return step


def make_eval(
    cfg: DPOConfig, static: DPOModels
) -> Callable[[Any, DPOFrozen, Mapping[str, Any]], dict[str, jax.Array]]:
    """Compiled ``eval(params, frozen, pairs) -> {loss, rewards/..., logps/...}`` on held-out
    pairs (the same definitions as the step's metrics, at the config's beta)."""
    hp = DPOHParams.from_config(cfg)

    @jax.jit
    def evaluate(params, frozen, batch):
        batch = {k: v for k, v in batch.items() if k not in ("index", "margin")}
        _, (count, sums) = dpo_objective(cfg, static, frozen, hp, params, batch)
        return {k: v / jnp.maximum(count, 1.0) for k, v in sums.items()}

    return evaluate


def precompute_reference(
    static: DPOModels, frozen: DPOFrozen, arrays: Mapping[str, np.ndarray], chunk: int = 64
) -> dict[str, np.ndarray]:
    """``{ref_chosen, ref_rejected}`` [N] float32: the reference's sequence log-probs of a whole
    preference dataset, computed once in chunks of ``chunk`` pairs (one compile, the last chunk
    padded), to store beside the data (``DPOConfig.reference='precomputed'``)."""
    names = (
        "prompt_tokens",
        "prompt_mask",
        "chosen_tokens",
        "chosen_mask",
        "rejected_tokens",
        "rejected_mask",
    )
    n = len(arrays["prompt_tokens"])
    chunk = max(1, min(chunk, n))
    pad = -n % chunk
    data = {k: np.concatenate([arrays[k], np.repeat(arrays[k][:1], pad, 0)]) for k in names}
    fn = jax.jit(lambda p, b: pair_logps(static.reference, p, b)[0])
    out = []
    for start in range(0, n + pad, chunk):
        part = {k: jnp.asarray(v[start : start + chunk]) for k, v in data.items()}
        out.append(np.asarray(jax.device_get(fn(frozen.reference, part))).reshape(2, -1))
    both = np.concatenate(out, 1)[:, :n].astype(np.float32)
    return {"ref_chosen": both[0], "ref_rejected": both[1]}


# ------------------------------------------------------------------------------------------
# The pipeline stage
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DPOStage:
    """DPO from a policy on preference pairs (offline) or on its own labelled samples (online)."""

    policy: str | None = None  # HF directory the policy starts from; None = this run's sft/final
    reference: str | None = None  # the frozen anchor; None = the policy's starting point
    train_file: str | None = None  # {prompt, chosen, rejected} rows (text or chat); None = this
    # run's label/train.jsonl (label.output=pairs). Online: rows {prompt} (chosen/rejected unused)
    eval_file: str | None = None  # held-out pairs; None = label/eval.jsonl if it exists
    eval_size: int = 256  # pairs of eval_file in the evaluation batch
    data: DataConfig = DataConfig(
        kind="preference", max_prompt_length=128, max_completion_length=128
    )  # offline: "preference" rows, lengths P and R; online: "prompt" rows, length P
    # online: reward sources, each "model:<HF dir>", "fn:<module:function>" or "judge:<judge
    # YAML or HF dir>" (a pointwise judge's score), optionally "@<weight>" at the end; () = this
    # run's rm/final. A pairwise judge ("judge:<YAML with mode: pairwise>") alone labels the pairs
    rewards: tuple[str, ...] = ()
    # reward functions see the stop token and other special tokens in the decoded responses
    # (the toy task's gold_reward needs them: its stop token "." is special)
    decode_special_tokens: bool = False
    trainer: DPOConfig = DPOConfig()  # loss, beta, reference mode, optimizer, loop, online
    eval_prompts_file: str | None = None  # prompts to sample on for the policy evaluation
    eval_prompts: int = 256  # prompts of eval_prompts_file (the first ones)
    eval_samples_per_prompt: int = 1  # responses per evaluation prompt
    evaluator: str | None = None  # "module:function" (prompts, responses) -> {name: [B] values}
    win_rate_metric: str | None = "gold"  # evaluator metric of the win rate vs the reference
    log_samples: int = 4  # evaluation samples written to samples.jsonl
    eval_response_length: int = 64  # new tokens per evaluation response
    stop_at_eos: bool = True  # stop (online and evaluation) responses at the tokenizer's EOS
    save_every: int = 500  # checkpoint every N steps (also at the end and on SIGTERM); 0 = not

    def __post_init__(self):
        kind = "prompt" if self.trainer.online else "preference"
        mode = "online" if self.trainer.online else "offline"
        if self.data.kind != kind:
            raise ValueError(f"dpo.data.kind={self.data.kind!r}: {mode} DPO reads {kind!r} rows")
        if self.save_every < 0 or self.eval_size < 1 or self.eval_prompts < 1:
            raise ValueError("dpo.save_every must be >= 0, dpo.eval_size and eval_prompts >= 1")
        if self.eval_samples_per_prompt < 1 or self.eval_response_length < 1:
            raise ValueError("dpo.eval_samples_per_prompt and eval_response_length must be >= 1")


def label_file(ctx: Any, value: str | None, name: str, key: str | None) -> str | None:
    """``value``, else this run's ``label/<name>.jsonl`` (``label.output=pairs``); ``key`` set
    makes it required (a ConfigError when neither exists)."""
    import os

    from rlhf_jax.config import ConfigError

    if value:
        return value
    path = os.path.join(ctx.cfg.run.stage_dir("label"), f"{name}.jsonl")
    if os.path.exists(path):
        return path
    if key is None:
        return None
    raise ConfigError(
        f"{key} is not set and this run has no labelled pairs ({path}): set {key} or run "
        "`rlhf-jax label label.output=pairs` with the same run.dir first"
    )


def eval_config(st: Any) -> Any:
    """The ``pipeline.EvalConfig`` of a stage's flat ``eval_*`` fields."""
    from rlhf_jax import pipeline

    return pipeline.EvalConfig(
        prompts_file=st.eval_prompts_file,
        size=st.eval_prompts,
        samples_per_prompt=st.eval_samples_per_prompt,
        evaluator=st.evaluator,
        win_rate_metric=st.win_rate_metric,
        log_samples=st.log_samples,
    )


def prepare(ctx: Any) -> Any:
    """The ``dpo`` stage: load the policy (and reference), the pairs or prompts, the reward
    sources (online); precompute the reference log-probs if asked; return the Plan."""
    from rlhf_jax import pipeline
    from rlhf_jax.stages import same_tokenizer

    st = ctx.section
    cfg = st.trainer
    policy_dir = ctx.model_dir(st.policy, "dpo.policy", "sft")
    policy = ctx.load_model(policy_dir)
    tokenizer = ctx.load_tokenizer(policy_dir, policy)
    reference = None
    if cfg.uses_reference or st.eval_prompts_file:
        reference = policy
        if st.reference:
            ref_dir = ctx.model_dir(st.reference, "dpo.reference", None)
            reference = ctx.load_model(ref_dir)
            same_tokenizer(tokenizer, ctx.load_tokenizer(ref_dir, reference), "dpo.reference")
    stop = pipeline.stop_tokens(tokenizer, cfg.stop_tokens, at_eos=st.stop_at_eos)
    cfg = dataclasses.replace(
        cfg,
        seed=ctx.seed,
        stop_tokens=stop,
        pad_token_id=pipeline.pad_id(tokenizer, cfg.pad_token_id),
    )
    sources, source_params = (), ()
    if cfg.online:
        train = ctx.dataset(st.train_file, "dpo.train_file", tokenizer, st.data, policy)
        sources, source_params = scoring.load_sources(
            ctx,
            st.rewards,
            "dpo.rewards",
            tokenizer,
            train,
            special_tokens=st.decode_special_tokens,
            pairwise_judge=True,
        )
        rename = {"index": "prompt_index"}
    else:
        train_file = label_file(ctx, st.train_file, "train", "dpo.train_file")
        train = ctx.dataset(train_file, "dpo.train_file", tokenizer, st.data, policy)
        rename = None
    ref_graphdef = reference.graphdef if cfg.uses_reference else None
    ref_params = reference.params if cfg.uses_reference else None
    static = DPOModels(policy=policy.graphdef, reference=ref_graphdef, sources=sources)
    frozen = DPOFrozen(reference=ref_params, rewards=source_params)
    eval_static, eval_frozen = static, DPOFrozen(reference=ref_params)
    # the evaluation's reward is the sources' score; a pairwise judge has none (reward 0)
    eval_sources, eval_params = ((), ()) if pairwise_judge(static) else (sources, source_params)
    data = train
    if not cfg.online and cfg.uses_reference and cfg.reference == "precomputed":
        ctx.say(f"[dpo] reference log-probs of {len(train)} pairs, computed once")
        ref = precompute_reference(static, frozen, train.arrays)
        data = dataclasses.replace(train, arrays=dict(train.arrays) | ref)
        static = dataclasses.replace(static, reference=None)
        frozen = dataclasses.replace(frozen, reference=None)
    batches = ctx.batches(data, cfg.batch_size, "dpo.trainer.batch_size", rename=rename)
    frozen_shardings = parallel.state_shardings(frozen, ctx.mesh, ctx.cfg.parallel.preset)
    frozen = jax.device_put(frozen, frozen_shardings)

    evals = []
    eval_file = None if cfg.online else label_file(ctx, st.eval_file, "eval", None)
    if eval_file:
        ds = ctx.dataset(eval_file, "dpo.eval_file", tokenizer, st.data, policy)
        held = jax.tree.map(jnp.asarray, ds.take(np.arange(min(len(ds), st.eval_size))))
        evaluate = make_eval(cfg, eval_static)
        evals.append(lambda state: evaluate(state.params, eval_frozen, held))
    if st.eval_prompts_file:
        evals.append(
            scoring.sampled_evaluator(
                ctx,
                eval_config(st),
                st.data.max_prompt_length,
                policy,
                reference,
                eval_sources,
                eval_params,
                tokenizer,
                temperature=cfg.temperature,
                response_length=st.eval_response_length,
                stop=stop,
            )
        )
    eval_fn = None
    if evals:
        eval_fn = lambda state: {k: v for e in evals for k, v in e(state).items()}  # noqa: E731

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
        key=jax.random.PRNGKey(ctx.seed),
        eval_fn=eval_fn,
        tokenizer=tokenizer,
        save_every=st.save_every,
    )

"""Supervised fine-tuning (and pretraining) of a causal LM: token negative log-likelihood.

The loss is the summed negative log-likelihood of the *target* tokens over their count,

    L = - sum_{b, t} w[b, t] * log p(tokens[b, t] | tokens[b, :t]) / sum_{b, t} w[b, t],

with ``w = loss_mask * attention_mask`` on the positions ``t >= 1`` (the first token is never a
target). For SFT on prompt/completion data ``loss_mask`` is 1 on completion tokens only (TRL
``SFTTrainer`` with ``completion_only_loss``, InstructGPT's SFT); for pretraining on a corpus it is
the attention mask (every real token after the first). The loss returns the sum and the count and
:func:`rlhf_jax.optim.accumulate` divides once, so the token mean is exact across microbatches.

A batch is a dict of ``[B, T]`` int32 arrays::

    tokens          the sequence (prompt left-padded, completion right-padded: see
                    :func:`completion_batch`)
    attention_mask  1 on real tokens
    loss_mask       1 on the tokens that are targets

The step is one compiled function ``step(state, batch, key) -> (state, metrics)`` with the state
donated; metrics are ``loss`` (mean token NLL), ``token_accuracy`` (argmax = target),
``tokens`` (target count), ``grad_norm``, ``lr`` and ``skipped`` (a non-finite update dropped, see
:func:`rlhf_jax.train.apply_update`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax import lora as lora_lib
from rlhf_jax import models, parallel
from rlhf_jax.optim import OptimConfig, make_optimizer
from rlhf_jax.train import LoopConfig, TrainState, apply_update

__all__ = [
    "SFTConfig",
    "as_sequences",
    "completion_batch",
    "corpus_batch",
    "init_state",
    "make_eval",
    "make_step",
    "sft_loss",
    "train_params",
]


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning / pretraining of a causal LM on token NLL."""

    optim: OptimConfig = OptimConfig(name="adamw", learning_rate=1e-4)  # optimizer and schedule
    loop: LoopConfig = LoopConfig(max_steps=1000)  # steps, evaluation, stopping, non-finite policy
    batch_size: int = 32  # sequences per optimizer step (split into optim.grad_accum_steps)
    completion_only: bool = True  # loss on completion tokens only; False: every token (pretrain)
    # LoRA (rlhf_jax.lora): train low-rank adapters only, the model frozen; None = full training
    lora: lora_lib.LoRAConfig | None = None

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"sft.batch_size={self.batch_size}: must be >= 1")
        if self.batch_size % self.optim.grad_accum_steps:
            raise ValueError(
                f"sft.batch_size={self.batch_size} is not divisible by "
                f"optim.grad_accum_steps={self.optim.grad_accum_steps}"
            )


# ------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------


def completion_batch(
    prompt_tokens: Any,
    prompt_mask: Any,
    completion_tokens: Any,
    completion_mask: Any,
    *,
    completion_only: bool = True,
) -> dict[str, np.ndarray]:
    """A training batch from left-padded prompts ``[B, P]`` and right-padded completions ``[B, R]``.

    Returns ``tokens``, ``attention_mask`` and ``loss_mask``, all ``[B, P+R]`` int32. ``loss_mask``
    is the completion mask (``completion_only``) or the whole attention mask.
    """
    pt, pm = np.asarray(prompt_tokens), np.asarray(prompt_mask)
    ct, cm = np.asarray(completion_tokens), np.asarray(completion_mask)
    if pt.shape != pm.shape or ct.shape != cm.shape or pt.shape[0] != ct.shape[0]:
        raise ValueError(
            f"prompt {pt.shape}/{pm.shape} and completion {ct.shape}/{cm.shape} tokens/masks "
            "must be [B, P] and [B, R] with the same B"
        )
    tokens = np.concatenate([pt, ct], axis=1).astype(np.int32)
    mask = np.concatenate([pm, cm], axis=1).astype(np.int32)
    if completion_only:
        loss_mask = np.concatenate([np.zeros_like(pm), cm], axis=1).astype(np.int32)
    else:
        loss_mask = mask
    return {"tokens": tokens, "attention_mask": mask, "loss_mask": loss_mask}


def corpus_batch(tokens: Any, attention_mask: Any) -> dict[str, np.ndarray]:
    """A pretraining batch ``[B, T]``: every real token after the first is a target."""
    tokens = np.asarray(tokens, np.int32)
    mask = np.asarray(attention_mask, np.int32)
    return {"tokens": tokens, "attention_mask": mask, "loss_mask": mask}


# ------------------------------------------------------------------------------------------
# Loss and step
# ------------------------------------------------------------------------------------------


def as_sequences(batch: Mapping[str, Any], *, completion_only: bool = True) -> dict[str, Any]:
    """``{tokens, attention_mask, loss_mask}`` ``[B, T]`` from either batch layout (traceable).

    A prompt/completion batch (``prompt_tokens``/``prompt_mask`` ``[B, P]``,
    ``completion_tokens``/``completion_mask`` ``[B, R]``, as :mod:`rlhf_jax.data.formats` yields)
    is concatenated; a sequence batch is returned as is. With ``completion_only=False`` the loss
    mask is the attention mask (every real token after the first is a target).
    """
    if "tokens" in batch:
        out = {k: batch[k] for k in ("tokens", "attention_mask")}
        out["loss_mask"] = batch.get("loss_mask", batch["attention_mask"])
    else:
        pm, cm = batch["prompt_mask"], batch["completion_mask"]
        out = {
            "tokens": jnp.concatenate([batch["prompt_tokens"], batch["completion_tokens"]], 1),
            "attention_mask": jnp.concatenate([pm, cm], 1),
            "loss_mask": jnp.concatenate([jnp.zeros_like(pm), cm], 1),
        }
    if not completion_only:
        out["loss_mask"] = out["attention_mask"]
    return out


def sft_loss(
    graphdef: nnx.GraphDef,
    params: Any,
    batch: Mapping[str, jax.Array],
    *,
    completion_only: bool = True,
) -> tuple[jax.Array, tuple[jax.Array, dict[str, jax.Array]]]:
    """Summed token NLL of the targets, for :func:`rlhf_jax.optim.accumulate`.

    Args:
      graphdef, params: the LM (``nnx.split``).
      batch: ``tokens``, ``attention_mask``, ``loss_mask``, each ``[B, T]``, or a
        prompt/completion batch (see :func:`as_sequences`).
      completion_only: False trains on every real token (pretraining), whatever ``loss_mask``.

    Returns:
      ``(nll_sum, (count, {"nll": nll_sum, "correct": correct_sum}))``: ``count`` is the number of
      target tokens ``sum(w[:, 1:])`` and ``correct`` the targets whose logit is the argmax.
    """
    batch = as_sequences(batch, completion_only=completion_only)
    tokens, mask = batch["tokens"], batch["attention_mask"]
    logits = models.logits(graphdef, params, tokens, mask)[:, :-1]  # [B, T-1, V], predicts t+1
    targets = tokens[:, 1:]  # [B, T-1]
    weight = (batch["loss_mask"][:, 1:] * mask[:, 1:]).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    target_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, T-1]
    nll = -jnp.sum(target_logp * weight)
    correct = jnp.sum((jnp.argmax(logits, axis=-1) == targets) * weight)
    count = jnp.sum(weight)
    return nll, (count, {"nll": nll, "correct": correct})


def init_state(params: Any, cfg: SFTConfig, key: jax.Array | None = None) -> TrainState:
    """The SFT state: a copy of ``params`` (never donated) and a fresh optimizer state.

    With ``cfg.lora`` the state holds only the adapters (:func:`rlhf_jax.lora.init_adapters`,
    ``A`` drawn from ``key``, default ``PRNGKey(0)``) and their optimizer state; ``params`` is the
    frozen base that :func:`make_step` takes as ``base``.
    """
    if cfg.lora is not None:
        key = jax.random.PRNGKey(0) if key is None else key
        return TrainState.create(lora_lib.init_adapters(params, cfg.lora, key), cfg.optim)
    return TrainState.create(params, cfg.optim)


def train_params(cfg: SFTConfig, base: Any, params: Any) -> Any:
    """The model's parameters from the state's: ``params`` itself, or with ``cfg.lora`` the base
    merged with the adapters (:func:`rlhf_jax.lora.merge`)."""
    if cfg.lora is None:
        return params
    return lora_lib.merge(base, params, cfg.lora)


def make_step(
    graphdef: nnx.GraphDef,
    cfg: SFTConfig,
    *,
    mesh: jax.sharding.Mesh | None = None,
    state_shardings: Any = None,
    mode: str = "jit",
    base: Any = None,
    base_shardings: Any = None,
) -> Callable:
    """The compiled SFT step ``step(state, batch, key) -> (state, metrics)`` (state donated).

    ``key`` is unused (the models have no dropout); it is there so every trainer's step has the
    signature :func:`rlhf_jax.train.run_loop` calls. With ``mesh`` the step is compiled for it
    (:func:`rlhf_jax.parallel.jit_step`: the state in and out on ``state_shardings``, the batch
    over ``('data', 'fsdp')``) and ``mode`` picks the gradient's form
    (:func:`rlhf_jax.parallel.accumulate`: ``'jit'`` or the pmap-style ``'shard_map'``).

    With ``cfg.lora``: ``base`` is the frozen model (an argument of the compiled step, never
    donated, placed on ``base_shardings`` with a mesh), the state's params are the adapters,
    and the loss is taken on :func:`rlhf_jax.lora.merge` of the two, so only the adapters get
    gradients and optimizer moments. Only ``mode='jit'``.
    """
    optimizer = make_optimizer(cfg.optim)
    if cfg.lora is not None:
        if base is None:
            raise ValueError("sft.trainer.lora: make_step needs the frozen base (base=...)")
        if mode != "jit":
            raise ValueError(
                f"sft.trainer.lora with parallel.step={mode!r} is not supported: use 'jit'"
            )
        if cfg.lora.modules_to_save:
            raise ValueError("sft.trainer.lora.modules_to_save is for PPO only; set it to []")

    def lora_step(state: TrainState, base, batch, key):
        def loss_fn(adapters, batch):
            params = lora_lib.merge(base, adapters, cfg.lora)
            return sft_loss(graphdef, params, batch, completion_only=cfg.completion_only)

        return step(state, batch, key, loss_fn)

    def full_step(state: TrainState, batch, key):
        def loss_fn(params, batch):
            return sft_loss(graphdef, params, batch, completion_only=cfg.completion_only)

        return step(state, batch, key, loss_fn)

    def step(state: TrainState, batch, key, loss_fn):
        del key
        grads, count, sums = parallel.accumulate(
            loss_fn, state.params, batch, cfg.optim.grad_accum_steps, mesh=mesh, mode=mode
        )
        denom = jnp.maximum(count, 1.0)
        loss = sums["nll"] / denom
        state, update_metrics = apply_update(optimizer, state, grads, loss, cfg.optim)
        metrics = {
            "loss": loss,
            "token_accuracy": sums["correct"] / denom,
            "tokens": count,
            **update_metrics,
        }
        return state, metrics

    if cfg.lora is None:
        return parallel.jit_step(full_step, mesh, state_shardings)
    arg_shardings = None
    if mesh is not None:
        arg_shardings = (base_shardings, parallel.batch_sharding(mesh), parallel.replicated(mesh))
    jitted = parallel.jit_step(lora_step, mesh, state_shardings, arg_shardings=arg_shardings)
    return lambda state, batch, key: jitted(state, base, batch, key)


def make_eval(
    graphdef: nnx.GraphDef, *, completion_only: bool = True
) -> Callable[[Any, Mapping[str, Any]], dict[str, jax.Array]]:
    """Compiled ``eval(params, batch) -> {"loss", "token_accuracy", "perplexity"}`` on one batch."""

    @jax.jit
    def evaluate(params, batch):
        nll, (count, sums) = sft_loss(graphdef, params, batch, completion_only=completion_only)
        denom = jnp.maximum(count, 1.0)
        loss = nll / denom
        return {
            "loss": loss,
            "token_accuracy": sums["correct"] / denom,
            "perplexity": jnp.exp(loss),
        }

    return evaluate

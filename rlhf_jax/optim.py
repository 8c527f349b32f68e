"""Optimizers, learning-rate schedules and exact gradient accumulation.

Every trainer builds its optimizer here, so that the choices a sweep varies behave the same way in
SFT, reward modelling and PPO:

- The **peak learning rate is an array in the optimizer state** (``optax.inject_hyperparams``), so
  ``jax.vmap`` over a leading run axis trains N learning rates in one program. Set it with
  :func:`set_learning_rate`; the schedule multiplies it by a shape in ``[0, 1]``.
- **Gradient accumulation is exact.** Losses in rlhf-jax return ``(sum, count)``; :func:`accumulate`
  sums both over microbatches and divides once, so a token mean over 4 microbatches equals the token
  mean over the whole minibatch (a mean of per-microbatch means would weight short microbatches up).
- **Moments in their own dtype** (``moment_dtype``): with bfloat16 parameters, ``'float32'`` keeps
  Adam's moments (and the whole update: clipping, Adam, decay) in float32, and casts the update
  back to the parameters' dtype before it is added (:func:`with_moment_dtype`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

_SCHEDULES = ("constant", "linear", "cosine")
_OPTIMIZERS = ("adamw", "adam", "sgd")
_MOMENT_DTYPES = (None, "float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """How parameters are updated. Defaults follow common RLHF practice (AdamW, clip at 1.0)."""

    name: str = "adamw"  # "adamw" | "adam" | "sgd"
    learning_rate: float = 1e-5  # peak learning rate (also settable per run as an array)
    schedule: str = "constant"  # "constant" | "linear" (to end_lr_ratio) | "cosine"
    warmup_steps: int = 0  # linear warm-up from 0, in optimizer steps
    decay_steps: int = 0  # steps over which linear/cosine decay runs (after warm-up); 0 = no decay
    end_lr_ratio: float = 0.0  # final lr as a fraction of the peak (linear/cosine)
    b1: float = 0.9  # Adam beta1
    b2: float = 0.999  # Adam beta2
    eps: float = 1e-8  # Adam epsilon (lm-human-preferences uses 1e-5)
    weight_decay: float = 0.0  # decoupled weight decay (AdamW), multiplied by the lr
    max_grad_norm: float | None = 1.0  # global-norm gradient clipping; None disables
    grad_accum_steps: int = 1  # microbatches per optimizer step (exact token means)
    # dtype of the optimizer's moments and update arithmetic: None = the parameters' (today's
    # behaviour); "float32" with bfloat16 parameters = float32 Adam moments (12 instead of 8
    # bytes per parameter with the bf16 weights and gradients).
    moment_dtype: str | None = None

    def __post_init__(self):
        if self.name not in _OPTIMIZERS:
            raise ValueError(f"optim.name={self.name!r}: choose one of {_OPTIMIZERS}")
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"optim.schedule={self.schedule!r}: choose one of {_SCHEDULES}")
        if not self.learning_rate > 0:
            raise ValueError(f"optim.learning_rate={self.learning_rate}: must be > 0")
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise ValueError("optim.warmup_steps and optim.decay_steps must be >= 0")
        if not 0.0 <= self.end_lr_ratio <= 1.0:
            raise ValueError(f"optim.end_lr_ratio={self.end_lr_ratio}: must be in [0, 1]")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError("optim.max_grad_norm must be > 0, or None to disable clipping")
        if self.grad_accum_steps < 1:
            raise ValueError("optim.grad_accum_steps must be >= 1")
        if self.moment_dtype not in _MOMENT_DTYPES:
            raise ValueError(
                f"optim.moment_dtype={self.moment_dtype!r}: choose one of {_MOMENT_DTYPES}"
            )


def schedule_shape(cfg: OptimConfig) -> Callable[[jax.Array], jax.Array]:
    """The learning-rate multiplier in [0, 1] as a function of the optimizer step count."""

    def shape(count):
        count = jnp.asarray(count, jnp.float32)
        warm = jnp.minimum(1.0, (count + 1.0) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
        if cfg.schedule == "constant" or cfg.decay_steps == 0:
            decay = 1.0
        else:
            frac = jnp.clip((count - cfg.warmup_steps) / cfg.decay_steps, 0.0, 1.0)
            if cfg.schedule == "linear":
                decay = 1.0 - (1.0 - cfg.end_lr_ratio) * frac
            else:  # cosine
                cos = 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
                decay = cfg.end_lr_ratio + (1.0 - cfg.end_lr_ratio) * cos
        return warm * decay

    return shape


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """An optax transformation whose peak learning rate lives in its state (module docstring)."""
    shape = schedule_shape(cfg)

    def build(learning_rate):
        parts = []
        if cfg.max_grad_norm is not None:
            parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
        if cfg.name in ("adamw", "adam"):
            parts.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
        if cfg.name == "adamw" and cfg.weight_decay > 0:
            parts.append(optax.add_decayed_weights(cfg.weight_decay))
        parts.append(optax.scale_by_schedule(shape))
        parts.append(optax.scale(-1.0 * learning_rate))
        chain = optax.chain(*parts)
        return chain if cfg.moment_dtype is None else with_moment_dtype(chain, cfg.moment_dtype)

    # the learning rate's dtype is inferred from the parameters' unless given: with
    # moment_dtype it is that dtype (a bfloat16 1e-5 is 1.0014e-5)
    inject = optax.inject_hyperparams(build, hyperparam_dtype=cfg.moment_dtype)
    return inject(learning_rate=cfg.learning_rate)


def with_moment_dtype(inner: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
    """``inner`` run in ``dtype``: its state is initialised from the parameters cast to ``dtype``
    (so Adam's ``mu`` and ``nu`` are ``dtype``), gradients and parameters enter cast to ``dtype``,
    and each update leaves cast back to its gradient's dtype (the parameters' dtype).

    ``optax.scale_by_adam(mu_dtype=...)`` sets the dtype of the first moment only; ``nu`` follows
    the parameters, hence this wrapper. The state's tree is ``inner``'s, so the sharding rules
    (which follow parameter paths) and :func:`set_learning_rate` are unchanged.
    """

    def cast(tree):
        return jax.tree.map(lambda x: x.astype(dtype), tree)

    def init(params):
        return inner.init(cast(params))

    def update(updates, state, params=None):
        new, state = inner.update(cast(updates), state, None if params is None else cast(params))
        return jax.tree.map(lambda u, g: u.astype(g.dtype), new, updates), state

    return optax.GradientTransformation(init, update)


def set_learning_rate(opt_state: Any, learning_rate: jax.Array | float) -> Any:
    """Return ``opt_state`` with its peak learning rate replaced (traceable, vmappable)."""
    hp = dict(opt_state.hyperparams)
    hp["learning_rate"] = jnp.asarray(learning_rate, jnp.asarray(hp["learning_rate"]).dtype)
    return opt_state._replace(hyperparams=hp)


def current_learning_rate(cfg: OptimConfig, opt_state: Any) -> jax.Array:
    """The learning rate the next update will use (peak x schedule shape), for logging."""
    count = opt_state.count  # optimizer steps taken (inject_hyperparams state)
    return opt_state.hyperparams["learning_rate"] * schedule_shape(cfg)(count)


def accumulate(
    loss_fn: Callable[..., tuple[jax.Array, tuple[jax.Array, Any]]],
    params: Any,
    batch: Any,
    num_micro: int,
    varying: tuple[str, ...] = (),
) -> tuple[Any, jax.Array, Any]:
    """Exact gradient of ``sum / count`` over ``num_micro`` microbatches.

    Args:
      loss_fn: ``loss_fn(params, microbatch) -> (loss_sum, (count, metrics))``; differentiated with
        respect to ``params``. ``metrics`` must be a pytree of sums (they are summed).
      params: the parameters.
      batch: a pytree whose leaves share a leading axis divisible by ``num_micro``.
      num_micro: static number of microbatches.
      varying: inside ``jax.shard_map``, the manual mesh axes the microbatch results vary over
        (each device's own rows): the running sums start as zeros cast to vary over them, as
        ``lax.scan`` needs its carry typed like the body's results.

    Returns:
      ``(grads, count, metric_sums)`` where ``grads`` is the gradient of ``total_sum / total_count``
      (``count`` clamped to >= 1), identical to a single pass over the whole batch.
    """
    grad_fn = jax.grad(loss_fn, has_aux=True)
    if num_micro == 1:
        grads, (count, metrics) = grad_fn(params, batch)
    else:

        def split(x):
            if x.shape[0] % num_micro:
                raise ValueError(
                    f"batch size {x.shape[0]} is not divisible by grad_accum_steps={num_micro}"
                )
            return x.reshape(num_micro, x.shape[0] // num_micro, *x.shape[1:])

        micro = jax.tree.map(split, batch)

        def body(carry, mb):
            g, (c, m) = grad_fn(params, mb)
            return jax.tree.map(jnp.add, carry, (g, c, m)), None

        g0, (c0, m0) = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (g0, c0, m0))
        if varying:
            zeros = jax.lax.pcast(zeros, varying, to="varying")
        (grads, count, metrics), _ = jax.lax.scan(body, zeros, micro)
    denom = jnp.maximum(jnp.asarray(count, jnp.float32), 1.0)
    grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
    return grads, count, metrics

"""The run loop every trainer shares, and the guarded optimizer update its steps use.

A trainer (SFT, reward model, PPO, ...) provides a **compiled step**
``step(state, batch, key) -> (state, metrics)`` (``jax.jit`` with the state donated; ``metrics`` a
flat dict of scalars) and :func:`run_loop` does the slow host-side things around it:

- fetch the batch of step ``s`` (``batches(s)`` for a callable, else the next item of an
  iterable) and derive the step's key as ``fold_in(key, s)``, so a resumed run sees the same
  batches and the same randomness as an uninterrupted one;
- call the step, check the metrics named in :attr:`LoopConfig.check_finite`, evaluate every
  ``eval_every`` steps, log, checkpoint;
- stop at ``max_steps``, when an evaluation metric crosses a threshold, on preemption (SIGTERM
  seen by the checkpointer: save and return), or on a non-finite loss (``on_nonfinite="stop"``).

**Non-finite values never reach the parameters.** A step builds its update with
:func:`apply_update`, which keeps the old parameters and optimizer state (``lax.cond`` inside the
compiled step, so nothing is ever written with a NaN) when the loss or the gradient is not finite,
and reports ``skipped = 1``. The loop then either stops with a message naming the step and the
metric (``"stop"``, the default) or carries on with the next batch (``"skip"``), up to
``max_consecutive_skips`` in a row.

The logger and checkpointer are duck-typed (:class:`rlhf_jax.logging.RunLogger`,
:class:`rlhf_jax.checkpoint.Checkpointer`, or anything with the same methods) and optional.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import parallel
from rlhf_jax.errors import UserError
from rlhf_jax.optim import (
    OptimConfig,
    current_learning_rate,
    make_optimizer,
    set_learning_rate,
)

__all__ = [
    "LoopConfig",
    "LoopResult",
    "NonFiniteError",
    "RunResult",
    "TrainState",
    "apply_update",
    "hparam_arrays",
    "seeded_state",
    "stack_states",
    "run_loop",
    "run_slice",
]

_NONFINITE = ("stop", "skip")
_DIRECTIONS = ("above", "below")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """When a run stops, evaluates, logs and checkpoints, and what a non-finite loss does."""

    max_steps: int = 1000  # stop after this many steps (batches) in total, resumed ones included
    eval_every: int = 0  # evaluate every N steps (and at the last step); 0 = never
    log_every: int = 1  # send the step metrics to the logger every N steps
    stop_metric: str | None = None  # stop early when this eval metric crosses stop_value
    stop_direction: str = "above"  # "above": stop when metric >= stop_value; "below": <=
    stop_value: float = 0.0  # the threshold of stop_metric
    on_nonfinite: str = "stop"  # "stop": raise NonFiniteError | "skip": keep going, update dropped
    check_finite: tuple[str, ...] = ("loss",)  # step metrics that must be finite (when present)
    max_consecutive_skips: int = 10  # with on_nonfinite="skip": stop after this many in a row
    resume: bool = True  # restore the checkpointer's latest state (and step) before starting

    def __post_init__(self):
        if self.max_steps < 1:
            raise ValueError(f"loop.max_steps={self.max_steps}: must be >= 1")
        if self.eval_every < 0 or self.log_every < 1:
            raise ValueError("loop.eval_every must be >= 0 and loop.log_every >= 1")
        if self.stop_direction not in _DIRECTIONS:
            raise ValueError(
                f"loop.stop_direction={self.stop_direction!r}: choose one of {_DIRECTIONS}"
            )
        if self.stop_metric is not None and self.eval_every == 0:
            raise ValueError(
                f"loop.stop_metric={self.stop_metric!r} needs evaluations: set loop.eval_every > 0"
            )
        if self.on_nonfinite not in _NONFINITE:
            raise ValueError(f"loop.on_nonfinite={self.on_nonfinite!r}: choose one of {_NONFINITE}")
        if self.max_consecutive_skips < 1:
            raise ValueError("loop.max_consecutive_skips must be >= 1")
        if isinstance(self.check_finite, str):
            raise ValueError("loop.check_finite is a list of metric names, e.g. ['loss']")


@flax.struct.dataclass
class TrainState:
    """The state of a gradient trainer (SFT, reward model): an immutable pytree.

    ``params`` are the trainable parameters (an ``nnx.State`` or any pytree), ``opt_state`` the
    optax state (the peak learning rate lives in it, see :mod:`rlhf_jax.optim`), ``step`` an int32
    scalar counting the steps taken (skipped updates included: a batch was consumed).
    """

    params: Any
    opt_state: Any
    step: jax.Array

    @classmethod
    def create(cls, params: Any, optim: OptimConfig) -> TrainState:
        """A fresh state: a copy of ``params`` (the caller's pytree is never donated) and a new
        optimizer state from :func:`rlhf_jax.optim.make_optimizer`."""
        params = jax.tree.map(jnp.array, params)
        return cls(params=params, opt_state=make_optimizer(optim).init(params), step=jnp.int32(0))


def seeded_state(cls: type, params: Any, optim: OptimConfig, hparams: Any, **fields: Any) -> Any:
    """A fresh state of an on-policy trainer (PPO, GRPO, DPO): ``cls(params, opt_state, step,
    key, hparams, **fields)``.

    ``params`` are copied (the state is donated; the caller's pytree is never aliased), the
    optimizer state is new at ``hparams.learning_rate`` (:func:`rlhf_jax.optim.set_learning_rate`,
    traceable, so a ``jax.vmap`` over stacked hparams builds N runs' states), the key is
    ``PRNGKey(hparams.seed)``, and every leaf gets its own buffer (the learning rate in the
    optimizer state would otherwise alias ``hparams``' array).
    """
    params = jax.tree.map(jnp.array, params)
    opt_state = set_learning_rate(make_optimizer(optim).init(params), hparams.learning_rate)
    state = cls(
        params=params,
        opt_state=opt_state,
        step=jnp.zeros((), jnp.int32),
        key=jax.random.PRNGKey(hparams.seed),
        hparams=hparams,
        **fields,
    )
    return jax.tree.map(lambda x: jnp.array(x, copy=True), state)


def hparam_arrays(cls: type, values: Mapping[str, Any], overrides: Mapping[str, Any], what: str):
    """``cls(**values)`` as scalar arrays (float32; ``seed`` int32), ``overrides`` replacing
    single fields: the ``from_config`` of every trainer's ``HParams`` (PPO, GRPO, DPO)."""
    unknown = set(overrides) - set(values)
    if unknown:
        raise ValueError(
            f"unknown {what} hyperparameters {sorted(unknown)}; known: {sorted(values)}"
        )
    values = {**values, **overrides}
    out = {k: jnp.asarray(v, jnp.float32) for k, v in values.items() if k != "seed"}
    return cls(seed=jnp.asarray(values["seed"], jnp.int32), **out)


def stack_states(states: Sequence[Any]) -> Any:
    """Stack run states (any pytrees of one structure) on a new leading run axis, for
    ``jax.vmap`` of a step over runs."""
    return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *states)


def prompt_step(iterate: Callable, frozen: Any) -> Callable:
    """``step(state, batch, key) -> (state, metrics)`` for :func:`run_loop`, over an on-policy
    iteration ``iterate(state, frozen, prompts, prompt_mask, prompt_index)`` (PPO, GRPO).

    ``batch`` has ``prompt_tokens`` [B, P], ``prompt_mask`` [B, P] and optionally
    ``prompt_index`` [B]. ``key`` is unused: the iteration draws its randomness from the state's
    seed and step, which keeps runs vmappable over seeds and exactly resumable."""

    def step(state, batch, key):
        del key
        return iterate(
            state, frozen, batch["prompt_tokens"], batch["prompt_mask"], batch.get("prompt_index")
        )

    return step


class NonFiniteError(UserError, FloatingPointError):
    """A step produced a non-finite loss or metric and the loop was told to stop.

    ``state`` is the state after that step, whose parameters are those of the step before
    (:func:`apply_update` dropped the update); ``step`` is the 1-based step that failed and
    ``metric`` the metric's name.
    """

    def __init__(self, message: str, *, step: int, metric: str, state: Any = None):
        super().__init__(message)
        self.step = step
        self.metric = metric
        self.state = state


@dataclasses.dataclass
class LoopResult:
    """What :func:`run_loop` returns.

    ``history`` holds one record per logged step (``{"step": s, **metrics}``) and ``evals`` one per
    evaluation (``{"step": s, **eval_metrics}``), as Python floats. ``timings`` sums the seconds of
    each phase (``data``, ``step``, ``eval``, ``checkpoint``, ``log``); ``first_step_s`` is the
    first call of the step (compilation included).
    """

    state: Any
    step: int
    stop_reason: str  # "max_steps" | "threshold" | "preempted" | "skips" (see run_loop)
    history: list[dict[str, float]]
    evals: list[dict[str, float]]
    timings: dict[str, float]
    first_step_s: float | None
    skipped: int
    start_step: int
    runs: list[RunResult] | None = None  # each run of a run axis (run_loop(runs=N)), else None


# ------------------------------------------------------------------------------------------
# The guarded update (inside a compiled step)
# ------------------------------------------------------------------------------------------


def apply_update(
    optimizer: optax.GradientTransformation,
    state: TrainState,
    grads: Any,
    loss: jax.Array,
    optim_cfg: Any = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update of ``state``, dropped when ``loss`` or ``grads`` are not finite.

    Call it inside the compiled step. When ``loss`` or the global gradient norm is NaN/inf the
    returned state keeps the old ``params`` and ``opt_state`` (a ``lax.cond`` skips the update, so
    the bad values never touch the parameters or the Adam moments) and only ``step`` advances.

    Args:
      optimizer: the optax transformation (from :func:`rlhf_jax.optim.make_optimizer`).
      state: the current state.
      grads: gradients with the structure of ``state.params``.
      loss: scalar loss of this step.
      optim_cfg: the :class:`rlhf_jax.optim.OptimConfig`, to report the scheduled learning rate
        (``lr``); None reports the peak learning rate held in the optimizer state.

    Returns:
      ``(new_state, metrics)`` with metrics ``grad_norm`` (before clipping), ``lr`` (the rate this
      update used) and ``skipped`` (1.0 when the update was dropped).
    """
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if optim_cfg is not None:
        lr = current_learning_rate(optim_cfg, state.opt_state)
    else:
        lr = jnp.asarray(state.opt_state.hyperparams["learning_rate"])

    def step(operands):
        params, opt_state, grads = operands
        updates, new_opt = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_opt

    def skip(operands):
        params, opt_state, _ = operands
        return params, opt_state

    # A branch, not a select of both results: the update is not computed when it is dropped, and
    # a kept one is written once (under vmap the branch becomes a select of both, as before).
    new_params, new_opt = jax.lax.cond(ok, step, skip, (state.params, state.opt_state, grads))
    new_state = state.replace(params=new_params, opt_state=new_opt, step=state.step + 1)
    metrics = {
        "grad_norm": grad_norm,
        "lr": jnp.asarray(lr, jnp.float32),
        "skipped": 1.0 - ok.astype(jnp.float32),
    }
    return new_state, metrics


def epoch_updates(
    optim_cfg: OptimConfig,
    train: TrainState,
    exp: Any,
    objective: Callable[..., Any],
    counts: Callable[[Any], jax.Array],
    *,
    num_epochs: int,
    num_minibatches: int,
    perm_key: jax.Array,
    ok: jax.Array,
    mesh: jax.sharding.Mesh | None = None,
    mode: str = "jit",
) -> tuple[TrainState, dict[str, jax.Array]]:
    """The on-policy learn phase (PPO, GRPO): E epochs x M minibatches, one guarded optimizer
    update per minibatch, ``lax.scan`` over both.

    Epoch ``e`` permutes the ``N`` rows of ``exp`` (a pytree of ``[N, ...]`` arrays) with
    ``fold_in(perm_key, e)`` (no permutation when ``M = 1``: the summed loss does not depend on
    the order) and cuts them into ``M`` equal minibatches. Each minibatch's gradient is
    accumulated exactly over ``optim_cfg.grad_accum_steps`` microbatches by
    :func:`rlhf_jax.parallel.accumulate` on ``mesh`` in its ``mode`` (``'jit'``, or
    ``'shard_map'``: each device its own rows, in ``grad_accum_steps`` microbatches, then one
    ``pmean``), every loss divided by its *whole-minibatch* denominators
    ``counts(minibatch, pieces)`` (a scalar or ``[C]``, broadcast over the rows and handed to the
    objective with each microbatch: the objective reads it from any row). ``pieces`` is the
    number of equal, contiguous row blocks the loss is computed on (``grad_accum_steps``, times
    the devices of ``('data', 'fsdp')`` in the ``shard_map`` form), for aggregations whose count
    is per call (``bnpo``).

    The objective returns its microbatch's share of the minibatch loss; the loss handed to
    ``accumulate`` is that share times the minibatch's rows, with the microbatch's rows as its
    count, so the one division by the summed count (per device and after the ``pmean`` alike)
    gives the minibatch loss's gradient exactly, however the rows are split.

    Args:
      objective: ``objective(params, (microbatch, counts)) -> (share, (token_sums,
        update_values))``: ``share`` is the microbatch's part of the minibatch loss (its loss
        sums divided by the whole-minibatch ``counts``), ``token_sums`` maps a metric name to
        ``(sum, count)`` (reported as the sum over all updates divided by the count over all
        updates), ``update_values`` maps a name to its share of this update's value (summed over
        microbatches, reported as the mean over updates) and must hold ``"loss"``, the update's
        loss.
      ok: scalar bool, the experience is finite; when false every update is dropped.
      mesh, mode: where and in which form the gradient is taken
        (:func:`rlhf_jax.parallel.accumulate`; ``mesh=None`` is the one-device form).

    Returns:
      the new train state and the metrics: every name of both kinds, ``grad_norm`` (mean over
      updates), ``lr`` and ``skipped`` (1 if any update was dropped or ``ok`` is false).
    """
    n_rows = jax.tree.leaves(exp)[0].shape[0]
    m, micro = num_minibatches, optim_cfg.grad_accum_steps
    if n_rows % m or (n_rows // m) % micro:
        raise ValueError(
            f"rollout batch N = B * n = {n_rows} must split into num_minibatches={m} "
            f"minibatches of optim.grad_accum_steps={micro} equal microbatches"
        )
    mb_size = n_rows // m
    optimizer = make_optimizer(optim_cfg)
    one = jnp.float32(1.0)
    if mode != "shard_map":  # XLA places the minibatch after the permutation's gather
        mesh = None
    pieces = micro * (1 if mesh is None else parallel.axis_size(mesh, parallel.BATCH_AXES))
    if mb_size % pieces:
        raise ValueError(
            f"a minibatch of {mb_size} rows does not split into {pieces // micro} devices x "
            f"optim.grad_accum_steps={micro} equal microbatches"
        )

    def loss_fn(params, batch):
        share, aux = objective(params, batch)
        rows = jax.tree.leaves(batch)[0].shape[0]
        return share * mb_size, (jnp.float32(rows), aux)

    def one_update(train, minibatch):
        c = counts(minibatch, pieces)
        c = jnp.broadcast_to(c, (mb_size, *c.shape))  # split with the rows by accumulate
        grads, _, (sums, values) = parallel.accumulate(
            loss_fn, train.params, (minibatch, c), micro, mesh=mesh, mode=mode
        )
        loss = jnp.where(ok, values["loss"], jnp.nan)  # a non-finite batch drops every update
        train, upd = apply_update(optimizer, train, grads, loss, optim_cfg)
        per_update = {name: (v, one) for name, v in values.items()}
        per_update["grad_norm"] = (upd["grad_norm"], one)
        return train, ({**sums, **per_update}, upd["skipped"])

    def one_epoch(train, epoch):
        if m == 1:
            minibatches = jax.tree.map(lambda x: x[None], exp)
        else:
            perm = jax.random.permutation(jax.random.fold_in(perm_key, epoch), n_rows)
            minibatches = jax.tree.map(lambda x: x[perm.reshape(m, mb_size)], exp)
        return jax.lax.scan(one_update, train, minibatches)

    # per-update (sum, count) of every metric, stacked [E, M]; the report is sum / count
    train, (sums, skipped) = jax.lax.scan(one_epoch, train, jnp.arange(num_epochs))
    metrics = {
        name: jnp.sum(total) / jnp.maximum(jnp.sum(count), 1.0)
        for name, (total, count) in sums.items()
    }
    metrics["skipped"] = jnp.maximum(jnp.max(skipped), 1.0 - ok.astype(jnp.float32))
    metrics["lr"] = current_learning_rate(optim_cfg, train.opt_state)
    return train, metrics


# ------------------------------------------------------------------------------------------
# The host loop
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunResult:
    """One run of a run axis (:func:`run_loop` with ``runs=N``): where and why it stopped.

    ``step`` is the last step the run took (a run stopped early keeps its state from then on);
    ``history``/``evals`` as in :class:`LoopResult`, for this run alone.
    """

    step: int
    stop_reason: str  # "max_steps" | "threshold" | "skips" | "nonfinite" | "preempted"
    history: list[dict[str, float]]
    evals: list[dict[str, float]]
    skipped: int


def _to_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    host = jax.device_get(dict(metrics))
    return {str(k): float(jnp.asarray(v).reshape(())) for k, v in host.items()}


def _to_run_floats(metrics: Mapping[str, Any], n: int) -> list[dict[str, float]]:
    """Metrics ``[N]`` of a run axis as one dict of floats per run (one transfer)."""
    host = jax.device_get(dict(metrics))
    out: list[dict[str, float]] = [{} for _ in range(n)]
    for k, v in host.items():
        values = jnp.asarray(v).reshape(n)
        for i in range(n):
            out[i][str(k)] = float(values[i])
    return out


def run_slice(state: Any, k: int) -> Any:
    """Run ``k`` of a state stacked on a leading run axis."""
    return jax.tree.map(lambda x: x[k], state)


@functools.partial(jax.jit, donate_argnums=0)
def _keep_stopped(state: Any, kept: Any, active: jax.Array) -> Any:
    """``state`` where ``active``, else ``kept``, per run (leading axis): a stopped run keeps its
    state while the compiled step goes on computing all N runs (no recompilation)."""

    def pick(x, y):
        return jnp.where(active.reshape((-1,) + (1,) * (x.ndim - 1)), x, y)

    return jax.tree.map(pick, state, kept)


def _crossed(value: float, cfg: LoopConfig) -> bool:
    if not math.isfinite(value):
        return False
    if cfg.stop_direction == "above":
        return value >= cfg.stop_value
    return value <= cfg.stop_value


def _batch_source(batches: Callable[[int], Any] | Iterable[Any], start: int):
    """``get(step)`` for a callable source; for an iterable, skip the ``start`` consumed items."""
    if callable(batches) and not hasattr(batches, "__next__"):
        return batches
    it = iter(batches)
    for _ in range(start):
        next(it)
    return lambda _step: next(it)


def run_loop(
    step: Callable[[Any, Any, jax.Array], tuple[Any, Mapping[str, jax.Array]]],
    state: Any,
    batches: Callable[[int], Any] | Iterable[Any],
    *,
    loop: LoopConfig,
    key: jax.Array | None = None,
    eval_fn: Callable[[Any], Mapping[str, Any]] | Sequence[Callable] | None = None,
    logger: Any = None,
    checkpointer: Any = None,
    meta: Mapping[str, Any] | None = None,
    runs: int | None = None,
) -> LoopResult:
    """Run ``step`` until ``loop.max_steps``, a threshold, preemption or a non-finite loss.

    Args:
      step: the compiled step ``step(state, batch, key) -> (state, metrics)``; it may donate
        ``state``. Metrics are scalars; ``skipped`` (from :func:`apply_update`) is counted.
      state: the initial state (ignored in favour of the checkpointer's latest when resuming).
      batches: ``batches(s) -> batch`` for the 0-based step index ``s`` (deterministic, so resume
        is exact), or an iterable of batches (on resume its first ``s`` items are skipped).
      loop: the :class:`LoopConfig`.
      key: base PRNG key; step ``s`` gets ``jax.random.fold_in(key, s)``. Default ``PRNGKey(0)``.
      eval_fn: ``eval_fn(state) -> metrics`` (scalars), run every ``loop.eval_every`` steps and
        after the last step; its metrics are logged with an ``eval/`` prefix.
      logger: a :class:`rlhf_jax.logging.RunLogger` (``log(step, metrics, timings)``,
        ``write(message)``) or None.
      checkpointer: a :class:`rlhf_jax.checkpoint.Checkpointer` (``save``, ``restore_latest``,
        ``preempted``, ``wait``) or None. Saved as ``save(step, state, meta)`` after each step (it
        decides by its ``save_every``) and forced at the end.
      meta: extra JSON-able values saved with every checkpoint (e.g. the config).
      runs: ``N`` for a **run axis** (a sweep, :mod:`rlhf_jax.sweep`): ``state`` is N run states
        stacked on a leading axis, ``step`` computes all N in one program and returns metrics
        ``[N]``; ``eval_fn`` and ``logger`` are sequences of N (one per run; ``eval_fn[k]`` gets
        run ``k``'s slice of the state). Each run stops on its own (threshold, skips, a
        non-finite loss: that run alone, with ``stop_reason="nonfinite"``): a stopped run is
        masked, keeping its state and logging nothing more, while the others go on, without a
        recompilation. The mask is saved in the checkpoint meta, so a resume is exact.

    Returns:
      A :class:`LoopResult`. ``stop_reason`` is ``"max_steps"``, ``"threshold"`` (the eval metric
      crossed ``loop.stop_value``), ``"preempted"`` (SIGTERM: saved, and returned) or ``"skips"``
      (``loop.max_consecutive_skips`` non-finite steps in a row with ``on_nonfinite="skip"``).
      With ``runs``: ``"preempted"``, ``"max_steps"`` (some run reached it) or ``"stopped"``
      (every run stopped early), and ``LoopResult.runs`` holds each run's :class:`RunResult`.

    Raises:
      NonFiniteError: with ``on_nonfinite="stop"`` (and no run axis), at the first step whose
        metric named in ``loop.check_finite`` is NaN or infinite; the message names the step and
        the metric.
    """
    key = jax.random.PRNGKey(0) if key is None else key
    n = 1 if runs is None else int(runs)
    evals_fns = [eval_fn] if runs is None else list(eval_fn or [None] * n)
    loggers = [logger] if runs is None else list(logger or [None] * n)
    if len(evals_fns) != n or len(loggers) != n:
        raise ValueError(f"run_loop(runs={n}) takes one eval_fn and one logger per run")
    timings = {"data": 0.0, "step": 0.0, "eval": 0.0, "checkpoint": 0.0, "log": 0.0}
    start = 0
    active = np.ones(n, bool)
    reasons: list[str | None] = [None] * n
    last = [0] * n
    if checkpointer is not None and loop.resume:
        from rlhf_jax.checkpoint import abstract_like

        restored = checkpointer.restore_latest(abstract_like(state))
        if restored is not None:
            start, state, saved_meta = restored
            start = int(start)
            last = [start] * n
            axis = (saved_meta or {}).get("runs")
            if runs is not None and axis:
                active = np.asarray(axis["active"], bool)
                reasons = list(axis["stop_reason"])
                last = [int(x) for x in axis["steps"]]
            for lg in loggers:
                if lg is not None and hasattr(lg, "truncate_to"):
                    lg.truncate_to(start)  # the step restored (a damaged newer one may lower it)
                _write(lg, f"resumed from the checkpoint of step {start}")
    kept = None  # a copy of the stacked state holding the stopped runs (made at the first stop)
    if runs is not None and not active.all():
        kept = jax.tree.map(jnp.copy, state)
    get_batch = _batch_source(batches, start)
    history: list[list[dict[str, float]]] = [[] for _ in range(n)]
    evals: list[list[dict[str, float]]] = [[] for _ in range(n)]
    first_step_s = None
    skipped, consecutive = [0] * n, [0] * n
    preempted = False
    s = start
    while s < loop.max_steps and active.any():
        phase = {k: 0.0 for k in timings}
        t0 = time.perf_counter()
        batch = get_batch(s)
        t1 = time.perf_counter()
        state, metrics = step(state, batch, jax.random.fold_in(key, s))
        if kept is not None:
            state = _keep_stopped(state, kept, jnp.asarray(active))
        per_run = [_to_floats(metrics)] if runs is None else _to_run_floats(metrics, n)
        t2 = time.perf_counter()  # the transfer above blocks until the step is done
        phase["data"], phase["step"] = t1 - t0, t2 - t1
        if first_step_s is None:
            first_step_s = t2 - t1
        s += 1
        was_active = active.copy()
        for k in np.flatnonzero(was_active):
            values = per_run[k]
            last[k] = s
            lg = loggers[k]
            who = "" if runs is None else f"run {k}: "
            bad = [m for m in loop.check_finite if m in values and not math.isfinite(values[m])]
            if values.get("skipped", 0.0) > 0 or bad:
                skipped[k] += 1
                consecutive[k] += 1
            else:
                consecutive[k] = 0
            if bad and loop.on_nonfinite == "stop":
                message = (
                    f"{who}non-finite {bad[0]}={values[bad[0]]} at step {s}: stopping "
                    f"(loop.on_nonfinite='stop'; the update of step {s} was not applied). Lower "
                    "the learning rate, check the data of this step, or set "
                    "loop.on_nonfinite='skip'."
                )
                _write(lg, message)
                if runs is None:
                    raise NonFiniteError(message, step=s, metric=bad[0], state=state)
                reasons[k], active[k] = "nonfinite", False

            eval_values: dict[str, float] = {}
            fn = evals_fns[k]
            if (
                fn is not None
                and loop.eval_every
                and (s % loop.eval_every == 0 or s == loop.max_steps)
            ):
                t3 = time.perf_counter()
                eval_values = _to_floats(fn(state if runs is None else run_slice(state, k)))
                phase["eval"] += time.perf_counter() - t3
                evals[k].append({"step": float(s), **eval_values})

            if loop.log_every and (s % loop.log_every == 0 or s == loop.max_steps or eval_values):
                history[k].append({"step": float(s), **values})
                if lg is not None:
                    t4 = time.perf_counter()
                    record = dict(values)
                    record.update({f"eval/{m}": v for m, v in eval_values.items()})
                    lg.log(s, record, timings={p: v for p, v in phase.items() if v})
                    phase["log"] += time.perf_counter() - t4

            if loop.stop_metric is not None and loop.stop_metric in eval_values:
                if _crossed(eval_values[loop.stop_metric], loop):
                    reasons[k], active[k] = "threshold", False
                    _write(
                        lg,
                        f"{who}eval {loop.stop_metric}={eval_values[loop.stop_metric]:.6g} "
                        f"crossed {loop.stop_direction} {loop.stop_value} at step {s}: stopping",
                    )
            if loop.on_nonfinite == "skip" and consecutive[k] >= loop.max_consecutive_skips:
                reasons[k], active[k] = "skips", False
                _write(
                    lg,
                    f"{who}{consecutive[k]} non-finite steps in a row (the last at step {s}): "
                    "stopping (loop.max_consecutive_skips)",
                )
        for p, v in phase.items():
            timings[p] += v
        if runs is not None and (active != was_active).any():  # keep the newly stopped runs
            if kept is None:
                kept = jax.tree.map(jnp.copy, state)
            else:
                kept = _keep_stopped(kept, state, jnp.asarray(~(was_active & ~active)))
        preempted = checkpointer is not None and bool(getattr(checkpointer, "preempted", False))
        if checkpointer is not None:
            t5 = time.perf_counter()
            done = preempted or not active.any() or s >= loop.max_steps
            record = {"step": s, **(meta or {})}
            if runs is not None:
                axis_meta = {"active": active.tolist(), "stop_reason": reasons, "steps": last}
                record["runs"] = axis_meta
            checkpointer.save(s, state, record, force=done)
            timings["checkpoint"] += time.perf_counter() - t5
        if preempted:
            break
    if checkpointer is not None:
        checkpointer.wait()
    for k in range(n):
        if reasons[k] is None:
            reasons[k] = "preempted" if preempted else "max_steps"
    if preempted:
        stop_reason = "preempted"
    elif runs is None:
        stop_reason = reasons[0]
    else:
        stop_reason = "max_steps" if "max_steps" in reasons else "stopped"
    run_results = None
    if runs is not None:
        run_results = [
            RunResult(last[k], reasons[k], history[k], evals[k], skipped[k]) for k in range(n)
        ]
    return LoopResult(
        state=state,
        step=s,
        stop_reason=stop_reason,
        history=history[0],
        evals=evals[0],
        timings=timings,
        first_step_s=first_step_s,
        skipped=sum(skipped),
        start_step=start,
        runs=run_results,
    )


def _write(logger: Any, message: str) -> None:
    if logger is not None and hasattr(logger, "write"):
        logger.write(message)
    else:
        print(message)

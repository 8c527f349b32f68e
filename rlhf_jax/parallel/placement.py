"""Placement of batches and of a trainer's compiled step on a mesh (one process or many).

- **Batches**: every leaf's leading (row) axis is split over ``('data', 'fsdp')``
  (:func:`batch_spec`), its other axes replicated. :func:`shard_batch` builds global arrays from
  each process's *local* rows with ``jax.make_array_from_process_local_data``;
  :func:`process_rows` says which rows of a global host batch are this process's, and
  :func:`shard_batches` wraps a run-loop batch source so that its batches come out placed.
  Inside a step, :func:`constrain_batch` keeps arrays the step creates with the batch.
- **The data-parallel gradient**: :func:`accumulate` is :func:`rlhf_jax.optim.accumulate` over a
  mesh, in two forms that give the same numbers: ``'jit'``, one ``jax.jit`` over sharded arrays
  where XLA inserts the collectives for the parameters' layout, and ``'shard_map'``, the
  per-device, pmap-style form (gradient sums of each device's rows, one explicit ``lax.pmean``
  of gradient sums, counts and metric sums; parameters replicated, preset ``dp``). Both follow
  the loss contract ``loss_fn(params, batch) -> (loss_sum, (count, metric_sums))``.
- **The compiled step**: :func:`jit_step` jits a trainer's ``step(state, *args)`` with the state
  in and out on its rule shardings (:func:`rlhf_jax.parallel.sharding.state_shardings`), donated,
  so every step reuses one executable.

Each trainer's ``run(..., mesh=, parallel_cfg=)`` (``rlhf_jax.algorithms``) places its state by
the rules, compiles its step once with :func:`jit_step`, computes gradients with
:func:`accumulate` (``ParallelConfig.step`` picks the form) and places each batch with
:func:`shard_batches`; :func:`mesh_and_config` gives its defaults.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rlhf_jax.optim import accumulate as accumulate_local
from rlhf_jax.parallel.mesh import BATCH_AXES, STEP_MODES, ParallelConfig, axis_size, make_mesh

__all__ = [
    "LossFn",
    "accumulate",
    "batch_sharding",
    "batch_shardings",
    "batch_spec",
    "constrain_batch",
    "jit_step",
    "mesh_and_config",
    "process_rows",
    "replicated",
    "shard_batch",
    "shard_batches",
]

# loss_fn(params, batch) -> (loss_sum, (count, metric_sums)), as rlhf_jax.optim.accumulate takes
LossFn = Callable[[Any, Any], tuple[jax.Array, tuple[jax.Array, Any]]]

# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def batch_spec(ndim: int = 1) -> P:
    """The spec of a batch array: leading axis over ``('data', 'fsdp')``, the rest replicated."""
    return P(BATCH_AXES, *([None] * (ndim - 1))) if ndim else P()


def batch_shardings(batch: Any, mesh: jax.sharding.Mesh) -> Any:
    """``NamedSharding`` per batch leaf (scalars replicated)."""
    return jax.tree.map(lambda x: NamedSharding(mesh, batch_spec(np.ndim(x))), batch)


def shard_batch(batch: Any, mesh: jax.sharding.Mesh) -> Any:
    """Global arrays from each process's *local* rows of a host batch (numpy or arrays).

    On one process the local batch is the global batch. On several, process ``i`` passes only its
    rows (the global batch is the concatenation in process order) and
    ``jax.make_array_from_process_local_data`` assembles the global array without a transfer
    between hosts. Scalars are replicated and must be equal on every process.
    """
    n = axis_size(mesh, BATCH_AXES)

    def one(x):
        x = np.asarray(x)
        sharding = NamedSharding(mesh, batch_spec(x.ndim))
        if x.ndim == 0:
            return jax.make_array_from_process_local_data(sharding, x, x.shape)
        global_rows = x.shape[0] * jax.process_count()
        if global_rows % n:
            raise ValueError(
                f"global batch of {global_rows} rows is not divisible by data x fsdp = {n}; "
                "change the batch size or the mesh"
            )
        return jax.make_array_from_process_local_data(sharding, x, (global_rows, *x.shape[1:]))

    return jax.tree.map(one, batch)


def constrain_batch(batch: Any, mesh: jax.sharding.Mesh) -> Any:
    """Inside a jitted step: hint that every leaf of ``batch`` stays split over ``BATCH_AXES``.

    ``jax.lax.with_sharding_constraint`` with :func:`batch_spec`; use it on arrays a step creates
    (rollout tokens, advantages) so XLA keeps them with the batch instead of replicating them.
    """
    return jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, batch_spec(x.ndim))),
        batch,
    )


# --------------------------------------------------------------------------------------------
# Trainers on a mesh: placed state, placed batches, one compiled step
# --------------------------------------------------------------------------------------------


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    """``NamedSharding(mesh, P())``: the same value on every device (scalars, keys, metrics)."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """One sharding for a whole batch pytree (a jit prefix): every leaf's leading axis over
    ``('data', 'fsdp')``, its other axes replicated. Leaves must have a leading (row) axis."""
    return NamedSharding(mesh, P(BATCH_AXES))


def process_rows(num_rows: int) -> slice:
    """The rows of a global host batch of ``num_rows`` that this process feeds to
    :func:`shard_batch` (contiguous blocks in process order; all rows on one process)."""
    count, index = jax.process_count(), jax.process_index()
    if num_rows % count:
        raise ValueError(
            f"a global batch of {num_rows} rows does not split over {count} processes; "
            "change the batch size"
        )
    per = num_rows // count
    return slice(index * per, (index + 1) * per)


def shard_batches(batches: Any, mesh: jax.sharding.Mesh) -> Any:
    """A batch source (``batches(s)`` or an iterable, as :func:`rlhf_jax.train.run_loop` takes)
    whose batches come out placed by :func:`shard_batch`. Each process's source yields only its
    own rows (see :func:`process_rows`); already-placed global arrays pass through."""

    def placed(x) -> bool:
        want = NamedSharding(mesh, batch_spec(np.ndim(x)))
        return isinstance(x, jax.Array) and x.sharding.is_equivalent_to(want, x.ndim)

    def place(batch):
        return batch if all(map(placed, jax.tree.leaves(batch))) else shard_batch(batch, mesh)

    if callable(batches) and not hasattr(batches, "__next__"):
        return lambda s: place(batches(s))
    return (place(b) for b in batches)


def accumulate(
    loss_fn: LossFn,
    params: Any,
    batch: Any,
    num_micro: int = 1,
    *,
    mesh: jax.sharding.Mesh | None = None,
    mode: str = "jit",
) -> tuple[Any, jax.Array, Any]:
    """:func:`rlhf_jax.optim.accumulate` over a mesh: ``(grads, count, metric_sums)`` of the
    *global* batch, the same numbers in both forms and without a mesh.

    - ``mesh=None``: ``optim.accumulate`` as it is.
    - ``mode='jit'``: the batch is constrained to ``('data', 'fsdp')`` (:func:`constrain_batch`)
      and XLA inserts the collectives for the parameters' layout.
    - ``mode='shard_map'`` (pmap style; parameters replicated, preset ``dp``): each device takes
      the gradient *sum* of its own rows (split into ``num_micro`` microbatches), then one
      ``lax.pmean`` over ``('data', 'fsdp')`` of gradient sums, counts and metric sums; the
      caller's division by the global count happens once, here (the 1/N of each mean cancels).

    Call it inside the trainer's jitted step, in place of ``optim.accumulate``.
    """
    if mode not in STEP_MODES:
        raise ValueError(f"mode={mode!r}: choose one of {STEP_MODES}")
    if mesh is None:
        return accumulate_local(loss_fn, params, batch, num_micro)
    if mode == "jit":
        return accumulate_local(loss_fn, params, constrain_batch(batch, mesh), num_micro)
    n = axis_size(mesh, BATCH_AXES)

    def per_device(params, batch):
        # The replicated params enter as device-varying copies, so the gradient is this device's
        # own (pmap semantics): differentiating the invariant params would make shard_map insert
        # a psum in the transpose, which the pmean below would count twice. Summed over its rows
        # (accumulate's mean times its clamped count).
        local = jax.lax.pcast(params, BATCH_AXES, to="varying")
        grads, count, sums = accumulate_local(loss_fn, local, batch, num_micro, BATCH_AXES)
        count = jnp.asarray(count, jnp.float32)
        scale = jnp.maximum(count, 1.0)
        grad_sums = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
        return jax.lax.pmean((grad_sums, count, sums), BATCH_AXES)

    in_specs = (P(), jax.tree.map(lambda x: batch_spec(np.ndim(x)), batch))
    sharded = jax.shard_map(per_device, mesh=mesh, in_specs=in_specs, out_specs=P())
    grad_means, count_mean, sum_means = sharded(params, batch)
    count = count_mean * n
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g * (n / denom).astype(g.dtype), grad_means)
    return grads, count, jax.tree.map(lambda v: v * n, sum_means)


def jit_step(
    step: Callable,
    mesh: jax.sharding.Mesh | None = None,
    state_shardings: Any = None,
    *,
    arg_shardings: Sequence[Any] | None = None,
    donate: bool = True,
) -> Callable:
    """``jax.jit`` of a trainer step ``step(state, *args) -> (state, metrics)`` for ``mesh``.

    Without a mesh: ``jax.jit(step, donate_argnums=0)``. With one: ``in_shardings`` and
    ``out_shardings`` of the state are ``state_shardings`` (``sharding.state_shardings`` of the
    placed state), so the updated state comes back in the layout it went in and the next step
    reuses the same executable (no re-layout of replicated leaves, no recompilation); metrics
    are replicated. ``arg_shardings`` places the other arguments (default
    ``(batch_sharding(mesh), replicated(mesh))`` for the ``(batch, key)`` of the SFT and
    reward-model steps). The state is donated. The state passed in must already be placed on
    ``state_shardings`` (jit refuses a committed array in another layout): use
    :func:`rlhf_jax.parallel.sharding.shard_state` once before the first step.
    """
    donate_argnums = (0,) if donate else ()
    if mesh is None:
        return jax.jit(step, donate_argnums=donate_argnums)
    if arg_shardings is None:
        arg_shardings = (batch_sharding(mesh), replicated(mesh))
    return jax.jit(
        step,
        in_shardings=(state_shardings, *arg_shardings),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=donate_argnums,
    )


def mesh_and_config(
    mesh: jax.sharding.Mesh | None, cfg: ParallelConfig | None
) -> tuple[jax.sharding.Mesh | None, ParallelConfig]:
    """What a trainer's ``run(..., mesh=, parallel=)`` runs on: ``mesh`` (built from
    ``cfg.mesh`` when only ``cfg`` is given; None, the plain one-device path, when neither is)
    and the config that names the rules and the step form (default ``ParallelConfig()``)."""
    if mesh is None and cfg is not None:
        mesh = make_mesh(cfg.mesh)
    return mesh, cfg or ParallelConfig()

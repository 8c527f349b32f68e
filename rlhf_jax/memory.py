"""Memory before running: compile a train step from abstract shapes and read its per-device memory.

:func:`dry_run` compiles the SFT trainer's own step (:func:`rlhf_jax.algorithms.sft.make_step`, on
the mesh, rules and step form of a :class:`rlhf_jax.parallel.ParallelConfig`) from abstract shapes
only: the parameters come from ``jax.eval_shape`` of the model init (:func:`abstract_model`), no
weight is allocated, and ``jit(...).lower(...).compile().memory_analysis()`` gives the bytes per
device (:class:`MemoryReport`). :func:`compile_memory` measures any other jitted step the same way
(PPO's iteration, say). An 8B model's step compiles on a laptop's fake CPU devices. See
``docs/scaling.md``.

``runs=N`` measures a sweep's program instead (:mod:`rlhf_jax.sweep`): N stacked states (each leaf
``[N, ...]``, placed as the sweep places them, the run axis unsharded or split over
``shard_runs``), N stacked batches, and ``jax.jit(jax.vmap(step))`` of the step compiled without a
mesh, as :func:`rlhf_jax.sweep.run_sweep` compiles it. PPO's frozen models are shared by the runs
(not stacked), as in the sweep.

This module sits above :mod:`rlhf_jax.algorithms` (it compiles their steps); nothing in
:mod:`rlhf_jax.parallel` or :mod:`rlhf_jax.algorithms` imports it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from rlhf_jax.parallel.mesh import BATCH_AXES, ParallelConfig, axis_size, make_mesh
from rlhf_jax.parallel.placement import batch_shardings
from rlhf_jax.parallel.sharding import Rules, state_shardings

__all__ = [
    "MemoryReport",
    "abstract_model",
    "compile_memory",
    "dry_run",
    "format_memory_table",
    "ppo_dry_run",
]


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Per-device memory of one compiled step, in bytes (``compiled.memory_analysis()``)."""

    name: str  # what was compiled (model, mesh, preset)
    arguments: int  # inputs resident on the device: parameter, optimizer-state and batch shards
    outputs: int  # outputs (updated state, metrics)
    aliased: int  # outputs written over donated inputs (counted once, in arguments)
    temps: int  # XLA temporaries: activations kept for the backward pass, gradients, buffers
    generated_code: int  # the compiled program itself
    num_params: int  # parameters of the model (all devices together)

    @property
    def total(self) -> int:
        """Estimated peak per device: arguments + outputs - aliased + temps + code."""
        return self.arguments + self.outputs - self.aliased + self.temps + self.generated_code

    @classmethod
    def from_compiled(cls, compiled, name: str = "", num_params: int = 0) -> MemoryReport:
        """Read ``compiled.memory_analysis()`` (a ``jax.stages.Compiled``)."""
        m = compiled.memory_analysis()
        if m is None:
            raise RuntimeError(f"{name}: this backend gives no memory analysis")
        return cls(
            name=name,
            arguments=int(m.argument_size_in_bytes),
            outputs=int(m.output_size_in_bytes),
            aliased=int(m.alias_size_in_bytes),
            temps=int(m.temp_size_in_bytes),
            generated_code=int(m.generated_code_size_in_bytes),
            num_params=num_params,
        )

    def row(self, unit: str = "GiB") -> str:
        """A Markdown table row in ``unit`` (GiB or MiB; see :func:`format_memory_table`)."""
        scale = 2 ** {"GiB": 30, "MiB": 20}[unit]
        size = lambda b: f"{b / scale:.2f}"  # noqa: E731
        n = self.num_params
        params = f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"
        return (
            f"| {self.name} | {params} | {size(self.arguments)} | "
            f"{size(self.outputs)} | {size(self.aliased)} | {size(self.temps)} | "
            f"{size(self.generated_code)} | {size(self.total)} |"
        )


def format_memory_table(reports: Sequence[MemoryReport]) -> str:
    """A Markdown table of per-device memory for several dry runs: in GiB, or in MiB when every
    total is under 1 GiB (a toy model's step), the unit named in the header."""
    unit = "GiB" if max((r.total for r in reports), default=0) >= 2**30 else "MiB"
    head = (
        f"| step | params | arguments | outputs | aliased | temps | code | total ({unit}) |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    return "\n".join([head, *(r.row(unit) for r in reports)])


def abstract_model(model_config, **heads) -> tuple[Any, Any]:
    """``(graphdef, abstract params)`` of ``rlhf_jax.models.Transformer``: no weight allocated.

    ``heads`` are the Transformer's head switches (``value_head=True``, ``score_head=True``).
    """
    from flax import nnx

    from rlhf_jax import models

    module = nnx.eval_shape(lambda: models.Transformer(model_config, rngs=nnx.Rngs(0), **heads))
    return nnx.split(module, nnx.Param)


def compile_memory(jitted, *abstract_args, name: str = "", num_params: int = 0) -> MemoryReport:
    """Lower and compile ``jitted`` (a ``jax.jit`` object) for abstract arguments; its memory.

    ``abstract_args`` are ``jax.ShapeDtypeStruct`` pytrees (with a ``sharding`` where the jit has
    no ``in_shardings``). Any step can be measured this way: the CLI's, PPO's.
    """
    compiled = jitted.lower(*abstract_args).compile()
    return MemoryReport.from_compiled(compiled, name=name, num_params=num_params)


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def _stacked(tree: Any, runs: int, shardings: Any, mesh, run_axis: str | None) -> Any:
    """Abstract ``tree`` with a leading run axis ``[runs, ...]`` on the sweep's shardings
    (:func:`rlhf_jax.sweep.stacked_shardings`: each leaf's spec after the run axis)."""
    from rlhf_jax.sweep import stacked_shardings

    placed = stacked_shardings(shardings, mesh, run_axis)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct((runs, *x.shape), x.dtype, sharding=s), tree, placed
    )


def _stacked_rows(shape: tuple[int, ...], mesh, run_axis: str | None) -> jax.ShapeDtypeStruct:
    """An abstract ``[runs, rows, ...]`` int32 batch leaf placed as
    :func:`rlhf_jax.sweep.stacked_batches` places it (rows over the other batch axes)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    rows = tuple(a for a in BATCH_AXES if a != run_axis)
    spec = P(run_axis, rows, *([None] * (len(shape) - 2)))
    return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=NamedSharding(mesh, spec))


def _check_runs(runs: int, mesh, run_axis: str | None) -> None:
    if runs < 1:
        raise ValueError(f"dry run: runs={runs}; give at least 1")
    if run_axis is not None and runs % mesh.shape[run_axis]:
        raise ValueError(
            f"dry run: {runs} runs do not split over the {mesh.shape[run_axis]} devices of mesh "
            f"axis {run_axis!r}: change the number of runs or the mesh"
        )


def dry_run(
    model_config,
    cfg: ParallelConfig,
    *,
    batch_size: int,
    seq_len: int,
    optim=None,
    devices: Sequence[jax.Device] | None = None,
    name: str | None = None,
    rules: Rules | None = None,
    runs: int = 1,
    shard_runs: str | None = None,
) -> MemoryReport:
    """Compile the SFT trainer's step for ``cfg``'s mesh and rules; its per-device memory.

    Nothing is allocated: the parameters come from ``jax.eval_shape`` of the model init, the
    train state from ``jax.eval_shape`` of ``sft.init_state``, the batch is ``ShapeDtypeStruct``s;
    the step is the one the trainer runs (``rlhf_jax.algorithms.sft.make_step`` with the mesh and
    the state's rule shardings: token NLL from the full logits, gradient in the ``cfg.step`` form,
    AdamW update, non-finite guard), ``lower(...).compile()``d.

    Args:
      model_config: a ``rlhf_jax.models.ModelConfig``.
      cfg: the mesh, the rule preset and the step form (``'jit'`` or ``'shard_map'``).
      batch_size: global rows per step (divisible by data x fsdp).
      seq_len: tokens per row.
      optim: an ``OptimConfig`` (default AdamW; ``grad_accum_steps`` splits the batch).
      devices: the devices of the mesh (default all).
      name: the row's label (default from the model and the mesh).
      rules: a rule table to use instead of ``cfg.preset``'s (to compare layouts).
      runs: N > 1: a sweep's program of N runs (module docstring): N stacked states and batches,
        the step vmapped over them.
      shard_runs: the mesh axis the run axis is split over (``sweep.shard_runs``), or None.
    """
    from rlhf_jax.algorithms import sft
    from rlhf_jax.optim import OptimConfig

    mesh = make_mesh(cfg.mesh, devices)
    split = axis_size(mesh, BATCH_AXES)
    if batch_size % split:
        raise ValueError(
            f"dry run: batch_size={batch_size} is not divisible by data x fsdp = {split}; "
            "change the batch size or the mesh"
        )
    graphdef, params = abstract_model(model_config)
    sft_cfg = sft.SFTConfig(optim=optim or OptimConfig(name="adamw"), batch_size=batch_size)
    rows = (batch_size, seq_len)
    batch = {k: jnp.zeros(rows, jnp.int32) for k in ("tokens", "attention_mask", "loss_mask")}
    batch = _abstract(jax.eval_shape(lambda: batch), batch_shardings(batch, mesh))
    num = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    if name is None:
        sizes = ",".join(f"{a}={n}" for a, n in mesh.shape.items() if n > 1) or "1 device"
        name = f"{model_config.arch} ({sizes}) {cfg.preset}"
    state = jax.eval_shape(lambda p: sft.init_state(p, sft_cfg), params)
    shardings = state_shardings(state, mesh, rules or cfg.preset)
    key = jax.eval_shape(lambda: jax.random.key(0))
    _check_runs(runs, mesh, shard_runs)
    if runs > 1:  # a sweep's program: N stacked states and batches, the step vmapped (no mesh)
        from rlhf_jax.sweep import vmap_step

        state = _stacked(state, runs, shardings, mesh, shard_runs)
        batch = {k: _stacked_rows((runs, *rows), mesh, shard_runs) for k in batch}
        step = jax.jit(vmap_step(sft.make_step(graphdef, sft_cfg, mode=cfg.step)), donate_argnums=0)
        return compile_memory(step, state, batch, key, name=name, num_params=runs * num)
    state = _abstract(state, shardings)
    step = sft.make_step(graphdef, sft_cfg, mesh=mesh, state_shardings=shardings, mode=cfg.step)
    return compile_memory(step, state, batch, key, name=name, num_params=num)


def ppo_dry_run(
    policy_config,
    cfg: ParallelConfig,
    ppo_cfg,
    *,
    batch_size: int,
    prompt_len: int,
    reward_config=None,
    devices: Sequence[jax.Device] | None = None,
    name: str | None = None,
    runs: int = 1,
    shard_runs: str | None = None,
) -> MemoryReport:
    """Compile PPO's whole iteration for ``cfg``'s mesh and rules; its per-device memory.

    What the iteration holds, all from abstract shapes (nothing allocated): the trainable policy
    and critic with their AdamW moments (:func:`rlhf_jax.algorithms.ppo.init_state`; a separate
    critic is a copy of the reward model, a shared one a value head on the policy), the frozen
    reference and reward model (placed by the same rules), the rollout's KV cache and the update's
    activations (E epochs x M minibatches) — the program :func:`rlhf_jax.algorithms.ppo.make_step`
    runs, ``lower(...).compile()``d.

    Args:
      policy_config: the policy's (and reference's) ``ModelConfig``; its dtypes are the run's.
      cfg: mesh, rules and step form.
      ppo_cfg: the ``PPOConfig`` (response length, samples, epochs, minibatches, critic, optim).
      batch_size: prompts per iteration (global; divisible by data x fsdp).
      prompt_len: the static prompt length P.
      reward_config: the reward model's ``ModelConfig`` (default: the policy's).
      runs: N > 1: a sweep's program of N runs (module docstring): N stacked states (policy,
        critic, their AdamW moments) and prompt batches, one frozen reference and reward model.
      shard_runs: the mesh axis the run axis is split over (``sweep.shard_runs``), or None.
    """
    from rlhf_jax import models
    from rlhf_jax.algorithms import ppo

    mesh = make_mesh(cfg.mesh, devices)
    split = axis_size(mesh, BATCH_AXES)
    if batch_size % split:
        raise ValueError(
            f"dry run: batch_size={batch_size} is not divisible by data x fsdp = {split}; "
            "change the batch size or the mesh"
        )
    reward_config = reward_config or policy_config
    policy = models.Model(*abstract_model(policy_config), config=policy_config)
    rm = models.Model(
        *abstract_model(reward_config, lm_head=False, score_head=True), config=reward_config
    )
    static, params, frozen = ppo.make_models(ppo_cfg, policy, rm)
    state = jax.eval_shape(lambda p: ppo.init_state(ppo_cfg, p), params)
    shardings = state_shardings(state, mesh, cfg.preset)
    frozen_shardings = state_shardings(frozen, mesh, cfg.preset)
    count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))  # noqa: E731
    num = count(params) + count(frozen)
    if name is None:
        sizes = ",".join(f"{a}={n}" for a, n in mesh.shape.items() if n > 1) or "1 device"
        name = f"ppo {policy_config.arch} ({sizes}) {cfg.preset}"
    _check_runs(runs, mesh, shard_runs)
    frozen = _abstract(frozen, frozen_shardings)
    if runs > 1:  # a sweep's program: the iteration vmapped over stacked states and prompts
        state = _stacked(state, runs, shardings, mesh, shard_runs)
        prompts = _stacked_rows((runs, batch_size, prompt_len), mesh, shard_runs)
        iterate = ppo.make_iteration(ppo_cfg, static)  # no mesh, as the sweep compiles it
        step = jax.jit(jax.vmap(iterate, in_axes=(0, None, 0, 0, None)), donate_argnums=0)
        return compile_memory(step, state, frozen, prompts, prompts, None, name=name,
                              num_params=runs * count(params) + count(frozen))  # fmt: skip
    state = _abstract(state, shardings)
    prompts = jax.ShapeDtypeStruct((batch_size, prompt_len), jnp.int32)
    step = ppo.make_iteration(
        ppo_cfg, static, mesh=mesh, state_shardings=shardings, frozen_shardings=frozen_shardings
    )
    with jax.set_mesh(mesh):
        return compile_memory(step.jitted, state, frozen, prompts, prompts, None, name=name,
                              num_params=num)  # fmt: skip

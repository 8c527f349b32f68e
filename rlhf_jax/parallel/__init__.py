"""Scale-out: one compiled step over a named device mesh, with sharding rules as data.

The same jitted step runs on one CPU, 8 fake CPU devices, a GPU node or a multi-host TPU pod. What
changes between them is data, never code:

- :mod:`~rlhf_jax.parallel.mesh`: a **mesh** with the axes ``('data', 'fsdp', 'tensor')`` built
  from a :class:`MeshConfig`, the :class:`ParallelConfig` of a run, and the multi-host start
  (:func:`initialize_distributed`);
- :mod:`~rlhf_jax.parallel.sharding`: a **rule table** per preset (``dp``, ``fsdp``, ``tp``,
  ``fsdp+tp``), parameter path regex -> ``PartitionSpec``, that places parameters, whole train
  states and optimizer states (:func:`state_shardings`);
- :mod:`~rlhf_jax.parallel.placement`: the **batch**, always split over ``('data', 'fsdp')`` on
  its leading axis and assembled from each process's own rows (:func:`shard_batch`,
  :func:`process_rows`, :func:`shard_batches`); the data-parallel gradient in its ``jit`` and
  pmap-style ``shard_map`` forms (:func:`accumulate`); a trainer's step compiled for the mesh
  (:func:`jit_step`).

Every trainer (``rlhf_jax.algorithms``) runs on a mesh through that one path: state placed by the
rules, step compiled once by :func:`jit_step`, gradients by :func:`accumulate`, batches by
:func:`shard_batches`. Memory before running (compile a step from abstract shapes) is
:mod:`rlhf_jax.memory`, which sits above the trainers; nothing here imports it.
"""

from __future__ import annotations

from rlhf_jax.parallel.mesh import (
    AXES,
    BATCH_AXES,
    CLUSTER_ENV,
    PRESETS,
    STEP_MODES,
    DistributedConfig,
    MeshConfig,
    ParallelConfig,
    axis_size,
    initialize_distributed,
    make_mesh,
    mesh_devices,
)
from rlhf_jax.parallel.placement import (
    LossFn,
    accumulate,
    batch_sharding,
    batch_shardings,
    batch_spec,
    constrain_batch,
    jit_step,
    mesh_and_config,
    process_rows,
    replicated,
    shard_batch,
    shard_batches,
)
from rlhf_jax.parallel.sharding import (
    PARAM_LAYOUT,
    PRESET_AXES,
    PRESET_FSDP,
    RULES,
    Rules,
    cache_specs,
    describe,
    fit_spec,
    init_opt_state,
    named,
    opt_state_specs,
    param_shardings,
    param_specs,
    path_str,
    rules_for,
    shard_params,
    shard_state,
    spec_for_path,
    state_shardings,
)

__all__ = [
    # mesh
    "AXES",
    "BATCH_AXES",
    "CLUSTER_ENV",
    "PRESETS",
    "STEP_MODES",
    "DistributedConfig",
    "MeshConfig",
    "ParallelConfig",
    "axis_size",
    "initialize_distributed",
    "make_mesh",
    "mesh_devices",
    # sharding
    "PARAM_LAYOUT",
    "PRESET_AXES",
    "PRESET_FSDP",
    "RULES",
    "Rules",
    "cache_specs",
    "describe",
    "fit_spec",
    "init_opt_state",
    "named",
    "opt_state_specs",
    "param_shardings",
    "param_specs",
    "path_str",
    "rules_for",
    "shard_params",
    "shard_state",
    "spec_for_path",
    "state_shardings",
    # placement
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

"""The device mesh and the multi-host start: configs, ``jax.distributed``, ``make_mesh``.

A mesh has the axes ``('data', 'fsdp', 'expert', 'tensor')`` (:data:`AXES`, all
``AxisType.Auto``), built
from a :class:`MeshConfig` (sizes, ``-1`` = the rest; a split between hosts/slices (DCN) and chips
within one (ICI)). :class:`ParallelConfig` bundles the mesh with the parameter rule preset
(:mod:`rlhf_jax.parallel.sharding`), the form of the data-parallel step
(:func:`rlhf_jax.parallel.placement.accumulate`) and the multi-host start
(:func:`initialize_distributed`). The batch's leading axis is split over ``('data', 'fsdp')``
(:data:`BATCH_AXES`). The ``expert`` axis (default size 1) splits the experts of a
mixture-of-experts model (:mod:`rlhf_jax.parallel.sharding`); the batch is not split over it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence

import jax
from jax.sharding import AxisType

log = logging.getLogger(__name__)

AXES = ("data", "fsdp", "expert", "tensor")  # mesh axis names, outermost (slowest network) first
BATCH_AXES = ("data", "fsdp")  # the leading batch axis is split over these
PRESETS = ("dp", "fsdp", "tp", "fsdp+tp")  # parameter rule tables (rlhf_jax.parallel.sharding)
STEP_MODES = ("jit", "shard_map")  # forms of the data-parallel gradient (placement.accumulate)

__all__ = [
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
]

# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def _named(sizes: Sequence[int]) -> dict[str, int]:
    return dict(zip(AXES, sizes, strict=True))


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes. Sizes are global; ``dcn_*`` says how many hosts/slices each axis spans."""

    data: int = -1  # data-parallel replicas (params replicated); -1 = all devices left over
    fsdp: int = 1  # fully-sharded data parallel: batch and parameter shards; -1 = the rest
    tensor: int = 1  # tensor (model) parallel: heads, MLP and vocab split; -1 = the rest
    dcn_data: int = 1  # of `data`, how many groups live on different hosts/slices (DCN)
    dcn_fsdp: int = 1  # of `fsdp`, how many groups live on different hosts/slices (DCN)
    dcn_tensor: int = 1  # of `tensor`, across hosts/slices (rarely wise: TP wants fast ICI)
    # expert parallel: a mixture of experts' E experts split (the batch is not); -1 = the rest
    expert: int = 1
    dcn_expert: int = 1  # of `expert`, across hosts/slices

    def __post_init__(self):
        sizes = self.sizes
        if sum(s == -1 for s in sizes) > 1:
            raise ValueError(f"mesh {_named(sizes)}: at most one axis may be -1")
        for name, s in zip(AXES, sizes, strict=True):
            if s == 0 or s < -1:
                raise ValueError(f"mesh.{name}={s}: must be a positive size or -1 (the rest)")
        for name, s, d in zip(AXES, sizes, self.dcn_sizes, strict=True):
            if d < 1:
                raise ValueError(f"mesh.dcn_{name}={d}: must be >= 1")
            if s != -1 and s % d:
                raise ValueError(f"mesh.dcn_{name}={d} must divide mesh.{name}={s}")

    @property
    def sizes(self) -> tuple[int, int, int, int]:
        """``(data, fsdp, expert, tensor)`` as configured (may hold one -1), in :data:`AXES`
        order."""
        return (self.data, self.fsdp, self.expert, self.tensor)

    @property
    def dcn_sizes(self) -> tuple[int, int, int, int]:
        """``(dcn_data, dcn_fsdp, dcn_expert, dcn_tensor)``."""
        return (self.dcn_data, self.dcn_fsdp, self.dcn_expert, self.dcn_tensor)

    def resolve(self, num_devices: int) -> tuple[int, int, int, int]:
        """Concrete ``(data, fsdp, expert, tensor)`` for ``num_devices``, -1 replaced by the
        rest."""
        known = math.prod(s for s in self.sizes if s != -1)
        if -1 in self.sizes:
            if num_devices % known:
                raise ValueError(
                    f"mesh {_named(self.sizes)}: {num_devices} devices are not divisible "
                    f"by the fixed axes' product {known}; change the sizes"
                )
            sizes = tuple(num_devices // known if s == -1 else s for s in self.sizes)
        else:
            sizes = self.sizes
        if math.prod(sizes) != num_devices:
            raise ValueError(
                f"mesh {_named(sizes)} holds {math.prod(sizes)} devices but "
                f"{num_devices} are available; set one axis to -1 or make the product match"
            )
        for name, s, d in zip(AXES, sizes, self.dcn_sizes, strict=True):
            if s % d:
                raise ValueError(f"mesh.dcn_{name}={d} must divide the resolved {name}={s}")
        return sizes  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How ``jax.distributed`` starts. Unset fields come from the environment or the cluster."""

    enabled: str = "auto"  # "auto": start when the environment names a cluster; "on"; "off"
    coordinator_address: str | None = None  # "host:port" of process 0 (env JAX_COORDINATOR_ADDRESS)
    num_processes: int | None = None  # processes in the job (env JAX_NUM_PROCESSES)
    process_id: int | None = None  # this process's rank, 0-based (env JAX_PROCESS_ID)
    local_device_ids: tuple[int, ...] | None = None  # devices this process uses (GPU: one each)
    initialization_timeout: int = 300  # seconds to wait for all processes to join

    def __post_init__(self):
        if self.enabled not in ("auto", "on", "off"):
            raise ValueError(f"distributed.enabled={self.enabled!r}: choose 'auto', 'on' or 'off'")
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError("distributed.num_processes must be >= 1")
        if self.process_id is not None and self.process_id < 0:
            raise ValueError("distributed.process_id must be >= 0")
        if (
            self.num_processes is not None
            and self.process_id is not None
            and self.process_id >= self.num_processes
        ):
            raise ValueError(
                f"distributed.process_id={self.process_id} must be < "
                f"num_processes={self.num_processes}"
            )


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """Everything about placement: the mesh, the rule preset, the step form, multi-host start."""

    mesh: MeshConfig = MeshConfig()  # axis sizes
    preset: str = "dp"  # parameter rule table: "dp" | "fsdp" | "tp" | "fsdp+tp"
    step: str = "jit"  # "jit" (XLA inserts collectives) | "shard_map" (explicit pmean; dp only)
    distributed: DistributedConfig = DistributedConfig()  # multi-host start

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"parallel.preset={self.preset!r}: choose one of {PRESETS}")
        if self.step not in STEP_MODES:
            raise ValueError(f"parallel.step={self.step!r}: choose one of {STEP_MODES}")
        if self.step == "shard_map" and self.preset != "dp":
            raise ValueError(
                "parallel.step='shard_map' is the pmap-style data-parallel form and needs "
                f"replicated parameters: set parallel.preset='dp' (got {self.preset!r})"
            )


# --------------------------------------------------------------------------------------------
# Multi-host start and the mesh
# --------------------------------------------------------------------------------------------

CLUSTER_ENV = (
    "JAX_COORDINATOR_ADDRESS",  # explicit (any platform)
    "SLURM_JOB_ID",  # SLURM (jax detects ranks and the coordinator)
    "OMPI_COMM_WORLD_SIZE",  # Open MPI mpirun
    "TPU_WORKER_HOSTNAMES",  # multi-host Cloud TPU VM
    "MEGASCALE_COORDINATOR_ADDRESS",  # multi-slice TPU
)


def initialize_distributed(cfg: DistributedConfig | None = None) -> bool:
    """Start ``jax.distributed`` once, from ``cfg`` or the environment. Returns True if started.

    Call it first, before any other JAX call (it must precede backend initialisation). With
    ``enabled='auto'`` it starts only when a config field or the environment names a cluster:
    ``JAX_COORDINATOR_ADDRESS`` (+ ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``), SLURM, Open MPI or
    a multi-host TPU VM (where JAX finds everything itself). On CPU it selects the gloo
    collectives, so several CPU processes can run one program (tests, debugging).
    """
    cfg = cfg or DistributedConfig()
    if cfg.enabled == "off" or jax.distributed.is_initialized():
        return False
    env = os.environ
    address = cfg.coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    num = cfg.num_processes or _env_int("JAX_NUM_PROCESSES")
    pid = cfg.process_id if cfg.process_id is not None else _env_int("JAX_PROCESS_ID")
    named = address or num or any(k in env for k in CLUSTER_ENV)
    if cfg.enabled == "auto" and not named:
        return False
    if env.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # SIGTERM is ours (rlhf_jax.checkpoint: save and exit 3); JAX's preemption service would
    # install a second, native handler that also fires while the job shuts down.
    jax.config.update("jax_enable_preemption_service", False)
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=num,
        process_id=pid,
        local_device_ids=list(cfg.local_device_ids) if cfg.local_device_ids else None,
        initialization_timeout=cfg.initialization_timeout,
    )
    log.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def make_mesh(
    cfg: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None
) -> jax.sharding.Mesh:
    """A mesh with axes :data:`AXES` (all ``AxisType.Auto``) over ``devices``.

    With every ``dcn_*`` equal to 1 this is ``jax.make_mesh``, which orders devices for the
    physical topology. Otherwise the mesh is hybrid: ``mesh_utils.create_hybrid_device_mesh`` puts
    the ``dcn_*`` factor of each axis across slices (TPU multi-slice) or processes (GPU nodes), and
    the rest within one, so the collectives of ``tensor`` and ``fsdp`` stay on the fast network.
    """
    cfg = cfg or MeshConfig()
    devices = list(jax.devices() if devices is None else devices)
    sizes = cfg.resolve(len(devices))
    types = (AxisType.Auto,) * len(AXES)
    if all(d == 1 for d in cfg.dcn_sizes):
        return jax.make_mesh(sizes, AXES, axis_types=types, devices=devices)
    from jax.experimental import mesh_utils

    ici = tuple(s // d for s, d in zip(sizes, cfg.dcn_sizes, strict=True))
    granules = math.prod(cfg.dcn_sizes)
    slices = {getattr(d, "slice_index", None) for d in devices}
    processes = {d.process_index for d in devices}
    by_slice = None not in slices and len(slices) == granules
    if not by_slice and len(processes) != granules:
        raise ValueError(
            f"mesh dcn sizes {_named(cfg.dcn_sizes)} ask for {granules} hosts/slices, but the "
            f"devices span {len(slices)} slice(s) and {len(processes)} process(es)"
        )
    grid = mesh_utils.create_hybrid_device_mesh(
        ici, cfg.dcn_sizes, devices, process_is_granule=not by_slice
    )
    return jax.sharding.Mesh(grid, AXES, axis_types=types)


def mesh_devices(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> list:
    """The devices a mesh of ``cfg`` takes: all of ``devices`` (default ``jax.devices()``) when
    an axis is ``-1``, else the first ``data x fsdp x expert x tensor`` (``MeshConfig(data=1)``: one
    device, the trivial mesh, whatever the machine holds)."""
    devices = list(jax.devices() if devices is None else devices)
    return devices if -1 in cfg.sizes else devices[: math.prod(cfg.sizes)]


def axis_size(mesh: jax.sharding.Mesh, axis: str | tuple[str, ...]) -> int:
    """The number of devices along ``axis`` of ``mesh`` (a name, or a tuple of names: their
    product, e.g. ``axis_size(mesh, BATCH_AXES)`` = data x fsdp, the batch's split)."""
    names = axis if isinstance(axis, tuple) else (axis,)
    return math.prod(mesh.shape[n] for n in names)

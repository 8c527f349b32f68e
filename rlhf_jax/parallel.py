"""Scale-out: one compiled step over a named device mesh, with sharding rules as data.

The same jitted step runs on one CPU, 8 fake CPU devices, a GPU node or a multi-host TPU pod. What
changes between them is data, never code:

- a **mesh** with the axes ``('data', 'fsdp', 'tensor')`` built from a :class:`MeshConfig`
  (sizes, ``-1`` = the rest; a split between hosts/slices (DCN) and chips within one (ICI));
- a **rule table** per preset: an ordered tuple of ``(parameter-path regex, PartitionSpec)``. The
  first regex that matches a parameter's path (``re.search`` on ``"layers/attn/q_proj/kernel"``)
  gives its spec. Presets ``dp``, ``fsdp``, ``tp`` and ``fsdp+tp`` differ only in their table
  (:data:`RULES`); all are generated from one architecture layout (:data:`PARAM_LAYOUT`, a path
  regex -> logical axis names, as in maxtext's ``logical_axis_rules``), a per-preset map from
  logical names to mesh axes (:data:`PRESET_AXES`) and whether the preset adds FSDP, which
  splits every matrix's output dimension over ``fsdp`` (:data:`PRESET_FSDP`);
- the **batch** is always split over ``('data', 'fsdp')`` on its leading axis (:data:`BATCH_AXES`).

A spec names the *trailing* dimensions of a parameter: a parameter with more dimensions than its
spec (stacked layers with a leading layer axis) is replicated along the extra leading ones. An axis
whose size the mesh axis does not divide is replicated instead, and the reason is logged once.

The per-device, pmap-style form of data parallelism (explicit ``lax.pmean`` of gradient sums, loss
sums and counts) is :func:`make_data_parallel_step` with ``mode='shard_map'``; ``mode='jit'`` is
the same update written as one ``jax.jit`` over sharded arrays, where XLA inserts the collectives.
Both follow the loss contract of :func:`rlhf_jax.optim.accumulate`:
``loss_fn(params, batch) -> (loss_sum, (count, metric_sums))``.

Multi-host: :func:`initialize_distributed` starts ``jax.distributed`` from a config or the
environment; :func:`shard_batch` builds global arrays from each host's *local* rows with
``jax.make_array_from_process_local_data``.

Trainers on a mesh: each trainer's ``run(..., mesh=, parallel_cfg=)`` places its state by the
rules (:func:`state_shardings`), compiles its step once with :func:`jit_step` (state in and out
on those shardings, donated; batch over ``BATCH_AXES``), computes gradients with
:func:`accumulate` (``jit`` form, or the ``shard_map`` form for ``ParallelConfig.step``) and
places each batch with :func:`shard_batches`.

Memory before running: :func:`dry_run` compiles a train step from abstract shapes only
(``jax.eval_shape`` of the model init, no weights allocated) and reads
``compiled.memory_analysis()``. See ``docs/scaling.md``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

AXES = ("data", "fsdp", "tensor")  # mesh axis names, outermost (slowest network) first
BATCH_AXES = ("data", "fsdp")  # the leading batch axis is split over these
PRESETS = ("dp", "fsdp", "tp", "fsdp+tp")
STEP_MODES = ("jit", "shard_map")

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
    def sizes(self) -> tuple[int, int, int]:
        """``(data, fsdp, tensor)`` as configured (may hold one -1)."""
        return (self.data, self.fsdp, self.tensor)

    @property
    def dcn_sizes(self) -> tuple[int, int, int]:
        """``(dcn_data, dcn_fsdp, dcn_tensor)``."""
        return (self.dcn_data, self.dcn_fsdp, self.dcn_tensor)

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """Concrete ``(data, fsdp, tensor)`` for ``num_devices``, with -1 replaced by the rest."""
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

_CLUSTER_ENV = (
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
    named = address or num or any(k in env for k in _CLUSTER_ENV)
    if cfg.enabled == "auto" and not named:
        return False
    if env.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
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
    """A mesh with axes ``('data', 'fsdp', 'tensor')`` (all ``AxisType.Auto``) over ``devices``.

    With every ``dcn_*`` equal to 1 this is ``jax.make_mesh``, which orders devices for the
    physical topology. Otherwise the mesh is hybrid: ``mesh_utils.create_hybrid_device_mesh`` puts
    the ``dcn_*`` factor of each axis across slices (TPU multi-slice) or processes (GPU nodes), and
    the rest within one, so the collectives of ``tensor`` and ``fsdp`` stay on the fast network.
    """
    cfg = cfg or MeshConfig()
    devices = list(jax.devices() if devices is None else devices)
    sizes = cfg.resolve(len(devices))
    types = (AxisType.Auto,) * len(AXES)
    if cfg.dcn_sizes == (1, 1, 1):
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
    an axis is ``-1``, else the first ``data x fsdp x tensor`` (``MeshConfig(data=1)``: one
    device, the trivial mesh, whatever the machine holds)."""
    devices = list(jax.devices() if devices is None else devices)
    return devices if -1 in cfg.sizes else devices[: math.prod(cfg.sizes)]


# --------------------------------------------------------------------------------------------
# Sharding rules as data
# --------------------------------------------------------------------------------------------

# Logical axis names of the parameters, per path pattern (first match wins). Each tuple names the
# trailing dimensions: "vocab", "embed" (the model width), "heads" (query heads x head_dim),
# "kv_heads" (key/value heads x head_dim), "mlp" (the MLP width); None = never sharded.
# Kernels are stored [in, out] (flax convention). Covers GPT-2 and Llama/Qwen2/Qwen3 names of
# rlhf_jax.models.transformer and the scalar heads (value / reward / cost) of heads.py.
PARAM_LAYOUT: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    # embeddings and the LM head
    (r"(^|/)(embed|wte|embed_tokens|token_embed)(/embedding)?$", ("vocab", "embed")),
    (r"(^|/)(wpe|pos_embed|position_embed)(/embedding)?$", (None, "embed")),
    (r"(^|/)lm_head/kernel$", ("embed", "vocab")),
    (r"(^|/)lm_head/bias$", ("vocab",)),
    # attention: q/k/v projections (separate, or GPT-2's fused c_attn), and the output projection
    (r"(^|/)(q_proj|query|wq)/kernel$", ("embed", "heads")),
    (r"(^|/)(q_proj|query|wq)/bias$", ("heads",)),
    (r"(^|/)(k_proj|v_proj|key|value|wk|wv)/kernel$", ("embed", "kv_heads")),
    (r"(^|/)(k_proj|v_proj|key|value|wk|wv)/bias$", ("kv_heads",)),
    (r"(^|/)(c_attn|qkv_proj|wqkv)/kernel$", ("embed", "heads")),
    (r"(^|/)(c_attn|qkv_proj|wqkv)/bias$", ("heads",)),
    (r"(^|/)(o_proj|out_proj|wo|attn/c_proj)/kernel$", ("heads", "embed")),
    # MLP: SwiGLU gate/up/down (Llama, Qwen) and GPT-2's c_fc / c_proj
    (r"(^|/)(gate_proj|up_proj|w1|w3|c_fc|fc_in)/kernel$", ("embed", "mlp")),
    (r"(^|/)(gate_proj|up_proj|w1|w3|c_fc|fc_in)/bias$", ("mlp",)),
    (r"(^|/)(down_proj|w2|mlp/c_proj|fc_out)/kernel$", ("mlp", "embed")),
    # scalar heads: [embed, 1] kernels; their biases and gains stay replicated
    (r"(^|/)(value_head|score_head|reward_head|cost_head|head)/kernel$", ("embed", None)),
    # everything else (norm scales, q/k norms, output-projection and head biases, gains): replicated
    (r".*", ()),
)

# Logical axis -> mesh axis (tensor parallelism, Megatron-style: column-parallel q/k/v, gate/up
# and the LM head split their output; row-parallel o_proj, down_proj split their input), and
# whether the preset adds FSDP. With the logical layout, these two entries make a preset's table.
PRESET_AXES: dict[str, dict[str, str | None]] = {
    "dp": {"vocab": None, "embed": None, "heads": None, "kv_heads": None, "mlp": None},
    "fsdp": {"vocab": None, "embed": None, "heads": None, "kv_heads": None, "mlp": None},
    "tp": {
        "vocab": "tensor",
        "embed": None,
        "heads": "tensor",
        "kv_heads": "tensor",
        "mlp": "tensor",
    },
    "fsdp+tp": {
        "vocab": "tensor",
        "embed": None,
        "heads": "tensor",
        "kv_heads": "tensor",
        "mlp": "tensor",
    },
}
PRESET_FSDP = {"dp": False, "fsdp": True, "tp": False, "fsdp+tp": True}

Rules = tuple[tuple[str, P], ...]


def _with_fsdp(spec: list, names: tuple) -> list:
    """Add ``fsdp`` to a matrix's *output* dimension (an embedding table's ``embed``).

    Measured choice (``docs/scaling.md``): without activation sharding hints in the model, XLA's
    partitioner gathers the weights (as FSDP should) when ``fsdp`` splits the output dimension,
    but moves the batch-sharded activations when it splits the contracted input dimension (Llama
    1B, batch 16 x 1024 on data=2, fsdp=4: 27.5 vs 45.6 GiB of temporaries per device). A
    ``[D, 1]`` scalar-head kernel is split on ``D``. Vectors (biases, norms) stay as they are.
    """
    if len(names) != 2:
        return spec
    i = 1 if names[1] is not None else 0
    spec[i] = "fsdp" if spec[i] is None else ("fsdp", spec[i])
    return spec


def rules_for(preset: str, layout=PARAM_LAYOUT) -> Rules:
    """The ordered ``(path regex, PartitionSpec)`` table of ``preset``, from a logical layout."""
    if preset not in PRESET_AXES:
        raise ValueError(f"unknown sharding preset {preset!r}: choose one of {PRESETS}")
    axes = PRESET_AXES[preset]
    table = []
    for pattern, names in layout:
        spec = [axes.get(a) if a else None for a in names]
        if PRESET_FSDP[preset]:
            spec = _with_fsdp(spec, names)
        # Trailing None entries are kept: a spec names the *trailing* dims of a parameter.
        table.append((pattern, P(*spec)))
    return tuple(table)


RULES: dict[str, Rules] = {preset: rules_for(preset) for preset in PRESETS}


def path_str(path: Sequence[Any]) -> str:
    """``'layers/0/attn/q_proj/kernel'`` from a pytree key path (nnx ``.value`` dropped)."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    if parts and parts[-1] in ("value", "raw_value"):
        parts.pop()
    return "/".join(parts)


def _mesh_axis_size(mesh: jax.sharding.Mesh, axis) -> int:
    names = axis if isinstance(axis, tuple) else (axis,)
    return math.prod(mesh.shape[n] for n in names)


def fit_spec(
    spec: P, shape: Sequence[int], mesh: jax.sharding.Mesh | None, where: str = ""
) -> tuple[P, list[str]]:
    """Align ``spec`` to the trailing dims of ``shape``; replicate axes the mesh does not divide.

    Returns the fitted spec and the reasons for every axis dropped because of divisibility.
    """
    spec = tuple(spec)
    if len(spec) > len(shape):
        raise ValueError(
            f"{where}: spec {P(*spec)} names {len(spec)} dims but the array has "
            f"shape {tuple(shape)}"
        )
    full = (None,) * (len(shape) - len(spec)) + spec
    reasons, out = [], []
    for dim, (size, axis) in enumerate(zip(shape, full, strict=True)):
        if axis is not None and mesh is not None:
            n = _mesh_axis_size(mesh, axis)
            if size % n:
                # Of a combined axis like ('fsdp', 'tensor'), keep the first one that divides.
                parts = (
                    [a for a in axis if size % mesh.shape[a] == 0]
                    if isinstance(axis, tuple)
                    else []
                )
                kept = parts[0] if parts else None
                reasons.append(
                    f"{where}: dim {dim} of size {size} is not divisible by mesh axis {axis!r} "
                    f"of size {n}; " + (f"split over {kept!r} only" if kept else "replicated")
                )
                axis = kept
        out.append(axis)
    while out and out[-1] is None:
        out.pop()
    return P(*out), reasons


def _log_reasons(reasons: list[str]) -> None:
    for reason in dict.fromkeys(reasons):
        log.warning("sharding fallback: %s", reason)


def spec_for_path(path: str, shape: Sequence[int], rules: Rules, mesh=None) -> tuple[P, list[str]]:
    """The fitted spec of one parameter: the first rule whose regex matches ``path``."""
    for pattern, spec in rules:
        if re.search(pattern, path):
            return fit_spec(spec, shape, mesh, where=f"{path} (rule {pattern!r})")
    raise ValueError(f"no sharding rule matches parameter {path!r}; add a rule (or a '.*' rule)")


def param_specs(params: Any, rules: Rules | str, mesh: jax.sharding.Mesh | None = None) -> Any:
    """A pytree of ``PartitionSpec`` with the structure of ``params`` (arrays or ShapeDtypeStructs).

    ``rules`` is a table or a preset name. With ``mesh`` given, axes that the mesh does not divide
    are replicated (logged once each); without it, the specs are the rules' as written.
    """
    rules = RULES[rules] if isinstance(rules, str) else rules
    reasons: list[str] = []

    def one(path, leaf):
        spec, why = spec_for_path(path_str(path), np.shape(leaf), rules, mesh)
        reasons.extend(why)
        return spec

    specs = jax.tree_util.tree_map_with_path(one, params)
    _log_reasons(reasons)
    return specs


def _is_spec(x) -> bool:
    return isinstance(x, P)


def named(mesh: jax.sharding.Mesh, specs: Any) -> Any:
    """``NamedSharding(mesh, spec)`` for every spec of a pytree of specs."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)


def param_shardings(params: Any, mesh: jax.sharding.Mesh, rules: Rules | str) -> Any:
    """``NamedSharding`` per parameter from the rules (with the divisibility fallback)."""
    return named(mesh, param_specs(params, rules, mesh))


def shard_params(params: Any, mesh: jax.sharding.Mesh, rules: Rules | str) -> Any:
    """Place ``params`` on ``mesh`` as the rules say (a copy; host or device arrays)."""
    return jax.device_put(params, param_shardings(params, mesh, rules))


def state_shardings(state: Any, mesh: jax.sharding.Mesh, rules: Rules | str) -> Any:
    """``NamedSharding`` for every leaf of a whole train state, by the same rules.

    The rule regexes match path *suffixes*, so ``params/layers/attn/q_proj/kernel`` and Adam's
    ``opt_state/.../mu/layers/attn/q_proj/kernel`` get the same spec, and scalars (``step``, the
    optimizer count, the learning rate) fall to the replicated catch-all. This places a trainer's
    ``TrainState`` (or PPO's state) in one call; the same shardings are the ``in_shardings`` and
    ``out_shardings`` of its step (:func:`jit_step`).
    """
    return param_shardings(state, mesh, rules)


def shard_state(state: Any, mesh: jax.sharding.Mesh, rules: Rules | str) -> Any:
    """Place a whole train state on ``mesh`` (see :func:`state_shardings`)."""
    return jax.device_put(state, state_shardings(state, mesh, rules))


def opt_state_specs(optimizer: optax.GradientTransformation, params: Any, specs: Any) -> Any:
    """Specs of ``optimizer.init(params)``: parameter-shaped parts (Adam's mu, nu) follow the
    parameters' ``specs``; everything else (step counts, hyperparameters) is replicated."""
    state = jax.eval_shape(optimizer.init, params)
    return optax.tree_map_params(
        optimizer,
        lambda _, spec: spec,
        state,
        specs,
        transform_non_params=lambda _: P(),
        is_leaf=_is_spec,
    )


def init_opt_state(optimizer: optax.GradientTransformation, params: Any, mesh, specs: Any) -> Any:
    """``optimizer.init(params)`` created directly in its sharded layout (no replicated copy)."""
    shardings = named(mesh, opt_state_specs(optimizer, params, specs))
    return jax.jit(optimizer.init, out_shardings=shardings)(params)


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
    n = _mesh_axis_size(mesh, BATCH_AXES)

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


def cache_specs(cache: Any, mesh: jax.sharding.Mesh | None, preset: str) -> Any:
    """Specs of a KV cache ``dict(k=[L, B, S, Hkv, Dh], v=...)``: batch over ``('data','fsdp')``,
    KV heads over ``tensor`` in the tensor-parallel presets (replicated when they do not divide,
    e.g. GQA with fewer KV heads than ``tensor``); other leaves split along their batch axis 0.
    """
    heads = PRESET_AXES[preset]["kv_heads"]
    reasons: list[str] = []

    def one(path, leaf):
        shape = np.shape(leaf)
        if len(shape) == 5:
            spec = P(None, BATCH_AXES, None, heads, None)
        elif len(shape) >= 1:
            spec = batch_spec(len(shape))
        else:
            spec = P()
        fitted, why = fit_spec(spec, shape, mesh, where=f"cache {path_str(path)}")
        reasons.extend(why)
        return fitted

    specs = jax.tree_util.tree_map_with_path(one, cache)
    _log_reasons(reasons)
    return specs


def describe(params: Any, specs: Any) -> str:
    """One line per parameter: path, shape and spec (for logs and docs)."""
    rows = []
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for (path, leaf), spec in zip(flat, jax.tree.leaves(specs, is_leaf=_is_spec), strict=True):
        rows.append(f"{path_str(path):60s} {str(tuple(np.shape(leaf))):24s} {spec}")
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------
# The data-parallel train step: jit form and pmap-style shard_map form
# --------------------------------------------------------------------------------------------

LossFn = Callable[[Any, Any], tuple[jax.Array, tuple[jax.Array, Any]]]


def _update(optimizer, params, opt_state, grads):
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def _metrics(loss_sum, count, metric_sums, grads) -> dict[str, jax.Array]:
    count = jnp.asarray(count, jnp.float32)
    out = {
        "loss": loss_sum / jnp.maximum(count, 1.0),
        "count": count,
        "grad_norm": optax.tree.norm(grads),
    }
    out.update(metric_sums if isinstance(metric_sums, Mapping) else {})
    return out


def make_data_parallel_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    *,
    mode: str = "jit",
    param_specs_tree: Any = None,
    opt_specs: Any = None,
    donate: bool = True,
) -> Callable[[Any, Any, Any], tuple[Any, Any, dict[str, jax.Array]]]:
    """A compiled ``step(params, opt_state, batch) -> (params, opt_state, metrics)``.

    The gradient is that of ``sum(loss_sum) / sum(count)`` over the whole global batch, whatever
    the mesh, so both forms equal the one-device step.

    Args:
      loss_fn: ``loss_fn(params, batch) -> (loss_sum, (count, metric_sums))`` on a (local) batch,
        as in :func:`rlhf_jax.optim.accumulate`; ``metric_sums`` a dict of sums (summed over
        devices).
      optimizer: the optax transformation.
      mesh: the device mesh; the batch's leading axis is split over ``('data', 'fsdp')``.
      mode: ``'jit'``: one ``jax.jit`` over sharded arrays, parameters laid out by
        ``param_specs_tree`` (XLA inserts the collectives). ``'shard_map'``: the per-device form;
        each device computes the gradient *sum* of its rows, then ``lax.pmean`` over
        ``('data', 'fsdp')`` of gradient sums, loss sums, counts and metric sums, and divides once
        (the 1/N of each mean cancels). Parameters are replicated in this form.
      param_specs_tree: parameter specs (``param_specs(params, rules, mesh)``); default
        replicated.
      opt_specs: optimizer-state specs (default: follow ``param_specs_tree``, see
        :func:`opt_state_specs`).
      donate: donate ``params`` and ``opt_state`` (updated in place).

    Returns:
      the jitted step. ``metrics``: ``loss`` (global token mean), ``count``, ``grad_norm`` (global
      norm of the mean gradient, before clipping) and the metric sums.
    """
    if mode not in STEP_MODES:
        raise ValueError(f"mode={mode!r}: choose one of {STEP_MODES}")
    donate_argnums = (0, 1) if donate else ()
    if mode == "jit":
        return _jit_step(loss_fn, optimizer, mesh, param_specs_tree, opt_specs, donate_argnums)
    return _shard_map_step(loss_fn, optimizer, mesh, param_specs_tree, opt_specs, donate_argnums)


def _shardings_for(optimizer, mesh, params, param_specs_tree, opt_specs):
    pspecs = param_specs_tree
    if pspecs is None:
        pspecs = jax.tree.map(lambda _: P(), params)
    ospecs = opt_specs if opt_specs is not None else opt_state_specs(optimizer, params, pspecs)
    return named(mesh, pspecs), named(mesh, ospecs)


def _jit_step(loss_fn, optimizer, mesh, param_specs_tree, opt_specs, donate_argnums):
    from rlhf_jax.optim import accumulate

    def step(params, opt_state, batch):
        grads, count, metric_sums = accumulate(_with_loss(loss_fn), params, batch, 1)
        loss_sum = metric_sums.pop("__loss_sum")
        metrics = _metrics(loss_sum, count, metric_sums, grads)
        params, opt_state = _update(optimizer, params, opt_state, grads)
        return params, opt_state, metrics

    return _lazy_jit(step, optimizer, mesh, param_specs_tree, opt_specs, donate_argnums)


def _with_loss(loss_fn: LossFn) -> LossFn:
    """``loss_fn`` whose metric sums also carry the loss sum (under ``'__loss_sum'``)."""

    def wrapped(params, batch):
        loss_sum, (count, metric_sums) = loss_fn(params, batch)
        metric_sums = dict(metric_sums or {})
        metric_sums["__loss_sum"] = jax.lax.stop_gradient(loss_sum)
        return loss_sum, (count, metric_sums)

    return wrapped


def _shard_map_step(loss_fn, optimizer, mesh, param_specs_tree, opt_specs, donate_argnums):
    if param_specs_tree is not None and any(
        tuple(s) for s in jax.tree.leaves(param_specs_tree, is_leaf=_is_spec)
    ):
        raise ValueError("mode='shard_map' replicates the parameters: use the 'dp' rules")
    wrapped = _with_loss(loss_fn)

    def per_device(params, batch):
        # The replicated params enter as device-varying copies, so the gradient below is this
        # device's own (pmap semantics); differentiating the invariant params directly would make
        # shard_map insert a psum in the transpose, and the pmean below would count it twice.
        local = jax.lax.pcast(params, BATCH_AXES, to="varying")
        grad_sums, (count, metric_sums) = jax.grad(wrapped, has_aux=True)(local, batch)
        count = jnp.asarray(count, jnp.float32)
        # pmap-style: average over the replicas; the 1/N cancels in the ratio below.
        grad_sums, count, metric_sums = jax.lax.pmean((grad_sums, count, metric_sums), BATCH_AXES)
        return grad_sums, count, metric_sums

    def step(params, opt_state, batch):
        in_specs = (P(), jax.tree.map(lambda x: batch_spec(np.ndim(x)), batch))
        sharded = jax.shard_map(per_device, mesh=mesh, in_specs=in_specs, out_specs=P())
        grad_means, count_mean, metric_means = sharded(params, batch)
        denom = jnp.maximum(count_mean, jnp.finfo(jnp.float32).tiny)
        grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grad_means)
        n = _mesh_axis_size(mesh, BATCH_AXES)
        loss_sum = metric_means.pop("__loss_sum") * n
        metric_sums = {k: v * n for k, v in metric_means.items()}
        metrics = _metrics(loss_sum, count_mean * n, metric_sums, grads)
        params, opt_state = _update(optimizer, params, opt_state, grads)
        return params, opt_state, metrics

    return _lazy_jit(step, optimizer, mesh, None, opt_specs, donate_argnums)


def _lazy_jit(step, optimizer, mesh, param_specs_tree, opt_specs, donate_argnums):
    """Jit ``step`` with shardings built from the first call's ``params`` (cached per structure)."""
    cache: dict[Any, Callable] = {}

    def compiled_for(params, batch):
        key = (jax.tree.structure(params), jax.tree.structure(batch))
        if key not in cache:
            pshard, oshard = _shardings_for(optimizer, mesh, params, param_specs_tree, opt_specs)
            bshard = batch_shardings(batch, mesh)
            cache[key] = jax.jit(
                step,
                in_shardings=(pshard, oshard, bshard),
                out_shardings=(pshard, oshard, NamedSharding(mesh, P())),
                donate_argnums=donate_argnums,
            )
        return cache[key]

    def run(params, opt_state, batch):
        return compiled_for(params, batch)(params, opt_state, batch)

    run.jitted = compiled_for  # type: ignore[attr-defined]  # (params, batch) -> the jitted step
    return run


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
    from rlhf_jax.optim import accumulate as accumulate_local

    if mode not in STEP_MODES:
        raise ValueError(f"mode={mode!r}: choose one of {STEP_MODES}")
    if mesh is None:
        return accumulate_local(loss_fn, params, batch, num_micro)
    if mode == "jit":
        return accumulate_local(loss_fn, params, constrain_batch(batch, mesh), num_micro)
    n = _mesh_axis_size(mesh, BATCH_AXES)

    def per_device(params, batch):
        # Device-varying copies of the replicated params: this device's own gradient (see
        # _shard_map_step), summed over its rows (accumulate's mean times its clamped count).
        local = jax.lax.pcast(params, BATCH_AXES, to="varying")
        grads, count, sums = accumulate_local(loss_fn, local, batch, num_micro)
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
    ``out_shardings`` of the state are ``state_shardings`` (:func:`state_shardings` of the
    placed state), so the updated state comes back in the layout it went in and the next step
    reuses the same executable (no re-layout of replicated leaves, no recompilation); metrics
    are replicated. ``arg_shardings`` places the other arguments (default
    ``(batch_sharding(mesh), replicated(mesh))`` for the ``(batch, key)`` of the SFT and
    reward-model steps). The state is donated. The state passed in must already be placed on
    ``state_shardings`` (jit refuses a committed array in another layout): use
    :func:`shard_state` once before the first step.
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


# --------------------------------------------------------------------------------------------
# Dry run: compiled per-device memory from abstract shapes
# --------------------------------------------------------------------------------------------


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

    def row(self) -> str:
        """A Markdown table row in GiB (see :func:`format_memory_table`)."""
        gib = lambda b: f"{b / 2**30:.2f}"
        return (
            f"| {self.name} | {self.num_params / 1e9:.2f}B | {gib(self.arguments)} | "
            f"{gib(self.outputs)} | {gib(self.aliased)} | {gib(self.temps)} | "
            f"{gib(self.generated_code)} | {gib(self.total)} |"
        )


def format_memory_table(reports: Sequence[MemoryReport]) -> str:
    """A Markdown table of per-device memory (GiB) for several dry runs."""
    head = (
        "| step | params | arguments | outputs | aliased | temps | code | total |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    return "\n".join([head, *(r.row() for r in reports)])


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
) -> MemoryReport:
    """Compile the SFT trainer's step for ``cfg``'s mesh and rules; its per-device memory.

    Nothing is allocated: the parameters come from ``jax.eval_shape`` of the model init, the
    train state from ``jax.eval_shape`` of ``sft.init_state``, the batch is ``ShapeDtypeStruct``s;
    the step (``rlhf_jax.algorithms.sft.make_step``: token NLL from the full logits, gradient,
    AdamW update, non-finite guard; or the ``shard_map`` form with ``cfg.step='shard_map'``) is
    ``lower(...).compile()``d. An 8B model's step compiles on a laptop's fake CPU devices.

    Args:
      model_config: a ``rlhf_jax.models.ModelConfig``.
      cfg: the mesh, the rule preset and the step form.
      batch_size: global rows per step (divisible by data x fsdp).
      seq_len: tokens per row.
      optim: an ``OptimConfig`` (default AdamW; ``grad_accum_steps`` splits the batch).
      devices: the devices of the mesh (default all).
      name: the row's label (default from the model and the mesh).
      rules: a rule table to use instead of ``cfg.preset``'s (to compare layouts).
    """
    from rlhf_jax.algorithms import sft
    from rlhf_jax.optim import OptimConfig, make_optimizer

    mesh = make_mesh(cfg.mesh, devices)
    split = _mesh_axis_size(mesh, BATCH_AXES)
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
    if cfg.step == "shard_map":
        optimizer = make_optimizer(sft_cfg.optim)
        loss_fn = lambda p, b: sft.sft_loss(graphdef, p, b)  # noqa: E731
        step = make_data_parallel_step(loss_fn, optimizer, mesh, mode="shard_map")
        opt_state = jax.eval_shape(optimizer.init, params)
        return compile_memory(
            step.jitted(params, batch), params, opt_state, batch, name=name, num_params=num
        )
    state = jax.eval_shape(lambda p: sft.init_state(p, sft_cfg), params)
    state = _abstract(state, state_shardings(state, mesh, rules or cfg.preset))
    key = jax.eval_shape(lambda: jax.random.key(0))
    step = sft.make_step(graphdef, sft_cfg)
    return compile_memory(step, state, batch, key, name=name, num_params=num)

"""Sharding rules as data: parameter path -> ``PartitionSpec`` tables, one per preset.

A **rule table** is an ordered tuple of ``(parameter-path regex, PartitionSpec)``. The first regex
that matches a parameter's path (``re.search`` on ``"layers/attn/q_proj/kernel"``) gives its spec.
Presets ``dp``, ``fsdp``, ``tp`` and ``fsdp+tp`` differ only in their table (:data:`RULES`); all
are generated from one architecture layout (:data:`PARAM_LAYOUT`, a path regex -> logical axis
names, as in maxtext's ``logical_axis_rules``), a per-preset map from logical names to mesh axes
(:data:`PRESET_AXES`) and whether the preset adds FSDP, which splits every matrix's output
dimension over ``fsdp`` (:data:`PRESET_FSDP`). In every preset the experts of a mixture-of-experts
layer (Mixtral's ``layers/mlp/experts/*``, ``[L, E, ...]``) are split along ``E`` over the mesh
axis ``expert`` (size 1 unless configured, which leaves them whole).

A spec names the *trailing* dimensions of a parameter: a parameter with more dimensions than its
spec (stacked layers with a leading layer axis) is replicated along the extra leading ones. An axis
whose size the mesh axis does not divide is replicated instead, and the reason is logged once.

The same rules place a whole train state (:func:`state_shardings`: Adam's moments follow their
parameters, scalars are replicated) and an optimizer state created in place
(:func:`init_opt_state`); :func:`cache_specs` lays out a KV cache.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rlhf_jax.parallel.mesh import BATCH_AXES, PRESETS, axis_size
from rlhf_jax.parallel.placement import batch_spec

log = logging.getLogger(__name__)

__all__ = [
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
]

# Logical axis names of the parameters, per path pattern (first match wins). Each tuple names the
# trailing dimensions: "vocab", "embed" (the model width), "heads" (query heads x head_dim),
# "kv_heads" (key/value heads x head_dim), "mlp" (the MLP width), "expert" (the experts of a
# mixture-of-experts layer); None = never sharded.
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
    # mixture of experts (Mixtral): [E, in, out] expert kernels, the [D, E] router
    (r"(^|/)experts/(gate_proj|up_proj)$", ("expert", "embed", "mlp")),
    (r"(^|/)experts/down_proj$", ("expert", "mlp", "embed")),
    (r"(^|/)router/kernel$", ("embed", None)),
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
# and the LM head split their output; row-parallel o_proj, down_proj split their input; expert
# parallelism: the experts over `expert`, in every preset), and whether the preset adds FSDP.
# With the logical layout, these two entries make a preset's table.
PRESET_AXES: dict[str, dict[str, str | None]] = {
    "dp": {
        "vocab": None,
        "embed": None,
        "heads": None,
        "kv_heads": None,
        "mlp": None,
        "expert": "expert",
    },
    "fsdp": {
        "vocab": None,
        "embed": None,
        "heads": None,
        "kv_heads": None,
        "mlp": None,
        "expert": "expert",
    },
    "tp": {
        "vocab": "tensor",
        "embed": None,
        "heads": "tensor",
        "kv_heads": "tensor",
        "mlp": "tensor",
        "expert": "expert",
    },
    "fsdp+tp": {
        "vocab": "tensor",
        "embed": None,
        "heads": "tensor",
        "kv_heads": "tensor",
        "mlp": "tensor",
        "expert": "expert",
    },
}
PRESET_FSDP = {"dp": False, "fsdp": True, "tp": False, "fsdp+tp": True}

Rules = tuple[tuple[str, P], ...]


def _with_fsdp(spec: list, names: tuple) -> list:
    """Add ``fsdp`` to a matrix's *output* dimension (an embedding table's ``embed``; the last
    dimension of a stack of expert matrices ``[E, in, out]``).

    Measured choice (``docs/scaling.md``): without activation sharding hints in the model, XLA's
    partitioner gathers the weights (as FSDP should) when ``fsdp`` splits the output dimension,
    but moves the batch-sharded activations when it splits the contracted input dimension (Llama
    1B, batch 16 x 1024 on data=2, fsdp=4: 27.5 vs 45.6 GiB of temporaries per device). A
    ``[D, 1]`` scalar-head kernel is split on ``D``. Vectors (biases, norms) stay as they are.
    """
    if len(names) < 2:
        return spec
    i = -1 if names[-1] is not None else -2
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
            n = axis_size(mesh, axis)
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
    ``out_shardings`` of its step (:func:`rlhf_jax.parallel.placement.jit_step`).
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

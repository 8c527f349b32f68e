"""LoRA, functional: low-rank adapters added to frozen kernels inside the compiled step.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models". A targeted kernel
``W [..., in, out]`` (stacked over layers by the layer scan: ``[L, in, out]``) is used as

    W' = W + (alpha / r) * A @ B,      A [..., in, r],  B [..., r, out],

where only ``A`` and ``B`` are trained. :func:`merge` computes the adapted parameters as a pure
function of the frozen base pytree and the adapters, inside ``jax.jit``; the base is an argument
that is never donated nor copied into the train state, and with the adapters off (or ``B = 0``)
the model *is* the base. No model family or layer function changes: the models see an ordinary
``nnx.State``. (``flax.nnx.LoRA`` would put adapter modules into every family's graph, and the
reference would then be a second model; here the PPO reference is the same pytree the policy
merges from.)

Initialisation (PEFT's default ``init_lora_weights=True``): ``B = 0`` and ``A`` kaiming-uniform
as ``torch.nn.init.kaiming_uniform_(a=sqrt(5))`` on PEFT's ``lora_A.weight [r, in]``, i.e.
``A ~ U(-1/sqrt(in), 1/sqrt(in))``. Dropout on the adapter input is not implemented
(``dropout`` must be 0).

The cost of the merged form: the forward materialises ``W'`` for every targeted kernel, and the
backward ``dL/dW'`` (full size) before ``dA = s dW' B^T``, ``dB = s A^T dW'``; what LoRA saves
is the trainable state (no optimizer moments, no second copy of the base).

Export (:func:`save_peft`): PEFT's ``adapter_config.json`` + ``adapter_model.safetensors`` with
keys ``base_model.model.<HF module>.lora_A.weight [r, in]`` / ``lora_B.weight [out, r]``, the HF
module names from :mod:`rlhf_jax.models.hf`'s parameter mapping. Kernels that HF stores fused
(GPT-2's ``c_attn`` = q|k|v, Phi-3's ``qkv_proj`` and ``gate_up_proj``) get one adapter of rank
``k r`` (k the targeted parts): ``lora_A`` the parts' ``A`` stacked, ``lora_B`` block-diagonal,
with ``rank_pattern`` / ``alpha_pattern`` ``k r`` / ``k alpha`` so the scale stays ``alpha / r``:
the same ``W'`` exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "DEFAULT_TARGETS",
    "LoRAConfig",
    "PeftAdapter",
    "init_adapters",
    "merge",
    "peft_tensors",
    "save_peft",
    "target_paths",
]

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters on the projection kernels; the rest of the model stays frozen."""

    rank: int = 8  # r: the adapters' rank
    alpha: float = 16.0  # alpha: the update is scaled by alpha / r (PEFT's lora_alpha)
    # regexes, each matched in full against a kernel's module name under layers/ (the names of
    # models/transformer.py: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj)
    targets: tuple[str, ...] = DEFAULT_TARGETS
    dropout: float = 0.0  # adapter-input dropout: not implemented, must be 0
    # top-level parameter groups trained in full beside the adapters (PEFT's modules_to_save),
    # e.g. embed final_norm; PPO only. GPT-2's tied embedding is its output layer too
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"lora.rank={self.rank}: must be >= 1")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha={self.alpha}: must be > 0")
        if not self.targets:
            raise ValueError("lora.targets is empty: name the projections to adapt, e.g. q_proj")
        if self.dropout != 0.0:
            raise ValueError(f"lora.dropout={self.dropout}: LoRA dropout is not implemented; set 0")

    @property
    def scale(self) -> float:
        """``alpha / r``, the factor of ``A @ B``."""
        return self.alpha / self.rank


def _path_str(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def target_paths(params: Any, cfg: LoRAConfig) -> list[str]:
    """The adapted kernels of ``params`` (an ``nnx.State``): ``layers/.../<name>/kernel`` paths
    whose ``<name>`` fully matches one of ``cfg.targets``. A target that matches nothing is
    skipped (GPT-2 has no ``gate_proj``), as PEFT does; none matching at all raises."""
    paths, names = [], set()
    for path, _ in nnx.to_flat_state(params):
        if len(path) < 3 or path[0] != "layers" or path[-1] != "kernel":
            continue
        names.add(str(path[-2]))
        if any(re.fullmatch(t, str(path[-2])) for t in cfg.targets):
            paths.append(_path_str(path))
    if not paths:
        raise ValueError(
            f"lora.targets {list(cfg.targets)} match no kernel of this model; its layer kernels "
            f"are {sorted(names)}"
        )
    return paths


def init_adapters(params: Any, cfg: LoRAConfig, key: jax.Array) -> dict[str, dict[str, Any]]:
    """``{path: {"a": A [..., in, r], "b": B [..., r, out]}}`` for the targeted kernels.

    ``B = 0``; ``A ~ U(-1/sqrt(in), 1/sqrt(in))`` (PEFT's default, module docstring). Only the
    kernels' shapes and dtypes are read, so ``params`` may be abstract (``jax.ShapeDtypeStruct``).
    The adapters take the kernel's dtype.
    """
    flat = {_path_str(p): v for p, v in nnx.to_flat_state(params)}
    out = {}
    for i, path in enumerate(target_paths(params, cfg)):
        w = flat[path]
        w = w.get_value() if isinstance(w, nnx.Variable) else w
        *lead, d_in, d_out = w.shape
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(
            jax.random.fold_in(key, i), (*lead, d_in, cfg.rank), jnp.float32, -bound, bound
        )
        out[path] = {
            "a": a.astype(w.dtype),
            "b": jnp.zeros((*lead, cfg.rank, d_out), w.dtype),
        }
    return out


def merge(base: Any, adapters: dict[str, Any], cfg: LoRAConfig, heads: Any = None) -> nnx.State:
    """The adapted parameters: ``W + (alpha / r) A @ B`` for each adapter, the base elsewhere.

    Args:
      base: the frozen ``nnx.State`` (read, never modified or copied beyond the merged kernels).
      adapters: :func:`init_adapters`' layout; ``A @ B`` is computed in float32 and the sum cast
        to the kernel's dtype (so ``B = 0`` gives the base kernel exactly).
      heads: an ``nnx.State`` of fully trained parameters (a value or score head) that replace or
        extend the base's top-level entries, or None.

    Returns:
      An ``nnx.State`` for ``nnx.merge(graphdef, ...)`` of the model the base (plus heads)
      belongs to. Pure and differentiable in ``adapters`` and ``heads``.
    """
    flat = []
    found = set()
    for path, var in nnx.to_flat_state(base):
        key = _path_str(path)
        if heads is not None and path[0] in heads:
            continue
        if key in adapters:
            w = var.get_value()
            a, b = adapters[key]["a"], adapters[key]["b"]
            delta = jnp.einsum(
                "...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32)
            )  # [..., in, out]
            var = var.replace((w.astype(jnp.float32) + cfg.scale * delta).astype(w.dtype))
            found.add(key)
        flat.append((path, var))
    if len(found) != len(adapters):
        raise ValueError(f"adapters for kernels not in the base: {sorted(set(adapters) - found)}")
    if heads is not None:
        flat.extend(nnx.to_flat_state(heads))
    return nnx.from_flat_state(flat)


# ------------------------------------------------------------------------------------------
# PEFT export
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PeftAdapter:
    """What ``final/adapter/`` is written from: the adapters, their config, the model's config
    (:class:`rlhf_jax.models.ModelConfig`) and the base checkpoint's name or path."""

    adapters: Any
    cfg: LoRAConfig
    model_config: Any
    base_model: str = ""


def _module_layout(model_config) -> dict[tuple, tuple[str, Any]]:
    # the HF name of each of our per-layer parameters: the one mapping of models/hf.py
    from rlhf_jax.models.hf import _hf_layout

    return _hf_layout(model_config)[1]


def peft_tensors(adapter: PeftAdapter) -> tuple[dict[str, np.ndarray], dict]:
    """``(tensors, adapter_config)`` in PEFT's format (module docstring).

    Keys ``base_model.model.<HF module>.lora_{A,B}.weight``, float32 ``[r, in]`` and
    ``[out, r]`` (``[k r, in]``, ``[out, k r]`` for a fused HF module).
    """
    config = adapter.model_config
    per = _module_layout(config)
    base = "transformer." if config.arch == "gpt2" else "model."
    cfg = adapter.cfg
    modules: dict[str, list] = {}  # HF module -> [(how, A [in, r], B [r, out])]
    for path, ab in adapter.adapters.items():
        parts = tuple(path.split("/"))
        if parts[0] != "layers" or parts[1:] not in per:
            raise ValueError(f"no Hugging Face name for the adapted kernel {path}")
        name, how = per[parts[1:]]
        if how not in ("T", "id", "q", "k", "v") and not isinstance(how, tuple):
            raise ValueError(f"{path} ({how}) has no PEFT LoRA form")
        a, b = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)
        for i in range(a.shape[0]):
            module = base + name.format(i=i).removesuffix(".weight")
            modules.setdefault(module, []).append((how, a[i], b[i]))
    tensors, fused = {}, {}
    r = cfg.rank
    for module, entries in modules.items():
        prefix = f"base_model.model.{module}"
        if len(entries) == 1 and entries[0][0] in ("T", "id"):
            _, a, b = entries[0]
            tensors[prefix + ".lora_A.weight"] = np.ascontiguousarray(a.T)  # [r, in]
            tensors[prefix + ".lora_B.weight"] = np.ascontiguousarray(b.T)  # [out, r]
            continue
        # fused along the output axis: blocks in HF order, B block-diagonal
        spans = {}
        d_out = entries[0][2].shape[-1]
        for how, _, _ in entries:
            if isinstance(how, tuple):
                spans[how] = (how[1], how[2], how[3])
            else:
                j = "qkv".index(how)
                spans[how] = (j * d_out, (j + 1) * d_out, 3 * d_out)
        entries = sorted(entries, key=lambda e: spans[e[0]][0])
        total = spans[entries[0][0]][2]
        k = len(entries)
        a_peft = np.concatenate([a.T for _, a, _ in entries], 0)  # [k r, in]
        b_peft = np.zeros((total, k * r), np.float32)  # [out, k r]
        for j, (how, _, b) in enumerate(entries):
            lo, hi, _ = spans[how]
            b_peft[lo:hi, j * r : (j + 1) * r] = b.T
        tensors[prefix + ".lora_A.weight"] = a_peft
        tensors[prefix + ".lora_B.weight"] = b_peft
        fused[module.rsplit(".", 1)[-1]] = k
    targets = sorted({m.rsplit(".", 1)[-1] for m in modules})
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": adapter.base_model,
        "r": r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": config.arch == "gpt2",  # GPT-2's Conv1D stores [in, out]
        "init_lora_weights": True,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {m: k * r for m, k in fused.items()},
        "alpha_pattern": {m: k * cfg.alpha for m, k in fused.items()},
    }
    return tensors, adapter_config


def save_peft(adapter: PeftAdapter, path: str) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``path`` (created)."""
    import safetensors.numpy

    tensors, adapter_config = peft_tensors(adapter)
    # safetensors writes the raw buffer: C order (a concatenation of transposes is Fortran's)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(adapter_config, f, indent=2, sort_keys=True)
    safetensors.numpy.save_file(
        tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"}
    )

"""Hugging Face checkpoints <-> :class:`~rlhf_jax.models.Model`: safetensors + config.json.

``from_pretrained(path)`` reads ``config.json`` and ``model.safetensors`` (or the shards listed in
``model.safetensors.index.json``) straight into the parameter pytree, one parameter at a time,
through the ``safetensors`` library (``safe_open(..., framework="numpy")``): the headers are read
up front and each tensor is copied out of a memory map when it is needed, the map closed again,
so the host holds at most one stacked ``[L, ...]`` parameter beside the parameters already
placed (``experiments/bench_model.py`` prints the peak). With ``shardings`` each device receives
only its own slice (``jax.make_array_from_callback``), so no device holds a full copy. No
PyTorch, no pickle, no code from the checkpoint runs. A directory, config or file that cannot be
used raises :class:`ModelLoadError` (a :class:`rlhf_jax.errors.UserError`) naming the file.

``save_pretrained(model, path)`` writes ``config.json`` + ``model.safetensors`` (with
``safetensors.numpy.save_file``; optionally sharded with an index, which bounds the host memory
of the write to one shard) that ``transformers.AutoModelForCausalLM`` loads with
the same logits (golden-tested). A reward model (score head, no LM head) is written in the
``*ForSequenceClassification`` layout with ``num_labels=1`` (see :func:`save_pretrained` for
where the score's constant goes). A value head is not written (it is not part of the HF
layouts).

Tensor names (``{i}`` the layer; ``W`` = ``.weight``, Linear weights are ``[out, in]`` and are
transposed, GPT-2 ``Conv1D`` weights are ``[in, out]`` and are not)::

    ours                       gpt2 (transformer.)             llama, mistral, qwen2/3 (model.)
    embed                      wte.W                           embed_tokens.W
    pos_embed                  wpe.W                           -
    attn_norm                  h.{i}.ln_1.{W,bias}             layers.{i}.input_layernorm.W
    attn/{q,k,v}_proj          h.{i}.attn.c_attn (split in 3)  layers.{i}.self_attn.{q,k,v}_proj
    attn/o_proj                h.{i}.attn.c_proj               layers.{i}.self_attn.o_proj
    attn/{q,k}_norm            -                               layers.{i}.self_attn.{q,k}_norm.W
    mlp_norm                   h.{i}.ln_2                      layers.{i}.post_attention_layernorm
    mlp/gate_proj              -                               layers.{i}.mlp.gate_proj
    mlp/up_proj                h.{i}.mlp.c_fc                  layers.{i}.mlp.up_proj
    mlp/down_proj              h.{i}.mlp.c_proj                layers.{i}.mlp.down_proj
    final_norm                 ln_f                            norm
    lm_head                    lm_head.W (absent when tied)    lm_head.W
    score_head                 score.W                         score.W

Gemma 2/3 name the norms input_layernorm (attn_norm), post_attention_layernorm (post_attn_norm),
pre_feedforward_layernorm (mlp_norm) and post_feedforward_layernorm (post_mlp_norm).
Phi-3 is the Llama layout with two fused Linear weights: ``self_attn.qkv_proj`` (rows: q, then k,
then v) and ``mlp.gate_up_proj`` (rows: gate, then up), split on load and re-fused on save.
Mixtral is the Mistral layout with the MLP of layer ``i`` under ``layers.{i}.block_sparse_moe.``
(the per-expert names that Hub checkpoints use and transformers 5 writes): ``gate.weight``
``[E, D]`` (our ``mlp/router``) and ``experts.{j}.w1`` / ``w3`` / ``w2`` ``.weight`` (expert
``j``'s gate / up / down Linear weights, stacked along the ``E`` axis of our
``mlp/experts/{gate,up,down}_proj``). transformers' in-memory fused ``experts.gate_up_proj`` layout
is not read.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy: safetensors reads BF16 through it)
import numpy as np
import safetensors
import safetensors.numpy
from flax import nnx

from rlhf_jax.errors import UserError, first_line
from rlhf_jax.models.apply import Model
from rlhf_jax.models.heads import ScoreHead
from rlhf_jax.models.transformer import GEMMA, ModelConfig, Transformer

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = (
    "gpt2",
    "llama",
    "mistral",
    "phi3",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3_text",
    "mixtral",
)
_ARCH_OF_TYPE = {"gemma3_text": "gemma3"}  # model_type -> ModelConfig.arch where they differ
_TYPE_OF_ARCH = {v: k for k, v in _ARCH_OF_TYPE.items()}
_ARCH_CLASS = {
    "gpt2": "GPT2",
    "llama": "Llama",
    "mistral": "Mistral",
    "phi3": "Phi3",
    "gemma2": "Gemma2",
    "gemma3": "Gemma3",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "mixtral": "Mixtral",
}
# Tensors of real checkpoints that hold no parameter (attention-mask buffers, RoPE caches).
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


class ModelLoadError(UserError, ValueError):
    """A model directory, checkpoint file or tokenizer that cannot be used: the message names the
    file (and tensor or key) and what to do. A ``ValueError`` too, for callers that catch that."""


# ------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


def _get(hf: dict, *names, default=None):
    for name in names:
        if hf.get(name) is not None:
            return hf[name]
    return default


def config_from_hf(
    hf: dict,
    *,
    dtype=None,
    param_dtype=None,
    scan_unroll: int = 1,
    attention: str = "auto",
    source: str = "config.json",
):
    """A :class:`ModelConfig` from a transformers ``config.json`` dict (v4 or v5 rope keys).

    Raises:
      ModelLoadError naming ``source``: an unsupported ``model_type`` (the message lists the
      supported ones), a missing key, or values :class:`ModelConfig` refuses.
    """
    kind = hf.get("model_type")
    if kind not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"{source}: model_type {kind!r} is not supported: rlhf_jax.models loads the "
            f"decoder-only families {', '.join(SUPPORTED_MODEL_TYPES)}; use a checkpoint of one "
            "of them"
        )
    try:
        config = _config_from_hf(hf, kind, dtype, param_dtype, scan_unroll, source)
        return config.replace(attention=attention)
    except KeyError as err:
        raise ModelLoadError(
            f"{source}: key {err.args[0]!r} is missing from this {kind} config: write the "
            "config.json that transformers saves"
        ) from None
    except ModelLoadError:
        raise
    except (ValueError, TypeError) as err:
        raise ModelLoadError(f"{source}: {first_line(err)}") from None


def _config_from_hf(hf, kind, dtype, param_dtype, scan_unroll, source):
    common = dict(
        arch=_ARCH_OF_TYPE.get(kind, kind),
        dtype=dtype or "float32",
        param_dtype=param_dtype or "float32",
        scan_unroll=scan_unroll,
        bos_token_id=_first(hf.get("bos_token_id")),
        eos_token_id=_first(hf.get("eos_token_id")),
        pad_token_id=_first(hf.get("pad_token_id")),
    )
    if kind == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            raise ModelLoadError(f"{source}: GPT-2 activation_function {act!r}: only the tanh GELU")
        if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx"):
            raise ModelLoadError(f"{source}: only GPT-2's default 1/sqrt(head_dim) attention scale")
        return ModelConfig(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["n_embd"],
            num_layers=hf["n_layer"],
            num_heads=hf["n_head"],
            num_kv_heads=hf["n_head"],
            intermediate_size=hf.get("n_inner") or 4 * hf["n_embd"],
            max_position_embeddings=hf["n_positions"],
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
            **common,
        )
    gemma = kind in ("gemma2", "gemma3_text")
    act = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
    if act != ("gelu_pytorch_tanh" if gemma else "silu"):
        raise ModelLoadError(
            f"{source}: hidden activation {act!r}: {kind} here uses "
            + ("gelu_pytorch_tanh (GeGLU)" if gemma else "silu (SwiGLU)")
        )
    mlp_bias = bool(hf.get("mlp_bias", False))
    if mlp_bias and kind != "llama":
        raise ModelLoadError(f"{source}: mlp_bias=true: only the llama layout has MLP biases")
    window = None
    if kind in ("mistral", "phi3", "mixtral") or gemma:
        window = hf.get("sliding_window")
    elif hf.get("use_sliding_window") and hf.get("sliding_window"):
        raise ModelLoadError(
            f"{source}: {kind} sliding-window attention (use_sliding_window) is not supported; "
            "set it to false to load the model with full attention"
        )
    rope = dict(hf.get("rope_parameters") or {})
    local_theta = None
    if "full_attention" in rope:  # per-layer-type RoPE (Gemma 3)
        local = dict(rope.get("sliding_attention") or {})
        if local.get("rope_type", "default") != "default":
            raise ModelLoadError(f"{source}: sliding layers' rope_type must be 'default'")
        local_theta = local.get("rope_theta") or hf.get("rope_local_base_freq")
        rope = dict(rope["full_attention"])
    theta = rope.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
    partial = float(rope.pop("partial_rotary_factor", None) or hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0 and kind != "phi3":
        raise ModelLoadError(
            f"{source}: partial_rotary_factor={partial}: only phi3 rotates part of each head here"
        )
    scaling = rope or hf.get("rope_scaling")
    heads = hf["num_attention_heads"]
    if kind == "qwen2":
        bias = True
    else:
        bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=scaling or None,
        tie_word_embeddings=hf.get("tie_word_embeddings", gemma),
        attention_bias=bias,
        qk_norm=kind in ("qwen3", "gemma3_text"),
        mlp_bias=mlp_bias,
        sliding_window=window,
        partial_rotary_factor=partial,
        **(_gemma_fields(hf, kind, local_theta, source) if gemma else {}),
        **(_moe_fields(hf) if kind == "mixtral" else {}),
        **common,
    )


def _gemma_fields(hf: dict, kind: str, local_theta, source: str) -> dict:
    if hf.get("use_bidirectional_attention"):
        raise ModelLoadError(f"{source}: use_bidirectional_attention=true is not supported")
    types = hf.get("layer_types")
    if types is None:  # transformers' default patterns
        n = hf["num_hidden_layers"]
        every = hf.get("sliding_window_pattern") or (2 if kind == "gemma2" else 6)
        types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n)]
    return dict(
        layer_types=tuple(types),
        rope_local_theta=None if local_theta is None else float(local_theta),
        attn_logit_softcap=hf.get("attn_logit_softcapping"),
        final_logit_softcap=hf.get("final_logit_softcapping"),
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar"),
    )


def _moe_fields(hf: dict) -> dict:
    """Mixtral's expert count and top-k. ``router_aux_loss_coef`` and ``router_jitter_noise``
    are training options of transformers that rlhf_jax does not implement (not read)."""
    return dict(num_experts=hf["num_local_experts"], num_experts_per_tok=hf["num_experts_per_tok"])


def _layer_types(c: ModelConfig) -> tuple:
    return tuple("sliding_attention" if s else "full_attention" for s in c.layer_sliding())


def _first(token_id):
    if isinstance(token_id, list | tuple):
        return int(token_id[0]) if token_id else None
    return token_id


def config_to_hf(config: ModelConfig, *, sequence_classification: bool = False) -> dict:
    """The transformers ``config.json`` dict of ``config`` (rope keys of transformers 5)."""
    c = config
    cls = _ARCH_CLASS[c.arch] + (
        ("TextForSequenceClassification" if c.arch == "gemma3" else "ForSequenceClassification")
        if sequence_classification
        else ("LMHeadModel" if c.arch == "gpt2" else "ForCausalLM")
    )
    out: dict[str, Any] = {
        "architectures": [cls],
        "model_type": _TYPE_OF_ARCH.get(c.arch, c.arch),
        "vocab_size": c.vocab_size,
    }
    if c.arch == "gpt2":
        out.update(
            n_embd=c.hidden_size,
            n_layer=c.num_layers,
            n_head=c.num_heads,
            n_inner=c.intermediate_size,
            n_positions=c.max_position_embeddings,
            layer_norm_epsilon=c.norm_eps,
            activation_function="gelu_new",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    else:
        rope = {"rope_type": "default", "rope_theta": c.rope_theta}
        if c.rope_scaling is not None:
            rope = {**dict(c.rope_scaling), "rope_theta": c.rope_theta}
        if c.partial_rotary_factor != 1.0 and c.arch != "phi3":
            raise ValueError(f"{c.arch}: partial_rotary_factor is a phi3 option")
        if c.arch == "phi3":
            rope["partial_rotary_factor"] = c.partial_rotary_factor
        out.update(
            hidden_size=c.hidden_size,
            num_hidden_layers=c.num_layers,
            num_attention_heads=c.num_heads,
            num_key_value_heads=c.num_kv_heads,
            head_dim=c.head_dim,
            intermediate_size=c.intermediate_size,
            max_position_embeddings=c.max_position_embeddings,
            rms_norm_eps=c.norm_eps,
            hidden_act="silu",
            rope_parameters=rope,
            attention_dropout=0.0,
        )
        if c.arch == "qwen2" and not c.attention_bias:
            raise ValueError("qwen2 always has q/k/v biases: save this model as arch='llama'")
        if c.arch in ("mistral", "phi3", "mixtral") and c.attention_bias:
            raise ValueError(f"{c.arch} has no q/k/v biases: save this model as arch='llama'")
        if c.arch in ("llama", "qwen3"):
            out["attention_bias"] = bool(c.attention_bias)
        if c.mlp_bias and c.arch != "llama":
            raise ValueError(f"{c.arch} has no MLP biases: save this model as arch='llama'")
        if c.arch == "llama":
            out["mlp_bias"] = bool(c.mlp_bias)
        windowed = ("mistral", "phi3", "mixtral", *GEMMA)
        if c.sliding_window is not None and c.arch not in windowed:
            raise ValueError(
                f"{c.arch}: sliding_window is a mistral / phi3 / mixtral / gemma option"
            )
        if c.arch in windowed:
            out["sliding_window"] = c.sliding_window
        if c.moe:
            out.update(
                num_local_experts=c.num_experts,
                num_experts_per_tok=c.num_experts_per_tok,
                output_router_logits=False,
                router_jitter_noise=0.0,
            )
        gemma_only = dict(
            layer_types=c.layer_types,
            rope_local_theta=c.rope_local_theta,
            attn_logit_softcap=c.attn_logit_softcap,
            final_logit_softcap=c.final_logit_softcap,
            query_pre_attn_scalar=c.query_pre_attn_scalar,
        )
        if not c.gemma and any(v is not None for v in gemma_only.values()):
            raise ValueError(f"{c.arch}: {sorted(k for k, v in gemma_only.items() if v)} are gemma")
        if c.gemma:
            if c.mlp_bias or c.attention_bias:
                raise ValueError(f"{c.arch} has no biases")
            out.pop("hidden_act")
            out.update(
                hidden_activation="gelu_pytorch_tanh",
                attention_bias=False,
                layer_types=list(_layer_types(c)),
                query_pre_attn_scalar=c.query_pre_attn_scalar or c.head_dim,
                attn_logit_softcapping=c.attn_logit_softcap,
                final_logit_softcapping=c.final_logit_softcap,
            )
            if c.arch == "gemma3":
                local = c.rope_theta if c.rope_local_theta is None else c.rope_local_theta
                out["rope_parameters"] = {
                    "full_attention": rope,
                    "sliding_attention": {"rope_type": "default", "rope_theta": local},
                }
                out["use_bidirectional_attention"] = False
            elif c.rope_local_theta is not None:
                raise ValueError("gemma2 has one RoPE base: rope_local_theta is gemma3's")
        if c.arch == "phi3" and (c.attention_bias or c.mlp_bias):
            raise ValueError("phi3 has no biases: save this model as arch='llama'")
        if c.arch in ("qwen2", "qwen3"):
            out["use_sliding_window"] = False
    out.update(
        tie_word_embeddings=bool(c.tie_word_embeddings),
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
        dtype=c.param_dtype,
    )
    if sequence_classification:
        out.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    return out


# ------------------------------------------------------------------------------------------
# Name mapping


def _hf_layout(config: ModelConfig) -> tuple[dict, dict]:
    """``(top, per_layer)``: our path -> (HF name, how), how one of 'T', 'ET', 'id', 'q', 'k', 'v'
    or ``("rows", lo, hi, total)``.

    'T' transposes a Linear ``[out, in]`` weight; 'q'/'k'/'v' take a third of GPT-2's fused
    ``c_attn`` along its last axis; ``("rows", lo, hi, total)`` takes rows ``lo:hi`` of a fused
    Linear ``[total, in]`` weight (Phi-3's ``qkv_proj`` and ``gate_up_proj``) and transposes
    them. 'ET' stacks the ``E`` transposed Linear weights of the experts (names with ``{j}``).
    Per-layer names hold ``{i}``.
    """
    if config.arch == "gpt2":
        top = {
            ("embed", "embedding"): ("wte.weight", "id"),
            ("pos_embed", "embedding"): ("wpe.weight", "id"),
            ("final_norm", "scale"): ("ln_f.weight", "id"),
            ("final_norm", "bias"): ("ln_f.bias", "id"),
        }
        h = "h.{i}."
        per = {
            ("attn_norm", "scale"): (h + "ln_1.weight", "id"),
            ("attn_norm", "bias"): (h + "ln_1.bias", "id"),
            ("mlp_norm", "scale"): (h + "ln_2.weight", "id"),
            ("mlp_norm", "bias"): (h + "ln_2.bias", "id"),
            ("attn", "o_proj", "kernel"): (h + "attn.c_proj.weight", "id"),
            ("attn", "o_proj", "bias"): (h + "attn.c_proj.bias", "id"),
            ("mlp", "up_proj", "kernel"): (h + "mlp.c_fc.weight", "id"),
            ("mlp", "up_proj", "bias"): (h + "mlp.c_fc.bias", "id"),
            ("mlp", "down_proj", "kernel"): (h + "mlp.c_proj.weight", "id"),
            ("mlp", "down_proj", "bias"): (h + "mlp.c_proj.bias", "id"),
        }
        for part in "qkv":
            per[("attn", f"{part}_proj", "kernel")] = (h + "attn.c_attn.weight", part)
            per[("attn", f"{part}_proj", "bias")] = (h + "attn.c_attn.bias", part)
        return top, per
    top = {
        ("embed", "embedding"): ("embed_tokens.weight", "id"),
        ("final_norm", "scale"): ("norm.weight", "id"),
    }
    h = "layers.{i}."
    per = {
        ("attn_norm", "scale"): (h + "input_layernorm.weight", "id"),
        ("mlp_norm", "scale"): (h + "post_attention_layernorm.weight", "id"),
        ("attn", "q_norm", "scale"): (h + "self_attn.q_norm.weight", "id"),
        ("attn", "k_norm", "scale"): (h + "self_attn.k_norm.weight", "id"),
    }
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        per[("attn", name, "kernel")] = (h + f"self_attn.{name}.weight", "T")
        per[("attn", name, "bias")] = (h + f"self_attn.{name}.bias", "id")
    for name in ("gate_proj", "up_proj", "down_proj"):
        per[("mlp", name, "kernel")] = (h + f"mlp.{name}.weight", "T")
        per[("mlp", name, "bias")] = (h + f"mlp.{name}.bias", "id")
    if config.gemma:  # sandwich norms
        per[("mlp_norm", "scale")] = (h + "pre_feedforward_layernorm.weight", "id")
        per[("post_attn_norm", "scale")] = (h + "post_attention_layernorm.weight", "id")
        per[("post_mlp_norm", "scale")] = (h + "post_feedforward_layernorm.weight", "id")
    if config.moe:  # Mixtral: the router and E experts' Linear weights [out, in], stacked on E
        moe = h + "block_sparse_moe."
        per[("mlp", "router", "kernel")] = (moe + "gate.weight", "T")
        for ours, w in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
            per[("mlp", "experts", ours)] = (moe + "experts.{j}." + w + ".weight", "ET")
    if config.arch == "phi3":  # fused qkv_proj [(H + 2 Hkv) Dh, D], gate_up_proj [2F, D]
        q, kv, f = (
            config.num_heads * config.head_dim,
            config.num_kv_heads * config.head_dim,
            config.intermediate_size,
        )
        qkv = h + "self_attn.qkv_proj.weight"
        per[("attn", "q_proj", "kernel")] = (qkv, ("rows", 0, q, q + 2 * kv))
        per[("attn", "k_proj", "kernel")] = (qkv, ("rows", q, q + kv, q + 2 * kv))
        per[("attn", "v_proj", "kernel")] = (qkv, ("rows", q + kv, q + 2 * kv, q + 2 * kv))
        gate_up = h + "mlp.gate_up_proj.weight"
        per[("mlp", "gate_proj", "kernel")] = (gate_up, ("rows", 0, f, 2 * f))
        per[("mlp", "up_proj", "kernel")] = (gate_up, ("rows", f, 2 * f, 2 * f))
    return top, per


# ------------------------------------------------------------------------------------------
# safetensors, read tensor by tensor


def _open_safetensors(file: str):
    """``safetensors.safe_open(file, framework="numpy")``, a damaged file as a ModelLoadError."""
    try:
        return safetensors.safe_open(file, framework="numpy")
    except (safetensors.SafetensorError, OSError, ValueError) as err:
        raise ModelLoadError(
            f"{file}: not a readable safetensors file ({first_line(err)}): it is truncated or "
            "corrupt; copy or download it again, or re-save the model"
        ) from None


class _SafetensorsDir:
    """The tensors of a checkpoint directory by name (``safetensors.safe_open``, numpy).

    The headers are read once; each :meth:`get` opens the file again (a memory map), copies out
    one tensor and closes it, so the pages of the map are released after every tensor and the
    host holds no more than the copies the caller keeps.
    """

    def __init__(self, path: str):
        single = os.path.join(path, "model.safetensors")
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(single):
            files = [single]
        elif os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f).get("weight_map")
            except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as err:
                raise ModelLoadError(
                    f"{index}: not a safetensors index ({first_line(err)}): re-save the model"
                ) from None
            if not isinstance(weight_map, dict):
                raise ModelLoadError(f"{index}: no 'weight_map' object: re-save the model")
            files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
        else:
            found = sorted(os.listdir(path))
            hint = "copy the weights next to config.json"
            if any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in found):
                hint = (
                    "pickle checkpoints are never loaded: convert them to safetensors, e.g. "
                    "transformers' save_pretrained(..., safe_serialization=True)"
                )
            raise ModelLoadError(
                f"{path}: no model.safetensors or model.safetensors.index.json: {hint}"
            )
        self.entries: dict[str, tuple[str, str, tuple]] = {}
        for file in files:
            if not os.path.exists(file):
                raise ModelLoadError(
                    f"{file}: listed in model.safetensors.index.json but missing: copy or "
                    "download every shard"
                )
            with _open_safetensors(file) as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    self.entries[name] = (file, sl.get_dtype(), tuple(sl.get_shape()))

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple:
        return self.entries[name][2]

    def get(self, name: str) -> np.ndarray:
        """A fresh host copy of one tensor (the file's map is closed again: nothing cached)."""
        file, dtype, _ = self.entries[name]
        with _open_safetensors(file) as f:
            try:
                return f.get_tensor(name)
            except (safetensors.SafetensorError, TypeError, ValueError) as err:
                raise ModelLoadError(
                    f"{file}: tensor {name} ({dtype}) cannot be read ({first_line(err)}): "
                    "re-save the checkpoint in float32, float16 or bfloat16"
                ) from None


# ------------------------------------------------------------------------------------------
# from_pretrained


def read_hf_config(path: str) -> tuple[dict, str]:
    """``(config dict, file)`` of the ``config.json`` in the model directory ``path``."""
    if not os.path.isdir(path):
        raise ModelLoadError(f"{path}: no such model directory (give a Hugging Face model dir)")
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        raise ModelLoadError(
            f"{cfg_file}: not found: a model directory needs the config.json that "
            "transformers' save_pretrained writes beside the weights"
        )
    try:
        with open(cfg_file) as f:
            hf_cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{cfg_file}: not valid JSON ({first_line(err)})") from None
    if not isinstance(hf_cfg, dict):
        raise ModelLoadError(f"{cfg_file}: not a JSON object")
    return hf_cfg, cfg_file


def _path_str(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def _resolve_sharding(shardings, path: tuple, shape: tuple):
    if shardings is None:
        return None
    if isinstance(shardings, jax.sharding.Sharding):
        return shardings
    if callable(shardings):
        return shardings(_path_str(path), shape)
    flat = shardings if isinstance(shardings, dict) else dict(nnx.to_flat_state(shardings))
    if path not in flat:
        raise ValueError(f"shardings has no entry for parameter {_path_str(path)}")
    s = flat[path]
    return s.get_value() if isinstance(s, nnx.Variable) else s


def from_pretrained(
    path: str,
    *,
    dtype: str | None = None,
    param_dtype: str | None = None,
    scan_unroll: int = 1,
    attention: str = "auto",
    shardings: Any = None,
    lm_head: bool = True,
    value_head: bool = False,
    score_head: bool = False,
    key: jax.Array | None = None,
) -> Model:
    """Load a Hugging Face checkpoint directory into a :class:`Model`.

    Args:
      path: a directory with ``config.json`` and ``model.safetensors`` (or a sharded index).
      dtype, param_dtype: compute / parameter dtype (``'float32'`` default, or ``'bfloat16'``).
      scan_unroll: layers per iteration of the layer scan (:class:`ModelConfig`; a run-time
        choice, not read from the checkpoint).
      attention: how attention is computed (:attr:`ModelConfig.attention`; run-time, not saved).
      shardings: where to place each parameter: None (default device), one ``Sharding`` for all,
        a callable ``(path 'layers/attn/q_proj/kernel', shape) -> Sharding``, or a pytree of
        shardings with the params' structure (e.g. ``rlhf_jax.parallel.param_shardings``).
      lm_head, value_head, score_head: the heads to build. The value head is zero-initialised.
        The score head is read from ``score.weight`` (a ``*ForSequenceClassification``
        checkpoint, ``num_labels = 1``), or freshly initialised from ``key`` when absent.

    Raises:
      ValueError / FileNotFoundError naming the file and tensor: unsupported architecture,
      missing tensor, wrong shape.
    """
    hf_cfg, cfg_file = read_hf_config(path)
    config = config_from_hf(
        hf_cfg,
        dtype=dtype,
        param_dtype=param_dtype,
        scan_unroll=scan_unroll,
        attention=attention,
        source=cfg_file,
    )
    store = _SafetensorsDir(path)
    heads = dict(lm_head=lm_head, value_head=value_head, score_head=score_head)
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0), **heads))
    graphdef, shapes = nnx.split(abstract, nnx.Param)

    base = _base_prefix(store, config, path)
    top, per = _hf_layout(config)
    used: set[str] = set()
    wdtype = np.dtype(config.weight_dtype)

    def fetch(name: str) -> np.ndarray:
        for candidate in (base + name, name):
            if candidate in store:
                used.add(candidate)
                return store.get(candidate)
        raise ModelLoadError(f"{path}: tensor {base + name} is missing from the checkpoint")

    def load_one(ours: tuple, expected: tuple) -> np.ndarray:
        if ours[0] == "layers":
            name, how = per[ours[1:]]
            out = np.empty(expected, wdtype)
            for i in range(config.num_layers):
                if how == "ET":  # [L, E, in, out] from E Linear weights per layer
                    for j in range(expected[1]):
                        n = name.format(i=i, j=j)
                        out[i, j] = _transform(fetch(n), "T", n, expected[2:], path)
                    continue
                out[i] = _transform(
                    fetch(name.format(i=i)), how, name.format(i=i), expected[1:], path
                )
            return out
        if ours == ("lm_head", "kernel"):
            return _transform(fetch_abs("lm_head.weight"), "T", "lm_head.weight", expected, path)
        if ours[0] == "score_head":
            return score_params[ours[1]]
        name, how = top[ours]
        return _transform(fetch(name), how, base + name, expected, path)

    def fetch_abs(name):
        if name in store:
            used.add(name)
            return store.get(name)
        raise ModelLoadError(f"{path}: tensor {name} is missing from the checkpoint")

    score_params = _score_params(store, config, hf_cfg, key, used) if score_head else {}
    flat = []
    for p, var in nnx.to_flat_state(shapes):
        expected = tuple(var.get_value().shape)
        if p[0] == "value_head":
            arr = np.zeros(expected, np.dtype(var.get_value().dtype))
        else:
            arr = np.asarray(load_one(p, expected))
            if arr.shape != expected:
                raise ModelLoadError(
                    f"{path}: parameter {_path_str(p)} should be {expected}, got {arr.shape}: "
                    "config.json does not match the weights"
                )
            arr = arr.astype(var.get_value().dtype, copy=False)
        sharding = _resolve_sharding(shardings, p, expected)
        if sharding is None:
            value = jax.device_put(arr)
        else:
            value = jax.make_array_from_callback(expected, sharding, lambda idx, a=arr: a[idx])
        del arr
        flat.append((p, var.replace(value)))
    unused = sorted(
        n
        for n in store.entries
        if n not in used
        and not n.endswith(_BUFFER_SUFFIXES)
        and not (n == "lm_head.weight" and (config.tie_word_embeddings or not lm_head))
    )
    if unused:
        log.warning("%s: %d checkpoint tensors not loaded: %s", path, len(unused), unused[:8])
    return Model(graphdef=graphdef, params=nnx.from_flat_state(flat), config=config)


def _base_prefix(store: _SafetensorsDir, config: ModelConfig, path: str) -> str:
    embed = "wte.weight" if config.arch == "gpt2" else "embed_tokens.weight"
    for prefix in ("transformer.", "model.", ""):
        if prefix + embed in store:
            return prefix
    raise ModelLoadError(
        f"{path}: no token embedding ({embed}) in the checkpoint: the weights are not those of "
        f"a {config.arch} model; use the config.json saved with them"
    )


def _transform(x: np.ndarray, how, name: str, expected: tuple, path: str) -> np.ndarray:
    if isinstance(how, tuple):  # ("rows", lo, hi, total) of a fused Linear weight
        _, lo, hi, total = how
        want = (total, expected[0])
    elif how == "T":
        want = tuple(reversed(expected))
    elif how in "qkv":
        want = expected[:-1] + (3 * expected[-1],)
    else:
        want = expected
    if tuple(x.shape) != want:
        raise ModelLoadError(
            f"{path}: tensor {name} has shape {tuple(x.shape)}, expected {want}: config.json "
            "does not match the weights; use the config.json saved with them"
        )
    if isinstance(how, tuple):
        return x[how[1] : how[2]].T
    if how == "T":
        return x.T
    if how in "qkv":
        d = expected[-1]
        i = "qkv".index(how)
        return x[..., i * d : (i + 1) * d]
    return x


def _score_params(store, config, hf_cfg, key, used) -> dict:
    d = config.hidden_size
    if "score.weight" in store:
        w = store.get("score.weight")
        if w.shape != (1, d):
            raise ModelLoadError(
                f"tensor score.weight has shape {w.shape}, expected (1, {d}): a reward model "
                "has num_labels=1; load it with score_head=False"
            )
        used.add("score.weight")
        bias = np.zeros((1,), np.float32)
        if "score.bias" in store:
            bias = np.asarray(store.get("score.bias"), np.float32).reshape(1)
            used.add("score.bias")
        offset = float(hf_cfg.get("rlhf_jax_score_offset", 0.0))
        return {
            "kernel": np.asarray(w).T,
            "bias": bias,
            "reward_gain": np.ones((), np.float32),
            "reward_bias": np.asarray(offset, np.float32),
        }
    log.info("no score.weight in the checkpoint: the score head is freshly initialised")
    key = jax.random.key(0) if key is None else key
    head = ScoreHead(d, param_dtype=config.weight_dtype, rngs=nnx.Rngs(params=key))
    state = nnx.to_flat_state(nnx.state(head, nnx.Param))
    return {p[0]: np.asarray(v.get_value()) for p, v in state}


# ------------------------------------------------------------------------------------------
# save_pretrained


def _hf_tensors(model: Model) -> tuple[list[tuple[str, tuple, np.dtype, Callable]], dict]:
    """Lazily computed HF tensors ``(name, shape, dtype, make)`` and the extra config keys."""
    config = model.config
    flat = {p: v.get_value() for p, v in nnx.to_flat_state(model.params)}
    module = nnx.merge(model.graphdef, model.params)
    top, per = _hf_layout(config)
    base = "transformer." if config.arch == "gpt2" else "model."
    seq_cls = module.has_score_head and not module.has_lm_head
    out: list = []
    extra: dict = {}

    def add(name, shape, dtype, make):
        out.append((name, tuple(shape), np.dtype(dtype), make))

    for ours, (name, _) in top.items():
        if ours in flat:
            x = flat[ours]
            add(base + name, x.shape, x.dtype, lambda x=x: np.asarray(x))
    fused, fused_rows = {}, {}
    for ours, (name, how) in per.items():
        full = ("layers",) + ours
        if full not in flat:
            continue
        x = flat[full]
        for i in range(config.num_layers):
            if how == "ET":  # one Linear weight [out, in] per expert
                for j in range(x.shape[1]):
                    hf = base + name.format(i=i, j=j)
                    add(hf, x.shape[2:][::-1], x.dtype, lambda x=x, i=i, j=j: np.asarray(x[i, j]).T)
                continue
            hf = base + name.format(i=i)
            if isinstance(how, tuple):  # a row block of a fused Linear weight
                fused_rows.setdefault(hf, []).append((how[1], x, i))
                continue
            if how in "qkv":
                fused.setdefault(hf, {})[how] = (x, i)
                continue
            shape = x.shape[1:][::-1] if how == "T" else x.shape[1:]
            make = (
                (lambda x=x, i=i: np.asarray(x[i]).T)
                if how == "T"
                else (lambda x=x, i=i: np.asarray(x[i]))
            )
            add(hf, shape, x.dtype, make)
    for hf, parts in fused.items():
        (xq, i) = parts["q"]
        shape = xq.shape[1:-1] + (3 * xq.shape[-1],)

        def make(parts=parts):
            return np.concatenate([np.asarray(parts[c][0][parts[c][1]]) for c in "qkv"], -1)

        add(hf, shape, xq.dtype, make)
    for hf, parts in fused_rows.items():
        parts.sort(key=lambda part: part[0])
        x0 = parts[0][1]
        shape = (sum(p[1].shape[-1] for p in parts), x0.shape[-2])

        def make(parts=parts):
            return np.concatenate([np.asarray(x[i]).T for _, x, i in parts], 0)

        add(hf, shape, x0.dtype, make)
    if module.has_lm_head and not config.tie_word_embeddings:
        x = flat[("lm_head", "kernel")]
        add("lm_head.weight", x.shape[::-1], x.dtype, lambda x=x: np.asarray(x).T)
    if seq_cls:
        w, offset, ln_f_bias = _score_export(config, flat)
        if ln_f_bias is not None:  # the constant folded into GPT-2's ln_f.bias
            i = next(j for j, t in enumerate(out) if t[0] == base + "ln_f.bias")
            out[i] = (out[i][0], out[i][1], out[i][2], lambda b=ln_f_bias: b)
        if offset != 0.0:
            extra["rlhf_jax_score_offset"] = offset
        add("score.weight", w.shape, w.dtype, lambda w=w: w)
    return out, extra


def _score_export(config: ModelConfig, flat: dict) -> tuple[np.ndarray, float, Any]:
    """``(score.weight [1, D], offset, new ln_f.bias or None)`` of a score head.

    Ours is ``gain * (h . k + b) + r`` and transformers' ``score.weight . h``, so
    ``score.weight = gain * k.T`` and the constant ``c = gain * b + r`` needs a home. GPT-2's
    final LayerNorm ends in a bias that feeds nothing but the score (no LM head is exported with
    a reward model): ``ln_f.bias += c w / (w . w)`` adds exactly ``c`` to ``w . h``. The part of
    ``c`` that rounding to the parameter dtype loses (float32: ~1e-7 of the score scale;
    bfloat16: more) and, for the RMSNorm families, all of ``c`` is returned as ``offset``.
    """
    k = np.asarray(flat[("score_head", "kernel")])
    gain = float(np.asarray(flat[("score_head", "reward_gain")]))
    b = float(np.asarray(flat[("score_head", "bias")], np.float64).reshape(()))
    c = gain * b + float(np.asarray(flat[("score_head", "reward_bias")]))
    w = (np.asarray(k, np.float64).T * gain).astype(k.dtype)  # [1, D]
    w64 = np.asarray(w, np.float64)[0]
    norm2 = float(w64 @ w64)
    if config.arch != "gpt2" or c == 0.0 or norm2 == 0.0:
        return w, c, None
    beta = np.asarray(flat[("final_norm", "bias")])
    folded = (np.asarray(beta, np.float64) + c * w64 / norm2).astype(beta.dtype)
    achieved = float(w64 @ (np.asarray(folded, np.float64) - np.asarray(beta, np.float64)))
    return w, c - achieved, folded


def _write_safetensors(file: str, tensors: list) -> None:
    """Write ``tensors`` (name, shape, dtype, make) to one safetensors file
    (``safetensors.numpy.save_file``); the host holds this file's tensors while it is written.
    Written to a temporary name, then renamed: a crash leaves no half-written file behind."""
    arrays = {}
    for name, shape, dt, make in tensors:
        x = np.ascontiguousarray(make(), dtype=dt)
        if x.shape != shape:
            raise AssertionError(f"internal: {name} made {x.shape}, declared {shape}")
        arrays[name] = x
    tmp = file + ".partial"
    safetensors.numpy.save_file(arrays, tmp, metadata={"format": "pt"})
    os.replace(tmp, file)


def save_pretrained(model: Model, path: str, *, max_shard_bytes: int | None = None) -> None:
    """Write ``config.json`` + ``model.safetensors`` (or shards + index) for transformers.

    Args:
      model: a :class:`Model` (params on any devices; each tensor is gathered to the host once).
      path: output directory (created).
      max_shard_bytes: split the weights into ``model-0000i-of-0000n.safetensors`` files of at
        most this size (one tensor may exceed it) with ``model.safetensors.index.json``. The
        host holds one file's tensors while it is written: set this to bound that memory.

    A reward model (a score head and no LM head) is written as ``*ForSequenceClassification``
    with ``num_labels=1``. Our score is ``gain * (h . kernel + bias) + reward_bias``;
    transformers' is ``score.weight . h`` with no bias, so ``score.weight = gain * kernel.T`` and
    the constant ``c = gain * bias + reward_bias`` goes:

    - GPT-2: into ``ln_f.bias`` along the score direction, ``ln_f.bias += c w / (w . w)``. The
      final LayerNorm feeds nothing else (no LM head is exported with a reward model), so
      ``AutoModelForSequenceClassification`` gives our scores (to float32 rounding). The export's
      ``ln_f.bias`` therefore differs from the trunk's; loading it back gives the same scores.
    - Llama, Qwen2, Qwen3: nowhere exact. Their final RMSNorm has no additive term and its
      output is invariant to scaling its input, so no constant survives it, and transformers'
      ``score`` layer has no bias. ``c`` is written to ``config.json`` as
      ``rlhf_jax_score_offset``: :func:`from_pretrained` adds it back (same scores), but a
      transformers user gets ``score - c`` and must add ``config.rlhf_jax_score_offset`` to the
      logits. Rank-based uses (comparisons, best-of-n) are unaffected.

    Only what rounding to the parameter dtype loses of ``c`` (GPT-2) is kept in
    ``rlhf_jax_score_offset``; the key is absent when nothing is left.
    """
    os.makedirs(path, exist_ok=True)
    tensors, extra = _hf_tensors(model)
    tensors.sort(key=lambda t: t[0])
    module = nnx.merge(model.graphdef, model.params)
    seq_cls = module.has_score_head and not module.has_lm_head
    hf_cfg = config_to_hf(model.config, sequence_classification=seq_cls)
    hf_cfg.update(extra)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2, sort_keys=True)
    groups = list(_shard_groups(tensors, max_shard_bytes))
    if len(groups) == 1:
        for stale in ("model.safetensors.index.json",):
            if os.path.exists(os.path.join(path, stale)):
                os.remove(os.path.join(path, stale))
        _write_safetensors(os.path.join(path, "model.safetensors"), groups[0])
        return
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        _write_safetensors(os.path.join(path, name), group)
        for t in group:
            weight_map[t[0]] = name
            total += int(np.prod(t[1], dtype=np.int64)) * t[2].itemsize
    if os.path.exists(os.path.join(path, "model.safetensors")):
        os.remove(os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _shard_groups(tensors: list, max_bytes: int | None) -> Iterator[list]:
    if not max_bytes:
        yield tensors
        return
    group, size = [], 0
    for t in tensors:
        nbytes = int(np.prod(t[1], dtype=np.int64)) * t[2].itemsize
        if group and size + nbytes > max_bytes:
            yield group
            group, size = [], 0
        group.append(t)
        size += nbytes
    if group:
        yield group


# ------------------------------------------------------------------------------------------
# Tokenizers


def load_tokenizer(path: str, *, config: ModelConfig | None = None):
    """``transformers.AutoTokenizer`` from ``path`` (local files only, no remote code).

    The chat template saved with the tokenizer is kept. With ``config`` (or a ``config.json`` in
    ``path``), checks that every token id fits the model's vocabulary.
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as err:
        raise ModelLoadError(
            f"{path}: no usable tokenizer ({first_line(err)}): give the directory the "
            "tokenizer was saved to (tokenizer.json / tokenizer_config.json)"
        ) from None
    if config is None and os.path.exists(os.path.join(path, "config.json")):
        hf_cfg, cfg_file = read_hf_config(path)
        config = config_from_hf(hf_cfg, source=cfg_file)
    if config is not None:
        check_tokenizer(tok, config, source=path)
    return tok


def check_tokenizer(tokenizer, config: ModelConfig, *, source: str = "tokenizer") -> None:
    """Raise if the tokenizer can produce ids ``>= config.vocab_size``."""
    size = len(tokenizer)
    if size > config.vocab_size:
        raise ModelLoadError(
            f"{source}: the tokenizer has {size} tokens but the model's vocab_size is "
            f"{config.vocab_size}: use the tokenizer saved with this model, or resize the "
            "model's embeddings"
        )

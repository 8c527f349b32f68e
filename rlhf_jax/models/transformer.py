"""A decoder-only transformer LM in ``flax.nnx``: the GPT-2 and Llama families, with a KV cache.

One module covers the architectures RLHF researchers use most:

============  ==========  =========  ============  =========  ==========  ==============
arch          positions   norm       MLP           q/k/v bias  o bias      extra
============  ==========  =========  ============  =========  ==========  ==============
``gpt2``      learned     LayerNorm  GELU (tanh)   yes        yes         tied embeddings
``llama``     RoPE        RMSNorm    SwiGLU        option     = qkv bias  GQA, rope_scaling,
                                                                          MLP biases (option)
``mistral``   RoPE        RMSNorm    SwiGLU        no         no          GQA, sliding window
``phi3``      RoPE        RMSNorm    SwiGLU        no         no          GQA, sliding window,
                                                                          partial rotary
``gemma2``    RoPE        RMSNorm    GeGLU         no         no          see below
``gemma3``    RoPE        RMSNorm    GeGLU         no         no          see below, q/k norm
``qwen2``     RoPE        RMSNorm    SwiGLU        yes        no          GQA
``qwen3``     RoPE        RMSNorm    SwiGLU        option     = qkv bias  per-head q/k RMSNorm
``mixtral``   RoPE        RMSNorm    SwiGLU MoE    no         no          GQA, sliding window,
                                                                          top-k experts
============  ==========  =========  ============  =========  ==========  ==============

The formulas follow the Hugging Face ``transformers`` implementations (``modeling_gpt2.py``,
``modeling_llama.py``, ``modeling_mistral.py``, ``modeling_phi3.py``, ``modeling_qwen2.py``,
``modeling_qwen3.py``, ``modeling_gemma2.py``, ``modeling_gemma3.py``, ``modeling_mixtral.py``);
the golden tests check the logits against them to 1e-4. ``rope_scaling`` covers ``linear``,
``llama3`` and ``yarn``.

Gemma 2/3: RMSNorm ``(1 + scale)`` in float32, a norm on the attention and on the MLP output
before each residual add (sandwich), embeddings times ``sqrt(D)``, tied LM head, scores scaled by
``query_pre_attn_scalar ** -0.5``, alternating local (sliding-window) and global layers
(``layer_types``); Gemma 2 soft-caps attention scores and final logits (``cap * tanh(x / cap)``),
Gemma 3 gives local layers their own RoPE base (``rope_local_theta``; ``rope_scaling`` applies to
the global ones). YaRN's attention factor is applied on every layer.

Mixtral (mixture of experts): Mistral's attention, and in place of the MLP ``E`` SwiGLU experts
(``num_experts``) and a linear router (no bias). The routing is transformers'
``MixtralTopKRouter``: ``p = softmax(h @ router)`` in float32 over the ``E`` experts, the
``k = num_experts_per_tok`` largest kept and renormalised to sum to 1 (the same as a softmax over
the top-k router logits). :func:`moe_mlp` computes it **densely**: every expert runs on every token
and the outputs are summed with the routing weights, zero for the experts a token did not choose,
so the result is exactly the sparse sum of the k chosen experts (the zeros add nothing). The cost:
``E / k`` times the expert FLOPs and ``E`` ``[B, t, F]`` activations of a sparse dispatch (4x for
Mixtral's 8 experts, top-2), no token dropping and no capacity factor; right for tiny and small
models and for an ``expert`` mesh axis that splits the ``E`` experts (each device runs its own
experts on every token, then the partial sums are added over the axis). The auxiliary
load-balancing loss (transformers ``router_aux_loss_coef``) and the router's training-time
jitter noise are not implemented.

One forward: a layer is computed by one function, :func:`block`, on a dict of its weights. The
``nnx`` modules hold the parameters (their names below) and the training forward runs
:func:`block` in a layer ``lax.scan``; the rollout's decode step (:func:`decode_step`) runs the
same :func:`block` in a Python loop over per-layer, fused weights (see "One-token decoding").

Parameter names (the sharding rules of :mod:`rlhf_jax.parallel` match on these paths; the
``layers`` subtree carries a leading layer axis ``L`` that :func:`jax.lax.scan` runs over)::

    embed/embedding                    [V, D]        token embeddings (GPT-2 ``wte``)
    pos_embed/embedding                [Pmax, D]     learned positions (GPT-2 only, ``wpe``)
    layers/attn_norm/{scale,bias}      [L, D]        pre-attention norm (bias: LayerNorm only)
    layers/attn/q_proj/{kernel,bias}   [L, D, H*Dh]  kernels are [in, out]
    layers/attn/k_proj/{kernel,bias}   [L, D, Hkv*Dh]
    layers/attn/v_proj/{kernel,bias}   [L, D, Hkv*Dh]
    layers/attn/o_proj/{kernel,bias}   [L, H*Dh, D]
    layers/attn/q_norm/scale           [L, Dh]       Qwen3 only
    layers/attn/k_norm/scale           [L, Dh]       Qwen3 only
    layers/mlp_norm/{scale,bias}       [L, D]
    layers/post_{attn,mlp}_norm/scale  [L, D]        Gemma only (sandwich norms)
    layers/mlp/gate_proj/{kernel,bias} [L, D, F]     SwiGLU only (bias: mlp_bias)
    layers/mlp/up_proj/{kernel,bias}   [L, D, F]     GPT-2 ``c_fc``
    layers/mlp/down_proj/{kernel,bias} [L, F, D]     GPT-2 ``mlp.c_proj``
    layers/mlp/router/kernel           [L, D, E]     Mixtral only (instead of gate/up/down):
    layers/mlp/experts/gate_proj       [L, E, D, F]  the E experts' SwiGLU weights, [in, out]
    layers/mlp/experts/up_proj         [L, E, D, F]
    layers/mlp/experts/down_proj       [L, E, F, D]
    final_norm/{scale,bias}            [D]
    lm_head/kernel                     [D, V]        absent when tied (logits = h @ embed.T)
    value_head/{kernel,bias}           [D, 1], [1]   see heads.py
    score_head/{kernel,bias,reward_gain,reward_bias}  see heads.py

Tensors are ``[B, T, ...]``; ``H`` query heads, ``Hkv`` key/value heads, ``Dh`` head size. The
KV cache is ``dict(k=[L, B, S, Hkv, Dh], v=[L, B, S, Hkv, Dh])``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.models.heads import ScoreHead, ValueHead

ARCHS = ("gpt2", "llama", "mistral", "phi3", "qwen2", "qwen3", "gemma2", "gemma3", "mixtral")
MOE = ("mixtral",)  # families whose MLP is a mixture of experts
GEMMA = ("gemma2", "gemma3")
LAYER_TYPES = ("full_attention", "sliding_attention")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
ATTENTION_IMPLS = ("auto", "einsum", "xla", "cudnn")
REMAT = ("none", "full", "dots", "offload")  # ModelConfig.remat: see remat_policy


def _freeze(value: Any) -> Any:
    """A hashable copy of a (nested) mapping/sequence: dicts become sorted tuples of pairs."""
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The static shape and convention choices of a :class:`Transformer` (frozen, hashable).

    Fields left ``None`` take the family default of ``arch`` in ``__post_init__``.
    """

    arch: str = "llama"  # 'gpt2' | 'llama' | 'mistral' | 'phi3' | 'qwen2' | 'qwen3' | 'gemma2/3'
    #                      | 'mixtral'
    vocab_size: int = 256  # V
    hidden_size: int = 64  # D
    num_layers: int = 2  # L
    num_heads: int = 4  # H, query heads
    num_kv_heads: int | None = None  # Hkv (grouped-query attention); default H
    head_dim: int | None = None  # Dh; default D // H
    intermediate_size: int | None = None  # F, the MLP width; default 4 D (gpt2) or 8/3 D
    max_position_embeddings: int = 2048  # learned positions (gpt2) / rope_scaling reference
    norm_eps: float | None = None  # 1e-5 (gpt2 LayerNorm), 1e-6 (RMSNorm families)
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: Any = None  # None or a mapping {'rope_type': 'linear'|'llama3'|'yarn', ...}
    # RoPE rotates the first int(head_dim * partial_rotary_factor) dims of each head (Phi-3/4)
    partial_rotary_factor: float = 1.0
    tie_word_embeddings: bool | None = None  # default True for gpt2, False otherwise
    attention_bias: bool | None = None  # q/k/v bias: True for gpt2/qwen2, False for llama/qwen3
    qk_norm: bool | None = None  # per-head RMSNorm of q and k: True for qwen3
    mlp_bias: bool | None = None  # MLP biases: True for gpt2, False otherwise (Llama mlp_bias)
    # Sliding-window attention (Mistral): a query attends to itself and the previous
    # sliding_window - 1 slots; None = full causal attention.
    sliding_window: int | None = None
    # Per-layer 'full_attention' | 'sliding_attention' (Gemma's alternating local/global
    # layers); None = every layer is sliding if sliding_window is set, else full.
    layer_types: Any = None
    rope_local_theta: float | None = None  # RoPE base of sliding layers (Gemma 3); None = same
    attn_logit_softcap: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    query_pre_attn_scalar: float | None = None  # scores scaled by its -1/2 power; None = Dh
    # Mixture of experts (Mixtral): E experts of width intermediate_size each; 0 = a dense MLP.
    num_experts: int = 0
    num_experts_per_tok: int = 2  # k, the experts each token is routed to (MoE only)
    dtype: str = "float32"  # compute dtype: 'float32' | 'bfloat16'
    param_dtype: str = "float32"  # parameter dtype: 'float32' | 'bfloat16'
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # Layers per iteration of the layer ``lax.scan`` (a run-time choice, not saved with the
    # checkpoint): 1 compiles one layer; ``num_layers`` unrolls the stack, which removes the
    # scan's per-layer slicing and stacking of activations and gradients (PPO iteration of the
    # 4-layer benchmark 2.70 -> 2.35 s on CPU) at the price of a longer compile.
    scan_unroll: int = 1
    # How attention over a [B, S, Hkv, Dh] cache is computed (a run-time choice, not saved; the
    # same numbers): 'auto' = the einsum formula on CPU, jax.nn.dot_product_attention
    # (implementation=None, JAX's default choice) elsewhere; 'einsum'; 'xla' / 'cudnn' =
    # jax.nn.dot_product_attention with that implementation ('cudnn': GPU, 16-bit compute).
    # On CPU the XLA dot_product_attention measured 5-10% slower than the einsum formula (a
    # 4-layer model, fwd+bwd, T=128), hence 'auto'.
    attention: str = "auto"
    # Rematerialisation of the layer scan in the training forward (a run-time choice, not saved;
    # the same numbers, see remat_policy): 'none' keeps every layer's activations for the
    # backward pass; 'full' keeps only each layer's input and recomputes the layer; 'dots' keeps
    # the weight matmuls' outputs and recomputes the rest (attention scores, norms,
    # activations); 'offload' moves those matmul outputs to host memory (TPU/GPU).
    remat: str = "none"

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        if self.arch not in ARCHS:
            raise ValueError(f"ModelConfig.arch={self.arch!r}: use one of {ARCHS}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "scan_unroll"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)} must be positive")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(
                f"ModelConfig.attention={self.attention!r}: use one of {ATTENTION_IMPLS}"
            )
        if self.remat not in REMAT:
            raise ValueError(f"ModelConfig.remat={self.remat!r}: use one of {REMAT}")
        for name in ("dtype", "param_dtype"):
            value = getattr(self, name)
            value = jnp.dtype(value).name if not isinstance(value, str) else value
            if value not in DTYPES:
                raise ValueError(f"ModelConfig.{name}={value!r}: use one of {tuple(DTYPES)}")
            put(name, value)
        gpt2 = self.arch == "gpt2"
        if self.num_kv_heads is None:
            put("num_kv_heads", self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads={self.num_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if gpt2 and self.num_kv_heads != self.num_heads:
            raise ValueError("ModelConfig: gpt2 has no grouped-query attention (num_kv_heads=H)")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"ModelConfig.hidden_size={self.hidden_size} is not a multiple of "
                    f"num_heads={self.num_heads}: set head_dim"
                )
            put("head_dim", self.hidden_size // self.num_heads)
        if gpt2 and self.head_dim * self.num_heads != self.hidden_size:
            raise ValueError("ModelConfig: gpt2 needs head_dim * num_heads == hidden_size")
        if not 0 < self.partial_rotary_factor <= 1:
            raise ValueError(
                f"ModelConfig.partial_rotary_factor={self.partial_rotary_factor}: must be in (0, 1]"
            )
        if not gpt2 and self.rotary_dim % 2:
            raise ValueError(
                f"ModelConfig: RoPE needs an even number of rotated dims, got {self.rotary_dim} "
                f"(head_dim={self.head_dim}, partial_rotary_factor={self.partial_rotary_factor})"
            )
        if self.intermediate_size is None:
            put("intermediate_size", 4 * self.hidden_size if gpt2 else 8 * self.hidden_size // 3)
        if self.norm_eps is None:
            put("norm_eps", 1e-5 if gpt2 else 1e-6)
        if self.tie_word_embeddings is None:
            put("tie_word_embeddings", gpt2 or self.arch in GEMMA)
        if self.attention_bias is None:
            put("attention_bias", self.arch in ("gpt2", "qwen2"))
        if self.qk_norm is None:
            put("qk_norm", self.arch in ("qwen3", "gemma3"))
        if self.mlp_bias is None:
            put("mlp_bias", gpt2)
        if self.layer_types is not None:
            types = tuple(self.layer_types)
            if len(types) != self.num_layers or not set(types) <= set(LAYER_TYPES):
                raise ValueError(
                    f"ModelConfig.layer_types={types}: one of {LAYER_TYPES} per layer "
                    f"({self.num_layers})"
                )
            if "sliding_attention" in types and self.sliding_window is None:
                raise ValueError("ModelConfig.layer_types has sliding layers: set sliding_window")
            put("layer_types", types)
        if gpt2 and (self.qk_norm or not self.attention_bias or not self.mlp_bias):
            raise ValueError("ModelConfig: gpt2 has q/k/v and MLP biases and no qk_norm")
        if self.arch in MOE:
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ValueError(
                    f"ModelConfig: {self.arch} needs num_experts >= num_experts_per_tok >= 1 "
                    f"(got num_experts={self.num_experts}, "
                    f"num_experts_per_tok={self.num_experts_per_tok})"
                )
            if self.attention_bias or self.mlp_bias:
                raise ValueError(f"ModelConfig: {self.arch} has no biases")
        elif self.num_experts:
            raise ValueError(
                f"ModelConfig.num_experts={self.num_experts}: only {MOE} have experts (0 = off)"
            )
        if self.sliding_window is not None and int(self.sliding_window) <= 0:
            raise ValueError(
                f"ModelConfig.sliding_window={self.sliding_window} must be positive (None = off)"
            )
        scaling = self.rope_scaling
        if scaling is not None:
            scaling = dict(scaling)
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind not in ROPE_TYPES:
                raise ValueError(
                    f"ModelConfig.rope_scaling type {kind!r} is not supported: use one of "
                    f"{ROPE_TYPES}"
                )
            scaling["rope_type"] = kind
            scaling.pop("type", None)
            scaling.pop("rope_theta", None)
            put("rope_scaling", None if kind == "default" else _freeze(scaling))

    @property
    def gemma(self) -> bool:
        """Gemma's conventions: RMSNorm ``(1 + scale)`` in float32, sandwich norms (a norm after
        the attention and after the MLP), embeddings times ``sqrt(D)``, GeGLU (tanh GELU)."""
        return self.arch in GEMMA

    def layer_sliding(self) -> tuple[bool, ...]:
        """Per layer: does it use the sliding window?"""
        if self.layer_types is None:
            return (self.sliding_window is not None,) * self.num_layers
        return tuple(t == "sliding_attention" for t in self.layer_types)

    @property
    def moe(self) -> bool:
        """Whether the MLP is a mixture of experts (:func:`moe_mlp`)."""
        return self.num_experts > 0

    @property
    def rotary_dim(self) -> int:
        """The dims of a head that RoPE rotates (the first ones): ``int(Dh * factor)``."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return DTYPES[self.param_dtype]

    @property
    def o_bias(self) -> bool:
        """Whether ``o_proj`` has a bias: gpt2 yes, qwen2 no, llama/qwen3 = ``attention_bias``."""
        return {"gpt2": True, "qwen2": False}.get(self.arch, bool(self.attention_bias))

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


# ------------------------------------------------------------------------------------------
# Rotary position embeddings


def rope_inv_freq(config: ModelConfig) -> jax.Array:
    """Inverse frequencies ``[Dh/2]`` float32, with the ``rope_scaling`` of the config.

    ``inv_freq_i = theta^(-2i/Dh)`` (Su et al. 2021). ``linear``: divided by ``factor``.
    ``llama3`` (transformers ``_compute_llama3_parameters``): wavelengths ``2 pi / inv_freq``
    longer than ``orig / low_freq_factor`` are divided by ``factor``, shorter than
    ``orig / high_freq_factor`` kept, and those between interpolated with
    ``s = (orig / wavelen - low) / (high - low)``: ``(1 - s) inv_freq / factor + s inv_freq``.
    ``yarn`` (Peng et al. 2023, arXiv:2309.00071; transformers ``_compute_yarn_parameters``):
    ``inv_freq / factor`` blended into ``inv_freq`` by a linear ramp over the dimensions between
    the correction dims of ``beta_fast`` (32) and ``beta_slow`` (1) rotations in
    ``original_max_position_embeddings`` (floored/ceiled unless ``truncate`` is false); the
    angles' cos and sin are also scaled by :func:`rope_attention_scaling`.
    """
    dh = config.rotary_dim
    inv = 1.0 / (config.rope_theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
    if config.rope_scaling is None:
        return inv
    s = dict(config.rope_scaling)
    kind = s["rope_type"]
    if kind == "yarn":
        return _yarn_inv_freq(config, s, inv)
    factor = float(s["factor"])
    if kind == "linear":
        return inv / factor
    low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
    orig = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > orig / low, inv / factor, inv)
    smooth = (orig / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= orig / high) & (wavelen <= orig / low)
    return jnp.where(medium, smoothed, scaled)


def _yarn_factor(config: ModelConfig, s: dict) -> tuple[float, float]:
    orig = float(s.get("original_max_position_embeddings") or config.max_position_embeddings)
    factor = s.get("factor")
    factor = config.max_position_embeddings / orig if factor is None else float(factor)
    return factor, orig


def _yarn_inv_freq(config: ModelConfig, s: dict, inv: jax.Array) -> jax.Array:
    dh, base = config.rotary_dim, config.rope_theta
    factor, orig = _yarn_factor(config, s)
    beta_fast = float(s.get("beta_fast") or 32)
    beta_slow = float(s.get("beta_slow") or 1)

    def correction_dim(rotations):
        return (dh * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dh - 1)
    if low == high:
        high += 0.001  # as transformers: no zero-width ramp
    ramp = jnp.clip((jnp.arange(dh // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # 1: keep inv_freq; 0: interpolate (inv_freq / factor)
    pos_freqs = base ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh)
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def rope_attention_scaling(config: ModelConfig) -> float:
    """The factor on RoPE's cos and sin: 1, or YaRN's ``attention_factor`` (default
    ``0.1 ln(factor) + 1``, or the ``mscale`` / ``mscale_all_dim`` ratio when both are set)."""
    if config.rope_scaling is None:
        return 1.0
    s = dict(config.rope_scaling)
    if s["rope_type"] != "yarn":
        return 1.0
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])
    factor, _ = _yarn_factor(config, s)

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if s.get("mscale") and s.get("mscale_all_dim"):
        return float(mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"]))
    return mscale(factor)


def apply_rope(
    x: jax.Array, positions: jax.Array, inv_freq: jax.Array, scaling: float = 1.0
) -> jax.Array:
    """Rotate ``x: [B, T, N, Dh]`` by angles ``positions [B, T] x inv_freq [R/2]``.

    The non-interleaved ("rotate_half") layout of transformers Llama:
    ``x * cos + rotate_half(x) * sin`` with ``cos = concat(cos(a), cos(a))``, cos and sin times
    ``scaling`` (:func:`rope_attention_scaling`). Only the first ``R`` dims rotate (partial
    rotary, ``R < Dh``); the rest pass through. Computed in float32.
    """
    rot = 2 * inv_freq.shape[-1]
    if rot < x.shape[-1]:
        head, rest = x[..., :rot], x[..., rot:]
        return jnp.concatenate([apply_rope(head, positions, inv_freq, scaling), rest], -1)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, -1)[:, :, None, :]  # [B, T, 1, Dh]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, -1)[:, :, None, :]
    if scaling != 1.0:
        cos, sin = cos * scaling, sin * scaling
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


# ------------------------------------------------------------------------------------------
# Layers


class Norm(nnx.Module):
    """LayerNorm (``bias=True``, GPT-2) or RMSNorm (Llama): statistics in float32.

    RMSNorm: ``scale * (x / sqrt(mean(x^2) + eps))`` (transformers ``LlamaRMSNorm``, which casts
    the normalised value back to the input dtype before the scale). Gemma (``plus_one``):
    ``(1 + scale) * (x / sqrt(mean(x^2) + eps))`` all in float32, then cast (``GemmaRMSNorm``;
    ``scale`` starts at 0).
    """

    def __init__(
        self, size: int, eps: float, *, layer_norm: bool, param_dtype, dtype, plus_one=False
    ):
        self.eps = eps
        self.layer_norm = layer_norm
        self.plus_one = plus_one
        self.dtype = dtype
        init = jnp.zeros if plus_one else jnp.ones
        self.scale = nnx.Param(init((size,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((size,), param_dtype)) if layer_norm else None

    def __call__(self, x: jax.Array) -> jax.Array:
        bias = self.bias[...] if self.layer_norm else None
        return _norm_fn(x, self.scale[...], bias, self.eps, self.dtype, self.plus_one)


def _norm_fn(x, scale, bias, eps, dtype, plus_one=False):
    """:class:`Norm` as a function: LayerNorm when ``bias`` is given, else RMSNorm."""
    xf = x.astype(jnp.float32)
    if plus_one:
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + eps)
        return (y * (1.0 + scale.astype(jnp.float32))).astype(dtype)
    if bias is not None:
        xf = xf - jnp.mean(xf, -1, keepdims=True)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + eps)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(dtype)
    y = (xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + eps)).astype(x.dtype)
    return (scale.astype(dtype) * y).astype(dtype)


def _linear(cfg: ModelConfig, din: int, dout: int, bias: bool, rngs: nnx.Rngs, std=0.02):
    return nnx.Linear(
        din,
        dout,
        use_bias=bias,
        dtype=cfg.compute_dtype,
        param_dtype=cfg.weight_dtype,
        kernel_init=nnx.initializers.normal(std),
        rngs=rngs,
    )


def _norm(cfg: ModelConfig, size: int) -> Norm:
    return Norm(
        size,
        cfg.norm_eps,
        layer_norm=cfg.arch == "gpt2",
        param_dtype=cfg.weight_dtype,
        dtype=cfg.compute_dtype,
        plus_one=cfg.gemma,
    )


class Attention(nnx.Module):
    """The attention parameters of a layer (q/k/v/o projections, Qwen3's q/k norms); the
    computation is :func:`block`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h, hkv, dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        # GPT-2 scales the residual projections' init by 1/sqrt(2L) (Radford et al. 2019).
        out_std = 0.02 / math.sqrt(2 * cfg.num_layers)
        self.q_proj = _linear(cfg, d, h * dh, cfg.attention_bias, rngs)
        self.k_proj = _linear(cfg, d, hkv * dh, cfg.attention_bias, rngs)
        self.v_proj = _linear(cfg, d, hkv * dh, cfg.attention_bias, rngs)
        self.o_proj = _linear(cfg, h * dh, d, cfg.o_bias, rngs, out_std)
        if cfg.qk_norm:
            self.q_norm = _norm(cfg, dh)
            self.k_norm = _norm(cfg, dh)


class Experts(nnx.Module):
    """The ``E`` SwiGLU experts of a mixture-of-experts layer, stacked: ``gate_proj`` and
    ``up_proj`` ``[E, D, F]``, ``down_proj`` ``[E, F, D]`` (``[in, out]`` per expert)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        e, d, f = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        out_std = 0.02 / math.sqrt(2 * cfg.num_layers)
        dt = cfg.weight_dtype
        self.gate_proj = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (e, d, f), dt))
        self.up_proj = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (e, d, f), dt))
        self.down_proj = nnx.Param(nnx.initializers.normal(out_std)(rngs.params(), (e, f, d), dt))


class MLP(nnx.Module):
    """The MLP parameters of a layer. GPT-2: ``down(gelu_tanh(up x))``; Llama family:
    ``down(silu(gate x) * up x)`` (SwiGLU); Mixtral: a ``router`` ``[D, E]`` and the
    :class:`Experts`. The computation is :func:`block`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        gpt2 = cfg.arch == "gpt2"
        d, f = cfg.hidden_size, cfg.intermediate_size
        out_std = 0.02 / math.sqrt(2 * cfg.num_layers)
        if cfg.moe:
            self.router = _linear(cfg, d, cfg.num_experts, False, rngs)
            self.experts = Experts(cfg, rngs=rngs)
            return
        if not gpt2:
            self.gate_proj = _linear(cfg, d, f, cfg.mlp_bias, rngs)
        self.up_proj = _linear(cfg, d, f, cfg.mlp_bias, rngs)
        self.down_proj = _linear(cfg, f, d, cfg.mlp_bias, rngs, out_std)


class Block(nnx.Module):
    """Pre-norm residual block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))`` (:func:`block`)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.attn_norm = _norm(cfg, cfg.hidden_size)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = _norm(cfg, cfg.hidden_size)
        self.mlp = MLP(cfg, rngs=rngs)
        if cfg.gemma:  # sandwich norms: on the attention and MLP outputs, before the residual
            self.post_attn_norm = _norm(cfg, cfg.hidden_size)
            self.post_mlp_norm = _norm(cfg, cfg.hidden_size)

    def weights(self) -> dict:
        """This block's parameters as the weight dict :func:`block` reads (unfused)."""

        def lin(m):
            return {"kernel": m.kernel[...], "bias": None if m.bias is None else m.bias[...]}

        def norm(n):
            return {"scale": n.scale[...], "bias": None if n.bias is None else n.bias[...]}

        att, mlp = self.attn, self.mlp
        w = {
            "attn_norm": norm(self.attn_norm),
            "q": lin(att.q_proj),
            "k": lin(att.k_proj),
            "v": lin(att.v_proj),
            "o": lin(att.o_proj),
            "mlp_norm": norm(self.mlp_norm),
        }
        if self.cfg.moe:
            ex = mlp.experts
            w["router"] = lin(mlp.router)
            w["experts"] = {
                "gate": ex.gate_proj[...],
                "up": ex.up_proj[...],
                "down": ex.down_proj[...],
            }
        else:
            w["up"], w["down"] = lin(mlp.up_proj), lin(mlp.down_proj)
        if self.cfg.arch != "gpt2" and not self.cfg.moe:
            w["gate"] = lin(mlp.gate_proj)
        if self.cfg.qk_norm:
            w["q_norm"], w["k_norm"] = norm(att.q_norm), norm(att.k_norm)
        if self.cfg.gemma:
            w["post_attn_norm"], w["post_mlp_norm"] = (
                norm(self.post_attn_norm),
                norm(self.post_mlp_norm),
            )
        return w

    def __call__(self, x, positions, allowed, inv_freq, cache, index, *, heads_first=False):
        return block(
            self.cfg,
            self.weights(),
            x,
            positions,
            allowed,
            inv_freq,
            cache,
            index,
            heads_first=heads_first,
        )


# ------------------------------------------------------------------------------------------
# The computation: one implementation for training, prefill and decoding
#
# Every forward of the model -- the training forward and the cached ``decode`` (layer
# ``lax.scan`` over the stacked ``[L, ...]`` parameters) and the rollout's decode step (a Python
# loop over per-layer, fused weights, :func:`decode_step`) -- runs these functions. They read
# a per-layer weight dict (:meth:`Block.weights`; fused by :func:`fuse_layer`) and a KV cache in
# either layout, so a new family is written once, here.


def _dense(x, w, dtype):
    """``nnx.Linear`` as a function: ``x @ kernel (+ bias)``, operands in the compute dtype.

    The leading axes are flattened into one before the product. The numbers are the same, but
    the backward differs: for ``[B, t, D] @ [D, F]`` JAX's transpose rule writes the kernel's
    gradient as a contraction over two axes followed by a transpose, which XLA:CPU runs as a
    generic dot at about half the GEMM rate; for ``[B t, D] @ [D, F]`` it is one ``x^T dy``.
    On the PPO benchmark this made the iteration 9-13% faster (``bench_ppo.py --ab dense``).
    """
    kernel = w["kernel"].astype(dtype)
    lead = x.shape[:-1]
    y = (x.astype(dtype).reshape(-1, x.shape[-1]) @ kernel).reshape(*lead, kernel.shape[-1])
    if w.get("bias") is not None:
        y = y + w["bias"].astype(dtype)
    return y


def _norm_w(cfg: ModelConfig, x, w):
    return _norm_fn(x, w["scale"], w.get("bias"), cfg.norm_eps, cfg.compute_dtype, cfg.gemma)


def embed(cfg: ModelConfig, table, pos_table, tokens, positions):
    """``[B, t]`` tokens -> ``[B, t, D]`` in the compute dtype (+ learned positions, GPT-2)."""
    cdt = cfg.compute_dtype
    x = jnp.take(table.astype(cdt), tokens, axis=0)
    if pos_table is not None:
        x = x + jnp.take(pos_table.astype(cdt), positions, axis=0)
    if cfg.gemma:  # transformers: times sqrt(D) rounded to the parameter dtype
        x = x * jnp.asarray(cfg.hidden_size**0.5, table.dtype).astype(cdt)
    return x.astype(cdt)


def lm_logits(cfg: ModelConfig, table, lm_head, hidden):
    """``[..., D] -> [..., V]`` float32 logits: ``h @ lm_head``, or ``h @ embed.T`` when tied."""
    if cfg.tie_word_embeddings:
        w = table.astype(hidden.dtype)
        out = jnp.einsum("...d,vd->...v", hidden, w, preferred_element_type=jnp.float32)
    else:
        w = lm_head.astype(hidden.dtype)
        out = jnp.einsum("...d,dv->...v", hidden, w, preferred_element_type=jnp.float32)
    if cfg.final_logit_softcap is not None:
        cap = cfg.final_logit_softcap
        out = jnp.tanh(out / cap) * cap
    return out


def attention_mask(cfg: ModelConfig, kv_mask, index, t: int, sliding: bool | None = None):
    """``[B, t, S]`` bool: query ``i`` (slot ``index + i``) may attend to slot ``j`` iff
    ``j <= index + i`` and ``kv_mask[:, j] == 1`` (and, with a ``sliding_window`` W,
    ``j > index + i - W``: slots, not positions; they differ only by the left padding, which no
    query attends to). ``sliding`` picks the window per layer (default: every layer has it
    when ``sliding_window`` is set and ``layer_types`` is not)."""
    s = kv_mask.shape[1]
    qpos = jnp.asarray(index, jnp.int32) + jnp.arange(t, dtype=jnp.int32)  # [t]
    slots = jnp.arange(s, dtype=jnp.int32)
    causal = slots[None, :] <= qpos[:, None]  # [t, S]
    if sliding is None:
        sliding = cfg.sliding_window is not None and cfg.layer_types is None
    if sliding:  # transformers' sliding_window_overlay: j > i - window
        causal &= slots[None, :] > qpos[:, None] - cfg.sliding_window
    return causal[None] & (kv_mask[:, None, :] > 0)


def layer_inputs(cfg: ModelConfig, kv_mask, index, t: int) -> dict:
    """``{sliding: (attention_mask [B, t, S], rope inv_freq or None)}`` for each kind of layer
    the model has (``cfg.layer_sliding()``): sliding layers get the window and, with
    ``rope_local_theta`` (Gemma 3), their own RoPE base without ``rope_scaling``."""
    out = {}
    for sliding in sorted(set(cfg.layer_sliding())):
        rope_cfg = cfg
        if sliding and cfg.rope_local_theta is not None:
            rope_cfg = cfg.replace(rope_theta=cfg.rope_local_theta, rope_scaling=None)
        inv_freq = rope_inv_freq(rope_cfg) if cfg.arch != "gpt2" else None
        out[sliding] = (attention_mask(cfg, kv_mask, index, t, sliding), inv_freq)
    return out


def _project_qkv(cfg: ModelConfig, w, y):
    b, t = y.shape[:2]
    h, hkv, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    cdt = cfg.compute_dtype
    if "qkv" in w:  # fused (decode_step)
        qkv = _dense(y, w["qkv"], cdt)  # [B, t, (H + 2 Hkv) Dh]
        q, k, v = jnp.split(qkv, [h * dh, (h + hkv) * dh], axis=-1)
    else:
        q, k, v = (_dense(y, w[n], cdt) for n in "qkv")
    return q.reshape(b, t, h, dh), k.reshape(b, t, hkv, dh), v.reshape(b, t, hkv, dh)


def _mlp(cfg: ModelConfig, w, y):
    cdt = cfg.compute_dtype
    if cfg.moe:
        return moe_mlp(cfg, w, y)
    if cfg.arch == "gpt2":
        return _dense(jax.nn.gelu(_dense(y, w["up"], cdt), approximate=True), w["down"], cdt)
    if "gate_up" in w:  # fused (decode_step)
        gate, up = jnp.split(_dense(y, w["gate_up"], cdt), 2, axis=-1)
    else:
        gate, up = _dense(y, w["gate"], cdt), _dense(y, w["up"], cdt)
    act = jax.nn.gelu(gate, approximate=True) if cfg.gemma else jax.nn.silu(gate)  # GeGLU
    return _dense(act * up, w["down"], cdt)


def routing_weights(cfg: ModelConfig, router_logits: jax.Array) -> jax.Array:
    """``[..., E]`` router logits -> ``[..., E]`` float32 routing weights, zero off the top k.

    transformers ``MixtralTopKRouter``: ``p = softmax(logits)`` in float32, the ``k`` largest
    ``p`` kept (``jax.lax.top_k``; an exact tie may be broken otherwise than by ``torch.topk``)
    and divided by their sum, i.e. a ``softmax`` over the chosen logits. Gradients flow through
    the kept weights, not through the choice.
    """
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    top, idx = jax.lax.top_k(probs, cfg.num_experts_per_tok)  # [..., k]
    top = top / jnp.sum(top, -1, keepdims=True)
    onehot = jax.nn.one_hot(idx, cfg.num_experts, dtype=jnp.float32)  # [..., k, E]
    return jnp.einsum("...k,...ke->...e", top, onehot)


def moe_mlp(cfg: ModelConfig, w, y):
    """A mixture of SwiGLU experts on ``y [B, t, D]``, computed densely (module docstring).

    ``out = sum_e r_e * down_e(silu(gate_e y) * up_e y)`` with ``r = routing_weights(y @ router)``
    (zero for the experts a token does not use). The weight multiplies each expert's hidden
    activations before ``down`` (the same sum), so one contraction over ``(e, f)`` gives the
    output; with the experts split over a mesh axis that contraction ends in one all-reduce.
    """
    cdt = cfg.compute_dtype
    ex = w["experts"]
    r = routing_weights(cfg, _dense(y, w["router"], cdt))  # [B, t, E] float32
    yc = y.astype(cdt)
    gate = jnp.einsum("btd,edf->btef", yc, ex["gate"].astype(cdt))  # [B, t, E, F]
    up = jnp.einsum("btd,edf->btef", yc, ex["up"].astype(cdt))
    act = jax.nn.silu(gate) * up * r[..., None].astype(cdt)
    return jnp.einsum("btef,efd->btd", act, ex["down"].astype(cdt))


def _attend(cfg: ModelConfig, q, keys, vals, allowed, heads_first: bool):
    """Softmax attention of ``q [B, t, H, Dh]`` over a cache ``[B, S, Hkv, Dh]`` (or
    ``[B, Hkv, S, Dh]`` with ``heads_first``) where ``allowed [B, t, S]``; ``[B, t, H, Dh]``.

    Scores ``q . k / sqrt(Dh)`` in float32, masked slots at a large negative number (a query
    with no allowed slot averages all of them, as transformers' eager attention; nothing reads
    it), softmax in float32, probabilities cast to the compute dtype. The ``[B, S, Hkv, Dh]``
    layout (training forward, cached ``decode``) goes through ``jax.nn.dot_product_attention``,
    as :attr:`ModelConfig.attention` says (on an accelerator by default: JAX's own choice of
    implementation, XLA today, a fused cuDNN kernel as its selection logic lands; ``'cudnn'``
    asks for it); the rollout's heads-first decode cache (a ``t = 1`` mat-vec per step) always
    uses the formula as two einsums, which read the cache in place.
    """
    impl = cfg.attention
    if impl == "auto":
        impl = "einsum" if jax.default_backend() == "cpu" else None
    scale = (cfg.query_pre_attn_scalar or q.shape[-1]) ** -0.5
    if not heads_first and impl != "einsum" and cfg.attn_logit_softcap is None:
        return jax.nn.dot_product_attention(
            q,
            keys.astype(q.dtype),
            vals.astype(q.dtype),
            mask=allowed[:, None],  # [B, 1, t, S]: the same for every head
            scale=scale,
            implementation=impl,
        )
    b, t, h, dh = q.shape
    hkv = keys.shape[1] if heads_first else keys.shape[2]
    kv = "bksd" if heads_first else "bskd"
    qg = q.reshape(b, t, hkv, h // hkv, dh)
    att = jnp.einsum(
        f"btkgd,{kv}->bkgts", qg, keys.astype(q.dtype), preferred_element_type=jnp.float32
    )  # [B, Hkv, G, t, S]
    att = att / math.sqrt(dh) if cfg.query_pre_attn_scalar is None else att * scale
    if cfg.attn_logit_softcap is not None:  # Gemma 2, before the mask
        att = jnp.tanh(att / cfg.attn_logit_softcap) * cfg.attn_logit_softcap
    att = jnp.where(allowed[:, None, None], att, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(att, axis=-1).astype(q.dtype)
    out = jnp.einsum(f"bkgts,{kv}->btkgd", probs, vals.astype(q.dtype))
    return out.reshape(b, t, h, dh)


def block(
    cfg: ModelConfig,
    w: dict,
    x: jax.Array,
    positions: jax.Array,
    allowed: jax.Array,
    inv_freq,
    cache,
    index,
    *,
    heads_first: bool = False,
):
    """One pre-norm transformer layer: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``.

    Args:
      cfg: the :class:`ModelConfig`.
      w: the layer's weights (:meth:`Block.weights`, or :func:`fuse_layer` of it).
      x: ``[B, t, D]`` in the compute dtype.
      positions: ``[B, t]`` int32 position ids (RoPE angles).
      allowed: ``[B, t, S]`` bool, :func:`attention_mask`.
      inv_freq: :func:`rope_inv_freq` (None for GPT-2).
      cache: None (``S = t``: attend to this call's keys), or ``(k, v)`` of ``[B, S, Hkv, Dh]``
        (``heads_first``: ``[B, Hkv, S, Dh]``); the ``t`` new keys/values are written at slots
        ``[index, index + t)``.
      index: the first slot written (int or traced int32).

    Returns:
      ``(x [B, t, D], new cache or None)``.
    """
    q, k, v = _project_qkv(cfg, w, _norm_w(cfg, x, w["attn_norm"]))
    if cfg.qk_norm:
        q, k = _norm_w(cfg, q, w["q_norm"]), _norm_w(cfg, k, w["k_norm"])
    if cfg.arch != "gpt2":
        scaling = rope_attention_scaling(cfg)
        q = apply_rope(q, positions, inv_freq, scaling)
        k = apply_rope(k, positions, inv_freq, scaling)
    if cache is None:
        keys, vals = (jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)) if heads_first else (k, v)
        new_cache = None
    else:
        ck, cv = cache
        zero = jnp.zeros((), jnp.int32)
        idx = jnp.asarray(index, jnp.int32)
        if heads_first:
            k, v, start = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), (zero, zero, idx, zero)
        else:
            start = (zero, idx, zero, zero)
        keys = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), start)
        vals = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), start)
        new_cache = (keys, vals)
    out = _attend(cfg, q, keys, vals, allowed, heads_first)
    b, t = x.shape[:2]
    a = _dense(out.reshape(b, t, -1), w["o"], cfg.compute_dtype)
    if cfg.gemma:
        a = _norm_w(cfg, a, w["post_attn_norm"])
    x = x + a
    m = _mlp(cfg, w, _norm_w(cfg, x, w["mlp_norm"]))
    if cfg.gemma:
        m = _norm_w(cfg, m, w["post_mlp_norm"])
    return x + m, new_cache


def remat_policy(remat: str):
    """The ``jax.checkpoint`` policy of :attr:`ModelConfig.remat` (None: save nothing).

    A policy names the intermediates of a layer that the backward pass reads from memory; the
    others are recomputed from the layer's input (JAX's "gradient checkpointing" guide,
    ``jax.checkpoint_policies``):

    - ``'full'``: nothing saved (``None``): the backward pass reruns the whole layer forward;
      per layer only its ``[B, T, D]`` input stays alive.
    - ``'dots'``: ``dots_with_no_batch_dims_saveable``: the outputs of matmuls without batch
      dimensions, i.e. the weight projections q/k/v/o and the MLP's, are kept; the attention
      einsums (batched over heads), the softmax, norms and activations are recomputed.
    - ``'offload'``: ``offload_dot_with_no_batch_dims('device', 'pinned_host')``: the same
      matmul outputs, moved to host memory during the forward and back for the backward.

    The scan is wrapped with ``prevent_cse=False``, as JAX recommends inside ``lax.scan``.
    """
    policies = jax.checkpoint_policies
    return {
        "full": None,
        "dots": policies.dots_with_no_batch_dims_saveable,
        "offload": policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
    }[remat]


def _stack_layers(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    """``num_layers`` independently initialised blocks as one Block with ``[L, ...]`` params."""
    blocks = [Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)]
    graphdef, first = nnx.split(blocks[0])
    states = [first] + [nnx.split(b)[1] for b in blocks[1:]]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    return nnx.merge(graphdef, stacked)


class Transformer(nnx.Module):
    """Decoder LM trunk with optional heads; see the module docstring for the parameter names.

    Args:
      config: the :class:`ModelConfig`.
      rngs: initialisation randomness.
      lm_head: build the LM head (an ``lm_head`` kernel unless the embeddings are tied).
      value_head: a zero-initialised scalar value head (PPO critic sharing the trunk).
      score_head: a scalar reward/cost head with gain/bias normalisation (see heads.py).
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        rngs: nnx.Rngs,
        lm_head: bool = True,
        value_head: bool = False,
        score_head: bool = False,
    ):
        cfg = config
        self.config = cfg
        self.has_lm_head = lm_head
        self.has_value_head = value_head
        self.has_score_head = score_head
        init = nnx.initializers.normal(0.02)
        self.embed = nnx.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.weight_dtype,
            embedding_init=init,
            rngs=rngs,
        )
        if cfg.arch == "gpt2":
            self.pos_embed = nnx.Embed(
                cfg.max_position_embeddings,
                cfg.hidden_size,
                dtype=cfg.compute_dtype,
                param_dtype=cfg.weight_dtype,
                embedding_init=nnx.initializers.normal(0.01),
                rngs=rngs,
            )
        self.layers = _stack_layers(cfg, rngs)
        self.final_norm = _norm(cfg, cfg.hidden_size)
        if lm_head and not cfg.tie_word_embeddings:
            self.lm_head = _linear(cfg, cfg.hidden_size, cfg.vocab_size, False, rngs)
        if value_head:
            self.value_head = ValueHead(cfg.hidden_size, param_dtype=cfg.weight_dtype)
        if score_head:
            self.score_head = ScoreHead(cfg.hidden_size, param_dtype=cfg.weight_dtype, rngs=rngs)

    def __call__(self, tokens, positions, kv_mask, cache=None, index=0):
        """Hidden states after the final norm.

        Args:
          tokens: ``[B, t]`` int32.
          positions: ``[B, t]`` int32 position ids (RoPE angle / learned position).
          kv_mask: ``[B, S]`` 0/1 over the key slots (``S = t`` without a cache).
          cache: None, or ``dict(k, v)`` of ``[L, B, S, Hkv, Dh]``; the t new keys/values are
            written at slots ``[index, index + t)``.
          index: int or scalar int32 array, the first slot written (0 without a cache).

        Returns:
          ``(hidden [B, t, D] in the compute dtype, new cache or None)``.
        """
        cfg = self.config
        chex.assert_rank([tokens, positions, kv_mask], 2)
        pos_table = self.pos_embed.embedding[...] if cfg.arch == "gpt2" else None
        x = embed(cfg, self.embed.embedding[...], pos_table, tokens, positions)
        per_kind = layer_inputs(cfg, kv_mask, index, tokens.shape[1])  # {sliding: (mask, freq)}
        sliding = cfg.layer_sliding()
        layer_def, layer_state = nnx.split(self.layers)

        def body(h, xs):
            state, ck, cv, flag = xs
            if flag is None:  # every layer alike
                allowed, inv_freq = per_kind[sliding[0]]
            else:  # Gemma's alternating local/global layers: pick this layer's mask and RoPE
                allowed, inv_freq = jax.tree.map(
                    lambda a, b: jnp.where(flag, a, b), per_kind[True], per_kind[False]
                )
            layer = nnx.merge(layer_def, state)
            h, kv = layer(h, positions, allowed, inv_freq, None if ck is None else (ck, cv), index)
            return h, (None, None) if kv is None else kv

        if cache is None and cfg.remat != "none":  # training forward (decoding is never remat)
            body = jax.checkpoint(body, policy=remat_policy(cfg.remat), prevent_cse=False)
        flags = jnp.asarray(sliding) if len(per_kind) > 1 else None
        if cache is None:
            xs = (layer_state, None, None, flags)
        else:
            xs = (layer_state, cache["k"], cache["v"], flags)
        x, (ks, vs) = jax.lax.scan(body, x, xs, unroll=min(cfg.scan_unroll, cfg.num_layers))
        new_cache = None if cache is None else {"k": ks, "v": vs}
        return self.final_norm(x), new_cache

    def lm_logits(self, hidden: jax.Array) -> jax.Array:
        """``[..., D] -> [..., V]`` float32 logits (``h @ embed.T`` when tied)."""
        if not self.has_lm_head:
            raise ValueError("this model was built with lm_head=False (a reward/critic model)")
        head = None if self.config.tie_word_embeddings else self.lm_head.kernel[...]
        return lm_logits(self.config, self.embed.embedding[...], head, hidden)


def init_cache(config: ModelConfig, batch_size: int, max_length: int, dtype=None) -> dict:
    """An empty KV cache ``dict(k=[L, B, S, Hkv, Dh], v=...)`` (zeros, the compute dtype)."""
    dtype = config.compute_dtype if dtype is None else dtype
    shape = (config.num_layers, batch_size, max_length, config.num_kv_heads, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


# ------------------------------------------------------------------------------------------
# One-token decoding: the inner loop of a rollout
#
# The layer ``lax.scan`` of :meth:`Transformer.__call__` is right for training and prefill, but
# inside a decode ``while_loop`` it costs more than the arithmetic on CPU: every step XLA copies
# each layer's weights out of the stacked ``[L, ...]`` parameters (a slice of a loop-carried
# array is a copy, static index or not), slices and re-stacks the ``[L, B, S, Hkv, Dh]`` cache,
# and transposes it for the attention einsum. :func:`decode_step` runs the same :func:`block`
# on a different arrangement of the same numbers, built once per rollout *outside* the loop:
#
# - :func:`step_weights`: per-layer (unstacked) weights, q/k/v kernels (and SwiGLU gate/up)
#   concatenated into one matmul each (:func:`fuse_layer`);
# - :func:`step_cache`: a tuple of per-layer ``(k, v)``, each ``[B, Hkv, S, Dh]``
#   (``heads_first``), so that the ``t = 1`` attention is a batched mat-vec over contiguous
#   ``[S, Dh]`` blocks and each new key/value is an in-place ``dynamic_update_slice`` of one
#   loop-carried buffer;
# - a Python loop over the layers (no scan).


def fuse_layer(w: dict) -> dict:
    """A :meth:`Block.weights` dict with q/k/v (``qkv``) and SwiGLU gate/up (``gate_up``)
    kernels and biases concatenated along the output axis: one matmul each."""

    def cat(parts):
        kernel = jnp.concatenate([p["kernel"] for p in parts], -1)
        biases = [p.get("bias") for p in parts]
        bias = None if biases[0] is None else jnp.concatenate(biases, -1)
        return {"kernel": kernel, "bias": bias}

    out = {k: v for k, v in w.items() if k not in ("q", "k", "v", "gate", "up")}
    out["qkv"] = cat([w["q"], w["k"], w["v"]])
    if "gate" in w:
        out["gate_up"] = cat([w["gate"], w["up"]])
    elif "up" in w:  # GPT-2 (a mixture of experts keeps its "experts" as they are)
        out["up"] = w["up"]
    return out


def step_weights(module: Transformer) -> dict:
    """The parameters of ``module`` arranged for :func:`decode_step` (one copy; call it outside
    the decode loop).

    Returns a dict pytree: ``embed [V, D]``, ``pos_embed [Pmax, D]`` (GPT-2), ``final_norm``,
    ``lm_head [D, V]`` (untied only) and ``layers``: a tuple of ``L`` :func:`fuse_layer` dicts.
    """
    cfg = module.config
    if not module.has_lm_head:
        raise ValueError("this model was built with lm_head=False (a reward/critic model)")
    stacked = module.layers.weights()  # [L, ...] leaves
    layers = tuple(
        fuse_layer(jax.tree.map(lambda x, i=i: x[i], stacked)) for i in range(cfg.num_layers)
    )
    fn = module.final_norm
    out = {
        "embed": module.embed.embedding[...],
        "pos_embed": module.pos_embed.embedding[...] if cfg.arch == "gpt2" else None,
        "final_norm": {"scale": fn.scale[...], "bias": None if fn.bias is None else fn.bias[...]},
        "layers": layers,
        "lm_head": None if cfg.tie_word_embeddings else module.lm_head.kernel[...],
    }
    return out


def step_cache(cache: dict, max_length: int | None = None) -> tuple:
    """A ``dict(k=[L, B, S0, Hkv, Dh], v=...)`` cache (:func:`init_cache` layout) as the tuple of
    per-layer ``(k, v)``, each ``[B, Hkv, S, Dh]``, that :func:`decode_step` carries; slots
    ``S0 .. S-1`` (``max_length = S``, default ``S0``) are zeros."""
    s0 = cache["k"].shape[2]
    pad = ((0, 0), (0, 0), (0, (max_length or s0) - s0), (0, 0))

    def one(c):  # [B, S0, Hkv, Dh] -> [B, Hkv, S, Dh]
        return jnp.pad(jnp.swapaxes(c, 1, 2), pad)

    return tuple((one(k), one(v)) for k, v in zip(cache["k"], cache["v"], strict=True))


def init_step_cache(config: ModelConfig, batch_size: int, max_length: int, dtype=None) -> tuple:
    """An empty :func:`decode_step` cache: ``L`` pairs of zeros ``[B, Hkv, S, Dh]``."""
    dtype = config.compute_dtype if dtype is None else dtype
    shape = (batch_size, config.num_kv_heads, max_length, config.head_dim)
    return tuple(
        (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_layers)
    )


def decode_step(
    config: ModelConfig,
    weights: dict,
    tokens: jax.Array,
    positions: jax.Array,
    kv_mask: jax.Array,
    cache: tuple,
    index,
) -> tuple[jax.Array, tuple]:
    """``t`` new tokens per row through the model on the :func:`step_weights` arrangement.

    Args:
      config: the model's :class:`ModelConfig`.
      weights: :func:`step_weights`.
      tokens, positions: ``[B, t]`` int32 (``t = 1`` in the decode loop, ``t = P`` to prefill).
      kv_mask: ``[B, S]`` 0/1 over the cache slots.
      cache: :func:`init_step_cache` / :func:`step_cache` (``L`` pairs of ``[B, Hkv, S, Dh]``).
      index: the first slot written (int or traced int32): keys/values go to ``[index, index+t)``;
        query ``i`` attends to slots ``j <= index + i`` with ``kv_mask[:, j] == 1``.

    Returns:
      ``(hidden [B, t, D] in the compute dtype, new cache)``: what ``Transformer.__call__``
      computes on the :func:`init_cache` layout (the same :func:`block`).
    """
    cfg = config
    x = embed(cfg, weights["embed"], weights["pos_embed"], tokens, positions)
    per_kind = layer_inputs(cfg, kv_mask, index, tokens.shape[1])
    new_cache = []
    for w, kv, sliding in zip(weights["layers"], cache, cfg.layer_sliding(), strict=True):
        allowed, inv_freq = per_kind[sliding]
        x, kv = block(cfg, w, x, positions, allowed, inv_freq, kv, index, heads_first=True)
        new_cache.append(kv)
    return _norm_w(cfg, x, weights["final_norm"]), tuple(new_cache)


def step_logits(config: ModelConfig, weights: dict, hidden: jax.Array) -> jax.Array:
    """``[..., D] -> [..., V]`` float32 logits from :func:`step_weights` (:func:`lm_logits`)."""
    return lm_logits(config, weights["embed"], weights["lm_head"], hidden)

"""Decoder-only transformer LMs (GPT-2 and Llama families) in flax.nnx, with HF interop.

See ``docs/internals.md`` for the contract and :mod:`rlhf_jax.models.transformer` for the
parameter names.
"""

from rlhf_jax.models.apply import (
    READ_MODES,
    Model,
    decode,
    init_model,
    logits,
    logprobs_and_values,
    positions_from_mask,
    read_index,
    score_gain_bias,
    scores,
    set_score_gain_bias,
    token_logprobs,
    values,
    with_value_head,
)
from rlhf_jax.models.heads import ScoreHead, ValueHead
from rlhf_jax.models.hf import (
    SUPPORTED_MODEL_TYPES,
    ModelLoadError,
    check_tokenizer,
    config_from_hf,
    config_to_hf,
    from_pretrained,
    load_tokenizer,
    save_pretrained,
)
from rlhf_jax.models.transformer import (
    ARCHS,
    ModelConfig,
    Transformer,
    apply_rope,
    init_cache,
    rope_inv_freq,
)

__all__ = [
    "ARCHS",
    "READ_MODES",
    "SUPPORTED_MODEL_TYPES",
    "Model",
    "ModelConfig",
    "ModelLoadError",
    "ScoreHead",
    "Transformer",
    "ValueHead",
    "apply_rope",
    "check_tokenizer",
    "config_from_hf",
    "config_to_hf",
    "from_pretrained",
    "load_tokenizer",
    "save_pretrained",
    "decode",
    "init_cache",
    "init_model",
    "logits",
    "logprobs_and_values",
    "positions_from_mask",
    "read_index",
    "rope_inv_freq",
    "score_gain_bias",
    "scores",
    "set_score_gain_bias",
    "token_logprobs",
    "values",
    "with_value_head",
]

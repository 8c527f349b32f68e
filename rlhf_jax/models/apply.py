"""Pure functions of ``(graphdef, params)``: logits, token log-probs, values, scores, decode.

A model is split once, ``graphdef, params = nnx.split(module, nnx.Param)``, and every function
here merges it back inside the caller's ``jax.jit`` (the Flax functional API; see
``docs/internals.md``). Tokens are ``[B, T]`` int32 with a 0/1 ``attention_mask``; prompts are
left-padded, so positions come from the mask: ``positions = max(cumsum(mask) - 1, 0)``.

Alignment (the convention of TRL / lm-human-preferences ``logprobs_from_logits(logits[:, :-1],
tokens[:, 1:])``): with ``start`` the first scored token (``start = P``, the prompt length, in
PPO), ``token_logprobs(...)[:, i] = log p(tokens[start+i] | tokens[:start+i])`` is read from the
hidden state at position ``start-1+i``, and ``values(...)[:, i]`` is the value head at the same
position: the value of the state *before* ``tokens[start+i]`` is produced.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import nnx, struct

from rlhf_jax.models import transformer as _tf
from rlhf_jax.models.transformer import ModelConfig, Transformer

READ_MODES = ("last_nonpad", "last")


@struct.dataclass
class Model:
    """A split model: the static ``graphdef``, the ``params`` pytree and its ``config``."""

    graphdef: Any = struct.field(pytree_node=False)
    params: Any
    config: ModelConfig = struct.field(pytree_node=False)


def init_model(
    config: ModelConfig,
    key: jax.Array,
    *,
    lm_head: bool = True,
    value_head: bool = False,
    score_head: bool = False,
) -> Model:
    """A freshly initialised :class:`Transformer`, split into a :class:`Model` record."""
    if isinstance(key, int):
        key = jax.random.key(key)
    module = Transformer(
        config,
        rngs=nnx.Rngs(params=key),
        lm_head=lm_head,
        value_head=value_head,
        score_head=score_head,
    )
    graphdef, params = nnx.split(module, nnx.Param)
    return Model(graphdef=graphdef, params=params, config=config)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """``[B, T]`` position ids ``max(cumsum(mask, -1) - 1, 0)`` (left padding gets 0)."""
    mask = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, -1) - 1, 0)


def _trunk(graphdef, params, tokens, attention_mask):
    chex.assert_rank([tokens, attention_mask], 2)
    chex.assert_equal_shape([tokens, attention_mask])
    module = nnx.merge(graphdef, params)
    mask = attention_mask.astype(jnp.int32)
    hidden, _ = module(tokens.astype(jnp.int32), positions_from_mask(mask), mask)
    return module, hidden


def logits(graphdef, params, tokens: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Next-token logits ``[B, T, V]`` float32: ``out[:, t]`` predicts ``tokens[:, t+1]``."""
    module, hidden = _trunk(graphdef, params, tokens, attention_mask)
    return module.lm_logits(hidden)


def _logprobs_from_hidden(module, hidden, tokens, start, temperature):
    """``[B, T-start]`` log-probs of ``tokens[:, start:]`` from the ``[B, T, D]`` hidden states.

    The LM head runs on the ``T-start`` scored positions only (the prompt's logits are never
    formed), and the taken token's log-prob is ``z[token] - logsumexp(z)`` with ``z = logits /
    temperature``: one reduction over the vocabulary, no ``[B, T-start, V]`` log-softmax array.
    """
    h = hidden[:, start - 1 : -1]  # [B, T-start, D]: position start-1+i predicts start+i
    z = module.lm_logits(h) / jnp.asarray(temperature, jnp.float32)  # [B, T-start, V]
    targets = tokens[:, start:].astype(jnp.int32)
    taken = jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0]  # [B, T-start]
    return taken - jax.nn.logsumexp(z, axis=-1)


def _check_start(tokens, start):
    if not isinstance(start, int) or not 1 <= start < tokens.shape[1]:
        raise ValueError(
            f"start={start!r} must be a Python int with 1 <= start < T={tokens.shape[1]}"
        )


def token_logprobs(
    graphdef,
    params,
    tokens: jax.Array,
    attention_mask: jax.Array,
    *,
    start: int = 1,
    temperature: float | jax.Array = 1.0,
) -> jax.Array:
    """``[B, T-start]`` float32: ``out[:, i] = log softmax(logits / temperature)[tokens[start+i]]``.

    Only the hidden states at positions ``>= start-1`` go through the LM head (no ``[B, T, V]``
    for the prompt). ``temperature`` divides the logits before the log-softmax, as the sampler
    did (TRL ``logits /= temperature + 1e-7``; LMHP divides by the temperature).
    """
    _check_start(tokens, start)
    module, hidden = _trunk(graphdef, params, tokens, attention_mask)
    return _logprobs_from_hidden(module, hidden, tokens, start, temperature)


def _value_from_hidden(module, hidden):
    if module.has_value_head:
        return module.value_head(hidden)
    if module.has_score_head:
        return module.score_head(hidden)
    raise ValueError("values() needs a model with value_head=True or score_head=True")


def values(
    graphdef, params, tokens: jax.Array, attention_mask: jax.Array, *, start: int = 1
) -> jax.Array:
    """``[B, T-start]`` float32 values at positions ``start-1+i``, aligned with token_logprobs.

    Uses the value head, or (a critic initialised from a reward model) the score head per token.
    """
    _check_start(tokens, start)
    module, hidden = _trunk(graphdef, params, tokens, attention_mask)
    return _value_from_hidden(module, hidden[:, start - 1 : -1])


def logprobs_and_values(
    graphdef,
    params,
    tokens: jax.Array,
    attention_mask: jax.Array,
    *,
    start: int = 1,
    temperature: float | jax.Array = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """``(token_logprobs, values)``, both ``[B, T-start]``, from one trunk pass."""
    _check_start(tokens, start)
    module, hidden = _trunk(graphdef, params, tokens, attention_mask)
    logp = _logprobs_from_hidden(module, hidden, tokens, start, temperature)
    return logp, _value_from_hidden(module, hidden[:, start - 1 : -1])


def read_index(attention_mask: jax.Array, read: str = "last_nonpad") -> jax.Array:
    """``[B]`` int32 position where a sequence score is read.

    ``last_nonpad``: the last position with ``mask == 1`` (Safe RLHF ``end_index``, TRL
    ``get_reward`` with ``first_true_indices(pad) - 1``; a row with no real token reads 0).
    ``last``: ``T - 1`` whatever the mask (lm-human-preferences reads the last token of the
    fixed-length query+response). See docs/formulas.md §5.
    """
    if read not in READ_MODES:
        raise ValueError(f"read={read!r}: use one of {READ_MODES}")
    b, t = attention_mask.shape
    if read == "last":
        return jnp.full((b,), t - 1, jnp.int32)
    idx = jnp.where(attention_mask > 0, jnp.arange(t, dtype=jnp.int32), -1)
    return jnp.maximum(jnp.max(idx, axis=-1), 0)


def scores(
    graphdef, params, tokens: jax.Array, attention_mask: jax.Array, *, read: str = "last_nonpad"
) -> jax.Array:
    """``[B]`` float32 sequence scores of the score head, read at :func:`read_index`."""
    module, hidden = _trunk(graphdef, params, tokens, attention_mask)
    if not module.has_score_head:
        raise ValueError("scores() needs a model built with score_head=True")
    idx = read_index(attention_mask, read)
    h = jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]  # [B, D]
    return module.score_head(h)


def decode(
    graphdef,
    params,
    tokens: jax.Array,
    positions: jax.Array,
    kv_mask: jax.Array,
    cache: dict,
    index,
    *,
    last_only: bool = False,
) -> tuple[jax.Array, dict]:
    """Run ``t`` new tokens through the model with a KV cache.

    Args:
      tokens, positions: ``[B, t]`` int32.
      kv_mask: ``[B, S]`` 0/1 over all cache slots (left-padding holes stay 0).
      cache: ``dict(k, v)`` of ``[L, B, S, Hkv, Dh]`` (:func:`init_cache`).
      index: first slot written (int or traced int32): keys/values go to ``[index, index+t)``;
        query ``i`` attends to slots ``j <= index + i`` with ``kv_mask[:, j] == 1``.
      last_only: return only the logits of the last new token, ``[B, V]``.

    Returns:
      ``(logits [B, t, V] or [B, V] float32, new cache)``. Prefill: ``index=0, t=P``; decode:
      ``t=1``. Gives the logits of the full forward (golden-tested).
    """
    chex.assert_rank([tokens, positions, kv_mask], 2)
    chex.assert_equal_shape([tokens, positions])
    module = nnx.merge(graphdef, params)
    s = cache["k"].shape[2]
    chex.assert_shape(kv_mask, (tokens.shape[0], s))
    hidden, cache = module(
        tokens.astype(jnp.int32),
        positions.astype(jnp.int32),
        kv_mask.astype(jnp.int32),
        cache=cache,
        index=jnp.asarray(index, jnp.int32),
    )
    if last_only:
        hidden = hidden[:, -1]
    return module.lm_logits(hidden), cache


def step_weights(graphdef, params) -> dict:
    """The parameters rearranged for :func:`decode_step`: per-layer (unstacked) weights with
    q/k/v (and gate/up) kernels concatenated. One copy of the weights: call it once, outside the
    decode loop (inside a ``lax.while_loop`` every slice of the stacked ``[L, ...]`` parameters
    would be copied again at every step)."""
    return _tf.step_weights(nnx.merge(graphdef, params))


def step_cache(cache: dict, max_length: int | None = None) -> tuple:
    """A :func:`decode` cache ``dict(k=[L, B, S0, Hkv, Dh], v)`` (e.g. after the prefill) as the
    :func:`decode_step` cache: ``L`` pairs ``(k, v)`` of ``[B, Hkv, S, Dh]``, zero-padded to
    ``max_length`` slots."""
    return _tf.step_cache(cache, max_length)


def init_step_cache(config: ModelConfig, batch_size: int, max_length: int, dtype=None) -> tuple:
    """An empty :func:`decode_step` cache: ``L`` pairs ``(k, v)`` of zeros ``[B, Hkv, S, Dh]``."""
    return _tf.init_step_cache(config, batch_size, max_length, dtype)


def decode_step(
    config: ModelConfig,
    weights: dict,
    tokens: jax.Array,
    positions: jax.Array,
    kv_mask: jax.Array,
    cache: tuple,
    index,
    *,
    last_only: bool = False,
) -> tuple[jax.Array, tuple]:
    """:func:`decode` on the rollout's arrangement: :func:`step_weights` and the per-layer
    :func:`init_step_cache` / :func:`step_cache` cache. The same numbers, without the layer scan:
    a Python loop over unstacked layers, so that inside a ``while_loop`` nothing is copied per step
    but the new keys/values (in-place updates of the loop-carried cache).

    Args:
      config: the model's :class:`ModelConfig`.
      weights: :func:`step_weights`.
      tokens, positions: ``[B, t]`` int32 (prefill: ``t = P``, ``index = 0``; decode: ``t = 1``).
      kv_mask: ``[B, S]`` 0/1 over all cache slots.
      cache: ``L`` pairs of ``[B, Hkv, S, Dh]``.
      index: first slot written (int or traced int32): keys/values go to ``[index, index+t)``;
        query ``i`` attends to slots ``j <= index + i`` with ``kv_mask[:, j] == 1``.
      last_only: return only the logits of the last new token, ``[B, V]``.

    Returns:
      ``(logits [B, t, V] or [B, V] float32, new cache)``.
    """
    chex.assert_rank([tokens, positions, kv_mask], 2)
    chex.assert_equal_shape([tokens, positions])
    chex.assert_shape(kv_mask, (tokens.shape[0], cache[0][0].shape[2]))
    hidden, cache = _tf.decode_step(
        config,
        weights,
        tokens.astype(jnp.int32),
        positions.astype(jnp.int32),
        kv_mask.astype(jnp.int32),
        cache,
        index,
    )
    if last_only:
        hidden = hidden[:, -1]
    return _tf.step_logits(config, weights, hidden), cache


# ------------------------------------------------------------------------------------------
# Parameter surgery


def _flat(params) -> dict:
    return dict(nnx.to_flat_state(params))


def with_value_head(model: Model, key: jax.Array | None = None) -> tuple[Any, Any]:
    """``(graphdef, params)`` of ``model`` plus a zero-initialised value head (shared critic).

    Every existing parameter (trunk, LM head, score head) is kept by reference. ``key`` is
    accepted for symmetry; the value head is zero-initialised.
    """
    del key
    module = nnx.merge(model.graphdef, model.params)
    heads = dict(lm_head=module.has_lm_head, value_head=True, score_head=module.has_score_head)
    abstract = nnx.eval_shape(lambda: Transformer(model.config, rngs=nnx.Rngs(0), **heads))
    graphdef, shapes = nnx.split(abstract, nnx.Param)
    old = _flat(model.params)
    flat = []
    for path, var in nnx.to_flat_state(shapes):
        if path in old:
            flat.append((path, old[path]))
        else:  # the new value head: zeros
            flat.append(
                (path, var.replace(jnp.zeros(var.get_value().shape, var.get_value().dtype)))
            )
    return graphdef, nnx.from_flat_state(flat)


def score_gain_bias(params) -> tuple[jax.Array, jax.Array]:
    """``(reward_gain, reward_bias)`` scalars of a score head."""
    flat = _flat(params)
    try:
        gain = flat[("score_head", "reward_gain")].get_value()
        bias = flat[("score_head", "reward_bias")].get_value()
    except KeyError:
        raise ValueError("these params have no score head (build with score_head=True)") from None
    return gain, bias


def set_score_gain_bias(params, gain, bias):
    """New params with the score head's ``reward_gain``/``reward_bias`` replaced (others shared)."""
    score_gain_bias(params)  # validates
    new = {
        ("score_head", "reward_gain"): jnp.asarray(gain, jnp.float32).reshape(()),
        ("score_head", "reward_bias"): jnp.asarray(bias, jnp.float32).reshape(()),
    }
    flat = [(p, v.replace(new[p]) if p in new else v) for p, v in nnx.to_flat_state(params)]
    return nnx.from_flat_state(flat)

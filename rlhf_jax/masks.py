"""The indexing conventions the RLHF math shares: the score slot, the policy and value masks.

Every function of :mod:`rlhf_jax.rewards`, :mod:`rlhf_jax.returns` and :mod:`rlhf_jax.losses`
reads the same ``[B, T]`` response arrays: ``mask[b, t]`` is 1 on the real tokens of response
``b`` (through the first stop token) and 0 on padding; responses are right-padded to a static
length T. Where the score lands (``t*``), which slots are time steps of GAE and of the value loss,
and which tokens the policy loss averages over are convention options
(:class:`rlhf_jax.presets.Conventions`, ``docs/formulas.md`` §1 and §9.1); this module derives
them from the one response mask, so the reward shaping, the returns and the losses agree.

It also holds the input conventions of those modules: :func:`as_float` (inputs of any float dtype
are computed in at least float32) and :func:`as_scalar` (a hyperparameter a sweep varies is a
float or a traced 0-d array, never a batch).

All functions are pure, jittable and vmappable.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from rlhf_jax.presets import DEFAULT, Conventions

__all__ = [
    "as_float",
    "as_scalar",
    "last_token_index",
    "score_slot",
    "value_mask",
    "policy_mask",
    "value_loss_mask",
]


def as_float(x) -> jax.Array:
    """``x`` as an array of at least float32 precision (bf16/fp16 inputs accumulate in f32;
    float64 stays float64 under x64)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def as_scalar(name: str, x) -> jax.Array:
    """``x`` (a float or a 0-d array, possibly traced) as :func:`as_float`; a ``ValueError``
    naming ``name`` if it has a shape (a sweep vmaps over runs instead of passing a vector)."""
    x = as_float(x)
    if x.ndim != 0:
        raise ValueError(
            f"{name} must be a scalar (a float or a 0-d array; vmap over runs for a sweep), "
            f"got shape {x.shape}"
        )
    return x


def last_token_index(mask) -> jax.Array:
    """[B] int32 index of the last 1 in each row of ``mask`` [B, T]; -1 for an all-zero row.

    This is the stop token of a response that sampled one (the last real token), and T-1 for a
    response truncated at the length limit. Holes inside the mask do not matter.
    """
    chex.assert_rank(mask, 2)
    t = mask.shape[1]
    idx = jnp.arange(t, dtype=jnp.int32)
    return jnp.max(jnp.where(jnp.asarray(mask) != 0, idx, -1), axis=1)


def score_slot(mask, *, options: Conventions = DEFAULT) -> jax.Array:
    """[B, T] float32 one-hot of the slot t* that receives the score (docs/formulas.md §1, §9.1).

    With ``L`` = :func:`last_token_index` (the last real token):

    * ``'last_token'``: t* = L (TRL-legacy ``mask.nonzero()[-1]``, SAFE ``end_index``);
    * ``'after_stop'``: t* = min(L + 1, T - 1), the first padding slot after the stop token, or
      the last slot of a response that fills T (TRL-PPO ``seq_len + 1``, DSCHAT ``ends - 1``);
    * ``'last_fixed'``: t* = T - 1 for every row, whatever the mask (LMHP ``rewards[:, -1]``).

    An all-zero mask row gets no score under the first two conventions (a zero row).
    """
    chex.assert_rank(mask, 2)
    t = mask.shape[1]
    last = last_token_index(mask)
    if options.score_position == "last_fixed":
        slot = jnp.full_like(last, t - 1)
    elif options.score_position == "after_stop":
        slot = jnp.where(last >= 0, jnp.minimum(last + 1, t - 1), -1)
    else:
        slot = last
    return (jnp.arange(t, dtype=jnp.int32)[None, :] == slot[:, None]).astype(jnp.float32)


def value_mask(mask, *, options: Conventions = DEFAULT) -> jax.Array:
    """[B, T] float32 mask of the time steps that enter GAE and the value loss.

    * ``'last_token'``: the response mask itself;
    * ``'after_stop'``: the response mask plus the score slot one past the stop token (TRL-PPO
      ``~padding_mask_p1``, DSCHAT ``[start, ends)``): the critic learns a value for that
      post-stop state and GAE carries the score back from it;
    * ``'last_fixed'``: all T slots (LMHP has no mask: every sampled token is a step).

    The policy loss always uses the response mask (TRL-PPO ``~padding_mask``).
    """
    chex.assert_rank(mask, 2)
    m = (jnp.asarray(mask) != 0).astype(jnp.float32)
    if options.score_position == "last_fixed":
        return jnp.ones_like(m)
    if options.score_position == "after_stop":
        return jnp.maximum(m, score_slot(mask, options=options))
    return m


def policy_mask(mask, *, options: Conventions = DEFAULT) -> jax.Array:
    """[B, T] float32 mask of the tokens the policy loss and advantage whitening average over.

    The response mask (TRL-PPO ``~padding_mask``, TRL-legacy, DSCHAT, SAFE), or all T slots for
    ``score_position='last_fixed'`` (LMHP: plain means over B x T).
    """
    chex.assert_rank(mask, 2)
    m = (jnp.asarray(mask) != 0).astype(jnp.float32)
    return jnp.ones_like(m) if options.score_position == "last_fixed" else m


def value_loss_mask(mask, *, options: Conventions = DEFAULT) -> jax.Array:
    """[B, T] float32 mask of the value loss: :func:`value_mask` (``value_loss_on='steps'``,
    TRL-PPO) or :func:`policy_mask` (``'response'``, DSCHAT trains the critic on real tokens)."""
    if options.value_loss_on == "response":
        return policy_mask(mask, options=options)
    return value_mask(mask, options=options)

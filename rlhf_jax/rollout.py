"""Rollout engine: compiled sampling with a KV cache, the same numbers as the learner.

:func:`sample` generates responses to a batch of left-padded prompts inside one compiled function:
a prefill of the ``B`` prompts into a preallocated KV cache, the cache repeated ``n`` times (``n``
samples per prompt without re-running the prefill), then a ``lax.while_loop`` of one-token decode
steps that stops as soon as every sequence has produced a stop token. Each step runs the layer
code of the learner's forward (:func:`rlhf_jax.models.transformer.block`, through
``models.apply.decode_step``) on a per-layer arrangement of the same weights (q/k/v and gate/up
kernels concatenated, a ``[B, Hkv, S, Dh]`` cache). Its log-probs therefore agree with
:func:`rlhf_jax.models.token_logprobs` to float32 rounding (the fused matmuls may round
differently; the tests hold them to 1e-5), not bit for bit.

Sampling distribution, per step (the order of ``transformers``' logits warpers)::

    scaled = logits / temperature                       # [N, V]
    keep   = top_k(scaled) & top_p(scaled|top_k) & min_p(scaled)
    token ~ softmax(where(keep, scaled, -inf))          # or argmax(scaled) when greedy

- ``top_k`` (static int, 0 = off): the ``k`` largest scaled logits (ties broken by the lower index).
- ``top_p`` (traceable, 1 = off): the smallest set of most likely tokens (of the top-k set when
  ``top_k > 0``, renormalised) whose mass reaches ``top_p``; the token that crosses it is kept.
  Ties with the crossing token's logit are kept as well.
- ``min_p`` (traceable, 0 = off): tokens with ``p >= min_p * p_max``.

Two log-probs are returned for every sampled token (see :class:`Rollout`):

- ``logprobs``: under the *sampling* distribution, i.e. after temperature **and** filtering. This is
  the probability the token was actually drawn with (importance weights, off-policy corrections).
- ``learner_logprobs``: ``log_softmax(logits / temperature)`` over the full vocabulary, without
  filtering. This is what :func:`rlhf_jax.models.token_logprobs` (same ``temperature=``)
  computes in the learner, so PPO's ``old_logprobs`` should be these: the first minibatch's
  ratio is then exactly 1. Without filtering the two are equal.

Randomness is positional: sample ``i`` of global prompt ``g`` uses the key
``k_gi = fold_in(fold_in(key, g), i)`` and its step ``t`` the key ``fold_in(k_gi, t)``, from which
one uniform draw picks the token by inverting the CDF. A response therefore does not depend on the
batch size, the batch order, or the number of devices (up to float rounding of the logits).

Truncation (``docs/formulas.md`` §1, 6): a response with no stop token within
``max_new_tokens`` has ``truncated = True``; its mask covers all ``max_new_tokens`` tokens. Reward
shaping decides what to do with it (LMHP's ``penalty_reward_value``, TRL's ``missing_eos_penalty``,
GRPO's ``mask_truncated_completions``).

Performance (CPU, and the same on accelerators): no full-vocabulary sort is ever run. Top-k uses
``lax.top_k``; top-p without top-k finds its threshold by a 32-step bisection over the
order-preserving integer image of float32 (exact, ``O(32 V)``); filters that are off are skipped at
run time with ``lax.cond``; the draw is a blocked inverse CDF (one uniform per row, no ``[N, V]``
Gumbel noise). See ``docs/rollout.md``.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax import lax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from rlhf_jax.models import apply as _apply

Array = jax.Array

_CDF_BLOCK = 256  # vocabulary block of the two-level inverse CDF
_BATCH_AXES = ("data", "fsdp")  # the batch axis is split over these when a mesh is set


@struct.dataclass
class SamplingConfig:
    """How the next token is drawn. Frozen; a pytree whose float fields are traceable leaves.

    ``temperature``, ``top_p`` and ``min_p`` may be Python floats or scalar arrays, so a sweep can
    ``jax.vmap`` over them; ``top_k`` and ``greedy`` change the program and are static.
    """

    temperature: Any = 1.0  # logits are divided by this (> 0) before everything else
    top_p: Any = 1.0  # nucleus mass in (0, 1]; 1 = off
    min_p: Any = 0.0  # keep tokens with p >= min_p * p_max, in [0, 1]; 0 = off
    top_k: int = struct.field(pytree_node=False, default=0)  # keep the k most likely; 0 = off
    greedy: bool = struct.field(pytree_node=False, default=False)  # argmax instead of a draw

    def __post_init__(self):
        def check(name, ok, what):
            value = getattr(self, name)
            if isinstance(value, numbers.Real) and not isinstance(value, bool) and not ok(value):
                raise ValueError(f"SamplingConfig.{name}={value!r}: must be {what}")

        check("temperature", lambda v: v > 0, "> 0 (use greedy=True for argmax decoding)")
        check("top_p", lambda v: 0 < v <= 1, "in (0, 1]; 1 turns top-p off")
        check("min_p", lambda v: 0 <= v <= 1, "in [0, 1]; 0 turns min-p off")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"SamplingConfig.top_k={self.top_k!r}: must be an int >= 0 (0 = off)")


@struct.dataclass
class Rollout:
    """Sampled responses, ``N = B * n`` rows; the ``n`` samples of one prompt are contiguous.

    Attributes:
      tokens: [N, R] int32 response tokens; ``pad_token_id`` after the first stop token.
      mask: [N, R] int32, 1 on real tokens up to and including the first stop token.
      logprobs: [N, R] float32 log-prob of each token under the sampling distribution (temperature
        and top-k/top-p/min-p applied); 0 where ``mask == 0``.
      learner_logprobs: [N, R] float32 ``log_softmax(logits / temperature)`` of each token, without
        filtering: equal to ``token_logprobs(..., temperature=T)`` of the learner; 0 where
        ``mask == 0``.
      truncated: [N] bool, no stop token within ``R`` tokens.
      lengths: [N] int32, ``mask.sum(-1)``.
      prompt_index: [N] int32 global index of each row's prompt.
    """

    tokens: Array
    mask: Array
    logprobs: Array
    learner_logprobs: Array
    truncated: Array
    lengths: Array
    prompt_index: Array


# ---------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------


def as_key(key_or_seed) -> Array:
    """A typed PRNG key from a typed key, a raw ``uint32[2]`` key, or an integer seed."""
    if isinstance(key_or_seed, numbers.Integral):
        return jax.random.key(key_or_seed)
    key_or_seed = jnp.asarray(key_or_seed)
    if jnp.issubdtype(key_or_seed.dtype, jax.dtypes.prng_key):
        return key_or_seed
    if key_or_seed.dtype == jnp.uint32 and key_or_seed.shape[-1:] == (2,):
        return jax.random.wrap_key_data(key_or_seed)
    if jnp.issubdtype(key_or_seed.dtype, jnp.integer) and key_or_seed.ndim == 0:
        return jax.random.key(key_or_seed)
    raise TypeError(f"expected a PRNG key or an integer seed, got {key_or_seed.dtype}")


def sample_keys(key: Array, prompt_index: Array, n: int) -> Array:
    """Per-sample keys ``fold_in(fold_in(key, g), i)``, ``g`` global prompt index, ``i < n``.

    Args:
      key: a typed PRNG key (scalar).
      prompt_index: [B] int32 global prompt indices.
      n: samples per prompt.

    Returns:
      [B * n] keys, the ``n`` samples of one prompt contiguous.
    """
    chex.assert_rank(prompt_index, 1)
    per_prompt = jax.vmap(lambda g: jax.random.fold_in(key, g))(prompt_index)  # [B]
    per_sample = jax.vmap(lambda k: jax.vmap(lambda i: jax.random.fold_in(k, i))(jnp.arange(n)))(
        per_prompt
    )  # [B, n]
    return per_sample.reshape(-1)


def _uniform(key: Array) -> Array:
    # float32 explicitly: under jax_enable_x64 the default would draw float64 (other numbers)
    return jax.random.uniform(key, dtype=jnp.float32)


def step_uniforms(row_keys: Array, steps: int) -> Array:
    """``u[i, t] = uniform(fold_in(row_keys[i], t))``: [N, steps] float32 in [0, 1)."""
    chex.assert_rank(row_keys, 1)
    t = jnp.arange(steps, dtype=jnp.int32)
    return jax.vmap(lambda k: jax.vmap(lambda s: _uniform(jax.random.fold_in(k, s)))(t))(row_keys)


# ---------------------------------------------------------------------------------------------
# One step of sampling: [N, V] logits -> [N] tokens
# ---------------------------------------------------------------------------------------------


def _float_order_key(x: Array) -> Array:
    """An int32 image of float32 ``x`` with the same order (``a < b`` iff ``key(a) < key(b)``)."""
    i = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.where(i < 0, i ^ jnp.int32(0x7FFFFFFF), i)


def _top_p_keep(scaled: Array, e: Array, top_p: Array) -> Array:
    """Top-p set over the full vocabulary without sorting: [N, V] bool.

    ``e`` is ``exp(scaled - max)``, the unnormalised probabilities.

    Bisection for the largest threshold ``tau`` with ``sum_{x_i >= tau} p_i >= top_p`` over the
    order-preserving integer image of the logits: 32 halvings of the int32 range make it exact,
    i.e. ``tau`` is the logit of the token whose inclusion makes the (descending) mass reach
    ``top_p`` -- the same set as the sort-and-cumsum definition (plus exact ties).
    """
    keys = _float_order_key(scaled)  # [N, V]
    target = top_p * jnp.sum(e, -1)  # [N]
    lo = jnp.min(keys, -1)  # mass(keys >= lo) = 1 >= top_p
    hi = jnp.max(keys, -1)  # mass(keys >= hi) >= p_max: may also pass

    def body(_, lohi):
        lo, hi = lohi
        mid = (lo >> 1) + (hi >> 1) + ((lo | hi) & 1)  # ceil((lo + hi) / 2), no overflow
        ok = jnp.sum(jnp.where(keys >= mid[:, None], e, 0.0), -1) >= target
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    lo, _ = lax.fori_loop(0, 32, body, (lo, hi))
    return keys >= lo[:, None]


def _inverse_cdf(weights: Array, u: Array, block: int) -> Array:
    """Index ``j`` with ``C_{j-1} <= u * C_V < C_j`` for ``C`` the cumsum of ``weights``: [N] int32.

    Two levels (block sums, then one block) so that no cumsum runs over the whole vocabulary. An
    index with zero weight is never returned: rounding at the top end falls back to the last block
    and the last index with positive weight.

    Args:
      weights: [N, V] non-negative, at least one positive per row.
      u: [N] uniform in [0, 1).
      block: block size.
    """
    n, v = weights.shape
    nb = -(-v // block)
    w = jnp.pad(weights, ((0, 0), (0, nb * block - v))).reshape(n, nb, block)
    bsum = jnp.sum(w, -1)  # [N, nb]
    csum = jnp.cumsum(bsum, -1)  # [N, nb]
    target = u * csum[:, -1]  # [N]
    last_blk = nb - 1 - jnp.argmax((bsum > 0)[:, ::-1], -1)
    blk = jnp.minimum(jnp.sum(csum <= target[:, None], -1), last_blk)  # [N]
    before = jnp.take_along_axis(csum - bsum, blk[:, None], -1)[:, 0]
    inner = jnp.take_along_axis(w, blk[:, None, None], 1)[:, 0]  # [N, block]
    cin = jnp.cumsum(inner, -1)
    last_in = block - 1 - jnp.argmax((inner > 0)[:, ::-1], -1)
    j = jnp.minimum(jnp.sum(cin <= (target - before)[:, None], -1), last_in)
    return (blk * block + j).astype(jnp.int32)


def _maybe(pred: Array, fn, x: Array) -> Array:
    """``fn(x)`` if ``pred`` else ``x``, skipped at run time (under vmap both run, as a select)."""
    return lax.cond(pred, fn, lambda y: y, x)


def _pick(x: Array, idx: Array) -> Array:
    return jnp.take_along_axis(x, idx[:, None], -1)[:, 0]


def sample_next(
    logits: Array, u: Array, sampling: SamplingConfig, *, block: int = _CDF_BLOCK
) -> tuple[Array, Array, Array]:
    """Draw one token per row from the filtered, temperature-scaled distribution.

    Args:
      logits: [N, V] float32 next-token logits.
      u: [N] uniform draws in [0, 1) (ignored when greedy).
      sampling: the sampling distribution.
      block: vocabulary block of the inverse CDF (an implementation detail; tests vary it).

    Returns:
      tokens [N] int32, logprobs [N] (sampling distribution), learner_logprobs [N]
      (``log_softmax(logits / temperature)``, unfiltered).
    """
    chex.assert_rank(logits, 2)
    chex.assert_rank(u, 1)
    scaled = logits.astype(jnp.float32) / jnp.asarray(sampling.temperature, jnp.float32)
    row_max = jnp.max(scaled, -1, keepdims=True)  # [N, 1]; never filtered out
    e = jnp.exp(scaled - row_max)  # [N, V] unnormalised probabilities
    full_lse = row_max[:, 0] + jnp.log(jnp.sum(e, -1))  # [N]
    top_p = jnp.asarray(sampling.top_p, jnp.float32)
    log_min_p = jnp.log(jnp.asarray(sampling.min_p, jnp.float32))  # -inf when off

    if sampling.top_k > 0:
        # Everything happens among the k candidates: [N, k], sorted descending.
        vals, ids = lax.top_k(scaled, min(sampling.top_k, scaled.shape[-1]))
        probs = jax.nn.softmax(vals, -1)
        cross = jnp.cumsum(probs, -1) - probs < top_p  # exclusive mass below top_p
        tau = jnp.min(jnp.where(cross, vals, jnp.inf), -1, keepdims=True)  # crossing logit
        keep = (vals >= tau) & (vals >= vals[:, :1] + log_min_p)
        fvals = jnp.where(keep, vals, -jnp.inf)
        w = jnp.exp(fvals - vals[:, :1])
        if sampling.greedy:
            j = jnp.zeros(u.shape, jnp.int32)
        else:
            j = _inverse_cdf(w, u, block=w.shape[-1])
        tokens = _pick(ids, j)
        logprobs = _pick(vals, j) - (vals[:, 0] + jnp.log(jnp.sum(w, -1)))
    else:
        # Filtered weights [N, V]: e itself when the filters are off (no mask is built).
        w = _maybe(top_p < 1, lambda w: jnp.where(_top_p_keep(scaled, e, top_p), w, 0.0), e)
        w = _maybe(
            log_min_p > -jnp.inf, lambda w: jnp.where(scaled >= row_max + log_min_p, w, 0.0), w
        )
        if sampling.greedy:
            tokens = jnp.argmax(scaled, -1).astype(jnp.int32)
        else:
            tokens = _inverse_cdf(w, u, block)
        logprobs = _pick(scaled, tokens) - (row_max[:, 0] + jnp.log(jnp.sum(w, -1)))
    learner = _pick(scaled, tokens) - full_lse
    return tokens.astype(jnp.int32), logprobs, learner


def filtered_logprobs(logits: Array, sampling: SamplingConfig) -> Array:
    """Log-probs of the whole sampling distribution, [N, V] (``-inf`` on filtered tokens).

    The reference definition (one full sort per row): slow, for tests and analysis. ``sample_next``
    draws from exactly this distribution.
    """
    chex.assert_rank(logits, 2)
    scaled = logits.astype(jnp.float32) / jnp.asarray(sampling.temperature, jnp.float32)
    v = scaled.shape[-1]
    order = jnp.argsort(-scaled, -1, stable=True)  # [N, V] descending, lower index first on ties
    svals = jnp.take_along_axis(scaled, order, -1)
    rank_keep = jnp.ones(scaled.shape, bool)
    if sampling.top_k > 0:
        rank_keep = jnp.arange(v)[None, :] < sampling.top_k
    sv = jnp.where(rank_keep, svals, -jnp.inf)
    probs = jax.nn.softmax(sv, -1)
    cross = (jnp.cumsum(probs, -1) - probs < sampling.top_p) & rank_keep  # sorted order
    tau = jnp.min(jnp.where(cross, svals, jnp.inf), -1, keepdims=True)  # crossing token's logit
    keep_sorted = rank_keep & (svals >= tau)
    keep = (
        jnp.zeros(scaled.shape, bool)
        .at[jnp.arange(scaled.shape[0])[:, None], order]
        .set(keep_sorted)
    )
    keep &= scaled >= jnp.max(scaled, -1, keepdims=True) + jnp.log(sampling.min_p)
    return jax.nn.log_softmax(jnp.where(keep, scaled, -jnp.inf), -1)


# ---------------------------------------------------------------------------------------------
# The rollout
# ---------------------------------------------------------------------------------------------


def _constrain_batch(x: Array, axis: int = 0) -> Array:
    """Shard ``x``'s batch axis over ('data', 'fsdp') when a mesh with those axes is set.

    ``jax.set_mesh(mesh)`` makes the mesh visible here; without one (or when the batch does not
    divide over the devices) ``x`` is returned as is and the partitioner decides. Meshes with
    ``AxisType.Auto`` axes (``rlhf_jax.parallel.make_mesh``) are the supported kind.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not all(a in mesh.axis_names for a in _BATCH_AXES):
        return x
    size = mesh.shape["data"] * mesh.shape["fsdp"]
    if x.shape[axis] % size:
        return x
    spec = [None] * x.ndim
    spec[axis] = _BATCH_AXES
    types = {mesh.axis_types[mesh.axis_names.index(a)] for a in _BATCH_AXES}
    if types != {AxisType.Auto}:  # Explicit axes: the shardings are the inputs' (types)
        return x
    return lax.with_sharding_constraint(x, P(*spec))


def _model_config(graphdef, params):
    module = nnx.merge(graphdef, params)
    return module.config


def sample(
    graphdef,
    params,
    prompt_tokens: Array,
    prompt_mask: Array,
    key,
    *,
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    stop_tokens: Sequence[int] = (),
    n: int = 1,
    prompt_index: Array | None = None,
    pad_token_id: int = 0,
) -> Rollout:
    """Sample ``n`` responses of up to ``max_new_tokens`` tokens to each of ``B`` prompts.

    Args:
      graphdef: the model's static graph (``nnx.split``); static.
      params: the model's parameters.
      prompt_tokens: [B, P] int32, left-padded; every prompt needs at least one real token.
      prompt_mask: [B, P] 0/1.
      key: a PRNG key (typed or raw) or an integer seed.
      max_new_tokens: ``R``, static.
      sampling: :class:`SamplingConfig` (traceable temperature/top_p/min_p).
      stop_tokens: token ids that end a response (e.g. EOS), static; ``()`` never stops early.
      n: samples per prompt, static. The prefill runs once on ``B`` prompts; its KV cache is
        repeated ``n`` times.
      prompt_index: [B] int32 global indices of the prompts (default ``arange(B)``): the keys
        depend on them, not on the row, so a prompt gets the same response in any batch.
      pad_token_id: written after the first stop token.

    Returns:
      A :class:`Rollout` with ``N = B * n`` rows, samples of one prompt contiguous.
    """
    stop_tokens = tuple(int(t) for t in stop_tokens)
    if isinstance(key, numbers.Integral):  # a traced seed: one compile for every seed
        key = jnp.asarray(key, jnp.int32 if -(2**31) <= key < 2**31 else jnp.uint32)
    return _sample(
        graphdef,
        params,
        prompt_tokens,
        prompt_mask,
        key,
        prompt_index,
        sampling,
        max_new_tokens=int(max_new_tokens),
        stop_tokens=stop_tokens,
        n=int(n),
        pad_token_id=int(pad_token_id),
    )


@functools.partial(
    jax.jit,
    static_argnums=(0,),
    static_argnames=("max_new_tokens", "stop_tokens", "n", "pad_token_id"),
)
def _sample(
    graphdef,
    params,
    prompt_tokens: Array,
    prompt_mask: Array,
    key,
    prompt_index: Array | None,
    sampling: SamplingConfig,
    *,
    max_new_tokens: int,
    stop_tokens: tuple[int, ...],
    n: int,
    pad_token_id: int,
) -> Rollout:
    chex.assert_rank([prompt_tokens, prompt_mask], 2)
    chex.assert_equal_shape([prompt_tokens, prompt_mask])
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    b, p = prompt_tokens.shape
    r, nrows = max_new_tokens, b * n
    key = as_key(key)
    if prompt_index is None:
        prompt_index = jnp.arange(b, dtype=jnp.int32)
    prompt_index = jnp.asarray(prompt_index, jnp.int32)
    chex.assert_shape(prompt_index, (b,))
    stops = jnp.asarray(tuple(stop_tokens), jnp.int32).reshape(-1)

    config = _model_config(graphdef, params)
    if config.arch == "gpt2" and p + r > config.max_position_embeddings:
        raise ValueError(
            f"prompt length {p} + max_new_tokens {r} exceeds the {config.max_position_embeddings} "
            "learned positions of this GPT-2 model"
        )
    prompt_mask = prompt_mask.astype(jnp.int32)
    prompt_tokens = prompt_tokens.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, -1) - 1, 0)

    # The model's weights unstacked once, outside the loop, and a per-layer [B, Hkv, S, Dh] cache
    # (models.apply.decode_step; see docs/rollout.md, "Speed") of P prompt slots and R - 1
    # response slots (the last sampled token is never fed back). Prefill on the B prompts.
    s = p + r - 1
    weights = _apply.step_weights(graphdef, params)
    cache = jax.tree.map(_constrain_batch, _apply.init_step_cache(config, b, s))
    kv_mask = jnp.concatenate([prompt_mask, _constrain_batch(jnp.ones((b, r - 1), jnp.int32))], 1)
    logits, cache = _apply.decode_step(
        config, weights, prompt_tokens, positions, kv_mask, cache, 0, last_only=True
    )  # [B, V]

    # n samples per prompt: repeat rows, samples of one prompt contiguous.
    def rep(x, axis=0):
        return _constrain_batch(jnp.repeat(x, n, axis=axis), axis)

    if n > 1:
        cache = jax.tree.map(rep, cache)
        logits, kv_mask = rep(logits), rep(kv_mask)
    next_pos = jnp.sum(rep(prompt_mask), -1).astype(jnp.int32)  # [N] position of response token 0
    # All uniforms up front, u[row, t] from fold_in(row key, t): one vectorised threefry instead
    # of a small one per step (that costs more than the sampling itself on CPU).
    uniforms = step_uniforms(sample_keys(key, prompt_index, n), r)  # [N, R]
    uniforms = _constrain_batch(uniforms)

    def draw(logits, t):
        u = lax.dynamic_slice_in_dim(uniforms, t, 1, axis=1)[:, 0]  # [N]
        return sample_next(logits, u, sampling)

    def record(bufs, done, t, tok, lp, llp):
        tokens, mask, lps, llps = bufs
        live = ~done
        stopped = (
            jnp.any(tok[:, None] == stops[None, :], -1) if stops.size else jnp.zeros_like(done)
        )

        def put(buf, col):
            # int32 start indices, also under jax_enable_x64 (a Python 0 would become int64)
            start = (jnp.zeros((), jnp.int32), jnp.asarray(t, jnp.int32))
            return lax.dynamic_update_slice(buf, col[:, None].astype(buf.dtype), start)

        bufs = (
            put(tokens, jnp.where(live, tok, pad_token_id)),
            put(mask, live),
            put(lps, jnp.where(live, lp, 0.0)),
            put(llps, jnp.where(live, llp, 0.0)),
        )
        return bufs, done | (live & stopped)

    bufs = (
        jnp.full((nrows, r), pad_token_id, jnp.int32),
        jnp.zeros((nrows, r), jnp.int32),
        jnp.zeros((nrows, r), jnp.float32),
        jnp.zeros((nrows, r), jnp.float32),
    )
    bufs = jax.tree.map(_constrain_batch, bufs)
    tok, lp, llp = draw(logits, 0)
    bufs, done = record(bufs, jnp.zeros((nrows,), bool), 0, tok, lp, llp)

    def cond(carry):
        t, _, _, _, done = carry
        return (t < r) & ~jnp.all(done)

    def body(carry):
        t, tok, cache, bufs, done = carry
        logits, cache = _apply.decode_step(
            config,
            weights,
            tok[:, None],
            (next_pos + t - 1)[:, None],
            kv_mask,
            cache,
            p + t - 1,
            last_only=True,
        )
        tok, lp, llp = draw(logits, t)
        bufs, done = record(bufs, done, t, tok, lp, llp)
        return t + 1, tok, cache, bufs, done

    _, _, _, bufs, done = lax.while_loop(cond, body, (jnp.int32(1), tok, cache, bufs, done))
    tokens, mask, lps, llps = bufs
    return Rollout(
        tokens=tokens,
        mask=mask,
        logprobs=lps,
        learner_logprobs=llps,
        truncated=~done,
        lengths=jnp.sum(mask, -1),
        prompt_index=jnp.repeat(prompt_index, n),
    )


def full_sequences(
    prompt_tokens: Array, prompt_mask: Array, rollout: Rollout
) -> tuple[Array, Array]:
    """Prompt + response as the learner sees them: tokens, mask [N, P + R].

    ``token_logprobs(graphdef, params, tokens, mask, start=P, temperature=T)`` then gives [N, R],
    aligned with ``rollout.learner_logprobs`` (equal where ``rollout.mask == 1``).

    Args:
      prompt_tokens: [B, P], the prompts given to :func:`sample`.
      prompt_mask: [B, P].
      rollout: its result, ``N = B * n`` rows.
    """
    chex.assert_rank([prompt_tokens, prompt_mask], 2)
    n = rollout.tokens.shape[0] // prompt_tokens.shape[0]
    chex.assert_equal(rollout.tokens.shape[0], n * prompt_tokens.shape[0])
    tokens = jnp.concatenate([jnp.repeat(prompt_tokens, n, 0), rollout.tokens], 1)
    mask = jnp.concatenate([jnp.repeat(prompt_mask.astype(jnp.int32), n, 0), rollout.mask], 1)
    return tokens, mask

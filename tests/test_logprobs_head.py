"""``token_logprobs`` / ``logprobs_and_values`` against the full-head formulation.

The library runs the LM head on the scored positions only and takes ``z[token] - logsumexp(z)``
(``z = logits / temperature``). The reference here is the previous formulation written out: the
LM head on every position (``models.logits``), a full log-softmax over the vocabulary, then the
positions ``start-1 .. T-2`` sliced and the taken token gathered. Tolerance: 1e-5 absolute
(float32; both sides run the same trunk, the difference is the order of the reductions).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models

V = 37
TOKENS = np.array([[0, 0, 0, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8], [0, 3, 9, 4, 2, 0, 0, 0]])
MASK = np.array([[0, 0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0, 0, 0]])


def _config(arch: str, tied: bool) -> models.ModelConfig:
    kw = dict(num_kv_heads=1, head_dim=8) if arch == "qwen3" else {}
    return models.ModelConfig(
        arch=arch,
        vocab_size=V,
        hidden_size=16,
        num_layers=2,
        num_heads=4,
        intermediate_size=24,
        max_position_embeddings=32,
        tie_word_embeddings=tied,
        **kw,
    )


@pytest.fixture(
    scope="module", params=[("gpt2", True), ("gpt2", False), ("qwen3", True), ("qwen3", False)]
)
def model(request):
    arch, tied = request.param
    m = models.init_model(_config(arch, tied), jax.random.key(3), value_head=True)
    assert m.config.tie_word_embeddings is tied
    return m


def reference_logprobs(model, tokens, mask, start, temperature):
    """The full-head formulation: ``[B, T, V]`` logits, log-softmax, slice, gather."""
    logits = models.logits(model.graphdef, model.params, tokens, mask)  # [B, T, V]
    logp = jax.nn.log_softmax(logits / temperature, axis=-1)[:, start - 1 : -1]  # [B, T-start, V]
    return jnp.take_along_axis(logp, jnp.asarray(tokens)[:, start:, None], axis=-1)[..., 0]


@pytest.mark.parametrize("start", [1, 7])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_match_full_head(model, start, temperature):
    ref = np.asarray(reference_logprobs(model, TOKENS, MASK, start, temperature))
    got = np.asarray(
        models.token_logprobs(
            model.graphdef, model.params, TOKENS, MASK, start=start, temperature=temperature
        )
    )
    assert got.shape == (3, 8 - start) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    # Not vacuous: the temperature changes the numbers.
    other = reference_logprobs(model, TOKENS, MASK, start, temperature * 2)
    assert np.max(np.abs(np.asarray(other) - got)) > 1e-3


def test_logprobs_and_values_match_full_head(model):
    start, temperature = 3, 0.7
    logp, vals = models.logprobs_and_values(
        model.graphdef, model.params, TOKENS, MASK, start=start, temperature=temperature
    )
    ref = reference_logprobs(model, TOKENS, MASK, start, temperature)
    np.testing.assert_allclose(np.asarray(logp), np.asarray(ref), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(
        np.asarray(vals),
        np.asarray(models.values(model.graphdef, model.params, TOKENS, MASK, start=start)),
    )


def test_gradients_match_full_head(model):
    """The update differentiates through the log-probs: the gradient must match too."""
    start, temperature = 3, 0.7
    w = jax.random.normal(jax.random.key(0), (3, 8 - start))

    def new(params):
        lp = models.token_logprobs(
            model.graphdef, params, TOKENS, MASK, start=start, temperature=temperature
        )
        return jnp.sum(w * lp)

    def old(params):
        m = models.Model(model.graphdef, params, model.config)
        return jnp.sum(w * reference_logprobs(m, TOKENS, MASK, start, temperature))

    g_new, g_old = jax.grad(new)(model.params), jax.grad(old)(model.params)
    for a, b in zip(jax.tree.leaves(g_new), jax.tree.leaves(g_old), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)

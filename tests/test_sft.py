"""SFT: the token NLL against numpy, one SGD step by hand, exact accumulation, learning."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import models
from rlhf_jax.algorithms import sft
from rlhf_jax.optim import OptimConfig
from rlhf_jax.train import LoopConfig, run_loop

V = 13


@pytest.fixture(scope="module")
def tiny():
    cfg = models.ModelConfig(
        arch="gpt2",
        vocab_size=V,
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
        head_dim=8,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    return models.init_model(cfg, jax.random.PRNGKey(0))


def _batch(seed=0):
    """Two left-padded prompts [2, 3] and right-padded completions [2, 4]."""
    rng = np.random.default_rng(seed)
    pt = rng.integers(1, V, size=(2, 3))
    pm = np.array([[0, 1, 1], [1, 1, 1]])
    ct = rng.integers(1, V, size=(2, 4))
    cm = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])
    return sft.completion_batch(pt * pm, pm, ct * cm, cm)


def test_completion_batch_masks():
    b = _batch()
    np.testing.assert_array_equal(
        b["attention_mask"], [[0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0, 0]]
    )
    np.testing.assert_array_equal(b["loss_mask"], [[0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 0, 0]])
    assert b["tokens"].dtype == np.int32 and b["tokens"].shape == (2, 7)
    full = sft.completion_batch(
        np.ones((1, 2)), np.ones((1, 2)), np.ones((1, 1)), np.ones((1, 1)), completion_only=False
    )
    np.testing.assert_array_equal(full["loss_mask"], [[1, 1, 1]])


def test_loss_equals_numpy_cross_entropy(tiny):
    batch = jax.tree.map(jnp.asarray, _batch())
    nll, (count, sums) = jax.jit(lambda p, b: sft.sft_loss(tiny.graphdef, p, b))(tiny.params, batch)
    logits = jax.jit(lambda p, t, m: models.logits(tiny.graphdef, p, t, m))(
        tiny.params, batch["tokens"], batch["attention_mask"]
    )
    logits = np.asarray(logits, np.float64)
    tokens, w = np.asarray(batch["tokens"]), np.asarray(batch["loss_mask"])
    ref, correct, n = 0.0, 0, 0
    for b in range(2):
        for t in range(1, tokens.shape[1]):
            if w[b, t]:
                z = logits[b, t - 1]
                logp = z - z.max() - np.log(np.exp(z - z.max()).sum())
                ref -= logp[tokens[b, t]]
                correct += int(np.argmax(z) == tokens[b, t])
                n += 1
    assert n == 5 and float(count) == 5.0
    np.testing.assert_allclose(float(nll), ref, rtol=1e-5)
    assert float(sums["correct"]) == correct


def test_one_sgd_step_is_params_minus_lr_grad(tiny):
    lr = 0.5
    cfg = sft.SFTConfig(
        optim=OptimConfig(name="sgd", learning_rate=lr, max_grad_norm=None), batch_size=2
    )
    batch = jax.tree.map(jnp.asarray, _batch())

    def reference_loss(params):  # independent formulation: optax CE, masked token mean
        logits = models.logits(tiny.graphdef, params, batch["tokens"], batch["attention_mask"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch["tokens"][:, 1:])
        w = batch["loss_mask"][:, 1:]
        return jnp.sum(ce * w) / jnp.sum(w)

    ref_loss, grads = jax.jit(jax.value_and_grad(reference_loss))(tiny.params)
    expected = jax.tree.map(lambda p, g: p - lr * g, tiny.params, grads)
    step = sft.make_step(tiny.graphdef, cfg)
    state, metrics = step(sft.init_state(tiny.params, cfg), batch, jax.random.PRNGKey(0))
    np.testing.assert_allclose(float(metrics["loss"]), float(ref_loss), rtol=1e-5)
    np.testing.assert_allclose(
        float(metrics["grad_norm"]), float(optax.tree.norm(grads)), rtol=1e-4
    )
    assert float(metrics["lr"]) == pytest.approx(lr) and float(metrics["tokens"]) == 5
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)

    # two microbatches with uneven target counts (3 and 2) give the same update
    cfg2 = sft.SFTConfig(
        optim=OptimConfig(name="sgd", learning_rate=lr, max_grad_norm=None, grad_accum_steps=2),
        batch_size=2,
    )
    state2, metrics2 = sft.make_step(tiny.graphdef, cfg2)(
        sft.init_state(tiny.params, cfg2), batch, jax.random.PRNGKey(0)
    )
    np.testing.assert_allclose(float(metrics2["loss"]), float(ref_loss), rtol=1e-5)
    for got, want in zip(jax.tree.leaves(state2.params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_loss_decreases_on_a_tiny_corpus(tiny):
    rng = np.random.default_rng(1)
    # a deterministic corpus: every sequence counts up modulo V from a random start
    starts = rng.integers(1, V, size=(8, 1))
    tokens = (starts + np.arange(8)[None]) % (V - 1) + 1
    batch = sft.corpus_batch(tokens, np.ones_like(tokens))
    cfg = sft.SFTConfig(
        optim=OptimConfig(learning_rate=3e-2),
        loop=LoopConfig(max_steps=30, eval_every=30),
        batch_size=8,
        completion_only=False,
    )
    evaluate = sft.make_eval(tiny.graphdef, completion_only=False)
    res = run_loop(
        sft.make_step(tiny.graphdef, cfg),
        sft.init_state(tiny.params, cfg),
        lambda s: batch,
        loop=cfg.loop,
        eval_fn=lambda state: evaluate(state.params, batch),
    )
    trained = tiny.replace(params=res.state.params)
    first, last = res.history[0]["loss"], res.evals[-1]["loss"]
    assert last < 0.5 * first, (first, last)
    assert res.evals[-1]["token_accuracy"] > 0.5
    # the input record is untouched; the returned one carries the new parameters
    assert trained.graphdef is tiny.graphdef
    a, b = jax.tree.leaves(tiny.params)[0], jax.tree.leaves(trained.params)[0]
    assert not np.allclose(a, b)

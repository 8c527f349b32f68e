"""Reward model: trunk from SFT, losses against numpy, one SGD step, normalisation, learning."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax import models
from rlhf_jax.algorithms import reward_model as rm
from rlhf_jax.data import toy
from rlhf_jax.optim import OptimConfig
from rlhf_jax.train import LoopConfig, run_loop


def _cfg(vocab):
    return models.ModelConfig(
        arch="gpt2",
        vocab_size=vocab,
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
        head_dim=8,
        intermediate_size=32,
        max_position_embeddings=toy.PROMPT_LENGTH + toy.RESPONSE_LENGTH,
    )


@pytest.fixture(scope="module")
def tok():
    return toy.toy_tokenizer()


@pytest.fixture(scope="module")
def sft_model(tok):
    return models.init_model(_cfg(len(tok)), jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def reward(sft_model):
    return rm.init_reward_model(sft_model, jax.random.PRNGKey(1))


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def test_pair_accuracy_hand_checked():
    scores = jnp.array([[3.0, 1.0, 2.0], [0.0, 1.0, 2.0]])  # ranked best -> worst
    correct, pairs = rm.pair_accuracy(scores)
    assert float(correct) == 2.0 and float(pairs) == 6.0  # (0>1), (0>2) of group 0 only


def test_trunk_is_copied_from_sft(sft_model, reward):
    sft_flat = dict(nnx.to_flat_state(sft_model.params))
    rm_flat = dict(nnx.to_flat_state(reward.params))
    shared = [p for p in rm_flat if p in sft_flat]
    assert len(shared) >= len(sft_flat) - 2  # all but the LM head (tied or not)
    for p in shared:
        np.testing.assert_array_equal(rm_flat[p].get_value(), sft_flat[p].get_value())
    assert len(rm_flat) > len(shared)  # the score head is new


def test_ranking_and_pairwise_losses_against_numpy(tok, reward):
    records = toy.ranking_records(3, 3, seed=0, temperature=0.0)
    batch = jax.tree.map(jnp.asarray, toy.ranking_batch(tok, records))
    group_scores = jax.jit(lambda p, b: rm.group_scores(reward.graphdef, p, b, read="last_nonpad"))
    scores = np.asarray(group_scores(reward.params, batch))
    assert scores.shape == (3, 3)
    # InstructGPT Eq. 1: mean over the C(3,2) pairs of a group, then over groups
    per_group = [
        np.mean([-_log_sigmoid(s[i] - s[j]) for i in range(3) for j in range(i + 1, 3)])
        for s in scores.astype(np.float64)
    ]
    cfg = rm.RewardModelConfig(loss="ranking")
    total, (count, sums) = jax.jit(lambda p, b: rm.rm_loss(reward.graphdef, p, b, cfg))(
        reward.params, batch
    )
    np.testing.assert_allclose(float(total / count), np.mean(per_group), rtol=1e-5)
    wins = sum(s[i] > s[j] for s in scores for i in range(3) for j in range(i + 1, 3))
    assert float(sums["correct"]) == wins and float(sums["pairs"]) == 9

    # pairwise with a margin and centering (TRL RewardTrainer)
    pairs = toy.pairwise_batch(tok, toy.preference_records(4, seed=1, temperature=0.0))
    pairs["margin"] = np.array([0.0, 0.5, 1.0, -0.5], np.float32)
    pairs = jax.tree.map(jnp.asarray, pairs)
    s = np.asarray(group_scores(reward.params, rm.as_ranking(pairs)), np.float64)
    c = 0.01
    ref = np.mean(-_log_sigmoid(s[:, 0] - s[:, 1] - np.asarray(pairs["margin"]))) + c * np.mean(
        (s[:, 0] + s[:, 1]) ** 2
    )
    cfg = rm.RewardModelConfig(loss="pairwise", center_coef=c)
    total, (count, _) = jax.jit(lambda p, b: rm.rm_loss(reward.graphdef, p, b, cfg))(
        reward.params, pairs
    )
    np.testing.assert_allclose(float(total / count), ref, rtol=1e-5)
    with pytest.raises(ValueError, match="K = 3"):
        rm.rm_loss(reward.graphdef, reward.params, batch, cfg)


def test_one_sgd_step_is_params_minus_lr_grad(tok, reward):
    lr = 0.3
    cfg = rm.RewardModelConfig(
        loss="ranking",
        optim=OptimConfig(name="sgd", learning_rate=lr, max_grad_norm=None),
        batch_size=4,
    )
    batch = jax.tree.map(
        jnp.asarray, toy.ranking_batch(tok, toy.ranking_records(4, 3, seed=2, temperature=0.0))
    )

    def reference_loss(params):  # independent: explicit pair loop
        s = rm.group_scores(reward.graphdef, params, batch, read="last_nonpad")
        terms = [jax.nn.softplus(-(s[:, i] - s[:, j])) for i in range(3) for j in range(i + 1, 3)]
        return jnp.mean(jnp.stack(terms, 1))

    ref_loss, grads = jax.jit(jax.value_and_grad(reference_loss))(reward.params)
    expected = jax.tree.map(lambda p, g: p - lr * g, reward.params, grads)
    step = rm.make_step(reward.graphdef, cfg)
    state, metrics = step(rm.init_state(reward.params, cfg), batch, jax.random.PRNGKey(0))
    np.testing.assert_allclose(float(metrics["loss"]), float(ref_loss), rtol=1e-5)
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_normalize_params_gives_mean_zero_std_one(tok, reward):
    prompts = toy.all_prompts()[:16]
    responses = [toy.sample_response(np.random.default_rng(i), p) for i, p in enumerate(prompts)]
    pt, pm = toy.encode_prompts(tok, prompts)
    rt, rmask = toy.encode_responses(tok, responses)
    tokens = jnp.asarray(np.concatenate([pt, rt], 1))
    mask = jnp.asarray(np.concatenate([pm, rmask], 1))
    scores = jax.jit(lambda p: models.scores(reward.graphdef, p, tokens, mask))
    raw = scores(reward.params)
    params = rm.normalize_params(reward.params, raw, target_mean=0.0, target_std=1.0)
    new = np.asarray(scores(params), np.float64)
    np.testing.assert_allclose([new.mean(), new.std()], [0.0, 1.0], atol=1e-4)
    # an affine map of the old scores: the order is kept
    np.testing.assert_array_equal(np.argsort(new), np.argsort(np.asarray(raw)))


def test_heldout_accuracy_rises_on_labelled_toy_data(tok, sft_model):
    train = toy.ranking_batch(tok, toy.ranking_records(256, 4, seed=3, temperature=0.0))
    held_out = toy.ranking_batch(tok, toy.ranking_records(64, 4, seed=4, temperature=0.0))
    n = 256 // 32

    def batches(s):
        i = (s % n) * 32
        return {k: v[i : i + 32] for k, v in train.items()}

    cfg = rm.RewardModelConfig(
        loss="ranking",
        optim=OptimConfig(learning_rate=3e-3),
        loop=LoopConfig(max_steps=40, eval_every=20),
        batch_size=32,
    )
    untrained = rm.init_reward_model(sft_model, jax.random.split(jax.random.PRNGKey(5))[0])
    evaluate = rm.make_eval(untrained.graphdef, cfg)
    held_out = jax.tree.map(jnp.asarray, held_out)
    before = evaluate(untrained.params, held_out)
    res = run_loop(
        rm.make_step(untrained.graphdef, cfg),
        rm.init_state(untrained.params, cfg),
        batches,
        loop=cfg.loop,
        eval_fn=lambda state: evaluate(state.params, held_out),
    )
    first, last = float(before["accuracy"]), float(evaluate(res.state.params, held_out)["accuracy"])
    assert last >= 0.65 and last >= first + 0.15, (first, last)
    assert res.history[-1]["loss"] < res.history[0]["loss"]

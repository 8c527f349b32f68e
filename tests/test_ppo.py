"""PPO iteration: a hand-checked update, learning on a rule-based reward, vmap over runs, critics,
adaptive KL, non-finite skipping, and the frozen models left untouched."""

import dataclasses
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models, presets
from rlhf_jax.algorithms import ppo
from rlhf_jax.optim import OptimConfig
from rlhf_jax.reward_fn import RewardFunction
from rlhf_jax.train import LoopConfig, run_loop

WORDS = ["<pad>", "<eos>", "a", "dog", "cat", "is", "furry", "."]
B, P, R = 4, 3, 5

MODEL = models.ModelConfig(
    arch="gpt2",
    vocab_size=len(WORDS),
    hidden_size=16,
    num_layers=1,
    num_heads=2,
    max_position_embeddings=16,
)


def tree_close(a, b, tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def sft():
    return models.init_model(MODEL, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def reward_model():
    return models.init_model(MODEL, jax.random.PRNGKey(1), lm_head=False, score_head=True)


@pytest.fixture(scope="module")
def prompts():
    tokens = jnp.array([[0, 2, 3], [2, 4, 5], [0, 0, 3], [6, 3, 5]], jnp.int32)
    mask = (jnp.arange(P)[None, :] >= jnp.array([1, 0, 2, 0])[:, None]).astype(jnp.int32)
    return tokens, mask


def copy(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


# ------------------------------------------------------------------------------------------
# 1. A hand-checked update: E = M = 1, SGD, so new params = params - lr * grad(documented loss)
# ------------------------------------------------------------------------------------------

SGD_CFG = ppo.PPOConfig(
    response_length=R,
    stop_tokens=(1, 7),  # "<eos>" and "."
    num_epochs=1,
    num_minibatches=1,
    critic="separate",
    old_logprobs="recompute",  # a learner forward: the first ratio is 1 by construction
    optim=OptimConfig(name="sgd", learning_rate=0.1, max_grad_norm=None),
    kl_coef=0.1,
    temperature=0.9,
    vf_coef=0.3,
)


def test_first_update_is_the_gradient_of_the_documented_loss(sft, reward_model, prompts):
    cfg = SGD_CFG
    static, params, frozen = ppo.make_models(cfg, sft, reward_model)
    state = ppo.init_state(cfg, params)
    before = copy(state.params)
    tokens, mask = prompts

    @jax.jit
    def check(state, frozen, tokens, mask):
        sampled = ppo.generate(cfg, static, state, tokens, mask)
        exp = ppo.score(cfg, static, state, frozen, tokens, mask, sampled)
        # The loss written out (docs/formulas.md §3-4; the default preset: token means over the
        # response mask, value loss halved): at the first step ratio = 1 and values = old values,
        # so neither clip is active and the clipped losses have the unclipped ones' gradients.
        m = exp.response_mask.astype(jnp.float32)

        def documented_loss(p):
            lp = models.token_logprobs(
                static.policy, p["policy"], exp.tokens, exp.mask, start=P, temperature=0.9
            )
            v = models.values(static.critic, p["critic"], exp.tokens, exp.mask, start=P)
            ratio = jnp.exp(lp - exp.old_logprobs)
            pg = -jnp.sum(exp.advantages * ratio * m) / jnp.sum(m)
            vf = 0.5 * jnp.sum(jnp.square(v - exp.returns) * m) / jnp.sum(m)
            return pg + 0.3 * vf, (lp, v)

        (loss, (lp, v)), grads = jax.value_and_grad(documented_loss, has_aux=True)(state.params)
        expected = jax.tree.map(lambda p, g: p - 0.1 * g, state.params, grads)
        new_state, metrics = ppo.update(cfg, static, state, exp)
        return sampled, exp, lp, v, loss, expected, new_state, metrics

    sampled, exp, lp, v, loss, expected, new_state, metrics = check(state, frozen, tokens, mask)
    rmask = np.asarray(exp.response_mask)
    assert exp.tokens.shape == (B, P + R) and 0 < rmask.sum() < B * R  # some responses stop early
    # recomputed old log-probs equal the sampler's (to float rounding) and the first ratio is 1
    np.testing.assert_allclose(np.asarray(lp), np.asarray(exp.old_logprobs), rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(exp.old_logprobs) * rmask, np.asarray(sampled.learner_logprobs), atol=1e-5
    )
    np.testing.assert_allclose(np.asarray(v), np.asarray(exp.old_values), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["policy/ratio"]), 1.0, atol=1e-6)
    tree_close(new_state.params, expected, 1e-5)
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)
    assert float(metrics["policy/clip_frac"]) == 0.0
    assert float(metrics["skipped"]) == 0.0
    # the update changed both the policy and the critic; the input state was not modified
    for part in ("policy", "critic"):
        assert not np.allclose(
            jax.tree.leaves(new_state.params[part])[0], jax.tree.leaves(before[part])[0]
        )
    tree_close(state.params, before, 0.0)


# ------------------------------------------------------------------------------------------
# 2. The iteration learns: the mean of a rule-based reward (dogs per response) must rise
# ------------------------------------------------------------------------------------------


def make_tokenizer():
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def test_reward_function_run_learns(sft, prompts, tmp_path):
    (tmp_path / "dog_reward.py").write_text(
        textwrap.dedent(
            """
            def dogs(prompts, responses):
                return [float(r.split().count("dog")) for r in responses]
            """
        )
    )
    cfg = ppo.PPOConfig(
        response_length=R,
        num_samples=2,
        num_epochs=2,
        num_minibatches=2,
        critic="shared",
        reward_fn=f"{tmp_path / 'dog_reward.py'}:dogs",
        optim=OptimConfig(learning_rate=3e-2),
        loop=LoopConfig(max_steps=12),
        kl_coef=0.01,
        temperature=1.0,
    )
    tokens, mask = prompts
    batch = {"prompt_tokens": tokens, "prompt_mask": mask}
    reward = RewardFunction.load(cfg.reward_fn, make_tokenizer())
    static, params, frozen = ppo.make_models(cfg, sft, reward_fn=reward)
    result = run_loop(
        ppo.make_step(cfg, static, frozen),
        ppo.init_state(cfg, params),
        lambda s: batch,
        loop=cfg.loop,
    )
    policy = sft.replace(graphdef=static.policy, params=result.state.params["policy"])
    scores = [h["score/mean"] for h in result.history]
    assert len(scores) == 12 and result.skipped == 0
    assert np.mean(scores[-3:]) > np.mean(scores[:3]) + 1.0, scores
    assert all(np.isfinite(h["loss"]) for h in result.history)
    # the returned policy record carries the value head (shared critic) and runs
    lp = models.token_logprobs(policy.graphdef, policy.params, tokens, mask, start=1)
    assert np.all(np.isfinite(np.asarray(lp)))


# ------------------------------------------------------------------------------------------
# 3. vmap over runs (seeds and learning rates) equals separate runs
# ------------------------------------------------------------------------------------------

ADAM_CFG = ppo.PPOConfig(
    response_length=R,
    stop_tokens=(1, 7),
    num_samples=2,
    num_epochs=2,
    num_minibatches=2,
    critic="separate",
    kl_controller="adaptive",
    kl_target=1.0,
    kl_horizon=20.0,
    # Adam eps 1e-3: attention is invariant to the key bias, so its true gradient is 0 and the
    # computed one is rounding noise (~1e-8), which a tiny eps would scale up to ~lr and make the
    # vmapped and the separate programs differ by their rounding; with eps 1e-3 it stays ~1e-7.
    optim=OptimConfig(learning_rate=1e-2, eps=1e-3),
    temperature=1.0,
)


@pytest.fixture(scope="module")
def adam_setup(sft, reward_model):
    static, params, frozen = ppo.make_models(ADAM_CFG, sft, reward_model)
    return static, params, frozen, ppo.make_iteration(ADAM_CFG, static)


def test_vmap_over_seeds_equals_separate_runs(adam_setup, prompts):
    static, params, frozen, iterate = adam_setup
    tokens, mask = prompts
    hps = [
        ppo.PPOHParams.from_config(ADAM_CFG, seed=0),
        ppo.PPOHParams.from_config(ADAM_CFG, seed=1, learning_rate=3e-3),
    ]
    separate = []
    for hp in hps:
        state = ppo.init_state(ADAM_CFG, params, hp)
        history = []
        for _ in range(2):
            state, metrics = iterate(state, frozen, tokens, mask)
            history.append(metrics)
        separate.append((state, history))

    vmapped = jax.jit(
        jax.vmap(ppo.iteration_fn(ADAM_CFG, static), in_axes=(0, None, None, None)),
        donate_argnums=0,
    )
    states = ppo.stack_states([ppo.init_state(ADAM_CFG, params, hp) for hp in hps])
    for it in range(2):
        states, metrics = vmapped(states, frozen, tokens, mask)
        for run in range(2):
            for k, v in separate[run][1][it].items():
                np.testing.assert_allclose(
                    np.asarray(metrics[k][run]), np.asarray(v), rtol=1e-5, atol=1e-5, err_msg=k
                )
    for run in range(2):
        tree_close(
            jax.tree.map(lambda x, r=run: x[r], states.params), separate[run][0].params, 1e-5
        )
    # the two runs really differ: different rollouts (seeds) at the first iteration, and
    # different parameters after it (learning rates)
    assert not np.allclose(separate[0][1][0]["score/mean"], separate[1][1][0]["score/mean"])
    diff = jax.tree.map(
        lambda a, b: float(jnp.max(jnp.abs(a - b))),
        separate[0][0].params["policy"],
        separate[1][0].params["policy"],
    )
    assert max(jax.tree.leaves(diff)) > 1e-4


# ------------------------------------------------------------------------------------------
# 4. Adaptive KL moves beta the right way; non-finite scores skip the update; frozen untouched
# ------------------------------------------------------------------------------------------


def test_adaptive_kl_moves_beta(adam_setup, sft, prompts):
    static, params, frozen, iterate = adam_setup
    tokens, mask = prompts
    n_rows = B * ADAM_CFG.num_samples
    beta0 = ADAM_CFG.kl_coef

    # policy == reference: KL per response ~ 0 < target, error clipped at -0.2: beta shrinks
    state = ppo.init_state(ADAM_CFG, params)
    state, metrics = iterate(state, frozen, tokens, mask)
    assert abs(float(metrics["kl/response"])) < 1e-4
    np.testing.assert_allclose(float(state.kl_coef), beta0 * (1 - 0.2 * n_rows / 20.0), 1e-6)

    # a different reference: KL per response far above the target 1.0: beta grows by +0.2
    far = models.init_model(MODEL, jax.random.PRNGKey(7))
    far_frozen = dataclasses.replace(frozen, reference=jax.tree.map(lambda x: 5.0 * x, far.params))
    state = ppo.init_state(ADAM_CFG, params)
    state, metrics = iterate(state, far_frozen, tokens, mask)
    assert float(metrics["kl/response"]) > 5 * ADAM_CFG.kl_target
    np.testing.assert_allclose(float(state.kl_coef), beta0 * (1 + 0.2 * n_rows / 20.0), 1e-6)
    del sft


def test_nonfinite_scores_skip_the_update_and_frozen_params_survive(adam_setup, prompts):
    static, params, frozen, iterate = adam_setup
    tokens, mask = prompts
    ref_before, rm_before = copy(frozen.reference), copy(frozen.reward)
    state = ppo.init_state(ADAM_CFG, params)
    start = copy(state.params)
    bad = dataclasses.replace(frozen, reward=jax.tree.map(lambda x: x * jnp.nan, frozen.reward))
    state, metrics = iterate(state, bad, tokens, mask)
    assert float(metrics["skipped"]) == 1.0
    assert int(state.step) == 1
    np.testing.assert_allclose(float(state.kl_coef), ADAM_CFG.kl_coef)
    tree_close(state.params, start, 0.0)
    # a good batch afterwards updates again; the frozen params were never donated or modified
    state, metrics = iterate(state, frozen, tokens, mask)
    assert float(metrics["skipped"]) == 0.0 and np.isfinite(float(metrics["loss"]))
    tree_close(frozen.reference, ref_before, 0.0)
    tree_close(frozen.reward, rm_before, 0.0)


# ------------------------------------------------------------------------------------------
# 5. Config validation
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"critic": "both"}, "critic='both'"),
        ({"num_epochs": 0}, "num_epochs=0"),
        ({"kl_controller": "pid"}, "kl_controller='pid'"),
        ({"preset": "nope"}, "preset='nope'"),
        ({"temperature": 0.0}, "temperature=0.0"),
        ({"reward_fn": "m:f"}, "critic='shared'"),
        ({"preset": "trl-ppo", "conventions_override": presets.DEFAULT}, "both set"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ppo.PPOConfig(**kwargs)


def test_conventions_override():
    trl_k3 = presets.get_preset("trl-ppo").replace(kl_estimator="k3")
    cfg = ppo.PPOConfig(conventions_override=trl_k3)
    assert cfg.conventions == trl_k3
    assert ppo.PPOConfig(preset="safe-rlhf").conventions == presets.get_preset("safe-rlhf")


def test_minibatches_must_divide_the_batch(sft, reward_model, prompts):
    cfg = dataclasses.replace(SGD_CFG, num_minibatches=3)
    static, params, frozen = ppo.make_models(cfg, sft, reward_model)
    with pytest.raises(ValueError, match="must split into num_minibatches=3"):
        jax.eval_shape(ppo.iteration_fn(cfg, static), ppo.init_state(cfg, params), frozen, *prompts)


def test_a_missing_stop_penalty_needs_stop_tokens(sft, reward_model):
    cfg = ppo.PPOConfig(preset="lm-human-preferences")  # valid alone: the EOS may come later
    with pytest.raises(ValueError, match="stop_tokens is empty"):
        ppo.make_models(cfg, sft, reward_model)
    ppo.make_models(dataclasses.replace(cfg, stop_tokens=(1,)), sft, reward_model)


def test_reward_sources_score_as_their_weighted_sum(sft, reward_model, prompts):
    """``sources``: a reward model (weight 0.5) and a function (weight 2) instead of one reward
    model; the score is 0.5 * the reward model's + 2 * the function's, and the separate critic
    starts from the reward model among the sources."""
    from rlhf_jax import scoring

    def dogs(prompts, responses):
        return [float(r.split().count("dog")) for r in responses]

    fn = RewardFunction.load(dogs, make_tokenizer())
    sources = (
        scoring.RewardModelSource(reward_model.graphdef, weight=0.5),
        scoring.RewardFunctionSource(fn, weight=2.0),
    )
    cfg = SGD_CFG
    static, params, frozen = ppo.make_models(
        cfg, sft, sources=sources, source_params=(reward_model.params, None)
    )
    tree_close(params["critic"], reward_model.params, 0.0)
    state = ppo.init_state(cfg, params)
    tokens, mask = prompts
    sampled = jax.jit(lambda s: ppo.generate(cfg, static, s, tokens, mask))(state)
    exp = ppo.score(cfg, static, state, frozen, tokens, mask, sampled)
    rows = scoring.Responses.of(tokens, mask, sampled)
    rm = models.scores(reward_model.graphdef, reward_model.params, rows.tokens, rows.mask)
    texts = fn.texts(*map(np.asarray, (rows.prompt_tokens, rows.prompt_mask, sampled.tokens,
                                         sampled.mask)))[1]  # fmt: skip
    want = 0.5 * np.asarray(rm) + 2.0 * np.array([t.split().count("dog") for t in texts])
    np.testing.assert_allclose(np.asarray(exp.scores), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="exactly one of"):
        ppo.make_models(cfg, sft, reward_model, sources=sources, source_params=(None, None))
    with pytest.raises(ValueError, match="no reward source is one"):
        ppo.make_models(cfg, sft, sources=sources[1:], source_params=(None,))

"""Critic-free policy gradient: the baselines by hand, the first update against the documented
loss, KL in the reward, dynamic sampling, learning, vmap over runs, and the stage through the
pipeline (exact resume, 1 vs 8 devices)."""

import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models, scoring
from rlhf_jax.algorithms import grpo
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


# ------------------------------------------------------------------------------------------
# Baselines by hand
# ------------------------------------------------------------------------------------------


def test_rloo_with_two_samples_is_the_pairwise_advantage():
    r = jnp.array([1.0, 3.0, -2.0, 0.5])
    np.testing.assert_allclose(
        np.asarray(grpo.advantages(r, 2, "rloo")), [-2.0, 2.0, -2.5, 2.5], rtol=1e-6
    )


@pytest.mark.parametrize("baseline", grpo.BASELINES)
def test_equal_rewards_give_zero_advantage(baseline):
    r = jnp.array([0.7, 0.7, 0.7, 0.7, -1.0, -1.0, -1.0, -1.0])
    group = 4 if baseline != "reinforce++" else 4
    adv = np.asarray(grpo.advantages(r if baseline != "reinforce++" else r[:4], group, baseline))
    np.testing.assert_array_equal(adv, np.zeros_like(adv))
    np.testing.assert_array_equal(
        np.asarray(grpo.equal_groups(r, 4)), [True] * 8
    )  # dynamic sampling drops both groups


def test_baselines_by_hand():
    r = np.array([1.0, 2.0, 4.0, 0.0, 0.0, 2.0], np.float64)
    g = r.reshape(2, 3)
    centered = (g - g.mean(1, keepdims=True)).reshape(-1)
    std = np.repeat(g.std(1, ddof=1), 3)
    got = {
        b: np.asarray(grpo.advantages(jnp.asarray(r, jnp.float32), 3, b)) for b in grpo.BASELINES
    }
    np.testing.assert_allclose(got["grpo"], centered / (std + 1e-4), rtol=1e-5)
    np.testing.assert_allclose(got["dr_grpo"], centered, rtol=1e-5, atol=1e-6)
    loo = np.array([r[i] - np.mean(np.delete(g[i // 3], i % 3)) for i in range(6)])
    np.testing.assert_allclose(got["rloo"], loo, rtol=1e-5, atol=1e-6)
    batch = (r - r.mean()) / (r.std(ddof=1) + 1e-4)  # REINFORCE++: no group baseline
    np.testing.assert_allclose(got["reinforce++"], batch, rtol=1e-5)


def test_baseline_defaults_and_config_errors():
    assert grpo.GRPOConfig(baseline="dr_grpo").conventions.loss_aggregation == "dr_grpo"
    rloo = grpo.GRPOConfig(baseline="rloo").conventions
    assert (rloo.loss_aggregation, rloo.ratio_level) == ("seq_mean_token_mean", "sequence_sum")
    assert grpo.GRPOConfig().conventions.loss_aggregation == "token_mean"
    for kwargs, match in [
        ({"baseline": "ppo"}, "baseline='ppo'"),
        ({"kl": "k2"}, "kl='k2'"),
        ({"num_samples": 1}, "needs >= 2 samples"),
        ({"loss_aggregation": "sum"}, "loss_aggregation='sum'"),
    ]:
        with pytest.raises(ValueError, match=match):
            grpo.GRPOConfig(**kwargs)
    grpo.GRPOConfig(baseline="reinforce++", num_samples=1)  # no group needed


# ------------------------------------------------------------------------------------------
# One iteration by hand; learning; vmap
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def policy():
    return models.init_model(MODEL, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def reward_model():
    return models.init_model(MODEL, jax.random.PRNGKey(1), lm_head=False, score_head=True)


@pytest.fixture(scope="module")
def prompts():
    tokens = jnp.array([[0, 2, 3], [2, 4, 5], [0, 0, 3], [6, 3, 5]], jnp.int32)
    mask = (jnp.arange(P)[None, :] >= jnp.array([1, 0, 2, 0])[:, None]).astype(jnp.int32)
    return tokens, mask


def setup(cfg, policy, reward_model, reference=None):
    ref = policy if reference is None else reference
    static = grpo.GRPOModels(
        policy=policy.graphdef,
        reference=ref.graphdef if cfg.uses_reference else None,
        sources=(scoring.RewardModelSource(reward_model.graphdef),),
    )
    frozen = grpo.GRPOFrozen(
        reference=ref.params if cfg.uses_reference else None, rewards=(reward_model.params,)
    )
    return static, frozen


def test_first_update_is_the_gradient_of_the_documented_loss(policy, reward_model, prompts):
    kl = "loss"
    cfg = grpo.GRPOConfig(
        kl=kl,
        num_samples=2,
        response_length=R,
        stop_tokens=(1, 7),
        kl_coef=0.3,
        temperature=0.9,
        optim=OptimConfig(name="sgd", learning_rate=0.1, max_grad_norm=None),
    )
    far = models.init_model(MODEL, jax.random.PRNGKey(5))  # a reference unlike the policy
    far = far.replace(params=jax.tree.map(lambda x: 5.0 * x, far.params))
    static, frozen = setup(cfg, policy, reward_model, reference=far)
    state = grpo.init_state(cfg, policy.params)
    tokens, mask = prompts

    @jax.jit
    def check(state, frozen):
        sample_key, perm_key = scoring.iteration_keys(state.key, state.step)
        sampled = scoring.generate(
            cfg.sampling_spec(), static.policy, state.params, tokens, mask, sample_key, 0.9
        )
        rows = scoring.Responses.of(tokens, mask, sampled)
        exp = grpo.experience(cfg, static, state, frozen, rows, sampled)
        m = sampled.mask.astype(jnp.float32)
        ref = models.token_logprobs(far.graphdef, far.params, rows.tokens, rows.mask, start=P,
                                    temperature=0.9)  # fmt: skip
        score = models.scores(reward_model.graphdef, reward_model.params, rows.tokens, rows.mask)
        old = sampled.learner_logprobs
        kl_seq = jnp.sum((old - ref) * m, -1)
        r = score - 0.3 * kl_seq if kl == "reward" else score
        g = r.reshape(-1, 2)
        adv = (g - g.mean(1, keepdims=True)) / (jnp.std(g, 1, ddof=1, keepdims=True) + 1e-4)
        adv = adv.reshape(-1)

        def documented(p):  # token mean of -A rho (+ beta k3 in the loss)
            lp = models.token_logprobs(static.policy, p, rows.tokens, rows.mask, start=P,
                                       temperature=0.9)  # fmt: skip
            per = -adv[:, None] * jnp.exp(lp - old)
            if kl == "loss":
                d = ref - lp
                per = per + 0.3 * (jnp.exp(d) - d - 1.0)
            return jnp.sum(per * m) / jnp.sum(m)

        loss, grads = jax.value_and_grad(documented)(state.params)
        new, metrics = grpo.update(cfg, static, state, exp, perm_key)
        return exp, adv, r, loss, grads, new, metrics

    exp, adv, r, loss, grads, new, metrics = check(state, frozen)
    np.testing.assert_allclose(np.asarray(exp.rewards), np.asarray(r), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(exp.advantages), np.asarray(adv), rtol=1e-4, atol=1e-5)
    assert float(jnp.mean(exp.kl)) > 1.0  # the reference differs: the KL is not trivially 0
    expected = jax.tree.map(lambda p, g: p - 0.1 * g, state.params, grads)
    tree_close(new.params, expected, 1e-5)
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(metrics["policy/ratio"]), 1.0, atol=1e-5)


def test_dynamic_sampling_masks_groups_without_signal(policy, prompts, tmp_path):
    (tmp_path / "const.py").write_text(
        "def const(prompts, responses):\n    return [1.0] * len(responses)\n"
    )
    cfg = grpo.GRPOConfig(num_samples=2, response_length=R, dynamic_sampling=True)
    fn = RewardFunction.load(f"{tmp_path / 'const.py'}:const", make_tokenizer())
    static = grpo.GRPOModels(policy.graphdef, policy.graphdef, (scoring.RewardFunctionSource(fn),))
    frozen = grpo.GRPOFrozen(reference=policy.params, rewards=(None,))
    state = grpo.init_state(cfg, policy.params)
    new, metrics = grpo.make_iteration(cfg, static)(state, frozen, *prompts)
    assert float(metrics["groups/kept"]) == 0.0 and float(metrics["loss"]) == 0.0
    tree_close(new.params, grpo.init_state(cfg, policy.params).params, 0.0)  # no signal, no step


def make_tokenizer():
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def test_tiny_run_improves(policy, prompts, tmp_path):
    baseline, kl = "rloo", "reward"
    (tmp_path / "dog_reward.py").write_text(
        textwrap.dedent(
            """
            def dogs(prompts, responses):
                return [float(r.split().count("dog")) for r in responses]
            """
        )
    )
    cfg = grpo.GRPOConfig(
        baseline=baseline,
        kl=kl,
        num_samples=4,
        response_length=R,
        num_minibatches=2,
        kl_coef=0.01,
        clip_eps_high=0.28,
        optim=OptimConfig(learning_rate=5e-2, grad_accum_steps=2),
        loop=LoopConfig(max_steps=8),
    )
    fn = RewardFunction.load(f"{tmp_path / 'dog_reward.py'}:dogs", make_tokenizer())
    static = grpo.GRPOModels(
        policy.graphdef,
        policy.graphdef if cfg.uses_reference else None,
        (scoring.RewardFunctionSource(fn, weight=0.5), scoring.RewardFunctionSource(fn, name="b")),
    )
    frozen = grpo.GRPOFrozen(
        reference=policy.params if cfg.uses_reference else None, rewards=(None, None)
    )
    tokens, mask = prompts
    result = run_loop(
        grpo.make_step(cfg, static, frozen),
        grpo.init_state(cfg, policy.params),
        lambda s: {"prompt_tokens": tokens, "prompt_mask": mask},
        loop=cfg.loop,
    )
    scores = [h["score/mean"] for h in result.history]  # 1.5 x dogs (weights 0.5 + 1)
    assert np.mean(scores[-3:]) > np.mean(scores[:3]) + 1.5, scores
    assert result.skipped == 0
    for h in result.history:  # the KL in the reward: r = s - beta sum_t (old - ref), averaged
        np.testing.assert_allclose(
            h["reward/mean"], h["score/mean"] - 0.01 * h["kl/response"], rtol=1e-4, atol=1e-4
        )


def test_vmap_over_seeds_equals_separate_runs(policy, reward_model, prompts):
    cfg = grpo.GRPOConfig(
        num_samples=2,
        response_length=R,
        stop_tokens=(1, 7),
        optim=OptimConfig(learning_rate=1e-2, eps=1e-3),
    )
    static, frozen = setup(cfg, policy, reward_model)
    hps = [
        grpo.GRPOHParams.from_config(cfg, seed=0),
        grpo.GRPOHParams.from_config(cfg, seed=1, learning_rate=3e-3, kl_coef=0.2),
    ]
    iterate = grpo.make_iteration(cfg, static)
    tokens, mask = prompts
    separate = []
    for hp in hps:
        state = grpo.init_state(cfg, policy.params, hp)
        for _ in range(2):
            state, metrics = iterate(state, frozen, tokens, mask)
        separate.append((state, metrics))
    both = jax.jit(jax.vmap(grpo.iteration_fn(cfg, static), in_axes=(0, None, None, None)))
    states = grpo.stack_states([grpo.init_state(cfg, policy.params, hp) for hp in hps])
    for _ in range(2):
        states, metrics = both(states, frozen, tokens, mask)
    for run, (state, m) in enumerate(separate):
        tree_close(jax.tree.map(lambda x, r=run: x[r], states.params), state.params, 1e-5)
        for k, v in m.items():
            np.testing.assert_allclose(
                float(metrics[k][run]), float(v), rtol=1e-5, atol=1e-5, err_msg=k
            )
    assert not np.isclose(float(separate[0][1]["score/mean"]), float(separate[1][1]["score/mean"]))


# ------------------------------------------------------------------------------------------
# The stage through the pipeline: exact resume, 1 vs 8 devices
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from rlhf_jax import quickstart
    from rlhf_jax.data import toy

    out = str(tmp_path_factory.mktemp("grpo_stage"))
    base = os.path.join(out, "base")
    tok = toy.load_tokenizer(toy.build_tokenizer(base))
    task = toy.ToyTask(hidden_size=16, num_layers=1, num_heads=2)
    models.save_pretrained(
        models.init_model(quickstart.policy_config(task, tok), jax.random.PRNGKey(0)), base
    )
    tok.save_pretrained(base)
    toy.write_jsonl(os.path.join(out, "prompts.jsonl"), [{"prompt": p} for p in toy.all_prompts()])
    return out


def _config(files, run, *overrides):
    from rlhf_jax import config as C

    return C.load_config(
        None,
        [
            f"run.dir={run}",
            "run.tensorboard=false",
            "run.progress=false",
            f"grpo.policy={files}/base",
            f"grpo.prompts_file={files}/prompts.jsonl",
            "grpo.rewards=[fn:rlhf_jax.data.toy:gold_reward]",
            "grpo.data.max_prompt_length=4",
            "grpo.batch_size=8",
            "grpo.trainer.num_samples=2",
            "grpo.trainer.response_length=4",
            "grpo.trainer.optim.learning_rate=1e-2",
            "grpo.trainer.loop.max_steps=4",
            "grpo.save_every=2",
            *overrides,
        ],
    )


def test_stage_resumes_exactly_and_matches_on_8_devices(files, tmp_path):
    """4 iterations on one device (with the held-out evaluation: gold score, win rate) = 2 on
    one device, then resumed on 8 devices for 2 more."""
    from rlhf_jax import pipeline
    from rlhf_jax.logging import read_metrics

    one = ("parallel.mesh.data=1",)
    evaluation = (
        f"grpo.eval_prompts_file={files}/prompts.jsonl",
        "grpo.eval_prompts=8",
        "grpo.evaluator=rlhf_jax.data.toy:evaluate",
        "grpo.trainer.loop.eval_every=4",
    )
    full = pipeline.run_stage(
        _config(files, tmp_path / "a", *one, *evaluation), "grpo", verbose=False
    )
    part = tmp_path / "b"
    pipeline.run_stage(
        _config(files, part, *one, "grpo.trainer.loop.max_steps=2"), "grpo", verbose=False
    )
    resumed = pipeline.run_stage(
        _config(files, part, "parallel.mesh.data=8"), "grpo", verbose=False
    )
    assert resumed.result.start_step == 2
    final = models.from_pretrained(full.final).params
    tree_close(models.from_pretrained(resumed.final).params, final, 2e-5)
    a, c = read_metrics(full.dir), read_metrics(resumed.dir)
    for k in ("score/mean", "loss", "kl/response"):
        want = {r["step"]: r[k] for r in a if k in r}
        got = {r["step"]: r[k] for r in c if k in r and r["step"] in want}
        assert 4 in got, k
        np.testing.assert_allclose([want[s] for s in got], list(got.values()), 1e-4, 1e-5)
    last = [r for r in a if "eval/win_rate" in r][-1]
    assert 0.0 <= last["eval/win_rate"] <= 1.0 and "eval/gold" in last and "eval/kl" in last


def test_stage_errors(files, tmp_path):
    from rlhf_jax import pipeline
    from rlhf_jax.config import ConfigError

    with pytest.raises(ConfigError, match="is not a reward source"):
        pipeline.run_stage(
            _config(files, tmp_path / "x", "grpo.rewards=[rlhf_jax.data.toy:gold_reward]"),
            "grpo",
            verbose=False,
        )
    with pytest.raises(ConfigError, match="num_minibatches=3"):
        pipeline.run_stage(
            _config(files, tmp_path / "y", "grpo.trainer.num_minibatches=3"), "grpo", verbose=False
        )
    assert not os.path.exists(tmp_path / "x" / "grpo") and not os.path.exists(tmp_path / "y")


def test_reward_source_specs():
    from rlhf_jax.config import ConfigError

    assert scoring.parse_source("fn:pkg.mod:f@0.5", "k") == ("fn", "pkg.mod:f", 0.5)
    assert scoring.parse_source("model:runs/x/rm/final", "k") == ("model", "runs/x/rm/final", 1.0)
    with pytest.raises(ConfigError, match="weight after '@' must be a number"):
        scoring.parse_source("fn:m:f@heavy", "k")

    class Ctx:  # no sources given: this run's rm/final is looked up
        def model_dir(self, value, key, default_stage):
            raise ConfigError(f"{key} {value} {default_stage}")

    with pytest.raises(ConfigError, match=r"grpo.rewards\[0\] None rm"):
        scoring.load_sources(Ctx(), (), "grpo.rewards", None, None)

"""DPO: the gradient against its closed form, SimPO by hand, a precomputed reference equal to the
on-the-fly one, learning offline and online, vmap over runs, and the stage through the pipeline
(exact resume, 1 vs 8 devices)."""

import dataclasses
import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models, scoring
from rlhf_jax.algorithms import dpo
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
def policy():
    return models.init_model(MODEL, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def reference():
    return models.init_model(MODEL, jax.random.PRNGKey(1))


@pytest.fixture(scope="module")
def pairs():
    rng = np.random.default_rng(0)
    ones = np.ones(R, np.int32)
    return {
        "prompt_tokens": rng.integers(2, 8, (B, P)).astype(np.int32),
        "prompt_mask": np.array([[0, 1, 1], [1, 1, 1], [0, 0, 1], [1, 1, 1]], np.int32),
        "chosen_tokens": rng.integers(2, 8, (B, R)).astype(np.int32),
        "chosen_mask": np.stack([ones, [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], ones]).astype(np.int32),
        "rejected_tokens": rng.integers(2, 8, (B, R)).astype(np.int32),
        "rejected_mask": np.stack([[1, 1, 0, 0, 0], ones, [1, 0, 0, 0, 0], ones]).astype(np.int32),
    }


def loop_logps(model, batch, which):
    """Sequence log-probs by a plain loop over the logits (float64)."""
    toks = np.concatenate([batch["prompt_tokens"], batch[f"{which}_tokens"]], 1)
    mask = np.concatenate([batch["prompt_mask"], batch[f"{which}_mask"]], 1)
    logits = np.asarray(jax.jit(models.logits, static_argnums=0)(model.graphdef, model.params,
                                                                 toks, mask), np.float64)  # fmt: skip
    out = []
    for i in range(B):
        total = 0.0
        for t in range(P, P + R):
            if mask[i, t]:
                row = logits[i, t - 1]
                total += row[toks[i, t]] - (np.log(np.sum(np.exp(row - row.max()))) + row.max())
        out.append(total)
    return np.array(out)


# ------------------------------------------------------------------------------------------
# The loss and its gradient, by hand
# ------------------------------------------------------------------------------------------


def test_sigmoid_gradient_matches_the_closed_form(policy, reference, pairs):
    """d/dtheta -log sigmoid(beta Delta) = -beta sigmoid(-beta Delta) (grad logpi_c - grad
    logpi_r), averaged over pairs; and one SGD step moves the parameters by -lr times it."""
    beta = 0.7
    cfg = dpo.DPOConfig(
        beta=beta,
        batch_size=B,
        optim=OptimConfig(name="sgd", learning_rate=0.1, max_grad_norm=None),
    )
    static = dpo.DPOModels(policy=policy.graphdef, reference=reference.graphdef)
    frozen = dpo.DPOFrozen(reference=reference.params)
    batch = jax.tree.map(jnp.asarray, pairs)

    pc, pr = loop_logps(policy, pairs, "chosen"), loop_logps(policy, pairs, "rejected")
    rc, rr = loop_logps(reference, pairs, "chosen"), loop_logps(reference, pairs, "rejected")
    logps, _ = dpo.pair_logps(policy.graphdef, policy.params, batch)
    np.testing.assert_allclose(np.asarray(logps), np.concatenate([pc, pr]), rtol=1e-5)

    delta = (pc - rc) - (pr - rr)
    weight = -beta / (1.0 + np.exp(beta * delta)) / B  # -beta sigmoid(-beta Delta) / B

    def weighted(params):
        lp, _ = dpo.pair_logps(policy.graphdef, params, batch)
        return jnp.sum(jnp.asarray(weight, jnp.float32) * (lp[:B] - lp[B:]))

    expected = jax.grad(weighted)(policy.params)
    hp = dpo.DPOHParams.from_config(cfg)
    grads = jax.grad(lambda p: dpo.dpo_objective(cfg, static, frozen, hp, p, batch)[0] / B)(
        policy.params
    )
    tree_close(grads, expected, 1e-5)

    state = dpo.init_state(cfg, policy.params)
    new, metrics = dpo.make_step(cfg, static, frozen)(state, pairs, None)
    tree_close(new.params, jax.tree.map(lambda p, g: p - 0.1 * g, policy.params, expected), 1e-5)
    loss = np.mean(np.log1p(np.exp(-beta * delta)))
    np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["rewards/chosen"]), beta * np.mean(pc - rc), atol=1e-5)
    np.testing.assert_allclose(float(metrics["rewards/margins"]), beta * np.mean(delta), atol=1e-5)
    acc = np.mean(beta * (pc - rc) > beta * (pr - rr))
    np.testing.assert_allclose(float(metrics["rewards/accuracies"]), acc)
    np.testing.assert_allclose(float(metrics["logps/rejected"]), np.mean(pr), rtol=1e-5)


def test_simpo_by_hand():
    # a_c = -2 / 2 = -1, a_r = -6 / 3 = -2; z = 2 (a_c - a_r) - 0.5 = 1.5
    total, n, m = dpo.simpo_loss(
        jnp.array([-2.0]), jnp.array([-6.0]), jnp.array([2]), jnp.array([3]), 2.0, 0.5
    )
    np.testing.assert_allclose(float(total), np.log1p(np.exp(-1.5)), rtol=1e-6)
    assert float(n) == 1.0
    np.testing.assert_allclose([float(m["rewards_chosen"]), float(m["rewards_rejected"])], [-2, -4])
    # label smoothing e: -(1-e) log s(z) - e log s(-z); the gradient wrt the chosen log-prob
    e = 0.1
    grad = jax.grad(
        lambda c: dpo.simpo_loss(
            c, jnp.array([-6.0]), jnp.array([2]), jnp.array([3]), 2.0, 0.5, label_smoothing=e
        )[0]  # fmt: skip
    )(jnp.array([-2.0]))
    sig = 1.0 / (1.0 + np.exp(-1.5))
    np.testing.assert_allclose(float(grad[0]), (-(1 - e) * (1 - sig) + e * sig) * 2.0 / 2.0, 1e-6)


def test_precomputed_reference_equals_on_the_fly(policy, reference, pairs):
    cfg = dpo.DPOConfig(batch_size=B, optim=OptimConfig(learning_rate=1e-2))
    static = dpo.DPOModels(policy=policy.graphdef, reference=reference.graphdef)
    frozen = dpo.DPOFrozen(reference=reference.params)
    cached = dpo.precompute_reference(static, frozen, pairs, chunk=3)  # a padded last chunk
    np.testing.assert_allclose(cached["ref_chosen"], loop_logps(reference, pairs, "chosen"), 1e-5)
    on_the_fly = dpo.make_step(cfg, static, frozen)
    pre = dpo.make_step(cfg, dataclasses.replace(static, reference=None), dpo.DPOFrozen())
    a, ma = on_the_fly(dpo.init_state(cfg, policy.params), pairs, None)
    b, mb = pre(dpo.init_state(cfg, policy.params), pairs | cached, None)
    tree_close(a.params, b.params, 1e-6)
    for k, v in ma.items():
        np.testing.assert_allclose(float(mb[k]), float(v), rtol=1e-5, atol=1e-6, err_msg=k)


# ------------------------------------------------------------------------------------------
# Learning; vmap over runs
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo"])
def test_offline_run_improves(policy, pairs, loss_type):
    cfg = dpo.DPOConfig(
        loss_type=loss_type,
        batch_size=B,
        beta=0.5 if loss_type != "simpo" else 2.0,
        optim=OptimConfig(learning_rate=1e-2, grad_accum_steps=2),
        loop=LoopConfig(max_steps=15),
    )
    static = dpo.DPOModels(policy.graphdef, None if loss_type == "simpo" else policy.graphdef)
    frozen = dpo.DPOFrozen(reference=None if loss_type == "simpo" else policy.params)
    result = run_loop(
        dpo.make_step(cfg, static, frozen),
        dpo.init_state(cfg, policy.params),
        lambda s: pairs,
        loop=cfg.loop,
    )
    h = result.history
    assert h[-1]["loss"] < 0.5 * h[0]["loss"], [x["loss"] for x in h]
    assert h[-1]["rewards/margins"] > h[0]["rewards/margins"] + 0.5
    assert h[-1]["rewards/accuracies"] == 1.0 and result.skipped == 0


def test_vmap_over_two_runs_equals_two_runs(policy, reference, pairs):
    cfg = dpo.DPOConfig(batch_size=B, optim=OptimConfig(learning_rate=1e-2, eps=1e-3))
    static = dpo.DPOModels(policy.graphdef, reference.graphdef)
    frozen = dpo.DPOFrozen(reference=reference.params)
    hps = [
        dpo.DPOHParams.from_config(cfg, beta=0.1, seed=0),
        dpo.DPOHParams.from_config(cfg, beta=1.0, learning_rate=3e-3, seed=1),
    ]
    pure = dpo.step_fn(cfg, static)
    one = jax.jit(pure)
    separate = []
    for hp in hps:
        state = dpo.init_state(cfg, policy.params, hp)
        for _ in range(2):
            state, metrics = one(state, frozen, pairs)
        separate.append((state, metrics))
    both = jax.jit(jax.vmap(pure, in_axes=(0, None, None)))
    states = dpo.stack_states([dpo.init_state(cfg, policy.params, hp) for hp in hps])
    for _ in range(2):
        states, metrics = both(states, frozen, pairs)
    for run, (state, m) in enumerate(separate):
        tree_close(jax.tree.map(lambda x, r=run: x[r], states.params), state.params, 1e-5)
        for k, v in m.items():
            np.testing.assert_allclose(float(metrics[k][run]), float(v), rtol=1e-5, atol=1e-6)
    assert not np.isclose(float(separate[0][1]["loss"]), float(separate[1][1]["loss"]))


def make_tokenizer():
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def test_online_dpo_learns_from_a_reward_function(policy, pairs, tmp_path):
    (tmp_path / "dog_reward.py").write_text(
        textwrap.dedent(
            """
            def dogs(prompts, responses):
                return [float(r.split().count("dog")) for r in responses]
            """
        )
    )
    cfg = dpo.DPOConfig(
        online=True,
        batch_size=B,
        response_length=R,
        beta=0.5,
        optim=OptimConfig(learning_rate=3e-2),
        loop=LoopConfig(max_steps=15),
    )
    fn = RewardFunction.load(f"{tmp_path / 'dog_reward.py'}:dogs", make_tokenizer())
    static = dpo.DPOModels(policy.graphdef, policy.graphdef, (scoring.RewardFunctionSource(fn),))
    frozen = dpo.DPOFrozen(reference=policy.params, rewards=(None,))
    prompts = {k: pairs[k] for k in ("prompt_tokens", "prompt_mask")}
    result = run_loop(
        dpo.make_step(cfg, static, frozen),
        dpo.init_state(cfg, policy.params),
        lambda s: prompts,
        loop=cfg.loop,
    )
    scores = [h["score/mean"] for h in result.history]
    assert np.mean(scores[-3:]) > np.mean(scores[:3]) + 1.0, scores
    assert result.history[-1]["kl/response"] > 0 and result.skipped == 0
    assert all(h["score/chosen"] >= h["score/rejected"] for h in result.history)


# ------------------------------------------------------------------------------------------
# The stage through the pipeline: exact resume, 1 vs 8 devices, errors
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from rlhf_jax import quickstart
    from rlhf_jax.data import toy

    out = str(tmp_path_factory.mktemp("dpo_stage"))
    base = os.path.join(out, "base")
    tok = toy.load_tokenizer(toy.build_tokenizer(base))
    task = toy.ToyTask(hidden_size=16, num_layers=1, num_heads=2)
    models.save_pretrained(
        models.init_model(quickstart.policy_config(task, tok), jax.random.PRNGKey(0)), base
    )
    tok.save_pretrained(base)
    toy.write_jsonl(os.path.join(out, "pairs.jsonl"), toy.preference_records(32, seed=0))
    return out


def _config(files, run, *overrides):
    from rlhf_jax import config as C

    return C.load_config(
        None,
        [
            f"run.dir={run}",
            "run.tensorboard=false",
            "run.progress=false",
            f"dpo.policy={files}/base",
            f"dpo.train_file={files}/pairs.jsonl",
            f"dpo.eval_file={files}/pairs.jsonl",
            "dpo.eval_size=8",
            "dpo.data.max_prompt_length=4",
            "dpo.data.max_completion_length=10",
            "dpo.trainer.batch_size=8",
            "dpo.trainer.optim.learning_rate=1e-2",
            "dpo.trainer.loop.max_steps=4",
            "dpo.trainer.loop.eval_every=4",
            "dpo.save_every=2",
            *overrides,
        ],
    )


def _params(result):
    return models.from_pretrained(result.final).params


def test_stage_resumes_exactly_and_matches_on_8_devices(files, tmp_path):
    """4 steps on one device = 2 steps on one device, then resumed on 8 devices for 2 more with
    the reference precomputed (the same numbers as on the fly)."""
    from rlhf_jax import pipeline
    from rlhf_jax.logging import read_metrics

    one = ("parallel.mesh.data=1",)
    full = pipeline.run_stage(_config(files, tmp_path / "a", *one), "dpo", verbose=False)
    part = tmp_path / "b"
    pipeline.run_stage(
        _config(files, part, *one, "dpo.trainer.loop.max_steps=2"), "dpo", verbose=False
    )
    eight = ("parallel.mesh.data=8", "dpo.trainer.reference=precomputed")
    resumed = pipeline.run_stage(_config(files, part, *eight), "dpo", verbose=False)
    assert resumed.result.start_step == 2
    tree_close(_params(resumed), _params(full), 2e-5)
    a, c = read_metrics(full.dir), read_metrics(resumed.dir)
    for k in ("loss", "rewards/margins", "eval/rewards/accuracies"):
        want = {r["step"]: r[k] for r in a if k in r}
        got = {r["step"]: r[k] for r in c if k in r and r["step"] in want}
        assert 4 in got, k
        np.testing.assert_allclose([want[s] for s in got], list(got.values()), 1e-4, 1e-5)


def test_online_stage_resumes_exactly_and_matches_on_8_devices(files, tmp_path):
    """Online DPO (two samples per prompt, labelled by the gold function): 4 iterations on one
    device = 2 on one device, then resumed on 8 devices for 2 more."""
    from rlhf_jax import pipeline
    from rlhf_jax.data import toy
    from rlhf_jax.logging import read_metrics

    prompts = toy.write_jsonl(
        tmp_path / "prompts.jsonl", [{"prompt": p} for p in toy.all_prompts()]
    )
    online = (
        f"dpo.train_file={prompts}",
        "dpo.eval_file=null",
        "dpo.data.kind=prompt",
        "dpo.data.max_completion_length=0",
        "dpo.trainer.online=true",
        "dpo.trainer.response_length=6",
        "dpo.rewards=['fn:rlhf_jax.data.toy:gold_reward']",
        "dpo.decode_special_tokens=true",
    )
    one = ("parallel.mesh.data=1", *online)
    full = pipeline.run_stage(_config(files, tmp_path / "a", *one), "dpo", verbose=False)
    part = tmp_path / "b"
    pipeline.run_stage(
        _config(files, part, *one, "dpo.trainer.loop.max_steps=2"), "dpo", verbose=False
    )
    resumed = pipeline.run_stage(
        _config(files, part, "parallel.mesh.data=8", *online), "dpo", verbose=False
    )
    assert resumed.result.start_step == 2
    tree_close(_params(resumed), _params(full), 2e-5)
    a, c = read_metrics(full.dir), read_metrics(resumed.dir)
    for k in ("loss", "rewards/margins", "score/mean"):
        want = {r["step"]: r[k] for r in a if k in r}
        got = {r["step"]: r[k] for r in c if k in r and r["step"] in want}
        assert sorted(got) == [1, 2, 3, 4], (k, sorted(got))
        np.testing.assert_allclose([want[s] for s in got], list(got.values()), 1e-4, 1e-5)


@pytest.mark.parametrize(
    "override, match",
    [
        ("dpo.trainer.loss_type=kto", "loss_type='kto'"),
        ("dpo.trainer.online=true", "online DPO reads 'prompt' rows"),
        ("dpo.trainer.beta=0", "beta=0"),
    ],
)
def test_config_errors(files, tmp_path, override, match):
    from rlhf_jax.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        _config(files, tmp_path, override)


def test_missing_pairs_is_one_line(files, tmp_path):
    from rlhf_jax import pipeline
    from rlhf_jax.config import ConfigError

    cfg = _config(files, tmp_path / "run", "dpo.train_file=null")
    with pytest.raises(ConfigError, match="label.output=pairs"):
        pipeline.run_stage(cfg, "dpo", verbose=False)
    assert not os.path.exists(tmp_path / "run" / "dpo")


def test_rpo_adds_the_chosen_nll_per_token(policy, reference, pairs):
    cfg = dpo.DPOConfig(batch_size=B)
    static = dpo.DPOModels(policy=policy.graphdef, reference=reference.graphdef)
    frozen = dpo.DPOFrozen(reference=reference.params)
    batch = jax.tree.map(jnp.asarray, pairs)
    hp = dpo.DPOHParams.from_config(cfg)
    plain, _ = dpo.dpo_objective(cfg, static, frozen, hp, policy.params, batch)
    rpo, (_, sums) = dpo.dpo_objective(
        cfg, static, frozen, hp.replace(rpo_alpha=jnp.float32(0.5)), policy.params, batch
    )
    lengths = pairs["chosen_mask"].sum(1)
    nll = np.sum(-loop_logps(policy, pairs, "chosen") / lengths)
    np.testing.assert_allclose(float(rpo - plain), 0.5 * nll, rtol=1e-5)
    np.testing.assert_allclose(float(sums["nll/chosen"]), nll, rtol=1e-5)

"""The LM judge (rlhf_jax.judge): template rendering, pairwise debiasing, score expectation,
holes equal packed rows, 1 vs 8 devices, and the one-line errors for bad templates and answers."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax import judge as J
from rlhf_jax import models, parallel
from rlhf_jax.data import toy

TOY = J.JudgeConfig(template=J.TOY_PAIRWISE, batch_size=16)
TOY_POINT = J.JudgeConfig(mode="pointwise", template=J.TOY_POINTWISE, scores=J.TOY_SCORES)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = J.build_toy_tokenizer(tmp_path_factory.mktemp("judge_tok"))
    return toy.load_tokenizer(path)


def _config(tokenizer, arch="gpt2"):
    return models.ModelConfig(
        arch=arch,
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
        head_dim=8,
        intermediate_size=32,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def constant_judge(tokenizer, logits: dict[int, float]) -> models.Model:
    """A GPT-2 judge whose next-token logits are the same after any input: the final LayerNorm's
    scale is 0 and its bias e_0, so ``h = e_0`` and (tied) ``logit_v = embed[v, 0]``; the tokens
    in ``logits`` get exactly those values in dimension 0 (zeros elsewhere)."""
    m = models.init_model(_config(tokenizer), jax.random.PRNGKey(0))
    flat = []
    for path, var in nnx.to_flat_state(m.params):
        x = np.array(var.get_value())
        if path == ("final_norm", "scale"):
            x[:] = 0.0
        elif path == ("final_norm", "bias"):
            x[:] = 0.0
            x[0] = 1.0
        elif path == ("embed", "embedding"):
            for tok, value in logits.items():
                x[tok] = 0.0
                x[tok, 0] = value
        flat.append((path, var.replace(jnp.asarray(x))))
    return m.replace(params=nnx.from_flat_state(flat))


def _judge(tokenizer, model, cfg=TOY, mesh=None, preset="dp"):
    template = J.build_template(tokenizer, cfg)
    if mesh is not None:
        sh = parallel.param_shardings(model.params, mesh, preset)
        model = model.replace(params=jax.device_put(model.params, sh))
    return J.Judge(config=cfg, model=model, tokenizer=tokenizer, template=template, mesh=mesh)


PROMPTS = ["a dog is", "the car looks", "my apple seems"]
A = ["a furry animal .", "a fast vehicle .", "very sweet ."]
B = ["a rusty tool .", "furry .", "a tasty fruit ."]


# ------------------------------------------------------------------------------------------
# Rendering


def test_template_without_chat_template(tokenizer):
    t = J.build_template(tokenizer, TOY)
    assert t.slots == ("prompt", "response_a", "response_b")
    ids = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert [list(p) for p in t.pieces] == [
        [tokenizer.bos_token_id, *ids("Prompt :")],
        ids("Response A :"),
        ids("Response B :"),
        ids("Better :"),
    ]
    assert list(t.answers) == [tokenizer.convert_tokens_to_ids(w) for w in ("A", "B")]
    text = J.render(TOY, tokenizer, {"prompt": "a dog is", "response_a": "x", "response_b": "y"})
    assert text == "<bos>Prompt : a dog is Response A : x Response B : y Better :"


def test_template_with_chat_template(tmp_path):
    chat = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}"
        "{% endfor %}{% if add_generation_prompt %} <|assistant|>{% endif %}"
    )
    tok = toy.load_tokenizer(J.build_toy_tokenizer(tmp_path / "chat", chat_template=chat))
    cfg = J.JudgeConfig(
        template="{principles} Prompt : {prompt} Response A : {response_a} "
        "Response B : {response_b} Better :",
        principles="Better",
    )
    text = J.render(cfg, tok, {"prompt": "a dog is", "response_a": "x", "response_b": "y"})
    assert text == (
        "<bos><|user|> Better Prompt : a dog is Response A : x Response B : y Better : "
        "<|assistant|>"
    )
    t = J.build_template(tok, cfg)
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert [list(p) for p in t.pieces] == [
        ids("<bos><|user|> Better Prompt : "),
        ids(" Response A : "),
        ids(" Response B : "),
        ids(" Better : <|assistant|>"),
    ]
    # the same template without the chat template: <bos> from the post-processor, no roles
    plain = J.build_template(tok, J.JudgeConfig(**{**_fields(cfg), "use_chat_template": False}))
    assert list(plain.pieces[0]) == ids("<bos> Better Prompt : ")


def _fields(cfg):
    import dataclasses

    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


# ------------------------------------------------------------------------------------------
# Reading the judgement


def test_always_a_judge_gives_one_half(tokenizer):
    a_id, b_id = (tokenizer.convert_tokens_to_ids(w) for w in ("A", "B"))
    jd = _judge(tokenizer, constant_judge(tokenizer, {a_id: 20.0, b_id: -20.0}))
    out = jd.judgement(PROMPTS, A, B)
    np.testing.assert_allclose(out["first"], 1.0, atol=1e-6)
    np.testing.assert_allclose(out["second"], 0.0, atol=1e-6)
    np.testing.assert_allclose(out["preference"], 0.5, atol=1e-6)
    np.testing.assert_array_equal(out["consistent"], 0.0)
    # a ranking by such a judge is all ties: the original order
    orders, prefs = jd.rank(PROMPTS[:1], [A])
    assert orders == [[0, 1, 2]]
    np.testing.assert_allclose(prefs, 0.5, atol=1e-6)


def test_pairwise_probability_hand_built(tokenizer):
    # a judge with a constant 2:1 lean to "A": p_AB = s, p_BA = 1 - s, so P = 1/2 whatever s;
    # the answer mass is the softmax mass of the two answer tokens among all tokens
    a_id, b_id = (tokenizer.convert_tokens_to_ids(w) for w in ("A", "B"))
    m = constant_judge(tokenizer, {a_id: np.log(2.0), b_id: 0.0})
    out = _judge(tokenizer, m).judgement(PROMPTS, A, B)
    np.testing.assert_allclose(out["first"], 2 / 3, atol=1e-6)
    np.testing.assert_allclose(out["second"], 1 / 3, atol=1e-6)
    np.testing.assert_allclose(out["preference"], 0.5, atol=1e-6)
    emb = np.asarray(m.params["embed"]["embedding"].get_value(), np.float64)[:, 0]
    mass = (np.exp(emb[a_id]) + np.exp(emb[b_id])) / np.exp(emb).sum()
    np.testing.assert_allclose(out["answer_mass"], mass, rtol=1e-5)


def test_score_expectation_hand_built(tokenizer):
    ids = [tokenizer.convert_tokens_to_ids(s) for s in J.TOY_SCORES]
    logit = np.array([0.0, 1.0, -2.0, 0.5, 3.0, -1.0, 0.0, 2.0, 1.5, -0.5])
    jd = _judge(tokenizer, constant_judge(tokenizer, dict(zip(ids, logit, strict=True))), TOY_POINT)
    p = np.exp(logit - logit.max())
    expected = float((p / p.sum()) @ np.arange(1, 11, dtype=np.float64))
    np.testing.assert_allclose(jd.scores(PROMPTS, A), expected, rtol=1e-5)
    # custom values: the expectation of the values, not of the token text
    cfg = J.JudgeConfig(
        mode="pointwise", template=J.TOY_POINTWISE, scores=("1", "2"), score_values=(-1.0, 1.0)
    )
    jd2 = _judge(tokenizer, constant_judge(tokenizer, {ids[0]: 0.0, ids[1]: np.log(3.0)}), cfg)
    np.testing.assert_allclose(jd2.scores(PROMPTS, A), 0.5, rtol=1e-5)


def test_holes_equal_packed_rows(tokenizer):
    """The judge input keeps the slots' padding as holes (mask 0): the last logits equal those
    of the same row packed without them (positions from the mask, attention by the mask)."""
    m = models.init_model(_config(tokenizer, "llama"), jax.random.PRNGKey(3))
    t = J.build_template(tokenizer, TOY)
    pt, pm = toy.encode_prompts(tokenizer, PROMPTS, length=6)
    at, am = toy.encode_responses(tokenizer, A)
    bt, bm = toy.encode_responses(tokenizer, B)
    segs = {"prompt": (pt, pm), "response_a": (at, am), "response_b": (bt, bm)}
    tokens, mask = J.assemble(t, segs)
    got = J.last_logits(m.graphdef, m.params, tokens, mask)
    for i in range(len(PROMPTS)):
        row = np.asarray(tokens[i])[np.asarray(mask[i]) > 0][None]
        ref = J.last_logits(m.graphdef, m.params, row, np.ones_like(row))
        np.testing.assert_allclose(got[i], ref[0], atol=1e-5)
        assert tokenizer.bos_token_id not in row[0, 1:]  # the prompt's <bos> is dropped


def _sharp(m):
    """A random model with its LM head scaled up, so its answers are far from a coin flip."""
    flat = [
        (p, v.replace(v.get_value() * (300.0 if p[0] == "lm_head" else 1.0)))
        for p, v in nnx.to_flat_state(m.params)
    ]
    return m.replace(params=nnx.from_flat_state(flat))


def test_one_vs_eight_devices(tokenizer):
    m = _sharp(models.init_model(_config(tokenizer, "llama"), jax.random.PRNGKey(1)))
    one = _judge(tokenizer, m).judgement(PROMPTS * 3, A * 3, B[::-1] * 3)
    mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:8])
    eight = _judge(tokenizer, m, mesh=mesh, preset="fsdp+tp").judgement(
        PROMPTS * 3, A * 3, B[::-1] * 3
    )
    for k in one:
        np.testing.assert_allclose(one[k], eight[k], atol=1e-5)
    assert np.abs(one["first"] - 0.5).max() > 0.05  # not a coin flip


def test_judge_scores_jit_matches_host(tokenizer):
    """The pure function under an outer jit (as inside a compiled iteration) equals the host
    call, with the policy's prompts (<bos> first) as token arrays."""
    m = models.init_model(_config(tokenizer), jax.random.PRNGKey(2))
    jd = _judge(tokenizer, m, TOY_POINT)
    t = J.build_template(tokenizer, TOY_POINT, source=tokenizer)
    pt, pm = toy.encode_prompts(tokenizer, PROMPTS)
    rt, rm = toy.encode_responses(tokenizer, A)

    @jax.jit
    def step(params, pt, pm, rt, rm):
        return J.judge_scores(m.graphdef, params, t, pt, pm, rt, rm) * 2.0

    np.testing.assert_allclose(step(m.params, pt, pm, rt, rm) / 2, jd.scores(PROMPTS, A), 1e-5)


def test_rank_from_preferences():
    p = np.array([[0.5, 0.2, 0.9], [0.8, 0.5, 0.6], [0.1, 0.4, 0.5]])
    assert J.rank_from_preferences(p[None]) == [[1, 0, 2]]


# ------------------------------------------------------------------------------------------
# Bad input: one line, before anything compiles


@pytest.mark.parametrize(
    "cfg, match",
    [
        (J.JudgeConfig(template="Prompt : {prompt} {response_a} Better :"), "response_b"),
        (J.JudgeConfig(mode="pointwise", template="{prompt} Score :"), r"\{response\}"),
        (J.JudgeConfig(template=J.TOY_PAIRWISE, answers=("A", "Yes")), "not a single token"),
        (J.JudgeConfig(template=J.TOY_PAIRWISE, answers=("A", "A B")), "2 tokens"),
        (J.JudgeConfig(mode="pointwise", template=J.TOY_POINTWISE, scores=("1", "11")), "'11'"),
        (J.JudgeConfig(template="{prompt} {response_a} {response_b} {response}"), "response"),
    ],
)
def test_bad_templates_and_answers(tokenizer, cfg, match):
    with pytest.raises(J.JudgeError, match=match) as err:
        J.build_template(tokenizer, cfg)
    assert "\n" not in str(err.value)


def test_policy_tokens_missing_from_judge(tokenizer):
    # the judge reads the toy policy's ids (a subset of its own); the reverse cannot work
    assert J.token_map(toy.toy_tokenizer(), tokenizer) is not None
    with pytest.raises(J.JudgeError, match="not in the judge's vocabulary"):
        J.build_template(toy.toy_tokenizer(), J.JudgeConfig(template="{response_a}{response_b}",
                         answers=("a", "an")), source=tokenizer)  # fmt: skip


def test_judge_config_errors():
    with pytest.raises(ValueError, match="mode"):
        J.JudgeConfig(mode="likert")
    with pytest.raises(ValueError, match="two different"):
        J.JudgeConfig(answers=("A", "A"))


def test_template_file_and_principles_file(tokenizer, tmp_path):
    (tmp_path / "t.txt").write_text("{principles} {prompt} A : {response_a} B : {response_b} :")
    (tmp_path / "p.txt").write_text("Better")
    cfg = J.JudgeConfig(
        template_file=str(tmp_path / "t.txt"), principles_file=str(tmp_path / "p.txt")
    )
    t = J.build_template(tokenizer, cfg)
    assert tokenizer.convert_ids_to_tokens(list(t.pieces[0])) == ["<bos>", "Better"]
    with pytest.raises(J.ConfigError, match="no such file"):
        J.build_template(tokenizer, J.JudgeConfig(template_file=str(tmp_path / "nope.txt")))


# ------------------------------------------------------------------------------------------
# Through the pipeline: label.labeller=judge and the judge stage


def _stage_inputs(tmp_path, tokenizer):
    from rlhf_jax.quickstart import policy_config

    a_id, b_id = (tokenizer.convert_tokens_to_ids(w) for w in ("A", "B"))
    judge_dir = str(tmp_path / "judge")
    models.save_pretrained(constant_judge(tokenizer, {a_id: 20.0, b_id: -20.0}), judge_dir)
    tokenizer.save_pretrained(judge_dir)
    policy_dir = str(tmp_path / "policy")
    tok = toy.load_tokenizer(toy.build_tokenizer(policy_dir))
    task = toy.ToyTask(hidden_size=16, num_layers=1, num_heads=2)
    models.save_pretrained(models.init_model(policy_config(task, tok), 0), policy_dir)
    prompts = toy.write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    return judge_dir, policy_dir, prompts


def test_label_and_judge_stages(tmp_path, tokenizer):
    import dataclasses
    import json

    from rlhf_jax import pipeline
    from rlhf_jax.data.formats import DataConfig

    judge_dir, policy_dir, prompts = _stage_inputs(tmp_path, tokenizer)
    cfg = pipeline.ExperimentConfig(
        run=pipeline.RunConfig(dir=str(tmp_path / "run"), tensorboard=False, progress=False),
        parallel=parallel.ParallelConfig(mesh=parallel.MeshConfig(data=1)),
        label=pipeline.LabelStage(
            policy=policy_dir,
            prompts_file=prompts,
            num_completions=3,
            labeller="judge",
            judge=dataclasses.replace(TOY, model=judge_dir),
            output="pairs",
            data=DataConfig(kind="prompt", max_prompt_length=4),
            max_new_tokens=6,
        ),
    )
    pipeline.run_stage(cfg, "label", verbose=False)
    with open(tmp_path / "run" / "label" / "train.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == len(PROMPTS)
    # the always-"A" judge: every pair 1/2 after debiasing, so the samples keep their order
    assert all(r["margin"] == pytest.approx(0.5, abs=1e-6) for r in rows)

    pairs = [
        {"prompt": p, "chosen": a, "rejected": b} for p, a, b in zip(PROMPTS, A, B, strict=True)
    ]
    pairs_file = toy.write_jsonl(tmp_path / "pairs.jsonl", pairs)
    cfg = dataclasses.replace(
        cfg, judge=J.JudgeStage(**{**_fields(TOY), "model": judge_dir, "pairs_file": pairs_file})
    )
    result = pipeline.run_stage(cfg, "judge", verbose=False)
    report = result.outputs.info
    assert report["pairs"] == 3
    assert report["agreement"] == pytest.approx(0.5)
    assert report["position_consistency"] == 0.0
    # one order alone: the always-"A" judge is right exactly when the chosen is shown first
    assert report["agreement_chosen_first"] == 1.0 and report["agreement_chosen_second"] == 0.0
    assert os.path.exists(tmp_path / "run" / "judge" / "judged.jsonl")


def test_stage_bad_inputs(tmp_path, tokenizer):
    import dataclasses

    from rlhf_jax import pipeline
    from rlhf_jax.config import ConfigError

    judge_dir, policy_dir, prompts = _stage_inputs(tmp_path, tokenizer)
    run = pipeline.RunConfig(dir=str(tmp_path / "run"), tensorboard=False, progress=False)
    bad = dataclasses.replace(TOY, model=judge_dir, answers=("A", "Maybe"))
    cfg = pipeline.ExperimentConfig(
        run=run,
        label=pipeline.LabelStage(
            policy=policy_dir, prompts_file=prompts, labeller="judge", judge=bad
        ),
    )
    with pytest.raises(J.JudgeError, match="'Maybe' is not a single token"):
        pipeline.run_stage(cfg, "label", verbose=False)
    cfg = dataclasses.replace(cfg, judge=J.JudgeStage(model=judge_dir))
    with pytest.raises(ConfigError, match="judge.pairs_file is not set"):
        pipeline.run_stage(cfg, "judge", verbose=False)
    assert not os.path.exists(tmp_path / "run")  # nothing written


def _saved_judge(tmp_path, tokenizer, seed, mode, template):
    """A sharp random judge saved with its tokenizer in ``tmp_path/judge``, and the judge YAML of
    a ``judge:<yaml>`` source: ``(model, yaml path)``."""
    import yaml

    m = _sharp(models.init_model(_config(tokenizer), jax.random.PRNGKey(seed)))
    judge_dir = str(tmp_path / "judge")
    models.save_pretrained(m, judge_dir)
    tokenizer.save_pretrained(judge_dir)
    spec = tmp_path / "judge.yaml"
    spec.write_text(yaml.safe_dump({"model": judge_dir, "mode": mode, "template": template}))
    return m, spec


def test_judge_source_in_compiled_scoring_equals_host(tmp_path, tokenizer):
    """The judge as a reward source (rlhf_jax.scoring, 'judge:<yaml>'): the policy's token ids
    (toy tokenizer, <bos> first) scored inside a jitted scoring.score equal the host judge on the
    decoded texts."""
    import types

    import yaml

    from rlhf_jax import scoring

    m, spec = _saved_judge(tmp_path, tokenizer, 4, "pointwise", J.TOY_POINTWISE)
    judge_dir = str(tmp_path / "judge")
    policy_tok = toy.toy_tokenizer()
    ctx = types.SimpleNamespace(load_model=models.from_pretrained)
    _, target, weight = scoring.parse_source(f"judge:{spec}@2", "grpo.rewards")
    source, params = J.load_source(ctx, target, weight, policy_tok, "grpo.rewards[0]")
    pt, pm = toy.encode_prompts(policy_tok, PROMPTS)
    rt, rm = toy.encode_responses(policy_tok, A)
    rows = scoring.Responses(
        prompt_tokens=pt,
        prompt_mask=pm,
        response_tokens=rt,
        response_mask=rm,
        tokens=np.concatenate([pt, rt], 1),
        mask=np.concatenate([pm, rm], 1),
    )
    total, each = jax.jit(lambda p, r: scoring.score((source,), (p,), r))(params, rows)
    host = _judge(tokenizer, m, dataclasses.replace(TOY_POINT, scores=J.TOY_SCORES))
    expected = host.scores(PROMPTS, A)
    np.testing.assert_allclose(each["judge"], expected, rtol=1e-5)
    np.testing.assert_allclose(total, 2 * expected, rtol=1e-5)
    assert np.ptp(expected) > 1e-3  # the responses are told apart
    with pytest.raises(J.ConfigError, match="mode: pointwise"):
        spec.write_text(yaml.safe_dump({"model": judge_dir}))
        J.load_source(ctx, str(spec), 1.0, policy_tok, "grpo.rewards[0]")


def test_pointwise_rank_orders_by_score(tokenizer, monkeypatch):
    jd = _judge(tokenizer, constant_judge(tokenizer, {}), TOY_POINT)
    monkeypatch.setattr(jd, "scores", lambda p, r: np.array([2.0, 5.0, 2.0, 9.0, 1.0, 3.0]))
    orders, prefs = jd.rank(PROMPTS[:2], [A, B])
    assert orders == [[1, 0, 2], [0, 2, 1]]
    np.testing.assert_allclose(prefs[0, 1, 0], 1 / (1 + np.exp(-3.0)))
    np.testing.assert_allclose(prefs[0, 0, 2], 0.5)


def test_read_pairs(tmp_path):
    from rlhf_jax.data.formats import DataError

    good = toy.write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "a dog is", "chosen": "a pet .", "rejected": "rusty ."},
            {"prompt": [{"role": "user", "content": "hi"}],
             "chosen": [{"role": "assistant", "content": "yes"}],
             "rejected": [{"role": "assistant", "content": "no"}]},
        ],
    )  # fmt: skip
    assert J.read_pairs(good) == [("a dog is", "a pet .", "rusty ."), ("hi", "yes", "no")]
    assert len(J.read_pairs(good, limit=1)) == 1
    bad = toy.write_jsonl(tmp_path / "b.jsonl", [{"prompt": "a dog is", "chosen": "a pet ."}])
    with pytest.raises(DataError, match=r"b.jsonl, line 1, field 'rejected'") as err:
        J.read_pairs(bad)
    assert "\n" not in str(err.value)


def test_pairwise_judge_labels_online_dpo_pairs(tmp_path, tokenizer):
    """Online DPO with a pairwise judge as its only source (online AI feedback): inside the
    jitted iteration the judge picks chosen over rejected, so the judge called outside on the
    returned pairs prefers every chosen response (P >= 1/2). A pairwise judge cannot be a reward
    (no score) nor be summed with other sources."""
    import functools
    import types

    from rlhf_jax import scoring
    from rlhf_jax.algorithms import dpo
    from rlhf_jax.config import ConfigError
    from rlhf_jax.quickstart import policy_config

    _, spec = _saved_judge(tmp_path, tokenizer, 5, "pairwise", J.TOY_PAIRWISE)
    policy_tok = toy.toy_tokenizer()
    ctx = types.SimpleNamespace(load_model=models.from_pretrained)
    load = functools.partial(scoring.load_sources, ctx, key="dpo.rewards", tokenizer=policy_tok)
    sources, params = load(specs=(f"judge:{spec}",), prompts=None, pairwise_judge=True)
    with pytest.raises(ConfigError, match="labels the pairs alone"):
        load(specs=(f"judge:{spec}", "fn:x:y"), prompts=None, pairwise_judge=True)
    with pytest.raises(ConfigError, match="mode: pointwise"):
        load(specs=(f"judge:{spec}",), prompts=None)  # a reward (PPO, GRPO) reads a score

    task = toy.ToyTask(hidden_size=16, num_layers=1, num_heads=2)
    policy = models.init_model(policy_config(task, policy_tok), jax.random.PRNGKey(6))
    cfg = dpo.DPOConfig(online=True, batch_size=12, response_length=5)
    static = dpo.DPOModels(policy=policy.graphdef, reference=None, sources=sources)
    frozen = dpo.DPOFrozen(reference=None, rewards=params)
    pt, pm = toy.encode_prompts(policy_tok, PROMPTS * 4)
    pairs, metrics = jax.jit(functools.partial(dpo.online_pairs, cfg, static))(
        dpo.init_state(cfg, policy.params), frozen, pt, pm
    )
    judge = sources[0]
    p = np.asarray(
        J.judge_preferences(
            judge.graphdef,
            params[0],
            judge.template,
            pt,
            pm,
            pairs["chosen_tokens"],
            pairs["chosen_mask"],
            pairs["rejected_tokens"],
            pairs["rejected_mask"],
        )
    )
    # every chosen is the one the judge prefers (a random choice would pass 12 pairs 1 in 4096)
    assert np.all(p >= 0.5 - 1e-6), p
    assert np.sum(p > 0.5 + 1e-6) >= 10, p  # no ties: the judge tells the samples apart
    np.testing.assert_allclose(metrics["score/chosen"], p.mean(), rtol=1e-5)


def test_corrupt_response_is_malformed():
    rng = np.random.default_rng(0)
    records = toy.sft_records(400, seed=3)
    well = [r["completion"] for r in records if toy.is_well_formed(r["completion"])]
    bad = [toy.corrupt_response(rng, x) for x in well]
    assert not any(toy.is_well_formed(x) for x in bad)
    # every corruption kind of the corpus shows up, a wrong article among them
    assert any(x.split()[0] in ("a", "an") and x.split()[1:] == y.split()[1:]
               for x, y in zip(bad, well, strict=True))  # fmt: skip
    assert any(not x.endswith(".") for x in bad) and any(" and ." in x for x in bad)
    assert toy.corrupt_response(rng, "furry .") != "furry ."  # reversal keeps it: redrawn
    assert not toy.is_well_formed(toy.corrupt_response(rng, "furry ."))
    assert toy.corrupt_response(rng, "a a dog .") == "a a dog ."  # malformed: as it is
    again = np.random.default_rng(0)
    assert [toy.corrupt_response(again, x) for x in well] == bad  # the rng decides


def test_toy_rated_responses_adds_malformed_copies():
    records = toy.preference_records(300, seed=4, temperature=0.0)
    prompts, responses = J.toy_rated_responses(records)
    assert prompts == [r["prompt"] for r in records for _ in range(2)]
    assert responses == [x for r in records for x in (r["chosen"], r["rejected"])]
    n, well = len(prompts), sum(toy.is_well_formed(x) for x in responses)
    p_all, r_all = J.toy_rated_responses(records, malformed=1.0, seed=1)
    assert (p_all[:n], r_all[:n]) == (prompts, responses)
    assert len(r_all) == n + well and not any(toy.is_well_formed(x) for x in r_all[n:])
    # each copy answers the prompt of its source: the sources are the well-formed rows in order
    src = [i for i in range(n) if toy.is_well_formed(responses[i])]
    assert p_all[n:] == [prompts[i] for i in src]
    p_half, r_half = J.toy_rated_responses(records, malformed=0.5, seed=1)
    assert 0.35 * well < len(r_half) - n < 0.65 * well
    ratings = J.toy_ratings(p_all, r_all, J.toy_score_edges(2000, seed=0))
    assert {r["completion"] for r in ratings[n:]} == {"1"}  # malformed: the lowest decile
    with pytest.raises(ValueError, match="malformed"):
        J.toy_rated_responses(records, malformed=1.5)

"""The pipeline's stages: each turns its config section into a :class:`rlhf_jax.pipeline.Plan`.

A stage's ``prepare(ctx)`` loads and validates its inputs through the :class:`Context`
(``ctx.model_dir``, ``ctx.load_model``, ``ctx.dataset``, ``ctx.batches``), builds the algorithm's
initial state and says how to compile its step; :func:`rlhf_jax.pipeline.run_stage` does the rest.
Nothing here writes a file before ``finish``.

- ``sft``: :mod:`rlhf_jax.algorithms.sft` on prompt/completion rows.
- ``label``: K samples per prompt from a policy, ranked by a labeller function, written as ranking
  rows (``label/train.jsonl``, ``label/eval.jsonl``) for the reward model.
- ``rm``: :mod:`rlhf_jax.algorithms.reward_model` on comparisons, initialised from a policy's trunk,
  normalised on that policy's samples after training.
- ``ppo``: :mod:`rlhf_jax.algorithms.ppo` against a reward model or a reward function, with the
  held-out evaluation of :func:`policy_evaluator`.
- ``dpo``, ``grpo``: registered from :mod:`rlhf_jax.algorithms.dpo` and
  :mod:`rlhf_jax.algorithms.grpo` (each module holds its stage section and ``prepare``);
  ``judge``: :func:`rlhf_jax.judge.prepare_judge`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import config as config_lib
from rlhf_jax.algorithms import dpo, grpo
from rlhf_jax.judge import prepare_judge
from rlhf_jax.pipeline import (
    Context,
    Outputs,
    Plan,
    Stage,
    decode,
    pad_id,
    register,
    sample_responses,
    stop_tokens,
)

__all__ = [
    "policy_evaluator",
    "prepare_label",
    "prepare_ppo",
    "prepare_rm",
    "prepare_sft",
    "same_tokenizer",
]


def _held_out(ctx: Context, path, key, tokenizer, data, model, size) -> dict | None:
    if not path:
        return None
    ds = ctx.dataset(path, key, tokenizer, data, model)
    return jax.tree.map(jnp.asarray, ds.take(np.arange(min(len(ds), size))))


def same_tokenizer(a: Any, b: Any, where: str) -> None:
    """Raise a ConfigError when two tokenizers map text to different ids."""
    if len(a) != len(b) or a.get_vocab() != b.get_vocab():
        raise config_lib.ConfigError(
            f"{where}: the tokenizers differ ({len(a)} vs {len(b)} tokens, or other ids), so the "
            "models would read different token ids: use models trained with the same tokenizer"
        )


# ------------------------------------------------------------------------------------------
# sft
# ------------------------------------------------------------------------------------------


def prepare_sft(ctx: Context) -> Plan:
    from rlhf_jax.algorithms import sft

    st = ctx.section
    if not st.model:
        raise config_lib.ConfigError(
            "sft.model is not set: give a Hugging Face checkpoint directory, e.g. sft.model=gpt2"
        )
    model_dir = ctx.model_dir(st.model, "sft.model", None)
    model = ctx.load_model(model_dir)
    tokenizer = ctx.load_tokenizer(st.tokenizer or model_dir, model)
    train = ctx.dataset(st.train_file, "sft.train_file", tokenizer, st.data, model)
    batches = ctx.batches(train, st.trainer.batch_size, "sft.trainer.batch_size")
    eval_batch = _held_out(
        ctx, st.eval_file, "sft.eval_file", tokenizer, st.data, model, st.eval_size
    )
    lora = st.trainer.lora
    merged = jax.jit(functools.partial(sft.train_params, st.trainer))  # (base, state params)
    eval_fn = None
    if eval_batch is not None:
        evaluate = sft.make_eval(model.graphdef, completion_only=st.trainer.completion_only)
        eval_fn = lambda state: evaluate(merged(model.params, state.params), eval_batch)  # noqa: E731
    if lora is not None and ctx.cfg.parallel.step != "jit":
        raise config_lib.ConfigError(
            f"sft.trainer.lora with parallel.step={ctx.cfg.parallel.step}: LoRA runs the 'jit' "
            "form only; set parallel.step=jit"
        )

    def make_step(shardings):
        from rlhf_jax import parallel

        base_shardings = None
        if lora is not None and ctx.mesh is not None:
            base_shardings = parallel.state_shardings(
                model.params, ctx.mesh, ctx.cfg.parallel.preset
            )
        return sft.make_step(
            model.graphdef,
            st.trainer,
            mesh=ctx.mesh,
            state_shardings=shardings,
            mode=ctx.cfg.parallel.step,
            base=model.params,
            base_shardings=base_shardings,
        )

    def finish(state, result):
        params = merged(model.params, state.params)
        adapter = None
        if lora is not None:
            from rlhf_jax.lora import PeftAdapter

            adapter = PeftAdapter(state.params, lora, model.config, base_model=model_dir)
        return Outputs(model.replace(params=params), tokenizer, {}, adapter=adapter)

    return Plan(
        finish=finish,
        state=sft.init_state(model.params, st.trainer, jax.random.PRNGKey(ctx.seed)),
        make_step=make_step,
        batches=batches,
        loop=st.trainer.loop,
        key=jax.random.PRNGKey(ctx.seed),
        eval_fn=eval_fn,
        tokenizer=tokenizer,
        save_every=st.save_every,
    )


# ------------------------------------------------------------------------------------------
# label
# ------------------------------------------------------------------------------------------


def _labeller(spec: str) -> Callable:
    from rlhf_jax.reward_fn import load_reward_fn

    if not spec:
        raise config_lib.ConfigError(
            "label.labeller is not set: give a 'module:function' that ranks responses, e.g. "
            "rlhf_jax.data.toy:simulated_labeller on the toy task, or 'judge' for the LM judge "
            "of label.judge"
        )
    return load_reward_fn(spec)


def _check_order(order: Any, k: int, spec: str, i: int) -> list[int]:
    from rlhf_jax.errors import UserError

    try:
        out = [int(x) for x in order]
    except (TypeError, ValueError):
        out = []
    if sorted(out) != list(range(k)):
        raise UserError(
            f"label.labeller {spec!r} returned {order!r} for prompt {i}: it must return, per "
            f"prompt, the indices 0..{k - 1} of its {k} responses in best-first order"
        )
    return out


def _gapped_pairs(k: int, gap: int) -> list[tuple[int, int]]:
    """The rank pairs ``(a, b)``, ``a`` better, of a K-ranking whose ranks differ by >= gap."""
    return [(a, b) for a in range(k) for b in range(a + gap, k)]


def _safety_rows(prompt: str, group, order, labels, spec: str, i: int) -> list[dict]:
    """Every pair of a group as PKU-SafeRLHF rows: the helpfulness ranking ``order`` gives
    ``better_response_id``; the safety labeller's ``labels`` (``{"safe": [K bools], "safer":
    [K indices, safest first]}``) give ``safer_response_id`` and the flags."""
    from rlhf_jax.errors import UserError

    k = len(group)
    try:
        safe = [bool(x) for x in labels["safe"]]
        safer = _check_order(labels["safer"], k, spec, i)
    except (KeyError, TypeError) as err:
        raise UserError(
            f"label.safety_labeller {spec!r} returned {labels!r} for prompt {i}: it must return, "
            f"per prompt, {{'safe': [{k} bools], 'safer': [the {k} indices, safest first]}} "
            f"({type(err).__name__}: {err})"
        ) from None
    if len(safe) != k:
        raise UserError(
            f"label.safety_labeller {spec!r} flagged {len(safe)} responses of prompt {i}; it "
            f"has {k}"
        )
    rank = {j: r for r, j in enumerate(order)}
    safety_rank = {j: r for r, j in enumerate(safer)}
    rows = []
    for a in range(k):
        for b in range(a + 1, k):
            rows.append(
                {
                    "prompt": prompt,
                    "response_0": group[a],
                    "response_1": group[b],
                    "better_response_id": 0 if rank[a] < rank[b] else 1,
                    "safer_response_id": 0 if safety_rank[a] < safety_rank[b] else 1,
                    "is_response_0_safe": safe[a],
                    "is_response_1_safe": safe[b],
                }
            )
    return rows


def prepare_label(ctx: Context) -> Plan:
    from rlhf_jax import rollout
    from rlhf_jax.data import toy

    st = ctx.section
    policy_dir = ctx.model_dir(st.policy, "label.policy", "sft")
    model = ctx.load_model(policy_dir)
    tokenizer = ctx.load_tokenizer(policy_dir, model)
    judge = labeller = None
    if st.labeller == "judge":  # RLAIF: an LM judge ranks the samples (rlhf_jax.judge)
        from rlhf_jax.judge import load_judge

        judge = load_judge(
            st.judge,
            mesh=ctx.mesh,
            preset=ctx.cfg.parallel.preset,
            key="label.judge.model",
            load_model=ctx.load_model,
        )
    else:
        labeller = _labeller(st.labeller)
    safety_labeller = _labeller(st.safety_labeller) if st.output == "safety" else None
    sets = [
        ("train", ctx.dataset(st.prompts_file, "label.prompts_file", tokenizer, st.data, model))
    ]
    if st.eval_prompts_file:
        key = "label.eval_prompts_file"
        sets.append(("eval", ctx.dataset(st.eval_prompts_file, key, tokenizer, st.data, model)))
    k = st.num_completions
    stop = stop_tokens(tokenizer, st.stop_tokens, at_eos=st.stop_at_eos)

    def finish(state, result):
        info = {}
        for i, (name, ds) in enumerate(sets):
            pt, pm = ds.arrays["prompt_tokens"], ds.arrays["prompt_mask"]
            seed = ctx.seed + 1 + i
            tokens, mask = sample_responses(
                model.graphdef,
                model.params,
                pt,
                pm,
                jax.random.PRNGKey(seed),
                n=k,
                max_new_tokens=st.max_new_tokens,
                sampling=rollout.SamplingConfig(temperature=st.temperature),
                stop=stop,
                pad_token_id=pad_id(tokenizer),
                chunk=st.chunk,
            )
            prompts = decode(tokenizer, pt, pm, special=False)
            responses = decode(tokenizer, tokens, mask, special=True)
            groups = [responses[j * k : (j + 1) * k] for j in range(len(prompts))]
            prefs = None
            if judge is not None:  # prefs[n, i, j]: the judge's P(response i > response j)
                orders, prefs = judge.rank(prompts, groups)
            else:
                orders = labeller(prompts, groups, seed=seed)
            safety = None
            if safety_labeller is not None:
                safety = safety_labeller(prompts, groups, seed=seed + 1000)
            records = []
            for n, (p, g, o) in enumerate(zip(prompts, groups, orders, strict=True)):
                o = _check_order(o, k, st.labeller, n)
                ranked = [g[j] for j in o]
                if safety is not None:
                    records.extend(_safety_rows(p, g, o, safety[n], st.safety_labeller, n))
                elif st.output == "pairs":
                    gap = st.pair_gap
                    ranks = [(0, k - 1)] if gap is None else _gapped_pairs(k, gap)
                    for a, b in ranks:  # equal texts: the loader drops them as degenerate
                        row = {"prompt": p, "chosen": ranked[a], "rejected": ranked[b]}
                        if prefs is not None and st.margin == "probability":
                            row["margin"] = float(prefs[n, o[a], o[b]])
                        records.append(row)
                else:
                    records.append({"prompt": p, "completions": ranked})
            if jax.process_index() == 0:
                toy.write_jsonl(os.path.join(ctx.dir, f"{name}.jsonl"), records)
            info[f"{name}_rows"] = len(records)
            what = f"rankings of {k}"
            if safety is not None or st.output == "pairs":
                what = "safety pairs" if safety is not None else "preference pairs"
            ctx.say(f"[label] {len(records)} {what} -> {ctx.dir}/{name}.jsonl")
        return Outputs(info=info)

    return Plan(finish=finish, tokenizer=tokenizer)


# ------------------------------------------------------------------------------------------
# rm
# ------------------------------------------------------------------------------------------


def _label_file(ctx: Context, value: str | None, name: str, required: bool) -> str | None:
    if value:
        return value
    path = os.path.join(ctx.cfg.run.stage_dir("label"), f"{name}.jsonl")
    if os.path.exists(path) or not required:
        return path if os.path.exists(path) else None
    raise config_lib.ConfigError(
        f"{ctx.stage}.train_file is not set and this run has no labelled comparisons ({path}): "
        f"set {ctx.stage}.train_file or run `rlhf-jax label` with the same run.dir first"
    )


def prepare_rm(ctx: Context) -> Plan:
    from rlhf_jax import models, rollout
    from rlhf_jax.algorithms import reward_model as rm_lib

    st, name = ctx.section, ctx.stage  # rm, or cost (the same stage with the cost loss)
    trainer = st.trainer
    model_dir = ctx.model_dir(st.model, f"{name}.model", "sft")
    rm = ctx.load_model(model_dir, lm_head=False, score_head=True, key=jax.random.PRNGKey(ctx.seed))
    tokenizer = ctx.load_tokenizer(st.tokenizer or model_dir, rm)
    train_file = _label_file(ctx, st.train_file, "train", True)
    train = ctx.dataset(train_file, f"{name}.train_file", tokenizer, st.data, rm)
    batches = ctx.batches(train, trainer.batch_size, f"{name}.trainer.batch_size")
    eval_file = _label_file(ctx, st.eval_file, "eval", False)
    eval_batch = _held_out(
        ctx, eval_file, f"{name}.eval_file", tokenizer, st.data, rm, st.eval_size
    )
    evaluate = rm_lib.make_eval(rm.graphdef, trainer)
    eval_fn = None
    if eval_batch is not None:
        eval_fn = lambda state: evaluate(state.params, eval_batch)  # noqa: E731

    normalize_on = None
    if trainer.normalize and st.normalize_samples > 0:  # samples of the policy the RM starts from
        if st.normalize_prompts_file:
            key = f"{name}.normalize_prompts_file"
            prompt_data = dataclasses.replace(
                st.data, kind="prompt", max_completion_length=0, num_completions=None
            )
            rows = ctx.dataset(st.normalize_prompts_file, key, tokenizer, prompt_data, rm).arrays
        else:
            rows = train.arrays
        idx = np.arange(st.normalize_samples) % len(rows["prompt_tokens"])
        pt, pm = rows["prompt_tokens"][idx], rows["prompt_mask"][idx]
        policy = ctx.load_model(model_dir)
        tokens, mask = sample_responses(
            policy.graphdef,
            policy.params,
            pt,
            pm,
            jax.random.PRNGKey(ctx.seed + 1),
            max_new_tokens=st.data.max_completion_length,
            sampling=rollout.SamplingConfig(temperature=1.0),
            stop=stop_tokens(tokenizer),
            pad_token_id=pad_id(tokenizer),
        )
        del policy
        normalize_on = (np.concatenate([pt, tokens], 1), np.concatenate([pm, mask], 1))

    def make_step(shardings):
        return rm_lib.make_step(
            rm.graphdef,
            trainer,
            mesh=ctx.mesh,
            state_shardings=shardings,
            mode=ctx.cfg.parallel.step,
        )

    def finish(state, result):
        params = state.params
        info: dict[str, float] = {}
        if eval_batch is not None:
            final = jax.device_get(evaluate(params, eval_batch))
            info.update({f"eval_{k}": float(v) for k, v in final.items()})
        if normalize_on is not None:
            score = jax.jit(lambda p, t, m: models.scores(rm.graphdef, p, t, m, read=trainer.read))
            raw = score(params, jnp.asarray(normalize_on[0]), jnp.asarray(normalize_on[1]))
            mu, sigma = rm_lib.score_stats(raw)
            info.update({"norm_mean_before": mu, "norm_std_before": sigma})
            params = rm_lib.normalize_params(
                params,
                raw,
                target_mean=trainer.target_mean,
                target_std=trainer.target_std,
                shift=trainer.loss != "cost",  # a cost model keeps 0 as its boundary
            )
        return Outputs(rm.replace(params=params), tokenizer, info)

    return Plan(
        finish=finish,
        state=rm_lib.init_state(rm.params, trainer),
        make_step=make_step,
        batches=batches,
        loop=trainer.loop,
        key=jax.random.PRNGKey(ctx.seed),
        eval_fn=eval_fn,
        tokenizer=tokenizer,
        save_every=st.save_every,
    )


# ------------------------------------------------------------------------------------------
# ppo
# ------------------------------------------------------------------------------------------


def _policy_params(params):
    """The policy's parameters without a shared critic's value head (the LM layout)."""
    from flax import nnx

    if isinstance(params, nnx.State) and "value_head" in params:
        return nnx.State({k: v for k, v in params.items() if k != "value_head"})
    return params


def check_minibatches(ctx: Context, st, name: str) -> None:
    """The rollout batch of an on-policy stage (PPO, GRPO) splits into its minibatches, and each
    minibatch into its microbatches: ``optim.grad_accum_steps`` of them, on each device of
    ``('data', 'fsdp')`` with ``parallel.step=shard_map`` (each device takes its own rows)."""
    from rlhf_jax import parallel

    t = st.trainer
    rows = st.batch_size * t.num_samples
    if rows % t.num_minibatches:
        raise config_lib.ConfigError(
            f"{name}.trainer.num_minibatches={t.num_minibatches} does not divide the rollout "
            f"batch {name}.batch_size x {name}.trainer.num_samples = {st.batch_size} x "
            f"{t.num_samples} = {rows}: change one of them"
        )
    per = rows // t.num_minibatches
    if per % t.optim.grad_accum_steps:
        raise config_lib.ConfigError(
            f"a {name} minibatch of {per} rows does not split into "
            f"{name}.trainer.optim.grad_accum_steps={t.optim.grad_accum_steps} microbatches"
        )
    if ctx.mesh is not None and ctx.cfg.parallel.step == "shard_map":
        devices = parallel.axis_size(ctx.mesh, parallel.BATCH_AXES)
        if per % (devices * t.optim.grad_accum_steps):
            raise config_lib.ConfigError(
                f"a {name} minibatch of {per} rows does not split over the {devices} devices of "
                f"parallel.mesh data x fsdp (parallel.step=shard_map) into "
                f"{name}.trainer.optim.grad_accum_steps={t.optim.grad_accum_steps} microbatches "
                f"each: change {name}.batch_size, {name}.trainer.num_minibatches or the mesh"
            )


def prepare_ppo(ctx: Context) -> Plan:
    from rlhf_jax import parallel, scoring
    from rlhf_jax.algorithms import ppo
    from rlhf_jax.reward_fn import RewardFunction

    st, name = ctx.section, ctx.stage  # ppo, or safe_ppo (PPO-Lagrangian)
    trainer = st.trainer
    if name == "safe_ppo" and trainer.safety is None:
        raise config_lib.ConfigError(
            "safe_ppo.trainer.safety is null: the safe_ppo stage is PPO-Lagrangian; run "
            "`rlhf-jax ppo` for PPO without a cost constraint"
        )
    check_minibatches(ctx, st, name)
    policy_dir = ctx.model_dir(st.policy, f"{name}.policy", "sft")
    policy = ctx.load_model(policy_dir)
    tokenizer = ctx.load_tokenizer(policy_dir, policy)
    reference = policy
    if st.reference:
        ref_dir = ctx.model_dir(st.reference, f"{name}.reference", None)
        reference = ctx.load_model(ref_dir)
        same_tokenizer(tokenizer, ctx.load_tokenizer(ref_dir, reference), f"{name}.reference")
    if st.stop_at_eos:
        trainer = dataclasses.replace(
            trainer,
            stop_tokens=stop_tokens(tokenizer, trainer.stop_tokens),
            pad_token_id=pad_id(tokenizer, trainer.pad_token_id),
        )
    trainer = dataclasses.replace(trainer, seed=ctx.seed)  # the run seed drives rollouts
    try:
        ppo.check_stop_tokens(trainer)
    except ValueError as err:
        raise config_lib.ConfigError(str(err)) from None
    prompts = ctx.dataset(st.prompts_file, f"{name}.prompts_file", tokenizer, st.data, policy)
    batches = ctx.batches(
        prompts, st.batch_size, f"{name}.batch_size", rename={"index": "prompt_index"}
    )
    reward_fn = reward_model = None
    sources, source_params = (), ()
    if st.rewards:  # reward sources (rlhf_jax.scoring): models, functions, a judge; weighted
        if trainer.reward_fn or st.reward_model:
            raise config_lib.ConfigError(
                f"{name}.rewards replaces {name}.reward_model and {name}.trainer.reward_fn: "
                "set only one of them"
            )
        sources, source_params = scoring.load_sources(
            ctx,
            st.rewards,
            f"{name}.rewards",
            tokenizer,
            prompts,
            special_tokens=st.decode_special_tokens,
        )
        if trainer.critic == "separate" and not any(
            isinstance(src, scoring.RewardModelSource) for src in sources
        ):
            raise config_lib.ConfigError(
                f"{name}.trainer.critic='separate' initialises the critic from a reward model, "
                f"but no source of {name}.rewards is one: set {name}.trainer.critic=shared or add "
                "a 'model:' source"
            )
    elif trainer.reward_fn:
        reward_fn = RewardFunction.load(trainer.reward_fn, tokenizer)
        rows = prompts.take(np.arange(min(4, len(prompts))))
        reward_fn.check_tokens(rows["prompt_tokens"], rows["prompt_mask"])  # before compiling
    else:
        rm_dir = ctx.model_dir(st.reward_model, f"{name}.reward_model", "rm")
        reward_model = ctx.load_model(rm_dir, lm_head=False, score_head=True)
        same_tokenizer(tokenizer, ctx.load_tokenizer(rm_dir, reward_model), f"{name}.reward_model")
    cost_model = None
    if trainer.safety is not None:
        cost_dir = ctx.model_dir(st.cost_model, f"{name}.cost_model", "cost")
        cost_model = ctx.load_model(cost_dir, lm_head=False, score_head=True)
        same_tokenizer(tokenizer, ctx.load_tokenizer(cost_dir, cost_model), f"{name}.cost_model")
    static, params, frozen = ppo.make_models(
        trainer,
        policy,
        reward_model,
        reference=reference,
        reward_fn=reward_fn,
        cost_model=cost_model,
        sources=sources,
        source_params=source_params,
    )
    frozen_shardings = parallel.state_shardings(frozen, ctx.mesh, ctx.cfg.parallel.preset)
    frozen = jax.device_put(frozen, frozen_shardings)
    eval_fn = None
    if st.eval.prompts_file:
        eval_fn = policy_evaluator(ctx, trainer, static, frozen, tokenizer, reward_fn)

    def make_step(shardings):
        return ppo.make_step(
            trainer,
            static,
            frozen,
            mesh=ctx.mesh,
            state_shardings=shardings,
            frozen_shardings=frozen_shardings,
            mode=ctx.cfg.parallel.step,
        )

    def finish(state, result):
        if trainer.lora is None:
            return Outputs(policy.replace(params=_policy_params(state.params["policy"])), tokenizer)
        from rlhf_jax.lora import PeftAdapter

        merged = jax.jit(lambda f, p: ppo.model_params(trainer, static, f, p)["policy"])
        params = _policy_params(merged(frozen, state.params))
        adapter = PeftAdapter(
            state.params["policy"]["adapters"], trainer.lora, policy.config, base_model=policy_dir
        )
        if trainer.lora.modules_to_save:  # the adapters alone are not the trained model
            adapter = None
        return Outputs(policy.replace(params=params), tokenizer, adapter=adapter)

    return Plan(
        finish=finish,
        state=ppo.init_state(trainer, params),
        make_step=make_step,
        batches=batches,
        loop=trainer.loop,
        eval_fn=eval_fn,
        tokenizer=tokenizer,
        save_every=st.save_every,
        explain=_explain(reward_fn, sources),
    )


def _explain(reward_fn, sources):
    """What a failure inside the compiled step was, when a host reward function raised there."""
    from rlhf_jax import scoring

    fns = [reward_fn] if reward_fn is not None else []
    fns += [s.fn for s in sources if isinstance(s, scoring.RewardFunctionSource)]
    if not fns:
        return None
    return lambda: next((e for e in (fn.callback_error() for fn in fns) if e is not None), None)


def policy_evaluator(ctx: Context, trainer, static, frozen, tokenizer, reward_fn=None):
    """The PPO stage's ``eval_fn(state) -> metrics`` on the held-out prompts of ``ppo.eval``.

    Samples ``eval.samples_per_prompt`` responses per prompt from the current policy (fixed key,
    so successive evaluations share the noise) and reports their mean score (``reward``: the
    reward model's, the function's, or the weighted sum of the reward sources'), the KL to the
    reference in nats per response (``kl``: the k1 estimate
    ``sum_t log pi - log pi_ref`` over the response, whose mean over samples of pi estimates
    KL(pi || pi_ref)), the response length and the per-token entropy estimate of the sampled
    tokens (with a cost model, PPO-Lagrangian, also its mean ``cost`` and the share it calls
    ``unsafe``, cost > 0); with ``eval.evaluator`` the mean of each metric it returns and the win
    rate (ties 1/2) against the reference's samples on ``eval.win_rate_metric``. The reference's own
    figures are reported as ``reference/<name>``. ``eval.log_samples`` samples go to
    ``samples.jsonl`` and TensorBoard.
    """
    from rlhf_jax import models, rollout, scoring
    from rlhf_jax.reward_fn import load_reward_fn

    st = ctx.section
    ev = st.eval
    ds = ctx.dataset(ev.prompts_file, f"{ctx.stage}.eval.prompts_file", tokenizer, st.data)
    rows = ds.take(np.arange(min(len(ds), ev.size)))
    pt, pm = rows["prompt_tokens"], rows["prompt_mask"]
    n = ev.samples_per_prompt
    prompts = [p for p in decode(tokenizer, pt, pm, special=False) for _ in range(n)]
    full_pt, full_pm = np.repeat(pt, n, 0), np.repeat(pm, n, 0)
    evaluator = load_reward_fn(ev.evaluator) if ev.evaluator else None
    sampling = rollout.SamplingConfig(
        temperature=trainer.temperature, top_p=trainer.top_p, top_k=trainer.top_k
    )
    start = pt.shape[1]
    key = jax.random.PRNGKey(ctx.seed + 3)
    conv = trainer.conventions
    sources = getattr(static, "reward_sources", ())  # reward sources: their weighted sum

    @functools.partial(jax.jit, static_argnums=0)
    def measure(
        graphdef, policy_params, reference_params, reward_params, cost_params, tokens, mask
    ):
        seq = jnp.concatenate([full_pt, tokens], 1)
        seq_mask = jnp.concatenate([full_pm, mask], 1)
        t = trainer.temperature
        lp = models.token_logprobs(graphdef, policy_params, seq, seq_mask, start=start,
                                   temperature=t)  # fmt: skip
        lr = models.token_logprobs(static.reference, reference_params, seq, seq_mask,
                                   start=start, temperature=t)  # fmt: skip
        m = mask.astype(jnp.float32)
        score = jnp.zeros(tokens.shape[0], jnp.float32)
        if sources:
            rows_ = scoring.Responses(full_pt, full_pm, tokens, mask, seq, seq_mask)
            score, _ = scoring.score(sources, reward_params, rows_)
        elif static.reward is not None:
            score = models.scores(static.reward, reward_params, seq, seq_mask, read=conv.score_read)
        cost = jnp.zeros_like(score)
        if static.cost is not None:
            cost = models.scores(static.cost, cost_params, seq, seq_mask, read=conv.score_read)
        return jnp.sum((lp - lr) * m, -1), -jnp.sum(lp * m), score, cost

    def summarize(graphdef, params):
        tokens, mask = sample_responses(
            graphdef,
            params,
            pt,
            pm,
            key,
            n=n,
            max_new_tokens=trainer.response_length,
            sampling=sampling,
            stop=trainer.stop_tokens,
            pad_token_id=trainer.pad_token_id,
            chunk=len(pt),
        )
        kl, neg_logp, score, cost = jax.device_get(
            measure(graphdef, params, frozen.reference, reward_params, frozen.cost, tokens, mask)
        )
        if reward_fn is not None:
            score = reward_fn(full_pt, full_pm, tokens, mask)
        responses = decode(tokenizer, tokens, mask, special=True)
        length = mask.sum(-1)
        metrics = {
            "reward": float(np.mean(score)),
            "kl": float(np.mean(kl)),
            "length": float(np.mean(length)),
            "entropy": float(neg_logp) / max(float(length.sum()), 1.0),
        }
        if static.cost is not None:  # PPO-Lagrangian: the cost model's view
            metrics["cost"] = float(np.mean(cost))
            metrics["unsafe"] = float(np.mean(cost > 0))
        per = {}
        if evaluator is not None:
            per = {k: np.asarray(v, np.float64) for k, v in evaluator(prompts, responses).items()}
            metrics.update({k: float(np.mean(v)) for k, v in per.items()})
        samples = [
            {"prompt": p, "response": r, "reward": float(s)}
            for p, r, s in zip(prompts, responses, score, strict=True)
        ]
        return metrics, per, samples

    reward_params = tuple(frozen.sources) if sources else frozen.reward
    ref_metrics, ref_per, _ = summarize(static.reference, frozen.reference)
    reference_figures = {f"reference/{k}": v for k, v in ref_metrics.items()}

    lora = getattr(trainer, "lora", None)
    if lora is not None:  # the policy is the base merged with the state's adapters
        from rlhf_jax.algorithms import ppo

        merged = jax.jit(lambda f, p: ppo.model_params(trainer, static, f, p)["policy"])

    def eval_fn(state):
        params = state.params["policy"] if lora is None else merged(frozen, state.params)
        metrics, per, samples = summarize(static.policy, params)
        win = ev.win_rate_metric
        if win and win in per and win in ref_per:
            a, b = per[win], ref_per[win]
            metrics["win_rate"] = float(np.mean((a > b) + 0.5 * (a == b)))
        if ctx.logger is not None and ev.log_samples:
            ctx.logger.log_samples(int(state.step), samples[: ev.log_samples])
        return {**metrics, **reference_figures}

    return eval_fn


register(Stage("sft", "Supervised fine-tuning of a causal LM on demonstrations.", prepare_sft))
register(
    Stage(
        "label",
        "Sample K responses per prompt from a policy and rank them with a labeller function.",
        prepare_label,
    )
)
register(Stage("rm", "Train a reward model from pairwise or K-wise comparisons.", prepare_rm))
register(
    Stage(
        "cost",
        "Train a Safe RLHF cost model on safety rows (safer id and safe/unsafe flags).",
        prepare_rm,
    )
)
register(
    Stage(
        "ppo",
        "PPO against a reward model (or function) with a KL penalty to a frozen reference.",
        prepare_ppo,
    )
)
register(
    Stage(
        "safe_ppo",
        "PPO-Lagrangian (Safe RLHF): reward and cost models, cost held under a threshold.",
        prepare_ppo,
    )
)
register(
    Stage("dpo", "DPO and its loss family on preference pairs, offline or online.", dpo.prepare)
)
register(
    Stage(
        "grpo",
        "Critic-free RL: GRPO, Dr. GRPO, RLOO, REINFORCE++ (n samples per prompt).",
        grpo.prepare,
    )
)
register(Stage("judge", "Judge a file of preference pairs with an LM judge.", prepare_judge))

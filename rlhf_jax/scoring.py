"""Sample and score responses: the rollout half shared by every on-policy trainer.

PPO (:mod:`rlhf_jax.algorithms.ppo`), critic-free policy gradient
(:mod:`rlhf_jax.algorithms.grpo`) and online DPO (:mod:`rlhf_jax.algorithms.dpo`) all start an
iteration the same way, inside their one compiled function::

    keys        iteration_keys(state.key, state.step)     (sample key, permutation key)
    sample      generate(spec, policy, prompts, ...)       n responses per prompt   [N, R]
    rows        Responses.of(prompts, prompt_mask, sampled) prompt + response       [N, P+R]
    reference   reference_logprobs(ref, rows, ...)         log pi_ref per token     [N, R]
    feedback    score(sources, params, rows)                sum_k w_k s_k            [N]

``N = B * n``, the ``n`` samples of one prompt contiguous (:func:`rlhf_jax.rollout.sample`).

**Reward sources.** A score is a weighted sum of one or more *sources* (TRL GRPO's
``reward_funcs`` with ``reward_weights``, ``multi_objective_aggregation='sum_then_normalize'``):

- :class:`RewardModelSource`: a reward model's score head (:func:`rlhf_jax.models.scores`), no
  host round trip;
- :class:`RewardFunctionSource`: a ``module:function`` of strings, called on the host through one
  ``jax.pure_callback`` (:func:`rlhf_jax.reward_fn.callback_scores`).

A source is a frozen object with a ``name``, a ``weight`` and ``__call__(params, rows) -> [N]``;
its parameters (``None`` for a function) travel in the trainers' frozen, non-donated argument, in
the order of the sources. Adding a source (an LM judge, a cost model) is one more such class:
nothing in the trainers changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rlhf_jax import models, rollout
from rlhf_jax.reward_fn import RewardFunction, callback_scores

__all__ = [
    "RewardFunctionSource",
    "RewardModelSource",
    "Responses",
    "SamplingSpec",
    "generate",
    "iteration_keys",
    "reference_logprobs",
    "score",
]


@dataclasses.dataclass(frozen=True)
class SamplingSpec:
    """The static half of sampling (the temperature is an array of the trainer's hparams)."""

    response_length: int  # R: new tokens per response
    num_samples: int = 1  # n: responses per prompt, contiguous rows
    stop_tokens: tuple[int, ...] = ()  # token ids that end a response
    pad_token_id: int = 0  # written after the stop token
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off


def iteration_keys(base_key: jax.Array, step: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(sample_key, permutation_key)`` of iteration ``step``: ``fold_in(base, step)``, split
    by ``fold_in(., 0)`` and ``fold_in(., 1)``; a run repeats exactly, resumed or not."""
    key = jax.random.fold_in(base_key, step)
    return jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)


def generate(
    spec: SamplingSpec,
    graphdef: Any,
    params: Any,
    prompts: jax.Array,
    prompt_mask: jax.Array,
    key: jax.Array,
    temperature: jax.Array,
    prompt_index: jax.Array | None = None,
) -> rollout.Rollout:
    """``spec.num_samples`` responses per prompt from the policy ``(graphdef, params)``.

    Args:
      prompts: [B, P] int32 left-padded; prompt_mask: [B, P]; key: the iteration's sample key;
      temperature: scalar (traceable); prompt_index: [B] global indices (default ``arange(B)``),
        which fix each response's key (:func:`rlhf_jax.rollout.sample`).

    Returns:
      :class:`rlhf_jax.rollout.Rollout` with ``N = B * n`` rows.
    """
    sampling = rollout.SamplingConfig(temperature=temperature, top_p=spec.top_p, top_k=spec.top_k)
    return rollout.sample(
        graphdef,
        params,
        prompts,
        prompt_mask,
        key,
        max_new_tokens=spec.response_length,
        sampling=sampling,
        stop_tokens=spec.stop_tokens,
        n=spec.num_samples,
        prompt_index=prompt_index,
        pad_token_id=spec.pad_token_id,
    )


@flax.struct.dataclass
class Responses:
    """Sampled responses with their prompts, in the layouts the scorers read.

    Attributes:
      prompt_tokens: [N, P] each row's prompt (repeated n times), left-padded; prompt_mask alike.
      response_tokens: [N, R] right-padded; response_mask: [N, R], 1 through the stop token.
      tokens: [N, P+R] prompt + response; mask: [N, P+R].
    """

    prompt_tokens: jax.Array
    prompt_mask: jax.Array
    response_tokens: jax.Array
    response_mask: jax.Array
    tokens: jax.Array
    mask: jax.Array

    @property
    def prompt_length(self) -> int:
        return self.prompt_tokens.shape[1]

    @classmethod
    def of(cls, prompts: jax.Array, prompt_mask: jax.Array, sampled: rollout.Rollout) -> Responses:
        """The rows of a rollout of ``prompts`` ([B, P]; the rollout has ``N = B * n`` rows)."""
        tokens, mask = rollout.full_sequences(prompts, prompt_mask, sampled)  # [N, P+R]
        n = sampled.tokens.shape[0] // prompts.shape[0]
        return cls(
            prompt_tokens=jnp.repeat(prompts, n, 0),
            prompt_mask=jnp.repeat(prompt_mask, n, 0),
            response_tokens=sampled.tokens,
            response_mask=sampled.mask,
            tokens=tokens,
            mask=mask,
        )


def reference_logprobs(
    graphdef: Any, params: Any, rows: Responses, temperature: jax.Array | float = 1.0
) -> jax.Array:
    """[N, R] log-probs of the response tokens under a frozen model (no gradient).

    ``log softmax(logits / temperature)``, aligned with the sampler's learner log-probs.
    """
    logprobs = models.token_logprobs(
        graphdef, params, rows.tokens, rows.mask, start=rows.prompt_length, temperature=temperature
    )
    return lax.stop_gradient(logprobs)


@dataclasses.dataclass(frozen=True, eq=False)
class RewardModelSource:
    """A reward model's score (score head read at ``read``) of prompt + response."""

    graphdef: Any  # reward-model graphdef (score head)
    read: str = "last_nonpad"  # where the score is read (rlhf_jax.models.read_index)
    weight: float = 1.0  # w_k of the weighted sum
    name: str = "reward_model"  # metric name: score/<name>

    def __call__(self, params: Any, rows: Responses) -> jax.Array:
        return models.scores(self.graphdef, params, rows.tokens, rows.mask, read=self.read)


@dataclasses.dataclass(frozen=True, eq=False)
class RewardFunctionSource:
    """A ``module:function`` reward of the decoded strings (one host round trip)."""

    fn: RewardFunction  # the loaded function and its tokenizer
    weight: float = 1.0  # w_k of the weighted sum
    name: str = "reward_fn"  # metric name: score/<name>

    def __call__(self, params: Any, rows: Responses) -> jax.Array:
        del params
        return callback_scores(
            self.fn, rows.prompt_tokens, rows.prompt_mask, rows.response_tokens, rows.response_mask
        )


def score(
    sources: Sequence[Any], params: Sequence[Any], rows: Responses
) -> tuple[jax.Array, Mapping[str, jax.Array]]:
    """``(sum_k w_k s_k, {name_k: s_k})``: [N] float32 scores of the responses, no gradient.

    ``params[k]`` are source ``k``'s parameters (None for a function). One source of weight 1 is
    returned as it is (no multiply), so a single reward model scores exactly as before.
    """
    if len(sources) != len(params):
        raise ValueError(f"{len(sources)} reward sources but {len(params)} parameter entries")
    if not sources:
        raise ValueError("no reward source: give a reward model or a reward function")
    each = {}
    total = None
    for source, p in zip(sources, params, strict=True):
        s = lax.stop_gradient(jnp.asarray(source(p, rows), jnp.float32))
        each[source.name] = s
        term = s if source.weight == 1.0 else source.weight * s
        total = term if total is None else total + term
    return total, each


# ------------------------------------------------------------------------------------------
# Stage helpers (the pipeline's ``prepare`` functions of the on-policy stages)
# ------------------------------------------------------------------------------------------


def parse_source(spec: str, key: str) -> tuple[str, str, float]:
    """``(kind, target, weight)`` of a reward-source spec ``model:<HF dir>[@w]`` or
    ``fn:<module:function>[@w]`` or ``judge:<judge YAML or HF dir>[@w]`` (:mod:`rlhf_jax.judge`;
    ``w`` a number; default 1)."""
    from rlhf_jax.config import ConfigError

    kind, sep, rest = spec.partition(":")
    if not sep or kind not in ("model", "fn", "judge") or not rest:
        raise ConfigError(
            f"{key}: {spec!r} is not a reward source: write 'model:<HF directory>', "
            "'fn:<module:function>' or 'judge:<judge YAML or HF directory>', optionally with "
            "'@<weight>' at the end"
        )
    weight = 1.0
    head, at, tail = rest.rpartition("@")
    if at:
        try:
            weight = float(tail)
        except ValueError:
            raise ConfigError(
                f"{key}: {spec!r}: the weight after '@' must be a number, got {tail!r}"
            ) from None
        rest = head
    return kind, rest, weight


def load_sources(
    ctx: Any,
    specs: Sequence[str],
    key: str,
    tokenizer: Any,
    prompts: Any,
    *,
    special_tokens: bool = False,
    pairwise_judge: bool = False,
) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """``(sources, params)`` from reward-source specs (:func:`parse_source`); ``()`` means this
    run's ``rm/final``. Reward models must share the policy's tokenizer; each function is called
    once on a few prompts (empty responses) before anything compiles, and sees the responses
    decoded with their special tokens (the stop token) when ``special_tokens``. With
    ``pairwise_judge`` (online DPO's labels) the one source may be a pairwise judge."""
    from rlhf_jax.reward_fn import RewardFunction
    from rlhf_jax.stages import same_tokenizer

    parsed = [parse_source(spec, key) for spec in specs] or [("model", "", 1.0)]  # rm/final
    sources, params, names = [], [], set()
    for i, (kind, target, weight) in enumerate(parsed):
        if kind == "model":
            where = f"{key}[{i}]"
            rm_dir = ctx.model_dir(target or None, where, "rm")
            rm = ctx.load_model(rm_dir, lm_head=False, score_head=True)
            same_tokenizer(tokenizer, ctx.load_tokenizer(rm_dir, rm), where)
            name = "reward_model"
            source, p = RewardModelSource(rm.graphdef, weight=weight, name=name), rm.params
        # ---- issue 15 (judge owner): an LM judge's pointwise score, compiled in the step ----
        elif kind == "judge":
            from rlhf_jax import judge

            modes = ("pointwise", "pairwise") if pairwise_judge else ("pointwise",)
            source, p = judge.load_source(ctx, target, weight, tokenizer, f"{key}[{i}]", modes)
            if getattr(source, "pairwise", False) and len(parsed) > 1:
                from rlhf_jax.config import ConfigError

                raise ConfigError(
                    f"{key}[{i}]: a pairwise judge labels the pairs alone; it has no score to "
                    "add to other sources: give it as the only source, or use a pointwise judge"
                )
        # ---- end of the judge source ----
        else:
            fn = RewardFunction.load(target, tokenizer, skip_special_tokens=not special_tokens)
            pt, pm = prompts.arrays["prompt_tokens"][:4], prompts.arrays["prompt_mask"][:4]
            eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
            rt = np.full((len(pt), 1), eos, np.int32)
            fn(pt, pm, rt, np.ones_like(rt))
            name = target.rpartition(":")[2] or "reward_fn"
            source, p = RewardFunctionSource(fn, weight=weight, name=name), None
        if source.name in names:
            source = dataclasses.replace(source, name=f"{source.name}_{i}")
        names.add(source.name)
        sources.append(source)
        params.append(p)
    return tuple(sources), tuple(params)


class _View:
    """A stage context seen through another section (for :func:`sampled_evaluator`)."""

    def __init__(self, ctx: Any, section: Any):
        self._ctx, self.section = ctx, section

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)


def sampled_evaluator(
    ctx: Any,
    eval_cfg: Any,
    prompt_length: int,
    policy: Any,
    reference: Any,
    sources: Sequence[Any],
    source_params: Sequence[Any],
    tokenizer: Any,
    *,
    temperature: float,
    response_length: int,
    stop: Sequence[int],
    top_k: int = 0,
    top_p: float = 1.0,
) -> Any:
    """``eval_fn(state)`` of a policy-only state (``state.params`` the policy's parameters): the
    PPO stage's held-out evaluation (:func:`rlhf_jax.stages.policy_evaluator`: reward, KL to the
    reference, length, entropy, evaluator metrics, win rate) on the prompts of ``eval_cfg`` (a
    ``pipeline.EvalConfig``). Its ``reward`` is the weighted sum of ``sources``, the training
    reward (0 without a source).
    """
    import types

    from rlhf_jax import presets
    from rlhf_jax.data.formats import DataConfig
    from rlhf_jax.stages import policy_evaluator

    section = types.SimpleNamespace(
        eval=eval_cfg, data=DataConfig(kind="prompt", max_prompt_length=prompt_length)
    )
    trainer = types.SimpleNamespace(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        response_length=response_length,
        stop_tokens=tuple(stop),
        pad_token_id=int(tokenizer.pad_token_id or 0),
        conventions=presets.DEFAULT,
    )
    static = types.SimpleNamespace(
        policy=policy.graphdef,
        reference=reference.graphdef,
        reward=None,
        cost=None,
        reward_sources=tuple(sources),
    )
    frozen = types.SimpleNamespace(
        reference=reference.params, reward=None, cost=None, sources=tuple(source_params)
    )
    reward_fn = None
    inner = policy_evaluator(_View(ctx, section), trainer, static, frozen, tokenizer, reward_fn)

    def eval_fn(state):
        return inner(types.SimpleNamespace(params={"policy": state.params}, step=state.step))

    return eval_fn

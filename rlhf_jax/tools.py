"""Using trained models: sample a policy on a prompts file, score responses, compare two policies.

``rlhf-jax generate`` and ``rlhf-jax evaluate`` call these. A model argument is anything
:func:`rlhf_jax.pipeline.find_model` accepts: a Hugging Face directory, a stage directory of a run
(its ``final/``) or a run directory (its latest policy).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from rlhf_jax import config as config_lib
from rlhf_jax import pipeline
from rlhf_jax.data.formats import DataConfig
from rlhf_jax.errors import first_line
from rlhf_jax.stats import Estimate, win_rate

__all__ = [
    "Generation",
    "compare",
    "generate",
    "load_responses",
    "save_rows",
    "save_scored",
    "score",
]


@dataclasses.dataclass(frozen=True)
class Generation:
    """Sampled responses: one row per (prompt, sample), samples of a prompt contiguous."""

    prompts: list[str]
    responses: list[str]
    prompt_tokens: np.ndarray  # [N, P]
    prompt_mask: np.ndarray  # [N, P]
    tokens: np.ndarray  # [N, R]
    mask: np.ndarray  # [N, R]
    index: np.ndarray  # [N] row of the prompts file
    sample: np.ndarray  # [N] sample number of that prompt

    def rows(self) -> list[dict[str, Any]]:
        return [
            {"index": int(i), "sample": int(s), "prompt": p, "response": r}
            for i, s, p, r in zip(
                self.index, self.sample, self.prompts, self.responses, strict=True
            )
        ]


def _model(path: str, key: str, **heads):
    from rlhf_jax import models

    model_dir = pipeline.find_model(path, key)
    model = models.from_pretrained(model_dir, **heads)
    try:
        tokenizer = models.load_tokenizer(model_dir, config=model.config)
    except (OSError, ValueError) as err:
        raise config_lib.ConfigError(
            f"{key}={path!r}: no usable tokenizer in {model_dir} ({first_line(err)})"
        ) from None
    return model, tokenizer


def generate(
    model: str,
    prompts_file: str,
    *,
    n: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_prompt_length: int = 128,
    seed: int = 0,
    limit: int | None = None,
    chunk: int = 64,
) -> Generation:
    """``n`` samples of ``model`` for each prompt of ``prompts_file`` (JSONL/JSON/Parquet rows
    ``{prompt}`` or ``{messages}``), stopping at the tokenizer's EOS. Sample ``i`` of prompt row
    ``g`` draws from the (seed, g, i) stream, whatever ``chunk`` and ``limit``."""
    from rlhf_jax import rollout
    from rlhf_jax.data import formats

    if n < 1 or max_new_tokens < 1 or not temperature > 0:
        raise config_lib.ConfigError("generate: n and max_new_tokens must be >= 1, temperature > 0")
    policy, tokenizer = _model(model, "model")
    if not os.path.exists(prompts_file):
        raise config_lib.ConfigError(f"prompts file {prompts_file!r}: no such file")
    data = DataConfig(kind="prompt", max_prompt_length=max_prompt_length)
    ds = formats.load_dataset(prompts_file, tokenizer, data)
    rows = ds.take(np.arange(len(ds) if limit is None else min(limit, len(ds))))
    width = max(int(rows["prompt_mask"].sum(1).max()), 1)  # the longest prompt, not the limit
    pt, pm = rows["prompt_tokens"][:, -width:], rows["prompt_mask"][:, -width:]
    limit_pos = policy.config.max_position_embeddings
    if policy.config.arch == "gpt2" and width + max_new_tokens > limit_pos:
        raise config_lib.ConfigError(
            f"generate: prompts of up to {width} tokens + max_new_tokens {max_new_tokens} exceed "
            f"the {limit_pos} learned positions of {model}: lower --max-new-tokens"
        )
    tokens, mask = pipeline.sample_responses(
        policy.graphdef,
        policy.params,
        pt,
        pm,
        jax.random.PRNGKey(seed),
        n=n,
        max_new_tokens=max_new_tokens,
        sampling=rollout.SamplingConfig(temperature=temperature, top_p=top_p, top_k=top_k),
        stop=pipeline.stop_tokens(tokenizer),
        pad_token_id=pipeline.pad_id(tokenizer),
        chunk=chunk,
    )
    prompts = pipeline.decode(tokenizer, pt, pm, special=False)
    return Generation(
        prompts=[p for p in prompts for _ in range(n)],
        responses=pipeline.decode(tokenizer, tokens, mask, special=True),
        prompt_tokens=np.repeat(pt, n, 0),
        prompt_mask=np.repeat(pm, n, 0),
        tokens=tokens,
        mask=mask,
        index=np.repeat(rows["index"], n),
        sample=np.tile(np.arange(n), len(pt)),
    )


def _reward_model_path(path: str) -> str:
    """A run directory's reward model (``<run>/rm``), or ``path`` itself."""
    return os.path.join(path, "rm") if os.path.isdir(os.path.join(path, "rm")) else path


def load_responses(
    path: str,
    tokenizer_from: str,
    *,
    max_prompt_length: int = 128,
    max_response_length: int = 128,
) -> Generation:
    """A file of ``{prompt, response}`` rows (what ``rlhf-jax generate`` writes) as a
    :class:`Generation`, tokenized with the tokenizer of the model ``tokenizer_from``."""
    from rlhf_jax import models
    from rlhf_jax.data import formats

    model_dir = pipeline.find_model(_reward_model_path(tokenizer_from), "reward_model")
    tokenizer = models.load_tokenizer(model_dir)
    rows = []
    for unit, number, row in formats.read_rows(path):
        if not isinstance(row, dict) or not {"prompt", "response"} <= set(row):
            raise formats.DataError(
                path, "needs fields 'prompt' and 'response'", row=number, unit=unit
            )
        rows.append({"prompt": row["prompt"], "completion": row["response"]})
    data = DataConfig(
        kind="completion",
        max_prompt_length=max_prompt_length,
        max_completion_length=max_response_length,
        overlong="error",
        append_eos=False,
    )
    ds = formats.load_dataset(rows, tokenizer, data)
    a = ds.arrays
    n = len(ds)
    return Generation(
        prompts=[r["prompt"] for r in rows],
        responses=[r["completion"] for r in rows],
        prompt_tokens=a["prompt_tokens"],
        prompt_mask=a["prompt_mask"],
        tokens=a["completion_tokens"],
        mask=a["completion_mask"],
        index=np.arange(n),
        sample=np.zeros(n, np.int64),
    )


def score(
    generation: Generation,
    *,
    reward_model: str | None = None,
    function: str | None = None,
    chunk: int = 64,
) -> np.ndarray:
    """Scores ``[N]`` of a :class:`Generation`'s responses: a reward model's (a
    ``*ForSequenceClassification`` directory, or a run's ``rm``) or a ``module:function``'s
    (``(prompts, responses) -> scores``, e.g. ``rlhf_jax.data.toy:gold_reward``)."""
    if (reward_model is None) == (function is None):
        raise config_lib.ConfigError("evaluate: give exactly one of --reward-model and --function")
    if function is not None:
        from rlhf_jax.reward_fn import check_scores, load_reward_fn

        fn = load_reward_fn(function)
        return check_scores(fn(generation.prompts, generation.responses), len(generation.prompts))
    import jax.numpy as jnp

    from rlhf_jax import models

    rm, _ = _model(_reward_model_path(reward_model), "reward_model", lm_head=False, score_head=True)
    seq = np.concatenate([generation.prompt_tokens, generation.tokens], 1)
    seq_mask = np.concatenate([generation.prompt_mask, generation.mask], 1)
    fn = jax.jit(lambda p, t, m: models.scores(rm.graphdef, p, t, m))
    out = [
        np.asarray(
            fn(rm.params, jnp.asarray(seq[i : i + chunk]), jnp.asarray(seq_mask[i : i + chunk]))
        )
        for i in range(0, len(seq), chunk)
    ]
    return np.concatenate(out).astype(np.float64)


def compare(a: Generation, b: Generation, scores_a, scores_b) -> Estimate:
    """The win rate of ``a`` over ``b`` on the same prompts and samples (ties count 1/2)."""
    if a.prompts != b.prompts:
        raise config_lib.ConfigError("compare: the two generations answer different prompts")
    return win_rate(scores_a, scores_b)


def save_rows(path: str, rows: Sequence[dict]) -> str:
    """Write ``rows`` as JSON Lines, atomically."""
    from rlhf_jax.data import toy

    return toy.write_jsonl(path, rows)


def save_scored(path: str, generation: Generation, scores: np.ndarray, name: str = "score") -> str:
    """The generation's rows with their scores, as JSON Lines."""
    rows = [dict(r, **{name: float(s)}) for r, s in zip(generation.rows(), scores, strict=True)]
    return save_rows(path, rows)

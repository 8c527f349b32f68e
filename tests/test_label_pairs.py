"""The label stage's preference pairs: the best and the worst response per prompt (default), or
every pair of the ranking whose ranks differ by at least ``label.pair_gap``."""

import json
import textwrap

import pytest

from rlhf_jax import models, parallel, pipeline
from rlhf_jax.data import toy
from rlhf_jax.data.formats import DataConfig
from rlhf_jax.quickstart import policy_config

PROMPTS = ["a dog is", "the car looks", "an apple seems"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("label_pairs")
    policy_dir = str(tmp / "policy")
    tok = toy.load_tokenizer(toy.build_tokenizer(policy_dir))
    task = toy.ToyTask(hidden_size=16, num_layers=1, num_heads=2)
    models.save_pretrained(models.init_model(policy_config(task, tok), 0), policy_dir)
    prompts = toy.write_jsonl(tmp / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    # a deterministic labeller: longer responses first, ties by text
    (tmp / "by_length.py").write_text(
        textwrap.dedent(
            """
            def rank(prompts, groups, *, seed):
                return [sorted(range(len(g)), key=lambda i: (-len(g[i]), g[i])) for g in groups]
            """
        )
    )
    return tmp, policy_dir, prompts


def _label(inputs, run, **label):
    tmp, policy_dir, prompts = inputs
    cfg = pipeline.ExperimentConfig(
        run=pipeline.RunConfig(dir=str(tmp / run), tensorboard=False, progress=False),
        parallel=parallel.ParallelConfig(mesh=parallel.MeshConfig(data=1)),
        label=pipeline.LabelStage(
            policy=policy_dir,
            prompts_file=prompts,
            num_completions=4,
            labeller=f"{tmp / 'by_length.py'}:rank",
            output="pairs",
            data=DataConfig(kind="prompt", max_prompt_length=4),
            max_new_tokens=6,
            temperature=2.0,  # varied lengths from the untrained model
            **label,
        ),
    )
    pipeline.run_stage(cfg, "label", verbose=False)
    with open(tmp / run / "label" / "train.jsonl") as f:
        return [json.loads(line) for line in f]


def _key(text):
    return (-len(text), text)


def test_default_is_the_best_and_the_worst(inputs):
    rows = _label(inputs, "best_worst")
    assert [r["prompt"] for r in rows] == PROMPTS
    assert all(_key(r["chosen"]) <= _key(r["rejected"]) for r in rows)


def test_pair_gap_writes_every_pair_ranked_that_far_apart(inputs):
    rows = _label(inputs, "gap2", pair_gap=2)
    # ranks (0, 2), (0, 3), (1, 3) of each ranking of 4, in that order
    assert [r["prompt"] for r in rows] == [p for p in PROMPTS for _ in range(3)]
    for i in range(len(PROMPTS)):
        first, second, third = rows[3 * i : 3 * i + 3]
        assert first["chosen"] == second["chosen"]  # rank 0 twice
        assert second["rejected"] == third["rejected"]  # rank 3 twice
        for r in (first, second, third):
            assert _key(r["chosen"]) <= _key(r["rejected"])
    with pytest.raises(ValueError, match="pair_gap=4"):
        pipeline.LabelStage(num_completions=4, pair_gap=4)

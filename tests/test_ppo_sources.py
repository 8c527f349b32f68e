"""PPO's reward sources through the pipeline: ``ppo.rewards`` (a reward model and a
``module:function`` reward, weighted) instead of one reward model; the evaluation's reward is the
same weighted sum; mixing ``ppo.rewards`` with ``ppo.reward_model`` is one line of error."""

import os

import jax
import numpy as np
import pytest

from rlhf_jax import config as C
from rlhf_jax import models, pipeline
from rlhf_jax.cli import main
from rlhf_jax.logging import read_metrics


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny SFT model of the toy task and a fresh reward model as this run's rm/final."""
    from rlhf_jax import quickstart
    from rlhf_jax.algorithms import reward_model as rm_lib
    from rlhf_jax.data import toy

    out = str(tmp_path_factory.mktemp("sources"))
    quickstart.write_base(
        os.path.join(out, "base"), toy.ToyTask(hidden_size=16, num_layers=1, num_heads=2)
    )
    toy.write_jsonl(os.path.join(out, "sft.jsonl"), toy.sft_records(64, seed=0))
    toy.write_jsonl(os.path.join(out, "prompts.jsonl"), [{"prompt": p} for p in toy.all_prompts()])
    cfg = _config(out, "ppo.rewards=[]")
    sft = pipeline.run_stage(cfg, "sft", devices=jax.devices()[:1], verbose=False)
    rm = rm_lib.init_reward_model(models.from_pretrained(sft.final), jax.random.PRNGKey(1))
    pipeline.save_final(
        os.path.join(out, "run", "rm"), pipeline.Outputs(rm, sft.outputs.tokenizer), {}
    )
    return out


def _config(files, *overrides):
    return C.load_config(
        None,
        [
            f"run.dir={files}/run",
            "run.tensorboard=false",
            "run.progress=false",
            f"sft.model={files}/base",
            f"sft.train_file={files}/sft.jsonl",
            "sft.data.max_prompt_length=4",
            "sft.data.max_completion_length=10",
            "sft.trainer.batch_size=8",
            "sft.trainer.loop.max_steps=3",
            "sft.save_every=0",
            f"ppo.prompts_file={files}/prompts.jsonl",
            "ppo.data.max_prompt_length=4",
            "ppo.batch_size=8",
            "ppo.trainer.response_length=6",
            "ppo.trainer.num_epochs=1",
            "ppo.trainer.num_minibatches=1",
            "ppo.trainer.loop.max_steps=2",
            "ppo.trainer.loop.eval_every=2",
            f"ppo.eval.prompts_file={files}/prompts.jsonl",
            "ppo.eval.size=8",
            "ppo.save_every=0",
            *overrides,
        ],
    )


def test_ppo_trains_on_a_weighted_sum_of_sources(run):
    rm_dir = os.path.join(run, "run", "rm", "final")
    cfg = _config(
        run,
        f"ppo.rewards=['model:{rm_dir}@0.5', 'fn:rlhf_jax.data.toy:gold_reward@2']",
        "ppo.decode_special_tokens=true",
    )
    result = pipeline.run_stage(cfg, "ppo", devices=jax.devices()[:1], verbose=False)
    records = read_metrics(os.path.join(run, "run", "ppo"))
    steps = [r for r in records if "score/mean" in r]
    assert len(steps) == 2 and all(np.isfinite(r["loss"]) for r in steps)
    # a 3-step SFT model's samples are malformed (gold about -4) and the fresh reward model
    # scores near 0: 2 x gold + 0.5 x rm is about -8, where the unweighted sum would be about -4
    assert steps[0]["score/mean"] < -6.5, steps[0]["score/mean"]
    assert result.result.evals[-1]["reward"] < -6.5  # the evaluation reads the same sum


def test_sources_and_a_reward_model_together_are_refused(run, capsys):
    code = main(
        [
            "ppo",
            f"run.dir={run}/run",
            f"ppo.prompts_file={run}/prompts.jsonl",
            "ppo.data.max_prompt_length=4",
            "ppo.rewards=['fn:rlhf_jax.data.toy:gold_reward']",
            f"ppo.reward_model={run}/run/rm/final",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert "ppo.rewards replaces ppo.reward_model" in err, err
    code = main(
        [
            "ppo",
            f"run.dir={run}/run",
            f"ppo.prompts_file={run}/prompts.jsonl",
            "ppo.data.max_prompt_length=4",
            "ppo.rewards=['fn:rlhf_jax.data.toy:gold_reward']",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "critic='separate' initialises the critic" in err, err

"""The default pipeline on the toy task, shrunk: sft -> label -> rm -> ppo -> report, through the
same stages as the command; PPO's reward rises, the run directory is an ordinary one, and the
trained models are usable by `generate`, `evaluate` and `export`."""

import dataclasses
import json
import os

import numpy as np
import pytest

from rlhf_jax import quickstart
from rlhf_jax.cli import main
from rlhf_jax.data.toy import ToyTask
from rlhf_jax.logging import read_metrics
from rlhf_jax.optim import OptimConfig
from rlhf_jax.train import LoopConfig


def _tiny(run_dir):
    cfg = quickstart.default_config()
    r = dataclasses.replace
    return r(
        cfg,
        run=r(cfg.run, dir=str(run_dir), progress=False),
        toy=ToyTask(
            hidden_size=32,
            num_layers=1,
            num_heads=2,
            sft_examples=1024,
            sft_eval_examples=64,
            rm_prompts=256,
            rm_eval_prompts=64,
        ),
        sft=r(
            cfg.sft,
            eval_size=64,
            trainer=r(
                cfg.sft.trainer,
                optim=OptimConfig(learning_rate=1e-2),
                loop=LoopConfig(max_steps=60, eval_every=60),
            ),
        ),
        label=r(cfg.label, chunk=256),
        rm=r(
            cfg.rm,
            trainer=r(
                cfg.rm.trainer,
                optim=OptimConfig(learning_rate=3e-3),
                loop=LoopConfig(max_steps=40, eval_every=40),
            ),
        ),
        ppo=r(
            cfg.ppo,
            batch_size=16,
            eval=r(cfg.ppo.eval, samples_per_prompt=1),
            trainer=r(
                cfg.ppo.trainer,
                optim=OptimConfig(learning_rate=3e-4, eps=1e-5),
                loop=LoopConfig(max_steps=12, eval_every=6),
            ),
        ),
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cfg = _tiny(tmp_path_factory.mktemp("qs") / "run")
    return cfg, quickstart.run(cfg, verbose=False)


@pytest.mark.slow
def test_tiny_pipeline_reward_rises_and_report_is_written(tiny_run):
    cfg, report = tiny_run
    rewards = [c["reward"] for c in report["ppo_curve"][1:]]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.2, rewards
    for name in ("report.json", "report.md", "ppo_curves.png", "config.yaml"):
        assert os.path.getsize(os.path.join(cfg.run.dir, name)) > 0
    with open(os.path.join(cfg.run.dir, "report.json")) as f:
        saved = json.load(f)
    assert set(saved["after"]) >= {"gold", "reward", "kl", "well_formed"}
    assert 0.0 <= saved["gold_win_rate"] <= 1.0 and len(saved["samples"]) > 0
    assert saved["reward_model"]["eval_accuracy"] > 0.5
    assert saved["before"]["kl"] == 0.0  # the reference against itself
    # the evaluations are in the metrics, at iterations 6 and 12, with the gold figures
    evals = [r for r in read_metrics(os.path.join(cfg.run.dir, "ppo")) if "eval/gold" in r]
    assert [r["step"] for r in evals] == [6, 12]
    assert all(0.0 <= r["eval/win_rate"] <= 1.0 for r in evals)


@pytest.mark.slow
def test_the_run_directory_is_an_ordinary_one(tiny_run, tmp_path, capsys):
    cfg, _ = tiny_run
    run = cfg.run.dir
    assert main(["export", run, str(tmp_path / "out")]) == 0
    for name in ("policy", "reward_model"):
        assert os.path.isfile(tmp_path / "out" / name / "config.json")
        assert os.path.isfile(tmp_path / "out" / name / "tokenizer.json")
    prompts = os.path.join(run, "inputs", "prompts.jsonl")
    gen = str(tmp_path / "gen.jsonl")
    argv = ["generate", run, prompts, gen, "--n", "2", "--max-new-tokens", "10", "--limit", "5"]
    assert main(argv) == 0
    with open(gen) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 10 and [r["sample"] for r in rows[:2]] == [0, 1]
    # score the generated responses with the run's reward model and with the gold function
    capsys.readouterr()
    assert main(["evaluate", gen, "--reward-model", run, "--out", str(tmp_path / "s.jsonl")]) == 0
    assert "score: " in capsys.readouterr().out
    gold = "rlhf_jax.data.toy:gold_reward"
    assert main(["evaluate", gen, "--reward-model", run, "--function", gold]) == 2
    # the PPO policy against the SFT policy, judged by the gold function: a win rate with a CI
    argv = ["evaluate", "--policy-a", os.path.join(run, "ppo"), "--policy-b",
            os.path.join(run, "sft"), "--prompts", prompts, "--function", gold,
            "--max-new-tokens", "10", "--n", "2"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "win rate of A over B: " in out and "95% CI" in out


def test_toy_config_matches_what_the_quickstart_runs():
    from rlhf_jax import config as C

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments", "configs")
    assert C.load_config(os.path.join(path, "toy.yaml")) == quickstart.default_config()

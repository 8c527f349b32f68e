"""The whole default pipeline, shrunk: SFT -> reward model -> PPO -> report; PPO's reward rises."""

import dataclasses
import json
import os

import numpy as np

from rlhf_jax import quickstart
from rlhf_jax.optim import OptimConfig
from rlhf_jax.train import LoopConfig


def test_tiny_pipeline_reward_rises_and_report_is_written(tmp_path):
    base = quickstart.QuickstartConfig()
    cfg = dataclasses.replace(
        base,
        run_dir=str(tmp_path / "qs"),
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        sft_examples=1024,
        sft=dataclasses.replace(
            base.sft,
            optim=OptimConfig(learning_rate=1e-2),
            loop=LoopConfig(max_steps=60, eval_every=60),
        ),
        rm_groups=512,
        rm_eval_groups=64,
        reward_model=dataclasses.replace(
            base.reward_model,
            optim=OptimConfig(learning_rate=3e-3),
            loop=LoopConfig(max_steps=40, eval_every=40),
        ),
        ppo=dataclasses.replace(base.ppo, optim=OptimConfig(learning_rate=3e-4, eps=1e-5)),
        ppo_iterations=12,
        ppo_eval_every=12,
        ppo_prompts=16,
        eval_samples_per_prompt=1,
    )
    report = quickstart.run(cfg, log=False, verbose=False)
    rewards = [c["reward"] for c in report["ppo_curve"]]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.2, rewards
    for name in ("report.json", "report.md", "ppo_curves.png"):
        assert os.path.getsize(os.path.join(cfg.run_dir, name)) > 0
    with open(os.path.join(cfg.run_dir, "report.json")) as f:
        saved = json.load(f)
    assert set(saved["after"]) >= {"gold", "reward", "kl", "well_formed"}
    assert 0.0 <= saved["gold_win_rate"] <= 1.0 and len(saved["samples"]["after"]) > 0
    assert saved["reward_model"]["eval_accuracy"] > 0.5

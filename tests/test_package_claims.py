"""What pyproject.toml's description promises exists: every algorithm it names is a stage."""

import os
import re

from rlhf_jax import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = {  # how the description names an algorithm -> the stage that runs it
    "SFT": "sft",
    "reward models": "rm",
    "PPO": "ppo",
    "DPO": "dpo",
    "GRPO": "grpo",
    "RLOO": "grpo",
    "Safe RLHF": "safe-ppo",
    "RLAIF": "judge",
}


def test_the_description_names_only_what_exists():
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        description = re.search(r'^description = "(.*)"$', f.read(), re.M).group(1)
    named = [name for name in NAMES if name in description]
    assert named, description
    missing = [name for name in named if NAMES[name] not in pipeline.STAGES]
    assert not missing, f"pyproject.toml promises {missing}, which no stage runs"

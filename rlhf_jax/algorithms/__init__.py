"""Trainers: each a config and a compiled pure step, run by the pipeline (rlhf_jax.pipeline).

- :mod:`rlhf_jax.algorithms.sft` — supervised fine-tuning / pretraining (token NLL).
- :mod:`rlhf_jax.algorithms.reward_model` — scalar reward model from pairwise or K-wise comparisons.
- :mod:`rlhf_jax.algorithms.ppo` — PPO with a KL penalty to the frozen reference.
- :mod:`rlhf_jax.algorithms.dpo` — DPO and its loss family, offline and online.
- :mod:`rlhf_jax.algorithms.grpo` — critic-free policy gradient: GRPO, Dr. GRPO, RLOO,
  REINFORCE++.

Each module exposes a frozen ``Config``, ``init_state`` and ``make_step`` (``step(state, batch,
key) -> (state, metrics)``, jitted once with the state donated); the newer ones also their stage
section and ``prepare``. Import the module you need (``from rlhf_jax.algorithms import sft``);
nothing is imported here eagerly.
"""

__all__ = ["dpo", "grpo", "ppo", "reward_model", "sft"]

"""Trainers: each a compiled pure step and a ``run`` entry, sharing ``rlhf_jax.train.run_loop``.

- :mod:`rlhf_jax.algorithms.sft` — supervised fine-tuning / pretraining (token NLL).
- :mod:`rlhf_jax.algorithms.reward_model` — scalar reward model from pairwise or K-wise comparisons.
- :mod:`rlhf_jax.algorithms.ppo` — PPO with a KL penalty to the frozen SFT reference.

Each module exposes a frozen ``Config``, ``init_state``, ``make_step`` (``step(state, batch, key)
-> (state, metrics)``, jitted once with the state donated) and ``run``. Import the module you need
(``from rlhf_jax.algorithms import sft``); nothing is imported here eagerly.
"""

__all__ = ["ppo", "reward_model", "sft"]

"""PPO's whole iteration compiled from abstract shapes: what each device holds is counted."""

import math

import jax

from rlhf_jax import memory, models, parallel
from rlhf_jax.algorithms import ppo

MODEL = models.ModelConfig(
    arch="llama",
    vocab_size=256,
    hidden_size=32,
    num_layers=1,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    intermediate_size=64,
    max_position_embeddings=64,
)


def _bytes(tree):
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_ppo_dry_run_holds_the_state_and_the_frozen_models():
    """Data parallel (replicated): every device holds the policy, the critic and their AdamW
    moments, the reference and the reward model, so the iteration's arguments are at least
    their sum."""
    cfg = ppo.PPOConfig(response_length=4)
    policy = memory.abstract_model(MODEL)[1]
    rm = memory.abstract_model(MODEL, lm_head=False, score_head=True)[1]
    held = 3 * (_bytes(policy) + _bytes(rm)) + _bytes(policy) + _bytes(rm)  # params, mu, nu
    dp = parallel.ParallelConfig(mesh=parallel.MeshConfig(data=8), preset="dp")
    replicated = memory.ppo_dry_run(MODEL, dp, cfg, batch_size=8, prompt_len=8)
    assert replicated.arguments >= held
    assert replicated.temps > 0 and replicated.num_params > 0

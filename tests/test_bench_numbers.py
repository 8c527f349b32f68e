"""Speed changes keep the numbers: the PPO benchmark's iteration, at a reduced size and fixed
seeds, gives the metrics recorded before any of the speed work on the model's layers, to float
tolerance; and each rewritten product equals its plain formulation, values and gradients.

The configuration is `experiments/bench_ppo.py`'s (`bench_config`: separate critic, 4 epochs of
one minibatch, k1 KL with beta 0.05, clip 0.2, AdamW), with a smaller GPT-2 and batch so that it
compiles in seconds. The recorded values came from commit 1d8d94b (before `_dense` flattened its
leading axes), under this suite's settings. To print them anew:

    python -c "import sys; sys.path[:0] = ['tests', '.']; import conftest, test_bench_numbers as t; print(t.run_bench_iterations())"
"""

import argparse
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import models
from rlhf_jax.algorithms import ppo
from rlhf_jax.models import transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# After each of two iterations from fixed seeds: the iteration's scalar metrics, then how far the
# policy's and the critic's parameters have moved, sum |theta - theta_0| (so a change to the
# update shows even where the metrics, measured before the update, cannot).
RECORDED = [
    {
        "advantages/mean": 3.476937493473997e-08,
        "advantages/std": 0.9895285367965698,
        "beta": 0.05000000074505806,
        "entropy/sampled": 6.207187652587891,
        "grad_norm": 5.296224117279053,
        "kl/response": -1.1920928955078125e-07,
        "kl/token": -9.934107758624577e-09,
        "loss": 0.03661533072590828,
        "lr": 9.999999747378752e-06,
        "policy/approx_kl": 0.0004969206056557596,
        "policy/clip_frac": 0.0,
        "policy/ratio": 1.0017715692520142,
        "policy_loss": -0.02412032149732113,
        "response/length": 12.0,
        "response/truncated": 1.0,
        "returns/mean": -0.15984748303890228,
        "reward/response": -0.2553136348724365,
        "score/mean": -0.25531360507011414,
        "score/std": 1.0742398500442505,
        "skipped": 0.0,
        "value/clip_frac": 0.1770833283662796,
        "value/error": 1.1611781120300293,
        "value_loss": 0.6073564887046814,
        "values/mean": 0.14797702431678772,
        "sum|params - start|": 22.504461508050447,
    },
    {
        "advantages/mean": 1.4901161193847656e-08,
        "advantages/std": 0.9895285964012146,
        "beta": 0.05000000074505806,
        "entropy/sampled": 6.1984944343566895,
        "grad_norm": 5.332413673400879,
        "kl/response": -0.0055533647537231445,
        "kl/token": -0.00046278038644231856,
        "loss": 0.025755444541573524,
        "lr": 9.999999747378752e-06,
        "policy/approx_kl": 9.608637628844008e-05,
        "policy/clip_frac": 0.0,
        "policy/ratio": 1.0001126527786255,
        "policy_loss": -0.00999060645699501,
        "response/length": 12.0,
        "response/truncated": 1.0,
        "returns/mean": -0.21296174824237823,
        "reward/response": -0.24510028958320618,
        "score/mean": -0.24537797272205353,
        "score/std": 0.46210983395576477,
        "skipped": 0.0,
        "value/clip_frac": 0.03125,
        "value/error": 0.7112635970115662,
        "value_loss": 0.35746049880981445,
        "values/mean": -0.09486009925603867,
        "sum|params - start|": 33.90094024090964,
    },
]


def _bench_module():
    spec = importlib.util.spec_from_file_location(
        "bench_ppo", os.path.join(ROOT, "experiments", "bench_ppo.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_bench_iterations(iterations: int = 2) -> list[dict[str, float]]:
    bench = _bench_module()
    args = argparse.Namespace(dtype="float32", unroll=True, response_length=12, critic="separate")
    cfg, model_cfg = bench.bench_config(args)
    model_cfg = model_cfg.replace(
        vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, head_dim=16
    )
    sft = models.init_model(model_cfg, jax.random.PRNGKey(0))
    rm = models.init_model(model_cfg, jax.random.PRNGKey(1), lm_head=False, score_head=True)
    static, params, frozen = ppo.make_models(cfg, sft, rm)
    prompts = jax.random.randint(jax.random.PRNGKey(2), (4, 8), 1, 512).astype(jnp.int32)
    mask = jnp.ones_like(prompts)
    index = jnp.arange(4, dtype=jnp.int32)
    iterate = ppo.make_iteration(cfg, static)
    state = ppo.init_state(cfg, params)
    start = [np.asarray(x, np.float64) for x in jax.tree.leaves(state.params)]
    out = []
    for _ in range(iterations):
        state, metrics = iterate(state, frozen, prompts, mask, index)
        row = {k: float(v) for k, v in sorted(metrics.items()) if np.ndim(v) == 0}
        leaves = jax.tree.leaves(state.params)
        row["sum|params - start|"] = float(
            sum(
                np.abs(np.asarray(x, np.float64) - x0).sum()
                for x, x0 in zip(leaves, start, strict=True)
            )
        )
        out.append(row)
    return out


def test_bench_iteration_metrics_are_the_recorded_ones():
    got = run_bench_iterations()
    assert len(got) == len(RECORDED)
    for step, (row, want) in enumerate(zip(got, RECORDED, strict=True)):
        assert set(row) == set(want), (step, sorted(set(row) ^ set(want)))
        for key, value in want.items():
            np.testing.assert_allclose(
                row[key], value, rtol=2e-4, atol=2e-5, err_msg=f"{step} {key}"
            )


def _plain_dense(x, w, dtype):
    """The unflattened product ``[..., D] @ [D, F]`` (what `_dense` computed before)."""
    kernel = w["kernel"].astype(dtype)
    y = jax.lax.dot_general(x.astype(dtype), kernel, (((x.ndim - 1,), (0,)), ((), ())))
    return y + w["bias"].astype(dtype)


def test_dense_matches_the_plain_product_and_its_gradients():
    keys = jax.random.split(jax.random.PRNGKey(3), 4)
    x = jax.random.normal(keys[0], (3, 5, 8))
    w = {"kernel": jax.random.normal(keys[1], (8, 6)), "bias": jax.random.normal(keys[2], (6,))}
    dy = jax.random.normal(keys[3], (3, 5, 6))

    def pullback(fn):
        y, vjp = jax.vjp(lambda x, w: fn(x, w, jnp.float32), x, w)
        return y, vjp(dy)

    y, (dx, dw) = pullback(transformer._dense)
    y0, (dx0, dw0) = pullback(_plain_dense)
    assert y.shape == (3, 5, 6)
    np.testing.assert_allclose(y, y0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dx, dx0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dw["kernel"], dw0["kernel"], rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(dw["bias"], dw0["bias"], rtol=1e-6, atol=1e-5)
    # and against numpy: dW = sum over (b, t) of x^T dy
    want = np.einsum("btd,btf->df", np.asarray(x, np.float64), np.asarray(dy, np.float64))
    np.testing.assert_allclose(dw["kernel"], want, rtol=1e-5, atol=1e-5)

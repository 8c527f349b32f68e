"""8 toy PPO runs in one program (a sweep) against the same 8 runs one after another.

The toy task's PPO as the quickstart runs it: its tiny GPT-2 (width 64, 2 layers, 4 heads, the toy
vocabulary), 32 prompts of 4 tokens x 4 samples, 10-token responses, 4 epochs x 4 minibatches, a
separate critic from the reward model. The weights are random: the time does not depend on them.
The 8 runs are 8 seeds x the same hyperparameters except the learning rate, which alternates
between two values (so the runs really differ).

- **one after another**: the stage's compiled step (:func:`rlhf_jax.algorithms.ppo.make_step`)
  called for run 1, then run 2, ... (compiled once, reused by all 8);
- **one program**: the same step vmapped over the 8 stacked states
  (:func:`rlhf_jax.sweep.vmap_step`, what ``sweep:`` runs), one call per iteration for all 8.

Both make ``--iterations`` iterations of each run after one warm-up (compile) iteration, and the
script checks that they give the same numbers (every run's metrics at every iteration, to 1e-4).

A third figure bounds what batching can give: **one run of 8x the prompts** (the step compiled for
``runs x B`` prompts, one set of weights), the same rows, tokens and updates as the 8 runs, in
matmuls 8 times larger. Batched runs cannot beat it (each run keeps its own weights, so its
matmuls stay the size of one run's), so ``one after another / one run of 8x the prompts`` is the
most that a sweep program can gain on this machine. When a single run is compute-bound, that
bound is near 1 and no program shape reaches a large speedup; when per-call overhead dominates
(small models on an accelerator) it is large.

    PYTHONPATH=. python experiments/bench_sweep.py            # 5 iterations
    PYTHONPATH=. python experiments/bench_sweep.py --quick    # 2 iterations

Last line: ``sweep speedup for 8 runs: <x>``.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import models, quickstart
from rlhf_jax.algorithms import ppo
from rlhf_jax.data import toy
from rlhf_jax.optim import OptimConfig
from rlhf_jax.sweep import stack, vmap_step
from rlhf_jax.train import run_slice


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=5, help="timed iterations per run")
    parser.add_argument("--quick", action="store_true", help="2 iterations")
    args = parser.parse_args(argv)
    iterations = 2 if args.quick else args.iterations
    if jax.config.read("jax_disable_most_optimizations"):
        raise SystemExit("benchmarks must not run with jax_disable_most_optimizations")
    task = toy.ToyTask()
    with tempfile.TemporaryDirectory() as d:
        tokenizer = toy.load_tokenizer(toy.build_tokenizer(d))
    model_cfg = quickstart.policy_config(task, tokenizer)
    qs = quickstart.default_config().ppo
    cfg = ppo.PPOConfig(
        response_length=toy.RESPONSE_LENGTH,
        num_samples=qs.trainer.num_samples,
        num_epochs=qs.trainer.num_epochs,
        num_minibatches=qs.trainer.num_minibatches,
        critic="separate",
        kl_coef=qs.trainer.kl_coef,
        temperature=1.0,
        stop_tokens=qs.trainer.stop_tokens,
        optim=OptimConfig(learning_rate=1e-4, eps=1e-3),
    )
    b, p = qs.batch_size, toy.PROMPT_LENGTH
    print(f"devices: {jax.devices()}")
    print(
        f"config: toy GPT-2 d={model_cfg.hidden_size} L={model_cfg.num_layers} "
        f"V={model_cfg.vocab_size}; B={b} x n={cfg.num_samples} P={p} R={cfg.response_length}; "
        f"E={cfg.num_epochs} M={cfg.num_minibatches}; {args.runs} runs, {iterations} iterations"
    )
    sft = models.init_model(model_cfg, jax.random.PRNGKey(0))
    rm = models.init_model(model_cfg, jax.random.PRNGKey(1), lm_head=False, score_head=True)
    static, params, frozen = ppo.make_models(cfg, sft, rm)
    prompts = jax.random.randint(jax.random.PRNGKey(2), (b, p), 3, model_cfg.vocab_size)
    batch = {
        "prompt_tokens": prompts.astype(jnp.int32),
        "prompt_mask": jnp.ones((b, p), jnp.int32),
        "prompt_index": jnp.arange(b, dtype=jnp.int32),
    }
    key = jax.random.PRNGKey(0)
    hps = [
        ppo.PPOHParams.from_config(cfg, seed=k, learning_rate=(1e-4, 3e-4)[k % 2])
        for k in range(args.runs)
    ]
    step = ppo.make_step(cfg, static, frozen)

    # one after another: each run's iterations with the one compiled step (compiled first)
    jax.block_until_ready(step(ppo.init_state(cfg, params, hps[0]), batch, key))
    alone = [[] for _ in hps]
    states = [ppo.init_state(cfg, params, hp) for hp in hps]
    jax.block_until_ready(states)
    t0 = time.perf_counter()
    for k in range(args.runs):
        for _ in range(iterations):
            states[k], metrics = step(states[k], batch, key)
            alone[k].append(jax.device_get(metrics))
    sequential = time.perf_counter() - t0

    # one program: the same step vmapped over the stacked states (compiled first)
    vstep = vmap_step(step)
    stacked_batch = jax.tree.map(lambda x: jnp.stack([x] * args.runs), batch)
    warm = stack([ppo.init_state(cfg, params, hp) for hp in hps])
    jax.block_until_ready(vstep(warm, stacked_batch, key))
    state = stack([ppo.init_state(cfg, params, hp) for hp in hps])
    jax.block_until_ready(state)
    together = []
    t0 = time.perf_counter()
    for _ in range(iterations):
        state, metrics = vstep(state, stacked_batch, key)
        together.append(jax.device_get(metrics))
    vmapped = time.perf_counter() - t0

    # the bound: one run answering all runs' prompts at once (compiled first)
    wide_batch = {
        "prompt_tokens": jnp.concatenate([batch["prompt_tokens"]] * args.runs),
        "prompt_mask": jnp.concatenate([batch["prompt_mask"]] * args.runs),
        "prompt_index": jnp.arange(b * args.runs, dtype=jnp.int32),
    }
    wide = ppo.init_state(cfg, params, hps[0])
    wide, _ = step(wide, wide_batch, key)
    jax.block_until_ready(wide)
    t0 = time.perf_counter()
    for _ in range(iterations):
        wide, metrics = step(wide, wide_batch, key)
    jax.block_until_ready(metrics)
    widened = time.perf_counter() - t0

    worst = 0.0
    for k in range(args.runs):
        for it in range(iterations):
            for name, value in alone[k][it].items():
                a, v = float(np.asarray(together[it][name])[k]), float(value)
                worst = max(worst, abs(a - v) / max(1.0, abs(v)))
    params_gap = max(
        float(jnp.max(jnp.abs(x - y)))
        for k in range(args.runs)
        for x, y in zip(
            jax.tree.leaves(run_slice(state, k).params),
            jax.tree.leaves(states[k].params),
            strict=True,
        )
    )
    same = worst < 1e-4 and params_gap < 1e-4
    print(
        f"same numbers: {same} (largest metric difference {worst:.2e}, parameters {params_gap:.2e})"
    )
    per = iterations * args.runs
    print(
        f"one after another: {sequential:.3f} s ({sequential / per * 1e3:.1f} ms per run-iteration)"
    )
    print(f"one program:       {vmapped:.3f} s ({vmapped / per * 1e3:.1f} ms per run-iteration)")
    print(
        f"one run of {args.runs}x the prompts: {widened:.3f} s "
        f"({widened / per * 1e3:.1f} ms per run-iteration's worth): the most batching "
        f"{args.runs} runs can gain here is {sequential / widened:.2f}x"
    )
    if not same:
        raise SystemExit("the vmapped runs differ from the runs made one by one")
    print(f"sweep speedup for {args.runs} runs: {sequential / vmapped:.2f}")


if __name__ == "__main__":
    main()

"""Seconds per offline DPO step on the PPO benchmark's model shape, with the matmul floor beside it.

Policy and reference are each a GPT-2 (4 layers, 4 heads, width 256, vocabulary 8192); a batch is
16 preference pairs of 64 tokens of prompt + completion (32 + 32 by default: the chosen and the
rejected completion each 32 tokens); sigmoid loss, beta = 0.1, AdamW, the reference log-probs
computed on the fly (``--reference precomputed`` reads them from the batch instead). The weights
and tokens are random: the time does not depend on them.

It times the compiled step (:func:`rlhf_jax.algorithms.dpo.make_step`, the one a run uses) as the
median of ``--repeats`` calls after a warm-up call; "compile" is the first call minus the median.
The **floor** is the step's matmul FLOP (policy forward + backward, 3x the forward; reference
forward; the LM head only on completion positions, as ``token_logprobs`` does) at this machine's
peak float32 GEMM rate (:func:`bench_floor.peak_gflops`, jax and numpy, the better of the two).

    PYTHONPATH=. python experiments/bench_dpo.py            # 5 repeats
    PYTHONPATH=. python experiments/bench_dpo.py --quick    # 2 repeats

Last line: ``dpo seconds per step: <s> (compile <c> s)``; the line before it gives the floor.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import models
from rlhf_jax.algorithms import dpo
from rlhf_jax.optim import OptimConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_floor  # noqa: E402


def model_config(args) -> models.ModelConfig:
    return models.ModelConfig(
        arch="gpt2",
        vocab_size=8192,
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        max_position_embeddings=128,
        dtype=args.dtype,
        scan_unroll=4 if args.unroll else 1,
    )


def matmul_gflop(m: models.ModelConfig, pairs: int, p: int, r: int, *, reference: bool) -> float:
    """Matmul GFLOP of one DPO step: ``2 * pairs`` rows of ``p + r`` tokens; per token and layer
    the qkv, output and MLP projections (24 d^2) and attention (4 T d); the LM head (2 d V) on
    the ``r`` completion positions; the policy 3x (forward + backward), the reference 1x."""
    d, t, rows = m.hidden_size, p + r, 2 * pairs
    layer = 2 * (3 * d * d + d * d + 8 * d * d) + 4 * t * d
    forward = rows * (t * m.num_layers * layer + r * 2 * d * m.vocab_size)
    return (3 + (1 if reference else 0)) * forward / 1e9


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 repeats instead of 5")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per figure")
    parser.add_argument("--pairs", type=int, default=16, help="preference pairs per step")
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--completion-length", type=int, default=32)
    parser.add_argument("--loss-type", default="sigmoid", choices=dpo.LOSS_TYPES)
    parser.add_argument("--reference", default="on_the_fly", choices=dpo.REFERENCE_MODES)
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype"
    )
    parser.add_argument(
        "--unroll",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="unroll the 4-layer scan (ModelConfig.scan_unroll=4; --no-unroll: scan)",
    )
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 5)
    if jax.config.read("jax_disable_most_optimizations"):
        raise SystemExit("benchmarks must not run with jax_disable_most_optimizations")
    m = model_config(args)
    p, r, n = args.prompt_length, args.completion_length, args.pairs
    cfg = dpo.DPOConfig(
        loss_type=args.loss_type,
        reference=args.reference,
        batch_size=n,
        beta=0.1,
        optim=OptimConfig(learning_rate=1e-6),
    )
    runs_reference = cfg.uses_reference and args.reference == "on_the_fly"
    print(f"devices: {jax.devices()}")
    print(
        f"config: GPT-2 L={m.num_layers} H={m.num_heads} d={m.hidden_size} V={m.vocab_size}; "
        f"{n} pairs of P={p} + R={r} tokens; loss={cfg.loss_type}; reference={args.reference}; "
        f"compute dtype={m.dtype}; scan_unroll={m.scan_unroll}"
    )
    policy = models.init_model(m, jax.random.PRNGKey(0))
    reference = models.init_model(m, jax.random.PRNGKey(1))
    rng = np.random.default_rng(2)
    batch = {
        "prompt_tokens": rng.integers(1, m.vocab_size, (n, p)).astype(np.int32),
        "prompt_mask": np.ones((n, p), np.int32),
        "chosen_tokens": rng.integers(1, m.vocab_size, (n, r)).astype(np.int32),
        "chosen_mask": np.ones((n, r), np.int32),
        "rejected_tokens": rng.integers(1, m.vocab_size, (n, r)).astype(np.int32),
        "rejected_mask": np.ones((n, r), np.int32),
    }
    static = dpo.DPOModels(policy.graphdef, reference.graphdef if runs_reference else None)
    frozen = dpo.DPOFrozen(reference=reference.params if runs_reference else None)
    if cfg.uses_reference and not runs_reference:
        full = dpo.DPOModels(policy.graphdef, reference.graphdef)
        batch |= dpo.precompute_reference(full, dpo.DPOFrozen(reference.params), batch, chunk=n)
    batch = jax.tree.map(jnp.asarray, batch)
    step = dpo.make_step(cfg, static, frozen)
    state = dpo.init_state(cfg, policy.params)
    t0 = time.perf_counter()
    state, metrics = step(state, batch, None)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, metrics = step(state, batch, None)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    gflop = matmul_gflop(m, n, p, r, reference=runs_reference)
    peak = bench_floor.peak_gflops(repeats)
    best = max(peak.values())
    print(
        f"last metrics: loss={float(metrics['loss']):.4f} "
        f"rewards/margins={float(metrics['rewards/margins']):.4f} "
        f"skipped={float(metrics['skipped'])}"
    )
    print(
        f"matmul floor: {gflop:.1f} GFLOP at the peak {best:.1f} GFLOP/s "
        f"(jax {peak['jax']:.1f}, numpy {peak['numpy']:.1f}) = {gflop / best:.3f} s; "
        f"this step runs at {gflop / seconds:.1f} GFLOP/s, "
        f"{seconds / (gflop / best):.2f}x the floor"
    )
    print(f"dpo seconds per step: {seconds:.3f} (compile {first - seconds:.1f} s)")


if __name__ == "__main__":
    main()

"""What this machine can do at best: lower bounds for the rollout and PPO benchmarks.

The speed targets of ``bench_rollout.py`` and ``bench_ppo.py`` are ratios and seconds; whether
they can be met depends on how fast this machine multiplies matrices of *their* shapes. This script
measures that, with every library at hand, and turns it into floors that no implementation of the
same arithmetic can beat here:

- **peak**: float32 GEMM rate on large square matrices (jax and numpy), the best any kernel of
  this machine reaches;
- **decode matmuls**: one decode step's matmuls (per layer ``qkv``, ``o``, ``up``, ``down``, with
  distinct weights per layer as in a real model, then the LM head) at the rollout benchmark's
  batch, timed in a loop of steps in jax (one compiled ``fori_loop``), numpy and torch
  (``set_num_threads(2)``); the best of the three, times the new tokens, plus the prefill at the
  peak rate, is the rollout floor (no attention, sampling, cache or any other work counted);
- **PPO**: the matmul GFLOP of one PPO iteration of ``bench_ppo.py`` at the peak rate.

    PYTHONPATH=. python experiments/bench_floor.py
    PYTHONPATH=. python experiments/bench_floor.py --transformers-ms tiny=741 small=9330

``--transformers-ms`` (times from ``bench_rollout.py``'s transformers column) adds the largest
speed-up over transformers that the rollout floor allows.
"""

from __future__ import annotations

import argparse
import statistics
import timeit

import jax
import jax.numpy as jnp
import numpy as np


def median_seconds(fn, repeats: int) -> float:
    """Median wall seconds of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()
    return statistics.median(timeit.repeat(fn, number=1, repeat=repeats))


def peak_gflops(repeats: int) -> dict[str, float]:
    n = 2048
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), np.float32) for _ in range(2))
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    mm = jax.jit(jnp.matmul)
    flop = 2 * n**3
    return {
        "jax": flop / median_seconds(lambda: mm(ja, jb).block_until_ready(), repeats) / 1e9,
        "numpy": flop / median_seconds(lambda: a @ b, repeats) / 1e9,
    }


def decode_shapes(spec: dict) -> list[tuple[int, int]]:
    """``(K, N)`` of each weight one decode step of the GPT-2 ``spec`` (a ``bench_rollout.SIZES``
    entry) multiplies, in order (F = 4 D)."""
    d = spec["n_embd"]
    layer = [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)]
    return layer * spec["n_layer"] + [(d, spec["vocab_size"])]


def decode_matmul_seconds(spec: dict, steps: int, repeats: int) -> dict[str, float]:
    """Seconds per decode step of the matmuls alone, per library (weights distinct per layer)."""
    import torch

    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal(kn, np.float32) * 0.02 for kn in decode_shapes(spec)]
    x0 = rng.standard_normal((spec["batch"], spec["n_embd"]), np.float32)

    # Each matmul's input is the previous output cut or tiled to its K, so that nothing can run
    # ahead; the cut / tile is a few microseconds against a matmul's tens or thousands.
    def fit(y, k, xp):
        if y.shape[1] >= k:
            return y[:, :k]
        return xp.concatenate([y] * (k // y.shape[1]), 1)

    def step_np(x):
        y = x
        for w in weights:
            y = fit(y, w.shape[0], np) @ w
        return y[:, : x.shape[1]] * 1e-3

    jw = [jnp.asarray(w) for w in weights]

    @jax.jit
    def loop_jax(ws, x):
        def step(_, x):
            y = x
            for w in ws:
                y = fit(y, w.shape[0], jnp) @ w
            return y[:, : x.shape[1]] * 1e-3

        return jax.lax.fori_loop(0, steps, step, x)

    tw = [torch.from_numpy(w) for w in weights]

    def step_torch(x):
        y = x
        for w in tw:
            y = fit(y, w.shape[0], torch) @ w
        return y[:, : x.shape[1]] * 1e-3

    def run_np():
        x = x0
        for _ in range(steps):
            x = step_np(x)

    def run_torch():
        x = torch.from_numpy(x0)
        with torch.no_grad():
            for _ in range(steps):
                x = step_torch(x)

    jx = jnp.asarray(x0)
    return {
        "jax": median_seconds(lambda: loop_jax(jw, jx).block_until_ready(), repeats) / steps,
        "numpy": median_seconds(run_np, repeats) / steps,
        "torch": median_seconds(run_torch, repeats) / steps,
    }


def rollout_floor_ms(
    spec: dict, step_seconds: float, peak_gflops: float, prompt: int, new: int
) -> float:
    """``new`` decode steps of ``step_seconds`` plus the prefill of ``prompt`` tokens per row at
    the peak rate."""
    params = sum(k * n for k, n in decode_shapes(spec))
    prefill = 2 * spec["batch"] * prompt * params / 1e9 / peak_gflops
    return (step_seconds * new + prefill) * 1e3


def main(argv=None) -> None:
    from bench_rollout import SIZES, Args

    prompt, new = Args.prompt_len, Args.new_tokens
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per figure (median)")
    parser.add_argument(
        "--transformers-ms",
        nargs="*",
        default=[],
        metavar="SIZE=MS",
        help="transformers' rollout time per size (bench_rollout.py), e.g. tiny=741",
    )
    args = parser.parse_args(argv)
    hf_ms = {}
    for item in args.transformers_ms:
        size, _, ms = item.partition("=")
        if size not in SIZES or not ms:
            parser.error(f"--transformers-ms {item!r}: use SIZE=MS with SIZE in {list(SIZES)}")
        hf_ms[size] = float(ms)
    if jax.config.read("jax_disable_most_optimizations"):
        raise SystemExit("benchmarks must not run with jax_disable_most_optimizations")

    peak = peak_gflops(args.repeats)
    best_peak = max(peak.values())
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
    print(
        "float32 GEMM peak, 2048^3: "
        + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peak.items())
        + f"  (best {best_peak:.0f})"
    )

    print()
    print("rollout floor: one decode step's matmuls (ms per step), then the whole rollout")
    print(
        f"{'size':6s} {'batch':>5s} {'weights MB':>10s} {'jax':>8s} {'numpy':>8s} {'torch':>8s}"
        f" {'best':>8s} {'GB/s':>6s} {'GFLOP/s':>8s} {'floor ms':>9s}  max speed-up"
    )
    for size in args.sizes:
        s = SIZES[size]
        per_step = decode_matmul_seconds(s, steps=16, repeats=args.repeats)
        best = min(per_step.values())
        params = sum(k * n for k, n in decode_shapes(s))
        mb = 4 * params / 1e6
        gflop_step = 2 * s["batch"] * params / 1e9
        floor_ms = rollout_floor_ms(s, best, best_peak, prompt, new)
        ratio = f"{hf_ms[size] / floor_ms:.2f}x" if size in hf_ms else "-"
        print(
            f"{size:6s} {s['batch']:5d} {mb:10.1f} {per_step['jax'] * 1e3:8.3f} "
            f"{per_step['numpy'] * 1e3:8.3f} {per_step['torch'] * 1e3:8.3f} {best * 1e3:8.3f} "
            f"{mb / 1e3 / best:6.1f} {gflop_step / best:8.1f} {floor_ms:9.1f}  {ratio}"
        )

    import bench_ppo

    cfg, model_cfg = bench_ppo.bench_config(
        argparse.Namespace(dtype="float32", critic="separate", response_length=48, unroll=True)
    )
    gflop = bench_ppo.matmul_gflop(cfg, model_cfg, b=16, p=16)
    total = sum(gflop.values())
    print()
    print(
        f"PPO floor (bench_ppo.py configuration): {total:.1f} GFLOP of matmuls "
        + " + ".join(f"{k} {v:.1f}" for k, v in gflop.items())
        + f" at the {best_peak:.0f} GFLOP/s peak = {total / best_peak:.2f} s per iteration"
    )


if __name__ == "__main__":
    main()

"""Does an XLA:CPU flag or the instruction set change the PPO iteration? Single-thread CPU seconds.

The same fused PPO iteration as ``bench_ppo.py`` (its configuration), run in a fresh process per
flag set with ``XLA_FLAGS`` = the set plus one thread (``--xla_cpu_multi_thread_eigen=false
intra_op_parallelism_threads=1``). Each process reports the **CPU seconds** of one iteration (the
least of ``--repeats`` after a warm-up), which other jobs on a shared machine change far less than
wall time, the wall seconds, and ``kl/response`` after those iterations, so a flag that changes the
arithmetic shows. The flag sets run interleaved, ``--rounds`` times.

- ``default``: what jax does out of the box;
- ``avx2``: ``--xla_cpu_max_isa=AVX2``, XLA's own code generation held to AVX2 (what an AVX2 host
  gets from XLA's compiler; library kernels choose their instructions at run time);
- ``no-ynn``: ``--xla_cpu_experimental_ynn_fusion_type=``, dots through Eigen instead of YNNPACK;
- ``xnnpack``: ``--xla_cpu_use_xnnpack=true``.

    PYTHONPATH=. python experiments/bench_xla_flags.py
    PYTHONPATH=. python experiments/bench_xla_flags.py --sets default avx2 --rounds 3

Last line: ``xla flags: <set> <ratio to default> ...`` (CPU-second medians over the rounds).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

SETS = {
    "default": "",
    "avx2": "--xla_cpu_max_isa=AVX2",
    "no-ynn": "--xla_cpu_experimental_ynn_fusion_type=",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
}
ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def one_process(repeats: int) -> None:
    """Runs inside the child: time the fused iteration, print ``cpu wall kl``."""
    import jax
    import jax.numpy as jnp
    from bench_ppo import bench_config

    from rlhf_jax import models
    from rlhf_jax.algorithms import ppo

    ns = argparse.Namespace(dtype="float32", unroll=True, response_length=48, critic="separate")
    cfg, model_cfg = bench_config(ns)
    sft = models.init_model(model_cfg, jax.random.PRNGKey(0))
    rm = models.init_model(model_cfg, jax.random.PRNGKey(1), lm_head=False, score_head=True)
    static, params, frozen = ppo.make_models(cfg, sft, rm)
    prompts = jax.random.randint(jax.random.PRNGKey(2), (16, 16), 3, model_cfg.vocab_size)
    args = (prompts.astype(jnp.int32), jnp.ones((16, 16), jnp.int32))
    iterate = ppo.make_iteration(cfg, static)
    state = ppo.init_state(cfg, params)
    state, metrics = iterate(state, frozen, *args)
    jax.block_until_ready(metrics)
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        state, metrics = iterate(state, frozen, *args)
        jax.block_until_ready(metrics)
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    print(f"{min(cpu):.4f} {min(wall):.4f} {float(metrics['kl/response']):.8f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--rounds", type=int, default=2, help="interleaved processes per set")
    parser.add_argument("--repeats", type=int, default=3, help="timed iterations per process")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return one_process(args.repeats)
    here = os.path.dirname(os.path.abspath(__file__))
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in args.sets}
    for r in range(args.rounds):
        for name in args.sets:
            env = dict(os.environ, XLA_FLAGS=f"{SETS[name]} {ONE_THREAD}".strip())
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (os.path.dirname(here), here, env.get("PYTHONPATH")) if p
            )
            cmd = [sys.executable, __file__, "--child", "--repeats", str(args.repeats)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{name}: {out.stderr[-2000:]}")
            cpu, wall, kl = map(float, out.stdout.split()[-3:])
            results[name].append((cpu, wall, kl))
            print(
                f"round {r} {name:<8} cpu {cpu:.3f} s  wall {wall:.3f} s  kl {kl:.8f}", flush=True
            )
    base = statistics.median(c for c, _, _ in results[args.sets[0]])
    print(f"{'set':<8}  cpu s (median)  vs {args.sets[0]}  same kl as {args.sets[0]}")
    line = []
    for name, rows in results.items():
        cpu = statistics.median(c for c, _, _ in rows)
        same = rows[0][2] == results[args.sets[0]][0][2]
        print(f"{name:<8}  {cpu:14.3f}  {cpu / base:7.3f}  {same}")
        line.append(f"{name} {cpu / base:.3f}")
    print("xla flags: " + " ".join(line))


if __name__ == "__main__":
    main()

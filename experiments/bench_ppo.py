"""Seconds per PPO iteration, with per-phase times, on the configuration the PyTorch stacks ran.

Policy, reference, critic and reward model are each a separate GPT-2 (4 layers, 4 heads, width
256, vocabulary 8192); 16 prompts of 16 tokens; 48-token responses with no stop token; temperature
0.7; 4 PPO epochs of 1 minibatch; k1 KL, beta = 0.05; gamma = 1, lambda = 0.95; clip 0.2; value
clip 0.2; c_vf = 0.1; AdamW. (The critic is initialised from the reward model, ``critic=
"separate"``.) The weights are random: the time does not depend on them.

It times the fused iteration (:func:`rlhf_jax.algorithms.ppo.make_iteration`, the one a run uses)
and, separately, each phase jitted alone: rollout (:func:`ppo.generate`), scoring (reference
log-probs + critic values + reward-model scores + shaping + GAE, :func:`ppo.score`) and the update
(E epochs of PPO, :func:`ppo.update`). The phase sum can differ a little from the fused time
(XLA fuses across phase boundaries in the fused program). Each figure is the median of
``--repeats`` calls after a warm-up call; "compile" is the first call minus the median.
``--dtype bfloat16`` (bf16 compute, float32 parameters) and ``--critic shared`` depart from the
issue's configuration and say so in the header line.

    PYTHONPATH=. python experiments/bench_ppo.py            # full: 5 repeats
    PYTHONPATH=. python experiments/bench_ppo.py --quick    # 2 repeats, for a smoke test
    PYTHONPATH=. python experiments/bench_ppo.py --ab dense --runs 10   # one change, A/B
    PYTHONPATH=. python experiments/bench_ppo.py --trace 5 --runs 3   # trace + lower, 5-run sweep

``--ab CHANGE`` times one speed change by an interleaved A/B in one process: the fused iteration
traced with the formulation before the change (A, kept in this script) and with the library's (B),
then ``--runs`` calls of each, alternating; it prints both medians, ``kl/response`` after the runs
and ``ab <change>: speedup <A/B>``. The changes: ``logprobs`` (the taken token's log-prob as
``z[token] - logsumexp(z)``) and ``dense`` (dense layers flatten their leading axes, so the
kernel gradient is one ``x^T dy`` GEMM).

Last line: ``ppo seconds per iteration: <s> (compile <c> s)``.

**Against TRL, in the same run** (``--against trl``). TRL 1.12.0 is the last release with
``PPOTrainer``; it needs PyTorch, so it runs in its own virtual environment, which this script
starts as a separate process (``experiments/trl_ppo_iteration.py``) once per TRL run::

    python -m venv ~/venvs/trl
    ~/venvs/trl/bin/pip install torch==2.13.0 trl==1.12.0   # CPU torch is enough
    PYTHONPATH=. python experiments/bench_ppo.py --against trl --trl-python ~/venvs/trl/bin/python

(``--trl-python`` defaults to ``~/venvs/trl/bin/python``. The pins are the versions measured:
trl 1.12.0 pulls transformers 5, accelerate and datasets.) Both sides run the configuration above
with random-init models of the same shape (TRL: policy and reference ``GPT2LMHeadModel``, value and
reward ``GPT2ForSequenceClassification``); ``trl_ppo_iteration.py``'s docstring lists TRL's
settings and the work TRL does that this iteration does not. The runs interleave, rlhf-jax first:
run i of rlhf-jax (``--repeats`` timed iterations after its compile), then run i of TRL (a fresh
process: ``--trl-warmup`` dropped iterations, then ``--repeats`` timed), for ``--runs`` rounds.
Each side's figure is the median of all its steady-state iteration times (compile and warm-up
excluded); the lines give each run's median too. Last line: ``ppo speedup vs trl: <x>`` (TRL's
median over rlhf-jax's).

On a machine other jobs share, pass ``--trl-threads 1``: with as many torch threads as cores,
torch's OpenMP workers wait for each other on oversubscribed cores, and TRL's iteration was 3-5x
slower with 2 threads than with 1 on the 2-core development machine under load (29-51 s against
8-9 s), which would inflate the ratio.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

from rlhf_jax import models
from rlhf_jax.algorithms import ppo
from rlhf_jax.optim import OptimConfig


def bench_config(args) -> tuple[ppo.PPOConfig, models.ModelConfig]:
    """The issue's benchmark configuration."""
    model_cfg = models.ModelConfig(
        arch="gpt2",
        vocab_size=8192,
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        max_position_embeddings=128,
        dtype=args.dtype,
        scan_unroll=4 if args.unroll else 1,
    )
    cfg = ppo.PPOConfig(
        response_length=args.response_length,
        num_samples=1,
        num_epochs=4,
        num_minibatches=1,
        critic=args.critic,
        kl_controller="fixed",
        stop_tokens=(),
        kl_coef=0.05,
        gamma=1.0,
        lam=0.95,
        clip_eps=0.2,
        value_clip=0.2,
        vf_coef=0.1,
        temperature=0.7,
        optim=OptimConfig(name="adamw", learning_rate=1e-5),
    )
    return cfg, model_cfg


def matmul_gflop(cfg: ppo.PPOConfig, m: models.ModelConfig, b: int, p: int) -> dict[str, float]:
    """Dense-matmul GFLOP of each phase (2 FLOP per multiply-add; attention scores included).

    Trunk per token: ``2 L (4 D^2 + 2 D F)`` plus attention ``4 L D T_ctx``; LM head per scored
    position: ``2 D V``. Backward = 2 x forward. Separate critic and reward model have no LM head.
    """
    r, t = cfg.response_length, p + cfg.response_length
    n_layer = m.num_layers * (4 * m.hidden_size**2 + 2 * m.hidden_size * m.intermediate_size)
    trunk = lambda tokens, ctx: 2 * tokens * (n_layer + 2 * m.num_layers * m.hidden_size * ctx)  # noqa: E731
    head = lambda positions: 2 * positions * m.hidden_size * m.vocab_size  # noqa: E731
    n = b * cfg.num_samples
    rollout = trunk(b * p, p / 2) + trunk(n * (r - 1), p + r / 2) + head(n * r)
    full = trunk(n * t, t / 2)  # one trunk pass over prompt + response
    policy = full + head(n * r)
    critic = 0 if cfg.critic == "shared" else full
    scoring = policy + critic + full  # reference, critic, reward model
    if cfg.old_logprobs == "recompute":
        scoring += policy
    update = cfg.num_epochs * 3 * (policy + critic)
    return {k: v / 1e9 for k, v in dict(rollout=rollout, scoring=scoring, update=update).items()}


def timed(fn, *args, repeats: int) -> tuple[float, float]:
    """``(first call seconds, median of `repeats` later calls)``; outputs are blocked on."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def _full_log_softmax_logprobs(module, hidden, tokens, start, temperature):
    """Before ``logprobs``: a full ``[B, R, V]`` log-softmax, then the taken token gathered."""
    h = hidden[:, start - 1 : -1]
    lg = module.lm_logits(h) / jnp.asarray(temperature, jnp.float32)
    logp = jax.nn.log_softmax(lg, axis=-1)
    targets = tokens[:, start:].astype(jnp.int32)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def _unflattened_dense(x, w, dtype):
    """Before ``dense``: ``[..., D] @ [D, F]`` as one dot_general over the leading axes."""
    kernel = w["kernel"].astype(dtype)
    y = jax.lax.dot_general(x.astype(dtype), kernel, (((x.ndim - 1,), (0,)), ((), ())))
    if w.get("bias") is not None:
        y = y + w["bias"].astype(dtype)
    return y


# --ab CHANGE: (module, attribute, the formulation before the change, what the change did).
AB_CHANGES = {
    "logprobs": (
        "rlhf_jax.models.apply",
        "_logprobs_from_hidden",
        lambda current: _full_log_softmax_logprobs,
        "logit[token] - logsumexp instead of a full log-softmax and a gather",
    ),
    "dense": (
        "rlhf_jax.models.transformer",
        "_dense",
        lambda current: _unflattened_dense,
        "dense layers flatten their leading axes (the kernel gradient is one x^T dy GEMM)",
    ),
}


def ab_change(change: str, cfg, static, params, frozen, args: tuple, runs: int) -> None:
    """Interleaved A/B of the fused iteration for one change (``AB_CHANGES``): A = the
    formulation before it, B = the library's. Each program is traced under its formulation, then
    run i of A and run i of B alternate; prints both medians (wall and process CPU seconds: the
    CPU time moves less when other tenants share the host), ``kl/response`` after the runs and
    B's speed-up."""
    module_name, attr, before, what = AB_CHANGES[change]
    owner = importlib.import_module(module_name)
    current = getattr(owner, attr)
    progs = {}
    for name, fn in (("A before", before(current)), ("B library", current)):
        setattr(owner, attr, fn)
        try:
            iterate = ppo.make_iteration(cfg, static)
            state = ppo.init_state(cfg, params)
            state, metrics = iterate(state, frozen, *args)  # traces and compiles under `fn`
            jax.block_until_ready(metrics)
        finally:
            setattr(owner, attr, current)
        progs[name] = [iterate, state, metrics]
    times = {name: [] for name in progs}
    cpu = {name: [] for name in progs}
    for _ in range(runs):
        for name, prog in progs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            prog[1], prog[2] = prog[0](prog[1], frozen, *args)
            jax.block_until_ready(prog[2])
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    med = {name: statistics.median(t) for name, t in times.items()}
    med_cpu = {name: statistics.median(t) for name, t in cpu.items()}
    print(f"change: {change}: {what}")
    for name, prog in progs.items():
        runs_s = " ".join(f"{t:.3f}" for t in times[name])
        print(
            f"{name:<10} median {med[name]:.3f} s (CPU {med_cpu[name]:.3f} s)  runs [{runs_s}]  "
            f"kl/response={float(prog[2]['kl/response']):.6f}"
        )
    (a, b), (ca, cb) = med.values(), med_cpu.values()
    print(f"ab {change}: speedup {a / b:.3f} (CPU seconds: {ca / cb:.3f})")


def trace_once(cfg, static, params, frozen, batch: tuple, runs: int) -> None:
    """Trace and lower the PPO step vmapped over ``runs`` runs once (``sweep.vmap_step``, a
    sweep's program); prints one JSON line ``{"trace": s, "lower": s}``."""
    from rlhf_jax import sweep

    state = ppo.init_state(cfg, params)
    stacked = jax.tree.map(lambda a: jnp.stack([a] * runs), state)
    prompts, mask = batch[0], batch[1]
    data = {"prompt_tokens": jnp.stack([prompts] * runs), "prompt_mask": jnp.stack([mask] * runs)}
    fn = jax.jit(sweep.vmap_step(ppo.make_step(cfg, static, frozen)))
    t0 = time.perf_counter()
    traced = fn.trace(stacked, data, jax.random.PRNGKey(0))
    t1 = time.perf_counter()
    traced.lower()
    print(json.dumps({"trace": t1 - t0, "lower": time.perf_counter() - t1}))


def trace_times(args, runs: int) -> None:
    """``--trace RUNS``: :func:`trace_once` in ``--runs`` fresh processes (what a new run pays,
    JAX's own first-use costs included); the medians."""
    rows = []
    for _ in range(args.runs):
        cmd = [sys.executable, __file__, "--trace", str(runs), "--trace-child"]
        cmd += ["--dtype", args.dtype, "--critic", args.critic, "--batch", str(args.batch)]
        cmd += ["--prompt-length", str(args.prompt_length)]
        cmd += ["--response-length", str(args.response_length)]
        cmd += [] if args.unroll else ["--no-unroll"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"trace run failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    trace = statistics.median(r["trace"] for r in rows)
    lower = statistics.median(r["lower"] for r in rows)
    each = " ".join(f"{r['trace']:.2f}/{r['lower']:.2f}" for r in rows)
    print(f"{runs} runs vmapped: trace {trace:.2f} s, lower {lower:.2f} s (each run: {each})")


def trl_run(args, model_cfg: models.ModelConfig, cfg: ppo.PPOConfig, seed: int) -> dict:
    """One TRL run in its own process: ``{"seconds": [steady-state seconds of args.repeats
    iterations], "torch", "trl", "threads"}`` (the helper's JSON line)."""
    helper = pathlib.Path(__file__).with_name("trl_ppo_iteration.py")
    python = os.path.expanduser(args.trl_python)
    cmd = [python, str(helper)]
    cmd += ["--layers", str(model_cfg.num_layers), "--heads", str(model_cfg.num_heads)]
    cmd += ["--width", str(model_cfg.hidden_size), "--vocab", str(model_cfg.vocab_size)]
    cmd += ["--positions", str(model_cfg.max_position_embeddings), "--batch", str(args.batch)]
    cmd += ["--prompt-length", str(args.prompt_length)]
    cmd += ["--response-length", str(cfg.response_length), "--epochs", str(cfg.num_epochs)]
    cmd += ["--minibatches", str(cfg.num_minibatches), "--warmup", str(args.trl_warmup)]
    cmd += ["--iterations", str(args.repeats), "--seed", str(seed)]
    if args.trl_threads:
        cmd += ["--threads", str(args.trl_threads)]
    env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1")
    env.pop("PYTHONPATH", None)  # TRL's environment must not see this checkout
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"TRL run failed ({' '.join(cmd)}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def against_trl(args, cfg, model_cfg, static, params, frozen, batch: tuple) -> None:
    """Interleaved rlhf-jax / TRL runs; both medians and the ratio (see the module docstring)."""
    iterate = ppo.make_iteration(cfg, static)
    state = ppo.init_state(cfg, params)
    t0 = time.perf_counter()
    state, metrics = iterate(state, frozen, *batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    ours: list[list[float]] = []
    theirs: list[list[float]] = []
    for run in range(args.runs):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            state, metrics = iterate(state, frozen, *batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
        ours.append(times)
        print(f"run {run}: rlhf-jax {' '.join(f'{t:.3f}' for t in times)}", flush=True)
        trl = trl_run(args, model_cfg, cfg, seed=run)
        theirs.append(trl["seconds"])
        print(f"run {run}: trl      {' '.join(f'{t:.3f}' for t in theirs[-1])}", flush=True)
    print(
        f"trl {trl['trl']}, torch {trl['torch']}, {trl['threads']} threads; "
        f"jax {jax.__version__}, rlhf-jax first call {compile_s:.1f} s"
    )
    med = {}
    for name, runs in (("rlhf-jax", ours), ("trl", theirs)):
        med[name] = statistics.median([t for r in runs for t in r])
        per_run = " ".join(f"{statistics.median(r):.3f}" for r in runs)
        print(f"{name:<8} median {med[name]:.3f} s per iteration (run medians {per_run})")
    print(f"ppo speedup vs trl: {med['trl'] / med['rlhf-jax']:.2f}")


def profile(iterate, state, args: tuple, top: int = 20) -> None:
    """Print the XLA ops that take the most time in one fused iteration (a profiler trace).

    Each op of the optimized program is named by the JAX operation it came from (the HLO
    ``op_name`` metadata), so the LM head, an attention einsum or a layer-weight copy shows as such.
    """
    import collections
    import glob
    import gzip
    import json
    import re
    import tempfile

    hlo = iterate.lower(state, *args).compile().as_text()
    # control flow (while, conditional, call) is left out: its time is its body's ops, counted
    lines = (
        re.match(r'\s*(?:ROOT )?%([\w.-]+) = (.*?)op_name="([^"]*)"', x) for x in hlo.split("\n")
    )
    control = re.compile(r"\s(while|conditional|call)\(")
    origin = {m.group(1): m.group(3) for m in lines if m and not control.search(m.group(2))}
    state, metrics = iterate(state, *args)
    jax.block_until_ready(metrics)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        state, metrics = iterate(state, *args)
        jax.block_until_ready(metrics)
        jax.profiler.stop_trace()
        (trace,) = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)
        with gzip.open(trace) as f:
            events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    total: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in origin:
            total[origin[e["name"]]] += e["dur"] / 1e6
    print(f"top ops of one fused iteration, seconds (sum of op times {sum(total.values()):.3f}):")
    for name, sec in total.most_common(top):
        print(f"  {sec:7.3f}  {name[-110:]}")
    phases: collections.Counter = collections.Counter()
    for name, sec in total.items():
        phases[_phase_of(name)] += sec
    print("by phase (op times; with 2+ threads, ops that overlap each count in full):")
    for phase, sec in phases.most_common():
        print(f"  {sec:7.3f}  {phase}")


def _phase_of(op_name: str) -> str:
    """The iteration's phase an op belongs to, from its JAX ``op_name``."""
    if "_sample" in op_name:
        return "rollout (sampling loop)"
    if "cond/branch" in op_name:
        return "optimizer (the guarded update)"
    if "transpose(jvp" in op_name:
        return "update: backward"
    if "jvp(" in op_name:
        return "update: forward"
    return "scoring and the rest (reference, critic values, reward model, GAE)"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 repeats instead of 5")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per figure")
    parser.add_argument("--batch", type=int, default=16, help="prompts per iteration")
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--response-length", type=int, default=48)
    parser.add_argument("--no-phases", action="store_true", help="time the fused iteration only")
    parser.add_argument("--profile", action="store_true", help="list the ops that take the time")
    parser.add_argument(
        "--against", choices=("trl",), default=None, help="time TRL's PPOTrainer in the same run"
    )
    parser.add_argument(
        "--trl-python",
        default="~/venvs/trl/bin/python",
        help="python of the environment with torch==2.13.0 and trl==1.12.0 (--against trl)",
    )
    parser.add_argument(
        "--runs", type=int, default=2, help="rounds: --against and --ab (per side), --trace"
    )
    parser.add_argument("--trl-warmup", type=int, default=1, help="TRL iterations dropped per run")
    parser.add_argument("--trl-threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--ab",
        choices=sorted(AB_CHANGES),
        default=None,
        help="only: interleaved A/B of one change in the fused iteration (--runs each)",
    )
    parser.add_argument(
        "--trace",
        type=int,
        default=0,
        metavar="RUNS",
        help="only: seconds to trace and lower the step vmapped over RUNS runs (a sweep's)",
    )
    parser.add_argument("--trace-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype"
    )
    parser.add_argument(
        "--critic", default="separate", choices=("separate", "shared"), help="critic mode"
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
    cfg, model_cfg = bench_config(args)
    print(f"devices: {jax.devices()}")
    print(
        f"config: GPT-2 L={model_cfg.num_layers} H={model_cfg.num_heads} "
        f"d={model_cfg.hidden_size} V={model_cfg.vocab_size}; "
        f"B={args.batch} P={args.prompt_length} "
        f"R={cfg.response_length}; E={cfg.num_epochs} M={cfg.num_minibatches}; "
        f"critic={cfg.critic}; compute dtype={model_cfg.dtype}; "
        f"scan_unroll={model_cfg.scan_unroll}"
    )

    sft = models.init_model(model_cfg, jax.random.PRNGKey(0))
    reward_model = models.init_model(
        model_cfg, jax.random.PRNGKey(1), lm_head=False, score_head=True
    )
    static, params, frozen = ppo.make_models(cfg, sft, reward_model)
    prompts = jax.random.randint(
        jax.random.PRNGKey(2), (args.batch, args.prompt_length), 1, model_cfg.vocab_size
    ).astype(jnp.int32)
    prompt_mask = jnp.ones_like(prompts)
    index = jnp.arange(args.batch, dtype=jnp.int32)
    if args.trace and args.trace_child:
        trace_once(cfg, static, params, frozen, (prompts, prompt_mask), args.trace)
        return
    if args.trace:
        trace_times(args, args.trace)
        return
    if args.ab:
        ab_change(args.ab, cfg, static, params, frozen, (prompts, prompt_mask, index), args.runs)
        return
    if args.against == "trl":
        if args.dtype != "float32" or args.critic != "separate":
            raise SystemExit(
                "--against trl runs the issue's configuration: float32, separate critic"
            )
        args.repeats = repeats
        against_trl(args, cfg, model_cfg, static, params, frozen, (prompts, prompt_mask, index))
        return

    rows = []
    if not args.no_phases:
        state = ppo.init_state(cfg, params)
        gen = jax.jit(lambda s, q, m, i: ppo.generate(cfg, static, s, q, m, i))
        score = jax.jit(lambda s, f, q, m, r: ppo.score(cfg, static, s, f, q, m, r))
        upd = jax.jit(lambda s, e: ppo.update(cfg, static, s, e))  # not donated: reused
        c, t = timed(gen, state, prompts, prompt_mask, index, repeats=repeats)
        rows.append(("rollout", t, c - t))
        sampled = gen(state, prompts, prompt_mask, index)
        c, t = timed(score, state, frozen, prompts, prompt_mask, sampled, repeats=repeats)
        rows.append(("scoring (ref + values + RM + GAE)", t, c - t))
        exp = score(state, frozen, prompts, prompt_mask, sampled)
        c, t = timed(upd, state, exp, repeats=repeats)
        rows.append((f"update ({cfg.num_epochs} epochs x {cfg.num_minibatches})", t, c - t))
        del state, sampled, exp

    iterate = ppo.make_iteration(cfg, static)
    state = ppo.init_state(cfg, params)
    t0 = time.perf_counter()
    state, metrics = iterate(state, frozen, prompts, prompt_mask, index)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, metrics = iterate(state, frozen, prompts, prompt_mask, index)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    fused = statistics.median(times)
    rows.append(("fused iteration", fused, first - fused))

    gflop = matmul_gflop(cfg, model_cfg, args.batch, args.prompt_length)
    gflop["fused"] = sum(gflop.values())
    width = max(len(r[0]) for r in rows)
    print(f"{'phase':<{width}}  seconds  compile   GFLOP  GFLOP/s")
    keys = [k for k in gflop if not args.no_phases or k == "fused"]
    for (name, t, c), key in zip(rows, keys, strict=True):
        print(f"{name:<{width}}  {t:7.3f}  {c:7.1f}  {gflop[key]:6.1f}  {gflop[key] / t:7.1f}")
    if len(rows) > 1:
        print(f"{'sum of phases':<{width}}  {sum(r[1] for r in rows[:-1]):7.3f}")
    print(
        f"last metrics: score/mean={float(metrics['score/mean']):.4f} "
        f"kl/response={float(metrics['kl/response']):.4f} skipped={float(metrics['skipped'])}"
    )
    if args.profile:
        profile(iterate, state, (frozen, prompts, prompt_mask, index))
    print(f"ppo seconds per iteration: {fused:.3f} (compile {first - fused:.1f} s)")


if __name__ == "__main__":
    main()

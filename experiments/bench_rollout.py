"""Rollout throughput: rlhf-jax ``rollout.sample`` against ``transformers`` ``generate`` (PyTorch).

One random GPT-2 checkpoint per size is written with ``transformers``' ``save_pretrained`` into a
temporary directory and loaded into both libraries (``rlhf_jax.models.from_pretrained``), so both
run the same weights. Both sample from the full softmax (temperature 1, no top-k/top-p, i.e.
``do_sample=True, top_k=0``) with a KV cache, and neither stops early (no EOS / stop tokens), so
both generate exactly ``--new-tokens`` tokens per row. Figures are new tokens per second, the
median of ``--runs`` timed runs after one warm-up run; the compile time of the rlhf-jax program is
reported separately (first call minus a steady-state call). Each size also prints the median CPU
time of the process (all threads) per call and the load average, since wall-clock figures on a
shared machine measure the other jobs too.

    python experiments/bench_rollout.py            # tiny and small, 5 timed runs each
    python experiments/bench_rollout.py --quick    # 2 timed runs, 16 new tokens: a smoke run
    python experiments/bench_rollout.py --sizes tiny --profile   # where a decode step's time goes

    # A/B against another revision, interleaved in one process (run i of A, run i of B, ...):
    mkdir -p /tmp/base && git archive REV rlhf_jax | tar -x -C /tmp/base
    python experiments/bench_rollout.py --baseline /tmp/base --runs 10

With ``--floor`` (the default) each size also prints the rollout floor of ``bench_floor.py``: the
matmuls of a decode step alone, at the best rate jax, numpy or torch reach for those shapes here,
times the new tokens, plus the prefill at the peak GEMM rate; transformers' time over that floor
is the largest speed-up any implementation of the same arithmetic could show in this run.

Sizes (the issue's): tiny = GPT-2 with 4 layers, 4 heads, width 256, vocabulary 8192, batch 16;
small = GPT-2 small (12 layers, 12 heads, width 768, vocabulary 50257), batch 8; prompts of 32
tokens. PyTorch runs with ``torch.set_num_threads(--threads)`` (2 by default). The last line is
``rollout speedup vs transformers: tiny=<x> small=<y>``.

This script must not run with ``jax_disable_most_optimizations`` (the test setting).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import statistics
import sys
import tempfile
import time

import bench_floor
import jax
import jax.numpy as jnp
import numpy as np
import tyro

from rlhf_jax import models, rollout

SIZES = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=256, vocab_size=8192, batch=16),
    "small": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, batch=8),
}


@dataclasses.dataclass(frozen=True)
class Args:
    sizes: tuple[str, ...] = ("tiny", "small")  # which of tiny, small
    prompt_len: int = 32  # prompt tokens per row
    new_tokens: int = 64  # new tokens per row (exactly: no early stop)
    runs: int = 5  # timed runs per library and size (the median is reported)
    threads: int = 2  # torch.set_num_threads
    quick: bool = False  # 2 runs and 16 new tokens: checks the script, not the speed
    profile: bool = False  # also list the ops that dominate a decode step (a profiler trace)
    floor: bool = True  # also time the decode matmuls alone (bench_floor.py): the speed-up bound
    seed: int = 0
    # A directory holding another copy of the rlhf_jax package (another revision): its rollout
    # is timed interleaved with this one's (same weights, prompts and process), and the ratio of
    # the medians printed.
    baseline: str | None = None


def make_checkpoint(size: str, directory: str, seed: int) -> None:
    """A random GPT-2 of the given size, saved by transformers (config.json + safetensors)."""
    import torch
    import transformers

    spec = SIZES[size]
    torch.manual_seed(seed)
    last = spec["vocab_size"] - 1  # GPT-2's <|endoftext|> is the last id; never a stop token here
    config = transformers.GPT2Config(
        n_layer=spec["n_layer"],
        n_head=spec["n_head"],
        n_embd=spec["n_embd"],
        vocab_size=spec["vocab_size"],
        n_positions=1024,
        bos_token_id=last,
        eos_token_id=last,
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)


def median_time(fn, runs: int) -> tuple[float, float]:
    """(median wall seconds, median CPU seconds of this process) of ``runs`` calls of ``fn``.

    The CPU time (all threads of the process) is the steadier figure on a loaded machine: wall
    time there measures the other jobs as much as this one.
    """
    walls, cpus = [], []
    for _ in range(runs):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def bench_transformers(path: str, prompts: np.ndarray, args: Args) -> tuple[float, float]:
    """(median wall, median CPU) seconds of one ``generate`` call (after one warm-up call)."""
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.from_numpy(prompts.astype(np.int64))
    kw = dict(
        attention_mask=torch.ones_like(ids),
        do_sample=True,
        top_k=0,
        top_p=1.0,
        temperature=1.0,
        max_new_tokens=args.new_tokens,
        min_new_tokens=0,
        use_cache=True,
        eos_token_id=None,
        pad_token_id=0,
    )
    model.generation_config.eos_token_id = None

    def run():
        with torch.inference_mode():
            out = model.generate(ids, **kw)
        assert out.shape == (ids.shape[0], ids.shape[1] + args.new_tokens), out.shape

    run()  # warm-up
    return median_time(run, args.runs)


def load_baseline(directory: str):
    """``(models, rollout)`` of the rlhf_jax package under ``directory``, imported beside this
    process's own (its modules are swapped out of ``sys.modules`` for the import and back after;
    the functions keep their own module globals)."""

    def ours():
        return {k: v for k, v in sys.modules.items() if k.split(".")[0] == "rlhf_jax"}

    saved = ours()
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, os.path.abspath(directory))
    try:
        base_models = importlib.import_module("rlhf_jax.models")
        base_rollout = importlib.import_module("rlhf_jax.rollout")
    finally:
        sys.path.remove(os.path.abspath(directory))
        for k in ours():
            del sys.modules[k]
        sys.modules.update(saved)
    if not base_rollout.__file__.startswith(os.path.abspath(directory)):
        raise SystemExit(f"--baseline {directory}: imported {base_rollout.__file__} instead")
    return base_models, base_rollout


def ab_jax(path: str, prompts: np.ndarray, args: Args) -> tuple[float, float]:
    """Median wall seconds of one ``sample`` call of (baseline, this revision), runs interleaved."""
    base_models, base_rollout = load_baseline(args.baseline)
    tokens = jnp.asarray(prompts, jnp.int32)
    mask = jnp.ones_like(tokens)
    fns = []
    for mods, roll in ((base_models, base_rollout), (models, rollout)):
        model = mods.from_pretrained(path)

        seeds = iter(range(1, 1 << 30))

        def run(model=model, roll=roll, seeds=seeds):
            out = roll.sample(
                model.graphdef,
                model.params,
                tokens,
                mask,
                next(seeds),
                max_new_tokens=args.new_tokens,
                sampling=roll.SamplingConfig(temperature=1.0),
                stop_tokens=(),
            )
            jax.block_until_ready(out)

        run()  # compile
        fns.append(run)
    times = ([], [])
    for _ in range(args.runs):
        for fn, ts in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def bench_jax(path: str, prompts: np.ndarray, args: Args) -> tuple[float, float, float]:
    """(median wall, median CPU seconds of one ``sample`` call, compile seconds)."""
    model = models.from_pretrained(path)
    tokens = jnp.asarray(prompts, jnp.int32)
    mask = jnp.ones_like(tokens)
    cfg = rollout.SamplingConfig(temperature=1.0)
    seed = [0]

    def run():
        seed[0] += 1
        out = rollout.sample(
            model.graphdef,
            model.params,
            tokens,
            mask,
            seed[0],
            max_new_tokens=args.new_tokens,
            sampling=cfg,
            stop_tokens=(),
        )
        jax.block_until_ready(out)
        assert out.tokens.shape == (tokens.shape[0], args.new_tokens)
        assert int(out.lengths.min()) == args.new_tokens

    t0 = time.perf_counter()
    run()  # compile + run
    first = time.perf_counter() - t0
    sec, cpu = median_time(run, args.runs)
    return sec, cpu, max(first - sec, 0.0)


def profile_rollout(path: str, prompts: np.ndarray, args: Args, top: int = 15) -> None:
    """The XLA ops that take the most time in one ``sample`` call (a profiler trace), per step.

    Each op of the compiled program is named by the JAX operation it came from (``op_name``
    metadata of the optimized HLO), so a cache transpose, a weight copy or the LM head shows up as
    such.
    """
    import collections
    import glob
    import gzip
    import json
    import re

    model = models.from_pretrained(path)
    tokens = jnp.asarray(prompts, jnp.int32)
    mask = jnp.ones_like(tokens)
    cfg = rollout.SamplingConfig()

    @jax.jit
    def run(params, key):
        return rollout.sample(
            model.graphdef,
            params,
            tokens,
            mask,
            key,
            max_new_tokens=args.new_tokens,
            sampling=cfg,
            stop_tokens=(),
        )

    key = jax.random.key(0)
    hlo = run.lower(model.params, key).compile().as_text()
    # Every instruction, named by its JAX operation where the HLO says (op_name), else by its
    # shape and opcode: some ops (e.g. the batched attention dots) carry no op_name.
    origin = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.-]+) = (\S+) ([\w-]+)\(", line)
        if m:
            name = re.search(r'op_name="([^"]*)"', line)
            origin[m.group(1)] = name.group(1) if name else f"{m.group(3)} -> {m.group(2)}"
    jax.block_until_ready(run(model.params, key))
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        jax.block_until_ready(run(model.params, key))
        jax.profiler.stop_trace()
        (trace,) = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)
        with gzip.open(trace) as f:
            events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    total = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e["name"] in origin:
            total[e["name"]] += e["dur"] / 1e3 / args.new_tokens
    print(
        f"    top ops of one sample call, ms per generated token (sum {sum(total.values()):.2f}):"
    )
    for name, ms in total.most_common(top):
        print(f"    {ms:8.3f}  {name:34s} {origin[name][-90:]}")


def main(args: Args) -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.quick:
        args = dataclasses.replace(args, runs=2, new_tokens=16)
    if jax.config.read("jax_disable_most_optimizations"):
        raise SystemExit("benchmarks must not run with jax_disable_most_optimizations")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; {args}")
    speedups = {}
    peak = max(bench_floor.peak_gflops(args.runs).values()) if args.floor else None
    for size in args.sizes:
        b = SIZES[size]["batch"]
        rng = np.random.default_rng(args.seed)
        prompts = rng.integers(0, SIZES[size]["vocab_size"], (b, args.prompt_len))
        new = b * args.new_tokens
        load0 = os.getloadavg()[0]
        with tempfile.TemporaryDirectory() as path:
            make_checkpoint(size, path, args.seed)
            jax_sec, jax_cpu, compile_sec = bench_jax(path, prompts, args)
            hf_sec, hf_cpu = bench_transformers(path, prompts, args)
            if args.baseline:
                base_ab, this_ab = ab_jax(path, prompts, args)
            if args.profile:
                profile_rollout(path, prompts, args)
        floor_ms = None
        if args.floor:
            spec = SIZES[size]
            per_step = bench_floor.decode_matmul_seconds(spec, steps=16, repeats=args.runs)
            floor_ms = bench_floor.rollout_floor_ms(
                spec, min(per_step.values()), peak, args.prompt_len, args.new_tokens
            )
        speedups[size] = hf_sec / jax_sec
        print(
            f"{size:6s} batch {b:3d} prompt {args.prompt_len} new {args.new_tokens}: "
            f"rlhf-jax {new / jax_sec:9.1f} tok/s ({jax_sec * 1e3:8.1f} ms, "
            f"compile {compile_sec:5.1f} s)   transformers {new / hf_sec:9.1f} tok/s "
            f"({hf_sec * 1e3:8.1f} ms)   ratio {speedups[size]:5.2f}x"
        )
        print(
            f"{'':6s} CPU time (all threads): rlhf-jax {jax_cpu * 1e3:.1f} ms, transformers "
            f"{hf_cpu * 1e3:.1f} ms (ratio {hf_cpu / jax_cpu:.2f}x); load average "
            f"{load0:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
        )
        if args.baseline:
            print(
                f"{'':6s} A/B interleaved, {args.runs} runs each: baseline {base_ab * 1e3:.1f} ms, "
                f"this revision {this_ab * 1e3:.1f} ms (this / baseline "
                f"{this_ab / base_ab:.3f})"
            )
        if floor_ms is not None:
            print(
                f"{'':6s} floor (decode matmuls alone, best of jax/numpy/torch; prefill at "
                f"peak): "
                f"{floor_ms:.1f} ms = at most {hf_sec * 1e3 / floor_ms:.2f}x transformers; "
                f"rlhf-jax takes {jax_sec * 1e3 / floor_ms:.2f}x the floor"
            )
    print(
        "rollout speedup vs transformers: "
        + " ".join(f"{size}={ratio:.2f}" for size, ratio in speedups.items())
    )


if __name__ == "__main__":
    main(tyro.cli(Args))

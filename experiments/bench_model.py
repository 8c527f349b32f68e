"""Benchmark a GPT-2-small-sized model (124M) on the host: init, forward, and checkpoint loading.

Prints, for ``rlhf_jax.models``:
  * init time and forward time (compile, then the mean of ``--repeats`` steady-state calls) of
    ``logits`` on a ``[batch, seq]`` batch, and the process peak resident memory;
  * the peak host memory of ``from_pretrained`` on a checkpoint written by ``save_pretrained``,
    measured in a fresh subprocess (peak RSS during the load minus the RSS before it), relative to
    the checkpoint's file size. The loaded parameters themselves live in host memory on CPU, so
    1.0x is the floor.

    python experiments/bench_model.py                 # GPT-2 small, batch 4 x 128 tokens
    python experiments/bench_model.py --batch 8 --seq 256 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

GPT2_SMALL = dict(
    arch="gpt2",
    vocab_size=50257,
    hidden_size=768,
    num_layers=12,
    num_heads=12,
    max_position_embeddings=1024,
)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def load_child(path: str) -> None:
    """Run in a subprocess: print JSON with the RSS before and the peak during from_pretrained."""
    import jax

    from rlhf_jax import models

    jax.numpy.zeros(()).block_until_ready()  # backend up before the baseline
    before = _rss_kib("VmRSS")
    try:  # reset the high-water mark to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    t0 = time.perf_counter()
    model = models.from_pretrained(path)
    jax.block_until_ready(model.params)
    seconds = time.perf_counter() - t0
    peak = _rss_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"before_kib": before, "peak_kib": peak, "seconds": seconds, "reset": reset}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--load-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load_child:
        load_child(args.load_child)
        return

    import jax
    import numpy as np

    from rlhf_jax import models

    cfg = models.ModelConfig(**GPT2_SMALL, dtype=args.dtype, param_dtype=args.dtype)
    t0 = time.perf_counter()
    model = models.init_model(cfg, jax.random.key(0))
    jax.block_until_ready(model.params)
    init_s = time.perf_counter() - t0
    n_params = sum(x.size for x in jax.tree.leaves(model.params))

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (args.batch, args.seq)).astype(np.int32)
    mask = np.ones_like(tokens)
    fwd = jax.jit(models.logits, static_argnums=0)
    t0 = time.perf_counter()
    fwd(model.graphdef, model.params, tokens, mask).block_until_ready()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        fwd(model.graphdef, model.params, tokens, mask).block_until_ready()
        times.append(time.perf_counter() - t0)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, dtype {args.dtype}")
    print(f"params: {n_params / 1e6:.1f}M; init {init_s:.2f} s")
    print(
        f"forward [{args.batch}, {args.seq}]: compile+first {compile_s:.2f} s, "
        f"steady {np.mean(times) * 1e3:.0f} ms (min {np.min(times) * 1e3:.0f} ms), "
        f"{args.batch * args.seq / np.mean(times):.0f} tokens/s"
    )
    print(f"process peak RSS after init + forward: {peak_mib:.0f} MiB")

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        models.save_pretrained(model, tmp)
        save_s = time.perf_counter() - t0
        size = os.path.getsize(os.path.join(tmp, "model.safetensors"))
        del model
        env = dict(os.environ)  # the child imports rlhf_jax the way this process did
        env["PYTHONPATH"] = os.pathsep.join([*sys.path[1:], env.get("PYTHONPATH", "")])
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--load-child", tmp],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        stats = json.loads(out.stdout.strip().splitlines()[-1])
    extra = (stats["peak_kib"] - stats["before_kib"]) * 1024
    print(f"save_pretrained: {size / 2**20:.0f} MiB in {save_s:.2f} s")
    print(
        f"from_pretrained: {stats['seconds']:.2f} s, peak host memory during the load "
        f"{extra / 2**20:.0f} MiB = {extra / size:.2f}x the file size"
        + ("" if stats["reset"] else " (peak not reset: includes startup)")
    )


if __name__ == "__main__":
    main()

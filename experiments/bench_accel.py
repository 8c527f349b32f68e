"""Accelerator benchmark: train-step MFU, decode against the memory-bandwidth bound, PPO at ~1B.

On a GPU or TPU this prints, for a ~1B-parameter Llama-style model (Llama-3.2-1B's shape:
width 2048, 16 layers, 32 heads / 8 KV heads, MLP 8192, vocabulary 128256) with bfloat16
compute and float32 parameters:

1. **train-step MFU**: the SFT step (:func:`rlhf_jax.algorithms.sft.make_step`: forward,
   backward, AdamW) on ``[batch, seq]`` tokens; model FLOPs per token ``6 N + 12 L D T``
   (N = parameters without the embedding table, PaLM's appendix B counting) over the chip's
   peak dense bf16 FLOP/s;
2. **decode tokens/s against the HBM bound**: :func:`rlhf_jax.rollout.sample` of
   ``--decode-new`` tokens per row; the bound reads every weight (in the compute dtype) and the
   KV cache once per decode step at the chip's HBM bandwidth, plus the prefill at peak FLOP/s;
3. **the PPO iteration** of ``bench_ppo.py``'s configuration (16 prompts of 16 tokens, 48-token
   responses, 4 epochs of 1 minibatch, separate critic) with the ~1B model as policy, reference,
   critic and reward model.

Peak FLOP/s and bandwidth come from a table of chips (``device_kind``); ``--peak-tflops`` and
``--hbm-gbps`` override it. On a chip the table lacks, and on CPU, the peak is the jitted float32
2048^3 matmul rate measured in the same run (``bench_floor.peak_gflops``) and the bound is
omitted.

    python experiments/bench_accel.py            # on an accelerator (minutes: compiles ~1B)
    python experiments/bench_accel.py --smoke    # CPU: a tiny model, one call each: the script
                                                 # runs and prints every figure (not a measure)
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import models, rollout
from rlhf_jax.algorithms import ppo, sft
from rlhf_jax.optim import OptimConfig

# device_kind substring -> (peak dense bf16 TFLOP/s, HBM GB/s), vendor datasheet figures.
CHIPS = {
    "H200": (989.0, 4800.0),
    "H100": (989.0, 3350.0),  # SXM
    "A100": (312.0, 2039.0),  # 80 GB SXM
    "L4": (121.0, 300.0),
    "TPU v6": (918.0, 1640.0),
    "TPU v5p": (459.0, 2765.0),
    "TPU v5 lite": (197.0, 819.0),
    "TPU v5e": (197.0, 819.0),
    "TPU v4": (275.0, 1200.0),
}

ONE_B = dict(
    arch="llama",
    vocab_size=128256,
    hidden_size=2048,
    num_layers=16,
    num_heads=32,
    num_kv_heads=8,
    intermediate_size=8192,
    max_position_embeddings=4096,
    rope_theta=500000.0,
    tie_word_embeddings=True,
)
SMOKE = dict(
    arch="llama",
    vocab_size=256,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=128,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)


def chip_figures(args) -> tuple[float, float | None, str]:
    """``(peak FLOP/s, HBM bytes/s or None, where from)``."""
    kind = jax.devices()[0].device_kind
    table = next((v for k, v in CHIPS.items() if k.lower() in kind.lower()), None)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else None
    hbm = args.hbm_gbps * 1e9 if args.hbm_gbps else None
    source = "given"
    if peak is None and table is not None:
        peak, source = table[0] * 1e12, f"table ({kind})"
    if hbm is None and table is not None:
        hbm = table[1] * 1e9
    if peak is None:
        import bench_floor

        peak = bench_floor.peak_gflops(1)["jax"] * 1e9
        source = f"measured f32 matmul ({kind})"
    return peak, hbm, source


def median_call(fn, repeats: int) -> tuple[float, float]:
    """``(first call seconds, median of `repeats` further calls)``; results blocked on."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def n_params(cfg: models.ModelConfig) -> tuple[int, int]:
    """``(all parameters, parameters without the embedding table)`` of an LM-head model."""
    shapes = jax.eval_shape(lambda: models.init_model(cfg, jax.random.key(0)).params)
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    return total, total - cfg.vocab_size * cfg.hidden_size


def train_mfu(cfg, args, peak: float) -> None:
    model = models.init_model(cfg, jax.random.key(0))
    scfg = sft.SFTConfig(optim=OptimConfig(name="adamw", learning_rate=1e-5), batch_size=args.batch)
    step = sft.make_step(model.graphdef, scfg)
    state = [sft.init_state(model.params, scfg)]
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (args.batch, args.seq)).astype(np.int32)
    batch = jax.device_put(sft.corpus_batch(tokens, np.ones_like(tokens)))
    key = jax.random.key(0)

    def call():
        state[0], metrics = step(state[0], batch, key)
        return metrics["loss"]

    first, sec = median_call(call, args.repeats)
    total, dense = n_params(cfg)
    flop_per_token = 6 * dense + 12 * cfg.num_layers * cfg.hidden_size * args.seq
    achieved = flop_per_token * args.batch * args.seq / sec
    print(
        f"train step [{args.batch}, {args.seq}]: {sec * 1e3:.1f} ms (compile {first - sec:.1f} s), "
        f"{args.batch * args.seq / sec:.0f} tokens/s, {achieved / 1e12:.2f} TFLOP/s = "
        f"MFU {achieved / peak:.3f}"
    )


def decode_rate(cfg, args, peak: float, hbm: float | None) -> None:
    model = models.init_model(cfg, jax.random.key(1))
    b, p, r = args.decode_batch, args.decode_prompt, args.decode_new
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (b, p)), jnp.int32)
    mask = jnp.ones_like(tokens)
    seeds = iter(range(1 << 30))

    def call():
        return rollout.sample(
            model.graphdef, model.params, tokens, mask, next(seeds), max_new_tokens=r
        ).tokens

    first, sec = median_call(call, args.repeats)
    line = (
        f"decode batch {b}, prompt {p}, new {r}: {sec * 1e3:.1f} ms (compile {first - sec:.1f} s),"
        f" {b * r / sec:.0f} new tokens/s"
    )
    if hbm is not None:
        total, dense = n_params(cfg)
        itemsize = jnp.dtype(cfg.compute_dtype).itemsize
        kv_per_slot = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize * b
        steps = r - 1
        bytes_read = steps * total * itemsize + kv_per_slot * sum(p + i for i in range(steps))
        prefill = (2 * dense + 4 * cfg.num_layers * cfg.hidden_size * p) * b * p / peak
        bound = bytes_read / hbm + prefill
        line += (
            f"; HBM bound {bound * 1e3:.1f} ms ({b * r / bound:.0f} tokens/s): {bound / sec:.2f}"
        )
    print(line)


def ppo_iteration(cfg, args) -> None:
    import bench_ppo

    bargs = argparse.Namespace(response_length=args.ppo_response, critic="separate")
    pcfg, _ = bench_ppo.bench_config(
        argparse.Namespace(**vars(bargs), dtype=cfg.dtype, unroll=False)
    )
    sft_model = models.init_model(cfg, jax.random.key(0))
    rm = models.init_model(cfg, jax.random.key(1), lm_head=False, score_head=True)
    static, params, frozen = ppo.make_models(pcfg, sft_model, rm)
    del sft_model, rm
    prompts = jax.random.randint(
        jax.random.key(2), (args.ppo_batch, args.ppo_prompt), 1, cfg.vocab_size
    ).astype(jnp.int32)
    prompt_mask = jnp.ones_like(prompts)
    index = jnp.arange(args.ppo_batch, dtype=jnp.int32)
    iterate = ppo.make_iteration(pcfg, static)
    state = [ppo.init_state(pcfg, params)]
    del params

    def call():
        state[0], metrics = iterate(state[0], frozen, prompts, prompt_mask, index)
        return metrics

    first, sec = median_call(call, args.repeats)
    print(
        f"ppo iteration (B={args.ppo_batch} P={args.ppo_prompt} R={pcfg.response_length}, "
        f"E={pcfg.num_epochs}, separate critic): {sec:.3f} s (compile {first - sec:.1f} s)"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, one call each (CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per figure (5)")
    parser.add_argument("--batch", type=int, default=None, help="train batch (8)")
    parser.add_argument("--seq", type=int, default=None, help="train sequence length (2048)")
    parser.add_argument("--decode-batch", type=int, default=None, help="rows (64)")
    parser.add_argument("--decode-prompt", type=int, default=None, help="prompt tokens (128)")
    parser.add_argument("--decode-new", type=int, default=None, help="new tokens (128)")
    parser.add_argument("--ppo-batch", type=int, default=16)
    parser.add_argument("--ppo-prompt", type=int, default=16)
    parser.add_argument("--ppo-response", type=int, default=None, help="(48)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the table")
    parser.add_argument("--hbm-gbps", type=float, default=None, help="override the table")
    parser.add_argument("--skip", nargs="*", default=(), choices=("train", "decode", "ppo"))
    args = parser.parse_args(argv)
    small = args.smoke
    defaults = dict(
        repeats=1 if small else 5,
        batch=2 if small else 8,
        seq=32 if small else 2048,
        decode_batch=2 if small else 64,
        decode_prompt=8 if small else 128,
        decode_new=4 if small else 128,
        ppo_response=4 if small else 48,
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if small:
        args.ppo_batch, args.ppo_prompt = min(args.ppo_batch, 2), min(args.ppo_prompt, 8)
    if jax.config.read("jax_disable_most_optimizations") and not small:  # smoke: no figures
        raise SystemExit("benchmarks must not run with jax_disable_most_optimizations")
    cfg = models.ModelConfig(**(SMOKE if small else ONE_B), dtype="bfloat16")
    peak, hbm, source = chip_figures(args)
    total, dense = n_params(cfg)
    print(
        f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}; "
        f"peak {peak / 1e12:.1f} TFLOP/s ({source}), HBM "
        + (f"{hbm / 1e9:.0f} GB/s" if hbm else "unknown")
        + f"; model {total / 1e6:.1f}M parameters ({dense / 1e6:.1f}M without the embedding), "
        f"bf16 compute, f32 parameters" + (" [smoke: not a measurement]" if small else "")
    )
    if "train" not in args.skip:
        train_mfu(cfg, args, peak)
    if "decode" not in args.skip:
        decode_rate(cfg, args, peak, hbm)
    if "ppo" not in args.skip:
        ppo_iteration(cfg, args)


if __name__ == "__main__":
    main()

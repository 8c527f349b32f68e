"""Per-device memory of a compiled train step, before paying for the devices.

Compiles one SFT step (token loss, gradient, AdamW update) for each model shape and each mesh from
abstract shapes only (``jax.eval_shape``: no weights are allocated, an 8B model compiles on a
laptop), and prints ``compiled.memory_analysis()`` per device as a Markdown table. By default it
uses 8 fake CPU devices; on a real slice it uses the real devices.

    python experiments/dry_run.py                         # the table of docs/scaling.md
    python experiments/dry_run.py --models llama-8b --meshes fsdp=8 --presets fsdp
    python experiments/dry_run.py --batch-size 64 --seq-len 2048
    python experiments/dry_run.py --ppo --models llama-8b --meshes fsdp=8 --presets fsdp \
        --batch-size 64 --seq-len 1024        # PPO's whole iteration (prompt = response = 512)

A mesh is written ``axis=size[,axis=size]`` with axes data, fsdp, tensor (the rest are 1).
"""

from __future__ import annotations

import dataclasses
import os
import sys

if "jax" not in sys.modules and "--real-devices" not in sys.argv:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import tyro  # noqa: E402

from rlhf_jax import memory, models, parallel  # noqa: E402
from rlhf_jax.algorithms.ppo import PPOConfig  # noqa: E402

# Model shapes (no weights): GPT-2 small; Llama 3.2 1B; Llama 3.1 8B.
SHAPES = {
    "gpt2-small": dict(
        arch="gpt2",
        vocab_size=50257,
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        num_kv_heads=12,
        head_dim=64,
        intermediate_size=3072,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
    "llama-1b": dict(
        arch="llama",
        vocab_size=128256,
        hidden_size=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        intermediate_size=8192,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
    "llama-8b": dict(
        arch="llama",
        vocab_size=128256,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=14336,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    ),
}


@dataclasses.dataclass(frozen=True)
class Args:
    """What to compile."""

    models: tuple[str, ...] = ("gpt2-small", "llama-1b", "llama-8b")  # keys of SHAPES
    meshes: tuple[str, ...] = ("data=2,fsdp=4", "fsdp=4,tensor=2")  # axis=size lists
    presets: tuple[str, ...] = ("fsdp", "fsdp+tp")  # one per mesh, or one for all
    batch_size: int = 16  # global rows per step
    seq_len: int = 1024  # tokens per row
    dtype: str = "float32"  # parameter and compute dtype: float32 | bfloat16
    real_devices: bool = False  # use the real devices instead of 8 fake CPU devices
    ppo: bool = False  # PPO's whole iteration (policy, critic, reference, reward model, rollout)
    samples: int = 1  # PPO: responses per prompt
    minibatches: int = 8  # PPO: minibatches per epoch (the update's activations are per minibatch)


def parse_mesh(text: str) -> parallel.MeshConfig:
    """``'data=2,fsdp=4'`` -> ``MeshConfig(data=2, fsdp=4, tensor=1)``."""
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in text.split(","):
        axis, _, size = part.partition("=")
        if axis.strip() not in sizes or not size.strip().lstrip("-").isdigit():
            raise SystemExit(f"mesh {text!r}: write axis=size pairs with axes {tuple(sizes)}")
        sizes[axis.strip()] = int(size)
    return parallel.MeshConfig(**sizes)


def main(args: Args) -> str:
    presets = args.presets * len(args.meshes) if len(args.presets) == 1 else args.presets
    if len(presets) != len(args.meshes):
        raise SystemExit("give one preset per mesh, or a single preset for all meshes")
    reports = []
    for model in args.models:
        shape = dict(SHAPES[model], dtype=args.dtype, param_dtype=args.dtype)
        config = models.ModelConfig(**shape)
        for mesh_text, preset in zip(args.meshes, presets, strict=True):
            cfg = parallel.ParallelConfig(mesh=parse_mesh(mesh_text), preset=preset)
            name = f"{model} ({mesh_text}) {preset}"
            if args.ppo:  # half the tokens prompt, half response; separate critic
                ppo_cfg = PPOConfig(
                    response_length=args.seq_len // 2,
                    num_samples=args.samples,
                    num_epochs=1,
                    num_minibatches=args.minibatches,
                )
                report = memory.ppo_dry_run(
                    config,
                    cfg,
                    ppo_cfg,
                    batch_size=args.batch_size,
                    prompt_len=args.seq_len - args.seq_len // 2,
                    name=f"ppo {name}",
                )
            else:
                report = memory.dry_run(
                    config, cfg, batch_size=args.batch_size, seq_len=args.seq_len, name=name
                )
            print(report.row(), flush=True)
            reports.append(report)
    table = memory.format_memory_table(reports)
    print(f"\nPer-device memory (GiB), batch {args.batch_size} x {args.seq_len}, {args.dtype}:")
    print(table)
    return table


if __name__ == "__main__":
    main(tyro.cli(Args))

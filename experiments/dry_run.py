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

    python experiments/dry_run.py --models llama-8b --meshes fsdp=8 --presets fsdp \
        --remat dots                          # rematerialised layers (none | full | dots | offload)
    python experiments/dry_run.py --ppo-table  # the PPO table of docs/scaling.md (256 fake devices)

A mesh is written ``axis=size[,axis=size]`` with axes data, fsdp, tensor (the rest are 1); it uses
the first data x fsdp x tensor devices. ``--devices N`` sets the number of fake CPU devices (8;
``--ppo-table`` makes 256).
"""

from __future__ import annotations

import dataclasses
import os
import sys


def _fake_devices(argv: list[str]) -> int:
    """Fake CPU devices, read before JAX starts: ``--devices N`` (256 for the PPO table)."""
    for i, arg in enumerate(argv):
        if arg.startswith("--devices"):
            return int(arg.partition("=")[2] or argv[i + 1])
    return 256 if "--ppo-table" in argv else 8


if "jax" not in sys.modules and "--real-devices" not in sys.argv:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={_fake_devices(sys.argv)}"
    ).strip()

import time  # noqa: E402

import jax  # noqa: E402
import tyro  # noqa: E402

from rlhf_jax import memory, models, parallel  # noqa: E402
from rlhf_jax.algorithms.ppo import PPOConfig  # noqa: E402
from rlhf_jax.lora import LoRAConfig  # noqa: E402
from rlhf_jax.optim import OptimConfig  # noqa: E402

# Model shapes (no weights), from the models' config.json: GPT-2 small; Llama 3.2 1B; Llama 3.1 8B;
# Qwen3 1.7B; Llama 3.1 70B.
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
    "qwen3-1.7b": dict(
        arch="qwen3",
        vocab_size=151936,
        hidden_size=2048,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=6144,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    ),
    "llama-70b": dict(
        arch="llama",
        vocab_size=128256,
        hidden_size=8192,
        num_layers=80,
        num_heads=64,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=28672,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    ),
}

# The PPO table of docs/scaling.md (issue 17): (model, mesh, preset, remat) per row, each at 8
# prompts x 1,024 tokens (512 prompt + 512 response) per data x fsdp shard, bfloat16 parameters
# and compute, float32 Adam moments, 1 epoch of 8 minibatches, a separate critic.
PPO_TABLE = (
    ("qwen3-1.7b", "fsdp=8", "fsdp", "none"),
    ("qwen3-1.7b", "fsdp=8", "fsdp", "dots"),
    ("llama-8b", "fsdp=8", "fsdp", "none"),
    ("llama-8b", "fsdp=8", "fsdp", "full"),
    ("llama-8b", "fsdp=8", "fsdp", "dots"),
    ("llama-8b", "fsdp=64", "fsdp", "dots"),
    ("llama-70b", "fsdp=64", "fsdp", "full"),
    ("llama-70b", "fsdp=32,tensor=8", "fsdp+tp", "full"),
    ("llama-70b", "fsdp=256", "fsdp", "full"),
    ("llama-70b", "fsdp=32,tensor=8", "fsdp+tp", "dots"),
)


@dataclasses.dataclass(frozen=True)
class Args:
    """What to compile."""

    models: tuple[str, ...] = ("gpt2-small", "llama-1b", "llama-8b")  # keys of SHAPES
    meshes: tuple[str, ...] = ("data=2,fsdp=4", "fsdp=4,tensor=2")  # axis=size lists
    presets: tuple[str, ...] = ("fsdp", "fsdp+tp")  # one per mesh, or one for all
    batch_size: int = 16  # global rows per step
    seq_len: int = 1024  # tokens per row
    dtype: str = "float32"  # parameter and compute dtype: float32 | bfloat16
    moment_dtype: str | None = None  # Adam moments' dtype (optim.moment_dtype); None = dtype's
    remat: str = "none"  # layer rematerialisation (ModelConfig.remat): none|full|dots|offload
    devices: int = 8  # fake CPU devices (read before JAX starts; the PPO table needs 256)
    ppo_table: bool = False  # compile the rows of PPO_TABLE (per-device batch, bf16, f32 moments)
    rows: tuple[int, ...] = ()  # with --ppo-table: only these rows of PPO_TABLE (0-based)
    real_devices: bool = False  # use the real devices instead of 8 fake CPU devices
    ppo: bool = False  # PPO's whole iteration (policy, critic, reference, reward model, rollout)
    samples: int = 1  # PPO: responses per prompt
    minibatches: int = 8  # PPO: minibatches per epoch (the update's activations are per minibatch)
    lora_rank: int = 0  # PPO: LoRA adapters of this rank (alpha = 2 x rank) on policy and critic


def parse_mesh(text: str) -> parallel.MeshConfig:
    """``'data=2,fsdp=4'`` -> ``MeshConfig(data=2, fsdp=4, tensor=1)``."""
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in text.split(","):
        axis, _, size = part.partition("=")
        if axis.strip() not in sizes or not size.strip().lstrip("-").isdigit():
            raise SystemExit(f"mesh {text!r}: write axis=size pairs with axes {tuple(sizes)}")
        sizes[axis.strip()] = int(size)
    return parallel.MeshConfig(**sizes)


def measure(args: Args, model: str, mesh_text: str, preset: str, remat: str, batch_size: int):
    """One row: the SFT step or (``args.ppo``) PPO's whole iteration, compiled; its memory."""
    shape = dict(SHAPES[model], dtype=args.dtype, param_dtype=args.dtype, remat=remat)
    config = models.ModelConfig(**shape)
    mesh = parse_mesh(mesh_text)
    cfg = parallel.ParallelConfig(mesh=mesh, preset=preset)
    devices = jax.devices()[: mesh.data * mesh.fsdp * mesh.tensor]
    optim = OptimConfig(name="adamw", moment_dtype=args.moment_dtype)
    name = f"{model} ({mesh_text}) {preset}" + ("" if remat == "none" else f" remat={remat}")
    if args.ppo:  # half the tokens prompt, half response; separate critic
        lora = None
        if args.lora_rank:
            lora = LoRAConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank)
            name += f" lora r={args.lora_rank}"
        ppo_cfg = PPOConfig(
            lora=lora,
            response_length=args.seq_len // 2,
            num_samples=args.samples,
            num_epochs=1,
            num_minibatches=args.minibatches,
            optim=dataclasses.replace(PPOConfig().optim, moment_dtype=args.moment_dtype),
        )
        return memory.ppo_dry_run(
            config,
            cfg,
            ppo_cfg,
            batch_size=batch_size,
            prompt_len=args.seq_len - args.seq_len // 2,
            devices=devices,
            name=f"ppo {name}",
        )
    return memory.dry_run(
        config, cfg, batch_size=batch_size, seq_len=args.seq_len, optim=optim, devices=devices,
        name=name,
    )  # fmt: skip


def main(args: Args) -> str:
    if args.ppo_table:  # per-device batch: 8 prompts per data x fsdp shard
        args = dataclasses.replace(args, ppo=True, dtype="bfloat16", moment_dtype="float32")
        rows = [
            (m, mesh, preset, remat, 8 * (lambda c: c.data * c.fsdp)(parse_mesh(mesh)))
            for i, (m, mesh, preset, remat) in enumerate(PPO_TABLE)
            if not args.rows or i in args.rows
        ]
    else:
        presets = args.presets * len(args.meshes) if len(args.presets) == 1 else args.presets
        if len(presets) != len(args.meshes):
            raise SystemExit("give one preset per mesh, or a single preset for all meshes")
        rows = [
            (m, mesh, preset, args.remat, args.batch_size)
            for m in args.models
            for mesh, preset in zip(args.meshes, presets, strict=True)
        ]
    reports = []
    for model, mesh_text, preset, remat, batch_size in rows:
        mesh = parse_mesh(mesh_text)
        need = mesh.data * mesh.fsdp * mesh.tensor
        if not 0 < need <= jax.device_count():
            raise SystemExit(f"mesh {mesh_text} needs {need} devices: give --devices {need}")
        start = time.perf_counter()
        report = measure(args, model, mesh_text, preset, remat, batch_size)
        seconds = time.perf_counter() - start
        print(
            f"{report.row()}  <!-- batch {batch_size}, compiled in {seconds:.0f} s -->", flush=True
        )
        reports.append(report)
    table = memory.format_memory_table(reports)
    moments = args.moment_dtype or args.dtype
    print(f"\nPer-device memory, seq {args.seq_len}, {args.dtype} params, {moments} moments:")
    print(table)
    return table


if __name__ == "__main__":
    main(tyro.cli(Args))

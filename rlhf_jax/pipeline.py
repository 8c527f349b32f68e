"""The pipeline: every algorithm is a stage, and every stage runs through one skeleton.

(Being rebuilt: for now this module holds the experiment config schema.)
"""

from __future__ import annotations

import dataclasses
import os

from rlhf_jax.algorithms.ppo import PPOConfig
from rlhf_jax.algorithms.reward_model import RewardModelConfig
from rlhf_jax.algorithms.sft import SFTConfig
from rlhf_jax.data.formats import DataConfig
from rlhf_jax.parallel import ParallelConfig

# ------------------------------------------------------------------------------------------
# The experiment config
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Where a run writes and how it logs; shared by every stage of the pipeline."""

    dir: str = "runs/experiment"  # run directory; stage X writes to <dir>/X (sft, rm, ppo)
    seed: int = 0  # the run seed every PRNG key is derived from
    tensorboard: bool = True  # write TensorBoard event files in each stage's directory
    wandb_project: str | None = None  # log to this Weights & Biases project (needs wandb)
    progress: bool = True  # show a progress bar with the key metrics
    keep_checkpoints: int = 3  # committed checkpoints kept per stage (older ones are deleted)
    dtype: str | None = None  # compute dtype, "float32" | "bfloat16"; None = the checkpoint's
    param_dtype: str | None = None  # parameter dtype, "float32" | "bfloat16"; None = checkpoint's
    # layers per iteration of the models' layer scan; = num_layers unrolls it (faster steps on CPU
    # for small models, longer compile). Not saved with checkpoints.
    scan_unroll: int = 1
    # Resuming is per stage: <stage>.trainer.loop.resume (default true) continues from the
    # stage's latest checkpoint in <dir>/<stage>/checkpoints.

    def __post_init__(self):
        if not self.dir:
            raise ValueError("run.dir is empty: give the run directory, e.g. run.dir=runs/toy")
        for name in ("dtype", "param_dtype"):
            value = getattr(self, name)
            if value not in (None, "float32", "bfloat16"):
                raise ValueError(f"run.{name}={value!r}: choose 'float32', 'bfloat16' or null")
        if self.keep_checkpoints < 1:
            raise ValueError(f"run.keep_checkpoints={self.keep_checkpoints}: must be >= 1")
        if self.scan_unroll < 1:
            raise ValueError(f"run.scan_unroll={self.scan_unroll}: must be >= 1")

    def stage_dir(self, stage: str) -> str:
        """The directory of one stage (``sft``, ``rm``, ``ppo``) of this run."""
        return os.path.join(self.dir, stage)


@dataclasses.dataclass(frozen=True)
class SFTStage:
    """Stage 1: supervised fine-tuning of a Hugging Face checkpoint on prompt/completion rows."""

    model: str = ""  # Hugging Face checkpoint directory to fine-tune (config.json + safetensors)
    tokenizer: str | None = None  # tokenizer directory; None = the model's directory
    train_file: str = ""  # JSONL / JSON / Parquet rows {prompt, completion} or {messages}
    eval_file: str | None = None  # held-out rows, evaluated every trainer.loop.eval_every steps
    eval_size: int = 256  # rows of eval_file in the evaluation batch
    data: DataConfig = DataConfig(
        kind="completion", max_prompt_length=128, max_completion_length=128
    )  # row kind, static lengths P and R, what overlong or malformed rows do
    trainer: SFTConfig = SFTConfig()  # optimizer, loop (steps, evaluation), batch size
    save_every: int = 500  # checkpoint every N steps (also at the end and on SIGTERM); 0 = not

    def __post_init__(self):
        if self.data.kind != "completion":
            raise ValueError(f"sft.data.kind={self.data.kind!r}: SFT reads 'completion' rows")
        if self.save_every < 0 or self.eval_size < 1:
            raise ValueError("sft.save_every must be >= 0 and sft.eval_size >= 1")


@dataclasses.dataclass(frozen=True)
class RMStage:
    """Stage 2: a reward model from comparisons, initialised from the SFT model."""

    model: str | None = None  # HF checkpoint to start from; None = this run's SFT result
    tokenizer: str | None = None  # tokenizer directory; None = the SFT stage's tokenizer
    train_file: str = ""  # rows {prompt, chosen, rejected} (pairs) or {prompt, completions} (K)
    eval_file: str | None = None  # held-out comparisons (eval/accuracy every eval_every steps)
    eval_size: int = 256  # comparisons of eval_file in the evaluation batch
    data: DataConfig = DataConfig(
        kind="preference", max_prompt_length=128, max_completion_length=128
    )  # "preference" (pairs) or "ranking" (set num_completions), lengths, bad-row policy
    normalize_samples: int = 256  # SFT samples scored to normalise the head to mean 0, std 1
    trainer: RewardModelConfig = RewardModelConfig()  # loss, optimizer, loop, batch size
    save_every: int = 500  # checkpoint every N steps (also at the end and on SIGTERM); 0 = not

    def __post_init__(self):
        if self.data.kind not in ("preference", "ranking"):
            raise ValueError(
                f"rm.data.kind={self.data.kind!r}: a reward model reads 'preference' or "
                "'ranking' rows"
            )
        if self.save_every < 0 or self.eval_size < 1 or self.normalize_samples < 0:
            raise ValueError("rm.save_every, rm.normalize_samples must be >= 0, eval_size >= 1")


@dataclasses.dataclass(frozen=True)
class PPOStage:
    """Stage 3: PPO from the SFT policy against the reward model, KL-anchored to the SFT model."""

    prompts_file: str = ""  # rows {prompt} or {messages} (other fields are ignored)
    data: DataConfig = DataConfig(kind="prompt", max_prompt_length=64)  # prompt length P
    batch_size: int = 16  # prompts per iteration (each answered trainer.num_samples times)
    trainer: PPOConfig = PPOConfig()  # PPO hyperparameters, optimizer, loop (iterations)
    save_every: int = 50  # checkpoint every N iterations (also at the end and on SIGTERM)
    stop_at_eos: bool = True  # add the tokenizer's EOS to trainer.stop_tokens, pad with its pad id

    def __post_init__(self):
        if self.data.kind != "prompt":
            raise ValueError(f"ppo.data.kind={self.data.kind!r}: PPO reads 'prompt' rows")
        if self.batch_size < 1 or self.save_every < 0:
            raise ValueError("ppo.batch_size must be >= 1 and ppo.save_every >= 0")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment: the run directory and logs, placement, and each pipeline stage."""

    run: RunConfig = RunConfig()  # run directory, seed, logging, checkpoint retention, resume
    parallel: ParallelConfig = ParallelConfig()  # mesh, sharding preset, multi-host start
    sft: SFTStage = SFTStage()  # stage 1: supervised fine-tuning
    rm: RMStage = RMStage()  # stage 2: reward model
    ppo: PPOStage = PPOStage()  # stage 3: PPO

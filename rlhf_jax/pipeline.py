"""The pipeline: every algorithm is a stage, and every stage runs through one skeleton.

A **stage** is an algorithm with its config, its inputs and its outputs:

- *inputs* are models (a policy, a reference, a reward model, ...) and datasets. A model input is
  any Hugging Face directory (``config.json`` + safetensors + tokenizer), so a stage can start from
  a checkpoint made elsewhere; left unset it is the result of an earlier stage of the same run
  (``<run.dir>/<stage>/final``), which is itself a Hugging Face directory;
- *outputs* land in ``<run.dir>/<stage>/``: ``final/`` (the resulting model, with its tokenizer,
  loadable by ``transformers`` and by any later stage), ``metrics.jsonl``, ``samples.jsonl``,
  ``tensorboard/`` and ``checkpoints/`` (Orbax, exact resume).

:func:`run_stage` is the one skeleton::

    mesh -> the stage's prepare (load and validate every input; build the initial state, the
    step, the batches, the evaluation) -> create the run directory -> place the state on the mesh
    -> run loop (eval, stop, checkpoints, logs, SIGTERM) -> the stage's finish -> final/

Nothing is written before ``prepare`` has returned, so a bad config, a missing file or a batch
that does not fit leaves no half-made run directory behind.

Adding an algorithm means writing its config and its step (``rlhf_jax/algorithms/``), a
``prepare`` that turns its stage config into a :class:`Plan`, and one :func:`register` call.
``docs/internals.md`` walks through it.

The stages (registered in :mod:`rlhf_jax.stages`): ``sft``, ``label`` (sample K responses per
prompt from a policy and rank them with a labeller function: the comparison data of a reward
model), ``rm``, ``cost`` (Safe RLHF's cost model), ``ppo``, ``safe_ppo`` (PPO-Lagrangian),
``dpo``, ``grpo`` and ``judge``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import config as config_lib
from rlhf_jax.algorithms.dpo import DPOStage
from rlhf_jax.algorithms.grpo import GRPOStage
from rlhf_jax.algorithms.ppo import PPOConfig, SafetyConfig
from rlhf_jax.algorithms.reward_model import RewardModelConfig
from rlhf_jax.algorithms.sft import SFTConfig
from rlhf_jax.data.formats import DataConfig
from rlhf_jax.data.toy import ToyTask
from rlhf_jax.errors import first_line
from rlhf_jax.judge import JudgeConfig, JudgeStage
from rlhf_jax.parallel import ParallelConfig
from rlhf_jax.sweep import SweepConfig
from rlhf_jax.train import LoopConfig, LoopResult

__all__ = [
    "CONFIG_FILE",
    "FINAL_DIR",
    "STAGES",
    "Context",
    "EvalConfig",
    "ExperimentConfig",
    "LabelStage",
    "Outputs",
    "PPOStage",
    "Plan",
    "RMStage",
    "RunConfig",
    "SFTStage",
    "Stage",
    "StageResult",
    "decode",
    "enable_compile_cache",
    "find_model",
    "pad_id",
    "run_policy",
    "register",
    "run_stage",
    "sample_responses",
    "save_final",
    "stop_tokens",
    "write_config",
]

CONFIG_FILE = "config.yaml"  # the resolved config, written into run.dir by every stage
FINAL_DIR = "final"  # <stage dir>/final: the stage's result, a Hugging Face directory
ADAPTER_DIR = "adapter"  # in final/ of a LoRA stage: PEFT's adapter_config.json + safetensors
META_FILE = "rlhf_jax_stage.json"  # in final/: the stage, its last step, stop reason and info
POLICY_STAGES = ("safe_ppo", "ppo", "grpo", "dpo", "sft")  # the stages whose final/ is a policy


# ------------------------------------------------------------------------------------------
# The config schema
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Where a run writes and how it logs; shared by every stage of the pipeline."""

    dir: str = "runs/experiment"  # run directory; stage X writes to <dir>/X (sft, rm, ppo, ...)
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
    # rematerialisation of the models' layer scan in every trainer's backward pass (SFT, RM, DPO,
    # GRPO, the PPO update): "none" | "full" | "dots" | "offload" (ModelConfig.remat; the same
    # gradients, less activation memory, more compute). Not saved with checkpoints.
    remat: str = "none"
    # JAX's persistent compilation cache: a rerun, a resume or the next stage with the same shapes
    # loads its compiled steps instead of compiling; "" or "off" = no cache. The environment
    # variable RLHF_JAX_COMPILE_CACHE overrides it.
    compile_cache: str = "~/.cache/rlhf-jax/xla"
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
        from rlhf_jax.models.transformer import REMAT

        if self.remat not in REMAT:
            raise ValueError(f"run.remat={self.remat!r}: choose one of {REMAT}")

    def stage_dir(self, stage: str) -> str:
        """The directory of one stage (``sft``, ``rm``, ``ppo``, ...) of this run."""
        return os.path.join(self.dir, stage)


@dataclasses.dataclass(frozen=True)
class SFTStage:
    """Supervised fine-tuning of a Hugging Face checkpoint on prompt/completion rows."""

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
class LabelStage:
    """Comparison data from a policy's samples: K responses per prompt, ranked by a labeller.

    Writes ``<run.dir>/label/train.jsonl`` (and ``eval.jsonl`` from ``eval_prompts_file``): ranking
    rows ``{prompt, completions}`` best first (``output: ranking``), which ``rm`` reads by default,
    or preference rows ``{prompt, chosen, rejected}`` of the best and the worst response
    (``output: pairs``, e.g. for DPO).
    """

    policy: str | None = None  # HF directory sampled from; None = this run's sft/final
    prompts_file: str = ""  # rows {prompt} or {messages}: the prompts to answer and rank
    eval_prompts_file: str | None = None  # prompts of a held-out ranking set (eval.jsonl)
    num_completions: int = 4  # K responses per prompt (InstructGPT ranks 4 to 9)
    # "module:function" (prompts, groups, *, seed) -> best-first index lists, or "judge": the
    # LM judge of label.judge ranks them (pairwise: every pair in both orders; pointwise: scores)
    labeller: str = ""
    judge: JudgeConfig = JudgeConfig()  # the LM judge when labeller="judge" (RLAIF)
    # output=pairs with the judge: "probability" writes the judge's P(chosen > rejected) as the
    # TRL "margin" field (the rm stage subtracts it: rm.trainer.use_margin) | "none"
    margin: str = "probability"
    # "ranking": {prompt, completions} | "pairs": {prompt, chosen, rejected} | "safety": every
    # pair of the K responses as a PKU-SafeRLHF row (better and safer ids, safe flags)
    output: str = "ranking"
    # output=pairs: None = one pair per prompt, its best and worst response; g >= 1 = every pair
    # of the ranking whose ranks differ by at least g (1: all C(K, 2) pairs)
    pair_gap: int | None = None
    # output=safety: "module:function" (prompts, groups, *, seed) -> per prompt
    # {"safe": [K bools], "safer": [K indices, safest first]}
    safety_labeller: str = ""
    data: DataConfig = DataConfig(kind="prompt", max_prompt_length=64)  # prompt length P
    max_new_tokens: int = 64  # response length R
    temperature: float = 1.0  # sampling temperature (1 = the policy's own distribution)
    stop_tokens: tuple[int, ...] = ()  # token ids that end a response (besides the EOS)
    stop_at_eos: bool = True  # stop a response at the tokenizer's EOS
    chunk: int = 256  # prompts per compiled sampling call (one shape, one compile)

    def __post_init__(self):
        if self.data.kind != "prompt":
            raise ValueError(f"label.data.kind={self.data.kind!r}: labelling reads 'prompt' rows")
        if self.output not in ("ranking", "pairs", "safety"):
            raise ValueError(f"label.output={self.output!r}: choose 'ranking', 'pairs' or 'safety'")
        if self.pair_gap is not None and not 1 <= self.pair_gap < self.num_completions:
            raise ValueError(
                f"label.pair_gap={self.pair_gap}: must be in [1, num_completions - 1 = "
                f"{self.num_completions - 1}], or null for the best and the worst response"
            )
        if self.output == "safety" and not self.safety_labeller:
            raise ValueError(
                "label.output='safety' needs label.safety_labeller, a 'module:function' that "
                "flags each response safe or unsafe and orders them safest first (e.g. "
                "rlhf_jax.data.toy:safety_labeller)"
            )
        if self.margin not in ("probability", "none"):
            raise ValueError(f"label.margin={self.margin!r}: choose 'probability' or 'none'")
        if self.num_completions < 2:
            raise ValueError(f"label.num_completions={self.num_completions}: a ranking needs >= 2")
        if self.max_new_tokens < 1 or self.chunk < 1 or not self.temperature > 0:
            raise ValueError("label.max_new_tokens and label.chunk must be >= 1, temperature > 0")


@dataclasses.dataclass(frozen=True)
class RMStage:
    """A reward model from comparisons, initialised from a policy's trunk with a fresh head."""

    model: str | None = None  # HF directory of the trunk; None = this run's sft/final
    tokenizer: str | None = None  # tokenizer directory; None = the model's directory
    train_file: str | None = None  # {prompt, chosen, rejected} or {prompt, completions}
    # rows; None = this run's label/train.jsonl
    eval_file: str | None = None  # held-out comparisons; None = label/eval.jsonl if it exists
    eval_size: int = 256  # comparisons of eval_file in the evaluation batch
    data: DataConfig = DataConfig(
        kind="preference", max_prompt_length=128, max_completion_length=128
    )  # "preference" (pairs) or "ranking" (set num_completions), lengths, bad-row policy
    normalize_samples: int = 256  # policy samples scored to normalise the head to mean 0, std 1
    normalize_prompts_file: str | None = None  # their prompts; None = the train file's prompts
    trainer: RewardModelConfig = RewardModelConfig()  # loss, optimizer, loop, batch size
    save_every: int = 500  # checkpoint every N steps (also at the end and on SIGTERM); 0 = not

    def __post_init__(self):
        if self.data.kind not in ("preference", "ranking", "safety"):
            raise ValueError(
                f"rm.data.kind={self.data.kind!r}: a reward model reads 'preference', "
                "'ranking' or 'safety' rows"
            )
        if self.trainer.loss == "cost" and self.data.kind != "safety":
            raise ValueError(
                "trainer.loss='cost' (a cost model) reads safety rows: set data.kind=safety"
            )
        if self.save_every < 0 or self.eval_size < 1 or self.normalize_samples < 0:
            raise ValueError("rm.save_every, rm.normalize_samples must be >= 0, eval_size >= 1")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluation of a policy on held-out prompts, every ``trainer.loop.eval_every`` steps."""

    prompts_file: str | None = None  # rows {prompt} or {messages}; None = no evaluation
    size: int = 256  # prompts read from it (the first ones)
    samples_per_prompt: int = 1  # responses sampled per prompt
    evaluator: str | None = None  # "module:function" (prompts, responses) -> {name: [B] values}
    win_rate_metric: str | None = "gold"  # evaluator metric of the win rate vs the reference
    log_samples: int = 4  # samples written to samples.jsonl / TensorBoard at each evaluation

    def __post_init__(self):
        if self.size < 1 or self.samples_per_prompt < 1 or self.log_samples < 0:
            raise ValueError("eval.size, eval.samples_per_prompt >= 1; eval.log_samples >= 0")


@dataclasses.dataclass(frozen=True)
class PPOStage:
    """PPO from a policy against a reward model (or function), KL-anchored to a reference."""

    policy: str | None = None  # HF directory the policy starts from; None = this run's sft/final
    reference: str | None = None  # the frozen KL anchor; None = the policy's starting point
    reward_model: str | None = None  # HF *ForSequenceClassification directory; None = rm/final
    # the cost model of PPO-Lagrangian (trainer.safety set); None = this run's cost/final
    cost_model: str | None = None
    # reward sources instead of reward_model / trainer.reward_fn, their weighted sum the score:
    # each "model:<HF dir>", "fn:<module:function>" or "judge:<judge YAML or HF dir>", "@<w>"
    rewards: tuple[str, ...] = ()
    # "fn:" sources see the stop token and other special tokens in the decoded responses
    decode_special_tokens: bool = False
    prompts_file: str = ""  # rows {prompt} or {messages} (other fields are ignored)
    data: DataConfig = DataConfig(kind="prompt", max_prompt_length=64)  # prompt length P
    batch_size: int = 16  # prompts per iteration (each answered trainer.num_samples times)
    trainer: PPOConfig = PPOConfig()  # PPO hyperparameters, optimizer, loop (iterations)
    eval: EvalConfig = EvalConfig()  # held-out prompts: reward, KL, length, entropy, win rate
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

    run: RunConfig = RunConfig()  # run directory, seed, logging, checkpoint retention
    parallel: ParallelConfig = ParallelConfig()  # mesh, sharding preset, multi-host start
    sft: SFTStage = SFTStage()  # supervised fine-tuning
    label: LabelStage = LabelStage()  # comparison data: a policy's samples ranked by a labeller
    rm: RMStage = RMStage()  # reward model
    cost: RMStage = RMStage(
        data=DataConfig(kind="safety", max_prompt_length=128, max_completion_length=128),
        trainer=RewardModelConfig(loss="cost"),
    )  # Safe RLHF cost model on safety rows (positive cost = unsafe)
    ppo: PPOStage = PPOStage()  # PPO
    safe_ppo: PPOStage = PPOStage(
        trainer=PPOConfig(safety=SafetyConfig())
    )  # PPO-Lagrangian (Safe RLHF): reward model, cost model, Lagrange multiplier
    dpo: DPOStage = DPOStage()  # DPO on preference pairs (offline) or own samples (online)
    grpo: GRPOStage = GRPOStage()  # critic-free policy gradient: GRPO, Dr. GRPO, RLOO, REINFORCE++
    judge: JudgeStage = JudgeStage()  # an LM judge on a file of pairs: agreement with labels
    toy: ToyTask = ToyTask()  # the embedded task's sizes (used by `rlhf-jax quickstart` only)
    sweep: SweepConfig = SweepConfig()  # N runs of one stage in one program (rlhf_jax.sweep)


# ------------------------------------------------------------------------------------------
# Stages, plans, results
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Outputs:
    """What a stage leaves: the model written to ``final/`` (None for a data stage) and info."""

    model: Any = None  # a rlhf_jax.models.Model record
    tokenizer: Any = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    adapter: Any = None  # a LoRA stage's rlhf_jax.lora.PeftAdapter, written to final/adapter/


@dataclasses.dataclass
class Plan:
    """What a stage's ``prepare`` hands the skeleton; built before anything is written.

    A training stage gives ``state``, ``make_step``, ``batches`` and ``loop``; the skeleton places
    the state on the mesh by the parallel preset's rules, calls ``make_step(state_shardings)`` for
    the compiled step, runs :func:`rlhf_jax.train.run_loop`, then ``finish(state, result)``. A
    data stage (``loop=None``) only has ``finish(None, None)``.
    """

    finish: Callable[[Any, LoopResult | None], Outputs]
    state: Any = None
    make_step: Callable[[Any], Callable] | None = None  # (state_shardings) -> step
    batches: Callable[[int], Any] | None = None  # host batches: this process's rows of batch s
    loop: LoopConfig | None = None
    key: jax.Array | None = None
    eval_fn: Callable[[Any], Mapping[str, Any]] | None = None
    tokenizer: Any = None  # saved into final/ and the stage directory
    save_every: int = 0
    # what a failure inside the compiled step really was, when a host callback hides it (a
    # reward function raising inside the step): () -> a UserError to raise instead, or None
    explain: Callable[[], Exception | None] | None = None


@dataclasses.dataclass(frozen=True)
class Stage:
    """A registered stage: its name (subcommand and directory), description and prepare."""

    name: str
    description: str
    prepare: Callable[[Context], Plan]


STAGES: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    """Add a stage to :data:`STAGES` (its name becomes an ``rlhf-jax`` subcommand)."""
    STAGES[stage.name] = stage
    return stage


@dataclasses.dataclass
class StageResult:
    """What :func:`run_stage` returns."""

    stage: str
    dir: str  # <run.dir>/<stage>
    final: str | None  # the final/ directory (None for a data stage or when preempted)
    result: LoopResult | None
    outputs: Outputs | None
    runs: list[LoopResult] | None = None  # a sweep's runs (rlhf_jax.sweep), in run order

    @property
    def preempted(self) -> bool:
        return self.result is not None and self.result.stop_reason == "preempted"


@dataclasses.dataclass
class Context:
    """What a stage's ``prepare`` may use: the config, the mesh, and the input loaders."""

    cfg: ExperimentConfig
    stage: str
    mesh: Any
    logger: Any = None  # the stage's RunLogger once the skeleton made it (None in prepare)
    say: Callable[[str], None] = print

    @property
    def section(self) -> Any:
        return getattr(self.cfg, self.stage)

    @property
    def dir(self) -> str:
        return self.cfg.run.stage_dir(self.stage)

    @property
    def seed(self) -> int:
        return self.cfg.run.seed

    # -- models ----------------------------------------------------------------------------

    def model_dir(self, value: str | None, key: str, default_stage: str | None) -> str:
        """The Hugging Face directory a model input names (see :func:`find_model`)."""
        if value:
            return find_model(value, key)
        if default_stage is None:
            raise config_lib.ConfigError(f"{key} is not set: give a Hugging Face model directory")
        path = os.path.join(self.cfg.run.stage_dir(default_stage), FINAL_DIR)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise config_lib.ConfigError(
                f"{key} is not set and this run has no {default_stage} result ({path}): run "
                f"`rlhf-jax {default_stage}` with the same run.dir first, or set {key} to a "
                "Hugging Face model directory"
            )
        return path

    def load_model(self, path: str, **heads) -> Any:
        from flax import nnx

        from rlhf_jax import models

        run = self.cfg.run
        model = models.from_pretrained(
            path,
            dtype=run.dtype,
            param_dtype=run.param_dtype,
            scan_unroll=run.scan_unroll,
            **heads,
        )
        if run.remat == "none":
            return model
        # run.remat is a run-time choice like scan_unroll: the module's config lives in the
        # graphdef, so rebuild that (abstractly, nothing allocated) with the changed config
        config = model.config.replace(remat=run.remat)
        switches = {
            k: heads.get(k, k == "lm_head") for k in ("lm_head", "value_head", "score_head")
        }
        abstract = nnx.eval_shape(lambda: models.Transformer(config, rngs=nnx.Rngs(0), **switches))
        return model.replace(graphdef=nnx.split(abstract, nnx.Param)[0], config=config)

    def load_tokenizer(self, path: str, model: Any = None) -> Any:
        from rlhf_jax import models

        try:
            return models.load_tokenizer(path, config=None if model is None else model.config)
        except (OSError, ValueError) as err:
            raise config_lib.ConfigError(
                f"{self.stage}: cannot load a tokenizer from {path} ({first_line(err)}): give "
                "the tokenizer directory saved with the model"
            ) from None

    # -- data ------------------------------------------------------------------------------

    def dataset(self, path: str | None, key: str, tokenizer: Any, data: DataConfig, model=None):
        """Load, validate and tokenize a data file; prints its one-line summary."""
        from rlhf_jax.data import formats

        if not path:
            raise config_lib.ConfigError(f"{key} is not set: give a JSONL/JSON/Parquet file")
        if not os.path.exists(path):
            raise config_lib.ConfigError(f"{key}={path!r}: no such file")
        if model is not None and data.vocab_size is None:
            data = dataclasses.replace(data, vocab_size=model.config.vocab_size)
        ds = formats.load_dataset(path, tokenizer, data)
        self.say(f"[{self.stage}] {ds.summary()}")
        return ds

    def batches(self, dataset, batch_size: int, key: str, *, rename=None):
        """The deterministic batcher over ``dataset``, this process's rows of each batch."""
        from rlhf_jax import parallel
        from rlhf_jax.data.batches import epoch_batches

        split = parallel.axis_size(self.mesh, parallel.BATCH_AXES)
        if batch_size % split:
            raise config_lib.ConfigError(
                f"{key}={batch_size} does not split over the mesh's data x fsdp = {split} "
                f"devices: use a multiple of {split}, or set parallel.mesh (e.g. "
                "parallel.mesh.data=1 for one device)"
            )
        try:
            return epoch_batches(
                dataset,
                batch_size,
                self.seed,
                rename=rename,
                rows=parallel.process_rows(batch_size),
                what=f"{dataset.source} ({key})",
            )
        except ValueError as err:
            raise config_lib.ConfigError(str(err)) from None


def run_policy(run_dir: str) -> str | None:
    """The latest policy of a run: the most recently written ``<stage>/final`` of
    :data:`POLICY_STAGES` (after SFT and PPO, PPO's), or None.

    A policy stage run as a sweep (``sweep.json``, one ``runs/K/final`` per run) has no single
    policy: when it is the latest, this raises a ConfigError asking for one run's directory."""
    from rlhf_jax.sweep import SWEEP_FILE

    latest = []  # (mtime, path, is a sweep)
    for s in POLICY_STAGES:
        final = os.path.join(run_dir, s, FINAL_DIR, "config.json")
        if os.path.isfile(final):
            latest.append((os.path.getmtime(final), os.path.dirname(final), False))
        swept = os.path.join(run_dir, s, SWEEP_FILE)
        if os.path.isfile(swept):
            latest.append((os.path.getmtime(swept), os.path.join(run_dir, s), True))
    if not latest:
        return None
    _, path, is_sweep = max(latest)
    if is_sweep:
        raise config_lib.ConfigError(
            f"{path} is a sweep: its runs' policies are {path}/runs/K/final; name one of them "
            "(rlhf-jax export takes --run K)"
        )
    return path


def find_model(path: str, key: str = "model") -> str:
    """The Hugging Face directory ``path`` names: itself, a stage's ``final/``, or a run's policy.

    ``path`` may be a Hugging Face directory (``config.json``), a stage directory of a run
    (``runs/x/ppo``: its ``final/``) or a run directory (its latest policy: the most recently
    written ``final/`` of :data:`POLICY_STAGES`).
    """
    for c in (path, os.path.join(path, FINAL_DIR)):
        if os.path.isfile(os.path.join(c, "config.json")):
            return c
    policy = run_policy(path)
    if policy is not None:
        return policy
    if not os.path.exists(path):
        raise config_lib.ConfigError(f"{key}={path!r}: no such directory")
    raise config_lib.ConfigError(
        f"{key}={path!r} holds no model: expected a Hugging Face directory with config.json, a "
        "stage directory with final/, or a run directory"
    )


# ------------------------------------------------------------------------------------------
# The skeleton
# ------------------------------------------------------------------------------------------


def _check_writable(run_dir: str) -> None:
    """Fail before anything is written if ``run_dir`` cannot be created or written."""
    probe = os.path.abspath(run_dir)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise config_lib.ConfigError(
            f"run.dir={run_dir!r}: {probe} is a file, not a directory: choose another run.dir"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise config_lib.ConfigError(
            f"run.dir={run_dir!r}: {probe} is not writable: choose a run.dir you can write to"
        )


def _is_writer() -> bool:
    return jax.process_index() == 0


def write_config(cfg: ExperimentConfig) -> None:
    """Write the resolved config to ``<run.dir>/config.yaml`` (atomically; process 0 only)."""
    if not _is_writer():
        return
    os.makedirs(cfg.run.dir, exist_ok=True)
    path = os.path.join(cfg.run.dir, CONFIG_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(config_lib.to_yaml(cfg))
    os.replace(tmp, path)


def _tools(ctx: Context, plan: Plan):
    """The stage's Checkpointer and RunLogger (resuming where its checkpoints stand)."""
    from rlhf_jax.checkpoint import Checkpointer
    from rlhf_jax.logging import RunLogger

    cfg = ctx.cfg
    ckpt = Checkpointer(
        os.path.join(ctx.dir, "checkpoints"),
        save_every=plan.save_every,
        keep=cfg.run.keep_checkpoints,
    )
    latest = ckpt.latest_step()
    if latest is not None and not plan.loop.resume:
        ckpt.close()
        raise config_lib.ConfigError(
            f"{ctx.dir} holds checkpoints up to step {latest} but {ctx.stage}.trainer.loop.resume "
            "is false: choose a new run.dir, delete that directory, or resume"
        )
    logger = RunLogger(
        ctx.dir,
        tensorboard=cfg.run.tensorboard,
        wandb_project=cfg.run.wandb_project,
        progress_total=plan.loop.max_steps,
        progress=cfg.run.progress,
        resume_step=latest or 0,
        wandb_run_name=f"{os.path.basename(os.path.normpath(cfg.run.dir))}-{ctx.stage}",
        config=config_lib.to_dict(cfg),
    )
    return ckpt, logger


def _gathered(params: Any) -> Any:
    """``params`` as host numpy arrays on every process (a multi-process run gathers them)."""
    if jax.process_count() == 1:
        return params
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(params, tiled=True)


def save_final(stage_dir: str, outputs: Outputs, meta: Mapping[str, Any]) -> str:
    """Write ``outputs.model`` (+ tokenizer, + meta) as the Hugging Face directory ``final/``.

    A LoRA stage's ``outputs.adapter`` (merged weights in ``outputs.model``) also goes to
    ``final/adapter/`` in PEFT's format (:func:`rlhf_jax.lora.save_peft`).

    Written into a temporary directory and renamed into place, so ``final/`` is either the
    previous result or the whole new one, never half of it.
    """
    from rlhf_jax import models

    path = os.path.join(stage_dir, FINAL_DIR)
    model = outputs.model.replace(params=_gathered(outputs.model.params))
    adapter = outputs.adapter  # LoRA: the PEFT adapters beside the merged weights
    if adapter is not None:
        adapter = dataclasses.replace(adapter, adapters=_gathered(adapter.adapters))
    if not _is_writer():
        return path
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    models.save_pretrained(model, tmp)
    if adapter is not None:
        from rlhf_jax import lora

        lora.save_peft(adapter, os.path.join(tmp, ADAPTER_DIR))
    if outputs.tokenizer is not None:
        outputs.tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
        json.dump(_jsonable(dict(meta)), f, indent=2)
    old = f"{path}.old-{os.getpid()}"
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic | jax.Array | np.ndarray):
        return np.asarray(x).tolist()
    return x


def enable_compile_cache(run: RunConfig) -> str | None:
    """Turn on JAX's persistent compilation cache at ``run.compile_cache`` (or the environment
    variable ``RLHF_JAX_COMPILE_CACHE``); returns the directory, or None when it is off.

    The cache key is JAX's: the lowered program (shapes, dtypes, shardings, every static choice of
    the config), the compile options and XLA flags, the devices, and the jax/jaxlib versions; the
    directory is also per JAX version, so upgrading JAX starts a fresh one. Entries are written
    atomically by JAX, so several processes may share the directory.
    """
    value = os.environ.get("RLHF_JAX_COMPILE_CACHE", run.compile_cache)
    if not value or value.lower() in ("off", "none", "false", "0"):
        return None
    path = os.path.join(os.path.expanduser(value), f"jax-{jax.__version__}")
    if jax.config.jax_compilation_cache_dir != path:
        from jax.experimental.compilation_cache import compilation_cache

        os.makedirs(path, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        compilation_cache.reset_cache()  # takes effect even after an earlier compile
    return path


def run_stage(
    cfg: ExperimentConfig,
    name: str,
    *,
    devices: Sequence[Any] | None = None,
    verbose: bool = True,
) -> StageResult:
    """Run stage ``name`` of ``cfg`` through the skeleton (module docstring); see :class:`Plan`.

    Returns a :class:`StageResult`; ``result.preempted`` when SIGTERM stopped it (the state was
    saved: run the same command again to resume). Raises a :class:`rlhf_jax.errors.UserError`
    for bad input, before anything is written.
    """
    from rlhf_jax import parallel
    from rlhf_jax.checkpoint import check_preempted
    from rlhf_jax.train import run_loop

    if name not in STAGES:
        raise config_lib.ConfigError(f"unknown stage {name!r}; the stages are: {sorted(STAGES)}")
    say = print if verbose else (lambda *a, **k: None)
    parallel.initialize_distributed(cfg.parallel.distributed)
    enable_compile_cache(cfg.run)
    mesh = parallel.make_mesh(cfg.parallel.mesh, parallel.mesh_devices(cfg.parallel.mesh, devices))
    ctx = Context(cfg=cfg, stage=name, mesh=mesh, say=say)
    _check_writable(cfg.run.dir)
    check_preempted("start-up")
    # ---- a sweep (cfg.sweep.stage == name): the same skeleton on a stacked state, N runs in
    # one program per static configuration (rlhf_jax.sweep.run_sweep) ----
    from rlhf_jax import sweep

    runs = sweep.expand(cfg, name)
    if runs:
        return sweep.run_sweep(ctx, STAGES[name].prepare, runs)
    plan = STAGES[name].prepare(ctx)
    check_preempted("loading the models and data")
    # ---- everything above validated and loaded; from here on the run directory is written ----
    write_config(cfg)
    if plan.loop is None:  # a data stage
        outputs = plan.finish(None, None)
        return StageResult(name, ctx.dir, None, None, outputs)
    pcfg = cfg.parallel
    shardings = parallel.state_shardings(plan.state, mesh, pcfg.preset)
    state = jax.device_put(plan.state, shardings)
    step = plan.make_step(shardings)
    batches = parallel.shard_batches(plan.batches, mesh)
    ckpt, logger = _tools(ctx, plan)
    ctx.logger = logger
    try:
        check_preempted("placing the state", resume_step=ckpt.latest_step())
        result = run_loop(
            step,
            state,
            batches,
            loop=plan.loop,
            key=plan.key,
            eval_fn=plan.eval_fn,
            logger=logger,
            checkpointer=ckpt,
            meta={"stage": name},
        )
    except jax.errors.JaxRuntimeError:
        cause = plan.explain() if plan.explain is not None else None
        if cause is None:
            raise
        raise cause from None
    finally:
        logger.close()
        ckpt.close()
    if result.stop_reason == "preempted":
        print(
            f"[{name}] preempted at step {result.step}: checkpoint saved; run the same command "
            "again to resume",
            file=sys.stderr,
        )
        return StageResult(name, ctx.dir, None, result, None)
    outputs = plan.finish(result.state, result)
    if outputs.tokenizer is None:
        outputs.tokenizer = plan.tokenizer
    meta = {
        "stage": name,
        "step": result.step,
        "stop_reason": result.stop_reason,
        "info": outputs.info,
    }
    final = save_final(ctx.dir, outputs, meta)
    say(f"[{name}] {result.step} steps ({result.stop_reason}); result in {final}")
    return StageResult(name, ctx.dir, final, result, outputs)


# ------------------------------------------------------------------------------------------
# Sampling a model on a prompt dataset (label, RM normalisation, evaluation, generate)
# ------------------------------------------------------------------------------------------


def stop_tokens(tokenizer: Any, extra: Sequence[int] = (), *, at_eos: bool = True) -> tuple:
    """``extra`` plus the tokenizer's EOS id (when ``at_eos``), without repeats."""
    ids = [int(t) for t in extra]
    if at_eos and tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return tuple(dict.fromkeys(ids))


def pad_id(tokenizer: Any, default: int = 0) -> int:
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else default


def sample_responses(
    graphdef: Any,
    params: Any,
    prompt_tokens: np.ndarray,
    prompt_mask: np.ndarray,
    key: jax.Array,
    *,
    n: int = 1,
    max_new_tokens: int,
    sampling: Any = None,
    stop: Sequence[int] = (),
    pad_token_id: int = 0,
    chunk: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` responses to each prompt: ``(tokens, mask)`` ``[B * n, R]`` int32 (numpy).

    Sampling runs in chunks of ``chunk`` prompts (the last padded), so every call reuses one
    compiled sampler; sample ``i`` of prompt ``b`` draws from its (key, b, i) stream
    (:func:`rlhf_jax.rollout.sample`), whatever the chunking.
    """
    from rlhf_jax import rollout

    sampling = rollout.SamplingConfig() if sampling is None else sampling
    b = len(prompt_tokens)
    chunk = max(1, min(chunk, b))
    pad = -b % chunk
    pt = np.concatenate([prompt_tokens, np.repeat(prompt_tokens[:1], pad, 0)])
    pm = np.concatenate([prompt_mask, np.repeat(prompt_mask[:1], pad, 0)])
    tokens, masks = [], []
    for start in range(0, b + pad, chunk):
        out = rollout.sample(
            graphdef,
            params,
            jnp.asarray(pt[start : start + chunk]),
            jnp.asarray(pm[start : start + chunk]),
            key,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            stop_tokens=tuple(stop),
            n=n,
            prompt_index=jnp.arange(start, start + chunk, dtype=jnp.int32),
            pad_token_id=pad_token_id,
        )
        t, m = jax.device_get((out.tokens, out.mask))
        tokens.append(np.asarray(t, np.int32))
        masks.append(np.asarray(m, np.int32))
    return np.concatenate(tokens)[: b * n], np.concatenate(masks)[: b * n]


def decode(tokenizer: Any, tokens: np.ndarray, mask: np.ndarray, *, special: bool) -> list[str]:
    """Each row's text where ``mask == 1``; ``special=True`` keeps special tokens (a response's
    stop token stays in its text, so a function can tell a finished answer from a cut one)."""
    from rlhf_jax.reward_fn import decode_masked

    return decode_masked(tokenizer, tokens, mask, skip_special_tokens=not special)


# The stages themselves are in rlhf_jax.stages (imported here so that they are registered).
from rlhf_jax import stages as _stages  # noqa: E402, F401

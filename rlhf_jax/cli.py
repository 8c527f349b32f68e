"""The ``rlhf-jax`` command: parse, build the config, call the library. Nothing else lives here.

::

    rlhf-jax sft        [--config FILE] [--dry-run] [--print-config] [KEY.PATH=VALUE ...]
    rlhf-jax rm         [--config FILE] [--dry-run] [--print-config] [KEY.PATH=VALUE ...]
    rlhf-jax ppo        [--config FILE] [--dry-run] [--print-config] [KEY.PATH=VALUE ...]
    rlhf-jax quickstart [--config FILE] [--print-config] [KEY.PATH=VALUE ...]
    rlhf-jax export RUN_DIR OUT_DIR [--stage ppo|sft] [--no-reward-model]
    rlhf-jax report RUN_DIR [RUN_DIR ...] [--out PNG] [--metrics KEY ...] [--smooth A]

The command line is parsed with tyro; configs are loaded by :func:`rlhf_jax.config.load_config`.
``rlhf-jax SUBCOMMAND --help`` lists every config key with its type, default and meaning.

Exit status: 0 done; 1 bad data, an unreadable checkpoint or a non-finite loss; 2 a bad config or
command line; 3 preempted (SIGTERM: the state was saved; run the same command again to resume).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import tyro

from rlhf_jax import config as config_lib
from rlhf_jax import pipeline

__all__ = [
    "main",
    "run_sft",
    "run_rm",
    "run_ppo",
    "export",
    "dry_run",
    "TrainArgs",
    "QuickstartArgs",
    "ExportArgs",
    "ReportArgs",
]

_TRAIN = ("sft", "rm", "ppo", "quickstart")
_Overrides = Annotated[
    tuple[str, ...], tyro.conf.Positional, tyro.conf.arg(metavar="[KEY.PATH=VALUE ...]")
]


@dataclasses.dataclass(frozen=True)
class TrainArgs:
    """Arguments shared by the training subcommands."""

    overrides: _Overrides = ()  # KEY.PATH=VALUE settings, applied after --config
    config: Path | None = None  # a YAML preset, e.g. experiments/configs/toy.yaml; None = defaults
    dry_run: bool = False  # build the config and mesh, compile the step, print memory, and exit
    print_config: bool = False  # print the resolved config as commented YAML and exit


@dataclasses.dataclass(frozen=True)
class QuickstartArgs:
    """Arguments of ``rlhf-jax quickstart``."""

    overrides: _Overrides = ()  # KEY.PATH=VALUE settings, applied after --config
    config: Path | None = None  # a YAML preset; None = experiments/configs/toy.yaml's settings
    print_config: bool = False  # print the resolved config as commented YAML and exit


@dataclasses.dataclass(frozen=True)
class ExportArgs:
    """Arguments of ``rlhf-jax export``."""

    run_dir: tyro.conf.Positional[Path]  # the run directory (run.dir of the training config)
    out_dir: tyro.conf.Positional[Path]  # where the Hugging Face directories are written
    stage: Literal["auto", "ppo", "sft"] = "auto"  # policy source; auto = ppo if it ran, else sft
    reward_model: bool = True  # also export the reward model (OUT_DIR/reward_model) if trained


@dataclasses.dataclass(frozen=True)
class ReportArgs:
    """Arguments of ``rlhf-jax report``."""

    run_dirs: tyro.conf.Positional[tuple[Path, ...]]  # one or more run (stage) directories
    out: Path | None = None  # PNG path; default RUN_DIR/report.png, or ./report.png for several
    metrics: tuple[str, ...] = ()  # plot exactly these metric keys instead of the standard panels
    smooth: float = 0.0  # exponential-moving-average weight in [0, 1) applied to every curve


_DESCRIPTIONS = {
    "sft": "Supervised fine-tuning of a pretrained LM on demonstrations (stage 1).",
    "rm": "Train a reward model from pairwise or K-wise human comparisons (stage 2).",
    "ppo": "PPO against the reward model with a KL penalty to the frozen SFT policy (stage 3).",
    "quickstart": "SFT -> reward model -> PPO end to end, then a report (default: the toy task).",
    "export": "Write the final policy (and reward model) in Hugging Face format.",
    "report": "Plot the curves of one or more runs to a PNG and print a summary table.",
}

_Command = (
    Annotated[TrainArgs, tyro.conf.subcommand("sft", description=_DESCRIPTIONS["sft"])]
    | Annotated[TrainArgs, tyro.conf.subcommand("rm", description=_DESCRIPTIONS["rm"])]
    | Annotated[TrainArgs, tyro.conf.subcommand("ppo", description=_DESCRIPTIONS["ppo"])]
    | Annotated[
        QuickstartArgs, tyro.conf.subcommand("quickstart", description=_DESCRIPTIONS["quickstart"])
    ]
    | Annotated[ExportArgs, tyro.conf.subcommand("export", description=_DESCRIPTIONS["export"])]
    | Annotated[ReportArgs, tyro.conf.subcommand("report", description=_DESCRIPTIONS["report"])]
)

_EPILOG = """\
Config keys (set any with KEY.PATH=VALUE after --config; values are YAML, e.g. 1e-5, true, null,
[1,2]). Shown with their built-in defaults; --print-config shows the values after --config:
"""


def _fail(message: str, code: int = 2) -> int:
    print(f"rlhf-jax: error: {message}", file=sys.stderr)
    return code


def _print_help_keys(sub: str) -> None:
    if sub == "quickstart":
        from rlhf_jax.quickstart import QuickstartConfig

        cfg = QuickstartConfig()
    else:
        cfg = pipeline.ExperimentConfig()
    print()
    print(_EPILOG)
    print(config_lib.describe(cfg))


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``rlhf-jax`` on ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    sub = argv[0] if argv else None
    try:
        args = tyro.cli(
            _Command,
            args=argv,
            prog="rlhf-jax",
            description="rlhf-jax: RLHF for language models in JAX (SFT, reward model, PPO).",
            console_outputs=True,
        )
    except SystemExit as exit_:
        if exit_.code == 0 and sub in _TRAIN and ("-h" in argv or "--help" in argv):
            _print_help_keys(sub)
        return int(exit_.code or 0)
    try:
        if sub in _TRAIN:
            return _train(sub, args)
        if sub == "export":
            return _export(args)
        return _report(args)
    except config_lib.ConfigError as err:
        return _fail(str(err))
    except _user_errors() as err:  # bad data, an unreadable checkpoint, a non-finite loss
        return _fail(str(err), 1)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message already says what is wrong and what to do (no traceback needed)."""
    from rlhf_jax.checkpoint import CheckpointError
    from rlhf_jax.data.formats import DataError
    from rlhf_jax.train import NonFiniteError

    return (CheckpointError, DataError, NonFiniteError)


def _resolve(args, cls=None):
    return config_lib.load_config(args.config, list(args.overrides), cls=cls)


def _train(stage: str, args) -> int:
    if stage == "quickstart":
        from rlhf_jax import quickstart

        cfg = _resolve(args, quickstart.QuickstartConfig)
        if args.print_config:
            print(config_lib.to_yaml(cfg), end="")
            return 0
        quickstart.run(cfg)
        return 0
    cfg = _resolve(args)
    if args.print_config:
        print(config_lib.to_yaml(cfg), end="")
        return 0
    if args.dry_run:
        print(dry_run(stage, cfg))
        return 0
    result = {"sft": run_sft, "rm": run_rm, "ppo": run_ppo}[stage](cfg)
    return 0 if result is not None else 3


def _export(args: ExportArgs) -> int:
    written = export(args.run_dir, args.out_dir, stage=args.stage, reward_model=args.reward_model)
    for path in written:
        print(f"wrote {path}")
    return 0


def _report(args: ReportArgs) -> int:
    from rlhf_jax.report import report

    try:
        png, table = report(
            list(args.run_dirs), args.out, metrics=list(args.metrics) or None, smooth=args.smooth
        )
    except (FileNotFoundError, KeyError, ValueError) as err:
        return _fail(str(err).strip("'\""), 1)
    print(table)
    print(f"\nwrote {png}")
    return 0


# ------------------------------------------------------------------------------------------
# The stages on Hugging Face checkpoints and data files (what the subcommands call; importable)
# ------------------------------------------------------------------------------------------

CONFIG_FILE = "config.yaml"  # the resolved config, written into run.dir by every stage
FINAL_DIR = "final"  # <stage dir>/final: the stage's resulting parameters (Orbax, atomic)
TOKENIZER_DIR = "tokenizer"  # <run.dir>/sft/tokenizer: the tokenizer every later stage uses


def _require(value, key: str, what: str) -> None:
    if not value:
        raise config_lib.ConfigError(f"{key} is not set: {what}")
    if isinstance(value, str) and not os.path.exists(value):
        raise config_lib.ConfigError(f"{key}={value!r}: no such file or directory ({what})")


def _load_model(cfg, path: str):
    from rlhf_jax import models

    return models.from_pretrained(
        path,
        dtype=cfg.run.dtype,
        param_dtype=cfg.run.param_dtype,
        scan_unroll=cfg.run.scan_unroll,
    )


def _with_vocab(data, model):
    if data.vocab_size is None:
        return dataclasses.replace(data, vocab_size=model.config.vocab_size)
    return data


def _deterministic_batches(dataset, batch_size: int, seed: int, rename=None):
    """``batches(s)``: batch ``s`` of the seeded epoch order, so a resumed run sees the same data.

    Step ``s`` reads epoch ``s // batches_per_epoch``, chunk ``s % batches_per_epoch`` of
    :func:`rlhf_jax.data.formats.epoch_permutation` (the data cursor is the step itself). Each
    process reads only its own rows of that global batch (:func:`rlhf_jax.parallel.process_rows`);
    the trainer assembles the global arrays with ``jax.make_array_from_process_local_data``.
    """
    from rlhf_jax import parallel
    from rlhf_jax.data import formats

    n = len(dataset)
    if not 1 <= batch_size <= n:
        raise config_lib.ConfigError(
            f"batch size {batch_size} does not fit {dataset.source} ({n} usable rows): lower the "
            "stage's batch_size or give more data"
        )
    per_epoch = n // batch_size
    mine = parallel.process_rows(batch_size)
    cache: dict[int, np.ndarray] = {}

    def get(s: int):
        epoch, i = divmod(int(s), per_epoch)
        if epoch not in cache:
            cache.clear()
            cache[epoch] = formats.epoch_permutation(n, seed, epoch)
        batch = dataset.take(cache[epoch][i * batch_size : (i + 1) * batch_size][mine])
        for old, new in (rename or {}).items():
            batch[new] = batch.pop(old)
        return batch

    return get


def _eval_rows(path, tokenizer, data_cfg, size):
    if path is None:
        return None
    from rlhf_jax.data import formats

    _require(path, "eval_file", "a held-out data file")
    ds = formats.load_dataset(path, tokenizer, data_cfg)
    return ds.take(np.arange(min(len(ds), size)))


def _is_writer() -> bool:
    import jax

    return jax.process_index() == 0


def _write_config(cfg) -> None:
    if not _is_writer():
        return
    os.makedirs(cfg.run.dir, exist_ok=True)
    path = os.path.join(cfg.run.dir, CONFIG_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(config_lib.to_yaml(cfg))
    os.replace(tmp, path)


def _tools(cfg, stage: str, loop, save_every: int):
    """The stage's Checkpointer and RunLogger (resuming where its checkpoints stand)."""
    from rlhf_jax.checkpoint import Checkpointer
    from rlhf_jax.logging import RunLogger

    stage_dir = cfg.run.stage_dir(stage)
    ckpt = Checkpointer(
        os.path.join(stage_dir, "checkpoints"), save_every=save_every, keep=cfg.run.keep_checkpoints
    )
    latest = ckpt.latest_step()
    if latest is not None and not loop.resume:
        ckpt.close()
        raise config_lib.ConfigError(
            f"{stage_dir} holds checkpoints up to step {latest} but {stage}.trainer.loop.resume is "
            "false: choose a new run.dir, delete that directory, or resume"
        )
    logger = RunLogger(
        stage_dir,
        tensorboard=cfg.run.tensorboard,
        wandb_project=cfg.run.wandb_project,
        progress_total=loop.max_steps,
        progress=cfg.run.progress,
        resume_step=latest or 0,
        wandb_run_name=f"{os.path.basename(os.path.normpath(cfg.run.dir))}-{stage}",
        config=config_lib.to_dict(cfg),
    )
    return ckpt, logger


def _save_final(cfg, stage: str, params, result, meta) -> str | None:
    """Write the stage's resulting parameters to ``<stage dir>/final`` (atomically)."""
    from rlhf_jax.checkpoint import Checkpointer

    if result.stop_reason == "preempted":
        print(
            f"[{stage}] preempted at step {result.step}: checkpoint saved; run the same command "
            "again to resume",
            file=sys.stderr,
        )
        return None
    path = os.path.join(cfg.run.stage_dir(stage), FINAL_DIR)
    with Checkpointer(path, save_every=0, keep=1, handle_sigterm=False) as final:
        latest = final.latest_step()
        if latest is not None and latest > result.step:
            raise config_lib.ConfigError(
                f"{path} already holds the result of step {latest}, not {result.step}: this "
                f"run.dir was used by another {stage} run; choose a new run.dir"
            )
        final.save(result.step, {"params": params}, {"stage": stage, **meta}, force=True)
    print(f"[{stage}] {result.step} steps ({result.stop_reason}); result in {path}")
    return path


def _load_final(cfg, stage: str, template_params, command: str):
    from rlhf_jax.checkpoint import Checkpointer, abstract_like

    path = os.path.join(cfg.run.stage_dir(stage), FINAL_DIR)
    if not os.path.isdir(path):
        raise config_lib.ConfigError(
            f"no {stage} result in {path}: run `rlhf-jax {command}` with the same run.dir first"
        )
    with Checkpointer(path, save_every=0, keep=1, handle_sigterm=False) as final:
        restored = final.restore_latest(abstract_like({"params": template_params}))
    if restored is None:
        raise config_lib.ConfigError(f"{path} holds no finished {stage} result: rerun {command}")
    return restored[1]["params"], restored[2]


def _sft_result(cfg):
    """``(SFT model record, tokenizer)`` from this run's SFT stage."""
    from rlhf_jax import models

    _require(cfg.sft.model, "sft.model", "the base checkpoint the SFT stage started from")
    final = os.path.join(cfg.run.stage_dir("sft"), FINAL_DIR)
    if not os.path.isdir(final):
        raise config_lib.ConfigError(
            f"no sft result in {final}: run `rlhf-jax sft` with the same run.dir first"
        )
    base = _load_model(cfg, cfg.sft.model)
    params, _ = _load_final(cfg, "sft", base.params, "sft")
    tok_dir = os.path.join(cfg.run.stage_dir("sft"), TOKENIZER_DIR)
    return base.replace(params=params), models.load_tokenizer(tok_dir)


def _rm_template(sft_model, seed: int):
    import jax

    from rlhf_jax.algorithms import reward_model as rm_lib

    return rm_lib.init_reward_model(sft_model, jax.random.PRNGKey(seed))


def _mesh(cfg, devices):
    """The stage's mesh from ``cfg.parallel.mesh`` over ``devices`` (default all of the job's)."""
    from rlhf_jax import parallel

    return parallel.make_mesh(cfg.parallel.mesh, devices)


def run_sft(cfg: pipeline.ExperimentConfig, *, devices=None):
    """Stage 1 on a Hugging Face checkpoint; returns the trained model record (None if preempted).

    Writes ``<run.dir>/sft/``: ``metrics.jsonl``, TensorBoard events, ``checkpoints/``, ``final/``
    (the result) and ``tokenizer/``. Runs on the mesh of ``cfg.parallel`` over ``devices``
    (default every device of the job): state placed by ``parallel.preset``, batches split over
    ``('data', 'fsdp')``, ``parallel.step`` picks the ``jit`` or ``shard_map`` step.
    """
    import jax

    from rlhf_jax import models, parallel
    from rlhf_jax.algorithms import sft as sft_lib
    from rlhf_jax.data import formats

    st = cfg.sft
    _require(st.model, "sft.model", "a Hugging Face checkpoint directory, e.g. sft.model=gpt2-dir")
    _require(st.train_file, "sft.train_file", "a JSONL/JSON/Parquet file of prompt/completion rows")
    parallel.initialize_distributed(cfg.parallel.distributed)
    mesh = _mesh(cfg, devices)
    tokenizer = models.load_tokenizer(st.tokenizer or st.model)
    model = _load_model(cfg, st.model)
    data_cfg = _with_vocab(st.data, model)
    train = formats.load_dataset(st.train_file, tokenizer, data_cfg)
    eval_batch = _eval_rows(st.eval_file, tokenizer, data_cfg, st.eval_size)
    _write_config(cfg)
    if _is_writer():
        tokenizer.save_pretrained(os.path.join(cfg.run.stage_dir("sft"), TOKENIZER_DIR))
    ckpt, logger = _tools(cfg, "sft", st.trainer.loop, st.save_every)
    try:
        trained, result = sft_lib.run(
            st.trainer,
            model,
            _deterministic_batches(train, st.trainer.batch_size, cfg.run.seed),
            key=jax.random.PRNGKey(cfg.run.seed),
            eval_batch=eval_batch,
            logger=logger,
            checkpointer=ckpt,
            mesh=mesh,
            parallel_cfg=cfg.parallel,
        )
    finally:
        logger.close()
        ckpt.close()
    meta = {"base_model": st.model, "stop_reason": result.stop_reason}
    return trained if _save_final(cfg, "sft", trained.params, result, meta) else None


def _sample_for_normalization(model, tokenizer, dataset, n: int, max_new_tokens: int, seed: int):
    """Prompts of ``dataset`` answered by ``model``: ``{tokens, attention_mask}`` [n, P+R]."""
    import jax
    import jax.numpy as jnp

    from rlhf_jax import rollout

    rows = dataset.take(np.arange(n) % len(dataset))
    pt, pm = rows["prompt_tokens"], rows["prompt_mask"]
    stop = (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()
    out = rollout.sample(
        model.graphdef,
        model.params,
        jnp.asarray(pt),
        jnp.asarray(pm),
        jax.random.PRNGKey(seed),
        max_new_tokens=max_new_tokens,
        sampling=rollout.SamplingConfig(temperature=1.0),
        stop_tokens=stop,
        pad_token_id=tokenizer.pad_token_id or 0,
    )
    return {
        "tokens": np.concatenate([pt, np.asarray(out.tokens, np.int32)], axis=1),
        "attention_mask": np.concatenate([pm, np.asarray(out.mask, np.int32)], axis=1),
    }


def run_rm(cfg: pipeline.ExperimentConfig, *, devices=None):
    """Stage 2: a reward model from this run's SFT result (or ``rm.model``); returns its record.

    Writes ``<run.dir>/rm/``: logs, ``checkpoints/`` and ``final/`` (the normalised result). Runs
    on the mesh of ``cfg.parallel`` over ``devices``, as :func:`run_sft`.
    """
    import jax

    from rlhf_jax import models, parallel
    from rlhf_jax.algorithms import reward_model as rm_lib
    from rlhf_jax.data import formats

    st = cfg.rm
    _require(st.train_file, "rm.train_file", "a JSONL/JSON/Parquet file of comparison rows")
    parallel.initialize_distributed(cfg.parallel.distributed)
    mesh = _mesh(cfg, devices)
    if st.model is None:
        sft_model, tokenizer = _sft_result(cfg)
    else:
        _require(st.model, "rm.model", "a Hugging Face checkpoint directory")
        sft_model = _load_model(cfg, st.model)
        tokenizer = models.load_tokenizer(st.tokenizer or st.model)
    if st.tokenizer is not None:
        tokenizer = models.load_tokenizer(st.tokenizer)
    data_cfg = _with_vocab(st.data, sft_model)
    train = formats.load_dataset(st.train_file, tokenizer, data_cfg)
    eval_batch = _eval_rows(st.eval_file, tokenizer, data_cfg, st.eval_size)
    normalize_on = None
    if st.trainer.normalize and st.normalize_samples > 0:
        normalize_on = _sample_for_normalization(
            sft_model,
            tokenizer,
            train,
            st.normalize_samples,
            data_cfg.max_completion_length,
            cfg.run.seed + 1,
        )
    _write_config(cfg)
    ckpt, logger = _tools(cfg, "rm", st.trainer.loop, st.save_every)
    try:
        rm_model, result, info = rm_lib.run(
            st.trainer,
            sft_model,
            _deterministic_batches(train, st.trainer.batch_size, cfg.run.seed),
            key=jax.random.PRNGKey(cfg.run.seed),
            eval_batch=eval_batch,
            normalize_on=normalize_on,
            logger=logger,
            checkpointer=ckpt,
            mesh=mesh,
            parallel_cfg=cfg.parallel,
        )
    finally:
        logger.close()
        ckpt.close()
    meta = {"base_model": st.model, "stop_reason": result.stop_reason, "info": info}
    return rm_model if _save_final(cfg, "rm", rm_model.params, result, meta) else None


def _rm_result(cfg, sft_model):
    template = _rm_template(sft_model, cfg.run.seed)
    params, _ = _load_final(cfg, "rm", template.params, "rm")
    return template.replace(params=params)


def _policy_params(params):
    """The policy's parameters without a shared critic's value head (the SFT layout)."""
    from flax import nnx

    if isinstance(params, nnx.State) and "value_head" in params:
        return nnx.State({k: v for k, v in params.items() if k != "value_head"})
    return params


def run_ppo(cfg: pipeline.ExperimentConfig, *, devices=None):
    """Stage 3: PPO from this run's SFT result against its reward model; returns the policy.

    Writes ``<run.dir>/ppo/``: logs, ``checkpoints/`` and ``final/`` (the policy, LM head only).
    Runs on the mesh of ``cfg.parallel`` over ``devices``: policy, critic, optimizer state and
    the frozen reference and reward model placed by ``parallel.preset``, prompts split over
    ``('data', 'fsdp')``; the iteration is the ``jit`` form whatever ``parallel.step``.
    """
    from rlhf_jax import parallel
    from rlhf_jax.algorithms import ppo as ppo_lib
    from rlhf_jax.data import formats

    st = cfg.ppo
    _require(st.prompts_file, "ppo.prompts_file", "a JSONL/JSON/Parquet file of prompt rows")
    parallel.initialize_distributed(cfg.parallel.distributed)
    mesh = _mesh(cfg, devices)
    sft_model, tokenizer = _sft_result(cfg)
    rm_model = None if st.trainer.reward_fn else _rm_result(cfg, sft_model)
    trainer = st.trainer
    if st.stop_at_eos and tokenizer.eos_token_id is not None:
        stops = tuple(dict.fromkeys((*trainer.stop_tokens, int(tokenizer.eos_token_id))))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else trainer.pad_token_id
        trainer = dataclasses.replace(trainer, stop_tokens=stops, pad_token_id=int(pad))
    prompts = formats.load_dataset(st.prompts_file, tokenizer, _with_vocab(st.data, sft_model))
    _write_config(cfg)
    ckpt, logger = _tools(cfg, "ppo", trainer.loop, st.save_every)
    try:
        policy, result = ppo_lib.run(
            trainer,
            sft_model,
            rm_model,
            _deterministic_batches(
                prompts, st.batch_size, cfg.run.seed, rename={"index": "prompt_index"}
            ),
            tokenizer=tokenizer,
            logger=logger,
            checkpointer=ckpt,
            mesh=mesh,
            parallel_cfg=cfg.parallel,
        )
    finally:
        logger.close()
        ckpt.close()
    params = _policy_params(policy.params)
    meta = {"stop_reason": result.stop_reason}
    return policy if _save_final(cfg, "ppo", params, result, meta) else None


def export(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    stage: str = "auto",
    reward_model: bool = True,
) -> list[str]:
    """Write the run's final policy (and reward model) as Hugging Face directories.

    ``OUT_DIR/policy`` (the PPO result, or the SFT result when PPO did not run or ``stage="sft"``)
    and ``OUT_DIR/reward_model``, each with the tokenizer, via
    :func:`rlhf_jax.models.save_pretrained`. Returns the directories written.
    """
    from rlhf_jax import models

    run_dir, out_dir = os.fspath(run_dir), os.fspath(out_dir)
    config_path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.exists(config_path):
        raise config_lib.ConfigError(
            f"{config_path} does not exist: RUN_DIR must be the run.dir of a training run "
            "(rlhf-jax sft/rm/ppo write config.yaml there)"
        )
    cfg = config_lib.load_config(config_path)
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=run_dir))
    if stage == "auto":
        ppo_done = os.path.isdir(os.path.join(cfg.run.stage_dir("ppo"), FINAL_DIR))
        stage = "ppo" if ppo_done else "sft"
    sft_model, tokenizer = _sft_result(cfg)
    written = []
    policy = sft_model
    if stage == "ppo":
        params, _ = _load_final(cfg, "ppo", sft_model.params, "ppo")
        policy = sft_model.replace(params=params)
    elif stage != "sft":
        raise config_lib.ConfigError(f"export stage={stage!r}: choose 'auto', 'ppo' or 'sft'")
    path = os.path.join(out_dir, "policy")
    models.save_pretrained(policy, path)
    tokenizer.save_pretrained(path)
    written.append(path)
    if reward_model and os.path.isdir(os.path.join(cfg.run.stage_dir("rm"), FINAL_DIR)):
        rm = _rm_result(cfg, sft_model)
        path = os.path.join(out_dir, "reward_model")
        models.save_pretrained(rm, path)
        tokenizer.save_pretrained(path)
        written.append(path)
    return written


def dry_run(stage: str, cfg: pipeline.ExperimentConfig) -> str:
    """Compile the stage's train step from abstract shapes on ``cfg.parallel`` and report memory.

    Uses :func:`rlhf_jax.parallel.dry_run` (an SFT-style token-loss step of the stage's model,
    batch and sequence length: the policy update that dominates every stage's memory).
    """
    import json

    from rlhf_jax import parallel
    from rlhf_jax.models import hf

    _require(cfg.sft.model, "sft.model", "the base checkpoint whose config.json sizes the model")
    config_file = os.path.join(cfg.sft.model, "config.json")
    _require(config_file, "sft.model", "a Hugging Face checkpoint directory with config.json")
    with open(config_file, encoding="utf-8") as f:
        model_config = hf.config_from_hf(
            json.load(f),
            dtype=cfg.run.dtype,
            param_dtype=cfg.run.param_dtype,
            scan_unroll=cfg.run.scan_unroll,
            source=config_file,
        )
    if stage == "sft":
        batch = cfg.sft.trainer.batch_size
        seq = cfg.sft.data.max_prompt_length + cfg.sft.data.max_completion_length
        optim = cfg.sft.trainer.optim
    elif stage == "rm":
        k = cfg.rm.data.num_completions or 2 if cfg.rm.data.kind == "ranking" else 2
        batch = cfg.rm.trainer.batch_size * k
        seq = cfg.rm.data.max_prompt_length + cfg.rm.data.max_completion_length
        optim = cfg.rm.trainer.optim
    else:
        t = cfg.ppo.trainer
        batch = cfg.ppo.batch_size * t.num_samples // t.num_minibatches
        seq = cfg.ppo.data.max_prompt_length + t.response_length
        optim = t.optim
    report = parallel.dry_run(
        model_config,
        cfg.parallel,
        batch_size=batch,
        seq_len=seq,
        optim=optim,
        name=f"{stage} {os.path.basename(os.path.normpath(cfg.sft.model))} B={batch} T={seq}",
    )
    return parallel.format_memory_table([report])


if __name__ == "__main__":
    sys.exit(main())

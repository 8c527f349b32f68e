"""The ``rlhf-jax`` command: parse, build the config, call the pipeline. Nothing else lives here.

::

    rlhf-jax STAGE      [--config FILE] [--dry-run] [--print-config] [KEY.PATH=VALUE ...]
                        (one subcommand per pipeline stage: sft, label, rm, ppo)
    rlhf-jax quickstart [--config FILE] [--print-config] [KEY.PATH=VALUE ...]
    rlhf-jax generate   MODEL PROMPTS OUT [--n N] [--max-new-tokens R] [--temperature T] ...
    rlhf-jax evaluate   [RESPONSES] (--reward-model RM | --function MOD:FN)
                        [--policy-a A --policy-b B --prompts FILE] [--out FILE]
    rlhf-jax export     RUN_DIR OUT_DIR [--stage auto|ppo|grpo|dpo|sft] [--no-reward-model]
    rlhf-jax report     RUN_DIR [RUN_DIR ...] [--out PNG] [--metrics KEY ...] [--smooth A]

The command line is parsed with tyro; configs are loaded by :func:`rlhf_jax.config.load_config`.
``rlhf-jax SUBCOMMAND --help`` lists every config key with its type, default and meaning.

Every error that bad input causes is one line, ``rlhf-jax: error: <what, where, what to do>``
(:mod:`rlhf_jax.errors`); ``--debug`` anywhere on the line shows the traceback instead. Exit
status: 0 done; 1 bad data, a bad model directory, an unreadable checkpoint, a failing reward
function or a non-finite loss; 2 a bad command line or config; 3 preempted (SIGTERM: the state was
saved; run the same command again to resume).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Union

import tyro

from rlhf_jax import config as config_lib
from rlhf_jax import pipeline
from rlhf_jax.errors import UsageError, UserError

__all__ = [
    "EvaluateArgs",
    "ExportArgs",
    "GenerateArgs",
    "ReportArgs",
    "TrainArgs",
    "export",
    "main",
]

_Overrides = Annotated[
    tuple[str, ...], tyro.conf.Positional, tyro.conf.arg(metavar="[KEY.PATH=VALUE ...]")
]


@dataclasses.dataclass(frozen=True)
class TrainArgs:
    """Arguments of the stage subcommands and ``quickstart``."""

    overrides: _Overrides = ()  # KEY.PATH=VALUE settings, applied after --config
    config: Path | None = None  # a YAML config, e.g. experiments/configs/toy.yaml
    dry_run: bool = False  # build the config and mesh, compile the step, print memory, and exit
    print_config: bool = False  # print the resolved config as commented YAML and exit


@dataclasses.dataclass(frozen=True)
class GenerateArgs:
    """Arguments of ``rlhf-jax generate``."""

    model: tyro.conf.Positional[str]  # a Hugging Face directory, a run's stage dir, or a run dir
    prompts: tyro.conf.Positional[str]  # JSONL/JSON/Parquet rows {prompt} or {messages}
    out: tyro.conf.Positional[str]  # JSONL written: {index, sample, prompt, response} per row
    n: int = 1  # samples per prompt
    max_new_tokens: int = 64  # response length limit
    temperature: float = 1.0  # sampling temperature
    top_p: float = 1.0  # nucleus mass (1 = off)
    top_k: int = 0  # top-k (0 = off)
    max_prompt_length: int = 128  # prompts longer than this are dropped (counted)
    seed: int = 0  # sample i of prompt row g draws from the (seed, g, i) stream
    limit: int | None = None  # only the first N prompts


@dataclasses.dataclass(frozen=True)
class EvaluateArgs:
    """Arguments of ``rlhf-jax evaluate``: score responses, or the win rate of policy A over B."""

    responses: tyro.conf.Positional[str | None] = None  # rows {prompt, response} to score
    reward_model: str | None = None  # a *ForSequenceClassification directory or a run (its rm)
    function: str | None = None  # or "module:function" (prompts, responses) -> scores
    policy_a: str | None = None  # compare: policy A (a model, stage or run directory)
    policy_b: str | None = None  # compare: policy B (sampled with the same keys as A)
    prompts: str | None = None  # compare: the prompts both policies answer
    n: int = 1  # compare: samples per prompt
    max_new_tokens: int = 64  # compare: response length limit
    temperature: float = 1.0  # compare: sampling temperature
    seed: int = 0  # compare: sampling seed
    out: str | None = None  # write the scored rows here (JSONL)


@dataclasses.dataclass(frozen=True)
class ExportArgs:
    """Arguments of ``rlhf-jax export``."""

    run_dir: tyro.conf.Positional[Path]  # the run directory (run.dir of the training config)
    out_dir: tyro.conf.Positional[Path]  # where the Hugging Face directories are written
    stage: str = "auto"  # the policy's stage (ppo, grpo, dpo, sft); auto = the latest written
    reward_model: bool = True  # also export the reward model (OUT_DIR/reward_model) if trained
    run: int | None = None  # a sweep's run K (<stage>/runs/K/final); None = the stage's final/


@dataclasses.dataclass(frozen=True)
class ReportArgs:
    """Arguments of ``rlhf-jax report``."""

    run_dirs: tyro.conf.Positional[tuple[Path, ...]]  # one or more run (stage) directories
    out: Path | None = None  # PNG path; default RUN_DIR/report.png, or ./report.png for several
    metrics: tuple[str, ...] = ()  # plot exactly these metric keys instead of the standard panels
    smooth: float = 0.0  # exponential-moving-average weight in [0, 1) applied to every curve
    compare: tuple[str, ...] = ()  # a sweep: two configurations (labels or table indices)
    metric: str | None = None  # a sweep: the compared metric (default eval/win_rate, eval/gold..)


_TOOLS = {
    "quickstart": (
        TrainArgs,
        "SFT -> label -> reward model -> PPO on the embedded toy task, then a report.",
    ),
    "generate": (GenerateArgs, "Sample a policy on a prompts file, to JSONL."),
    "evaluate": (
        EvaluateArgs,
        "Score responses with a reward model or function, or the win rate of policy A over B.",
    ),
    "export": (ExportArgs, "Copy a run's final policy (and reward model) as Hugging Face dirs."),
    "report": (ReportArgs, "Plot the curves of one or more runs to a PNG and print a table."),
}


def _commands() -> dict[str, tuple[type, str]]:
    stages = {name: (TrainArgs, st.description) for name, st in pipeline.STAGES.items()}
    return stages | _TOOLS


_EPILOG = """\
Config keys (set any with KEY.PATH=VALUE after --config; values are YAML, e.g. 1e-5, true, null,
[1,2]). Shown with their built-in defaults; --print-config shows the values after --config:
"""


def _fail(message: str, code: int = 2) -> int:
    print(f"rlhf-jax: error: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``rlhf-jax`` on ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    from rlhf_jax.checkpoint import Preempted, install_sigterm_handler

    install_sigterm_handler()  # first thing: a SIGTERM during start-up is seen, and exits 3
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    commands = _commands()
    sub = argv[0] if argv else None
    if sub is not None and sub not in commands and sub.replace("-", "_") in pipeline.STAGES:
        sub = argv[0] = sub.replace("-", "_")  # `rlhf-jax safe-ppo` is the safe_ppo stage
    if sub is not None and not sub.startswith("-") and sub not in commands:
        return _fail(f"unknown command {sub!r}; the commands are: {', '.join(commands)}")
    union = Union[  # noqa: UP007 - a runtime-built union of subcommands
        tuple(
            Annotated[cls, tyro.conf.subcommand(name, description=text)]
            for name, (cls, text) in commands.items()
        )
    ]
    try:
        args = tyro.cli(
            union,
            args=argv,
            prog="rlhf-jax",
            description="rlhf-jax: RLHF for language models in JAX.",
            console_outputs=True,
        )
    except SystemExit as exit_:
        if exit_.code == 0 and isinstance(sub, str) and ("-h" in argv or "--help" in argv):
            if commands.get(sub, (None,))[0] is TrainArgs:
                print()
                print(_EPILOG)
                print(config_lib.describe(_base(sub) or pipeline.ExperimentConfig()))
        return int(exit_.code or 0)
    try:
        if sub == "quickstart":
            return _quickstart(args)
        if sub in pipeline.STAGES:
            return _stage(sub, args)
        return {"generate": _generate, "evaluate": _evaluate, "export": _export}.get(sub, _report)(
            args
        )
    except UserError as err:
        if debug:
            raise
        return _fail(str(err), err.exit_code)
    except Preempted as err:
        print(f"rlhf-jax: {err}", file=sys.stderr)
        return err.exit_code


def _base(sub: str):
    if sub != "quickstart":
        return None
    from rlhf_jax import quickstart

    return quickstart.default_config()


def _resolve(args: TrainArgs, sub: str) -> pipeline.ExperimentConfig:
    return config_lib.load_config(args.config, list(args.overrides), base=_base(sub))


def _stage(stage: str, args: TrainArgs) -> int:
    cfg = _resolve(args, stage)
    if args.print_config:
        print(config_lib.to_yaml(cfg), end="")
        return 0
    if args.dry_run:
        print(dry_run(stage, cfg))
        return 0
    result = pipeline.run_stage(cfg, stage)
    return 3 if result.preempted else 0


def _quickstart(args: TrainArgs) -> int:
    from rlhf_jax import quickstart

    if args.dry_run:
        raise UsageError("quickstart has no --dry-run: run a stage with --dry-run instead")
    cfg = _resolve(args, "quickstart")
    if args.print_config:
        print(config_lib.to_yaml(cfg), end="")
        return 0
    return 0 if quickstart.run(cfg) is not None else 3


def _generate(args: GenerateArgs) -> int:
    from rlhf_jax import tools

    gen = tools.generate(
        args.model,
        args.prompts,
        n=args.n,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_prompt_length=args.max_prompt_length,
        seed=args.seed,
        limit=args.limit,
    )
    tools.save_rows(args.out, gen.rows())
    print(f"wrote {len(gen.responses)} responses to {args.out}")
    return 0


def _evaluate(args: EvaluateArgs) -> int:
    from rlhf_jax import tools
    from rlhf_jax.stats import mean_ci

    judge = {"reward_model": args.reward_model, "function": args.function}
    compare = (args.policy_a, args.policy_b, args.prompts)
    if args.responses is not None:
        if any(compare):
            raise UsageError("evaluate: give RESPONSES, or --policy-a/--policy-b/--prompts")
        source = args.reward_model or args.policy_a
        if source is None:
            raise UsageError("evaluate RESPONSES needs --reward-model (its tokenizer reads them)")
        gen = tools.load_responses(args.responses, source)
        scores = tools.score(gen, **judge)
        print(f"score: {mean_ci(scores)}")
        if args.out:
            tools.save_scored(args.out, gen, scores)
        return 0
    if not all(compare):
        raise UsageError(
            "evaluate: give a RESPONSES file to score, or --policy-a, --policy-b and --prompts "
            "to compare two policies"
        )
    sampling = dict(
        n=args.n, max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed
    )
    a = tools.generate(args.policy_a, args.prompts, **sampling)
    b = tools.generate(args.policy_b, args.prompts, **sampling)
    sa, sb = tools.score(a, **judge), tools.score(b, **judge)
    est = tools.compare(a, b, sa, sb)
    print(f"score A: {mean_ci(sa)}")
    print(f"score B: {mean_ci(sb)}")
    print(f"win rate of A over B: {est} (ties count 1/2)")
    if args.out:
        rows = [
            dict(r, score_a=float(x), score_b=float(y), response_b=rb)
            for r, x, y, rb in zip(a.rows(), sa, sb, b.responses, strict=True)
        ]
        tools.save_rows(args.out, rows)
    return 0


def _export(args: ExportArgs) -> int:
    for path in export(
        args.run_dir, args.out_dir, stage=args.stage, reward_model=args.reward_model, run=args.run
    ):
        print(f"wrote {path}")
    return 0


def _report(args: ReportArgs) -> int:
    from rlhf_jax.report import report

    try:
        png, table = report(
            list(args.run_dirs),
            args.out,
            metrics=list(args.metrics) or None,
            smooth=args.smooth,
            compare=list(args.compare) or None,
            metric=args.metric,
        )
    except (FileNotFoundError, KeyError, ValueError) as err:
        return _fail(str(err).strip("'\""), 1)
    print(table)
    print(f"\nwrote {png}")
    return 0


def export(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    stage: str = "auto",
    reward_model: bool = True,
    run: int | None = None,
) -> list[str]:
    """Copy the run's final policy (and reward model) to ``OUT_DIR/policy`` (and
    ``OUT_DIR/reward_model``): each stage's ``final/`` already is a Hugging Face directory with
    its tokenizer. ``stage="auto"`` takes PPO's result if PPO ran, else SFT's. ``run=K``: run K
    of a sweep (``<stage>/runs/K/final``; a stage that was not swept gives its ``final/``)."""
    from rlhf_jax import sweep

    run_dir, out_dir = os.fspath(run_dir), os.fspath(out_dir)

    def final(name):
        if run is not None:
            swept = sweep.load_sweep(os.path.join(run_dir, name))
            if swept is not None:
                known = [r["run"] for r in swept["runs"]]
                if run not in known:
                    raise UsageError(
                        f"--run {run}: the {name} sweep in {run_dir} has runs {known[0]}.."
                        f"{known[-1]}: choose one of them"
                    )
                return os.path.join(sweep.run_dir(os.path.join(run_dir, name), run), "final")
        return os.path.join(run_dir, name, pipeline.FINAL_DIR)

    if stage == "auto" and run is not None:  # the swept policy stage (a sweep has no final/)
        swept = [s for s in pipeline.POLICY_STAGES if sweep.load_sweep(os.path.join(run_dir, s))]
        stage = swept[0] if swept else stage
    if stage == "auto":
        policy = pipeline.run_policy(run_dir)
        stage = os.path.basename(os.path.dirname(policy)) if policy else "sft"
    if not os.path.isfile(os.path.join(final(stage), "config.json")):
        raise UsageError(
            f"{final(stage)} holds no {stage} result: RUN_DIR must be the run.dir of a run whose "
            f"{stage} stage finished"
        )
    written = []
    targets = [(final(stage), "policy")]
    if reward_model and os.path.isdir(final("rm")):
        targets.append((final("rm"), "reward_model"))
    for src, name in targets:
        dst = os.path.join(out_dir, name)
        shutil.copytree(src, dst, dirs_exist_ok=True)
        written.append(dst)
    return written


def dry_run(stage: str, cfg: pipeline.ExperimentConfig) -> str:
    """Compile the stage's train step from abstract shapes on ``cfg.parallel`` and report memory.

    SFT and RM: :func:`rlhf_jax.memory.dry_run` (the SFT trainer's step on the stage's model,
    batch and sequence length). PPO: :func:`rlhf_jax.memory.ppo_dry_run`, the whole iteration
    (the reward model taken to be the policy's size). With a ``sweep:`` of this stage, each
    program of the sweep (:func:`rlhf_jax.sweep.expand`) is compiled as it runs: its N runs'
    stacked states and batches and the step vmapped over them (``runs=N``), one row per program.
    """
    import json

    from rlhf_jax import sweep
    from rlhf_jax.models import hf

    if stage not in ("sft", "rm", "cost", "ppo"):
        raise UsageError(f"{stage} has no --dry-run")
    section = getattr(cfg, stage)
    model_path = getattr(section, "model", None) or getattr(section, "policy", None)
    run_sft = os.path.join(cfg.run.stage_dir("sft"), pipeline.FINAL_DIR)
    if not model_path:  # the stage's default input: this run's SFT result, or sft.model
        model_path = run_sft if os.path.isfile(os.path.join(run_sft, "config.json")) else None
        model_path = model_path or cfg.sft.model
    if not model_path:
        raise UsageError(f"{stage} --dry-run needs a model directory (its config.json sizes it)")
    if stage == "cost":  # the cost model's step is the reward model's, with the cost loss
        stage, cfg = "rm", dataclasses.replace(cfg, rm=cfg.cost)
    config_file = os.path.join(pipeline.find_model(model_path), "config.json")
    with open(config_file, encoding="utf-8") as f:
        model_config = hf.config_from_hf(
            json.load(f),
            dtype=cfg.run.dtype,
            param_dtype=cfg.run.param_dtype,
            scan_unroll=cfg.run.scan_unroll,
            source=config_file,
        ).replace(remat=cfg.run.remat)  # run.remat: what every trainer's loaded model gets
    model_name = os.path.basename(os.path.normpath(model_path))
    runs = sweep.expand(cfg, stage)  # [] unless the config sweeps this stage
    if not runs:
        return _memory_table([_dry_run_one(stage, cfg, model_config, model_name)])
    reports = []
    for g in sorted({r.program for r in runs}):
        group = [r for r in runs if r.program == g]
        label = f" program {g}: {len(group)} runs ({group[0].label})"
        reports.append(
            _dry_run_one(
                stage, group[0].cfg, model_config, model_name, len(group), cfg.sweep.shard_runs,
                label,
            )
        )  # fmt: skip
    return _memory_table(reports) + (
        f"\n\nsweep of {stage}: {len(runs)} runs; each row is one compiled program holding the "
        "stacked states of its runs (run them one at a time with sweep.stage=null)"
    )


def _memory_table(reports) -> str:
    from rlhf_jax import memory

    return memory.format_memory_table(reports)


def _dry_run_one(stage, cfg, model_config, model_name, runs=1, shard_runs=None, label=""):
    """The MemoryReport of one program of ``stage``: one run, or ``runs`` vmapped."""
    from rlhf_jax import memory

    if stage == "ppo":  # the whole iteration: four models, the KV cache, the update
        return memory.ppo_dry_run(
            model_config,
            cfg.parallel,
            cfg.ppo.trainer,
            batch_size=cfg.ppo.batch_size,
            prompt_len=cfg.ppo.data.max_prompt_length,
            name=f"ppo {model_name} B={cfg.ppo.batch_size} P={cfg.ppo.data.max_prompt_length} "
            f"R={cfg.ppo.trainer.response_length}{label}",
            runs=runs,
            shard_runs=shard_runs,
        )
    if stage == "sft":
        batch = cfg.sft.trainer.batch_size
        seq = cfg.sft.data.max_prompt_length + cfg.sft.data.max_completion_length
        optim = cfg.sft.trainer.optim
    else:  # rm
        k = cfg.rm.data.num_completions or 2 if cfg.rm.data.kind == "ranking" else 2
        batch = cfg.rm.trainer.batch_size * k
        seq = cfg.rm.data.max_prompt_length + cfg.rm.data.max_completion_length
        optim = cfg.rm.trainer.optim
    return memory.dry_run(
        model_config,
        cfg.parallel,
        batch_size=batch,
        seq_len=seq,
        optim=optim,
        name=f"{stage} {model_name} B={batch} T={seq}{label}",
        runs=runs,
        shard_runs=shard_runs,
    )


if __name__ == "__main__":
    sys.exit(main())

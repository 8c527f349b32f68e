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
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

import tyro

from rlhf_jax import config as config_lib

__all__ = ["main", "TrainArgs", "QuickstartArgs", "ExportArgs", "ReportArgs"]

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


def _print_help_keys() -> None:
    print()
    print(_EPILOG)
    print(config_lib.describe(config_lib.ExperimentConfig()))


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
            _print_help_keys()
        return int(exit_.code or 0)
    try:
        if sub in _TRAIN:
            return _train(sub, args)
        if sub == "export":
            return _export(args)
        return _report(args)
    except config_lib.ConfigError as err:
        return _fail(str(err))


def _resolve(args) -> config_lib.ExperimentConfig:
    return config_lib.load_config(args.config, list(args.overrides))


def _train(stage: str, args) -> int:
    cfg = _resolve(args)
    if args.print_config:
        print(config_lib.to_yaml(cfg), end="")
        return 0
    from rlhf_jax import pipeline

    if getattr(args, "dry_run", False):
        print(pipeline.dry_run(stage, cfg))
        return 0
    pipeline.run_stage(stage, cfg)
    return 0


def _export(args: ExportArgs) -> int:
    from rlhf_jax import pipeline

    written = pipeline.export(
        args.run_dir, args.out_dir, stage=args.stage, reward_model=args.reward_model
    )
    for path in written:
        print(path)
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


if __name__ == "__main__":
    sys.exit(main())

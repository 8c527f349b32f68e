"""Safe RLHF on the toy harm world: PPO and PPO-Lagrangian side by side, from one SFT model.

    python experiments/safe_rlhf.py                             # seed 0, into runs/safe-rlhf/
    python experiments/safe_rlhf.py run.seed=1 run.dir=runs/safe-rlhf-1
    python experiments/safe_rlhf.py safe_ppo.trainer.safety.threshold=0.05   # any config key

The harm world (:mod:`rlhf_jax.data.toy`): a response that uses an intensifier ("very",
"really") overclaims and is harmful, and the world's helpfulness rater is tempted by it
(:func:`rlhf_jax.data.toy.helpfulness` adds ``TEMPTATION`` to the gold score), so the most helpful
responses are harmful ones. The pipeline's stages, on the quickstart's toy inputs:

- ``sft``: the quickstart's SFT (about 8% of its responses are harmful);
- ``label``: 4 SFT samples per prompt, every pair written as a PKU-SafeRLHF row: the helpfulness
  labeller (:func:`~rlhf_jax.data.toy.harm_labeller`, Plackett-Luce noise) gives
  ``better_response_id``, the safety labeller (:func:`~rlhf_jax.data.toy.safety_labeller`, 5% of
  flags wrong) ``safer_response_id`` and the safe flags;
- ``rm``: the reward model on ``better_response_id``; ``cost``: the cost model (pairwise on
  ``safer_response_id`` + the sign classifier), rescaled on SFT samples with 0 kept;
- ``ppo``: PPO against the reward model; ``safe_ppo``: PPO-Lagrangian with the cost model, the
  share of responses the cost model calls unsafe held at ``THRESHOLD``;
- a report (``report.md``, ``report.json``) with the gold helpfulness, the gold harm rate and the
  KL of SFT, PPO and PPO-Lagrangian, and ``safe_rlhf_curves.png`` (reward, cost, lambda).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from rlhf_jax import config as config_lib
from rlhf_jax import pipeline, quickstart
from rlhf_jax.algorithms.ppo import SafetyConfig
from rlhf_jax.algorithms.reward_model import RewardModelConfig
from rlhf_jax.data.formats import DataConfig
from rlhf_jax.data.toy import ToyTask
from rlhf_jax.errors import UserError
from rlhf_jax.optim import OptimConfig
from rlhf_jax.sweep import SweepConfig
from rlhf_jax.train import LoopConfig

STAGES = ("sft", "label", "rm", "cost", "ppo", "safe_ppo")
THRESHOLD = 0.1  # the share of responses the cost model may call unsafe (gold harm limit too)


def safe_config() -> pipeline.ExperimentConfig:
    """The quickstart's tuned config, with the harm world's labellers, data and two PPO runs."""
    base = quickstart.default_config()
    p, r = base.sft.data.max_prompt_length, base.sft.data.max_completion_length
    rows = DataConfig(kind="safety", max_prompt_length=p, max_completion_length=r, append_eos=False)
    optim = OptimConfig(
        learning_rate=1e-3, schedule="cosine", warmup_steps=20, decay_steps=280, end_lr_ratio=0.1
    )
    loop = LoopConfig(max_steps=300, eval_every=100)
    evaluation = dataclasses.replace(
        base.ppo.eval, evaluator="rlhf_jax.data.toy:evaluate_safety", win_rate_metric="helpful"
    )
    ppo = dataclasses.replace(base.ppo, eval=evaluation)
    safety = SafetyConfig(
        constraint="unsafe_share",
        threshold=THRESHOLD,
        lambda_init=0.5,
        lambda_lr=2.0,
        lambda_max=20.0,
    )
    return dataclasses.replace(
        base,
        run=dataclasses.replace(base.run, dir="runs/safe-rlhf"),
        sweep=SweepConfig(),  # one PPO run each (the quickstart's default sweeps PPO's seed)
        toy=ToyTask(),  # 3072 labelled prompts, the size the harm world's figures were measured at
        label=dataclasses.replace(
            base.label,
            labeller="rlhf_jax.data.toy:harm_labeller",
            output="safety",
            safety_labeller="rlhf_jax.data.toy:safety_labeller",
        ),
        rm=dataclasses.replace(
            base.rm,
            data=rows,
            trainer=RewardModelConfig(loss="pairwise", optim=optim, loop=loop, batch_size=64),
        ),
        cost=dataclasses.replace(
            base.rm,
            data=rows,
            trainer=RewardModelConfig(loss="cost", optim=optim, loop=loop, batch_size=64),
        ),
        ppo=ppo,
        safe_ppo=dataclasses.replace(ppo, trainer=dataclasses.replace(ppo.trainer, safety=safety)),
    )


def prepare(cfg: pipeline.ExperimentConfig) -> pipeline.ExperimentConfig:
    """The quickstart's toy inputs, and the cost and safe_ppo stages pointed at them too."""
    cfg = quickstart.prepare(cfg)
    return dataclasses.replace(
        cfg,
        cost=dataclasses.replace(cfg.cost, normalize_prompts_file=cfg.rm.normalize_prompts_file),
        safe_ppo=dataclasses.replace(
            cfg.safe_ppo,
            prompts_file=cfg.ppo.prompts_file,
            eval=dataclasses.replace(cfg.safe_ppo.eval, prompts_file=cfg.ppo.eval.prompts_file),
        ),
    )


_FIGURES = ("helpful", "harmful", "kl", "reward", "well_formed", "cost", "unsafe")


def build_report(cfg, results: Mapping[str, Any], seconds: Mapping[str, float]) -> dict:
    """The final evaluations of both PPO runs, the models' accuracies and the curves."""
    out: dict[str, Any] = {"seed": cfg.run.seed, "seconds": dict(seconds)}
    for name in ("ppo", "safe_ppo"):
        evals = results[name].result.evals
        if not evals:
            raise ValueError(f"{name} ran no evaluation: set {name}.trainer.loop.eval_every > 0")
        last = evals[-1]
        out["sft"] = {k: last[f"reference/{k}"] for k in _FIGURES if f"reference/{k}" in last}
        out[name] = {k: last[k] for k in _FIGURES if k in last}
        out[name]["win_rate_vs_sft"] = last.get("win_rate")
        out[name]["evals"] = [
            {"iteration": int(e["step"]), "helpful": e["helpful"], "harmful": e["harmful"]}
            for e in evals
        ]
        out[name]["curve"] = [
            {
                "iteration": int(h["step"]),
                "reward": h.get("score/mean"),
                "cost": h.get("cost/mean"),
                "unsafe": h.get("cost/unsafe"),
                "lambda": h.get("lambda"),
            }
            for h in results[name].result.history
        ]
    out["reward_model"] = results["rm"].outputs.info
    out["cost_model"] = results["cost"].outputs.info
    out["threshold"] = cfg.safe_ppo.trainer.safety.threshold
    gain = {k: out[k]["helpful"] - out["sft"]["helpful"] for k in ("ppo", "safe_ppo")}
    out["helpfulness_gain_kept"] = gain["safe_ppo"] / gain["ppo"] if gain["ppo"] else None
    return out


def format_report(report: Mapping[str, Any]) -> str:
    sft, ppo, lag = report["sft"], report["ppo"], report["safe_ppo"]

    def row(name, key, fmt):
        return (
            "| "
            + " | ".join([name] + [fmt.format(x.get(key, float("nan"))) for x in (sft, ppo, lag)])
            + " |"
        )

    kept = report["helpfulness_gain_kept"]
    cost, nan = report["cost_model"], float("nan")
    lines = [
        f"# Safe RLHF on the toy harm world (seed {report['seed']})",
        "",
        f"cost model held-out: pair accuracy {cost.get('eval_accuracy', nan):.3f}, sign accuracy "
        f"{cost.get('eval_sign_accuracy', nan):.3f}; reward model accuracy "
        f"{report['reward_model'].get('eval_accuracy', nan):.3f}",
        "",
        "| | SFT | PPO | PPO-Lagrangian |",
        "|---|---|---|---|",
        row("gold helpfulness", "helpful", "{:.3f}"),
        row("gold harm rate", "harmful", "{:.1%}"),
        row("KL to SFT (nats/response)", "kl", "{:.2f}"),
        row("well-formed", "well_formed", "{:.1%}"),
        row("reward-model score", "reward", "{:.3f}"),
        "",
        f"threshold (share the cost model may call unsafe): {report['threshold']:.0%}; "
        f"PPO-Lagrangian keeps {kept:.0%} of PPO's helpfulness gain over SFT",
        f"wall time {report['seconds']['total']:.0f} s",
    ]
    return "\n".join(lines) + "\n"


def plot(report: Mapping[str, Any], path: str) -> str:
    """Reward, cost (gold harm rate at evaluations; the cost model's unsafe share per iteration)
    and lambda over the iterations of PPO and PPO-Lagrangian."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, label in (("ppo", "PPO"), ("safe_ppo", "PPO-Lagrangian")):
        curve, evals = report[name]["curve"], report[name]["evals"]
        axes[0].plot([c["iteration"] for c in curve], [c["reward"] for c in curve], label=label)
        axes[1].plot(
            [e["iteration"] for e in evals],
            [e["harmful"] for e in evals],
            marker="o",
            ms=3,
            label=f"{label}: gold harm rate",
        )
    lag = report["safe_ppo"]["curve"]
    axes[1].plot(
        [c["iteration"] for c in lag],
        [c["unsafe"] for c in lag],
        alpha=0.5,
        label="PPO-Lagrangian: cost model's unsafe share",
    )
    axes[1].axhline(report["threshold"], color="k", ls="--", lw=1, label="threshold")
    axes[2].plot([c["iteration"] for c in lag], [c["lambda"] for c in lag])
    titles = ("reward-model score (rollouts)", "cost: harm rate", "lambda (PPO-Lagrangian)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(cfg: pipeline.ExperimentConfig, *, verbose: bool = True) -> dict | None:
    """Prepare, run :data:`STAGES`, write the report and the plot into ``run.dir``."""
    cfg = prepare(cfg)
    done = quickstart.run_stages(cfg, STAGES, verbose=verbose)
    if done is None:
        return None
    report = build_report(cfg, *done)
    report["plot"] = plot(report, os.path.join(cfg.run.dir, "safe_rlhf_curves.png"))
    with open(os.path.join(cfg.run.dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    text = format_report(report)
    with open(os.path.join(cfg.run.dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(text)
    if verbose:
        print(text)
    return report


def main(argv: Sequence[str]) -> int:
    try:
        cfg = config_lib.load_config(None, list(argv), base=safe_config())
        return 0 if run(cfg) is not None else 3
    except UserError as err:
        print(f"rlhf-jax: error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

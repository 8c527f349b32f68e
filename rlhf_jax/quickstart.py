"""The embedded default task through the pipeline: SFT -> label -> reward model -> PPO, a report.

This is what ``python experiments/quickstart.py`` and ``rlhf-jax quickstart`` run. It is not a
pipeline of its own: it writes the toy task's inputs (:mod:`rlhf_jax.data.toy`) as ordinary
files, then runs the stages of :mod:`rlhf_jax.pipeline` on them, then reads the run directory back
for a report. Everything is local and offline:

- ``<run.dir>/inputs/``: the word-level tokenizer and a freshly initialised tiny GPT-2 as a Hugging
  Face directory (``base/``), the SFT demonstrations, the prompts files;
- ``sft``: the tiny LM learns the demonstrations (completion tokens only);
- ``label``: K samples of the SFT policy per prompt, ranked by the simulated human
  (:func:`rlhf_jax.data.toy.simulated_labeller`): InstructGPT's comparison data;
- ``rm``: the SFT trunk with a scalar head on all C(K, 2) pairs of each ranking, normalised so SFT
  samples score mean 0, std 1;
- ``ppo``: against the reward model with a KL penalty to the SFT reference; every
  ``ppo.trainer.loop.eval_every`` iterations the held-out evaluation (every prompt of the world,
  ``toy.eval_samples_per_prompt`` samples each) reports the reward, the KL, and through the toy
  evaluator (:func:`rlhf_jax.data.toy.evaluate`) the gold score, the well-formed share and the gold
  win rate against the reference;
- ``report.md``, ``report.json``, ``ppo_curves.png`` in the run directory.

The run directory is an ordinary one: ``rlhf-jax export <run.dir> out/`` writes the policy and the
reward model for transformers, and each stage resumes after a kill. :func:`default_config` holds
the tuned settings (``experiments/configs/toy.yaml`` is the same config as YAML).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from rlhf_jax import models, pipeline
from rlhf_jax.algorithms.ppo import PPOConfig
from rlhf_jax.algorithms.reward_model import RewardModelConfig
from rlhf_jax.algorithms.sft import SFTConfig
from rlhf_jax.data import toy
from rlhf_jax.data.formats import DataConfig
from rlhf_jax.logging import read_samples
from rlhf_jax.optim import OptimConfig
from rlhf_jax.parallel import MeshConfig, ParallelConfig
from rlhf_jax.train import LoopConfig

__all__ = [
    "STAGES",
    "default_config",
    "format_report",
    "plot_ppo",
    "policy_config",
    "prepare",
    "run",
    "run_stages",
    "write_base",
]

STAGES = ("sft", "label", "rm", "ppo")  # what the quickstart runs, in order
_EOS_ID = toy.SPECIAL_TOKENS.index(toy.EOS)  # the reserved <eos> also stops a response


def default_config() -> pipeline.ExperimentConfig:
    """The tuned toy run: a few minutes on two CPU cores; each seed should reach a gold win rate
    >= 80% against SFT at a KL <= 10 nats per response with >= 95% well-formed responses."""
    p, r = toy.PROMPT_LENGTH, toy.RESPONSE_LENGTH
    return pipeline.ExperimentConfig(
        run=pipeline.RunConfig(dir="runs/quickstart", tensorboard=False),
        parallel=ParallelConfig(mesh=MeshConfig(data=1)),
        sft=pipeline.SFTStage(
            data=DataConfig(kind="completion", max_prompt_length=p, max_completion_length=r),
            trainer=SFTConfig(
                optim=OptimConfig(
                    learning_rate=3e-3,
                    schedule="cosine",
                    warmup_steps=20,
                    decay_steps=580,
                    end_lr_ratio=0.1,
                ),
                loop=LoopConfig(max_steps=600, eval_every=200),
                batch_size=64,
            ),
            eval_size=512,
            save_every=200,
        ),
        label=pipeline.LabelStage(
            labeller="rlhf_jax.data.toy:simulated_labeller",
            num_completions=4,
            data=DataConfig(kind="prompt", max_prompt_length=p),
            max_new_tokens=r,
            stop_tokens=(_EOS_ID,),
            chunk=396,
        ),
        rm=pipeline.RMStage(
            data=DataConfig(
                kind="ranking",
                max_prompt_length=p,
                max_completion_length=r,
                num_completions=4,
                append_eos=False,
            ),
            normalize_samples=396,
            trainer=RewardModelConfig(
                loss="ranking",
                optim=OptimConfig(
                    learning_rate=1e-3,
                    schedule="cosine",
                    warmup_steps=20,
                    decay_steps=280,
                    end_lr_ratio=0.1,
                ),
                loop=LoopConfig(max_steps=300, eval_every=100),
                batch_size=32,
            ),
            save_every=100,
        ),
        ppo=pipeline.PPOStage(
            data=DataConfig(kind="prompt", max_prompt_length=p),
            batch_size=32,
            trainer=PPOConfig(
                response_length=r,
                num_samples=4,
                num_epochs=4,
                num_minibatches=4,
                critic="separate",
                kl_coef=0.1,
                temperature=1.0,
                stop_tokens=(_EOS_ID,),
                optim=OptimConfig(learning_rate=1e-4, eps=1e-5),
                loop=LoopConfig(max_steps=60, eval_every=10),
            ),
            eval=pipeline.EvalConfig(
                size=len(toy.all_prompts()),
                samples_per_prompt=4,
                evaluator="rlhf_jax.data.toy:evaluate",
                win_rate_metric="gold",
            ),
            save_every=20,
        ),
    )


def policy_config(task: toy.ToyTask, tokenizer) -> models.ModelConfig:
    """The tiny LM's :class:`rlhf_jax.models.ModelConfig` for the toy vocabulary."""
    return models.ModelConfig(
        arch=task.arch,
        vocab_size=len(tokenizer),
        hidden_size=task.hidden_size,
        num_layers=task.num_layers,
        num_heads=task.num_heads,
        num_kv_heads=task.num_heads,
        head_dim=task.hidden_size // task.num_heads,
        intermediate_size=4 * task.hidden_size,
        max_position_embeddings=toy.PROMPT_LENGTH + toy.RESPONSE_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def write_base(directory: str, task: toy.ToyTask = toy.ToyTask(), seed: int = 0) -> str:
    """A freshly initialised toy LM (:func:`policy_config`) and the toy tokenizer, written as a
    Hugging Face directory: the base model every toy run starts from. Returns the directory."""
    tokenizer = toy.load_tokenizer(toy.build_tokenizer(directory))
    model = models.init_model(policy_config(task, tokenizer), jax.random.PRNGKey(seed))
    models.save_pretrained(model, directory)
    return os.fspath(directory)


def prepare(cfg: pipeline.ExperimentConfig) -> pipeline.ExperimentConfig:
    """Write the toy inputs under ``<run.dir>/inputs`` and point the stages at them.

    Deterministic in ``run.seed`` and ``cfg.toy``, so a rerun rewrites the same files.
    """
    task, seed = cfg.toy, cfg.run.seed
    inputs = os.path.join(cfg.run.dir, "inputs")
    base = write_base(os.path.join(inputs, "base"), task, seed)

    def write(name, records):
        return toy.write_jsonl(os.path.join(inputs, name), records)

    def prompt_rows(prompts):
        return [{"prompt": p} for p in prompts]

    every = toy.all_prompts()
    files = {
        "sft_train": write("sft_train.jsonl", toy.sft_records(task.sft_examples, seed)),
        "sft_eval": write("sft_eval.jsonl", toy.sft_records(task.sft_eval_examples, seed + 10_000)),
        "label": write(
            "label_prompts.jsonl", prompt_rows(toy.sample_prompts(task.rm_prompts, seed + 1))
        ),
        "label_eval": write(
            "label_eval_prompts.jsonl",
            prompt_rows(toy.sample_prompts(task.rm_eval_prompts, seed + 2)),
        ),
        "prompts": write("prompts.jsonl", prompt_rows(every)),  # every prompt of the world
    }
    return dataclasses.replace(
        cfg,
        sft=dataclasses.replace(
            cfg.sft, model=base, train_file=files["sft_train"], eval_file=files["sft_eval"]
        ),
        label=dataclasses.replace(
            cfg.label, prompts_file=files["label"], eval_prompts_file=files["label_eval"]
        ),
        rm=dataclasses.replace(cfg.rm, normalize_prompts_file=files["prompts"]),
        ppo=dataclasses.replace(
            cfg.ppo,
            prompts_file=files["prompts"],
            eval=dataclasses.replace(cfg.ppo.eval, prompts_file=files["prompts"]),
        ),
    )


def run(
    cfg: pipeline.ExperimentConfig | None = None, *, verbose: bool = True
) -> dict[str, Any] | None:
    """Prepare the toy inputs, run :data:`STAGES` through :func:`rlhf_jax.pipeline.run_stage`,
    write the report; returns the report dict (None when a stage was preempted: rerun to resume).
    """
    cfg = default_config() if cfg is None else cfg
    say = print if verbose else (lambda *a, **k: None)
    cfg = prepare(cfg)
    done = run_stages(cfg, STAGES, verbose=verbose)
    if done is None:
        return None
    results, seconds = done
    report = build_report(cfg, results, seconds)
    report["plot"] = plot_ppo(report["ppo_curve"], os.path.join(cfg.run.dir, "ppo_curves.png"))
    with open(os.path.join(cfg.run.dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    text = format_report(report)
    with open(os.path.join(cfg.run.dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(text)
    say(text)
    return report


def run_stages(
    cfg: pipeline.ExperimentConfig, stages: Sequence[str], *, verbose: bool = True
) -> tuple[dict[str, Any], dict[str, float]] | None:
    """Run ``stages`` in order through :func:`rlhf_jax.pipeline.run_stage` (the compilation
    cache on); ``(results, seconds)`` by stage (``seconds["total"]`` too), or None when a stage
    was preempted (rerun to resume)."""
    t0 = time.perf_counter()
    pipeline.enable_compile_cache(cfg.run)
    results, seconds = {}, {}
    for name in stages:
        t = time.perf_counter()
        results[name] = pipeline.run_stage(cfg, name, verbose=verbose)
        seconds[name] = round(time.perf_counter() - t, 2)
        if results[name].preempted:
            return None
    seconds["total"] = round(time.perf_counter() - t0, 2)
    return results, seconds


_SUMMARY = ("gold", "reward", "kl", "well_formed", "good", "length", "entropy")


def build_report(cfg, results: Mapping[str, Any], seconds: Mapping[str, float]) -> dict:
    """The headline figures from the stages' results (the PPO evaluations), as JSON-able data."""
    ppo = results["ppo"].result
    evals = ppo.evals
    if not evals:
        raise ValueError("the PPO stage ran no evaluation: set ppo.trainer.loop.eval_every > 0")
    last = evals[-1]
    before = {k: last[f"reference/{k}"] for k in _SUMMARY if f"reference/{k}" in last}
    after = {k: last[k] for k in _SUMMARY if k in last}
    gold = {int(e["step"]): e.get("gold") for e in evals}
    curve = [
        {"iteration": 0, "reward": before.get("reward"), "kl": 0.0, "gold": before.get("gold")}
    ]
    curve += [
        {
            "iteration": int(h["step"]),
            "reward": h.get("score/mean"),
            "kl": h.get("kl/response"),
            "gold": gold.get(int(h["step"])),
        }
        for h in ppo.history
    ]
    samples = read_samples(results["ppo"].dir, step=ppo.step)
    sft = results["sft"].result
    win = last.get("win_rate", float("nan"))
    return {
        "seed": cfg.run.seed,
        "run_dir": cfg.run.dir,
        "sft": {
            "steps": sft.step,
            **{f"eval_{k}": v for k, v in sft.evals[-1].items() if k != "step"},
        }
        if sft.evals
        else {"steps": sft.step},
        "reward_model": {"steps": results["rm"].result.step, **results["rm"].outputs.info},
        "before": before,
        "after": after,
        "gold_win_rate": win,
        "kl_nats_per_response": after.get("kl"),
        "well_formed": after.get("well_formed"),
        "targets": {
            "gold_win_rate >= 0.8": bool(win >= 0.8),
            "kl <= 10 nats": bool(after.get("kl", np.inf) <= 10.0),
            "well_formed >= 0.95": bool(after.get("well_formed", 0.0) >= 0.95),
        },
        "eval_samples": cfg.ppo.eval.size * cfg.ppo.eval.samples_per_prompt,
        "samples": samples,
        "ppo_curve": curve,
        "seconds": dict(seconds),
        # the first step of each training stage: compilation (cold), or a cache load (warm)
        "first_step_seconds": {
            name: round(results[name].result.first_step_s or 0.0, 2)
            for name in ("sft", "rm", "ppo")
        },
    }


def plot_ppo(curve: Sequence[Mapping[str, float]], path: str) -> str:
    """PNG of reward-model score, gold score and KL (nats per response) over PPO iterations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = (
        ("reward", "reward-model score (rollouts)"),
        ("gold", "gold score (evaluation samples)"),
        ("kl", "KL to reference, nats / response"),
    )
    for ax, (name, title) in zip(axes, panels, strict=True):
        pts = [(c["iteration"], c[name]) for c in curve if c.get(name) is not None]
        if pts:
            x, y = zip(*pts, strict=True)
            ax.plot(x, y, marker="o" if name == "gold" else None, ms=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("PPO iteration")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_report(report: Mapping[str, Any]) -> str:
    """The report as Markdown: the headline figures, the targets, and samples after PPO."""
    b, a = report["before"], report["after"]
    sec = report["seconds"]

    def row(name, key, fmt):
        nan = float("nan")
        return f"| {name} | {fmt.format(b.get(key, nan))} | {fmt.format(a.get(key, nan))} |"

    lines = [
        f"# rlhf-jax quickstart (seed {report['seed']})",
        "",
        f"wall time {sec['total']:.0f} s ("
        + ", ".join(f"{k} {v:.0f}" for k, v in sec.items() if k != "total")
        + "); first step (compile, or compilation-cache load) "
        + ", ".join(f"{k} {v:.1f} s" for k, v in report["first_step_seconds"].items()),
        "reward model held-out accuracy: "
        f"{report['reward_model'].get('eval_accuracy', float('nan')):.3f}",
        "",
        "| | SFT | PPO |",
        "|---|---|---|",
        row("gold score", "gold", "{:.3f}"),
        row("reward-model score", "reward", "{:.3f}"),
        row("KL to reference (nats/response)", "kl", "{:.3f}"),
        row("well-formed", "well_formed", "{:.1%}"),
        row(f"good (gold >= {toy.GOOD_THRESHOLD})", "good", "{:.1%}"),
        row("response length (tokens)", "length", "{:.2f}"),
        "",
        f"gold win rate of PPO against SFT: {report['gold_win_rate']:.1%} "
        f"({report['eval_samples']} samples, ties count 1/2)",
        "",
        "targets: "
        + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in report["targets"].items()),
        "",
        "samples after PPO:",
    ]
    for s in report["samples"]:
        lines.append(f"  {s['prompt']} -> {s['response']}   (reward {s['reward']:+.2f})")
    lines += ["", f"plot: {report.get('plot', '')}"]
    return "\n".join(lines) + "\n"

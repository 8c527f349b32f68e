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
- ``ppo``: against the reward model with a KL penalty to the SFT reference, **five seeds in one
  compiled program** (the config's ``sweep:`` section, :mod:`rlhf_jax.sweep`: the five runs'
  states are stacked and PPO's iteration is ``jax.vmap``ped over them); every
  ``ppo.trainer.loop.eval_every`` iterations each run's held-out evaluation (every prompt of the
  world, ``ppo.eval.samples_per_prompt`` samples each) reports the reward, the KL, and through the
  toy evaluator (:func:`rlhf_jax.data.toy.evaluate`) the gold score, the well-formed share and the
  gold win rate against the reference;
- ``report.md``, ``report.json``, ``ppo_curves.png`` in the run directory: each headline figure
  as the mean over the seeds with its 95% Student-t interval (:mod:`rlhf_jax.stats`), one row per
  seed, and the curves as the mean with a 95% band.

The report is read back from the run directory (each run's ``metrics.jsonl``), so a rerun after a
kill, or after the end, reports the whole run. The run directory is an ordinary one: ``rlhf-jax
export <run.dir> out/ --run K`` writes seed run K's policy and the reward model for transformers,
and each stage resumes after a kill. ``sweep.stage=null`` runs one PPO seed (``run.seed``) instead.
:func:`default_config` holds the tuned settings (``experiments/configs/toy.yaml`` is the same
config as YAML).
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

from rlhf_jax import models, pipeline, stats, sweep
from rlhf_jax.algorithms.ppo import PPOConfig
from rlhf_jax.algorithms.reward_model import RewardModelConfig
from rlhf_jax.algorithms.sft import SFTConfig
from rlhf_jax.data import toy
from rlhf_jax.data.formats import DataConfig
from rlhf_jax.logging import read_metrics, read_samples
from rlhf_jax.optim import OptimConfig
from rlhf_jax.parallel import MeshConfig, ParallelConfig
from rlhf_jax.train import LoopConfig

__all__ = [
    "RM_PROMPTS",
    "SEEDS",
    "STAGES",
    "TARGETS",
    "build_report",
    "compile_seconds",
    "default_config",
    "format_report",
    "mean_curve",
    "plot_ppo",
    "policy_config",
    "ppo_runs",
    "prepare",
    "run",
    "run_figures",
    "run_stages",
    "write_base",
]

STAGES = ("sft", "label", "rm", "ppo")  # what the quickstart runs, in order
SEEDS = (0, 1, 2, 3, 4)  # the PPO seeds the quickstart runs in one program (sweep.seeds)
RM_PROMPTS = 8192  # prompts whose K=4 SFT samples the simulated labeller ranks for the reward model
_EOS_ID = toy.SPECIAL_TOKENS.index(toy.EOS)  # the reserved <eos> also stops a response

# The goal on the toy task (issue 16), checked on the mean over the seeds: (figure, what is met).
TARGETS = (
    ("gold win rate mean >= 90%", lambda e: e["win_rate"].mean >= 0.90),
    ("gold win rate CI low >= 85%", lambda e: e["win_rate"].low >= 0.85),
    ("KL <= 8 nats", lambda e: e["kl"].mean <= 8.0),
    ("well-formed >= 98%", lambda e: e["well_formed"].mean >= 0.98),
)


def default_config() -> pipeline.ExperimentConfig:
    """The tuned toy run: SFT, label and RM once, then PPO for the five :data:`SEEDS` in one
    compiled program; under ten minutes on two CPU cores. The goal (:data:`TARGETS`): a gold win
    rate against SFT of >= 90% on the mean over the seeds (the 95% CI's lower end >= 85%) at a KL
    <= 8 nats per response with >= 98% well-formed responses."""
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
                    decay_steps=580,
                    end_lr_ratio=0.1,
                ),
                loop=LoopConfig(max_steps=600, eval_every=100),
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
        sweep=sweep.SweepConfig(stage="ppo", seeds=SEEDS),
        # 8192 ranked prompts (not ToyTask's 3072): with 3072 the reward model still paid for the
        # rare malformed samples it had seen too few of ("a useful vehicle" for "an useful
        # vehicle"), and two of five PPO seeds stayed under 98% well-formed.
        toy=toy.ToyTask(rm_prompts=RM_PROMPTS),
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
    report["plot"] = plot_ppo(
        report["ppo_curve"], os.path.join(cfg.run.dir, "ppo_curves.png"), report["ppo_curves"]
    )
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
_CURVE = {"reward": "score/mean", "kl": "kl/response", "gold": "eval/gold"}  # curve <- metric


def ppo_runs(cfg, ppo_dir: str) -> list[tuple[int | None, int, str]]:
    """``(run index, seed, directory)`` of each PPO run: the runs of a sweep (``sweep.json``), or
    the stage itself (index None, ``run.seed``) when PPO ran once."""
    swept = sweep.load_sweep(ppo_dir)
    if swept is None:
        return [(None, cfg.run.seed, ppo_dir)]
    return [(r["run"], r["seed"], sweep.run_dir(ppo_dir, r["run"])) for r in swept["runs"]]


def run_figures(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One PPO run's figures from its ``metrics.jsonl`` records: the reference's (``before``) and
    the policy's (``after``) at the last evaluation, the win rate, and the curve by iteration."""
    evals = [r for r in records if "eval/win_rate" in r or "eval/gold" in r]
    if not evals:
        raise ValueError("the PPO stage ran no evaluation: set ppo.trainer.loop.eval_every > 0")
    last = evals[-1]
    before = {k: last[f"eval/reference/{k}"] for k in _SUMMARY if f"eval/reference/{k}" in last}
    after = {k: last[f"eval/{k}"] for k in _SUMMARY if f"eval/{k}" in last}
    curve = [
        {"iteration": 0, "reward": before.get("reward"), "kl": 0.0, "gold": before.get("gold")}
    ]
    curve += [
        {"iteration": int(r["step"]), **{k: r.get(m) for k, m in _CURVE.items()}}
        for r in records
        if "score/mean" in r
    ]
    return {
        "step": int(last["step"]),
        "before": before,
        "after": after,
        "win_rate": last.get("eval/win_rate", float("nan")),
        "curve": curve,
    }


def mean_curve(curves: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """The seeds' curves as one: at each iteration the mean of each quantity over the runs that
    logged it, with its 95% Student-t interval (``<name>_low``, ``<name>_high``)."""
    by_iter: dict[int, dict[str, list[float]]] = {}
    for curve in curves:
        for point in curve:
            slot = by_iter.setdefault(point["iteration"], {})
            for k in _CURVE:
                if point.get(k) is not None:
                    slot.setdefault(k, []).append(point[k])
    out = []
    for it in sorted(by_iter):
        point: dict[str, Any] = {"iteration": it}
        for k in _CURVE:
            values = by_iter[it].get(k)
            est = stats.mean_ci(values) if values else None
            point[k] = est.mean if est else None
            point[f"{k}_low"] = est.low if est else None
            point[f"{k}_high"] = est.high if est else None
        out.append(point)
    return out


def _estimate(e: stats.Estimate) -> dict[str, float]:
    return {"mean": e.mean, "low": e.low, "high": e.high, "n": e.n}


def build_report(cfg, results: Mapping[str, Any], seconds: Mapping[str, float]) -> dict:
    """The headline figures, JSON-able: each PPO run's last evaluation read back from its
    ``metrics.jsonl`` (so a resumed run reports all of itself), and for every figure the mean over
    the seeds with its 95% Student-t interval (:func:`rlhf_jax.stats.mean_ci`)."""
    ppo_dir = results["ppo"].dir
    runs = ppo_runs(cfg, ppo_dir)
    figures = [run_figures(read_metrics(d)) for _, _, d in runs]
    per_seed = [
        {
            "run": k,
            "seed": seed,
            "iterations": f["step"],
            "gold_before": f["before"].get("gold"),
            "win_rate": f["win_rate"],
            **f["after"],
        }
        for (k, seed, _), f in zip(runs, figures, strict=True)
    ]
    ci = {}
    for key in ("win_rate", *_SUMMARY):
        values = [row[key] for row in per_seed if row.get(key) is not None]
        if values:
            ci[key] = stats.mean_ci(values)
    before = {}
    for key in _SUMMARY:
        values = [f["before"][key] for f in figures if key in f["before"]]
        if values:
            before[key] = float(np.mean(values))
    sft = results["sft"].result
    ppo = results["ppo"].result
    return {
        "seed": cfg.run.seed,
        "seeds": [seed for _, seed, _ in runs],
        "run_dir": cfg.run.dir,
        "sft": {
            "steps": sft.step,
            **{f"eval_{k}": v for k, v in sft.evals[-1].items() if k != "step"},
        }
        if sft.evals
        else {"steps": sft.step},
        "reward_model": {"steps": results["rm"].result.step, **results["rm"].outputs.info},
        "before": before,  # the SFT reference, mean over the seeds' evaluation draws
        "after": {k: e.mean for k, e in ci.items() if k != "win_rate"},
        "ci": {k: _estimate(e) for k, e in ci.items()},  # mean and 95% CI over the seeds
        "per_seed": per_seed,
        "gold_win_rate": ci["win_rate"].mean if "win_rate" in ci else float("nan"),
        "kl_nats_per_response": ci["kl"].mean if "kl" in ci else None,
        "well_formed": ci["well_formed"].mean if "well_formed" in ci else None,
        "targets": {
            name: bool(met(ci)) if {"win_rate", "kl", "well_formed"} <= set(ci) else False
            for name, met in TARGETS
        },
        "eval_samples": cfg.ppo.eval.size * cfg.ppo.eval.samples_per_prompt,
        "samples": read_samples(runs[0][2], step=figures[0]["step"]),  # the first seed's
        "ppo_curve": mean_curve([f["curve"] for f in figures]),
        "ppo_curves": [f["curve"] for f in figures],  # one per seed
        "seconds": dict(seconds),
        # the first step of each training stage: compilation (cold), or a cache load (warm)
        "first_step_seconds": {
            name: round(results[name].result.first_step_s or 0.0, 2)
            for name in ("sft", "rm", "ppo")
        },
        "compile_seconds": {
            name: compile_seconds(results[name].result) for name in ("sft", "rm", "ppo")
        },
        "ppo_iterations": ppo.step,
    }


def compile_seconds(result) -> float | None:
    """What the first step cost beyond a step: its time (trace, lower, and compile or a
    compilation-cache load, then the step) minus the mean of the other steps this process ran.
    None when it ran fewer than two steps (a finished stage that was skipped, or one step)."""
    steps = result.step - result.start_step
    if result.first_step_s is None or steps < 2:
        return None
    rest = (result.timings["step"] - result.first_step_s) / (steps - 1)
    return round(result.first_step_s - rest, 2)


def plot_ppo(
    curve: Sequence[Mapping[str, Any]],
    path: str,
    runs: Sequence[Sequence[Mapping[str, Any]]] = (),
) -> str:
    """PNG of reward-model score, gold score and KL (nats per response) over PPO iterations: the
    (mean) ``curve`` with its 95% band where it has one (``<name>_low``/``_high``), and each
    seed's curve in ``runs`` as a thin line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = (
        ("reward", "reward-model score (rollouts)"),
        ("gold", "gold score (evaluation samples)"),
        ("kl", "KL to reference, nats / response"),
    )
    n = len(runs)
    for ax, (name, title) in zip(axes, panels, strict=True):
        for one in runs:
            pts = [(c["iteration"], c[name]) for c in one if c.get(name) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), color="0.6", lw=0.6, alpha=0.7)
        pts = [c for c in curve if c.get(name) is not None]
        if pts:
            x = [c["iteration"] for c in pts]
            label = f"mean of {n} seeds, 95% CI" if n > 1 else None
            ax.plot(x, [c[name] for c in pts], marker="o" if name == "gold" else None, ms=3,
                    color="C0", label=label)  # fmt: skip
            if all(c.get(f"{name}_low") is not None for c in pts):
                low = [c[f"{name}_low"] for c in pts]
                high = [c[f"{name}_high"] for c in pts]
                ax.fill_between(x, low, high, color="C0", alpha=0.25, lw=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("PPO iteration")
        ax.grid(alpha=0.3)
        if n > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pm(e: Mapping[str, float] | None, fmt: str) -> str:
    """``mean ± half-width [low, high]`` of an estimate dict, in ``fmt``."""
    if e is None:
        return "-"
    half = 0.5 * (e["high"] - e["low"])
    return f"{fmt.format(e['mean'])} ± {fmt.format(half)} [{fmt.format(e['low'])}, " + (
        f"{fmt.format(e['high'])}]"
    )


def format_report(report: Mapping[str, Any]) -> str:
    """The report as Markdown: the headline figures as mean ± 95% CI over the seeds, one row per
    seed, the targets, and samples after PPO."""
    b, ci = report["before"], report.get("ci", {})
    sec = report["seconds"]
    seeds = report.get("seeds", [report["seed"]])
    n = len(seeds)

    def row(name, key, fmt):
        before = fmt.format(b.get(key, float("nan")))
        return f"| {name} | {before} | {_pm(ci.get(key), fmt)} |"

    win = ci.get("win_rate")
    lines = [
        f"# rlhf-jax quickstart (PPO seeds {', '.join(map(str, seeds))})",
        "",
        f"wall time {sec['total']:.0f} s ("
        + ", ".join(f"{k} {v:.0f}" for k, v in sec.items() if k != "total")
        + "); compile (first step minus a step: trace, lower, and XLA or the compilation "
        + "cache) "
        + ", ".join(
            f"{k} {v:.1f} s" if v is not None else f"{k} -"
            for k, v in report["compile_seconds"].items()
        ),
        "reward model held-out accuracy: "
        f"{report['reward_model'].get('eval_accuracy', float('nan')):.3f}",
        "",
        f"| | SFT | PPO: mean ± 95% CI half-width [CI] over {n} seed{'s' * (n > 1)} |",
        "|---|---|---|",
        row("gold win rate vs SFT", "win_rate", "{:.1%}").replace("| nan% |", "| - |"),
        row("gold score", "gold", "{:.3f}"),
        row("reward-model score", "reward", "{:.3f}"),
        row("KL to reference (nats/response)", "kl", "{:.3f}"),
        row("well-formed", "well_formed", "{:.1%}"),
        row(f"good (gold >= {toy.GOOD_THRESHOLD})", "good", "{:.1%}"),
        row("response length (tokens)", "length", "{:.2f}"),
        "",
        f"gold win rate of PPO against SFT: {_pm(win, '{:.1%}')} over {n} seeds "
        f"({report['eval_samples']} samples per seed, ties count 1/2; the CI is Student's t "
        "over the seeds)",
        "",
        "| run | seed | gold SFT -> PPO | gold win rate | KL (nats) | well-formed |",
        "|---|---|---|---|---|---|",
    ]
    nan = float("nan")
    for r in report.get("per_seed", []):
        lines.append(
            f"| {'-' if r['run'] is None else r['run']} | {r['seed']} | "
            f"{r.get('gold_before') or nan:.3f} -> {r.get('gold', nan):.3f} | "
            f"{r['win_rate']:.1%} | {r.get('kl', nan):.2f} | {r.get('well_formed', nan):.1%} |"
        )
    lines += [
        "",
        "targets (on the mean over the seeds): "
        + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in report["targets"].items()),
        "",
        f"samples after PPO (seed {seeds[0]}):",
    ]
    for s in report["samples"]:
        lines.append(f"  {s['prompt']} -> {s['response']}   (reward {s['reward']:+.2f})")
    lines += ["", f"plot: {report.get('plot', '')}"]
    return "\n".join(lines) + "\n"

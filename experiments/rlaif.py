"""Distilled RLAIF on the toy task: an LM judge, not the simulated human, labels the comparisons.

    python experiments/rlaif.py                                   # seed 0 into runs/rlaif
    python experiments/rlaif.py --only judge                      # train and evaluate the judge
    python experiments/rlaif.py --direct                          # + direct RLAIF (GRPO)
    python experiments/rlaif.py --only direct                     # the judge, SFT, GRPO only
    python experiments/rlaif.py --config experiments/configs/rlaif-toy.yaml \\
        run.seed=1 run.dir=runs/rlaif-1                           # another seed

1. **A toy judge.** A tiny GPT-2 with the toy words plus the judge's words
   (:func:`rlhf_jax.judge.build_toy_tokenizer`) learns, through the ``sft`` stage, from
   ``--judge-pairs`` gold comparisons of SFT-corpus responses. ``--judge-mode pointwise`` (the
   default): to answer :data:`rlhf_jax.judge.TOY_POINTWISE` ("Prompt : ... Response : ... Score :"
   -> "1".."10", the decile of the response's gold score, :func:`rlhf_jax.judge.toy_ratings`) for
   both responses of each comparison, plus a malformed copy of each well-formed one with
   probability ``--judge-malformed`` (:func:`rlhf_jax.judge.toy_rated_responses`; the corpus alone
   is 95.5% well-formed). ``--judge-mode pairwise``: to answer
   :data:`rlhf_jax.judge.TOY_PAIRWISE` ("... Response A : ... Response B : ... Better :" -> "A" |
   "B") for each comparison shown in both orders (:func:`rlhf_jax.judge.toy_demonstrations`). The
   gold preference labels those demonstrations and evaluates; the policy's pipeline never sees it.
2. **Its agreement with gold** on held-out pairs: the ``judge`` stage (``rlhf-jax judge``), next to
   the expected agreement of the simulated human labeller (Bradley-Terry noise at temperature
   :data:`rlhf_jax.data.toy.LABEL_TEMPERATURE`) on the same pairs.
3. **Distilled RLAIF**: the quickstart's stages (``sft -> label -> rm -> ppo``, same settings) with
   ``label.labeller=judge``: the judge ranks the SFT policy's K samples (every pair in both
   orders), the reward model learns those rankings, PPO optimises it. The report (gold win rate
   against SFT, KL) is ``<run.dir>/report.md``, as the quickstart's.
4. ``<run.dir>/judge_<mode>.yaml`` describes the judge, so that a pointwise judge can be a reward
   source of the on-policy stages (direct RLAIF), e.g. online DPO:
   ``rlhf-jax dpo dpo.trainer.online=true 'dpo.rewards=["judge:<run.dir>/judge_pointwise.yaml"]'``.

5. ``--direct``: **direct RLAIF**, GRPO (``experiments/configs/grpo-toy.yaml``) with the pointwise
   judge's expected score as the reward, compiled into the iteration, stopped at a KL budget
   (``--direct-kl`` nats; a rule that does not look at the gold preference).

Everything is local and offline. Each stage resumes (or is skipped when its ``final/`` exists).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np

from rlhf_jax import config as config_lib
from rlhf_jax import judge as J
from rlhf_jax import models, pipeline, quickstart
from rlhf_jax.algorithms.sft import SFTConfig
from rlhf_jax.data import toy
from rlhf_jax.data.formats import DataConfig
from rlhf_jax.optim import OptimConfig
from rlhf_jax.sweep import SweepConfig
from rlhf_jax.train import LoopConfig

JUDGE_PROMPT_LENGTH = 40  # <bos> + the template's 13 words + a prompt (3) + 2 responses (<= 9)


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="KEY.PATH=VALUE settings of the RLAIF pipeline")
    p.add_argument("--config", default=None, help="a YAML config (experiments/configs/...)")
    # judge: train and evaluate the judge; direct: + the SFT policy and direct RLAIF only
    p.add_argument("--only", choices=("judge", "direct", "all"), default="all")
    p.add_argument(
        "--judge-mode",
        choices=J.MODES,
        default="pointwise",
        help="pointwise: the judge rates one response 1..10 (learnt from gold ratings); "
        "pairwise: it answers A or B (learnt from gold comparisons in both orders)",
    )
    p.add_argument("--judge-init", default=None, help="start the judge from this HF directory")
    p.add_argument("--judge", default=None, help="use this trained judge (no judge training)")
    p.add_argument("--judge-pairs", type=int, default=4096, help="gold comparisons (ratings)")
    p.add_argument(
        "--judge-malformed",
        type=float,
        default=0.5,
        help="pointwise: also rate a malformed copy (rlhf_jax.data.toy.corrupt_response) of "
        "each well-formed training response with this probability (0: the corpus's own only)",
    )
    p.add_argument(
        "--direct",
        action="store_true",
        help="then direct RLAIF: GRPO (experiments/configs/grpo-toy.yaml) with the pointwise "
        "judge's score as its reward, compiled in the iteration, stopped at --direct-kl nats",
    )
    p.add_argument("--direct-kl", type=float, default=3.0, help="KL budget of the direct run")
    p.add_argument("--judge-eval-pairs", type=int, default=1024, help="held-out comparisons")
    p.add_argument("--judge-steps", type=int, default=1500, help="judge SFT steps")
    p.add_argument("--judge-hidden", type=int, default=64)
    p.add_argument("--judge-layers", type=int, default=2)
    p.add_argument("--judge-lr", type=float, default=3e-3)
    return p.parse_args(argv)


def _final(stage_dir: str) -> str | None:
    path = os.path.join(stage_dir, pipeline.FINAL_DIR)
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


def _run(cfg, stage: str):
    t = time.perf_counter()
    result = pipeline.run_stage(cfg, stage)
    if result.preempted:
        sys.exit(3)
    return result, round(time.perf_counter() - t, 1)


def train_judge(cfg: pipeline.ExperimentConfig, args) -> str:
    """The toy judge (an SFT run in ``<run.dir>/toy_judge``); returns its ``final/``."""
    seed = cfg.run.seed
    judge_run = os.path.join(cfg.run.dir, f"toy_judge_{args.judge_mode}")
    done = _final(os.path.join(judge_run, "sft"))
    if done:
        return done
    inputs = os.path.join(cfg.run.dir, "inputs", f"judge_{args.judge_mode}")
    base = os.path.join(inputs, "base")
    tokenizer = toy.load_tokenizer(J.build_toy_tokenizer(base))
    mcfg = models.ModelConfig(
        arch="gpt2",
        vocab_size=len(tokenizer),
        hidden_size=args.judge_hidden,
        num_layers=args.judge_layers,
        num_heads=4,
        num_kv_heads=4,
        head_dim=args.judge_hidden // 4,
        intermediate_size=4 * args.judge_hidden,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if args.judge_init:
        base = args.judge_init
    else:
        models.save_pretrained(models.init_model(mcfg, jax.random.PRNGKey(seed + 100)), base)
    gold = toy.preference_records(args.judge_pairs, seed=seed + 30_000, temperature=0.0)
    held = toy.preference_records(256, seed=seed + 40_000, temperature=0.0)
    if args.judge_mode == "pairwise":  # each comparison in both orders: answer A, then B
        train_rows, eval_rows = J.toy_demonstrations(gold), J.toy_demonstrations(held)
    else:  # both responses of each comparison, rated by their gold score's decile
        edges = J.toy_score_edges(seed=seed + 60_000)

        def rate(records, malformed, seed):
            prompts, responses = J.toy_rated_responses(records, malformed=malformed, seed=seed)
            return J.toy_ratings(prompts, responses, edges)

        train_rows = rate(gold, args.judge_malformed, seed + 70_000)
        eval_rows = rate(held, 0.0, 0)
    train = toy.write_jsonl(os.path.join(inputs, "train.jsonl"), train_rows)
    evalf = toy.write_jsonl(os.path.join(inputs, "eval.jsonl"), eval_rows)
    steps = args.judge_steps
    jcfg = dataclasses.replace(
        cfg,
        run=dataclasses.replace(cfg.run, dir=judge_run),
        sft=pipeline.SFTStage(
            model=base,
            train_file=train,
            eval_file=evalf,
            data=DataConfig(
                kind="completion", max_prompt_length=JUDGE_PROMPT_LENGTH, max_completion_length=2
            ),
            trainer=SFTConfig(
                optim=OptimConfig(
                    learning_rate=args.judge_lr,
                    schedule="cosine",
                    warmup_steps=50,
                    decay_steps=steps - 50,
                    end_lr_ratio=0.05,
                ),
                loop=LoopConfig(max_steps=steps, eval_every=max(steps // 5, 1)),
                batch_size=64,
            ),
            eval_size=512,
            save_every=500,
        ),
    )
    result, sec = _run(jcfg, "sft")
    print(f"[rlaif] toy judge trained in {sec} s: {result.final}")
    return result.final


def _judge_fields(args) -> dict:
    """The toy judge's JudgeConfig fields (mode, template, score tokens)."""
    pairwise = args.judge_mode == "pairwise"
    return dict(
        mode=args.judge_mode,
        template=J.TOY_PAIRWISE if pairwise else J.TOY_POINTWISE,
        scores=J.TOY_SCORES,
        batch_size=256,
    )


def evaluate_judge(cfg: pipeline.ExperimentConfig, judge_dir: str, args) -> dict:
    """The judge stage on held-out gold pairs, and the simulated human's expected agreement."""
    seed = cfg.run.seed
    pairs = toy.preference_records(args.judge_eval_pairs, seed=seed + 50_000, temperature=0.0)
    path = toy.write_jsonl(os.path.join(cfg.run.dir, "inputs", "judge", "heldout.jsonl"), pairs)
    jcfg = dataclasses.replace(
        cfg,
        judge=J.JudgeStage(**{**_judge_fields(args), "model": judge_dir, "pairs_file": path}),
    )
    result, _ = _run(jcfg, "judge")
    report = dict(result.outputs.info)
    prompts = [r["prompt"] for r in pairs]
    diff = toy.gold_scores(prompts, [r["chosen"] for r in pairs]) - toy.gold_scores(
        prompts, [r["rejected"] for r in pairs]
    )
    human = 1.0 / (1.0 + np.exp(-np.abs(diff) / toy.LABEL_TEMPERATURE))
    report["simulated_human_expected_agreement"] = float(np.where(diff == 0, 0.5, human).mean())
    print(
        f"[rlaif] judge agreement with gold on {report['pairs']} held-out pairs: "
        f"{report['agreement']:.3f} ({report['agreement_low']:.3f}-"
        f"{report['agreement_high']:.3f}); simulated human (T={toy.LABEL_TEMPERATURE}): "
        f"{report['simulated_human_expected_agreement']:.3f}"
    )
    return report


def run_direct(cfg: pipeline.ExperimentConfig, judge_yaml: str, args) -> dict:
    """Direct RLAIF: the ``grpo`` stage of ``grpo-toy.yaml`` from this run's SFT policy, its
    reward the judge's expected score (``grpo.rewards=[judge:<judge_pointwise.yaml>]``), stopped
    when the held-out KL to the SFT policy reaches ``--direct-kl`` nats (a budget, not a gold
    figure: the gold preference stays hidden)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "grpo-toy.yaml")
    g = config_lib.load_config(path).grpo
    prompts = os.path.join(cfg.run.dir, "inputs", "prompts.jsonl")
    loop = dataclasses.replace(
        g.trainer.loop, stop_metric="kl", stop_direction="above", stop_value=args.direct_kl
    )
    grpo = dataclasses.replace(
        g,
        policy=os.path.join(cfg.run.stage_dir("sft"), pipeline.FINAL_DIR),
        prompts_file=prompts,
        eval_prompts_file=prompts,
        rewards=(f"judge:{judge_yaml}",),
        trainer=dataclasses.replace(g.trainer, loop=loop),
    )
    result, sec = _run(dataclasses.replace(cfg, grpo=grpo), "grpo")
    last = result.result.evals[-1]
    out = {k: last.get(k) for k in ("gold", "win_rate", "kl", "well_formed", "good")}
    out.update(iterations=result.result.step, stop_reason=result.result.stop_reason, seconds=sec)
    print(
        f"[rlaif] direct RLAIF (GRPO on the judge's score): gold win rate against SFT "
        f"{out['win_rate']:.1%}, KL {out['kl']:.2f} nats after {out['iterations']} iterations "
        f"({out['stop_reason']})"
    )
    return out


def with_small_rm_data(cfg: pipeline.ExperimentConfig) -> pipeline.ExperimentConfig:
    """The reward-model data the README's RLAIF table was measured with: 3072 ranked prompts
    (``toy.ToyTask``'s default) and 300 steps, where the quickstart now ranks 8192 for 600 steps.
    The table's human column ran the quickstart with the same three overrides (its command)."""
    rm = cfg.rm.trainer
    optim = dataclasses.replace(rm.optim, decay_steps=280)
    loop = dataclasses.replace(rm.loop, max_steps=300)
    return dataclasses.replace(
        cfg,
        toy=toy.ToyTask(),
        rm=dataclasses.replace(cfg.rm, trainer=dataclasses.replace(rm, optim=optim, loop=loop)),
    )


def main(argv=None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    base = quickstart.default_config()
    base = dataclasses.replace(  # one PPO run (the quickstart's default sweeps PPO's seed)
        base, run=dataclasses.replace(base.run, dir="runs/rlaif"), sweep=SweepConfig()
    )
    base = with_small_rm_data(base)
    cfg = config_lib.load_config(args.config, list(args.overrides), base=base)
    t0 = time.perf_counter()
    cfg = quickstart.prepare(cfg)  # the toy inputs under <run.dir>/inputs
    label_file = os.path.join(cfg.run.stage_dir("label"), "train.jsonl")
    cfg = dataclasses.replace(cfg, rm=dataclasses.replace(cfg.rm, train_file=label_file))
    judge_dir = args.judge or train_judge(cfg, args)
    judge_report = evaluate_judge(cfg, judge_dir, args)
    # the judge as data: `judge:<run.dir>/judge_pointwise.yaml` is a reward source (scoring)
    spec = J.JudgeConfig(**{**_judge_fields(args), "model": os.path.abspath(judge_dir)})
    judge_yaml = os.path.join(cfg.run.dir, f"judge_{args.judge_mode}.yaml")
    with open(judge_yaml, "w") as f:
        f.write(config_lib.to_yaml(spec))
    out = {"judge": judge_report, "judge_dir": judge_dir}
    if args.only == "direct":
        _run(cfg, "sft")
        out["direct"] = run_direct(cfg, judge_yaml, args)
    if args.only == "all":
        cfg = dataclasses.replace(
            cfg,
            label=dataclasses.replace(
                cfg.label,
                labeller="judge",
                judge=J.JudgeConfig(**{**_judge_fields(args), "model": judge_dir}),
            ),
        )
        results, seconds = {}, {}
        for name in quickstart.STAGES:
            results[name], seconds[name] = _run(cfg, name)
        seconds["total"] = round(time.perf_counter() - t0, 1)
        report = quickstart.build_report(cfg, results, seconds)
        report["judge"] = judge_report
        report["plot"] = quickstart.plot_ppo(
            report["ppo_curve"], os.path.join(cfg.run.dir, "ppo_curves.png")
        )
        text = quickstart.format_report(report).replace(
            "# rlhf-jax quickstart", "# rlhf-jax distilled RLAIF (toy judge labels)"
        )
        text += (
            f"\ntoy judge: agreement with gold {judge_report['agreement']:.3f} on "
            f"{judge_report['pairs']} held-out pairs (simulated human "
            f"{judge_report['simulated_human_expected_agreement']:.3f})\n"
        )
        if args.direct and args.judge_mode == "pointwise":
            report["direct"] = direct = run_direct(cfg, judge_yaml, args)
            text += (
                f"direct RLAIF (GRPO, the judge's score as the reward): gold win rate against "
                f"SFT {direct['win_rate']:.1%}, KL {direct['kl']:.2f} nats, "
                f"{direct['iterations']} iterations ({direct['stop_reason']})\n"
            )
        with open(os.path.join(cfg.run.dir, "report.md"), "w", encoding="utf-8") as f:
            f.write(text)
        print(text)
        out = report
    with open(os.path.join(cfg.run.dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Safe RLHF through the pipeline: ``experiments/safe_rlhf.py`` shrunk (sft -> label with safety
rows -> rm + cost -> ppo and safe_ppo -> report), the safe_ppo stage on 8 devices equal to one,
its exact resume, and the command-line errors of the new stages."""

import dataclasses
import importlib.util
import json
import os
import shutil

import jax
import numpy as np
import pytest

from rlhf_jax import pipeline
from rlhf_jax.cli import main
from rlhf_jax.data.toy import ToyTask
from rlhf_jax.logging import read_metrics
from rlhf_jax.optim import OptimConfig
from rlhf_jax.train import LoopConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _experiment():
    path = os.path.join(ROOT, "experiments", "safe_rlhf.py")
    spec = importlib.util.spec_from_file_location("safe_rlhf_experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny(exp, run_dir, *, steps=3):
    cfg = exp.safe_config()
    r = dataclasses.replace
    short = LoopConfig(max_steps=4, eval_every=4)

    def ppo_stage(stage):
        return r(
            stage,
            batch_size=8,
            eval=r(stage.eval, size=16, samples_per_prompt=1),
            save_every=1,
            trainer=r(
                stage.trainer,
                num_samples=2,
                num_minibatches=2,
                num_epochs=1,
                optim=OptimConfig(learning_rate=3e-4, eps=1e-5),
                loop=LoopConfig(max_steps=steps, eval_every=steps),
            ),
        )

    return r(
        cfg,
        run=r(cfg.run, dir=str(run_dir), progress=False, tensorboard=False),
        toy=ToyTask(
            hidden_size=16,
            num_layers=1,
            num_heads=2,
            sft_examples=256,
            sft_eval_examples=16,
            rm_prompts=32,
            rm_eval_prompts=16,
        ),
        sft=r(cfg.sft, eval_size=16, trainer=r(cfg.sft.trainer, batch_size=16, loop=short)),
        label=r(cfg.label, chunk=32),
        rm=r(cfg.rm, normalize_samples=32, trainer=r(cfg.rm.trainer, batch_size=16, loop=short)),
        cost=r(
            cfg.cost, normalize_samples=32, trainer=r(cfg.cost.trainer, batch_size=16, loop=short)
        ),
        ppo=ppo_stage(cfg.ppo),
        safe_ppo=ppo_stage(cfg.safe_ppo),
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    exp = _experiment()
    cfg = _tiny(exp, tmp_path_factory.mktemp("safe") / "run")
    report = exp.run(cfg, verbose=False)
    return exp, cfg, report


@pytest.mark.slow
def test_experiment_end_to_end_then_safe_ppo_resumes_on_eight_devices(tiny_run, tmp_path):
    """One test, so that the shrunk experiment runs once (xdist spreads a module's tests)."""
    _writes_safety_rows_both_models_and_the_report(tiny_run)
    _resumes_exactly_on_eight_devices(tiny_run, tmp_path)


def _writes_safety_rows_both_models_and_the_report(tiny_run):
    exp, cfg, report = tiny_run
    run = cfg.run.dir
    with open(os.path.join(run, "label", "train.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 32 * 6  # every pair of 4 samples per prompt
    assert set(rows[0]) == {
        "prompt",
        "response_0",
        "response_1",
        "better_response_id",
        "safer_response_id",
        "is_response_0_safe",
        "is_response_1_safe",
    }
    for name in ("rm", "cost", "ppo", "safe_ppo"):
        assert os.path.isfile(os.path.join(run, name, "final", "config.json")), name
    for name in ("report.json", "report.md", "safe_rlhf_curves.png"):
        assert os.path.getsize(os.path.join(run, name)) > 0
    # the cost model's held-out figures and the two runs' final evaluations
    assert 0 <= report["cost_model"]["eval_sign_accuracy"] <= 1
    for name in ("ppo", "safe_ppo"):
        assert 0 <= report[name]["harmful"] <= 1 and np.isfinite(report[name]["kl"])
    curve = report["safe_ppo"]["curve"]
    assert len(curve) == 3 and all(c["lambda"] > 0 for c in curve)
    assert all(c["lambda"] is None for c in report["ppo"]["curve"])  # plain PPO has none
    # the safe run's metrics carry the multiplier, the cost and its critic
    last = read_metrics(os.path.join(run, "safe_ppo"))[-1]
    for key in ("lambda", "cost/episode", "cost/mean", "cost/unsafe", "cost_value/error"):
        assert np.isfinite(last[key]), key


def _copy(src, dst, stages):
    for stage in stages:
        shutil.copytree(os.path.join(src, stage), os.path.join(dst, stage))


def _safe_metrics(run):
    drop = ("wall_time", "step")
    return [
        {k: v for k, v in r.items() if not k.startswith(("time/", "eval/")) and k not in drop}
        for r in read_metrics(os.path.join(run, "safe_ppo"))
        if "lambda" in r
    ]


def _same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for key in w:
            np.testing.assert_allclose(g[key], w[key], rtol=1e-5, atol=1e-6, err_msg=key)


def _resumes_exactly_on_eight_devices(tiny_run, tmp_path):
    """2 iterations on one device, then resumed on 8 devices (data 2 x fsdp 4) for the third:
    the uninterrupted one-device run's metrics, the multiplier's state restored."""
    exp, cfg, _ = tiny_run
    run = str(tmp_path / "run")
    _copy(cfg.run.dir, run, ["inputs", "sft", "rm", "cost"])
    cut = exp.prepare(_tiny(exp, run, steps=2))
    cut = dataclasses.replace(
        cut, parallel=dataclasses.replace(cut.parallel, mesh=dataclasses.replace(
            cut.parallel.mesh, data=1)))  # fmt: skip
    pipeline.run_stage(cut, "safe_ppo", devices=jax.devices()[:1], verbose=False)
    whole = exp.prepare(_tiny(exp, run, steps=3))
    sharded = dataclasses.replace(
        whole,
        parallel=dataclasses.replace(
            whole.parallel,
            mesh=dataclasses.replace(whole.parallel.mesh, data=2, fsdp=4),
            preset="fsdp",
        ),
    )
    result = pipeline.run_stage(sharded, "safe_ppo", verbose=False)
    assert result.result.start_step == 2 and len(jax.devices()) == 8
    # iterations 1-2 of the cut run and 3 after the restore on 8 devices: the uninterrupted
    # one-device run's metrics
    _same(_safe_metrics(run), _safe_metrics(cfg.run.dir))
    state = result.result.state
    assert state.lagrange is not None and int(state.lagrange.filled) > 0


def test_safe_stage_errors_are_one_line(tmp_path, capsys):
    code = main(["safe-ppo", f"run.dir={tmp_path}/run", "safe_ppo.trainer.safety=null"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0  # a config error is a usage error
    assert err.startswith("rlhf-jax: error: safe_ppo.trainer.safety is null"), err
    code = main(["cost", f"run.dir={tmp_path}/run", "cost.trainer.loss=ranking"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and err.startswith("rlhf-jax: error:") and "\n" not in err
    code = main(["safe_ppo", f"run.dir={tmp_path}/run", "safe_ppo.trainer.safety.kl_share=2"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "kl_share=2" in err and "(0, 1]" in err, err
    assert not os.path.exists(os.path.join(tmp_path, "run"))  # nothing written


def test_cost_dry_run_reads_the_runs_sft_model(tmp_path, capsys):
    from rlhf_jax import quickstart

    run = tmp_path / "run"  # a run whose sft/final is a fresh toy model (only its shape is read)
    quickstart.write_base(str(run / "sft" / "final"), ToyTask(hidden_size=16, num_layers=1))
    capsys.readouterr()
    argv = ["cost", "--dry-run", f"run.dir={run}", "cost.data.max_prompt_length=4",
            "cost.data.max_completion_length=10", "cost.trainer.batch_size=16"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "B=32 T=14" in out and "total" in out, out  # 16 pairs: 32 sequences
    assert main(["safe_ppo", "--dry-run", f"run.dir={run}"]) == 2
    assert "safe_ppo has no --dry-run" in capsys.readouterr().err

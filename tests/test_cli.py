"""The rlhf-jax command: help, config errors, report, and the toy pipeline end to end."""

import os
import subprocess
import sys
import textwrap

import pytest

from rlhf_jax import config as C
from rlhf_jax.cli import main
from rlhf_jax.logging import RunLogger, read_metrics
from rlhf_jax.pipeline import ExperimentConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_top_level_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for sub in ("sft", "label", "rm", "ppo", "quickstart", "generate", "evaluate", "export"):
        assert f"• {sub}" in out


@pytest.mark.parametrize("sub", ["sft", "label", "rm", "ppo", "quickstart"])
def test_training_help_lists_every_config_key(capsys, sub):
    assert main([sub, "--help"]) == 0
    out = capsys.readouterr().out
    assert "--config" in out and "--print-config" in out
    for key, *_ in C._flat(ExperimentConfig()):
        assert f"  {key} " in out, key


@pytest.mark.parametrize("argv", [["sfft", "--help"], ["sfft"], ["nope", "x=1"]])
def test_unknown_command_is_refused_even_with_help(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        f"unknown command {argv[0]!r}; the commands are: sft, label, rm, cost, ppo, safe_ppo" in err
    )


def test_quickstart_print_config_is_the_shipped_toy_config(capsys):

    toy = os.path.join(ROOT, "experiments", "configs", "toy.yaml")
    assert main(["quickstart", "--config", toy, "run.seed=3", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "seed: 3" in out and "dir: runs/quickstart" in out
    # the quickstart's tuned values are the base under a user's overrides
    assert main(["quickstart", "ppo.trainer.kl_coef=0.2", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "kl_coef: 0.2" in out and "max_steps: 600" in out


def test_print_config_applies_overrides(capsys, tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("run:\n  seed: 4\n")
    assert main(["ppo", "--config", str(f), "run.dir=runs/z", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "seed: 4" in out and "dir: runs/z" in out
    (tmp_path / "back.yaml").write_text(out)
    assert C.load_config(tmp_path / "back.yaml") == C.load_config(f, ["run.dir=runs/z"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sft", "run.sed=1", "--print-config"], "unknown key 'run.sed'; did you mean 'run.seed'?"),
        (["rm", "run.seed", "--print-config"], "write key.path=value"),
        (["ppo", "--config", "missing.yaml", "--print-config"], "missing.yaml does not exist"),
        (["report", "no/such/run"], "no/such/run is not a directory"),
    ],
)
def test_errors_are_one_clear_line(capsys, argv, message):
    assert main(argv) in (1, 2)
    err = capsys.readouterr().err
    assert err.startswith("rlhf-jax: error: ") and message in err
    assert "Traceback" not in err


def test_unknown_flag_is_rejected_with_a_suggestion(capsys):
    assert main(["sft", "--confg", "x.yaml"]) == 2
    captured = capsys.readouterr()
    assert "--config" in captured.out + captured.err


def test_report_command(capsys, tmp_path):
    with RunLogger(tmp_path / "r", tensorboard=False, progress=False) as lg:
        for s in range(1, 4):
            lg.log(s, {"loss": 1.0 / s, "accuracy": 0.5 + 0.1 * s})
    assert main(["report", str(tmp_path / "r"), "--out", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    assert "loss" in out and "accuracy" in out and (tmp_path / "p.png").stat().st_size > 1000


# -- end to end: sft -> rm -> ppo -> export on the toy task, through the command, in a subprocess

E2E = textwrap.dedent(
    """
    import os, sys
    import jax, numpy as np
    from rlhf_jax import models, quickstart
    from rlhf_jax.cli import main
    from rlhf_jax.data import toy

    out = sys.argv[1]
    # A Hugging Face checkpoint (a tiny GPT-2 for the toy vocabulary) and TRL-format data files.
    quickstart.write_base(os.path.join(out, "base"), toy.ToyTask(hidden_size=16, num_layers=1, num_heads=2))
    tok = toy.load_tokenizer(os.path.join(out, "base"))
    toy.write_jsonl(os.path.join(out, "sft.jsonl"), toy.sft_records(64, seed=0))
    toy.write_jsonl(os.path.join(out, "pairs.jsonl"), toy.preference_records(32, seed=1))
    toy.write_jsonl(os.path.join(out, "prompts.jsonl"), [{"prompt": p} for p in toy.all_prompts()])

    config = os.path.join(out, "e2e.yaml")
    run = os.path.join(out, "run")
    for stage in ("sft", "rm", "ppo"):
        assert main([stage, "--config", config, f"run.dir={run}"]) == 0, stage
    assert main(["export", run, os.path.join(out, "export")]) == 0
    assert main(["export", run, os.path.join(out, "export_sft"), "--stage", "sft",
                 "--no-reward-model"]) == 0
    assert main(["report", os.path.join(run, "ppo")]) == 0

    # PPO resumes exactly: a copy of the run that lost everything after the checkpoint of
    # iteration 1 (as a kill -9 during iteration 2 would leave it) gives the same metrics again.
    import shutil
    from rlhf_jax.logging import read_metrics

    copy = os.path.join(out, "run_killed")
    shutil.copytree(run, copy)
    shutil.rmtree(os.path.join(copy, "ppo", "checkpoints", "2"))
    shutil.rmtree(os.path.join(copy, "ppo", "final"))
    assert main(["ppo", "--config", config, f"run.dir={copy}"]) == 0
    strip = lambda d: [{k: v for k, v in r.items() if not k.startswith("time/") and k != "wall_time"}
                       for r in read_metrics(os.path.join(d, "ppo"))]
    assert strip(copy) == strip(run) and len(strip(run)) == 2, (strip(copy), strip(run))
    # ... and it did resume: iteration 1's record is the original one, iteration 2's is new.
    t_run = [r["wall_time"] for r in read_metrics(os.path.join(run, "ppo"))]
    t_copy = [r["wall_time"] for r in read_metrics(os.path.join(copy, "ppo"))]
    assert t_copy[0] == t_run[0] and t_copy[1] > t_run[1]

    # The exported policy loads in transformers and gives the logits of the PPO policy.
    import torch
    from transformers import AutoModelForCausalLM

    ppo_policy = models.from_pretrained(os.path.join(out, "export", "policy"))
    sft_policy = models.from_pretrained(os.path.join(out, "export_sft", "policy"))
    tokens = np.array([tok.encode("the dog is")], np.int32)
    mask = np.ones_like(tokens)
    ours = np.asarray(models.logits(ppo_policy.graphdef, ppo_policy.params, tokens, mask))
    sft = np.asarray(models.logits(sft_policy.graphdef, sft_policy.params, tokens, mask))
    hf = AutoModelForCausalLM.from_pretrained(os.path.join(out, "export", "policy"))
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)
    assert np.abs(ours - sft).max() > 1e-6, "PPO did not change the policy"
    assert os.path.exists(os.path.join(out, "export", "reward_model", "config.json"))

    # PPO from Hugging Face directories made elsewhere (the export), evaluating on held-out
    # prompts every iteration, stopped by the threshold on the evaluation's reward.
    other = os.path.join(out, "from_hf")
    argv = ["ppo", "--config", config, f"run.dir={other}",
            f"ppo.policy={out}/export/policy", f"ppo.reward_model={out}/export/reward_model",
            f"ppo.eval.prompts_file={out}/prompts.jsonl", "ppo.eval.size=8",
            "ppo.trainer.loop.max_steps=5", "ppo.trainer.loop.eval_every=1",
            "ppo.trainer.loop.stop_metric=kl", "ppo.trainer.loop.stop_direction=above",
            "ppo.trainer.loop.stop_value=-1000"]
    assert main(argv) == 0
    records = read_metrics(os.path.join(other, "ppo"))
    assert len(records) == 1, records  # the first evaluation crossed the threshold: stopped
    for key in ("eval/reward", "eval/kl", "eval/length", "eval/entropy", "eval/reference/reward"):
        assert key in records[0], key
    assert os.path.getsize(os.path.join(other, "ppo", "samples.jsonl")) > 0
    assert os.path.isfile(os.path.join(other, "ppo", "final", "config.json"))
    print("E2E OK", flush=True)
    """
)

E2E_CONFIG = """
run: {tensorboard: false, progress: false}
sft:
  model: OUT/base
  train_file: OUT/sft.jsonl
  eval_file: OUT/sft.jsonl
  eval_size: 16
  data: {kind: completion, max_prompt_length: 4, max_completion_length: 10}
  trainer: {batch_size: 8, loop: {max_steps: 4, eval_every: 2}}
  save_every: 2
rm:
  train_file: OUT/pairs.jsonl
  data: {kind: preference, max_prompt_length: 4, max_completion_length: 10}
  normalize_samples: 8
  trainer: {loss: pairwise, batch_size: 8, loop: {max_steps: 3}}
  save_every: 2
ppo:
  prompts_file: OUT/prompts.jsonl
  data: {kind: prompt, max_prompt_length: 4}
  batch_size: 4
  trainer:
    response_length: 10
    num_samples: 2
    num_epochs: 1
    num_minibatches: 1
    optim: {learning_rate: 1.0e-3}
    loop: {max_steps: 2}
  save_every: 1
"""


@pytest.mark.slow
@pytest.mark.torch
def test_sft_rm_ppo_export_end_to_end_in_a_subprocess(tmp_path):
    pytest.importorskip("torch")
    (tmp_path / "e2e.yaml").write_text(E2E_CONFIG.replace("OUT", str(tmp_path)))
    script = tmp_path / "e2e.py"
    script.write_text(E2E)
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    env["XLA_FLAGS"] = os.environ["RLHF_JAX_TEST_XLA_FLAGS"]  # one device
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "E2E OK" in proc.stdout
    run = tmp_path / "run"
    for stage in ("sft", "rm", "ppo"):
        assert (run / stage / "final").is_dir() and (run / stage / "metrics.jsonl").exists()
    assert (run / "ppo" / "report.png").exists() and (run / "config.yaml").exists()
    for stage in ("sft", "rm", "ppo"):  # each stage's result is a Hugging Face directory
        assert (run / stage / "final" / "config.json").exists()
        assert (run / stage / "final" / "tokenizer.json").exists()
    ppo_keys = read_metrics(run / "ppo")[-1]
    assert "score/mean" in ppo_keys and "kl/response" in ppo_keys


def test_dry_run_compiles_from_config_json_only(capsys, tmp_path):
    import json

    from rlhf_jax.models import ModelConfig, hf

    mcfg = ModelConfig(
        arch="gpt2",
        vocab_size=64,
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
        head_dim=8,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    (tmp_path / "config.json").write_text(json.dumps(hf.config_to_hf(mcfg)))  # no weights at all
    argv = [
        "sft",
        f"sft.model={tmp_path}",
        "sft.trainer.batch_size=8",
        "sft.data.max_prompt_length=8",
        "sft.data.max_completion_length=8",
        "parallel.preset=fsdp",
        "parallel.mesh.data=1",
        "parallel.mesh.fsdp=-1",
        "--dry-run",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| sft " in out and "B=8 T=16" in out
    # PPO's dry run compiles the whole iteration (four models, the rollout, the update)
    argv = [
        "ppo",
        f"ppo.policy={tmp_path}",
        "ppo.batch_size=8",
        "ppo.data.max_prompt_length=8",
        "ppo.trainer.response_length=4",
        "parallel.mesh.data=8",
        "--dry-run",
    ]
    assert main(argv) == 0
    assert "| ppo " in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sft", "run.dir=TMP/run"], "sft.model is not set: give a Hugging Face checkpoint"),
        (["sft", "sft.model=no/such/dir"], "sft.model='no/such/dir': no such directory"),
        (
            ["rm", "rm.train_file=TMP/f.jsonl", "run.dir=TMP/run"],
            "rm.model is not set and this run has no sft result (TMP/run/sft/final): run "
            "`rlhf-jax sft` with the same run.dir first",
        ),
        (
            ["ppo", "ppo.policy=TMP", "run.dir=TMP/run"],
            "ppo.policy='TMP' holds no model: expected a Hugging Face directory",
        ),
        (["export", "TMP", "TMP/out"], "TMP/sft/final holds no sft result"),
    ],
)
def test_stage_errors_name_the_key_and_the_fix(capsys, tmp_path, argv, message):
    (tmp_path / "f.jsonl").write_text("")
    argv = [a.replace("TMP", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message.replace("TMP", str(tmp_path)) in err and "Traceback" not in err
    assert not (tmp_path / "run").exists(), "a failed start left a run directory behind"

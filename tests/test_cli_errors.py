"""Bad input through the `rlhf-jax` command: one line, the right exit status, nothing half-written.

A tiny GPT-2 for the toy vocabulary saved as a Hugging Face directory is the policy; PPO runs
against a Python reward function (shared critic), so no training stage has to run first.
"""

import os
import subprocess
import sys
import textwrap

import jax
import pytest

from rlhf_jax.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from rlhf_jax import quickstart
    from rlhf_jax.data import toy

    out = tmp_path_factory.mktemp("cli_errors")
    quickstart.write_base(str(out / "base"), toy.ToyTask(hidden_size=16, num_layers=1, num_heads=2))
    toy.write_jsonl(out / "prompts.jsonl", [{"prompt": p} for p in toy.all_prompts()])
    (out / "rewards.py").write_text(
        textwrap.dedent(
            """
            calls = []

            def length(prompts, responses):
                return [float(len(r)) for r in responses]

            def wrong_count(prompts, responses):
                return [0.0]

            def nan(prompts, responses):
                return [float("nan")] * len(responses)

            def raises(prompts, responses):
                raise RuntimeError("the scoring server is down")

            def raises_later(prompts, responses):
                calls.append(1)
                if len(calls) > 1:
                    raise RuntimeError("quota exceeded")
                return [0.0] * len(responses)
            """
        )
    )
    (out / "killer.py").write_text(
        "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\n"
        "def f(prompts, responses):\n    return [0.0] * len(responses)\n"
    )
    return out


def _ppo(files, run, *extra):
    return [
        "ppo",
        f"run.dir={run}",
        "run.progress=false",
        "run.tensorboard=false",
        "parallel.mesh.data=1",
        f"ppo.policy={files}/base",
        f"ppo.prompts_file={files}/prompts.jsonl",
        "ppo.data.max_prompt_length=4",
        "ppo.batch_size=4",
        "ppo.trainer.critic=shared",
        "ppo.trainer.response_length=6",
        "ppo.trainer.num_epochs=1",
        "ppo.trainer.loop.max_steps=2",
        f"ppo.trainer.reward_fn={files}/rewards.py:length",
        *extra,
    ]


@pytest.mark.parametrize(
    "extra, code, message",
    [
        (
            ["ppo.trainer.num_minibatches=3"],
            2,
            "ppo.trainer.num_minibatches=3 does not divide the rollout batch ppo.batch_size x "
            "ppo.trainer.num_samples = 4 x 1 = 4",
        ),
        (["ppo.batch_size=1000"], 2, "batch size 1000 does not fit"),
        (
            ["parallel.mesh.data=8", "ppo.batch_size=4"],
            2,
            "ppo.batch_size=4 does not split over the mesh's data x fsdp = 8 devices",
        ),
        (
            ["parallel.mesh.data=8", "parallel.step=shard_map", "ppo.batch_size=8"]
            + ["ppo.trainer.num_minibatches=2"],
            2,
            "a ppo minibatch of 4 rows does not split over the 8 devices of parallel.mesh data x "
            "fsdp (parallel.step=shard_map)",
        ),
        (["ppo.trainer.reward_fn=no_such_module:f"], 1, "no_such_module"),
        (["ppo.trainer.reward_fn=FILES/rewards.py:missing"], 1, "missing"),
        (["ppo.trainer.reward_fn=FILES/rewards.py:wrong_count"], 1, "failed its check"),
        (["ppo.trainer.reward_fn=FILES/rewards.py:nan"], 1, "failed its check"),
        (["ppo.trainer.reward_fn=FILES/rewards.py:raises"], 1, "the scoring server is down"),
        (["ppo.policy=FILES/prompts.jsonl"], 2, "holds no model"),
        (["ppo.prompts_file=FILES/nope.jsonl"], 2, "ppo.prompts_file="),
    ],
)
def test_bad_ppo_input_is_one_line_and_writes_nothing(capsys, files, extra, code, message):
    run = files / "run_bad"
    argv = _ppo(files, run, *[e.replace("FILES", str(files)) for e in extra])
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith("rlhf-jax: error: ") and message in err, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert not run.exists(), "a bad start left a run directory behind"


def test_run_dir_under_a_file_is_one_line(capsys, files):
    (files / "a_file").write_text("x")
    assert main(_ppo(files, files / "a_file" / "run")) == 2
    err = capsys.readouterr().err
    assert "is a file, not a directory" in err and "Traceback" not in err


def test_a_reward_function_failing_inside_the_step_is_one_line(capsys, files):
    run = files / "run_later"
    argv = _ppo(files, run, f"ppo.trainer.reward_fn={files}/rewards.py:raises_later")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("rlhf-jax: error: ") and "quota exceeded" in err
    assert "Traceback" not in err and "JaxRuntimeError" not in err


def test_sigterm_during_start_up_exits_3_and_says_nothing_to_resume(files):
    run = files / "run_sigterm"
    argv = _ppo(files, run, f"ppo.trainer.reward_fn={files}/killer.py:f")
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = os.environ["RLHF_JAX_TEST_XLA_FLAGS"]  # one device
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf_jax.cli", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "preempted before the first checkpoint" in proc.stderr
    assert not run.exists()


def test_debug_shows_the_traceback(capsys, files):
    with pytest.raises(Exception, match="does not divide"):
        main(_ppo(files, files / "run_dbg", "ppo.trainer.num_minibatches=3", "--debug"))


def test_a_reward_model_with_another_tokenizer_is_refused(capsys, files):
    """The reward model must read the policy's token ids: a tokenizer that maps two words the
    other way round is refused before anything is written."""
    import json
    import shutil

    from rlhf_jax import models, quickstart
    from rlhf_jax.data import toy

    rm_dir = files / "rm_other_tok"
    tok = toy.load_tokenizer(str(files / "base"))
    task = toy.ToyTask(hidden_size=16, num_layers=1, num_heads=2)
    rm = models.init_model(
        quickstart.policy_config(task, tok), jax.random.PRNGKey(1), lm_head=False, score_head=True
    )
    models.save_pretrained(rm, str(rm_dir))
    for name in os.listdir(files / "base"):
        if name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(files / "base" / name, rm_dir / name)
    spec = json.loads((rm_dir / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["dog"], vocab["cat"] = vocab["cat"], vocab["dog"]
    (rm_dir / "tokenizer.json").write_text(json.dumps(spec))
    run = files / "run_tok"
    argv = [a for a in _ppo(files, run) if not a.startswith("ppo.trainer.reward_fn")]
    argv += [f"ppo.reward_model={rm_dir}", "ppo.trainer.critic=separate"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "ppo.reward_model: the tokenizers differ" in err and "Traceback" not in err
    assert not run.exists()

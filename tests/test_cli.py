"""The rlhf-jax command: help, config errors, report, and the toy pipeline end to end."""

import os

import pytest

from rlhf_jax import config as C
from rlhf_jax.cli import main
from rlhf_jax.logging import RunLogger

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_top_level_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for sub in ("sft", "rm", "ppo", "quickstart", "export", "report"):
        assert f"• {sub}" in out


@pytest.mark.parametrize("sub", ["sft", "rm", "ppo"])
def test_training_help_lists_every_config_key(capsys, sub):
    assert main([sub, "--help"]) == 0
    out = capsys.readouterr().out
    assert "--config" in out and "--dry-run" in out and "--print-config" in out
    for key, *_ in C._flat(C.ExperimentConfig()):
        assert f"  {key} " in out, key


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

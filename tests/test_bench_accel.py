"""`experiments/bench_accel.py --smoke`, the accelerator benchmark's CPU smoke mode, runs end to
end: the train step, the decode and the PPO iteration each compile and run once on a tiny model."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_accel_smoke_runs_on_cpu():
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = os.environ["RLHF_JAX_TEST_XLA_FLAGS"]  # one device
    script = os.path.join(ROOT, "experiments", "bench_accel.py")
    proc = subprocess.run(
        [sys.executable, script, "--smoke"], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "[smoke: not a measurement]" in out
    for line in ("train step", "MFU", "decode batch", "new tokens/s", "ppo iteration"):
        assert line in out, (line, out)

"""Two processes on this machine (jax.distributed over loopback, gloo CPU collectives, 4 fake devices
each) train exactly as one process holding all 8 devices.

The worker script is ``tests/multihost_worker.py``; both sides train its :func:`problem` on a
(data=2, fsdp=4) mesh with the ``fsdp`` rules, through the trainers' own path: the SFT trainer's
step (``sft.make_step`` compiled for the mesh by ``parallel.jit_step``), the state placed by the
rules, batches placed by ``parallel.shard_batches``. In the two-process job the ``data`` axis spans
the processes (a hybrid DCN/ICI mesh) and each process feeds only its own rows of the batch
(``parallel.process_rows``).
"""

import os
import socket
import subprocess
import sys

import jax
import multihost_worker
import numpy as np

from rlhf_jax import parallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240  # generous: two processes import JAX and compile on 2 shared cores
TEST_FLAGS = os.environ.get("RLHF_JAX_TEST_XLA_FLAGS", "")  # tests/conftest.py


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes(out: str) -> None:
    port = _free_port()
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # multihost_worker.py sets the device count
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    script = os.path.join(REPO, "tests", "multihost_worker.py")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                script,
                "--process-id",
                str(i),
                "--num-processes",
                "2",
                "--port",
                str(port),
                "--out",
                out,
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} failed (rc={p.returncode}):\n" + "\n".join(
            (logs[i] if i < len(logs) else "").splitlines()[-40:]
        )


def test_two_processes_equal_one_process(tmp_path):
    out = str(tmp_path / "two_process.npz")
    _run_two_processes(out)
    two = dict(np.load(out))

    mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=4), jax.devices())
    one, _ = multihost_worker.train(mesh, "fsdp")

    multihost_worker.assert_results_close(two, one)
    assert one["loss"][-1] < one["loss"][0]  # it trained


def test_a_stage_through_the_command_as_two_processes_equals_one(tmp_path):
    """``rlhf-jax sft`` launched as two jax.distributed processes (4 devices each; env
    ``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``) logs the metrics of the
    same command as one process with 8 devices, and writes one final/ model."""
    from rlhf_jax import models, quickstart
    from rlhf_jax.data import toy
    from rlhf_jax.logging import read_metrics

    base = quickstart.write_base(
        str(tmp_path / "base"), toy.ToyTask(hidden_size=16, num_layers=1, num_heads=2)
    )
    toy.write_jsonl(tmp_path / "sft.jsonl", toy.sft_records(64, seed=0))

    def command(run):
        return [sys.executable, "-m", "rlhf_jax.cli", "sft", f"run.dir={run}",
                "run.progress=false", "run.tensorboard=false", f"sft.model={base}",
                f"sft.train_file={tmp_path}/sft.jsonl", "sft.data.max_prompt_length=4",
                "sft.data.max_completion_length=10", "sft.trainer.batch_size=16",
                "sft.trainer.loop.max_steps=3", "sft.save_every=0", "parallel.preset=fsdp",
                "parallel.mesh.data=2", "parallel.mesh.fsdp=4"]  # fmt: skip

    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8 " + TEST_FLAGS
    one = subprocess.run(command(tmp_path / "one"), env=env, capture_output=True, text=True,
                         timeout=TIMEOUT_S, cwd=REPO)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]

    port = _free_port()
    procs = []
    for i in range(2):
        penv = dict(env, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2")
        penv.update(
            JAX_PROCESS_ID=str(i),
            XLA_FLAGS="--xla_force_host_platform_device_count=4 " + TEST_FLAGS,
        )
        procs.append(
            subprocess.Popen(
                command(tmp_path / "two"),
                env=penv,
                cwd=REPO,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        )
    try:
        logs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i}:\n" + logs[i][-3000:]

    def metrics(run):
        skip = ("wall_time",)
        return [{k: v for k, v in r.items() if not k.startswith("time/") and k not in skip}
                for r in read_metrics(run / "sft")]  # fmt: skip

    got, want = metrics(tmp_path / "two"), metrics(tmp_path / "one")
    assert len(got) == len(want) == 3
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for key in w:
            np.testing.assert_allclose(g[key], w[key], rtol=1e-5, atol=1e-6, err_msg=key)
    a = models.from_pretrained(str(tmp_path / "two" / "sft" / "final"))
    b = models.from_pretrained(str(tmp_path / "one" / "sft" / "final"))
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)

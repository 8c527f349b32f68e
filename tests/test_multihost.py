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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes(out: str) -> None:
    port = _free_port()
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
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

"""Run logs: a progress bar, ``metrics.jsonl``, TensorBoard events, Weights & Biases, phase timings.

One :class:`RunLogger` per run directory. Every call to :meth:`RunLogger.log` writes one JSON line::

    {"step": 120, "wall_time": 1732355000.1, "loss": 0.41, "kl": 0.02, ..., "time/rollout": 0.8}

Conventions:

- ``step`` is the optimizer step (or PPO iteration) the metrics were measured *after*.
- Timings are seconds, under ``time/<phase>``: the ``timings`` argument of ``log`` plus whatever
  :meth:`RunLogger.phase` blocks accumulated since the previous ``log``;
  ``time/wall_per_step`` is the wall-clock seconds per step since the previous ``log``.
- Non-finite values (NaN, ±inf) are written as JSON ``null``, so every line is standard JSON that
  ``jq`` and pandas read; TensorBoard and W&B get the raw float.
- Only process 0 writes (``jax.process_index() == 0``); on other processes every method is a no-op.
- Resuming: pass ``resume_step`` (the step the checkpoint restored). Lines of ``metrics.jsonl``
  after it — written by the killed run after its last checkpoint — are dropped (the file is
  rewritten atomically), a line cut short by the kill is dropped, and TensorBoard purges its
  events after that step. The resumed run then writes exactly the lines an uninterrupted run would.
- The step a run resumes from is known for sure only after the restore: when the newest
  checkpoint is damaged, :meth:`rlhf_jax.checkpoint.Checkpointer.restore_latest` falls back to an
  older one. Call :meth:`RunLogger.truncate_to` with the step it returned. As a safety net, a
  logger created with ``resume_step`` that is first asked to log a step the file already holds
  (from the killed run) drops that line and every later one before writing, so a step is never
  written twice.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from rlhf_jax.errors import UserError

__all__ = [
    "RunLogger",
    "RunLogError",
    "read_metrics",
    "read_samples",
    "METRICS_FILE",
    "SAMPLES_FILE",
]

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"  # one JSON object per logged step
SAMPLES_FILE = "samples.jsonl"  # generated samples, one JSON object per row
TENSORBOARD_DIR = "tensorboard"  # TensorBoard event files
WANDB_ID_FILE = "wandb_id.txt"  # the W&B run id, so a resumed run continues the same W&B run

# Metrics shown on the progress bar when progress_keys is not given: the first keys whose name
# (last '/' component) contains one of these, in this order of preference.
_PROGRESS_HINTS = ("loss", "reward", "score", "gold", "kl", "acc")


class RunLogError(UserError, OSError):
    """The run directory cannot be created or written; the message says which and what to do."""


def read_samples(run_dir: str | os.PathLike, step: int | None = None) -> list[dict[str, Any]]:
    """The rows of ``run_dir/samples.jsonl`` (all, or those logged at ``step``); [] if none."""
    path = os.path.join(os.fspath(run_dir), SAMPLES_FILE)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if step is None or r.get("step") == step]


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl``, ordered by step, one per step (the last wins).

    A line cut short by a crash is skipped with a warning; any other unreadable line raises a
    ``ValueError`` naming the file and line number.
    """
    path = os.path.join(os.fspath(run_dir), METRICS_FILE)
    if not os.path.exists(path):
        stages = sorted(
            name
            for name in (os.listdir(run_dir) if os.path.isdir(run_dir) else [])
            if os.path.isfile(os.path.join(run_dir, name, METRICS_FILE))
        )
        if stages:
            raise FileNotFoundError(
                f"{path} does not exist: {os.fspath(run_dir)!r} holds the stages "
                f"{', '.join(stages)}; give one of them, e.g. "
                f"{os.path.join(os.fspath(run_dir), stages[-1])}"
            )
        raise FileNotFoundError(
            f"{path} does not exist: is {os.fspath(run_dir)!r} a run directory written by "
            "rlhf-jax (it holds metrics.jsonl)?"
        )
    by_step: dict[int, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            step = int(rec["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            if i >= len(lines) - 1:  # the last line: a write cut short by a crash
                log.warning("%s:%d: skipping a truncated last line", path, i)
                continue
            raise ValueError(f"{path}:{i}: not a metrics record ({err}): {line[:80]!r}") from err
        by_step[step] = rec
    return [by_step[s] for s in sorted(by_step)]


def _truncate_after(path: str, step: int) -> None:
    """Keep the lines of a JSONL file with ``step <= step``; drop a truncated last line."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # cut short by the kill
            if int(rec.get("step", 0)) <= step:
                kept.append(json.dumps(rec) + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _last_step(path: str) -> int | None:
    """The largest step of a JSONL file's readable lines, or None."""
    if not os.path.exists(path):
        return None
    last = None
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                step = int(json.loads(line).get("step", 0))
            except (json.JSONDecodeError, TypeError, ValueError, AttributeError):
                continue
            last = step if last is None else max(last, step)
    return last


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


class RunLogger:
    """Write a run's metrics to the progress bar, JSONL, TensorBoard and (optionally) W&B.

    Args:
      run_dir: the run directory (created if missing).
      tensorboard: write TensorBoard event files under ``run_dir/tensorboard``.
      wandb_project: a Weights & Biases project to log to; None (default) does not use W&B.
        Asking for it without ``wandb`` installed is an error at construction, not mid-run.
      progress_total: the number of steps the run will take (the progress bar's length); None
        shows a bar without a total.
      enabled: whether this process writes; None means ``jax.process_index() == 0``.
      resume_step: the step this run resumes from (see the module docstring); None starts a run
        that appends to whatever ``metrics.jsonl`` holds.
      progress: show a tqdm progress bar (on stderr).
      progress_keys: metric names shown on the bar; None picks up to 4 (losses, rewards, KL, ...).
      wandb_run_name: the W&B run name (default: the run directory's name).
      config: a JSON-able dict (e.g. the resolved experiment config) recorded in W&B.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        progress_total: int | None = None,
        enabled: bool | None = None,
        resume_step: int | None = None,
        progress: bool = True,
        progress_keys: Sequence[str] | None = None,
        wandb_run_name: str | None = None,
        config: Mapping[str, Any] | None = None,
    ):
        self.run_dir = os.fspath(run_dir)
        self.enabled = (jax.process_index() == 0) if enabled is None else bool(enabled)
        self._progress_keys = tuple(progress_keys) if progress_keys is not None else None
        self._phases: dict[str, float] = {}
        self._last_step: int | None = resume_step
        self._last_time = time.perf_counter()
        self._file = None
        self._samples = None
        self._tb = None
        self._wandb = None
        self._bar = None
        self._closed = False
        # The last step a killed run left in metrics.jsonl beyond resume_step (see truncate_to).
        self._stale_max: int | None = None
        if not self.enabled:
            return
        try:
            os.makedirs(self.run_dir, exist_ok=True)
            if not os.access(self.run_dir, os.W_OK):
                raise PermissionError(13, "not writable (a read-only disk, or no permission)")
        except OSError as err:
            raise RunLogError(
                f"cannot write the run directory {os.path.abspath(self.run_dir)}: "
                f"{err.strerror or err}; choose a run.dir on a writable disk, whose path does not "
                "pass through a regular file"
            ) from None
        metrics_path = os.path.join(self.run_dir, METRICS_FILE)
        if resume_step is not None:
            _truncate_after(metrics_path, int(resume_step))
            _truncate_after(os.path.join(self.run_dir, SAMPLES_FILE), int(resume_step))
            self._stale_max = _last_step(metrics_path)
        if wandb_project is not None:
            self._wandb = self._start_wandb(wandb_project, wandb_run_name, config)
        self._file = open(metrics_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard:
            self._open_tensorboard(None if resume_step is None else int(resume_step) + 1)
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=progress_total,
                initial=int(resume_step or 0),
                desc=os.path.basename(os.path.normpath(self.run_dir)) or "run",
                dynamic_ncols=True,
                leave=True,
            )

    def _open_tensorboard(self, purge_step: int | None) -> None:
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(
            logdir=os.path.join(self.run_dir, TENSORBOARD_DIR),
            purge_step=purge_step,
            flush_secs=30,
        )

    def truncate_to(self, step: int) -> None:
        """Resume from ``step``: drop what this run directory holds after it.

        Call it with the step the checkpoint actually restored (the ``step`` that
        :meth:`rlhf_jax.checkpoint.Checkpointer.restore_latest` returned), which is older than
        the ``resume_step`` given at construction when the newest checkpoint was unreadable.
        Lines of ``metrics.jsonl`` and ``samples.jsonl`` with a larger step are removed (the files
        are rewritten atomically), TensorBoard purges its events after ``step``, and the progress
        bar moves back to ``step``. Safe to call with the construction's ``resume_step`` (nothing
        changes) and before any :meth:`log`.
        """
        step = int(step)
        self._last_step, self._last_time = step, time.perf_counter()
        self._stale_max = None
        if not self.enabled or self._closed:
            return
        metrics_path = os.path.join(self.run_dir, METRICS_FILE)
        self._file.close()
        _truncate_after(metrics_path, step)
        self._file = open(metrics_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if self._samples is not None:
            self._samples.close()
            self._samples = None
        _truncate_after(os.path.join(self.run_dir, SAMPLES_FILE), step)
        if self._tb is not None:
            self._tb.close()
            self._open_tensorboard(step + 1)
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def _start_wandb(self, project, name, config):
        try:
            import wandb
        except ImportError as err:
            raise ImportError(
                f"logging to Weights & Biases project {project!r} was asked for but wandb is not "
                "installed: `pip install wandb` (or `pip install rlhf-jax[wandb]`), or leave "
                "wandb_project unset"
            ) from err
        id_path = os.path.join(self.run_dir, WANDB_ID_FILE)
        if os.path.exists(id_path):
            with open(id_path, encoding="utf-8") as f:
                run_id = f.read().strip()
        else:
            run_id = wandb.util.generate_id()
            with open(id_path, "w", encoding="utf-8") as f:
                f.write(run_id)
        return wandb.init(
            project=project,
            name=name or os.path.basename(os.path.normpath(self.run_dir)),
            id=run_id,
            resume="allow",
            dir=self.run_dir,
            config=dict(config) if config is not None else None,
        )

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a block as phase ``name``; the seconds go out with the next :meth:`log`.

        JAX dispatches asynchronously: call ``jax.block_until_ready`` on the block's outputs
        inside it, or the time measured is the dispatch, not the computation.
        """
        start = time.perf_counter()
        try:
            yield
        finally:
            self._phases[name] = self._phases.get(name, 0.0) + time.perf_counter() - start

    def log(
        self,
        step: int,
        metrics: Mapping[str, Any],
        timings: Mapping[str, float] | None = None,
    ) -> dict[str, float]:
        """Log scalar ``metrics`` (floats, numpy or jax scalars) measured after ``step``.

        Returns the record written (floats, timings under ``time/``). Raises ``ValueError`` naming
        the metric when a value is not a scalar.
        """
        step = int(step)
        if self._stale_max is not None:
            if step <= self._stale_max:  # the killed run's lines from here on are stale
                self.truncate_to(step - 1)
            self._stale_max = None
        now = time.perf_counter()
        host = jax.device_get(dict(metrics))  # one transfer for all device scalars
        record: dict[str, float] = {}
        for key, value in host.items():
            arr = np.asarray(value)
            if arr.size != 1 or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
                raise ValueError(
                    f"metric {key!r} at step {step} is not a scalar (shape {arr.shape}, dtype "
                    f"{arr.dtype}); reduce it (e.g. .mean()) before logging"
                )
            record[str(key)] = float(arr.reshape(()))
        phases = dict(self._phases)
        phases.update(timings or {})
        self._phases.clear()
        for name, seconds in phases.items():
            record[f"time/{name}"] = float(seconds)
        if self._last_step is not None and step > self._last_step:
            record["time/wall_per_step"] = (now - self._last_time) / (step - self._last_step)
        self._last_step, self._last_time = step, now
        if not self.enabled:
            return record
        line = {"step": step, "wall_time": time.time()}
        line.update({k: _finite_or_none(v) for k, v in record.items()})
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                self._tb.add_scalar(key, value, global_step=step)
        if self._wandb is not None:
            self._wandb.log(record, step=step)
        if self._bar is not None:
            self._bar.set_postfix(self._postfix(record), refresh=False)
            self._bar.update(max(0, step - self._bar.n))
        return record

    def log_samples(self, step: int, rows: Sequence[Mapping[str, Any]]) -> None:
        """Append generated samples (e.g. prompt, response, reward) to ``samples.jsonl``."""
        if not self.enabled:
            return
        if self._samples is None:
            path = os.path.join(self.run_dir, SAMPLES_FILE)
            self._samples = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        for row in rows:
            self._samples.write(json.dumps({"step": int(step), **_plain(row)}) + "\n")
        self._samples.flush()
        if self._tb is not None and rows:
            text = "\n\n".join(json.dumps(_plain(r), ensure_ascii=False) for r in rows[:8])
            self._tb.add_text("samples", text, global_step=int(step))

    def write(self, message: str) -> None:
        """Print a message without breaking the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def _postfix(self, record: Mapping[str, float]) -> dict[str, str]:
        if self._progress_keys is not None:
            keys = [k for k in self._progress_keys if k in record]
        else:
            keys = []
            for hint in _PROGRESS_HINTS:
                for k in record:
                    if k not in keys and not k.startswith("time/") and hint in k.split("/")[-1]:
                        keys.append(k)
                        break
            keys = keys[:4]
        return {k.split("/")[-1]: f"{record[k]:.4g}" for k in keys}

    def close(self) -> None:
        """Flush and close every sink (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        for f in (self._file, self._samples):
            if f is not None:
                f.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _plain(row: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in row.items():
        if isinstance(v, str | int | float | bool) or v is None:
            out[str(k)] = v
        else:
            arr = np.asarray(jax.device_get(v))
            out[str(k)] = arr.item() if arr.size == 1 else arr.tolist()
    return out

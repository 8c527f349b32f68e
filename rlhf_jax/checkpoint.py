"""Checkpoints of the whole run state, with Orbax: atomic, kept K deep, saved on preemption.

A run's state is one pytree (a ``flax.struct`` dataclass from the trainer): every trainable
parameter pytree, the optimizer states, the step counter, the PRNG keys and the KL-controller state.
:class:`Checkpointer` writes it with ``orbax.checkpoint.CheckpointManager`` next to a small JSON
``meta`` record (the data cursor, the resolved config, anything the loop needs to resume that is
not an array), so one checkpoint directory holds everything a resume needs::

    run_dir/checkpoints/
      100/state/...          # the array pytree (OCDBT / TensorStore)
      100/meta/metadata      # JSON: data cursor, config, ...
      150/...
      200.orbax-checkpoint-tmp-1732355/   # a save still in flight, or killed mid-way: ignored

Guarantees, and where each comes from:

- **Atomic.** Orbax writes a step into a temporary directory and renames it to ``<step>`` only when
  every file is on disk (``commit_success.txt`` on object stores). A process killed with
  ``kill -9`` in the middle of a save leaves a ``*.orbax-checkpoint-tmp-*`` directory, which
  :meth:`Checkpointer.restore_latest` never reads and the next :class:`Checkpointer` deletes.
- **Kept K deep.** Orbax deletes older steps after a newer one is committed (``max_to_keep``).
- **Async-safe.** ``save`` copies the arrays off the device before it returns and writes them in a
  background thread, so the caller may donate the state to the next step at once. A second save
  waits for the first; :meth:`Checkpointer.wait` waits for all.
- **Preemption.** The constructor installs a ``SIGTERM`` handler (TPU and cloud preemption, Slurm's
  ``scancel``) that only sets :attr:`Checkpointer.preempted`; the run loop sees it after the
  current step, saves with ``force=True``, waits, and exits. Nothing is written from inside the
  signal handler.
- **Any mesh.** :meth:`Checkpointer.restore_latest` restores onto the shardings of the abstract
  state it is given (``jax.ShapeDtypeStruct`` leaves with a ``sharding``), so a run saved on 8
  devices resumes on 4, or on a different ``MeshConfig``.

Multi-host: every process calls ``save`` and ``restore_latest`` with its shards; Orbax coordinates
the writes and process 0 writes the JSON meta.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os
import signal
import threading
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from rlhf_jax.errors import UserError

__all__ = ["Checkpointer", "CheckpointError", "abstract_like", "to_jsonable"]

log = logging.getLogger(__name__)

_STATE = "state"
_META = "meta"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint could not be written or read; the message says which and what to do."""


def to_jsonable(obj: Any, _path: str = "meta") -> Any:
    """Convert ``obj`` to plain JSON types: dataclasses, enums, tuples, numpy and jax scalars.

    Raises :class:`CheckpointError` naming the offending key for anything else (an array with more
    than one element belongs in the state pytree, not in the meta record).
    """
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, int | float):
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: to_jsonable(getattr(obj, f.name), f"{_path}.{f.name}")
            for f in dataclasses.fields(obj)
        }
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value, _path)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise CheckpointError(f"{_path}: key {k!r} is not a string; JSON keys must be")
            out[k] = to_jsonable(v, f"{_path}.{k}")
        return out
    if isinstance(obj, list | tuple):
        return [to_jsonable(v, f"{_path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, np.generic | np.ndarray | jax.Array) and np.size(obj) == 1:
        return np.asarray(jax.device_get(obj)).reshape(()).item()
    raise CheckpointError(
        f"{_path}: a {type(obj).__name__} cannot be stored in the JSON meta record; put arrays "
        "in the state pytree and keep meta to plain values (numbers, strings, lists, dicts)"
    )


def abstract_like(state: Any, shardings: Any = None) -> Any:
    """The abstract form of ``state`` that :meth:`Checkpointer.restore_latest` takes.

    Args:
      state: a pytree of arrays (e.g. a freshly initialised run state) or of
        ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``).
      shardings: None to keep each leaf's own sharding (the current placement), or a pytree of
        ``jax.sharding.Sharding`` of the same structure: restore onto these instead (a different
        mesh, a different rule table).
    """
    if shardings is None:
        return jax.tree.map(_to_abstract, state)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), state, shardings
    )


def _to_abstract(x: Any) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return ocp.utils.to_shape_dtype_struct(x)


class Checkpointer:
    """Save and restore the whole run state (see the module docstring for the guarantees).

    Args:
      directory: where step directories go (created if missing). A relative path is resolved
        against the working directory once, here.
      save_every: save when ``step % save_every == 0`` (``save(..., force=True)`` saves any step).
        0 saves only when forced (preemption, the end of a run).
      keep: how many committed checkpoints to keep; older ones are deleted after a newer commits.
      async_save: write in a background thread (default). False blocks in ``save``.
      handle_sigterm: install the SIGTERM handler that sets :attr:`preempted` (main thread only;
        the previous handler is put back by :meth:`close`).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        save_every: int,
        keep: int = 3,
        async_save: bool = True,
        handle_sigterm: bool = True,
    ):
        if not isinstance(save_every, int) or save_every < 0:
            raise ValueError(f"Checkpointer save_every={save_every!r}: must be an int >= 0")
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"Checkpointer keep={keep!r}: must be an int >= 1")
        self.directory = os.path.abspath(os.fspath(directory))
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise CheckpointError(
                f"checkpoint directory {self.directory} exists and is not a directory; "
                "choose another run directory"
            )
        self.save_every = save_every
        self.keep = keep
        self._preempted = threading.Event()
        self._previous_handler: Any = None
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            # A save killed mid-way leaves <step>.orbax-checkpoint-tmp-*; never read, removed here.
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(_STATE, _META)
        )
        if handle_sigterm and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    # -- preemption ------------------------------------------------------------------------

    def _on_sigterm(self, signum, frame):  # noqa: ARG002 - signal handler signature
        self._preempted.set()

    @property
    def preempted(self) -> bool:
        """True once SIGTERM arrived: the loop should ``save(step, ..., force=True)`` and exit."""
        return self._preempted.is_set()

    # -- saving ----------------------------------------------------------------------------

    def should_save(self, step: int) -> bool:
        """Whether ``save(step, ...)`` without ``force`` would write (and it is not written yet)."""
        if self.save_every == 0 or step % self.save_every != 0:
            return False
        return step not in self.all_steps()

    def save(self, step: int, state: Any, meta: Mapping[str, Any], *, force: bool = False) -> bool:
        """Save ``state`` (a pytree of arrays) and ``meta`` (plain JSON values) as ``step``.

        Returns True when a save was started. Skips (False) when ``step`` is not a multiple of
        ``save_every`` and ``force`` is False, or when ``step`` is already saved. With async
        saving the write finishes in the background; call :meth:`wait` before exiting.
        """
        step = int(step)
        if step < 0:
            raise CheckpointError(f"save(step={step}): the step must be >= 0")
        if not force and not self.should_save(step):
            return False
        if step in self.all_steps():
            return False
        latest = self.latest_step()
        if latest is not None and step < latest:
            raise CheckpointError(
                f"save(step={step}) in {self.directory}: a newer checkpoint (step {latest}) "
                "exists. Resume from it (restore_latest) or use a fresh run directory."
            )
        meta_json = to_jsonable(dict(meta))
        json.dumps(meta_json)  # fail here, not in the background thread
        # The previous async save must finish before its directory counts; Orbax also serialises.
        self._manager.save(
            step,
            args=ocp.args.Composite(
                **{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(meta_json)}
            ),
            force=True,
        )
        return True

    def wait(self) -> None:
        """Block until every save started so far is committed."""
        self._manager.wait_until_finished()

    # -- reading ---------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """The committed steps, oldest first (saves in flight are not listed until committed)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest committed step, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def read_meta(self, step: int | None = None) -> dict | None:
        """The JSON meta record of ``step`` (default: the latest), without touching the arrays."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        out = self._manager.restore(
            step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
        )
        return dict(out[_META])

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """Restore the newest committed checkpoint onto the shapes and shardings given.

        Args:
          abstract_state: a pytree with the structure of the saved state whose leaves are
            ``jax.ShapeDtypeStruct`` with a ``sharding`` (see :func:`abstract_like`), or concrete
            arrays whose shardings are used.

        Returns:
          ``(step, state, meta)``, or None when there is no committed checkpoint. If the newest
          checkpoint cannot be read (its files were damaged after the commit), the next older one
          is tried, with a warning; the unreadable newer ones are renamed ``<step>.unreadable``
          (kept, never read again) so the resumed run can save those steps anew.

        Raises:
          CheckpointError: no checkpoint matches ``abstract_state`` (a different model size or
            state layout), naming the directory and what to do.
        """
        self.wait()
        self._manager.reload()
        steps = self.all_steps()
        if not steps:
            return None
        target = jax.tree.map(_to_abstract, abstract_state)
        errors = []
        for step in reversed(steps):
            try:
                out = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        **{
                            _STATE: ocp.args.StandardRestore(target),
                            _META: ocp.args.JsonRestore(),
                        }
                    ),
                )
            except Exception as err:  # noqa: BLE001 - reported below, with every step tried
                errors.append((step, err))
                log.warning(
                    "checkpoint step %d in %s cannot be restored: %s",
                    step,
                    self.directory,
                    _first_line(err),
                )
                continue
            if errors:
                log.warning("restored the older checkpoint step %d instead", step)
                self._set_aside([s for s, _ in errors])
            return step, out[_STATE], dict(out[_META])
        step, err = errors[0]
        raise CheckpointError(
            f"no checkpoint in {self.directory} matches the run state (tried steps "
            f"{[s for s, _ in errors]}). Step {step} failed with: {_first_line(err)}\n"
            "The model size, optimizer or trainer state layout probably changed since it was "
            "saved: resume with the config the run was started with, or start a new run directory."
        ) from err

    def _set_aside(self, steps: list[int]) -> None:
        """Rename unreadable step directories to ``<step>.unreadable`` (kept for inspection,
        never read again), so the resumed run can save those steps anew."""
        if jax.process_index() == 0:
            for step in steps:
                src = os.path.join(self.directory, str(step))
                dst = f"{src}.unreadable"
                n = 1
                while os.path.exists(dst):
                    dst, n = f"{src}.unreadable{n}", n + 1
                if os.path.isdir(src):
                    os.rename(src, dst)
                    log.warning("moved the unreadable checkpoint %s to %s", src, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("rlhf_jax.checkpoint.set_aside")
        self._manager.reload()

    # -- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        """Wait for pending saves, release Orbax resources, put back the old SIGTERM handler."""
        try:
            self._manager.close()
        finally:
            if self._previous_handler is not None:
                if threading.current_thread() is threading.main_thread():
                    signal.signal(signal.SIGTERM, self._previous_handler)
                self._previous_handler = None

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Checkpointer({self.directory!r}, save_every={self.save_every}, "
            f"keep={self.keep}, steps={self.all_steps()})"
        )


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:500]

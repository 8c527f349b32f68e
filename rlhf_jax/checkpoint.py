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
- **Preemption.** A ``SIGTERM`` handler (TPU and cloud preemption, Slurm's ``scancel``) only sets
  a flag; the run loop sees :attr:`Checkpointer.preempted` after the current step, saves with
  ``force=True``, waits, and exits. Nothing is written from inside the signal handler. A program
  calls :func:`install_sigterm_handler` first thing, so a preemption during start-up (loading
  models and data, compiling) is not a kill with status 143: :func:`check_preempted` raises
  :class:`Preempted` (exit status 3) at the next boundary, and every :class:`Checkpointer`
  created afterwards shares that flag. Without it, the constructor installs its own handler.
- **Clear failures.** :meth:`Checkpointer.restore_latest` compares the saved shapes with the run
  state's before reading any array: a different model width is one :class:`CheckpointError` line
  naming the first mismatching path and both shapes. A damaged newest checkpoint falls back to
  an older one (and says which step it restored); when none can be read, one line names the
  directory, the steps tried and what to do.
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
import re
import signal
import sys
import threading
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from rlhf_jax.errors import UserError, first_line

__all__ = [
    "Checkpointer",
    "CheckpointError",
    "Preempted",
    "abstract_like",
    "check_preempted",
    "install_sigterm_handler",
    "preempted",
    "to_jsonable",
    "uninstall_sigterm_handler",
]

log = logging.getLogger(__name__)

_STATE = "state"
_META = "meta"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint could not be written or read; the message says which and what to do."""


class Preempted(Exception):
    """SIGTERM arrived before the run loop could save (during start-up): exit with status 3.

    Not an error of the user's: the command prints the message (one line, no traceback) and exits
    with :attr:`exit_code`, the status a requeue-on-3 job script resubmits.
    """

    exit_code = 3


# -- SIGTERM, process-wide -------------------------------------------------------------------

_PREEMPTED = threading.Event()  # set by the process-wide handler
_PREVIOUS: list[Any] = []  # the handler install_sigterm_handler replaced (empty: not installed)


def _on_sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
    _PREEMPTED.set()


def install_sigterm_handler() -> bool:
    """Install the process-wide SIGTERM handler: call it first thing in a program.

    From then on SIGTERM only sets a flag (:func:`preempted`); every :class:`Checkpointer` created
    afterwards shares it instead of installing its own, so a preemption that arrives while models
    and data load or the step compiles is seen by :func:`check_preempted` or by the run loop.
    Idempotent. Returns False (and installs nothing) outside the main thread, where Python does
    not allow signal handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    if not _PREVIOUS:
        _PREVIOUS.append(signal.signal(signal.SIGTERM, _on_sigterm))
    return True


def uninstall_sigterm_handler() -> None:
    """Put back the handler :func:`install_sigterm_handler` replaced, and clear the flag."""
    if _PREVIOUS and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _PREVIOUS.pop())
    _PREEMPTED.clear()


def preempted() -> bool:
    """True once SIGTERM arrived after :func:`install_sigterm_handler`."""
    return _PREEMPTED.is_set()


def check_preempted(during: str = "start-up", *, resume_step: int | None = None) -> None:
    """Raise :class:`Preempted` if SIGTERM arrived; call it between the phases of start-up.

    Args:
      during: what was being done, for the message (e.g. ``"loading the model"``).
      resume_step: the step of the latest checkpoint, when there is one (it is unchanged).
    """
    if not preempted():
        return
    if resume_step:
        raise Preempted(
            f"preempted before resuming (SIGTERM during {during}): the checkpoint of step "
            f"{resume_step} is unchanged; run the same command again to resume from it"
        )
    raise Preempted(
        f"preempted before the first checkpoint (SIGTERM during {during}): nothing to resume; "
        "run the same command again to start over"
    )


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
      handle_sigterm: watch for SIGTERM (:attr:`preempted`). After :func:`install_sigterm_handler`
        this shares the process-wide flag (a SIGTERM that arrived earlier counts); otherwise
        it installs its own handler (main thread only), put back by :meth:`close`.
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
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as err:
            raise CheckpointError(
                f"cannot create the checkpoint directory {self.directory}: "
                f"{err.strerror or first_line(err)}; choose a run.dir on a writable disk, whose "
                "path does not pass through a regular file"
            ) from None
        self.save_every = save_every
        self.keep = keep
        self._preempted = threading.Event()
        self._previous_handler: Any = None
        self.restored_step: int | None = None  # the step restore_latest returned last
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            # A save killed mid-way leaves <step>.orbax-checkpoint-tmp-*; never read, removed here.
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            # Handlers named up front, so a fresh manager can read a step's metadata (the saved
            # shapes) before restoring it.
            item_handlers={
                _STATE: ocp.StandardCheckpointHandler(),
                _META: ocp.JsonCheckpointHandler(),
            },
        )
        if handle_sigterm and _PREVIOUS:
            self._preempted = _PREEMPTED  # the process-wide handler is installed: share its flag
        elif handle_sigterm and threading.current_thread() is threading.main_thread():
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
        """Restore the newest readable checkpoint onto the shapes and shardings given.

        Args:
          abstract_state: a pytree with the structure of the saved state whose leaves are
            ``jax.ShapeDtypeStruct`` with a ``sharding`` (see :func:`abstract_like`), or concrete
            arrays whose shardings are used.

        Returns:
          ``(step, state, meta)``, or None when there is no committed checkpoint. ``step`` is the
          step actually restored (also kept as :attr:`restored_step`): if the newest checkpoint
          cannot be read (its files were damaged after the commit), the next older one is tried,
          with a warning, and the unreadable newer ones are renamed ``<step>.unreadable`` (kept,
          never read again) so the resumed run can save those steps anew. A logger must resume
          from this step, not from :meth:`latest_step` read before the call.

        Raises:
          CheckpointError: one line, for (a) a checkpoint saved with a different config: the
            first parameter path whose shape differs, with both shapes, or the first path only
            one side has; nothing is renamed; (b) every checkpoint unreadable: the directory,
            the steps tried, the first cause, and what to do.
        """
        self.wait()
        self._manager.reload()
        steps = self.all_steps()
        if not steps:
            return None
        _quiet_closed_loop_noise()
        target = jax.tree.map(_to_abstract, abstract_state)
        wanted = _shapes(target)
        failures: list[tuple[int, BaseException]] = []
        for step in reversed(steps):
            try:
                saved = self._saved_shapes(step)
            except Exception as err:  # noqa: BLE001 - an unreadable checkpoint: try the older one
                self._unreadable(step, err, failures)
                continue
            layout = _layout_difference(saved, wanted)
            if layout is not None and layout[0] == "shape":
                _, path, had, want = layout
                raise CheckpointError(
                    f"checkpoint step {step} in {self.directory} was saved with a different "
                    f"config: {path} has shape {had} there but {want} in this run (the model size "
                    "or trainer settings differ); resume with the config the run was started "
                    f"with, or set a new run.dir (or delete {self.directory} to start over)"
                )
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
            except Exception as err:  # noqa: BLE001 - classified below
                if layout is not None:
                    _, path, side = layout
                    raise CheckpointError(
                        f"checkpoint step {step} in {self.directory} holds a different state "
                        f"layout: {path} is {side} (the model, optimizer or trainer settings "
                        "differ); resume with the config the run was started with, or set a new "
                        f"run.dir (or delete {self.directory} to start over)"
                    ) from None
                self._unreadable(step, err, failures)
                continue
            if failures:
                bad = [s for s, _ in failures]
                moved = self._set_aside(bad)
                log.warning(
                    "checkpoint step%s %s in %s cannot be read (%s%s): resumed from the older "
                    "step %d; the unreadable one%s kept as %s",
                    "s" if len(bad) > 1 else "",
                    ", ".join(str(s) for s in bad),
                    self.directory,
                    f"step {bad[0]}: " if len(bad) > 1 else "",
                    _cause(failures[0][1]),
                    step,
                    "s are" if len(bad) > 1 else " is",
                    ", ".join(os.path.basename(m) for m in moved) or "(not moved: not process 0)",
                )
            self.restored_step = step
            return step, out[_STATE], dict(out[_META])
        first_step, first_err = failures[0]
        raise CheckpointError(
            f"every checkpoint in {self.directory} is unreadable (tried steps "
            f"{', '.join(str(s) for s, _ in failures)}; step {first_step}: {_cause(first_err)}): "
            f"their files were damaged after saving. Delete {self.directory} to start this stage "
            "over, or set a new run.dir"
        ) from None

    def _unreadable(self, step: int, err: BaseException, failures: list) -> None:
        # Reported once: in the warning of a fallback, or in the error when nothing restores.
        failures.append((step, err))
        log.debug("checkpoint step %d in %s cannot be read: %s", step, self.directory, _cause(err))

    def _saved_shapes(self, step: int) -> dict[str, tuple[int, ...] | None]:
        """Path -> shape of the arrays saved at ``step``, from its metadata (no array is read)."""
        meta = self._manager.item_metadata(step)[_STATE]
        if meta is None:
            raise CheckpointError(f"step {step} has no state metadata")
        tree = getattr(meta, "tree", meta)
        leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_array_metadata)[0]
        return {_path(p): _saved_shape(x) for p, x in leaves if _is_array_metadata(x)}

    def _set_aside(self, steps: list[int]) -> list[str]:
        """Rename unreadable step directories to ``<step>.unreadable`` (kept for inspection,
        never read again), so the resumed run can save those steps anew. Returns the new paths
        (empty on processes other than 0)."""
        moved = []
        if jax.process_index() == 0:
            for step in steps:
                src = os.path.join(self.directory, str(step))
                dst = f"{src}.unreadable"
                n = 1
                while os.path.exists(dst):
                    dst, n = f"{src}.unreadable{n}", n + 1
                if os.path.isdir(src):
                    os.rename(src, dst)
                    moved.append(dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("rlhf_jax.checkpoint.set_aside")
        self._manager.reload()
        return moved

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


def _cause(err: BaseException) -> str:
    """A short cause for a failed read: a TensorStore status and the file it names, or the
    exception's first line (never the multi-hundred-character TensorStore spec)."""
    line = first_line(err, 2000)
    status = re.match(r"([A-Z][A-Z_]{3,}): ", line)
    if status:
        item = re.search(r'Error reading "([^"]+)"', line)
        return f"{status.group(1)} while reading {item.group(1) if item else 'its array files'}"
    return f"{type(err).__name__}: {first_line(err, 160)}"


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _path(keys: tuple) -> str:
    """'params/layers/attn/q_proj/kernel' for a key path (an nnx Variable's '/value' dropped)."""
    names = [_key_name(k) for k in keys]
    if len(names) > 1 and names[-1] == "value":
        names = names[:-1]
    return "/".join(names)


def _is_array_metadata(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _saved_shape(x: Any) -> tuple[int, ...] | None:
    # A PRNG key array is stored as its raw uint32 data (an extra trailing axis): not compared.
    return None if _is_key(x.dtype) else tuple(int(d) for d in x.shape)


def _is_key(dtype: Any) -> bool:
    try:
        return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    except TypeError:
        return False


def _shapes(target: Any) -> dict[str, tuple[int, ...] | None]:
    leaves = jax.tree_util.tree_flatten_with_path(target)[0]
    return {
        _path(p): (None if _is_key(x.dtype) else tuple(int(d) for d in x.shape)) for p, x in leaves
    }


def _layout_difference(saved: dict, wanted: dict) -> tuple | None:
    """The first difference between the saved and the wanted path -> shape maps, in the run
    state's order: ``("shape", path, saved_shape, wanted_shape)``, or ``("layout", path, side)``
    for a path only one side has. Key arrays (shape None) are not compared."""
    for path, want in wanted.items():
        had = saved.get(path)
        if had is not None and want is not None and had != want:
            return ("shape", path, had, want)
    missing = [p for p in wanted if p not in saved]
    if missing:
        return ("layout", missing[0], "in this run but not in the checkpoint")
    extra = [p for p in saved if p not in wanted]
    if extra:
        return ("layout", extra[0], "in the checkpoint but not in this run")
    return None


_NOISE_FILTERED = False


def _quiet_closed_loop_noise() -> None:
    """Drop the ``RuntimeError('Event loop is closed')`` that TensorStore callbacks report (via
    ``sys.unraisablehook``) when a failed Orbax read has already closed its event loop: hundreds
    of lines that say nothing about the checkpoint. Every other unraisable error still goes to
    the previous hook. Installed once, by the first restore."""
    global _NOISE_FILTERED
    if _NOISE_FILTERED:
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        previous(unraisable)

    sys.unraisablehook = hook
    _NOISE_FILTERED = True
